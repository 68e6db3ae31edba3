"""Where and how an archive is written, and the model-config.yaml TorchServe reads from it."""

from dataclasses import dataclass
from pathlib import Path

from handlers.budget import cores_per_worker

DEFAULT_VERSION = "1.0"


@dataclass
class ArchiveOptions:
    """Flags a user leaves out keep these defaults (the CLI passes only what was given)."""

    model_name: str = None  # default: the torchvision name, or the checkpoint's run folder
    version: str = DEFAULT_VERSION
    export_path: Path = Path("model_store")
    force: bool = False
    workers: int = None  # None: measured here (tuning.choose_workers)
    batch_size: int = None  # None: 8 where batches are cheaper per image here, else 1 (tuning.choose_batch_size)
    max_batch_delay: int = 1  # ms: the most an idle server adds; a backlog fills batches at once (see README)
    response_timeout: int = 120  # s
    startup_timeout: int = 120  # s
    threads: int = None  # torch threads per worker; None: cores / workers, decided in the worker
    backend: str = "auto"  # a runtime of handlers/runtimes.py; auto: the fastest that passes parity
    jpeg_draft: bool = False  # lossy: decode big JPEGs at a reduced DCT scale (handlers/images.py)

    def thread_budget(self) -> int:
        """The threads a worker of this archive gets on this machine (as the handler decides)."""
        return self.threads or cores_per_worker(self.workers or 1)

    def model_config(self) -> dict:
        config = {
            "minWorkers": self.workers,
            "maxWorkers": self.workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay,
            "responseTimeout": self.response_timeout,
            "startupTimeout": self.startup_timeout,
        }
        if self.threads:
            config["handler"] = {"threads": self.threads}
        return config
