"""Safe by default, and faults survived: the production configuration, safe loading, client
retries, a killed worker, overload, and an honest readiness check."""

import base64
import contextlib
import json
import logging
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
from helpers import REPO, Gate, archive_gated, held, post_image, run_tvserve, wait_until
from test_cli import broken_copy, missing_class
from tvserve import TvserveError
from tvserve.ops import client
from tvserve.ops.management import model_status
from tvserve.ops.properties import free_port, free_ports_config, read_properties, write_properties
from tvserve.ops.server import Server, health


def make_server(folder: Path, store: Path, base_config: Path, env: dict = None, **overrides) -> Server:
    """A server (not started) for `store`, with `base_config`'s ports moved to free ones; its files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
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


@pytest.fixture(scope="module")
def gated(work):
    """(model store with gated.mar, its Gate): a model whose requests finish only while the gate is open."""
    folder = work / "gated"
    gate = Gate(folder / "gate")
    archive_gated(folder / "model", folder / "model_store", gate)
    yield folder / "model_store", gate
    gate.open()


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


def test_production_listens_beyond_loopback_on_the_inference_and_console_ports_only(production):
    tree = {production.process.pid} | {p.pid for p in psutil.Process(production.process.pid).children(recursive=True)}
    listening = [c.laddr for c in psutil.net_connections(kind="inet") if c.status == "LISTEN" and c.pid in tree]
    public = {int(url.rstrip("/").rsplit(":", 1)[1]) for url in (production.inference_url, production.console_address)}
    exposed = [(addr.ip, addr.port) for addr in listening if addr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert {port for _, port in exposed} == public, listening  # the console's page holds no key; its calls need one
    assert len(listening) == 6  # inference, console, management, metrics, gRPC inference and management


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
    """Answers `status` with Retry-After and TorchServe's JSON error body to the first two POSTs,
    then 200 with a top-1 JSON."""

    status, retry_after, message = 503, "1", "busy"
    calls = []

    def do_POST(self):  # noqa: N802 - the http.server API
        self.rfile.read(int(self.headers["Content-Length"]))
        self.calls.append(time.monotonic())
        if len(self.calls) <= 2:
            self.send_response(self.status)
            self.send_header("Retry-After", self.retry_after)
            body = json.dumps({"code": self.status, "type": "SomeException", "message": self.message}).encode()
        else:
            self.send_response(200)
            body = b'[{"label": "x", "index": 0, "probability": 1.0}]'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Silent(BaseHTTPRequestHandler):
    """Reads each POST and answers nothing until `release` is set (when the test ends)."""

    calls = []
    release = threading.Event()

    def do_POST(self):  # noqa: N802 - the http.server API
        self.rfile.read(int(self.headers["Content-Length"]))
        self.calls.append(time.monotonic())
        self.release.wait(600)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def local_server(handler):
    """An HTTP server on a free loopback port answering with `handler`; yields its URL."""
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{httpd.server_port}"
        finally:
            httpd.shutdown()


def retry_lines(caplog) -> list:
    return [record.getMessage() for record in caplog.records if record.name == "tvserve.ops.client"]


def test_client_retries_503_honouring_retry_after():
    Flaky.calls.clear()
    with local_server(Flaky) as url:
        answer = client.predict("m", b"image", url=url)
    assert answer[0]["label"] == "x" and len(Flaky.calls) == 3
    assert Flaky.calls[1] - Flaky.calls[0] >= 0.95 and Flaky.calls[2] - Flaky.calls[1] >= 0.95


@pytest.mark.parametrize("status", [503, 507])
def test_each_retry_is_logged_with_its_status(caplog, status):
    handler = type(f"Flaky{status}", (Flaky,), {"status": status, "calls": []})
    caplog.set_level(logging.INFO, logger="tvserve.ops.client")
    with local_server(handler) as url:
        answer = client.predict("m", b"image", url=url)
    assert answer[0]["label"] == "x" and len(handler.calls) == 3
    assert retry_lines(caplog) == [f"retrying POST /predictions/m in 1.0 s (HTTP {status})"] * 2


def test_a_500_from_a_dying_worker_is_retried_and_other_500s_are_not(caplog):
    died = type("WorkerDied", (Flaky,), {"status": 500, "message": "Worker died.", "calls": []})
    bug = type("HandlerBug", (Flaky,), {"status": 500, "message": "boom", "calls": []})
    caplog.set_level(logging.INFO, logger="tvserve.ops.client")
    with local_server(died) as url:
        assert client.predict("m", b"image", url=url)[0]["label"] == "x"
    assert len(died.calls) == 3 and retry_lines(caplog) == [
        f"retrying POST /predictions/m in {delay} s (HTTP 500: Worker died.)" for delay in ("0.5", "1.0")]
    caplog.clear()
    with local_server(bug) as url, pytest.raises(TvserveError, match="^m: HTTP 500: boom$"):
        client.predict("m", b"image", url=url)
    assert len(bug.calls) == 1 and retry_lines(caplog) == []


def test_retry_after_is_capped(caplog, monkeypatch):
    handler = type("FlakyForAnHour", (Flaky,), {"retry_after": "3600", "calls": []})
    monkeypatch.setattr(client, "MAX_WAIT", 0.5)
    caplog.set_level(logging.INFO, logger="tvserve.ops.client")
    with local_server(handler) as url:
        assert client.predict("m", b"image", url=url)[0]["label"] == "x"
    assert retry_lines(caplog) == ["retrying POST /predictions/m in 0.5 s (HTTP 503)"] * 2
    assert handler.calls[1] - handler.calls[0] >= 0.45


def test_client_gives_up_after_bounded_retries_on_no_server(caplog):
    port = free_port()
    caplog.set_level(logging.INFO, logger="tvserve.ops.client")
    started = time.monotonic()
    with pytest.raises(TvserveError, match="No server answers"):
        client.predict("m", b"image", url=f"http://127.0.0.1:{port}", retries=3)
    assert time.monotonic() - started >= 3.4  # 0.5 + 1 + 2 s of backoff slept; bounded: exactly 3 retries below
    lines = retry_lines(caplog)
    assert [line.split(" (")[0] for line in lines] == [f"retrying POST /predictions/m in {s} s" for s in
                                                      ("0.5", "1.0", "2.0")]
    assert all("connection error" in line and "Connection refused" in line for line in lines)


def test_a_read_timeout_is_one_error_not_retried_and_one_line_from_the_cli(tmp_path):
    """A server that takes the request and never answers: no retry, no traceback."""
    image = tmp_path / "image.png"
    image.write_bytes(b"image")
    Silent.calls.clear()
    Silent.release.clear()
    with local_server(Silent) as url:
        try:
            with pytest.raises(TvserveError, match=r"^m: the server at .* did not answer within 1 s\."):
                client.predict("m", b"image", url=url, timeout=1)
            result = run_tvserve("predict", "m", image, "--url", url, "--timeout", 1, "--workdir", tmp_path,
                                 timeout=120)
        finally:
            Silent.release.set()
    assert len(Silent.calls) == 2  # one POST each: a read timeout is not retried
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: m: the server at {url} took the request but did not answer within 1 s.")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


BEFORE_KILL = 50  # answers before the kill: the load is flowing
AFTER_RECOVERY = 200  # answers after the new worker is READY


def new_worker_ready(server: Server, model: str, victim: int) -> bool:
    ready, wanted = model_status(server.management_url).get(model, (0, 1))
    return ready >= wanted and worker_pid(server, model) != victim


def test_killed_worker_recovers_and_no_request_is_lost(server, digit_files):
    """Steady load from 4 threads on digits_net; kill -9 its worker once answers flow; the load
    runs until a new worker is READY and AFTER_RECOVERY more requests were answered."""
    images = [path.read_bytes() for path, _ in digit_files[:20]]
    expected = [client.predict("digits_net", image, url=server.inference_url)[0]["index"] for image in images]
    results, done = [], threading.Event()

    def load(offset):
        i = offset
        while not done.is_set():
            try:
                answer = client.predict("digits_net", images[i % 20], url=server.inference_url, timeout=60)
                results.append(answer[0]["index"] == expected[i % 20])
            except TvserveError as err:
                results.append(str(err))
            i += 1

    with ThreadPoolExecutor(max_workers=4) as pool:
        loads = [pool.submit(load, offset) for offset in range(4)]
        try:
            wait_until(lambda: len(results) >= BEFORE_KILL, f"{BEFORE_KILL} answers before the kill")
            victim = worker_pid(server, "digits_net")
            killed_at, answered_before = time.monotonic(), len(results)
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: new_worker_ready(server, "digits_net", victim), "digits_net READY with a new worker",
                       timeout=120)
            recovery, recovered_at = time.monotonic() - killed_at, len(results)
            wait_until(lambda: len(results) >= recovered_at + AFTER_RECOVERY,
                       f"{AFTER_RECOVERY} answers from the new worker", timeout=300)
        finally:
            done.set()
    for finished in loads:
        finished.result()  # a load thread that died of anything but a TvserveError fails here
    failures = [r for r in results if r is not True]
    print(f"\nkill -9 worker: READY again after {recovery:.1f} s; {len(results)} requests "
          f"({answered_before} before the kill, {recovered_at - answered_before} while it restarted), "
          f"{len(results) - len(failures)} correct answers, failures: {failures[:3]}")
    assert not failures and len(results) >= BEFORE_KILL + AFTER_RECOVERY


def test_the_request_inside_a_killed_worker_is_retried_not_lost(work, gated, caplog):
    """kill -9 of a worker while the gate holds one request inside it and two queued: the client
    retries the one that died with the worker (TorchServe answers it 507, or 500 "Worker died."
    when it has not yet seen the worker's exit code), and all three get the same answer as before."""
    store, gate = gated
    caplog.set_level(logging.INFO, logger="tvserve.ops.client")
    with make_server(work / "killed_gated", store, REPO / "config.properties") as server:
        image = PHOTOS[0].read_bytes()
        calm = client.predict("gated", image, url=server.inference_url)
        victim = worker_pid(server, "gated")

        def predict(_):
            return client.predict("gated", image, url=server.inference_url, timeout=120)

        with ThreadPoolExecutor(max_workers=3) as pool, gate.closed():
            held_requests = [pool.submit(predict, i) for i in range(3)]
            wait_until(lambda: held(server) == (2, True), "one request inside the worker and two queued")
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: new_worker_ready(server, "gated", victim), "gated READY with a new worker", timeout=120)
        answers = [future.result() for future in held_requests]  # the gate is open again
    retried = [line for line in retry_lines(caplog) if "/predictions/gated" in line]
    print(f"\nkill -9 of a worker holding a request: retries {retried}")
    assert answers == [calm] * 3
    assert len(retried) == 1, retried  # the one inside the worker
    assert retried[0] in [f"retrying POST /predictions/gated in 0.5 s ({reason})"
                          for reason in ("HTTP 507", "HTTP 500: Worker died.")]


BURST = 40  # concurrent requests against a full queue


def test_overload_gets_fast_503s_and_the_server_recovers(work, gated):
    """job_queue_size=2, the worker held by the gate: one request in the worker and two queued by
    construction; every other request must get its 503 while they are still held."""
    store, gate = gated
    with make_server(work / "overload", store, REPO / "config.properties", job_queue_size=2) as server:
        image = PHOTOS[0].read_bytes()
        calm = post_image(server, "gated", image)
        assert calm.status_code == 200, calm.text
        worker = worker_pid(server, "gated")

        def timed(_):
            started = time.monotonic()
            response = post_image(server, "gated", image, timeout=120)
            return response, time.monotonic() - started

        with ThreadPoolExecutor(max_workers=3) as held_pool, gate.closed():
            accepted = [held_pool.submit(post_image, server, "gated", image, timeout=120)]
            wait_until(lambda: held(server) == (0, True), "the first request inside the worker")
            accepted += [held_pool.submit(post_image, server, "gated", image, timeout=120) for _ in range(2)]
            wait_until(lambda: held(server) == (2, True), "two requests queued behind it")
            with ThreadPoolExecutor(max_workers=BURST) as pool:
                burst = list(pool.map(timed, range(BURST)))
            still_held, answered = held(server), [future.done() for future in accepted]
        finished = [future.result() for future in accepted]  # the gate is open again
        after = [post_image(server, "gated", image) for _ in range(5)]
        wait_until(lambda: held(server) == (0, False), "an idle server after the burst")
        status = model_status(server.management_url)["gated"]
        same_worker = worker_pid(server, "gated") == worker
    rejected = [(response.status_code, response.json().get("type")) for response, _ in burst]
    print(f"\noverload: {len(rejected)}/{BURST} got 503 while the worker was held "
          f"(slowest {max(seconds for _, seconds in burst):.2f} s); then {len(finished)} held requests answered")
    assert rejected == [(503, "ServiceUnavailableException")] * BURST
    assert still_held == (2, True) and answered == [False] * 3  # the 503s did not wait for any inference
    assert [response.status_code for response in finished + after] == [200] * 8
    assert all(response.json() == calm.json() for response in finished + after)
    assert status == (1, 1) and same_worker  # recovered: queue empty, the same worker READY


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


def test_stop_lets_accepted_requests_finish(work, gated):
    """Eight requests held by the gate (one in the worker, seven queued); a stop asked meanwhile
    waits for them all while the gate is closed, and stops the server once they are answered."""
    store, gate = gated
    server = make_server(work / "graceful", store, REPO / "config.properties").start()
    image = PHOTOS[0].read_bytes()

    def predict(_):
        try:
            return post_image(server, "gated", image, timeout=120).status_code
        except requests.ConnectionError as err:
            return type(err).__name__

    try:
        server.wait_ready()
        with ThreadPoolExecutor(max_workers=9) as pool, gate.closed():
            in_flight = [pool.submit(predict, i) for i in range(8)]
            wait_until(lambda: held(server) == (7, True), "one request inside the worker and seven queued")
            stopping = pool.submit(server.stop)
            time.sleep(1.0)  # the drain looks every 0.05 s: it has seen the held requests many times
            draining = (stopping.done(), server.process.poll(), [f.done() for f in in_flight])
            queued = held(server) if draining[:2] == (False, None) else "server gone"
            gate.open()
            code = stopping.result()
            answers = [future.result() for future in in_flight]
    finally:
        gate.open()
        server.stop()
    print(f"\ngraceful stop: while held: stopped {draining[0]}, exit code {draining[1]}, "
          f"(queued, busy) {queued}; answers {answers}")
    assert draining == (False, None, [False] * 8) and queued == (7, True)  # still draining, nothing dropped
    assert answers == [200] * 8
    with pytest.raises(requests.ConnectionError):  # and nothing is accepted afterwards
        post_image(server, "gated", image, timeout=10)
    assert code is not None and not any(server.busy_dir.iterdir())


def test_one_minute_soak_has_no_errors_and_no_memory_growth(server, digit_files):
    """The CI-sized run of `tvserve soak` (the default run lasts 10 minutes): a minute, and on until
    1,000 requests were answered however slow the machine."""
    result = run_tvserve("soak", "digits_net", *[path for path, _ in digit_files[:10]], "--duration", 60,
                         "--min-requests", 1001,
                         "--url", server.inference_url, "--management-url", server.management_url)
    print("\n" + result.stdout.splitlines()[-1] if result.stdout else result.stderr)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.rsplit("\n", 2)[0])  # the JSON report, then one summary line
    assert report["requests"] > 1000 and report["errors"] == []
    assert report["rss_growth"] < 0.10


def test_production_console_shows_nothing_without_the_key(production):
    """The page is at the console's own address (tests/test_console.py drives it there); the inference
    port's /console, where that address relays the page's calls, answers only with the inference key."""
    url = production.inference_url.replace("0.0.0.0", "127.0.0.1")
    for path in ("/console/", "/console/api/models", "/console/api/metrics"):
        refused = requests.get(f"{url}{path}", timeout=10)
        assert refused.status_code in (400, 401) and "Token Authorization failed" in refused.text, path
    assert production.console_url == f"{production.console_address}/console/"
