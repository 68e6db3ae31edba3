"""The one error a request can end in that is the client's doing (every other exception is a bug,
logged with its traceback by TorchServe)."""


class RequestError(Exception):
    """A client mistake: answered with HTTP `status`, an error `type` and a message saying what to fix.
    Each protocol turns it into its own error body (handlers/protocols/)."""

    def __init__(self, status: int, type_: str, message: str):
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message
