"""One archive kind per source of models: a torchvision model by name, a checkpoint written by
training/, or any nn.Module in a Python file. Each makes the model's record (handlers/record.py),
checks it on the meta device before any slow work, and writes the archive (writer.py)."""

import json
import logging
import tempfile
from pathlib import Path
from unittest import mock

import torch

import training.models
from handlers.models import build_model
from handlers.preprocessing import INTERPOLATIONS
from handlers.record import ModelSpec, Preset, Record, Weights
from tvserve import TvserveError
from tvserve.archiving import zoo
from tvserve.archiving.check import check_model
from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.weights import load_checkpoint, load_state_dict_file
from tvserve.archiving.writer import WEIGHTS_FILE, archive_path, write_archive

log = logging.getLogger(__name__)

CHECKPOINT_KEYS = {"arch", "arch_args", "state_dict", "classes", "mean", "std", "input_size"}


def torchvision_record(name: str, enum, model_name: str = None) -> Record:
    """What an archive of torchvision model `name` with weights `enum` records, from the enum.
    Classification models are built from keyword arguments; the other tasks' and the quantized
    classifiers' by torchvision's builder for their weights (ModelSpec.weights), which sets up what
    those weights need (for quantized ones: fused modules converted to int8 on their engine)."""
    task = zoo.task_of(name)
    if zoo.is_quantized(name):  # int8 modules: made by the builder for their weights (fused, then converted)
        spec = ModelSpec(builder="torchvision", name=name, weights=enum.name, kwargs=zoo.quantized_builder_kwargs(name))
        extra = {"weights_enum": str(enum), "imagenet_acc@1": zoo.imagenet_acc1(enum)}
    elif task == "classification":
        spec = ModelSpec(builder="torchvision", name=name, kwargs=zoo.builder_kwargs(name, enum))
        extra = {"weights_enum": str(enum), "imagenet_acc@1": zoo.imagenet_acc1(enum)}
    else:
        spec = ModelSpec(builder="torchvision", name=name, weights=enum.name)
        metric, value = zoo.headline_metric(task, enum)
        extra = {"weights_enum": str(enum), metric: value}
    return Record(
        name=model_name or name, source="torchvision", task=task, model=spec,
        preset=Preset(**zoo.preset_of(enum)), labels=list(enum.meta.get("categories", [])),  # flow: none
        keypoint_names=enum.meta.get("keypoint_names") if task == "keypoints" else None, extra=extra,
    )


def random_state_dict(record: Record, model_dir: Path) -> dict:
    """A state_dict of random weights for the record's model (--random-init, tests): the module as
    its builder sets it up, every weight left as initialised. For a spec built for its weights, the
    module's state where the builder loads its weights (quantized_mobilenet_v3_large: before the
    conversion to int8, as its weights are)."""
    if not record.model.weights:
        return build_model(model_dir, record.model).state_dict()
    states = []  # the module's own state, each time the builder would load weights into it
    with mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, *args, **kwargs: states.append(self.state_dict())):
        build_model(model_dir, record.model, state_dict={})
    return states[-1]


def check_quantized_options(name: str, options: ArchiveOptions) -> None:
    """Refuses, before any work, what a classifier torchvision quantized cannot take: another precision
    (its weights are int8 already) or another backend (they run on their engine's runtime only)."""
    if options.precision != "fp32":
        raise TvserveError(f"{name} is int8 already (torchvision quantized it): leave --precision out, or archive "
                           f"{name.removeprefix('quantized_')} with --precision {options.precision} instead.")
    if options.backend not in (None, "auto"):
        raise TvserveError(f"{name}'s int8 weights run on their quantized engine's runtime only: leave --backend out.")


def archive_torchvision(name: str, *, weights: str = "DEFAULT", weights_file=None,
                        random_init: bool = False, options: ArchiveOptions = None) -> Path:
    """Archives torchvision model `name` with its pretrained `weights` (or a state_dict file)."""
    options = options or ArchiveOptions()
    enum = zoo.get_weights(name, weights)
    if zoo.is_quantized(name):
        check_quantized_options(name, options)
    record = torchvision_record(name, enum, options.model_name)
    archive_path(record.name, options)  # fail before any slow work
    with tempfile.TemporaryDirectory(prefix="tvserve-archive-") as tmp:
        if random_init:
            log.warning("archiving %s with RANDOM weights (--random-init): for tests only", name)
            path, origin = Path(tmp) / WEIGHTS_FILE, "random-init"
            torch.save(random_state_dict(record, Path(tmp)), path)
        else:
            path, origin = zoo.find_weights_file(name, enum, weights_file)
        check_model(record, load_state_dict_file(path), Path(tmp))
        record.weights = Weights(origin=origin, source_file=None if random_init else str(path), random_init=random_init)
        return write_archive(record, path, options, Path(tmp),
                             check_sha256=lambda sha256: zoo.check_hash_prefix(path, sha256))


def parse_floats(text: str, what: str) -> list:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise TvserveError(f"{what} needs three comma-separated numbers (R,G,B), got {text!r}.")
    return values


def parse_init_args(init_args: str) -> dict:
    try:
        kwargs = json.loads(init_args) if init_args else {}
    except json.JSONDecodeError as err:
        raise TvserveError(f"--init-args is not valid JSON ({err}): pass an object, e.g. '{{\"width\": 8}}'.") from None
    if not isinstance(kwargs, dict):
        raise TvserveError("--init-args must be a JSON object of keyword arguments, e.g. '{\"width\": 8}'.")
    return kwargs


def read_labels(path: Path) -> list:
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise TvserveError(f"--labels {path} has no labels: write one per line, in class-index order.")
    return names


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
    kwargs = parse_init_args(init_args)
    if interpolation not in INTERPOLATIONS:
        raise TvserveError(f"Invalid interpolation {interpolation!r}. Choose one of: {', '.join(INTERPOLATIONS)}.")
    record = Record(
        name=options.model_name or model_file.stem, source="custom",
        model=ModelSpec(builder="python", file=model_file.name, cls=class_name, kwargs=kwargs),
        preset=Preset(resize=resize, crop=crop, interpolation=interpolation,
                      mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std")),
        labels=read_labels(labels), extra={"model_file": str(model_file)},
    )
    archive_path(record.name, options)
    check_model(record, load_state_dict_file(weights), model_file.parent)
    record.weights = Weights(origin="file", source_file=str(weights), random_init=False)
    return write_archive(record, weights, options, model_file.parent, sources=[model_file])


def checkpoint_record(path: Path, checkpoint: dict, model_name: str = None) -> Record:
    """The record of a training checkpoint: architecture, labels and preset come from it."""
    missing = CHECKPOINT_KEYS - set(checkpoint)
    if missing:
        raise TvserveError(f"{path} lacks {', '.join(sorted(missing))}: it was not written by training/.")
    size = int(checkpoint["input_size"])
    return Record(
        name=model_name or Path(path).resolve().parent.name, source="checkpoint",
        model=ModelSpec(builder="python", file=Path(training.models.__file__).name, cls=checkpoint["arch"],
                        kwargs=checkpoint["arch_args"]),
        preset=Preset(resize=size, crop=size, interpolation="bilinear", mean=checkpoint["mean"], std=checkpoint["std"]),
        labels=list(checkpoint["classes"]),
        extra={"checkpoint": str(path), "dataset": checkpoint.get("dataset"), "metrics": checkpoint.get("metrics")},
    )


def archive_checkpoint(path, *, options: ArchiveOptions = None) -> Path:
    """Archives a checkpoint written by `training/`."""
    options = options or ArchiveOptions()
    path = Path(path)
    checkpoint = load_checkpoint(path)
    record = checkpoint_record(path, checkpoint, options.model_name)
    archive_path(record.name, options)
    source = Path(training.models.__file__)  # self-contained: imports torch only
    with tempfile.TemporaryDirectory(prefix="tvserve-archive-") as tmp:
        (Path(tmp) / source.name).write_bytes(source.read_bytes())
        check_model(record, checkpoint["state_dict"], Path(tmp))
        weights = Path(tmp) / WEIGHTS_FILE
        torch.save(checkpoint["state_dict"], weights)
        record.weights = Weights(origin="checkpoint", source_file=str(path), random_init=False)
        return write_archive(record, weights, options, Path(tmp), sources=[source])
