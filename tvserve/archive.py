"""Builds `.mar` archives that tvserve's handler serves: one per torchvision model or checkpoint.

An archive holds:
    MAR-INF/MANIFEST.json   TorchServe's manifest (made by torch-model-archiver's own code)
    image_classifier.py     the handler entry point, and the `handlers/` package it imports
    weights.pt              a plain state_dict (loads with weights_only=True)
    model.onnx / model.ts   the exported model, when the chosen backend is not eager
    tvserve.json            the one source of truth: model, preset, labels, weights' sha256, versions
    model-config.yaml       workers, batching, timeouts
    <model source>.py       for models built from Python source (trained checkpoints)
Files are stored uncompressed (weights do not compress), and the archive is written to a
temporary name and renamed, so an interrupted run never leaves a half-written `.mar`.
"""

import contextlib
import json
import logging
import platform
import tempfile
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import torch
import torchvision
import yaml
from tqdm import tqdm
from model_archiver.model_archiver_config import ModelArchiverConfig
from model_archiver.model_archiver_error import ModelArchiverError
from model_archiver.model_packaging_utils import ModelExportUtils

import handlers
import training.models
from handlers.backends import cores_per_worker
from handlers.image_classifier import METADATA_FILE, build_model, sha256_of
from handlers.preprocessing import INTERPOLATIONS
from tvserve import TvserveError, __version__
from tvserve import torchvision_models as tvm
from tvserve.backends import TIMED_BATCH, choose_batch_size, choose_workers, select_backend

log = logging.getLogger(__name__)

HANDLER_ENTRY = "image_classifier.py"
WEIGHTS_FILE = "weights.pt"
MODEL_CONFIG_FILE = "model-config.yaml"
DEFAULT_VERSION = "1.0"
PROGRESS_BAR_BYTES = 50_000_000  # weights bigger than this show a progress bar while archived
HANDLERS_DIR = Path(handlers.__file__).parent


@dataclass
class ArchiveOptions:
    """Where and how an archive is written, and its model-config.yaml."""

    model_name: str = None  # default: the torchvision name, or the checkpoint's run folder
    version: str = DEFAULT_VERSION
    export_path: Path = Path("model_store")
    force: bool = False
    workers: int = None  # None: measured here (tvserve/backends.py choose_workers)
    batch_size: int = None  # None: 8 where batches are cheaper per image here, else 1 (choose_batch_size)
    max_batch_delay: int = 1  # ms: the most an idle server adds; a backlog fills batches at once (see README)
    response_timeout: int = 120  # s
    startup_timeout: int = 120  # s
    threads: int = None  # torch threads per worker; None: cores / workers, decided in the worker
    backend: str = "auto"  # eager, torchscript, onnxruntime, openvino; auto: the fastest that passes parity
    jpeg_draft: bool = False  # lossy: decode big JPEGs at a reduced DCT scale (handlers/decoding.py)

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


def library_versions() -> dict:
    return {
        "tvserve": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


@contextlib.contextmanager
def no_weight_init():
    """torch.nn.init's in-place initialisers do nothing inside: a module is allocated, not filled."""
    initialisers = [name for name in dir(torch.nn.init) if name.endswith("_") and not name.startswith("_")]
    with contextlib.ExitStack() as stack:
        for name in initialisers:
            stack.enter_context(mock.patch.object(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor))
        yield


def build_for_check(model_dir: Path, spec: dict) -> torch.nn.Module:
    """The module on the meta device: shapes without memory or compute, even for 600M parameters.
    A constructor that computes with tensor values (regnet) is allocated on the CPU without
    initialising its weights (pages never touched), then moved to meta."""
    try:
        with torch.device("meta"):
            return build_model(model_dir, spec)
    except NotImplementedError:
        with no_weight_init():
            return build_model(model_dir, spec).to("meta")


def check_model(meta: dict, state_dict: dict, model_dir: Path) -> None:
    """Builds the module, loads `state_dict` strictly and checks one logit per label, on the meta
    device (key and shape checks are the same there)."""
    try:
        model = build_for_check(model_dir, meta["model"])
    except Exception as err:  # the user's model code: report what it raised
        raise TvserveError(f"The model does not build: {type(err).__name__}: {err}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "copying ... to a meta parameter is a no-op"
            model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        details = " ".join(line.strip() for line in str(err).strip().splitlines()[1:4])
        raise TvserveError(f"The weights do not fit the model: {details}") from None
    crop = meta["preset"]["crop"]
    try:
        logits = model.eval()(torch.zeros(1, 3, crop, crop, device="meta"))
    except Exception as err:  # the user's forward
        raise TvserveError(
            f"The model fails on a 1x3x{crop}x{crop} image: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, len(meta["labels"])):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TvserveError(
            f"The model gives {shape} for one image and {len(meta['labels'])} labels: "
            "it must give one logit per label, shape (1, n_labels)."
        )


def archive_path(name: str, options: ArchiveOptions) -> Path:
    """model_store/NAME.mar for the default version 1.0, NAME-VERSION.mar for any other, so two
    versions of one model can sit side by side in one model store."""
    try:
        ModelExportUtils.check_model_name_regex_or_exit(name)
    except (ModelArchiverError, SystemExit):
        raise TvserveError(
            f"Invalid model name {name!r}: use letters, digits, '_' and '-', starting with a letter or digit."
        ) from None
    stem = name if options.version == DEFAULT_VERSION else f"{name}-{options.version}"
    path = Path(options.export_path) / f"{stem}.mar"
    if path.exists() and not options.force:
        raise TvserveError(f"{path} already exists. Pass --force to overwrite it.")
    return path


def copy_into(mar: zipfile.ZipFile, source: Path, name: str) -> str:
    """Streams `source` into the archive as `name`, with a progress bar for big files; returns
    its sha256, hashed on the other core while the copy runs (both read the page cache)."""
    size = source.stat().st_size
    with ThreadPoolExecutor(max_workers=1) as pool:
        sha256 = pool.submit(sha256_of, source)
        with open(source, "rb") as stream, mar.open(name, "w", force_zip64=size >= 2**31) as out, \
                tqdm(total=size, unit="B", unit_scale=True, desc=f"archiving {source.name}",
                     disable=size < PROGRESS_BAR_BYTES, leave=False) as bar:
            for block in iter(lambda: stream.read(1 << 22), b""):
                out.write(block)
                bar.update(len(block))
        return sha256.result()


def tune(meta: dict, weights: Path, model_dir: Path, options: ArchiveOptions, folder: Path) -> tuple:
    """(options with workers and batch size decided, backend) for this machine: builds the model
    with its real weights on the CPU, decides the workers, then picks the backend and the batch
    size from its timings (tvserve/backends.py)."""
    if options.backend == "eager" and options.workers and options.batch_size:
        return options, {"name": "eager", "file": None, "selection": {"wanted": "eager"}}
    model = build_model(model_dir, meta["model"])
    model.load_state_dict(load_state_dict_file(weights), strict=True)
    if not options.workers:
        options = replace(options, workers=choose_workers(model.eval(), meta["preset"]))
    log.info("choosing %s's backend (%s) for %d worker(s) x %d threads ...", meta["name"], options.backend,
             options.workers, options.thread_budget())
    wanted = options.backend if options.backend else "auto"
    backend = select_backend(model.eval(), meta["preset"]["crop"], options.thread_budget(), wanted, folder,
                             batch=options.batch_size or TIMED_BATCH)
    if not options.batch_size:
        options = replace(options, batch_size=choose_batch_size(backend))
    return options, backend


def write_archive(meta: dict, weights: Path, options: ArchiveOptions, model_dir: Path, sources=(),
                  check_sha256=None) -> Path:
    """Writes the `.mar` for `meta` with the state_dict file `weights`; `model_dir` holds the
    files the model is built from, `sources` the Python ones that go into the archive;
    `check_sha256(sha256)` may refuse the weights before the archive replaces anything.
    Returns the archive's path."""
    path = archive_path(meta["name"], options)
    manifest = ModelExportUtils.generate_manifest_json(ModelArchiverConfig(
        model_name=meta["name"], handler=HANDLER_ENTRY, version=options.version,
        serialized_file=WEIGHTS_FILE, config_file=MODEL_CONFIG_FILE,
    ))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as mar, \
                tempfile.TemporaryDirectory(prefix="tvserve-export-") as exports:
            sha256 = copy_into(mar, Path(weights), WEIGHTS_FILE)
            if check_sha256:
                check_sha256(sha256)
            options, backend = tune(meta, weights, model_dir, options, Path(exports))
            if backend["file"]:
                exported = Path(backend["file"])
                backend = {**backend, "file": exported.name, "sha256": copy_into(mar, exported, exported.name)}
            meta = {**meta, "version": options.version, "versions": library_versions(),
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "weights": {**meta["weights"], "file": WEIGHTS_FILE, "sha256": sha256},
                    "preset": {**meta["preset"], **({"jpeg_draft": True} if options.jpeg_draft else {})},
                    "backend": {key: value for key, value in backend.items() if value is not None}}
            mar.writestr("MAR-INF/MANIFEST.json", manifest)
            mar.writestr(METADATA_FILE, json.dumps(meta, indent=2))
            mar.writestr(MODEL_CONFIG_FILE, yaml.safe_dump(options.model_config(), sort_keys=False))
            mar.write(HANDLERS_DIR / HANDLER_ENTRY, HANDLER_ENTRY)
            for source in sorted(HANDLERS_DIR.glob("*.py")):
                mar.write(source, f"handlers/{source.name}")
            for source in sources:
                mar.write(source, Path(source).name)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def load_state_dict_file(path: Path) -> dict:
    """A state_dict file, memory-mapped (nothing is read until used) and loaded safely."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickle refused by weights_only, or not a torch file
        raise TvserveError(
            f"{path} is not a plain state_dict file (torch.load with weights_only=True refused it: "
            f"{str(err).strip().splitlines()[0]})"
        ) from None
    if not isinstance(state, dict):
        raise TvserveError(f"{path} holds a {type(state).__name__}, not a state_dict.")
    return state


def torchvision_metadata(name: str, enum, model_name: str = None) -> dict:
    """What an archive of torchvision model `name` with weights `enum` records, from the enum."""
    return {
        "name": model_name or name,
        "source": "torchvision",
        "model": {"builder": "torchvision", "name": name, "kwargs": tvm.builder_kwargs(name, enum)},
        "preset": tvm.preset_of(enum),
        "labels": list(enum.meta["categories"]),
        "extra": {"weights_enum": str(enum), "imagenet_acc@1": tvm.imagenet_acc1(enum)},
    }


def archive_torchvision(name: str, *, weights: str = "DEFAULT", weights_file=None,
                        random_init: bool = False, options: ArchiveOptions = None) -> Path:
    """Archives torchvision model `name` with its pretrained `weights` (or a state_dict file)."""
    options = options or ArchiveOptions()
    enum = tvm.get_weights(name, weights)
    meta = torchvision_metadata(name, enum, options.model_name)
    archive_path(meta["name"], options)  # fail before any slow work
    with tempfile.TemporaryDirectory(prefix="tvserve-archive-") as tmp:
        if random_init:
            log.warning("archiving %s with RANDOM weights (--random-init): for tests only", name)
            path, origin = Path(tmp) / WEIGHTS_FILE, "random-init"
            torch.save(build_model(Path(tmp), meta["model"]).state_dict(), path)
        else:
            path, origin = tvm.find_weights_file(name, enum, weights_file)
        check_model(meta, load_state_dict_file(path), Path(tmp))
        meta["weights"] = {"origin": origin, "source_file": None if random_init else str(path),
                           "random_init": random_init}
        return write_archive(meta, path, options, Path(tmp),
                             check_sha256=lambda sha256: tvm.check_hash_prefix(path, sha256))


def parse_floats(text: str, what: str) -> list:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise TvserveError(f"{what} needs three comma-separated numbers (R,G,B), got {text!r}.")
    return values


def archive_custom(*, model_file, class_name: str, weights, labels, resize: int, crop: int,
                   mean: str, std: str, interpolation: str = "bilinear", init_args: str = None,
                   options: ArchiveOptions = None) -> Path:
    """Archives any nn.Module classifier defined in `model_file` that takes a normalised
    Tensor[N, 3, crop, crop] and returns Tensor[N, n_labels] logits."""
    options = options or ArchiveOptions()
    model_file, weights, labels = Path(model_file), Path(weights), Path(labels)
    for path, flag in ((model_file, "--model-file"), (weights, "--weights"), (labels, "--labels")):
        if not path.is_file():
            raise TvserveError(f"{flag} {path} does not exist.")
    try:
        kwargs = json.loads(init_args) if init_args else {}
    except json.JSONDecodeError as err:
        raise TvserveError(f"--init-args is not valid JSON ({err}): pass an object, e.g. '{{\"width\": 8}}'.") from None
    if not isinstance(kwargs, dict):
        raise TvserveError("--init-args must be a JSON object of keyword arguments, e.g. '{\"width\": 8}'.")
    if interpolation not in INTERPOLATIONS:
        raise TvserveError(f"Invalid interpolation {interpolation!r}. Choose one of: {', '.join(INTERPOLATIONS)}.")
    names = [line.strip() for line in labels.read_text().splitlines() if line.strip()]
    if not names:
        raise TvserveError(f"--labels {labels} has no labels: write one per line, in class-index order.")
    meta = {
        "name": options.model_name or model_file.stem,
        "source": "custom",
        "model": {"builder": "python", "file": model_file.name, "class": class_name, "kwargs": kwargs},
        "preset": {"resize": resize, "crop": crop, "interpolation": interpolation,
                   "mean": parse_floats(mean, "--mean"), "std": parse_floats(std, "--std")},
        "labels": names,
        "extra": {"model_file": str(model_file)},
    }
    archive_path(meta["name"], options)
    check_model(meta, load_state_dict_file(weights), model_file.parent)
    meta["weights"] = {"origin": "file", "source_file": str(weights), "random_init": False}
    return write_archive(meta, weights, options, model_file.parent, sources=[model_file])


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
    archive_path(meta["name"], options)
    with tempfile.TemporaryDirectory(prefix="tvserve-archive-") as tmp:
        (Path(tmp) / source.name).write_bytes(source.read_bytes())
        check_model(meta, checkpoint["state_dict"], Path(tmp))
        weights = Path(tmp) / WEIGHTS_FILE
        torch.save(checkpoint["state_dict"], weights)
        meta["weights"] = {"origin": "checkpoint", "source_file": str(path), "random_init": False}
        return write_archive(meta, weights, options, Path(tmp), sources=[source])


def read_metadata(mar: Path) -> dict:
    """The tvserve.json of an archive on disk."""
    try:
        with zipfile.ZipFile(mar) as archive:
            return json.loads(archive.read(METADATA_FILE))
    except (FileNotFoundError, zipfile.BadZipFile, KeyError) as err:
        raise TvserveError(f"{mar} is not a tvserve archive: {err}") from None
