"""Mistakes in a training run that the user can fix; `tvserve train` and `python -m training.train`
print them on one line and exit non-zero."""


class TrainingError(Exception):
    """A training run that cannot start or did not produce a useful model; the message says what to change."""


class DatasetError(TrainingError):
    """The dataset cannot be had; the message says where to put it."""
