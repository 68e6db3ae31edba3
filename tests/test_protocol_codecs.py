"""The protocol codecs alone, with the classification task and no server: binary tensor data in
and out, and the choice of protocol per request."""

import json
import struct

import numpy as np
import pytest
import torch

from handlers.errors import RequestError
from handlers.protocols import PROTOCOLS, protocol_for
from handlers.protocols.open_inference import HEADER_LENGTH
from handlers.tasks.classification import Classification

TASK = Classification([f"c{i}" for i in range(4)])
V2 = PROTOCOLS["v2"]


def binary_request(images: list, outputs: list) -> tuple:
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                                   "parameters": {"binary_data_size": sum(4 + len(i) for i in images)}}],
                       "outputs": outputs, "parameters": {"topk": 2}}).encode()
    body = head + b"".join(struct.pack("<I", len(image)) + image for image in images)
    return {"body": body}, {HEADER_LENGTH: str(len(head)), "tvserve-protocol": "v2"}


def test_protocol_is_chosen_by_the_plugins_header():
    assert protocol_for({}).name == "predictions"
    assert protocol_for({"Tvserve-Protocol": "v2"}).name == "v2"
    assert protocol_for({"tvserve-protocol": "v1"}).name == "v1"


def test_binary_bytes_tensor_in_and_binary_outputs_out():
    outputs = [{"name": "indices", "parameters": {"binary_data": True}}, {"name": "labels"}]
    request, headers = binary_request([b"first", b"second!"], outputs)
    decoded = V2.decode(request, headers, TASK)
    assert decoded.images == [b"first", b"second!"] and decoded.options == {"topk": "2", "target": None}
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    body, content_type, response_headers = V2.encode(decoded, TASK, scores, TASK.parse_options(decoded.options))
    length = int(response_headers[HEADER_LENGTH])
    head = json.loads(body[:length])
    assert content_type == "application/octet-stream"
    assert [output["name"] for output in head["outputs"]] == ["indices", "labels"]
    assert head["outputs"][1]["data"] == ["c3", "c2", "c0", "c1"] and head["outputs"][1]["shape"] == [2, 2]
    indices = np.frombuffer(body[length:], dtype="<i8").reshape(head["outputs"][0]["shape"])
    assert indices.tolist() == [[3, 2], [0, 1]]


def test_a_cut_bytes_element_is_a_400():
    request, headers = binary_request([b"image"], [])
    request["body"] = request["body"][:-2]
    with pytest.raises(RequestError) as error:
        V2.decode(request, headers, TASK)
    assert error.value.status == 400 and "binary_data_size" in error.value.message
