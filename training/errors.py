"""Errors a user can fix. Each message is one line that says what to do; `python -m
training.train` (and the `tvserve` CLI) print it without a traceback and exit 1."""


class TrainingError(Exception):
    """A mistake the user can fix (a flag, a missing file, a recipe that does not learn)."""


class DatasetError(TrainingError):
    """The dataset cannot be had; the message says where to put it."""
