"""The running server's state file (`server.json` in its working directory): which process to
stop, who started it, and where its APIs are. A PID is checked to still be that TorchServe (its
start time and command) before anything is sent to it: PIDs are reused."""

import json
import os
from pathlib import Path

import psutil

from tvserve.ops.client import KEY_FILE

STATE_FILE = "server.json"


def process_started(pid: int):
    """The process's start time (s since the epoch), or None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def record(workdir: Path, pid: int, *, inference_url: str, management_url: str) -> None:
    (Path(workdir) / STATE_FILE).write_text(json.dumps({
        "pid": pid, "started": process_started(pid), "owner": os.getpid(), "owner_started": process_started(os.getpid()),
        "inference": inference_url, "management": management_url,
    }))


def same_process(pid, started, command_word: str = None) -> bool:
    """True when `pid` runs, started at `started` (when recorded), and its command line names
    `command_word` (when given)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        if started is not None and abs(process.create_time() - started) > 0.01:
            return False
        return command_word is None or any(command_word in part for part in process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def read(workdir: Path):
    """The recorded state, or None when no server is recorded."""
    path = Path(workdir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def server_alive(state: dict) -> bool:
    """The recorded TorchServe is still the process that runs under its PID."""
    return same_process(state["pid"], state.get("started"), "torchserve")


def owner_alive(state: dict) -> bool:
    """The foreground `tvserve serve` that started it is still running (and is still that process)."""
    owner = state.get("owner")
    return bool(owner) and owner != os.getpid() and same_process(owner, state.get("owner_started"))


def forget(workdir: Path) -> None:
    """Removes a stopped server's state file and API keys."""
    for name in (STATE_FILE, KEY_FILE):
        (Path(workdir) / name).unlink(missing_ok=True)
