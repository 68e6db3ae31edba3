"""The archives `make serve` starts with: the book's Net trained on digits, and resnet18."""

import logging
from pathlib import Path

from tvserve import TvserveError
from tvserve.build.options import ArchiveOptions
from tvserve.build.sources import archive_checkpoint, archive_torchvision

log = logging.getLogger(__name__)

DIGITS_MODEL = "digits_net"
DIGITS_EPOCHS = 20  # ~97% validation accuracy, about 30 s on 2 cores
TORCHVISION_MODEL = "resnet18"


def train_digits(run_dir: Path) -> Path:
    from training.train import get_args_parser, main

    args = get_args_parser().parse_args(
        ["--model", "Net", "--dataset", "digits", "--epochs", str(DIGITS_EPOCHS), "--out", str(run_dir)]
    )
    main(args)
    return run_dir / "checkpoint.pt"


def prepare_default_archives(model_store: Path = Path("model_store"), runs: Path = Path("runs")) -> list:
    """Builds the default archives missing from `model_store`; returns the paths it wrote."""
    written = []
    if not (model_store / f"{DIGITS_MODEL}.mar").exists():
        checkpoint = runs / DIGITS_MODEL / "checkpoint.pt"
        if not checkpoint.exists():
            log.info("training the book's Net on digits (first run only) -> %s", checkpoint)
            train_digits(checkpoint.parent)
        written.append(archive_checkpoint(checkpoint, options=ArchiveOptions(
            model_name=DIGITS_MODEL, export_path=model_store)))
    if not (model_store / f"{TORCHVISION_MODEL}.mar").exists():
        try:
            written.append(archive_torchvision(TORCHVISION_MODEL, options=ArchiveOptions(export_path=model_store)))
        except TvserveError as err:
            log.warning("%s skipped (the service comes up without it): %s", TORCHVISION_MODEL, err)
    return written
