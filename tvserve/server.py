"""Starts, watches and stops a TorchServe process for a model store.

A model counts as ready only when the management API shows its workers READY: `/ping` answers
Healthy even while a worker crash-loops. A server whose models do not become ready is stopped,
and the worker's error is read from its log.
"""

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import requests
import yaml

from tvserve import TvserveError
from tvserve.client import KEY_FILE, bearer, read_keys
from tvserve.log4j2 import log4j2_xml

log = logging.getLogger(__name__)

STATE_FILE = "server.json"
EXTRA_STARTUP_SECONDS = 30  # JVM start and worker spawn, on top of the archives' startupTimeout
ERROR_LINE = re.compile(r"\b\w*(Error|Exception)\b: .+")
WRAPPER_ERROR = re.compile(r"RuntimeError: \d{3} - ")  # TorchServe's re-raise of the real error
DRAIN_SECONDS = 30  # the longest a stop waits for accepted requests to finish
FAILED_LOADS_BEFORE_GIVING_UP = 2  # TorchServe retries a dead worker forever, with backoff


def read_properties(path: Path) -> dict:
    """A Java .properties file as a dict (key=value lines; '#' comments)."""
    properties = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            properties[key.strip()] = value.strip()
    return properties


def write_properties(path: Path, properties: dict) -> Path:
    Path(path).write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
    return Path(path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports_config(base: Path, dest: Path) -> Path:
    """A copy of config `base` with every port moved to a free one, each on its own host."""
    properties = read_properties(base)
    for key in ("inference_address", "management_address", "metrics_address"):
        host = properties.get(key, "http://127.0.0.1:0").rsplit(":", 1)[0]
        properties[key] = f"{host}:{free_port()}"
    for key in ("grpc_inference_port", "grpc_management_port"):
        properties[key] = str(free_port())
    return write_properties(dest, properties)


def archive_config(mar: Path) -> dict:
    """The model-config.yaml inside a .mar ({} when it has none)."""
    with zipfile.ZipFile(mar) as archive:
        try:
            return yaml.safe_load(archive.read("model-config.yaml")) or {}
        except KeyError:
            return {}


def archive_model_name(mar: Path) -> str:
    """The name TorchServe registers a .mar under: its manifest's, not the file's."""
    with zipfile.ZipFile(mar) as archive:
        return json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]["modelName"]


class Server:
    """One TorchServe process tree (launcher, Java frontend, Python workers) in its own session.

    `workdir` holds its logs, temp files and state file, so servers never share files.
    """

    def __init__(self, *, model_store: Path, config: Path, workdir: Path, models: str = "all", env: dict = None):
        self.model_store = Path(model_store).resolve()
        self.config = Path(config).resolve()
        self.workdir = Path(workdir).resolve()
        self.models = models
        self.extra_env = dict(env or {})  # on top of this process's environment
        self.properties = read_properties(self.config)
        self.inference_url = self.properties.get("inference_address", "http://127.0.0.1:8080")
        self.management_url = self.properties.get("management_address", "http://127.0.0.1:8081")
        self.metrics_url = self.properties.get("metrics_address", "http://127.0.0.1:8082")
        self.process = None

    def __enter__(self) -> "Server":
        """Starts the server and waits until it is READY; leaving the block stops it."""
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def busy_dir(self) -> Path:
        return self.workdir / "busy"

    def expected_models(self) -> list:
        if self.models == "all":
            return sorted({archive_model_name(path) for path in self.model_store.glob("*.mar")})
        return sorted(entry.split("=")[0].removesuffix(".mar") for entry in self.models.split(","))

    def startup_timeout(self) -> float:
        timeouts = [int(archive_config(mar).get("startupTimeout", 120)) for mar in self.model_store.glob("*.mar")]
        return max(timeouts, default=120) + EXTRA_STARTUP_SECONDS

    def environment(self) -> dict:
        env = {**os.environ, **self.extra_env}
        tmp = self.workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env.update(TMPDIR=str(tmp), TEMP=str(tmp), LOG_LOCATION=str(self.log_dir), METRICS_LOCATION=str(self.log_dir))
        env["TVSERVE_BUSY_DIR"] = str(self.busy_dir)  # workers mark the batches they are running
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads sleep, not spin (handlers/backends.py)
        if "TVSERVE_THREADS" not in env:
            env["TVSERVE_THREADS"] = str(self.threads_per_worker())
        return env

    def threads_per_worker(self) -> int:
        """config's tvserve_threads_per_worker, or for `auto` (the default) the cores shared evenly
        among every worker of the models it loads, so that workers x threads <= cores."""
        threads = self.properties.get("tvserve_threads_per_worker", "auto")
        if threads != "auto":
            return int(threads)
        default = int(self.properties.get("default_workers_per_model", os.cpu_count() or 1))
        mars = list(self.model_store.glob("*.mar")) if self.models == "all" else [
            self.model_store / entry.split("=")[-1] for entry in self.models.split(",")]
        workers = sum(int(archive_config(mar).get("minWorkers", default)) for mar in mars if mar.is_file())
        return max(1, (os.cpu_count() or 1) // max(1, workers))  # as handlers.backends.cores_per_worker (no torch here)

    def start(self) -> "Server":
        if not self.model_store.is_dir():
            raise TvserveError(f"No model store at {self.model_store}. Build archives with `tvserve archive`.")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / KEY_FILE).unlink(missing_ok=True)  # TorchServe writes fresh keys at start
        shutil.rmtree(self.busy_dir, ignore_errors=True)
        self.busy_dir.mkdir()
        command = [
            str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground", "--ncs",
            "--model-store", str(self.model_store), "--ts-config", str(self.config),
            "--models", self.models,
        ]
        if self.properties.get("tvserve_lean_logs") == "true":
            (self.workdir / "log4j2.xml").write_text(log4j2_xml())
            command += ["--log-config", str(self.workdir / "log4j2.xml")]
        self.console = open(self.log_dir / "console.log", "ab")
        self.process = subprocess.Popen(
            command, cwd=self.workdir, env=self.environment(), start_new_session=True,
            stdout=self.console, stderr=subprocess.STDOUT,
        )
        (self.workdir / STATE_FILE).write_text(json.dumps({
            "pid": self.process.pid, "owner": os.getpid(),
            "inference": self.inference_url, "management": self.management_url,
        }))
        return self

    def keys(self) -> dict:
        """The API keys TorchServe wrote in its working directory ({} with tokens off)."""
        return read_keys(self.workdir)

    def model_status(self) -> dict:
        """{model name: (READY workers, workers wanted)} for every version the server knows."""
        return model_status(self.management_url, self.keys().get("management"))

    def not_ready(self) -> list:
        """Expected models whose workers are not all READY yet (all of them if the API is down)."""
        try:
            status = self.model_status()
        except (requests.RequestException, ValueError):
            return self.expected_models()
        return [name for name in self.expected_models()
                if name not in status or status[name][0] < status[name][1]]

    def wait_ready(self, timeout: float = None, poll: float = 0.5) -> None:
        """Blocks until every expected model is READY; stops the server and raises otherwise."""
        timeout = timeout or self.startup_timeout()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise TvserveError(
                    f"TorchServe exited with code {self.process.returncode} during start-up.\n"
                    + self.console_tail()
                )
            waiting = self.not_ready()
            if not waiting:
                return
            failing = [name for name in waiting if self.failed_loads(name) >= FAILED_LOADS_BEFORE_GIVING_UP]
            if failing or time.monotonic() > deadline:
                why = "workers keep dying while loading" if failing else f"not ready after {timeout:.0f} s"
                errors = "\n".join(self.worker_error(name) for name in failing or waiting)
                self.stop()
                raise TvserveError(f"Model(s) {', '.join(failing or waiting)}: {why}; server stopped.\n{errors}")
            time.sleep(poll)

    def worker_lines(self, model: str) -> list:
        """What `model`'s workers printed, from TorchServe's model log (messages only)."""
        path = self.log_dir / "model_log.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return [line.split(" - ", 1)[-1] for line in lines if f"-{model}_" in line]

    def failed_loads(self, model: str) -> int:
        """How many of `model`'s workers have died so far."""
        return sum("Backend worker process died" in line for line in self.worker_lines(model))

    def worker_error(self, model: str) -> str:
        """The last error a model's worker logged, with the lines that led to it."""
        mine = self.worker_lines(model)
        errors = [i for i, line in enumerate(mine) if ERROR_LINE.search(line) and not WRAPPER_ERROR.search(line)]
        if not errors:
            return f"{model}: no worker error in the logs; see {self.log_dir}."
        last = errors[-1]
        context = "\n".join(f"    {line}" for line in mine[max(0, last - 8):last + 1])
        return f"{model}: worker error: {ERROR_LINE.search(mine[last]).group(0)}\n{context}"

    def console_tail(self, lines: int = 20) -> str:
        path = self.log_dir / "console.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, timeout: float = 60, drain_timeout: float = DRAIN_SECONDS) -> int:
        """Lets accepted requests finish (up to `drain_timeout`), then SIGTERM to the whole
        process tree, SIGKILL after `timeout`; returns the exit code."""
        if self.process is None or self.console.closed:
            return 0 if self.process is None else self.process.returncode
        if self.process.poll() is None:
            drain(self.management_url, self.keys().get("management"), self.busy_dir, drain_timeout)
            signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("TorchServe did not stop in %.0f s: killing it", timeout)
        signal_group(self.process.pid, signal.SIGKILL)  # workers left behind, if any
        self.process.wait()
        self.console.close()
        forget(self.workdir)
        return self.process.returncode


def drain(management_url: str, token: str, busy_dir: Path, timeout: float) -> bool:
    """Waits until no request is queued (the management API's pendingRequests) and no worker runs
    a batch (its marker in `busy_dir`), twice in a row; False if that takes over `timeout`.

    TorchServe closes every connection at once when told to stop, so this is what lets the
    requests it has accepted finish. New requests still arrive meanwhile: stop routing first."""
    deadline = time.monotonic() + timeout
    idle_polls = 0
    while time.monotonic() < deadline:
        try:
            pending = sum(pending_requests(management_url, token).values())
        except (requests.RequestException, ValueError):
            return False  # nothing more can be learned; stop anyway
        busy = any(Path(busy_dir).glob("*"))
        idle_polls = idle_polls + 1 if not pending and not busy else 0
        if idle_polls >= 2:
            return True
        time.sleep(0.05)
    log.warning("requests still in flight after %.0f s of draining: stopping anyway", timeout)
    return False


def model_versions(management_url: str, token: str = None) -> dict:
    """{model name: the management API's description of each of its versions}."""
    headers = bearer(token)
    listing = requests.get(f"{management_url}/models", headers=headers, timeout=5)
    listing.raise_for_status()
    return {
        entry["modelName"]: requests.get(f"{management_url}/models/{entry['modelName']}/all",
                                         headers=headers, timeout=5).json()
        for entry in listing.json().get("models", [])
    }


def pending_requests(management_url: str, token: str = None) -> dict:
    """{model name: requests waiting in its job queues}."""
    return {name: sum(v.get("jobQueueStatus", {}).get("pendingRequests", 0) for v in versions)
            for name, versions in model_versions(management_url, token).items()}


def model_status(management_url: str, token: str = None) -> dict:
    """{model name: (READY workers, workers wanted)} over all its versions."""
    return {
        name: (sum(1 for v in versions for w in v.get("workers", []) if w.get("status") == "READY"),
               sum(max(1, int(v.get("minWorkers", 1))) for v in versions))
        for name, versions in model_versions(management_url, token).items()
    }


def health(workdir: Path) -> tuple:
    """(ready?, one line) for the server recorded in `workdir`: ready only when every model it
    knows has all its workers READY, which `/ping` does not tell."""
    state_path = Path(workdir) / STATE_FILE
    if not state_path.exists():
        return False, f"no server recorded in {state_path}"
    state = json.loads(state_path.read_text())
    try:
        status = model_status(state["management"], read_keys(workdir).get("management"))
    except (requests.RequestException, ValueError) as err:
        return False, f"management API at {state['management']} does not answer: {err}"
    waiting = {name: counts for name, counts in status.items() if counts[0] < counts[1]}
    if not status:
        return False, "no model is registered"
    if waiting:
        return False, "not ready: " + ", ".join(f"{name} {r}/{w} workers READY" for name, (r, w) in waiting.items())
    return True, "ready: " + ", ".join(f"{name} {r}/{w}" for name, (r, w) in status.items())


def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def stop_recorded(workdir: Path, timeout: float = 60) -> bool:
    """Stops the server whose state file is in `workdir`; False when none is recorded."""
    state_path = Path(workdir) / STATE_FILE
    if not state_path.exists():
        return False
    state = json.loads(state_path.read_text())
    pid, owner = state["pid"], state.get("owner")
    if owner and owner != os.getpid() and process_alive(owner):
        os.kill(owner, signal.SIGTERM)  # a foreground `tvserve serve`: it drains and stops its server
    else:
        drain(state["management"], read_keys(workdir).get("management"), Path(workdir) / "busy", DRAIN_SECONDS)
        signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and group_alive(pid):
        time.sleep(0.2)
    signal_group(pid, signal.SIGKILL)
    forget(Path(workdir))
    return True


def forget(workdir: Path) -> None:
    """Removes a stopped server's state file and API keys."""
    for name in (STATE_FILE, KEY_FILE):
        (workdir / name).unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
