"""Other servers measured beside tvserve: LitServe, started, waited for and stopped like a Server.

LitServe is not a tvserve dependency: the `peers` extra brings it (`make bench` installs it), and
`tvserve bench --systems ...,litserve` stops at once, naming the install command, where it is missing.
The server itself is tvserve/tools/litserve_peer.py, run in its own process tree.
"""

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import requests

from tvserve import TvserveError
from tvserve.ops.properties import free_port
from tvserve.ops.server import RunsInBlock

log = logging.getLogger(__name__)

LITSERVE_VERSION = "0.2.19"  # the one measured against; pyproject's `peers` extra pins it
LITSERVE_INSTALL = ".venv/bin/pip install -e '.[peers]'"
LITSERVE_SETUPS = ((1, 1), (2, 1), (1, 4), (2, 4))  # (workers, max batch size), as issue #22 names them
STARTUP_SECONDS = 180  # spawn the workers, import torch, load the model: on a busy 2-core box, a minute or more
STOP_SECONDS = 45  # LitServe's own shutdown: uvicorn waits up to 30 s for open requests, then 5 s per worker


def require_litserve() -> None:
    """Raises, naming the command that installs it, unless LitServe LITSERVE_VERSION is installed."""
    if importlib.util.find_spec("litserve") is None:
        raise TvserveError(f"The litserve system needs LitServe {LITSERVE_VERSION}, not installed here: "
                           f"run `{LITSERVE_INSTALL}`.")
    if version("litserve") != LITSERVE_VERSION:
        raise TvserveError(f"The litserve system is measured with LitServe {LITSERVE_VERSION}, not "
                           f"{version('litserve')}: run `{LITSERVE_INSTALL}`.")


def litserve_name(workers: int, batch: int) -> str:
    """The bench's system name of one set-up: "(e) litserve, 2 workers, batch 4"."""
    return f"(e) litserve, {workers} worker{'s' if workers > 1 else ''}, batch {batch}"


class LitServePeer(RunsInBlock):
    """One LitServe process tree serving the unpacked archive `model_dir` on a free loopback port, in
    its own session, its output in `workdir`/console.log; `threads` per worker (default: cores //
    workers). As a context manager: started and ready inside, stopped after."""

    def __init__(self, model_dir: Path, *, workdir: Path, workers: int = 1, batch: int = 1, threads: int = None):
        self.model_dir, self.workdir = Path(model_dir).resolve(), Path(workdir)
        self.workers, self.batch, self.threads = workers, batch, threads
        self.port, self.process, self.console = None, None, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def predict_url(self) -> str:
        return f"{self.url}/predict"

    def start(self) -> "LitServePeer":
        require_litserve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        command = [sys.executable, "-m", "tvserve.tools.litserve_peer", str(self.model_dir), "--port", str(self.port),
                   "--workers", str(self.workers), "--batch", str(self.batch)]
        command += ["--threads", str(self.threads)] if self.threads else []
        self.console = open(self.workdir / "console.log", "ab")
        self.process = subprocess.Popen(command, cwd=self.workdir, start_new_session=True, stdout=self.console,
                                        stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONPATH": checkout_path(), "PYTHONUNBUFFERED": "1"})
        log.info("LitServe (%d workers, batch %d) starting on %s, pid %d", self.workers, self.batch, self.url,
                 self.process.pid)
        return self

    def wait_ready(self, timeout: float = STARTUP_SECONDS) -> None:
        """Blocks until /health answers 200 (every worker set up); raises with the log's tail otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TvserveError(f"LitServe exited with code {self.process.returncode} while starting:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TvserveError(f"LitServe not ready after {timeout:.0f} s:\n{self.tail()}")

    def predict(self, image: bytes, timeout: float = 60) -> list:
        """The answer for one encoded image: [{"label", "index", "probability"}, ...], most probable first."""
        response = requests.post(self.predict_url, data=image, timeout=timeout,
                                 headers={"Content-Type": "application/octet-stream"})
        if response.status_code != 200:
            raise TvserveError(f"LitServe answered HTTP {response.status_code}: {response.text[:200]}")
        return response.json()

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """SIGINT (LitServe's own shutdown of its API servers and workers), then SIGKILL to whatever
        is left of its process group."""
        if self.process is None:
            return
        if self.process.poll() is None:
            began = time.monotonic()
            os.kill(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout)
                log.info("LitServe stopped in %.1f s", time.monotonic() - began)
            except subprocess.TimeoutExpired:
                log.warning("LitServe did not stop in %.0f s: killing it (its log: %s)", timeout,
                            self.workdir / "console.log")
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # spawned workers that outlived it, if any
        except ProcessLookupError:
            pass
        self.process.wait()
        self.console.close()
        self.process = None

    def tail(self, lines: int = 20) -> str:
        return "\n".join((self.workdir / "console.log").read_text(errors="replace").splitlines()[-lines:])


def checkout_path() -> str:
    """PYTHONPATH for the server: this checkout's root (its tvserve/ and handlers/), then the caller's."""
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
