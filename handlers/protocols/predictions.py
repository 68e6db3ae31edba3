"""TorchServe's `/predictions/MODEL` with tvserve's JSON: the body is the image, the answer the
task's JSON, a client mistake `{"code", "type", "message"}`.

Accepted bodies: raw image bytes (any or no Content-Type; the format is read from the bytes),
a multipart/form-data file field, or JSON {"data": "<base64>"} (strict base64). Options come from
form fields or query parameters, JSON keys, or an `X-<Option>` header (X-TopK). (TorchServe 0.12
drops the query string of /predictions/NAME; /NAME/predict keeps it.)
"""

import base64
import binascii
import json

from handlers.errors import RequestError

IMAGE_FIELDS = ("body", "data", "file", "image")  # preferred fields, in order
JSON = "application/json"


def header(headers: dict, name: str):
    """A request header's value, whatever the case the client sent its name in."""
    return next((value for key, value in headers.items() if key.lower() == name.lower()), None)


def json_payload(raw: bytes) -> dict:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, "InvalidJSON", f"The body is not valid JSON: {err}.") from None


def base64_payload(payload: dict) -> bytes:
    data = payload.get("data")
    if not isinstance(data, str):
        raise RequestError(400, "InvalidBody", 'A JSON body needs "data": a base64 string of the image.')
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, "InvalidBase64", f'"data" is not valid base64: {err}.') from None


class PredictionsJSON:
    name = "predictions"

    def decode(self, request: dict, headers: dict, option_names=()) -> tuple:
        """(image bytes, {option: raw value or None}) from one TorchServe request."""
        options = {name: request.get(name, header(headers, f"x-{name}")) for name in option_names}
        fields = [name for name in request if name not in option_names]
        if not fields:
            raise RequestError(
                400, "EmptyBody",
                'The request carries no image: send image bytes as the body, a multipart file field, '
                'or JSON {"data": "<base64>"}.',
            )
        value = request[next((field for field in IMAGE_FIELDS if field in fields), fields[0])]
        if isinstance(value, str):
            value = value.encode("utf-8")
        if isinstance(value, (bytes, bytearray)) and value.lstrip()[:1] != b"{":
            return bytes(value), options
        payload = json_payload(bytes(value)) if isinstance(value, (bytes, bytearray)) else value
        if not isinstance(payload, dict):
            raise RequestError(400, "InvalidBody", 'A JSON body must be an object: {"data": "<base64 image>"}.')
        return base64_payload(payload), {name: payload.get(name, value) for name, value in options.items()}

    def encode(self, answer) -> tuple:
        return answer, JSON

    def encode_error(self, error: RequestError) -> tuple:
        return {"code": error.status, "type": error.type, "message": error.message}, JSON
