"""Loading users' files safely: state_dicts and training checkpoints, only ever with
`torch.load(weights_only=True)`, so a pickle that would run code is refused and nothing runs."""

import pickle
from pathlib import Path

import torch

from tvserve import TvserveError

LEGACY_FORMAT = "_use_new_zipfile_serialization"  # in torch's refusal to memory-map a pre-1.6 file


def first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def safe_load(path: Path, what: str, missing_hint: str = ""):
    """`path` loaded with weights_only=True: memory-mapped where the file's format allows (nothing is
    read until used), else read whole (torch's legacy pre-1.6 format cannot be mapped). Raises
    TvserveError with the real reason: no such file, a pickle refused, or not a file torch reads."""
    path = Path(path)
    if not path.is_file():
        raise TvserveError(f"No {what} at {path}.{missing_hint}")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if LEGACY_FORMAT not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy format: read whole
    except Exception as err:  # noqa: BLE001 - whatever torch.load raises on a user's file is reported
        if isinstance(err, pickle.UnpicklingError):
            reason = f"torch.load with weights_only=True refused it: {first_line(err)}"
        else:
            reason = f"torch.load cannot read it: {type(err).__name__}: {first_line(err)}"
        raise TvserveError(f"{path} is not a loadable {what} ({reason})") from None


def is_state_value(value) -> bool:
    """A tensor, or what a quantized module adds to its state_dict: a quantized Linear's packed
    parameters, (weight, bias) with bias None or a tensor, and their dtype (torch.qint8)."""
    if isinstance(value, tuple):
        return all(item is None or isinstance(item, torch.Tensor) for item in value)
    return isinstance(value, (torch.Tensor, torch.dtype))


def load_state_dict_file(path: Path) -> dict:
    """A state_dict file (any format torch.load reads with weights_only=True)."""
    state = safe_load(path, "state_dict file")
    if not isinstance(state, dict) or not all(is_state_value(value) for value in state.values()):
        kind = type(state).__name__ if not isinstance(state, dict) else "dict that is not only tensors"
        raise TvserveError(f"{path} holds a {kind}, not a state_dict (a dict of parameter name to tensor).")
    return state


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint written by training/: plain tensors and values only."""
    checkpoint = safe_load(path, "tvserve checkpoint", " Train one with `tvserve train` (python -m training.train).")
    if not isinstance(checkpoint, dict):
        raise TvserveError(f"{path} holds a {type(checkpoint).__name__}, not a training checkpoint.")
    return checkpoint
