"""Writes `.mar` archives: the record, the weights, the exported model, the handler and its rooms.

An archive holds:
    MAR-INF/MANIFEST.json   TorchServe's manifest (made by torch-model-archiver's own code)
    tvserve_handler.py      the handler entry point, and the `handlers/` package it imports
    weights.pt              a plain state_dict (loads with weights_only=True)
    model.onnx / model.ts   the exported model, when the chosen backend is not eager
    tvserve.json            the record (handlers/record.py): model, preset, labels, hashes, versions
    model-config.yaml       workers, batching, timeouts
    <model source>.py       for models built from Python source (trained checkpoints, custom models)
Files are stored uncompressed (weights do not compress), and the archive is written to a
temporary name and renamed, so an interrupted run never leaves a half-written `.mar`.
"""

import copy
import logging
import platform
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torchvision
import yaml
from model_archiver.model_archiver_config import ModelArchiverConfig
from model_archiver.model_archiver_error import ModelArchiverError
from model_archiver.model_packaging_utils import ModelExportUtils
from tqdm import tqdm

import handlers
from handlers.models import build_loaded
from handlers.precision import apply_precision, describe as describe_precision
from handlers.record import METADATA_FILE, Backend, Counterpart, Record, Sizing, sha256_of
from handlers.runtimes import load_runner
from handlers.tasks import STACKED, get_task
from tvserve import TvserveError, __version__
from tvserve.archiving import zoo
from tvserve.archiving.calibration import (check as check_cost, choose_recipe, measure, measure_effect,
                                           read_calibration, read_measurement_set, synthetic_measurement_set,
                                           warn_effect)
from tvserve.archiving.mar import MODEL_CONFIG_FILE
from tvserve.archiving.options import DEFAULT_VERSION, ArchiveOptions
from tvserve.archiving.measured_load import size_by_load
from tvserve.archiving.tuning import (TIMED_BATCH, archive_cores, cpu_name, sample_jpeg, select_backend, select_eager,
                                  select_quantized)
from tvserve.archiving.weights import load_state_dict_file

log = logging.getLogger(__name__)

HANDLER_ENTRY = "tvserve_handler.py"
WEIGHTS_FILE = "weights.pt"
PROGRESS_BAR_BYTES = 50_000_000  # weights bigger than this show a progress bar while archived
HANDLERS_DIR = Path(handlers.__file__).parent


def library_versions() -> dict:
    return {
        "tvserve": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


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


def tune(record: Record, weights: Path, model_dir: Path, options: ArchiveOptions, folder: Path) -> tuple:
    """(options, backend dict) for this machine: builds the model with its real weights on the CPU
    and picks the backend from its timings (tuning.py), with the threads of one worker of the
    archive's workers (all the cores where they are left to the archiver, which sizes them after:
    `size`). int8 is calibrated on the user's images by the recipe that agrees best on the
    held-out ones (calibration.choose_recipe), its cost measured there; below --min-agreement it
    is refused. tf32, bf16 and fp16 have their effect measured (measured_effect); below
    --min-agreement, a warning. A classifier torchvision quantized runs on its engine's runtime,
    timed beside its fp32 counterpart (quantized_backend)."""
    quantized = record.model.builder == "torchvision" and zoo.is_quantized(record.model.name)
    if options.precision == "fp32" and options.backend == "eager" and options.workers and options.batch_size \
            and not quantized:
        return options, {"name": "eager", "file": None, "selection": {"wanted": "eager"}}
    task = get_task(record.task, record.labels, record.keypoint_names)
    if options.precision != "fp32" and task.name not in STACKED:
        raise TvserveError(f"--precision {options.precision} is for classification models; {record.name} is a "
                           f"{task.name} model, served in fp32 (leave --precision out).")
    if hasattr(task, "inputs"):  # a clip or a pair of images a request: the timings below are of single photos
        return unmeasured_eager(options, task)
    int8 = options.precision == "int8"
    calibration = read_calibration(options.calibration, record.preset, record.labels) if int8 else None
    state_dict = load_state_dict_file(weights)
    model = build_loaded(model_dir, record.model, state_dict)
    log.info("choosing %s's %s backend (%s) for %d threads ...", record.name,
             "int8" if quantized else options.precision, options.backend, options.thread_budget())
    search = calibration and choose_recipe(model.eval(), task, calibration, folder, options.thread_budget())
    if quantized:
        backend = quantized_backend(record, model.eval(), options)
    elif task.name in STACKED:
        backend = select_backend(model.eval(), task, record.preset.crop, options.thread_budget(),
                                 options.backend or "auto", folder, batch=options.batch_size or TIMED_BATCH,
                                 precision=options.precision,
                                 calibration=calibration and calibration.calibration_batches(),
                                 prepared=search and {"onnxruntime_int8": search.path})
    else:
        backend = select_eager(model, task, record.preset, options.thread_budget(), options.backend or "auto",
                               batch=options.batch_size or TIMED_BATCH)
    if calibration:
        reduced = load_runner(backend["name"], path=backend["file"], threads=options.thread_budget())
        cost = measure(load_runner("eager", model=model), reduced, task, calibration, method=search.best.describe(),
                       min_agreement=options.min_agreement, search=search)
        check_cost(cost, options.precision)
        backend["quantization"] = cost.to_dict()
    elif options.precision != "fp32":
        backend["effect"] = measured_effect(model, backend["name"], task, record, options).to_dict()
    return options, backend


def unmeasured_eager(options: ArchiveOptions, task) -> tuple:
    """(options, backend) for a video or optical-flow model: eager (its exports are not checked),
    one worker and one request a batch unless given (a clip's windows, or RAFT's iterations, fill
    the cores alone; tuning.py's timings are of single photos)."""
    if (options.backend or "auto") not in ("auto", "eager"):
        raise TvserveError(f"Backend {options.backend} cannot serve this model: {task.name} models are served "
                           "eager. Use --backend auto or eager.")
    options = replace(options, workers=options.workers or 1, batch_size=options.batch_size or 1)
    return options, {"name": "eager", "file": None,
                     "selection": {"wanted": options.backend or "auto", "cpu": cpu_name(),
                                   "rule": f"{task.name}: eager, 1 worker and batch 1 unless given"}}


def quantized_backend(record: Record, model, options: ArchiveOptions) -> dict:
    """The backend of a classifier torchvision quantized (tuning.select_quantized): its engine's runtime,
    timed beside its fp32 counterpart, whose accuracy (the weights' meta) and time are recorded."""
    enum = zoo.get_weights(record.model.name, record.model.weights)
    fp32_name, fp32_weights = zoo.fp32_counterpart(record.model.name, enum)
    fp32_model = torchvision.models.get_model(fp32_name, weights=None, **zoo.builder_kwargs(fp32_name, fp32_weights))
    backend = select_quantized(model, fp32_model, enum.meta["backend"], record.preset.crop, options.thread_budget(),
                               batch=options.batch_size or TIMED_BATCH)
    alone = {candidate["name"]: candidate["ms_batch_1"] for candidate in backend["selection"]["candidates"]}
    backend["counterpart"] = Counterpart(
        model=fp32_name, weights=str(fp32_weights), engine=enum.meta["backend"], acc1_int8=zoo.imagenet_acc1(enum),
        acc1_fp32=zoo.imagenet_acc1(fp32_weights), forward_ms_int8=alone[backend["name"]],
        forward_ms_fp32=alone["eager"], threads=options.thread_budget()).to_dict()
    return backend


def size(record: Record, options: ArchiveOptions, sizing: Sizing, files: dict, folder: Path) -> tuple:
    """(options, sizing) with the workers and batch size the user left decided by a short measured
    load (measured_load.py) on the archive's own files ({name in the archive: path here}, laid out
    in `folder` as a worker unpacks them, with `record`), the measurement recorded in the sizing."""
    if options.workers and options.batch_size:
        return options, sizing
    folder.mkdir()
    (folder / METADATA_FILE).write_text(record.to_json())
    for name, source in files.items():
        (folder / name).symlink_to(Path(source).resolve())
    chosen = next((c for c in record.backend.selection.get("candidates", ()) if c["name"] == record.backend.name), {})
    options, measured = size_by_load(folder, options, chosen.get("ms_batch_1"), archive_cores(), sample_jpeg())
    return options, replace(sizing, measured=measured)


def measured_effect(model, name: str, task, record: Record, options: ArchiveOptions):
    """What running backend `name` in options.precision (tf32, bf16, fp16) changes against the fp32
    eager `model`, on this machine's CPU, on the --calibration images or, without them, on images
    made here (calibration.py), logged with a warning below --min-agreement."""
    measured = (read_measurement_set(options.calibration, record.preset, record.labels) if options.calibration
                else synthetic_measurement_set(record.preset))
    reduced = apply_precision(load_runner(name, model=copy.deepcopy(model)), options.precision, "cpu")
    effect = measure_effect(load_runner("eager", model=model), reduced, task, measured, precision=options.precision,
                            method=f"{name}, {describe_precision(options.precision, 'cpu')}",
                            measured_on=f"cpu ({cpu_name()})", min_agreement=options.min_agreement)
    warn_effect(effect)
    return effect


def write_handlers(mar: zipfile.ZipFile) -> None:
    """The entry point at the archive's root, and the whole handlers/ package under handlers/."""
    mar.write(HANDLERS_DIR / HANDLER_ENTRY, HANDLER_ENTRY)
    for source in sorted(HANDLERS_DIR.rglob("*.py")):
        mar.write(source, f"handlers/{source.relative_to(HANDLERS_DIR).as_posix()}")


def write_archive(record: Record, weights: Path, options: ArchiveOptions, model_dir: Path, sources=(),
                  check_sha256=None) -> Path:
    """Writes the `.mar` for `record` with the state_dict file `weights`; `model_dir` holds the
    files the model is built from, `sources` the Python ones that go into the archive;
    `check_sha256(sha256)` may refuse the weights before the archive replaces anything.
    Returns the archive's path."""
    path = archive_path(record.name, options)
    manifest = ModelExportUtils.generate_manifest_json(ModelArchiverConfig(
        model_name=record.name, handler=HANDLER_ENTRY, version=options.version,
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
            sizing = Sizing(decided=options.left_to_archiver(), cores=archive_cores())
            options, backend = tune(record, weights, model_dir, options, Path(exports))
            files = {WEIGHTS_FILE: weights, **{Path(source).name: source for source in sources}}
            if backend["file"]:
                exported = Path(backend["file"])
                files[exported.name] = exported
                backend = {**backend, "file": exported.name, "sha256": copy_into(mar, exported, exported.name)}
            record = replace(
                record, version=options.version, versions=library_versions(),
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                weights=replace(record.weights, file=WEIGHTS_FILE, sha256=sha256),
                preset=replace(record.preset, jpeg_draft=options.jpeg_draft, decode=options.decode),
                backend=Backend.from_dict(backend))
            options, sizing = size(record, options, sizing, files, Path(exports) / "measuring")
            record = replace(record, sizing=sizing)
            mar.writestr("MAR-INF/MANIFEST.json", manifest)
            mar.writestr(METADATA_FILE, record.to_json())
            mar.writestr(MODEL_CONFIG_FILE, yaml.safe_dump(options.model_config(), sort_keys=False))
            write_handlers(mar)
            for source in sources:
                mar.write(source, Path(source).name)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path
