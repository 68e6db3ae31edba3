"""Safe by default, and faults survived: the production configuration, safe loading, client
retries, a killed worker, overload, and an honest readiness check."""

import base64
import json
import os
import pickle
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import requests

from conftest import PHOTOS
from helpers import REPO, post_image, run_tvserve
from test_cli import broken_copy, missing_class
from tvserve import TvserveError
from tvserve.ops import client
from tvserve.ops.management import model_status, pending_requests
from tvserve.ops.properties import free_port, free_ports_config, read_properties, write_properties
from tvserve.ops.server import Server, health


def make_server(folder: Path, store: Path, base_config: Path, env: dict = None, **overrides) -> Server:
    """A server (not started) for `store`, with `base_config`'s ports moved to free ones."""
    config = free_ports_config(base_config, folder / "config.properties")
    if overrides:
        write_properties(config, {**read_properties(config), **{k: str(v) for k, v in overrides.items()}})
    return Server(model_store=store, config=config, workdir=folder / "server", env=env)


@pytest.fixture(scope="module")
def production(work, model_store):
    """The production configuration (ports moved to free ones), with secrets in the environment."""
    folder = work / "production"
    store = folder / "model_store"
    store.mkdir(parents=True)
    (store / "digits_net.mar").write_bytes((model_store / "digits_net.mar").read_bytes())
    with make_server(folder, store, REPO / "config.production.properties",
                     env={"MY_SECRET_TOKEN": "hush", "TVSERVE_VISIBLE": "seen"}) as server:
        yield server


def worker_pid(server: Server, model: str, token: str = None) -> int:
    description = requests.get(f"{server.management_url}/models/{model}", headers=client.bearer(token), timeout=10)
    return description.json()[0]["workers"][0]["pid"]


def test_production_inference_needs_the_token(production, digit_files):
    image = digit_files[0][0].read_bytes()
    url = production.inference_url.replace("0.0.0.0", "127.0.0.1")
    refused = requests.post(f"{url}/predictions/digits_net", data=image, timeout=30)
    assert refused.status_code in (400, 401) and "Token Authorization failed" in refused.text
    wrong = requests.post(f"{url}/predictions/digits_net", data=image, headers=client.bearer("nope"), timeout=30)
    assert wrong.status_code in (400, 401)
    token = production.keys()["inference"]
    answer = client.predict("digits_net", image, url=url, token=token)
    assert answer[0]["label"] == str(digit_files[0][1])


def test_production_protocol_routes_need_the_token_too(production, digit_files):
    url = production.inference_url.replace("0.0.0.0", "127.0.0.1")
    body = {"instances": [{"b64": base64.b64encode(digit_files[0][0].read_bytes()).decode()}]}
    for path in ("/v2/health/ready", "/v2/models/digits_net"):
        assert requests.get(f"{url}{path}", timeout=30).status_code in (400, 401)
    assert requests.post(f"{url}/v1/models/digits_net:predict", json=body, timeout=30).status_code in (400, 401)
    token = client.bearer(production.keys()["inference"])
    assert requests.get(f"{url}/v2/health/ready", headers=token, timeout=30).json() == {"ready": True}
    answer = requests.post(f"{url}/v1/models/digits_net:predict", json=body, headers=token, timeout=30)
    assert answer.json()["predictions"][0][0]["label"] == str(digit_files[0][1])


def test_production_key_file_is_private_and_outside_the_model_store(production):
    key_file = production.workdir / client.KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert production.model_store not in key_file.parents


def test_production_refuses_to_register_models(production):
    token = production.keys()["management"]
    for url in ("https://example.com/evil.mar", "file:///etc/passwd", "../../../tmp/x.mar", "digits_net.mar"):
        response = requests.post(f"{production.management_url}/models", params={"url": url},
                                 headers=client.bearer(token), timeout=30)
        assert response.status_code in (403, 405), (url, response.status_code, response.text)
    listing = requests.get(f"{production.management_url}/models", timeout=10)
    assert listing.status_code in (400, 401)  # the management API needs its own token too


def test_production_listens_beyond_loopback_on_the_inference_port_only(production):
    tree = {production.process.pid} | {p.pid for p in psutil.Process(production.process.pid).children(recursive=True)}
    listening = [c.laddr for c in psutil.net_connections(kind="inet") if c.status == "LISTEN" and c.pid in tree]
    inference_port = int(production.inference_url.rsplit(":", 1)[1])
    exposed = [(addr.ip, addr.port) for addr in listening if addr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert exposed and all(port == inference_port for _, port in exposed), listening
    assert len(listening) == 5  # inference, management, metrics, gRPC inference and management


def test_production_workers_do_not_see_secret_environment_variables(production):
    pid = worker_pid(production, "digits_net", production.keys()["management"])
    environment = psutil.Process(pid).environ()
    assert environment.get("TVSERVE_VISIBLE") == "seen"
    assert "MY_SECRET_TOKEN" not in environment


class Exploit:
    """A pickle that would create a file when unpickled by a full (unsafe) torch.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "checkpoint.pt"
    with open(evil, "wb") as stream:
        pickle.dump({"state_dict": Exploit(marker), "arch": "Net"}, stream)
    result = run_tvserve("archive", "checkpoint", evil, "--export-path", tmp_path / "store")
    assert result.returncode == 1
    assert "weights_only=True refused it" in result.stderr and "Traceback" not in result.stderr
    weights = run_tvserve("archive", "torchvision", "squeezenet1_1", "--weights-file", evil,
                          "--export-path", tmp_path / "store")
    assert weights.returncode == 1 and "weights_only=True refused it" in weights.stderr
    assert not marker.exists()
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())


class Flaky(BaseHTTPRequestHandler):
    """Answers 503 with Retry-After: 1 to the first two POSTs, then 200 with a top-1 JSON."""

    calls = []

    def do_POST(self):  # noqa: N802 - the http.server API
        self.rfile.read(int(self.headers["Content-Length"]))
        Flaky.calls.append(time.monotonic())
        if len(Flaky.calls) <= 2:
            self.send_response(503)
            self.send_header("Retry-After", "1")
            body = b'{"code": 503, "type": "ServiceUnavailableException", "message": "busy"}'
        else:
            self.send_response(200)
            body = b'[{"label": "x", "index": 0, "probability": 1.0}]'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_client_retries_503_honouring_retry_after():
    Flaky.calls.clear()
    with ThreadingHTTPServer(("127.0.0.1", 0), Flaky) as flaky:
        threading.Thread(target=flaky.serve_forever, daemon=True).start()
        answer = client.predict("m", b"image", url=f"http://127.0.0.1:{flaky.server_port}")
        flaky.shutdown()
    assert answer[0]["label"] == "x" and len(Flaky.calls) == 3
    assert Flaky.calls[1] - Flaky.calls[0] >= 0.95 and Flaky.calls[2] - Flaky.calls[1] >= 0.95


def test_client_gives_up_after_bounded_retries_on_no_server():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(TvserveError, match="No server answers"):
        client.predict("m", b"image", url=f"http://127.0.0.1:{port}", retries=3)
    assert 3.0 <= time.monotonic() - started < 10  # 0.5 + 1 + 2 s of backoff


def test_killed_worker_recovers_and_no_request_is_lost(server, digit_files):
    """Steady load (bounded, loopback) on digits_net; kill -9 its worker mid-way."""
    images = [path.read_bytes() for path, _ in digit_files[:20]]
    expected = [client.predict("digits_net", image, url=server.inference_url)[0]["index"] for image in images]
    stop_at = time.monotonic() + 20
    results = []

    def load(offset):
        i = offset
        while time.monotonic() < stop_at and len(results) < 4000:
            try:
                answer = client.predict("digits_net", images[i % 20], url=server.inference_url, timeout=30)
                results.append(answer[0]["index"] == expected[i % 20])
            except TvserveError as err:
                results.append(str(err))
            i += 1

    with ThreadPoolExecutor(max_workers=4) as pool:
        for offset in range(4):
            pool.submit(load, offset)
        time.sleep(3)
        victim = worker_pid(server, "digits_net")
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        while True:
            ready, wanted = model_status(server.management_url).get("digits_net", (0, 1))
            if ready >= wanted and worker_pid(server, "digits_net") != victim:
                break
            assert time.monotonic() - killed_at < 60, "digits_net not READY again within 60 s"
            time.sleep(0.1)
        recovery = time.monotonic() - killed_at
    failures = [r for r in results if r is not True]
    print(f"\nkill -9 worker: READY again after {recovery:.1f} s; {len(results)} requests, "
          f"{len(results) - len(failures)} correct answers, failures: {failures[:3]}")
    assert len(results) > 100 and not failures


def test_overload_gets_fast_503s_and_the_server_recovers(work, model_store):
    folder = work / "overload"
    store = folder / "model_store"
    store.mkdir(parents=True)
    (store / "resnet18.mar").write_bytes((model_store / "resnet18.mar").read_bytes())
    with make_server(folder, store, REPO / "config.properties", job_queue_size=2) as server:
        image = PHOTOS[0].read_bytes()

        def timed(_):
            started = time.monotonic()
            response = post_image(server, "resnet18", image, timeout=60)
            return response.status_code, time.monotonic() - started

        calm = [timed(0)[1] for _ in range(5)]
        with ThreadPoolExecutor(max_workers=40) as pool:
            burst = list(pool.map(timed, range(40)))
        after = [timed(0) for _ in range(5)]
    rejected = [seconds for status, seconds in burst if status == 503]
    print(f"\noverload: {len(rejected)}/40 got 503 (slowest {max(rejected, default=0):.2f} s); "
          f"p50 latency before {sorted(calm)[2]:.3f} s, after {sorted(s for _, s in after)[2]:.3f} s")
    assert {status for status, _ in burst} <= {200, 503} and len(rejected) >= 20
    assert max(rejected) < 2.0
    assert all(status == 200 for status, _ in after)
    assert sorted(s for _, s in after)[2] < 3 * sorted(calm)[2]


def test_health_says_not_ready_while_ping_says_healthy(work, model_store):
    folder = work / "notready"
    store = folder / "model_store"
    broken_copy(model_store / "digits_net.mar", store / "digits_net.mar", missing_class)
    server = make_server(folder, store, REPO / "config.properties").start()  # never READY: no wait
    try:
        deadline = time.monotonic() + 60
        while server.failed_loads("digits_net") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        ping = requests.get(f"{server.inference_url}/ping", timeout=10)
        ready, line = health(server.workdir)
        result = run_tvserve("health", "--workdir", server.workdir)
    finally:
        server.stop()
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy"
    assert not ready and "digits_net 0/1 workers READY" in line
    assert result.returncode == 1 and "not ready" in result.stdout


def test_stop_lets_accepted_requests_finish(work, model_store):
    folder = work / "graceful"
    store = folder / "model_store"
    store.mkdir(parents=True)
    (store / "resnet18.mar").write_bytes((model_store / "resnet18.mar").read_bytes())
    server = make_server(folder, store, REPO / "config.properties").start()
    server.wait_ready()
    image = PHOTOS[0].read_bytes()

    def predict(_):
        try:
            return post_image(server, "resnet18", image, timeout=60).status_code
        except requests.ConnectionError as err:
            return type(err).__name__

    with ThreadPoolExecutor(max_workers=8) as pool:
        in_flight = [pool.submit(predict, i) for i in range(8)]
        time.sleep(0.3)  # all eight accepted: one in the worker, the rest queued
        pending = sum(pending_requests(server.management_url).values())
        started = time.monotonic()
        code = server.stop()
        stopped_in = time.monotonic() - started
        answers = [future.result() for future in in_flight]
    print(f"\ngraceful stop: {pending} queued when asked, stopped in {stopped_in:.1f} s, answers {answers}")
    assert pending >= 1  # the stop had requests to wait for
    assert answers == [200] * 8
    with pytest.raises(requests.ConnectionError):  # and nothing is accepted afterwards
        post_image(server, "resnet18", image, timeout=10)
    assert code is not None and not any(server.busy_dir.iterdir())


def test_one_minute_soak_has_no_errors_and_no_memory_growth(server, digit_files):
    """The CI-sized run of `tvserve soak` (the default run lasts 10 minutes)."""
    result = run_tvserve("soak", "digits_net", *[path for path, _ in digit_files[:10]], "--duration", 60,
                         "--url", server.inference_url, "--management-url", server.management_url)
    print("\n" + result.stdout.splitlines()[-1] if result.stdout else result.stderr)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.rsplit("\n", 2)[0])  # the JSON report, then one summary line
    assert report["requests"] > 1000 and report["errors"] == []
    assert report["rss_growth"] < 0.10
