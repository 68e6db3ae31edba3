"""The probe endpoint: plain HTTP that a kubelet or a load balancer can ask, served by the
`tvserve serve` process itself on its own port (config `tvserve_probe_address`).

- `GET /ready`: 200 only when every model's workers are READY (the management API, which `/ping`
  does not consult) and the server is not stopping; 503 otherwise, with the reason in one line.
  On SIGTERM it answers 503 at once, `tvserve_unready_seconds` before the drain begins, so that
  balancers and Kubernetes' endpoints stop routing before TorchServe stops accepting.
- `GET /live`: 200 while the TorchServe frontend runs and its management API answers.
- `GET /metrics`: Prometheus text with `tvserve_ready` and `tvserve_inflight_requests` (requests
  queued in TorchServe plus batches inside workers), the HorizontalPodAutoscaler's metric.
"""

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import requests

from tvserve.ops.management import pending_requests, readiness
from tvserve.ops.stopping import busy_workers

log = logging.getLogger(__name__)

PROBE_PROPERTY = "tvserve_probe_address"  # config key; the container's entrypoint sets it from TVSERVE_PROBE_ADDRESS
UNREADY_PROPERTY = "tvserve_unready_seconds"  # s of 503 on /ready after SIGTERM, before the drain
READY_PATH, LIVE_PATH, METRICS_PATH = "/ready", "/live", "/metrics"
INFLIGHT_METRIC = "tvserve_inflight_requests"
READY_METRIC = "tvserve_ready"


class ProbeState:
    """What the probe answers, read from one TorchServe: `server` is a tvserve.ops.server.Server."""

    def __init__(self, server):
        self.server = server
        self.draining = threading.Event()

    def ready(self) -> tuple:
        """(ready?, one line)."""
        if self.draining.is_set():
            return False, "stopping: draining accepted requests"
        if self.server.process is None or self.server.process.poll() is not None:
            return False, "TorchServe is not running"
        return readiness(self.server.management_url, self.server.keys().get("management"))

    def live(self) -> tuple:
        """(alive?, one line): the frontend process runs and its management API answers."""
        if self.server.process is None or self.server.process.poll() is not None:
            return False, "TorchServe is not running"
        try:
            pending_requests(self.server.management_url, self.server.keys().get("management"))
        except (requests.RequestException, ValueError) as err:
            return False, f"management API does not answer: {err}"
        return True, "alive"

    def inflight(self) -> int:
        """Requests queued in TorchServe plus batches running in workers (their busy markers)."""
        try:
            queued = sum(pending_requests(self.server.management_url, self.server.keys().get("management")).values())
        except (requests.RequestException, ValueError):
            queued = 0
        return queued + len(busy_workers(self.server.busy_dir))  # a killed worker's marker is not counted

    def metrics(self) -> str:
        ready = int(self.ready()[0])
        return (f"# HELP {READY_METRIC} 1 when every model's workers are READY and the server is not stopping.\n"
                f"# TYPE {READY_METRIC} gauge\n{READY_METRIC} {ready}\n"
                f"# HELP {INFLIGHT_METRIC} Requests queued in TorchServe plus batches running in its workers.\n"
                f"# TYPE {INFLIGHT_METRIC} gauge\n{INFLIGHT_METRIC} {self.inflight()}\n")


def make_handler(state: ProbeState):
    """A request handler class bound to `state`."""

    class ProbeHandler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = urlsplit(self.path).path
            if path == METRICS_PATH:
                self.answer(200, state.metrics(), "text/plain; version=0.0.4")
            elif path in (READY_PATH, LIVE_PATH):
                ok, line = state.ready() if path == READY_PATH else state.live()
                self.answer(200 if ok else 503, line + "\n", "text/plain")
            else:
                self.answer(404, f"unknown path {path}: try {READY_PATH}, {LIVE_PATH} or {METRICS_PATH}\n", "text/plain")

        def answer(self, status: int, body: str, content_type: str):
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except ConnectionError:  # a balancer's health check may close before reading the answer
                log.debug("probe: %s closed the connection before the answer", self.client_address)

        def log_message(self, *args):  # probes every second would flood the console
            pass

    return ProbeHandler


def host_port(address: str) -> tuple:
    """("0.0.0.0", 8083) from "http://0.0.0.0:8083"."""
    parts = urlsplit(address)
    if not parts.hostname or not parts.port:
        raise ValueError(f"{PROBE_PROPERTY}={address}: expected http://HOST:PORT")
    return parts.hostname, parts.port


class Probe:
    """The probe's HTTP server on a daemon thread; `stopping()` turns /ready to 503."""

    def __init__(self, server, address: str):
        self.state = ProbeState(server)
        self.address = address
        self.httpd = ThreadingHTTPServer(host_port(address), make_handler(self.state))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="tvserve-probe", daemon=True)

    def start(self) -> "Probe":
        self.thread.start()
        log.debug("probe: %s%s, %s, %s", self.address, READY_PATH, LIVE_PATH, METRICS_PATH)
        return self

    def stopping(self) -> None:
        self.state.draining.set()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
