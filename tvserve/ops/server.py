"""Starts, watches and stops one TorchServe process for a model store.

A model counts as ready only when the management API shows its workers READY: `/ping` answers
Healthy even while a worker crash-loops. A server whose models do not become ready is stopped,
and the worker's error is read from its log.

Each model is sized for this machine (tvserve/ops/sizing.py). When that changes any model's
workers, batch size or batch delay, TorchServe starts with a copy of the config in the server's
workdir that adds a `model_snapshot`: TorchServe 0.12 registers a snapshot's models with the
snapshot's values (ModelServer.initModelStore restores it instead of load_models, and
SnapshotManager.restore -> ModelManager.registerAndUpdateModel -> Model.setModelState), where
load_models would let each archive's model-config.yaml win, and needs no management API.
"""

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from handlers.budget import cores_per_worker, worker_defaults
from tvserve import TvserveError
from tvserve.archiving.mar import read_model_config, registered_name
from tvserve.ops import logs, state
from tvserve.ops.sizing import Machine, model_snapshot, plan_archive
from tvserve.ops.client import KEY_FILE, read_keys
from tvserve.ops.management import model_status, readiness
from tvserve.ops.plugin import build_plugin
from tvserve.ops.properties import read_properties
from tvserve.ops.stopping import DRAIN_SECONDS, signal_group, stop_group

log = logging.getLogger(__name__)

EXTRA_STARTUP_SECONDS = 30  # JVM start and worker spawn, on top of the archives' startupTimeout
SIZED_CONFIG = "config.sized.properties"  # in the workdir: the config plus the sized model_snapshot
FAILED_LOADS_BEFORE_GIVING_UP = 2  # TorchServe retries a dead worker forever, with backoff
CONSOLE_PROPERTY = "tvserve_console"  # "false": no console at all (ConsoleEndpoint.java)
# http://HOST:PORT: the console's page at an address of its own, where it needs no key (ConsoleAddress.java)
CONSOLE_ADDRESS_PROPERTY = "tvserve_console_address"
CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"  # the page's files, shipped in the package
SAMPLES_DIR = Path(__file__).resolve().parents[2] / "samples"  # the checkout's sample images (not in the package)
CONSOLE_ENV, SAMPLES_ENV = "TVSERVE_CONSOLE_DIR", "TVSERVE_SAMPLES_DIR"  # read by ConsoleFiles.java
CONSOLE_ADDRESS_ENV = "TVSERVE_CONSOLE_ADDRESS"  # read by ConsoleAddress.java


def plugin_cache() -> Path:
    """Where the compiled frontend plugin is kept between servers (keyed by its sources' hash)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tvserve"


class RunsInBlock:
    """A server process as a context manager: started and ready inside the block (stopped again where
    it never became ready), stopped after. Subclasses give start(), wait_ready() and stop()."""

    def __enter__(self):
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info):
        self.stop()


class Server(RunsInBlock):
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
        self.log_marks = {}  # where each log stood at the start: this run's lines come after

    @property
    def console_on(self) -> bool:
        return self.properties.get(CONSOLE_PROPERTY, "true") != "false"

    @property
    def console_address(self) -> str:
        """The console's own address (http://HOST:PORT), or None: unset, or the console off."""
        return (self.properties.get(CONSOLE_ADDRESS_PROPERTY) or None) if self.console_on else None

    @property
    def console_url(self) -> str:
        """The page's URL: at the console's own address where the configuration names one, else on the
        inference port; None where the configuration turns the console off."""
        if not self.console_on:
            return None
        return f"{(self.console_address or self.inference_url).rstrip('/')}/console/"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def busy_dir(self) -> Path:
        return self.workdir / "busy"

    def archives(self) -> list:
        """The .mar files this server loads."""
        if self.models == "all":
            return sorted(self.model_store.glob("*.mar"))
        return [self.model_store / entry.split("=")[-1] for entry in self.models.split(",")]

    def expected_models(self) -> list:
        if self.models == "all":
            return sorted({registered_name(path) for path in self.archives()})
        return sorted(entry.split("=")[0].removesuffix(".mar") for entry in self.models.split(","))

    def load_order(self) -> list:
        """[(registered name, .mar path)] in the order TorchServe registers them (the first version
        of a model it registers becomes the default): for "all", the model store's listing order,
        which Java's File.listFiles and os.listdir both take unsorted from the directory; else the
        order of `models` ("NAME=FILE.mar" or "FILE.mar" entries). Missing files are left out."""
        if self.models == "all":
            files = [self.model_store / name for name in os.listdir(self.model_store)
                     if name.endswith(".mar") and not name.startswith(".")]
            return [(registered_name(mar), mar) for mar in files if mar.is_file()]
        entries = [entry.split("=", 1) if "=" in entry else [None, entry] for entry in self.models.split(",")]
        return [(name or registered_name(self.model_store / file), self.model_store / file)
                for name, file in entries if (self.model_store / file).is_file()]

    def default_workers(self) -> int:
        """Workers of an archive whose model-config.yaml sets none: the config's default_workers_per_model."""
        return int(self.properties.get("default_workers_per_model", os.cpu_count() or 1))

    @functools.cached_property
    def machine(self) -> Machine:
        """The serving machine as this server's TorchServe sees it (GPUs, cores)."""
        return Machine.detect({**os.environ, **self.extra_env}, self.properties)

    @functools.cached_property
    def plans(self) -> list:
        """Each loaded model version's sizes for this machine (tvserve/ops/sizing.py), in load order."""
        return [plan_archive(name, mar, self.machine, self.default_workers()) for name, mar in self.load_order()]

    def ts_config(self) -> Path:
        """The config TorchServe starts with: `config` itself when the plans change nothing, else a
        copy in the workdir that registers every model version through a sized model_snapshot."""
        sized = self.workdir / SIZED_CONFIG
        if not any(plan.changes() for plan in self.plans):
            sized.unlink(missing_ok=True)  # a previous start's, so that no stale copy suggests it is used
            return self.config
        snapshot = json.dumps(model_snapshot(self.plans, created_ms=int(time.time() * 1000)))  # one line, ASCII
        sized.write_text(f"{self.config.read_text().rstrip()}\n"
                         f"# tvserve: every model sized for {self.machine.describe()} (tvserve/ops/sizing.py)\n"
                         f"model_snapshot={snapshot}\n")
        return sized

    def startup_timeout(self) -> float:
        timeouts = [int(read_model_config(mar).get("startupTimeout", 120)) for mar in self.model_store.glob("*.mar")]
        return max(timeouts, default=120) + EXTRA_STARTUP_SECONDS

    def environment(self) -> dict:
        env = {**os.environ, **self.extra_env}
        tmp = self.workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env.update(TMPDIR=str(tmp), TEMP=str(tmp), LOG_LOCATION=str(self.log_dir), METRICS_LOCATION=str(self.log_dir))
        env["TVSERVE_BUSY_DIR"] = str(self.busy_dir)  # workers mark the batches they are running
        env.update(worker_defaults(env))  # idle torch threads sleep (handlers/budget.py)
        env.update(self.console_environment())
        if "TVSERVE_THREADS" not in env:
            env["TVSERVE_THREADS"] = str(self.threads_per_worker())
        return env

    def console_environment(self) -> dict:
        """The folders the plugin serves the console from (ConsoleFiles.java) and its own address
        (ConsoleAddress.java): none, and so no console, where the configuration turns it off,
        whatever this process's environment holds."""
        if not self.console_on:
            return {CONSOLE_ENV: "", SAMPLES_ENV: "", CONSOLE_ADDRESS_ENV: ""}
        return {CONSOLE_ENV: str(CONSOLE_DIR), SAMPLES_ENV: str(SAMPLES_DIR) if SAMPLES_DIR.is_dir() else "",
                CONSOLE_ADDRESS_ENV: self.console_address or ""}

    def threads_per_worker(self) -> int:
        """config's tvserve_threads_per_worker, or for `auto` (the default) the cores shared evenly
        among every planned worker of the models it loads, so that workers x threads <= cores (a
        model whose two workers take turns on every core counts once: tvserve/ops/sizing.py)."""
        threads = self.properties.get("tvserve_threads_per_worker", "auto")
        if threads != "auto":
            return int(threads)
        return cores_per_worker(sum(plan.cores_claimed for plan in self.plans), {**os.environ, **self.extra_env})

    def start(self) -> "Server":
        if not self.model_store.is_dir():
            raise TvserveError(f"No model store at {self.model_store}. Build archives with `tvserve archive`, "
                               "or pass --model-store DIR.")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_marks = {name: logs.mark(self.log_dir, name) for name in logs.FILES}
        (self.workdir / KEY_FILE).unlink(missing_ok=True)  # TorchServe writes fresh keys at start
        shutil.rmtree(self.busy_dir, ignore_errors=True)
        self.busy_dir.mkdir()
        for plan in self.plans:
            log.debug("sizing (%s): %s", self.machine.describe(), plan.line())
        command = [
            str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground", "--ncs",
            "--model-store", str(self.model_store), "--ts-config", str(self.ts_config()),
            "--models", self.models, "--plugins-path", str(build_plugin(plugin_cache())),
        ]
        if self.properties.get("tvserve_lean_logs") == "true":
            (self.workdir / "log4j2.xml").write_text(logs.log4j2_xml())
            command += ["--log-config", str(self.workdir / "log4j2.xml")]
        self.console = open(self.log_dir / "console.log", "ab")
        self.process = subprocess.Popen(
            command, cwd=self.workdir, env=self.environment(), start_new_session=True,
            stdout=self.console, stderr=subprocess.STDOUT,
        )
        state.record(self.workdir, self.process.pid, inference_url=self.inference_url,
                     management_url=self.management_url)
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
                    f"TorchServe exited with code {self.process.returncode} during start-up.\n" + self.console_tail()
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

    def failed_loads(self, model: str) -> int:
        return logs.failed_loads(self.log_dir, model, self.log_marks.get("model_log", logs.Mark()))

    def worker_error(self, model: str) -> str:
        return logs.worker_error(self.log_dir, model, self.log_marks.get("model_log", logs.Mark()))

    def log(self, name: str = "model_log") -> str:
        """What this server wrote to one of TorchServe's logs (`model_log`, `ts_log`, `access_log`...)."""
        return logs.read(self.log_dir, name, self.log_marks.get(name, logs.Mark()))

    def console_tail(self, lines: int = 20) -> str:
        return logs.tail(self.log_dir / "console.log", lines)

    def stop(self, timeout: float = 60) -> int:
        """Lets accepted requests finish, then stops the whole process tree; returns the exit code."""
        if self.process is None or self.console.closed:
            return 0 if self.process is None else self.process.returncode
        if self.process.poll() is None:
            stop_group(self.process.pid, management_url=self.management_url, token=self.keys().get("management"),
                       busy_dir=self.busy_dir, timeout=timeout, wait=self.wait_exit)
        self.process.wait()
        self.console.close()
        state.forget(self.workdir)
        return self.process.returncode

    def wait_exit(self, timeout: float) -> bool:
        try:
            self.process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False


def health(workdir: Path) -> tuple:
    """(ready?, one line) for the server recorded in `workdir`: ready only when every model it
    knows has all its workers READY, which `/ping` does not tell."""
    recorded = state.read(workdir)
    if recorded is None:
        return False, f"no server recorded in {Path(workdir) / state.STATE_FILE}"
    return readiness(recorded["management"], read_keys(workdir).get("management"))


def stop_recorded(workdir: Path, timeout: float = 60) -> bool:
    """Stops the server recorded in `workdir`; False when none is recorded or the recorded PID is no
    longer that TorchServe (then only the stale record is removed)."""
    recorded = state.read(workdir)
    if recorded is None:
        return False
    if not state.server_alive(recorded):
        log.warning("the recorded TorchServe (pid %s) is no longer running: removing its stale record", recorded["pid"])
        state.forget(Path(workdir))
        return False
    if state.owner_alive(recorded):
        os.kill(recorded["owner"], signal.SIGTERM)  # a foreground `tvserve serve`: it drains and stops its server
        deadline = time.monotonic() + DRAIN_SECONDS + timeout
        while time.monotonic() < deadline and state.server_alive(recorded):
            time.sleep(0.2)
        if state.server_alive(recorded):
            signal_group(recorded["pid"], signal.SIGKILL)
    else:
        stop_group(recorded["pid"], management_url=recorded["management"],
                   token=read_keys(workdir).get("management"), busy_dir=Path(workdir) / "busy", timeout=timeout)
    state.forget(Path(workdir))
    return True
