"""What every protocol shares: the decoded request and small helpers for headers and JSON."""

import base64
import binascii
import json
from dataclasses import dataclass, field

from handlers.errors import RequestError

JSON = "application/json"
PROTOCOL_HEADER = "tvserve-protocol"  # set by tvserve's frontend plugin (tvserve/ops/plugin/)
ACTION_HEADER = "tvserve-action"  # infer, metadata or explain
MODEL_HEADER = "tvserve-model-name"
VERSION_HEADER = "tvserve-model-version"


@dataclass
class Decoded:
    """One request, decoded by its protocol.

    images: encoded image bytes, or uint8 arrays [H, W, 3], one per image (several per request
        where the protocol allows it); options: the task's options as the client sent them (raw);
    action: "infer", "metadata" or "explain"; reply: what the protocol needs to encode the answer
        (requested outputs, binary or JSON, the request id...), opaque to everything else.
    """

    images: list
    options: dict
    action: str = "infer"
    reply: dict = field(default_factory=dict)


def compact(body) -> bytes:
    """JSON without spaces: TorchServe would otherwise indent a dict answer (2-space, one value a line),
    which triples a heatmap's or a tensor's size."""
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def header(headers: dict, name: str):
    """A request header's value, whatever the case the client sent its name in."""
    return next((value for key, value in headers.items() if key.lower() == name.lower()), None)


def json_payload(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, "InvalidJSON", f"The body is not valid JSON: {err}.") from None


def strict_base64(text, what: str) -> bytes:
    """Strict base64 `text` -> bytes; a 400 naming `what` otherwise."""
    if not isinstance(text, str):
        raise RequestError(400, "InvalidBody", f"{what} must be a base64 string, got {type(text).__name__}.")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, "InvalidBase64", f"{what} is not valid base64: {err}.") from None


def body_bytes(request: dict) -> bytes:
    """The raw body TorchServe passed (the plugin forwards it as the "body" parameter)."""
    value = request.get("body", b"")
    return value.encode("utf-8") if isinstance(value, str) else bytes(value or b"")


HEATMAP_DECIMALS = 3  # 0.001 of the peak: finer than any colour map shows, and a compact answer


def explanation_json(explanation: dict) -> dict:
    """One image's explanation as JSON: the method, the target class and the heatmap [h][w] in [0, 1]."""
    heatmap = explanation["heatmap"]
    return {"method": explanation["method"], "target": explanation["target"], "shape": list(heatmap.shape),
            "heatmap": [[round(value, HEATMAP_DECIMALS) for value in row] for row in heatmap.tolist()]}
