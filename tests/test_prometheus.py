"""A real Prometheus (Debian's `prometheus`) scraping the session's TorchServe, the shipped rules
(deploy/prometheus/tvserve-rules.yml) checked and unit-tested with `promtool`, and PromQL through
Prometheus' HTTP API giving exactly what the requests sent imply."""

import json
import math
import shutil
import subprocess
import time

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from helpers import REPO, wait_until
from tvserve.ops.properties import free_port

PROMETHEUS, PROMTOOL = "/usr/bin/prometheus", "/usr/bin/promtool"  # Debian's prometheus package
RULES = REPO / "deploy/prometheus/tvserve-rules.yml"
RULES_TEST = REPO / "tests/data/tvserve-rules-test.yml"
DASHBOARD = REPO / "deploy/grafana/tvserve-dashboard.json"
MODEL = "digits_net"
SAMPLE = (REPO / "samples/7-dark-on-white.png").read_bytes()
CORRUPT = SAMPLE[:60]  # a PNG cut short: the service's 400
SCRAPE = "1s"


def rules() -> list:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def promtool(*args) -> subprocess.CompletedProcess:
    if not shutil.which(PROMTOOL):
        pytest.fail("These tests need Debian's prometheus package (promtool): apt-get install prometheus "
                    "(.ci/run installs it).")
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=REPO)


def test_the_shipped_rules_pass_promtool_check():
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_every_alert_fires_in_promtools_unit_tests_with_its_own_for():
    result = promtool("test", "rules", RULES_TEST)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {case["alertname"] for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    assert tested == {rule["alert"] for rule in rules() if "alert" in rule}


class Prometheus:
    """Prometheus' HTTP API at `url`."""

    def __init__(self, url: str):
        self.url = url

    def api(self, path: str, **params):
        response = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()["data"]

    def value(self, expr: str, at: float = None) -> float:
        """The one sample an instant query gives (None when it gives none)."""
        result = self.api("query", query=expr, **({"time": f"{at:.3f}"} if at else {}))["result"]
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def samples(self, expr: str) -> list:
        """[(timestamp s, value)] of a range selector `expr`, as scraped, summed over its series (one
        per protocol and error type): a scrape gives every series the same timestamp."""
        result = self.api("query", query=expr)["result"]
        assert result, expr
        summed = {}
        for series in result:
            for t, v in series["values"]:
                summed[float(t)] = summed.get(float(t), 0.0) + float(v)
        return sorted(summed.items())

    def scraping(self) -> bool:
        """Up, and has scraped the target (False while it starts and listens on no port yet)."""
        try:
            return self.value('up{job="tvserve"}') == 1
        except requests.ConnectionError:
            return False

    def firing(self, alert: str) -> list:
        return [a["labels"] for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == alert
                and a["state"] == "firing"]


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """Prometheus scraping the session server's metrics port every second with the shipped rules,
    evaluated every second; TvserveNoReadyWorker's `for` is 0 s in its copy, so that the test need not
    wait the shipped minute (promtool's unit test above holds the shipped `for`)."""
    if not shutil.which(PROMETHEUS):
        pytest.fail("This test needs Debian's prometheus: apt-get install prometheus (.ci/run installs it).")
    folder = tmp_path_factory.mktemp("prometheus")
    shipped = yaml.safe_load(RULES.read_text())
    for rule in (rule for group in shipped["groups"] for rule in group["rules"]):
        if rule.get("alert") == "TvserveNoReadyWorker":
            rule["for"] = "0s"
    (folder / "rules.yml").write_text(yaml.safe_dump(shipped))
    target = server.metrics_url.split("://", 1)[1]
    config = {"global": {"scrape_interval": SCRAPE, "evaluation_interval": SCRAPE},
              "rule_files": [str(folder / "rules.yml")],
              "scrape_configs": [{"job_name": "tvserve", "static_configs": [{"targets": [target]}]}]}
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(folder / "prometheus.log", "wb") as log:
        process = subprocess.Popen([PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                   stdout=log, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: process.poll() is None and prom.scraping(),
                   f"Prometheus scraping {target} (log: {folder / 'prometheus.log'})", timeout=60, poll=0.5)
        yield prom
    finally:
        process.terminate()
        process.wait(timeout=30)


def post(server, data: bytes) -> tuple:
    """(status, seconds) of one /predictions request."""
    started = time.perf_counter()
    response = requests.post(f"{server.inference_url}/predictions/{MODEL}", data=data, timeout=60)
    return response.status_code, time.perf_counter() - started


def metrics(server) -> dict:
    """MODEL's tvserve_requests_total by status, and its tvserve_request_seconds buckets {le: count},
    read from the metrics port as Prometheus reads them."""
    text = requests.get(f"{server.metrics_url}/metrics", timeout=30).text
    totals, buckets = {}, {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("ModelName") != MODEL:
                continue
            if sample.name == "tvserve_requests_total":
                totals[sample.labels["status"]] = totals.get(sample.labels["status"], 0) + sample.value
            elif sample.name == "tvserve_request_seconds_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0) + sample.value
    return {"totals": totals, "buckets": buckets}


def bucket_quantile(q: float, buckets: dict) -> float:
    """Prometheus' histogram_quantile over cumulative counts {upper bound: count}: linear within the
    bucket the rank falls in (from 0 in the first), the last finite bound where it falls in +Inf."""
    bounds = sorted(buckets.items())
    rank = q * bounds[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in bounds:
        if count >= rank:
            return lower if math.isinf(upper) else lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    raise AssertionError(f"no bucket holds rank {rank}: {bounds}")


def test_promql_rate_and_p99_are_what_the_requests_sent_imply(server, prometheus):
    selector = f'{{ModelName="{MODEL}"}}'
    assert post(server, SAMPLE)[0] == 200 and post(server, CORRUPT)[0] == 400  # both series exist before the window
    before = metrics(server)
    wait_until(lambda: prometheus.value(f'sum(tvserve_requests_total{selector})') == sum(before["totals"].values()),
               "Prometheus scraping the counts before the requests")
    sent = [post(server, CORRUPT if i % 10 == 9 else SAMPLE) for i in range(30)]
    after = metrics(server)
    assert {status for status, _ in sent} == {200, 400}
    wait_until(lambda: prometheus.value(f'sum(tvserve_requests_total{selector})') == sum(after["totals"].values()),
               "Prometheus scraping the counts after the requests")
    # A window from the last scrape before the requests to the first after them: its ends are scrapes,
    # so rate() extrapolates nothing, and rate x window is the count sent exactly.
    scraped = prometheus.samples(f'tvserve_requests_total{{ModelName="{MODEL}",status="200"}}[5m]')
    start = max(t for t, v in scraped if v == before["totals"]["200"])
    end = min(t for t, v in scraped if v == after["totals"]["200"])
    window = f"{round((end - start) * 1000)}ms"
    seconds = round((end - start) * 1000) / 1000
    ok, refused = sum(status == 200 for status, _ in sent), sum(status == 400 for status, _ in sent)
    rate = prometheus.value(f"sum(rate(tvserve_requests_total{selector}[{window}]))", at=end)
    assert rate * seconds == pytest.approx(ok + refused, rel=1e-9)
    errors = prometheus.value(f'sum(rate(tvserve_requests_total{{ModelName="{MODEL}",status="400"}}[{window}]))', at=end)
    assert errors * seconds == pytest.approx(refused, rel=1e-9)
    p99 = prometheus.value(f"histogram_quantile(0.99, sum by (le) (rate(tvserve_request_seconds_bucket{selector}[{window}])))",
                           at=end)
    observed = {le: after["buckets"][le] - before["buckets"].get(le, 0) for le in after["buckets"]}
    assert observed[math.inf] == ok  # tvserve_request_seconds times the answered requests (docs/operating.md)
    assert p99 == pytest.approx(bucket_quantile(0.99, observed), rel=1e-9)
    # each request spent less in the worker than its round trip: all lie at or below the bucket holding the slowest
    slowest = max(round_trip for status, round_trip in sent if status == 200)
    assert p99 <= min(le for le in observed if le >= slowest)


def test_an_alert_fires_when_a_model_has_no_ready_worker(server, prometheus):
    url = f"{server.management_url}/models"
    response = requests.post(url, params={"url": f"{MODEL}.mar", "model_name": "digits_idle", "initial_workers": 0},
                             timeout=60)
    assert response.status_code == 200, response.text
    try:  # its archive's model-config.yaml starts a worker: scale it to none
        scaled = requests.put(f"{url}/digits_idle", params={"min_worker": 0, "max_worker": 0, "synchronous": "true"},
                              timeout=60)
        assert scaled.status_code == 200, scaled.text
        wait_until(lambda: prometheus.firing("TvserveNoReadyWorker"), "TvserveNoReadyWorker firing", timeout=30)
        firing = prometheus.firing("TvserveNoReadyWorker")
        assert [(a["ModelName"], a["severity"]) for a in firing] == [("digits_idle", "critical")]
        assert prometheus.value('tvserve_ready_workers{ModelName="digits_idle"}') == 0
        assert prometheus.value(f'tvserve_ready_workers{{ModelName="{MODEL}"}}') == 1
    finally:
        requests.delete(f"{url}/digits_idle", timeout=60)
    wait_until(lambda: not prometheus.firing("TvserveNoReadyWorker"), "the alert resolving once the model is gone",
               timeout=30)


def test_every_grafana_panel_is_promql_the_real_prometheus_answers(server, prometheus):
    dashboard = json.loads(DASHBOARD.read_text())
    assert post(server, SAMPLE)[0] == 200
    exprs = {target["expr"].replace("$model", ".*"): panel["title"]
             for panel in dashboard["panels"] for target in panel["targets"]}
    assert len(exprs) == 8
    wanted = [expr for expr in exprs if not expr.startswith(("tvserve:errors", "tvserve:server_error"))]  # errors may be none

    def answered():
        return all(MODEL in {series["metric"].get("ModelName") for series in prometheus.api("query", query=expr)["result"]}
                   for expr in wanted)
    wait_until(answered, "every panel of the dashboard showing digits_net", timeout=30, poll=1)
    for expr in exprs:  # a query Prometheus cannot parse answers 400 (Prometheus.api asserts 200)
        prometheus.api("query", query=expr)
