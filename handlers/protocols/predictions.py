"""TorchServe's `/predictions/MODEL` with tvserve's JSON: the body is the image, the answer the
task's JSON, a client mistake `{"code", "type", "message"}`.

Accepted bodies: raw image bytes (any or no Content-Type; the format is read from the bytes),
a multipart/form-data file field, or JSON {"data": "<base64>"} (strict base64). A task that takes
several items a request (a video model's frames, an optical-flow model's two images: its `inputs`)
gets every field of a multipart body, in the order sent (or one raw body: a clip). Options come from
form fields or query parameters, JSON keys, or an `X-<Option>` header (X-TopK). (TorchServe 0.12
drops the query string of /predictions/NAME; /NAME/predict keeps it.)
"""

from handlers.errors import RequestError
from handlers.protocols.common import JSON, Decoded, compact, explanation_json, header, json_payload, strict_base64

IMAGE_FIELDS = ("body", "data", "file", "image")  # preferred fields, in order


def base64_payload(payload: dict) -> bytes:
    data = payload.get("data")
    if not isinstance(data, str):
        raise RequestError(400, "InvalidBody", 'A JSON body needs "data": a base64 string of the image.')
    return strict_base64(data, '"data"')


class PredictionsJSON:
    name = "predictions"

    def decode(self, request: dict, headers: dict, task) -> Decoded:
        """One TorchServe request -> one image and the task's options (raw)."""
        action = "explain" if header(headers, "explain") == "True" else "infer"  # TorchServe's /explanations
        if hasattr(task, "inputs"):
            return Decoded(*self.items_and_options(request, headers, task.option_names), action)
        return Decoded(*self.image_and_options(request, headers, task.option_names), action)

    @staticmethod
    def items_and_options(request: dict, headers: dict, option_names=()) -> tuple:
        """([every field's bytes, in the order sent], {option: raw value or None}) from one request."""
        options = {name: request.get(name, header(headers, f"x-{name}")) for name in option_names}
        items = [value.encode("utf-8") if isinstance(value, str) else value
                 for name, value in request.items() if name not in option_names]
        if not items:
            raise RequestError(400, "EmptyBody", "The request carries nothing: send a clip as the body, or "
                                                 "its images as multipart fields.")
        if not all(isinstance(item, (bytes, bytearray)) for item in items):
            raise RequestError(400, "InvalidBody", "Send the clip or images as bytes: a raw body or multipart files.")
        return [bytes(item) for item in items], options

    def image_and_options(self, request: dict, headers: dict, option_names=()) -> tuple:
        """([image bytes], {option: raw value or None}) from one TorchServe request."""
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
            return [bytes(value)], options
        payload = json_payload(bytes(value)) if isinstance(value, (bytes, bytearray)) else value
        if not isinstance(payload, dict):
            raise RequestError(400, "InvalidBody", 'A JSON body must be an object: {"data": "<base64 image>"}.')
        return [base64_payload(payload)], {name: payload.get(name, value) for name, value in options.items()}

    def encode(self, decoded: Decoded, task, scores, options: dict) -> tuple:
        """The task's answer for the request's one image: (JSON body, content type, headers)."""
        return task.postprocess(scores[0], options), JSON, {}

    def encode_explanation(self, decoded: Decoded, explanations: list) -> tuple:
        return compact(explanation_json(explanations[0])), JSON, {}

    def encode_error(self, error: RequestError) -> tuple:
        return {"code": error.status, "type": error.type, "message": error.message}, JSON
