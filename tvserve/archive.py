"""Builds `.mar` archives that tvserve's handler serves: one per torchvision model or checkpoint.

An archive holds:
    MAR-INF/MANIFEST.json   TorchServe's manifest (made by torch-model-archiver's own code)
    image_classifier.py     the handler entry point, and the `handlers/` package it imports
    weights.pt              a plain state_dict (loads with weights_only=True)
    tvserve.json            the one source of truth: model, preset, labels, weights' sha256, versions
    model-config.yaml       workers, batching, timeouts
    <model source>.py       for models built from Python source (trained checkpoints)
Files are stored uncompressed (weights do not compress), and the archive is written to a
temporary name and renamed, so an interrupted run never leaves a half-written `.mar`.
"""

import json
import logging
import platform
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torchvision
import yaml
from model_archiver.model_archiver_config import ModelArchiverConfig
from model_archiver.model_archiver_error import ModelArchiverError
from model_archiver.model_packaging_utils import ModelExportUtils

import handlers
import training.models
from handlers.image_classifier import METADATA_FILE, build_model, sha256_of
from tvserve import TvserveError, __version__
from tvserve import torchvision_models as tvm

log = logging.getLogger(__name__)

HANDLER_ENTRY = "image_classifier.py"
WEIGHTS_FILE = "weights.pt"
MODEL_CONFIG_FILE = "model-config.yaml"
HANDLERS_DIR = Path(handlers.__file__).parent


@dataclass
class ArchiveOptions:
    """Where and how an archive is written, and its model-config.yaml."""

    model_name: str = None  # default: the torchvision name, or the checkpoint's run folder
    version: str = "1.0"
    export_path: Path = Path("model_store")
    force: bool = False
    workers: int = 1
    batch_size: int = 1
    max_batch_delay: int = 50  # ms a batch waits to fill when batch_size > 1
    response_timeout: int = 120  # s
    startup_timeout: int = 120  # s
    threads: int = None  # torch threads per worker; None: cores / workers, decided in the worker

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


def library_versions() -> dict:
    return {
        "tvserve": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def check_model(meta: dict, state_dict: dict, model_dir: Path) -> None:
    """Builds the module, loads `state_dict` strictly and checks one logit per label."""
    try:
        model = build_model(model_dir, meta["model"])
    except Exception as err:  # the user's model code: report what it raised
        raise TvserveError(f"The model {meta['model']} does not build: {type(err).__name__}: {err}") from None
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0]
        raise TvserveError(f"The weights do not fit the model: {first_line}") from None
    crop = meta["preset"]["crop"]
    with torch.inference_mode():
        logits = model.eval()(torch.zeros(1, 3, crop, crop))
    if logits.shape != (1, len(meta["labels"])):
        raise TvserveError(
            f"The model gives {tuple(logits.shape[1:])} outputs per image for {len(meta['labels'])} labels: "
            "it needs one logit per label."
        )


def export_file(name: str, options: ArchiveOptions) -> Path:
    try:
        ModelExportUtils.check_model_name_regex_or_exit(name)
    except (ModelArchiverError, SystemExit):
        raise TvserveError(
            f"Invalid model name {name!r}: use letters, digits, '_' and '-', starting with a letter or digit."
        ) from None
    path = Path(options.export_path) / f"{name}.mar"
    if path.exists() and not options.force:
        raise TvserveError(f"{path} already exists. Pass --force to overwrite it.")
    return path


def write_archive(meta: dict, weights: Path, options: ArchiveOptions, sources=()) -> Path:
    """Writes the `.mar` for `meta` with the state_dict file `weights`; `sources` are extra
    Python files the model is built from. Returns the archive's path."""
    path = export_file(meta["name"], options)
    meta = {**meta, "version": options.version, "versions": library_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    meta["weights"] = {**meta["weights"], "file": WEIGHTS_FILE, "sha256": sha256_of(weights)}
    manifest = ModelExportUtils.generate_manifest_json(ModelArchiverConfig(
        model_name=meta["name"], handler=HANDLER_ENTRY, version=options.version,
        serialized_file=WEIGHTS_FILE, config_file=MODEL_CONFIG_FILE,
    ))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as mar:
        mar.writestr("MAR-INF/MANIFEST.json", manifest)
        mar.write(HANDLERS_DIR / HANDLER_ENTRY, HANDLER_ENTRY)
        for source in sorted(HANDLERS_DIR.glob("*.py")):
            mar.write(source, f"handlers/{source.name}")
        for source in sources:
            mar.write(source, Path(source).name)
        mar.writestr(METADATA_FILE, json.dumps(meta, indent=2))
        mar.writestr(MODEL_CONFIG_FILE, yaml.safe_dump(options.model_config(), sort_keys=False))
        mar.write(weights, WEIGHTS_FILE)
    partial.replace(path)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def archive_torchvision(name: str, *, weights: str = "DEFAULT", weights_file=None,
                        random_init: bool = False, options: ArchiveOptions = None) -> Path:
    """Archives torchvision model `name` with its pretrained `weights` (or a state_dict file)."""
    options = options or ArchiveOptions()
    enum = tvm.get_weights(name, weights)
    meta = {
        "name": options.model_name or name,
        "source": "torchvision",
        "model": {"builder": "torchvision", "name": name, "kwargs": tvm.builder_kwargs(name, enum)},
        "preset": tvm.preset_of(enum),
        "labels": list(enum.meta["categories"]),
        "extra": {"weights_enum": str(enum), "imagenet_acc@1": enum.meta.get("_metrics", {})
                  .get("ImageNet-1K", {}).get("acc@1")},
    }
    export_file(meta["name"], options)  # fail before any slow work
    with tempfile.TemporaryDirectory(prefix="tvserve-archive-") as tmp:
        if random_init:
            log.warning("archiving %s with RANDOM weights (--random-init): for tests only", name)
            path, origin = Path(tmp) / WEIGHTS_FILE, "random-init"
            torch.save(build_model(Path(tmp), meta["model"]).state_dict(), path)
        else:
            path, origin = tvm.find_weights_file(name, enum, weights_file)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        tvm.check_hash_prefix(path, sha256_of(path))
        check_model(meta, state_dict, Path(tmp))
        meta["weights"] = {"origin": origin, "source_file": str(path) if not random_init else None,
                           "random_init": random_init}
        return write_archive(meta, path, options)


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, loaded safely: plain tensors and values only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TvserveError(f"No checkpoint at {path}. Train one with `python -m training.train`.") from None
    except Exception as err:  # pickle refused by weights_only, or not a torch file
        raise TvserveError(
            f"{path} is not a plain tvserve checkpoint (torch.load with weights_only=True refused it: "
            f"{str(err).strip().splitlines()[0]})"
        ) from None


def archive_checkpoint(path, *, options: ArchiveOptions = None) -> Path:
    """Archives a checkpoint written by `training/`: architecture, labels and preset come from it."""
    options = options or ArchiveOptions()
    path = Path(path)
    checkpoint = load_checkpoint(path)
    missing = {"arch", "arch_args", "state_dict", "classes", "mean", "std", "input_size"} - set(checkpoint)
    if missing:
        raise TvserveError(f"{path} lacks {', '.join(sorted(missing))}: it was not written by training/.")
    source = Path(training.models.__file__)
    size = int(checkpoint["input_size"])
    meta = {
        "name": options.model_name or path.resolve().parent.name,
        "source": "checkpoint",
        "model": {"builder": "python", "file": source.name, "class": checkpoint["arch"],
                  "kwargs": checkpoint["arch_args"]},
        "preset": {"resize": size, "crop": size, "interpolation": "bilinear",
                   "mean": checkpoint["mean"], "std": checkpoint["std"]},
        "labels": list(checkpoint["classes"]),
        "extra": {"checkpoint": str(path), "dataset": checkpoint.get("dataset"),
                  "metrics": checkpoint.get("metrics")},
    }
    export_file(meta["name"], options)
    with tempfile.TemporaryDirectory(prefix="tvserve-archive-") as tmp:
        (Path(tmp) / source.name).write_bytes(source.read_bytes())
        check_model(meta, checkpoint["state_dict"], Path(tmp))
        weights = Path(tmp) / WEIGHTS_FILE
        torch.save(checkpoint["state_dict"], weights)
        meta["weights"] = {"origin": "checkpoint", "source_file": str(path), "random_init": False}
        return write_archive(meta, weights, options, sources=[source])


def read_metadata(mar: Path) -> dict:
    """The tvserve.json of an archive on disk."""
    try:
        with zipfile.ZipFile(mar) as archive:
            return json.loads(archive.read(METADATA_FILE))
    except (FileNotFoundError, zipfile.BadZipFile, KeyError) as err:
        raise TvserveError(f"{mar} is not a tvserve archive: {err}") from None
