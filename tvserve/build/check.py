"""The model checked before anything is written, on PyTorch's meta device (shapes without memory or
compute, even for 600M parameters): it builds, its state_dict loads strictly, and one image of the
preset's crop gives an output the task accepts."""

import contextlib
import warnings
from pathlib import Path
from unittest import mock

import torch

from handlers.models import build_model
from handlers.record import ModelSpec, Record
from handlers.tasks import get_task
from tvserve import TvserveError


@contextlib.contextmanager
def no_weight_init():
    """torch.nn.init's in-place initialisers do nothing inside: a module is allocated, not filled."""
    initialisers = [name for name in dir(torch.nn.init) if name.endswith("_") and not name.startswith("_")]
    with contextlib.ExitStack() as stack:
        for name in initialisers:
            stack.enter_context(mock.patch.object(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor))
        yield


def build_for_check(model_dir: Path, spec: ModelSpec) -> torch.nn.Module:
    """The module on the meta device. A constructor that computes with tensor values (regnet) is
    allocated on the CPU without initialising its weights (pages never touched), then moved to meta."""
    try:
        with torch.device("meta"):
            return build_model(model_dir, spec)
    except NotImplementedError:
        with no_weight_init():
            return build_model(model_dir, spec).to("meta")


def check_model(record: Record, state_dict: dict, model_dir: Path) -> None:
    """Raises TvserveError, one line naming what is wrong, unless the record's model builds, takes
    `state_dict` strictly and gives the task's output for one image."""
    try:
        model = build_for_check(model_dir, record.model)
    except Exception as err:  # the user's model code: report what it raised
        raise TvserveError(f"The model does not build: {type(err).__name__}: {err}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "copying ... to a meta parameter is a no-op"
            model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        details = " ".join(line.strip() for line in str(err).strip().splitlines()[1:4])
        raise TvserveError(f"The weights do not fit the model: {details}") from None
    crop = record.preset.crop
    try:
        output = model.eval()(torch.zeros(1, 3, crop, crop, device="meta"))
    except Exception as err:  # the user's forward
        raise TvserveError(f"The model fails on a 1x3x{crop}x{crop} image: {type(err).__name__}: {err}") from None
    try:
        get_task(record.task, record.labels).check_output(output)
    except ValueError as err:
        raise TvserveError(str(err)) from None
