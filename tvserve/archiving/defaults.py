"""The archives `make serve` starts with: the book's Net trained on digits, and resnet18."""

import logging
from pathlib import Path

from tvserve import TvserveError
from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_checkpoint, archive_torchvision
from tvserve.archiving.weights import load_checkpoint

log = logging.getLogger(__name__)

DIGITS_MODEL = "digits_net"
DIGITS_ARCH, DIGITS_DATASET = "Net", "digits"
DIGITS_EPOCHS = 40  # with --augment digits at batch 32: docs/training.md gives its accuracy
# Handwriting augmentation: the served model reads digits dark on white as well as light on dark,
# thin or thick, small or large on the page, not only as the training scans show them.
DIGITS_AUGMENT = "digits"
DIGITS_BATCH = 32  # twice the steps per epoch of batch 64: the augmented task leaves its plateau sooner
TORCHVISION_MODEL = "resnet18"


def train_digits(run_dir: Path) -> Path:
    from training.train import get_args_parser, main

    args = get_args_parser().parse_args([
        "--model", DIGITS_ARCH, "--dataset", DIGITS_DATASET, "--augment", DIGITS_AUGMENT,
        "--batch-size", str(DIGITS_BATCH), "--epochs", str(DIGITS_EPOCHS), "--out", str(run_dir)])
    main(args)
    return run_dir / "checkpoint.pt"


def check_default_checkpoint(path: Path) -> None:
    """Raises TvserveError unless `path` holds the default model (Net trained on digits): a run
    of another model or dataset written to the same folder must not be served as digits_net."""
    checkpoint = load_checkpoint(path)
    found = (checkpoint.get("arch"), checkpoint.get("dataset"))
    if found != (DIGITS_ARCH, DIGITS_DATASET):
        raise TvserveError(
            f"{path} holds {found[0]} trained on {found[1]}, not {DIGITS_ARCH} on {DIGITS_DATASET}: "
            f"move that run folder elsewhere (or delete it) and run `tvserve prepare` again to train {DIGITS_MODEL}.")


def prepare_default_archives(model_store: Path = Path("model_store"), runs: Path = Path("runs")) -> list:
    """Builds the default archives missing from `model_store`; returns the paths it wrote."""
    written = []
    if not (model_store / f"{DIGITS_MODEL}.mar").exists():
        checkpoint = runs / DIGITS_MODEL / "checkpoint.pt"
        if not checkpoint.exists():
            log.info("training the book's Net on digits (first run only) -> %s", checkpoint)
            train_digits(checkpoint.parent)
        check_default_checkpoint(checkpoint)
        written.append(archive_checkpoint(checkpoint, options=ArchiveOptions(
            model_name=DIGITS_MODEL, export_path=model_store)))
    if not (model_store / f"{TORCHVISION_MODEL}.mar").exists():
        try:
            written.append(archive_torchvision(TORCHVISION_MODEL, options=ArchiveOptions(export_path=model_store)))
        except TvserveError as err:
            log.warning("%s skipped (the service comes up without it): %s", TORCHVISION_MODEL, err)
    return written
