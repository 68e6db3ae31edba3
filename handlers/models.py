"""The model a record names: built untrained from its spec, then given its verified weights."""

import importlib.util
from pathlib import Path

import torch
import torchvision

from handlers.record import ModelSpec, Record


def build_model(model_dir: Path, spec: ModelSpec) -> torch.nn.Module:
    """The untrained module that `spec` names; a Python spec's file is read from `model_dir`."""
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


def load_model(model_dir: Path, record: Record) -> torch.nn.Module:
    """Builds the model, loads its verified weights strictly, and switches it to eval mode."""
    model = build_model(model_dir, record.model)
    weights = torch.load(record.weights.verified(model_dir), map_location="cpu", weights_only=True)
    model.load_state_dict(weights, strict=True)
    return model.eval()
