"""Elastic threads: a worker's forward runs on all its threads while the cores are free, and on
half of them while other workers' forwards hold the cores.

Why: on a CPU the archiver may give a model two workers that each have every core's threads (the
shared shape, tvserve/archiving/measured_load.py), so that one decodes while the other's forward
runs. A lone request then gets every core, but when both forwards run at once their threads
contend for the cores: OpenVINO's resnet18 cost 45-47 ms of CPU a request there at c=4 on 2 cores,
against 31-34 ms per image on one thread in process. Narrowing the forward that starts while
another runs keeps the lone request's latency and the one-thread cost at load (docs/performance.md,
"Elastic threads").

How: every worker holds an exclusive flock on a file of its own, `<pid>-<threads>.lock` in
`folder()`, for the length of each forward. The folder is in the temporary folder, which
`tvserve serve` gives each server (so a server's workers of every model see each other, and two
servers see each other's only where they share it).
Before a forward it takes its own lock, then tests the others' without waiting: a lock it cannot
share is a sibling in its forward, of that many threads. Taking its own lock first means two
forwards that start together both see the other. A lock dies with its process, so a killed worker
never counts as busy; its file is removed by the next worker to start. Where this worker's threads
and the busy siblings' exceed the cores (budget.cores: TVSERVE_CPUS, else the machine's), the
forward runs on the narrow runner, half the threads (at least one).

The narrow runner of a runtime with a thread pool of its own (ONNX Runtime, OpenVINO) is a second
session of the same file, built on a background thread the first time the cores are found taken;
until it is ready those forwards run wide. A worker that never overlaps another never holds the
second copy. Torch's runtimes (eager, TorchScript, torch's int8 engines) instead set torch's thread
count around the forward (about 20 us). Only on the CPU; TVSERVE_ELASTIC=off runs every forward on
all the worker's threads.
"""

import contextlib
import fcntl
import logging
import os
import tempfile
import threading
from collections import Counter
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "TVSERVE_ELASTIC"  # "off": every forward on all the worker's threads


def enabled() -> bool:
    return os.environ.get(ENV, "on").lower() not in ("off", "0", "false", "no")


def folder() -> Path:
    """Where the workers that share this temporary folder keep their lock files (one per user)."""
    return Path(tempfile.gettempdir()) / f"tvserve-forwards-{os.getuid()}"


def narrow_threads(threads: int) -> int:
    return max(1, threads // 2)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process (the folder is this user's: not expected)
        return True
    return True


def parse(name: str):
    """(pid, threads) of a lock file's name, or None for anything else in the folder."""
    stem, _, suffix = name.partition(".")
    pid, dash, threads = stem.partition("-")
    if suffix != "lock" or not dash or not pid.isdigit() or not threads.isdigit():
        return None
    return int(pid), int(threads)


def held(path: str) -> bool:
    """Whether another process holds the lock file at `path` (False where it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class Siblings:
    """This worker's lock file in `where`, and the threads of the other workers in their forward."""

    def __init__(self, where: Path, threads: int):
        self.folder, self.pid = Path(where), os.getpid()
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.prune()
        self.path = self.folder / f"{self.pid}-{threads}.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def prune(self) -> None:
        """Removes the lock files of processes that are gone (killed workers leave theirs)."""
        for entry in os.scandir(self.folder):
            owner = parse(entry.name)
            if owner and not alive(owner[0]):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    def busy_threads(self) -> int:
        """The threads of the other processes' workers that are in their forward now."""
        total = 0
        for entry in os.scandir(self.folder):
            owner = parse(entry.name)
            if owner and owner[0] != self.pid and held(entry.path):
                total += owner[1]
        return total

    @contextlib.contextmanager
    def forward(self):
        """Holds this worker's lock for the length of a forward."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


class TorchThreads:
    """A torch runner's forward on `threads` of torch's intra-op threads, `restore` after it."""

    def __init__(self, runner, threads: int, restore: int):
        self.runner, self.threads, self.restore = runner, threads, restore

    def __call__(self, batch):
        torch.set_num_threads(self.threads)
        try:
            return self.runner(batch)
        finally:
            torch.set_num_threads(self.restore)


class Elastic:
    """A runner that runs each forward on `wide` (the worker's `threads`) or, while the busy
    siblings' threads and its own exceed `cores`, on the narrow runner that `make_narrow()` builds
    (narrow_threads(threads)), once, on a background thread. `forwards` counts the forwards run
    on each thread count."""

    def __init__(self, wide, make_narrow, threads: int, cores: int, siblings: Siblings):
        self.wide, self.make_narrow, self.siblings = wide, make_narrow, siblings
        self.threads, self.narrow_threads, self.cores = threads, narrow_threads(threads), cores
        self.narrow, self.building = None, None
        self.forwards = Counter()

    def __call__(self, batch):
        with self.siblings.forward():
            runner, threads = self.choose()
            self.forwards[threads] += 1
            return runner(batch)

    def choose(self) -> tuple:
        """(runner, its threads) for a forward starting now."""
        if self.threads + self.siblings.busy_threads() <= self.cores:
            return self.wide, self.threads
        if self.narrow is not None:
            return self.narrow, self.narrow_threads
        if self.building is None:
            self.building = threading.Thread(target=self.build, name="tvserve-narrow-runner", daemon=True)
            self.building.start()
        return self.wide, self.threads

    def build(self) -> None:
        try:
            self.narrow = self.make_narrow()
        except Exception:  # the worker goes on wide; the reason is in its log
            log.exception("tvserve: could not build the %d-thread runner for overlapping forwards; every forward "
                          "stays on %d threads", self.narrow_threads, self.threads)
            return
        log.info("tvserve: other workers' forwards hold the cores (%d here): forwards that overlap them now run on "
                 "%d of this worker's %d threads", self.cores, self.narrow_threads, self.threads)

    def close(self) -> None:
        self.siblings.close()


def elastic(wide, make_narrow, threads: int, cores: int, where: Path = None):
    """`wide` made elastic (Elastic), or `wide` itself where narrowing cannot help (one thread),
    is turned off (TVSERVE_ELASTIC=off) or its lock folder cannot be written."""
    if threads <= 1 or not enabled():
        return wide
    try:
        siblings = Siblings(where or folder(), threads)
    except OSError as err:
        log.warning("tvserve: elastic threads are off (%s): every forward runs on %d threads", err, threads)
        return wide
    return Elastic(wide, make_narrow, threads, cores, siblings)
