"""The Open Inference Protocol v2 (KServe v2, Triton, MLServer) over REST, as tvserve's frontend
plugin forwards it (`tvserve-protocol: v2`).

Inputs (exactly one per request):
    image   BYTES [N] (or [N, 1]): encoded images; JSON data as base64 strings, or raw bytes with the
            binary tensor data extension (Inference-Header-Content-Length);
    pixels  UINT8 [H, W, 3] or [N, H, W, 3]: RGB pixels, resized and cropped like a photo.
Outputs: the task's tensors (classification: probabilities FP32 [N, classes], labels BYTES,
indices INT64, scores FP32 [N, k]); the request's `outputs` selects them (default: all but
probabilities) and each one's `parameters.binary_data` (or the request's `binary_data_output`)
sends it as binary data. `parameters` carries the task's options (topk).
`POST .../explain` (tvserve's extension) answers heatmap FP32 [N, h, w] in [0, 1] and target INT64 [N]
(`parameters.target`: a class index or label, default the top-1).
Errors: {"error": "..."} with the RequestError's status.
"""

import math
import struct

import numpy as np

from handlers.errors import RequestError
from handlers.protocols.common import (
    ACTION_HEADER, JSON, MODEL_HEADER, VERSION_HEADER, Decoded, body_bytes, compact, header, json_payload,
    strict_base64,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY = "application/octet-stream"
INPUTS = {"image": "BYTES", "pixels": "UINT8"}
NUMPY_TYPES = {"FP32": "<f4", "FP16": "<f2", "INT64": "<i8", "UINT8": "u1"}


def input_metadata() -> list:
    return [{"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]


def fail(message: str, type_: str = "InvalidTensor", status: int = 400):
    raise RequestError(status, type_, message)


def split_body(body: bytes, headers: dict) -> tuple:
    """(JSON header bytes, binary tensor data) per the binary tensor data extension."""
    length = header(headers, HEADER_LENGTH)
    if length is None:
        return body, b""
    if not length.strip().isdigit() or int(length) > len(body):
        fail(f"{HEADER_LENGTH} must be a whole number of bytes no larger than the body ({len(body)}), "
             f"got {length!r}.", "InvalidHeader")
    return body[:int(length)], body[int(length):]


def check_shape(tensor: dict) -> list:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                               for d in shape):
        fail(f"Input {tensor.get('name')!r}: shape must be a list of whole numbers >= 0, got {shape!r}.")
    return shape


def flat(data) -> list:
    """Row-major flattening of JSON tensor data (nested lists allowed, as the protocol says)."""
    if isinstance(data, list):
        return [item for element in data for item in flat(element)]
    return [data]


class Binary:
    """The binary part of a request, read tensor by tensor in the order of the JSON inputs."""

    def __init__(self, data: bytes):
        self.data, self.offset = data, 0

    def take(self, size, name: str) -> bytes:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or self.offset + size > len(self.data):
            fail(f"Input {name!r}: binary_data_size {size!r} does not fit the {len(self.data) - self.offset} "
                 "binary bytes left in the body.")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk


def bytes_elements(raw: bytes, name: str) -> list:
    """BYTES tensor binary data: each element a 4-byte little-endian length and its bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            fail(f"Input {name!r}: BYTES binary data is cut inside an element's 4-byte length.")
        (size,) = struct.unpack_from("<I", raw, offset)
        if offset + 4 + size > len(raw):
            fail(f"Input {name!r}: a BYTES element says {size} bytes but only {len(raw) - offset - 4} follow.")
        elements.append(raw[offset + 4:offset + 4 + size])
        offset += 4 + size
    return elements


def image_input(tensor: dict, raw) -> list:
    """`image` BYTES [N] or [N, 1] -> N encoded images."""
    shape = check_shape(tensor)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
        fail(f"Input 'image' must have shape [N] or [N, 1] with N >= 1 (one encoded image each), got {shape}.")
    if raw is not None:
        images = bytes_elements(raw, "image")
    else:
        images = [strict_base64(item, f"Input 'image' element {i}") for i, item in enumerate(flat(tensor["data"]))]
    if len(images) != shape[0]:
        fail(f"Input 'image' has shape {shape} but carries {len(images)} element(s).")
    return images


def pixels_input(tensor: dict, raw) -> list:
    """`pixels` UINT8 [H, W, 3] or [N, H, W, 3] -> N arrays [H, W, 3]."""
    shape = check_shape(tensor)
    if len(shape) not in (3, 4) or shape[-1] != 3 or 0 in shape:
        fail(f"Input 'pixels' must have shape [H, W, 3] or [N, H, W, 3] (RGB), got {shape}.")
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count:
            fail(f"Input 'pixels' of shape {shape} needs {count} bytes of binary data, got {len(raw)}.")
        array = np.frombuffer(raw, dtype=np.uint8)
    else:
        values = flat(tensor["data"])
        if len(values) != count:
            fail(f"Input 'pixels' has shape {shape} ({count} values) but carries {len(values)}.")
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values):
            fail("Input 'pixels' (UINT8) must hold whole numbers from 0 to 255.")
        array = np.asarray(values, dtype=np.uint8)
    array = array.reshape(shape if len(shape) == 4 else [1, *shape])
    return list(array)


def read_input(tensor, binary: Binary) -> list:
    if not isinstance(tensor, dict):
        fail("Each entry of \"inputs\" must be an object with name, datatype, shape and data.")
    name, datatype = tensor.get("name"), tensor.get("datatype")
    if name not in INPUTS:
        fail(f"Unknown input {name!r}: send one input, 'image' (BYTES, encoded images) or 'pixels' (UINT8 RGB).")
    if datatype != INPUTS[name]:
        fail(f"Input {name!r} must have datatype {INPUTS[name]}, got {datatype!r}.")
    options = tensor.get("parameters")
    size = options.get("binary_data_size") if isinstance(options, dict) else None
    if size is None and "data" not in tensor:
        fail(f"Input {name!r} has no \"data\" and no parameters.binary_data_size.")
    raw = binary.take(size, name) if size is not None else None
    return image_input(tensor, raw) if name == "image" else pixels_input(tensor, raw)


def requested_outputs(payload: dict, known: list) -> dict:
    """{output name: binary?} in the order asked; the default is every output but probabilities."""
    default_binary = bool(parameters(payload).get("binary_data_output", False))
    outputs = payload.get("outputs")
    if outputs is None:
        return {name: default_binary for name in known if name != "probabilities"}
    if not isinstance(outputs, list) or not all(isinstance(output, dict) and isinstance(output.get("name"), str)
                                                for output in outputs):
        fail('"outputs" must be a list of objects with a "name".', "InvalidBody")
    chosen = {}
    for output in outputs:
        if output["name"] not in known:
            fail(f"Unknown output {output['name']!r}; this model has {', '.join(known)}.", "InvalidBody")
        options = output.get("parameters") or {}
        binary = options.get("binary_data", default_binary) if isinstance(options, dict) else default_binary
        chosen[output["name"]] = bool(binary)
    return chosen


def parameters(payload: dict) -> dict:
    value = payload.get("parameters") or {}
    if not isinstance(value, dict):
        fail('"parameters" must be an object.', "InvalidBody")
    return value


def encode_tensor(name: str, datatype: str, array: np.ndarray, binary: bool) -> tuple:
    """(output JSON entry, binary bytes or b"")."""
    entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if datatype == "BYTES":
        items = [str(item).encode("utf-8") for item in array.reshape(-1)]
        raw = b"".join(struct.pack("<I", len(item)) + item for item in items)
        data = [item.decode("utf-8") for item in items]
    else:
        raw = np.ascontiguousarray(array, dtype=NUMPY_TYPES[datatype]).tobytes()
        data = array.reshape(-1).tolist()
    if binary:
        entry["parameters"] = {"binary_data_size": len(raw)}
        return entry, raw
    entry["data"] = data
    return entry, b""


class OpenInference:
    name = "v2"

    def decode(self, request: dict, headers: dict, task) -> Decoded:
        action = header(headers, ACTION_HEADER) or "infer"
        reply = {"model_name": header(headers, MODEL_HEADER), "model_version": header(headers, VERSION_HEADER)}
        if action == "metadata":
            return Decoded([], {}, action, reply)
        json_part, binary = split_body(body_bytes(request), headers)
        payload = json_payload(json_part)
        if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list) or len(payload["inputs"]) != 1:
            fail('The body must be an object with "inputs": a list of exactly one input, '
                 "'image' (BYTES) or 'pixels' (UINT8).", "InvalidBody")
        images = read_input(payload["inputs"][0], Binary(binary))
        if "id" in payload:
            reply["id"] = str(payload["id"])
        known = [spec["name"] for spec in task.output_metadata()]
        reply["outputs"] = requested_outputs(payload, known) if action != "explain" else \
            {"heatmap": bool(parameters(payload).get("binary_data_output", False))}
        options = {name: parameters(payload).get(name) for name in task.option_names}
        options = {name: None if value is None else str(value) for name, value in options.items()}
        return Decoded(images, options, action, reply)

    def metadata(self, decoded: Decoded, task) -> tuple:
        body = {"name": decoded.reply["model_name"], "versions": [decoded.reply["model_version"]],
                "platform": "pytorch_torchserve", "inputs": input_metadata(), "outputs": task.output_metadata()}
        return compact(body), JSON, {}

    def encode(self, decoded: Decoded, task, scores, options: dict) -> tuple:
        return self.encode_tensors(decoded, task.tensors(scores, options), decoded.reply["outputs"])

    def encode_explanation(self, decoded: Decoded, explanations: list) -> tuple:
        """Outputs heatmap FP32 [N, h, w] in [0, 1] and target INT64 [N] (the explained class)."""
        tensors = {"heatmap": ("FP32", np.stack([e["heatmap"].numpy() for e in explanations]).astype(np.float32)),
                   "target": ("INT64", np.array([e["target"]["index"] for e in explanations], dtype=np.int64))}
        binary = any(decoded.reply["outputs"].values())
        return self.encode_tensors(decoded, tensors, {name: binary for name in tensors})

    def encode_tensors(self, decoded: Decoded, tensors: dict, outputs: dict) -> tuple:
        """{name: (datatype, array)} -> the response, with `outputs` ({name: binary?}) in their order."""
        entries, chunks = [], []
        for name, binary in outputs.items():
            datatype, array = tensors[name]
            entry, raw = encode_tensor(name, datatype, array, binary)
            entries.append(entry)
            chunks.append(raw)
        body = {key: decoded.reply[key] for key in ("model_name", "model_version", "id") if key in decoded.reply}
        body["outputs"] = entries
        if not any(chunks):
            return compact(body), JSON, {}
        head = compact(body)
        return head + b"".join(chunks), BINARY, {HEADER_LENGTH: str(len(head))}

    def encode_error(self, error: RequestError) -> tuple:
        return compact({"error": error.message}), JSON
