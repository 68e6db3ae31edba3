"""The model checked before anything is written, on PyTorch's meta device (shapes without memory or
compute, even for 600M parameters): it builds, its state_dict loads strictly, and one image of the
preset's crop gives an output the task accepts. Detectors run their transform and backbone there
(their proposal filtering and NMS need real values), and their heads' sizes are checked."""

import contextlib
import warnings
from pathlib import Path
from unittest import mock

import torch

from handlers.models import build_model
from handlers.record import ModelSpec, Record
from handlers.tasks import get_task
from tvserve import TvserveError
from tvserve.archiving import zoo


@contextlib.contextmanager
def no_weight_init():
    """torch.nn.init's in-place initialisers do nothing inside: a module is allocated, not filled."""
    initialisers = [name for name in dir(torch.nn.init) if name.endswith("_") and not name.startswith("_")]
    with contextlib.ExitStack() as stack:
        for name in initialisers:
            stack.enter_context(mock.patch.object(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor))
        yield


def checked_on_cpu(spec: ModelSpec) -> bool:
    """Quantized modules have no meta kernels (their builder observes activations and packs int8
    weights, by value): they are checked on the CPU, for real, in at most 2.4 s (resnext101 here)."""
    return spec.builder == "torchvision" and zoo.is_quantized(spec.name)


def build_for_check(model_dir: Path, spec: ModelSpec, state_dict: dict = None) -> torch.nn.Module:
    """The module on the meta device. A constructor that computes with tensor values (regnet) is
    allocated on the CPU without initialising its weights (pages never touched), then moved to meta.
    A spec built for its weights gets `state_dict` from its builder (a no-op copy on meta).
    Quantized models are built on the CPU (checked_on_cpu)."""
    if checked_on_cpu(spec):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch.ao's deprecation notices
            return build_model(model_dir, spec, state_dict)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "copying ... to a meta parameter is a no-op"
            return build_model(model_dir, spec, state_dict)
    except NotImplementedError:
        with no_weight_init():
            return build_model(model_dir, spec, state_dict).to("meta")


def weights_mismatch(err: RuntimeError) -> str:
    """The first lines of load_state_dict's error (each at most 300 characters): which keys are
    missing, unexpected or misshapen."""
    return " ".join(line.strip()[:300] for line in str(err).strip().splitlines()[1:4])


def shape_text(example) -> str:
    """1x3x224x224 for a Tensor; 3x480x640 for a list of one image."""
    tensor = example[0] if isinstance(example, list) else example
    return "x".join(map(str, tensor.shape))


def check_model(record: Record, state_dict: dict, model_dir: Path) -> None:
    """Raises TvserveError, one line naming what is wrong, unless the record's model builds, takes
    `state_dict` strictly and gives the task's output for one image."""
    try:
        model = build_for_check(model_dir, record.model, state_dict)
    except RuntimeError as err:
        if record.model.weights and "state_dict" in str(err):  # torchvision's builder loads them strictly
            raise TvserveError(f"The weights do not fit the model: {weights_mismatch(err)}") from None
        raise TvserveError(f"The model does not build: {type(err).__name__}: {err}") from None
    except KeyError as err:
        if record.model.weights:  # quantized modules read their keys themselves
            raise TvserveError(f"The weights do not fit the model: missing key {err}.") from None
        raise TvserveError(f"The model does not build: KeyError: {err}") from None
    except Exception as err:  # the user's model code: report what it raised
        raise TvserveError(f"The model does not build: {type(err).__name__}: {err}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "copying ... to a meta parameter is a no-op"
            if not record.model.weights:  # else its builder loaded them strictly (handlers.models.build_loaded)
                model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise TvserveError(f"The weights do not fit the model: {weights_mismatch(err)}") from None
    task = get_task(record.task, record.labels, record.keypoint_names)
    example = task.meta_example(record.preset)
    if checked_on_cpu(record.model):
        example = torch.zeros(example.shape)  # one image of the crop, computed for real (int8)
    try:
        output = task.meta_forward(model.eval(), example)
    except Exception as err:  # the user's forward
        raise TvserveError(f"The model fails on a {shape_text(example)} image: {type(err).__name__}: {err}") from None
    try:
        task.check_output(output)
    except ValueError as err:
        raise TvserveError(str(err)) from None
