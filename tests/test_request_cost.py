"""What a request costs the server beyond its own work (tvserve/tools/request_cost.py measures it):
the worker prints a batch's metrics in one write, counters summed, in the line format TorchServe's
frontend parses; the frontend writes no line per request to ts_log.log or model_log.log; and
/metrics still counts every request, image and batch."""

import logging
import re
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import ts
from ts.metrics.dimension import Dimension
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.metrics.metric_type_enum import MetricTypes

from handlers.telemetry import Telemetry
from test_metrics import scrape, settled, total
from tvserve.tools.request_cost import compiler_cpu, proc_cpu, server_processes, worker_service

# org.pytorch.serve.metrics.Metric.PATTERN (TorchServe 0.12's frontend): name, unit, value,
# dimensions, type, hostname, timestamp, request ids
FRONTEND_PATTERN = re.compile(r"\s*([\w\s]+)\.([\w\s]+):([0-9\-,.e]+)\|#([^|]*)(\|#type:([^|,]+))?\|#hostname:([^,]+),([^,]+)(,(.*))?")
BATCHED = "digits_batched"  # batch 4, 200 ms delay (tests/conftest.py)


class Lines(logging.Handler):
    """Every record the worker's root logger gets: one record is one write to its stdout."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())

    def metric_lines(self) -> list:
        return [line for record in self.records for line in record.splitlines() if line.startswith("[METRICS]")]


@pytest.fixture
def worker_log():
    root, lines = logging.getLogger(), Lines()
    level = root.level
    root.addHandler(lines)
    root.setLevel(logging.INFO)
    yield lines
    root.removeHandler(lines)
    root.setLevel(level)


def parsed(line: str) -> tuple:
    """(name, unit, value, type, {dimension: value}, hostname) as the frontend reads the line."""
    match = FRONTEND_PATTERN.fullmatch(line.removeprefix("[METRICS]"))
    assert match, line
    name, unit, value, dimensions, _, kind, hostname = match.groups()[:7]
    return name, unit, float(value), kind, dict(pair.split(":") for pair in dimensions.split(",")), hostname


def test_a_line_reads_as_torchserve_s_own(worker_log):
    """The same metric through TorchServe's metrics cache and through Telemetry parses alike."""
    cache = MetricsCacheYamlImpl(config_file_path=f"{ts.__path__[0]}/configs/metrics.yaml")
    cache.initialize_cache()
    cache.request_ids = {0: "a-request"}
    context = types.SimpleNamespace(metrics=cache, model_name="net", manifest={"model": {"modelVersion": "2.0"}})
    labels = [Dimension("ModelName", "net"), Dimension("Level", "Model"), Dimension("model_version", "2.0")]
    cache.add_metric("tvserve_requests_total", 1, "requests", metric_type=MetricTypes.COUNTER,
                     dimensions=labels + [Dimension("protocol", "v2"), Dimension("status", "400"),
                                          Dimension("error_type", "InvalidTensor")])
    cache.add_metric("tvserve_decode_seconds", 0.0125, "seconds", metric_type=MetricTypes.HISTOGRAM, dimensions=list(labels))
    theirs = worker_log.metric_lines()
    worker_log.records.clear()
    telemetry = Telemetry(context)
    telemetry.request("v2", 400, "InvalidTensor")
    telemetry.seconds("decode", 0.0125)
    telemetry.flush()
    ours = worker_log.metric_lines()
    assert sorted(map(parsed, ours)) == sorted(map(parsed, theirs))
    assert all(line.endswith(",a-request") for line in ours + theirs)


def test_a_batch_s_metrics_go_out_in_one_write_with_counters_summed(model_store, tmp_path, digit_files, worker_log):
    """A real TorchServe service (ts/service.py) running the handler on a batch of four: one write of
    tvserve's lines, one line per histogram observation, one per counter label set."""
    service, handler = worker_service(model_store / "digits_net.mar", tmp_path)
    bodies = [path.read_bytes() for path, _ in digit_files[:3]] + [b"not an image"]
    batch = [{"requestId": f"r{i}".encode(), "headers": [],
              "parameters": [{"name": "body", "contentType": "application/octet-stream", "value": body}]}
             for i, body in enumerate(bodies)]
    service.set_cl_socket(None)
    worker_log.records.clear()
    service.predict(batch)
    tvserve_writes = [record for record in worker_log.records if record.startswith("[METRICS]tvserve_")]
    assert len(tvserve_writes) == 1
    lines = [parsed(line) for line in worker_log.metric_lines()]
    names = [line[0] for line in lines]
    assert names.count("tvserve_decode_seconds") == names.count("tvserve_preprocess_seconds") == 3
    assert names.count("tvserve_request_seconds") == 3
    assert names.count("tvserve_inference_seconds") == names.count("tvserve_batch_images") == 1
    assert [line[2] for line in lines if line[0] == "tvserve_batch_images"] == [3]
    counters = {(line[4]["status"], line[4]["error_type"]): line[2] for line in lines if line[0] == "tvserve_requests_total"}
    assert counters == {("200", "none"): 3, ("400", "UnsupportedImage"): 1}
    assert names.count("PredictionTime") == 1  # TorchServe's own, per batch
    assert len(lines) == 3 * 3 + 2 + 2 + 1


def test_no_line_per_request_in_ts_log_or_model_log_and_metrics_count_all(server, digit_files):
    """16 requests in batches of up to 4: ts_log.log and model_log.log get no line for any of them
    (lean logs), and /metrics counts each request, image and batch."""
    data = [path.read_bytes() for path, _ in digit_files[:16]]
    url = f"{server.inference_url}/predictions/{BATCHED}"
    count = lambda samples, name: total(samples, name, ModelName=BATCHED)
    sent = count(scrape(server), "tvserve_requests_total")
    assert requests.post(url, data=data[0], timeout=30).status_code == 200  # first-use lines (metric registration)
    first = settled(server, lambda samples: count(samples, "tvserve_requests_total") == sent + 1)  # its metrics are in
    before = {name: count(first, name) for name in ("tvserve_requests_total", "tvserve_batch_images_sum",
                                                   "tvserve_batch_images_count", "tvserve_decode_seconds_count")}
    start = {name: len(server.log(name).splitlines()) for name in ("ts_log", "model_log")}
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda body: requests.post(url, data=body, timeout=60).status_code, data))
    assert statuses == [200] * 16
    after = settled(server, lambda samples: count(samples, "tvserve_requests_total") == before["tvserve_requests_total"] + 16)
    moved = {name: count(after, name) - value for name, value in before.items()}
    assert moved["tvserve_requests_total"] == moved["tvserve_batch_images_sum"] == 16
    assert moved["tvserve_decode_seconds_count"] == 16
    assert 4 <= moved["tvserve_batch_images_count"] < 16  # batched: fewer forwards than requests
    for name in ("ts_log", "model_log"):
        written = server.log(name).splitlines()[start[name]:]
        assert written == [], (name, written[:5])


def test_the_frontend_s_compiler_threads_are_told_apart(server, digit_files):
    """The cost table's "its JIT compiler" row: the CPU of the frontend JVM's C1/C2 compiler threads,
    read from /proc, is part of the JVM's and not zero once it has served requests."""
    for path, _ in digit_files[:20]:
        requests.post(f"{server.inference_url}/predictions/digits_net", data=path.read_bytes(), timeout=30).raise_for_status()
    frontend = server_processes(server.process.pid)["frontend"]
    assert len(frontend) == 1
    assert 0 < compiler_cpu(frontend[0]) < proc_cpu(frontend[0])
