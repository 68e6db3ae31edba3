"""Where and how an archive is written, and the model-config.yaml TorchServe reads from it."""

from dataclasses import dataclass
from pathlib import Path

from handlers.budget import cores_per_worker
from handlers.devices import PREPROCESSORS
from handlers.precision import PRECISIONS
from handlers.record import DEFAULT_DECODE, SIZES
from handlers.runtimes import RUNTIMES, backends_of
from tvserve import TvserveError

DEFAULT_VERSION = "1.0"
DEFAULT_MAX_BATCH_DELAY = 1  # ms: the most an idle server adds; a backlog fills batches at once (docs/performance.md, measured_load.py)


@dataclass
class ArchiveOptions:
    """Flags a user leaves out keep these defaults (the CLI passes only what was given)."""

    model_name: str = None  # default: the torchvision name, or the checkpoint's run folder
    version: str = DEFAULT_VERSION
    export_path: Path = Path("model_store")
    force: bool = False
    workers: int = None  # None: measured here under a short load (measured_load.py)
    batch_size: int = None  # None: measured here under a short load (measured_load.py): 1 or 8
    max_batch_delay: int = None  # None: DEFAULT_MAX_BATCH_DELAY
    response_timeout: int = 120  # s
    startup_timeout: int = 120  # s
    threads: int = None  # torch threads per worker; None: cores / workers, decided in the worker
    backend: str = "auto"  # a runtime of handlers/runtimes.py; auto: the fastest that passes parity
    jpeg_draft: bool = False  # lossy: decode big JPEGs at a reduced DCT scale (handlers/images.py)
    decode: str = DEFAULT_DECODE  # "tensor" (--gpu-decode), lossy: JPEGs decoded and resized on the worker's device
    precision: str = "fp32"  # handlers/precision.py; int8, tf32, bf16, fp16: their effect measured (calibration.py)
    calibration: Path = None  # int8: half calibrates, half measures; tf32/bf16/fp16: measured on all of it
    min_agreement: float = 0.99  # int8 is refused below this top-1 agreement with fp32, the others warned of

    def __post_init__(self):
        """Refuses inconsistent precision flags before any slow work, saying what to pass."""
        if self.precision not in PRECISIONS:
            raise TvserveError(f"Invalid precision {self.precision!r}. Choose one of: {', '.join(PRECISIONS)}.")
        if self.precision == "int8" and not self.calibration:
            raise TvserveError("--precision int8 needs --calibration DIR: a folder of your images (a few hundred is "
                               "typical), half to calibrate and half to measure the accuracy cost on.")
        if self.precision == "fp32" and self.calibration:
            raise TvserveError("--calibration is for --precision int8, tf32, bf16 or fp16; add one, or leave "
                               "--calibration out.")
        if self.backend not in (None, "auto") and self.backend in RUNTIMES \
                and self.backend not in backends_of(self.precision):
            raise TvserveError(f"--backend {self.backend} runs in {RUNTIMES[self.backend].precision}, not "
                               f"{self.precision}: choose auto or {', '.join(backends_of(self.precision))}.")
        if self.decode not in PREPROCESSORS:
            raise TvserveError(f"Invalid decode {self.decode!r}. Choose one of: {', '.join(PREPROCESSORS)}.")
        if self.decode != DEFAULT_DECODE and self.jpeg_draft:
            raise TvserveError("--jpeg-draft is for PIL decoding and --gpu-decode decodes JPEGs with torchvision.io "
                               "at full scale: choose one of the two.")
        if self.max_batch_delay is not None and self.max_batch_delay < 1:
            raise TvserveError(f"--max-batch-delay is at least 1 ms, got {self.max_batch_delay}: TorchServe 0.12 reads "
                               "0 as unset and waits its default 100 ms for batch-mates (docs/performance.md, Batching).")
        if not 0 <= self.min_agreement <= 1:
            raise TvserveError(f"--min-agreement is a fraction from 0 to 1 (0.99: 99%), got {self.min_agreement}.")

    def left_to_archiver(self) -> tuple:
        """The serving sizes (record.SIZES) the user did not give: the archiver decides them, and a
        server may re-size them for its machine (recorded as the record's Sizing)."""
        return tuple(name for name in SIZES if getattr(self, name) is None)

    def thread_budget(self) -> int:
        """The threads a worker of this archive gets on this machine (as the handler decides)."""
        return self.threads or cores_per_worker(self.workers or 1)

    def batch_delay(self) -> int:
        """ms TorchServe waits for batch-mates: --max-batch-delay, else DEFAULT_MAX_BATCH_DELAY."""
        return DEFAULT_MAX_BATCH_DELAY if self.max_batch_delay is None else self.max_batch_delay

    def model_config(self) -> dict:
        config = {
            "minWorkers": self.workers,
            "maxWorkers": self.workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.batch_delay(),
            "responseTimeout": self.response_timeout,
            "startupTimeout": self.startup_timeout,
        }
        if self.threads:
            config["handler"] = {"threads": self.threads}
        return config
