"""The model a record names: built untrained from its spec, then given its verified weights."""

import contextlib
import importlib.util
from pathlib import Path
from unittest import mock

import torch
import torchvision

from handlers.record import ModelSpec, Record


@contextlib.contextmanager
def handing_over(enum, state_dict: dict):
    """Inside, torchvision's builders get `state_dict` for weights `enum` instead of downloading it."""
    with mock.patch.object(type(enum), "get_state_dict", lambda self, *args, **kwargs: state_dict):
        yield


def build_for_weights(spec: ModelSpec, state_dict: dict) -> torch.nn.Module:
    """torchvision's builder called for the pretrained weights `spec.weights`, loading `state_dict`:
    the module exactly as torchvision sets it up for them (detection: frozen batch norms and their
    eps, no backbone download)."""
    enum = torchvision.models.get_model_weights(spec.name)[spec.weights]
    if state_dict is None:
        raise ValueError(f"{spec.name} is built for its {spec.weights} weights: give their state_dict.")
    with handing_over(enum, state_dict):
        return torchvision.models.get_model(spec.name, weights=enum, **spec.kwargs)


def build_model(model_dir: Path, spec: ModelSpec, state_dict: dict = None) -> torch.nn.Module:
    """The module that `spec` names, untrained (or, for a spec with `weights`, given `state_dict`
    by torchvision's builder); a Python spec's file is read from `model_dir`."""
    if spec.builder == "torchvision" and spec.weights:
        return build_for_weights(spec, state_dict)
    if spec.builder == "torchvision":
        return torchvision.models.get_model(spec.name, weights=None, **spec.kwargs)
    if spec.builder == "python":
        source = Path(model_dir) / spec.file
        module_spec = importlib.util.spec_from_file_location(source.stem, source)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not isinstance(getattr(module, spec.cls, None), type):
            defined = [name for name, value in vars(module).items()
                       if isinstance(value, type) and issubclass(value, torch.nn.Module)
                       and value.__module__ == module.__name__]
            raise ValueError(f"{source.name} defines no class {spec.cls!r}; its nn.Module classes: "
                             f"{', '.join(defined) or 'none'}.")
        return getattr(module, spec.cls)(**spec.kwargs)
    raise ValueError(f"Unknown model builder {spec.builder!r}: this archive needs a newer tvserve.")


def build_loaded(model_dir: Path, spec: ModelSpec, state_dict: dict) -> torch.nn.Module:
    """The module `spec` names with `state_dict` loaded strictly: after building it, or, for a spec
    built for its weights, by torchvision's builder itself (strictly), where those weights go; for
    quantized_mobilenet_v3_large that is before its conversion to int8 (its weights are the state
    of quantization-aware training), so loading them again afterwards would not fit."""
    model = build_model(model_dir, spec, state_dict)
    if not spec.weights:
        model.load_state_dict(state_dict, strict=True)
    return model


def load_model(model_dir: Path, record: Record) -> torch.nn.Module:
    """Builds the model with its verified weights loaded strictly, in eval mode."""
    weights = torch.load(record.weights.verified(model_dir), map_location="cpu", weights_only=True)
    return build_loaded(model_dir, record.model, weights).eval()
