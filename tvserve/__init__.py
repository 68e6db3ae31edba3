"""tvserve: archive torchvision models and the book's CNNs, and serve them behind TorchServe."""

__version__ = "0.1.0"


class TvserveError(Exception):
    """A mistake the user can fix; the CLI prints its message on one line and exits non-zero."""
