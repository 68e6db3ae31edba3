"""Stopping TorchServe without losing a request it accepted: drain, then SIGTERM to the whole
process tree, then SIGKILL for anything left. Used by `Server.stop` (a server this process runs)
and `tvserve stop` (one recorded in a working directory)."""

import logging
import os
import signal
import time
from pathlib import Path

import psutil
import requests

from tvserve.ops.management import pending_requests

log = logging.getLogger(__name__)

DRAIN_SECONDS = 30  # the longest a stop waits for accepted requests to finish


def busy_workers(busy_dir: Path) -> list:
    """Markers of workers inside a batch (each named by its PID); a dead worker's marker (kill -9
    leaves it behind) is removed, so a stop does not wait for it."""
    live = []
    for marker in Path(busy_dir).glob("*"):
        if marker.name.isdigit() and psutil.pid_exists(int(marker.name)):
            live.append(marker)
        else:
            marker.unlink(missing_ok=True)
    return live


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
        busy = bool(busy_workers(busy_dir))
        idle_polls = idle_polls + 1 if not pending and not busy else 0
        if idle_polls >= 2:
            return True
        time.sleep(0.05)
    log.warning("requests still in flight after %.0f s of draining: stopping anyway", timeout)
    return False


def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_group(pgid: int, *, management_url: str, token: str, busy_dir: Path, timeout: float = 60,
               drain_timeout: float = DRAIN_SECONDS, wait=None) -> None:
    """Drains, then SIGTERM to process group `pgid` (TorchServe's launcher, frontend and workers),
    SIGKILL after `timeout` s. `wait(timeout)` waits for the leader when this process is its parent
    (and must reap it); by default the group is polled until it is gone."""
    drain(management_url, token, busy_dir, drain_timeout)
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    if wait is not None:
        if not wait(timeout):
            log.warning("TorchServe did not stop in %.0f s: killing it", timeout)
    else:
        while time.monotonic() < deadline and group_alive(pgid):
            time.sleep(0.2)
    signal_group(pgid, signal.SIGKILL)  # workers left behind, if any
