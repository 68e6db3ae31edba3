"""The Open Inference Protocol v2 and KServe v1 against the session's real TorchServe, checked with
a client nobody here wrote (tritonclient[http]) and against /predictions' own answers."""

import base64
import io
import json

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from helpers import post_image

MODEL = "digits_net"
OUTPUTS = ("labels", "indices", "scores", "probabilities")


@pytest.fixture(scope="module")
def client(server):
    return triton.InferenceServerClient(server.inference_url.removeprefix("http://"))


@pytest.fixture(scope="module")
def digits(digit_files):
    """Three held-out digit PNGs: [(bytes, /predictions' top-3 answer)] is filled lazily by tests."""
    return [path.read_bytes() for path, _ in digit_files[:3]]


def expected(server, data: bytes, k: int) -> list:
    response = post_image(server, MODEL, data, headers={"X-TopK": str(k)})
    assert response.status_code == 200, response.text
    return response.json()


def image_input(images: list, binary: bool):
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    values = images if binary else [base64.b64encode(image) for image in images]
    tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=binary)
    return tensor


def test_health_readiness_and_metadata(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1.0")
    assert not client.is_model_ready(MODEL, "9.9") and not client.is_model_ready("no_such_model")
    metadata = client.get_model_metadata(MODEL, "1.0")
    assert metadata["name"] == MODEL and metadata["versions"] == ["1.0"]
    assert {(t["name"], t["datatype"]) for t in metadata["inputs"]} == {("image", "BYTES"), ("pixels", "UINT8")}
    shapes = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["outputs"]}
    assert shapes["probabilities"] == ("FP32", [-1, 10]) and shapes["indices"] == ("INT64", [-1, -1])
    server_metadata = requests.get(f"{server.inference_url}/v2", timeout=10).json()
    assert "binary_tensor_data" in server_metadata["extensions"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_answers_like_predictions_for_a_batch_of_images(client, server, digits, binary):
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]
    result = client.infer(MODEL, [image_input(digits, binary)], outputs=outputs, parameters={"topk": 3})
    labels, indices = result.as_numpy("labels"), result.as_numpy("indices")
    scores, probabilities = result.as_numpy("scores"), result.as_numpy("probabilities")
    assert labels.shape == indices.shape == scores.shape == (3, 3) and probabilities.shape == (3, 10)
    assert indices.dtype == np.int64 and scores.dtype == probabilities.dtype == np.float32
    for i, data in enumerate(digits):
        answer = expected(server, data, 3)
        assert indices[i].tolist() == [item["index"] for item in answer]
        assert [label.decode() if isinstance(label, bytes) else label for label in labels[i]] == \
            [item["label"] for item in answer]
        assert scores[i] == pytest.approx([item["probability"] for item in answer], abs=1e-6)
        assert probabilities[i, indices[i]] == pytest.approx(scores[i], abs=1e-7)


def test_pixels_answer_like_the_encoded_image(client, server, digits):
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in digits[:2]])
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    result = client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("scores"),
                                                    triton.InferRequestedOutput("indices")])
    for i, data in enumerate(digits[:2]):
        answer = expected(server, data, 5)
        assert result.as_numpy("indices")[i].tolist() == [item["index"] for item in answer]
        assert result.as_numpy("scores")[i] == pytest.approx([item["probability"] for item in answer], abs=1e-6)
    single = triton.InferInput("pixels", list(pixels.shape[1:]), "UINT8")
    single.set_data_from_numpy(pixels[0], binary_data=False)
    assert client.infer(MODEL, [single]).as_numpy("indices").shape == (1, 5)


def test_only_the_requested_outputs_come_back(client, digits):
    result = client.infer(MODEL, [image_input(digits[:1], True)], outputs=[triton.InferRequestedOutput("indices")])
    assert [output["name"] for output in result.get_response()["outputs"]] == ["indices"]


def oip(server, path, body=None, headers=None):
    url = f"{server.inference_url}/v2/models/{path}"
    if body is None:
        return requests.get(url, timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(url, data=data, headers=headers, timeout=30)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PNG = io.BytesIO()
Image.new("RGB", (8, 8), "white").save(PNG, "PNG")
PNG = PNG.getvalue()
GOOD = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(PNG)]}
MISTAKES = {  # name: (path, body, headers, status, words in the error)
    "wrong datatype": (f"{MODEL}/infer", {"inputs": [{**GOOD, "datatype": "FP32"}]}, None, 400, "datatype BYTES"),
    "wrong shape": (f"{MODEL}/infer", {"inputs": [{**GOOD, "shape": [2]}]}, None, 400, "shape [2]"),
    "pixels not RGB": (f"{MODEL}/infer", {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2, 2],
                                                      "data": [0] * 4}]}, None, 400, "[H, W, 3]"),
    "pixel out of range": (f"{MODEL}/infer", {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 3],
                                                          "data": [0, 256, 0]}]}, None, 400, "0 to 255"),
    "unknown input": (f"{MODEL}/infer", {"inputs": [{**GOOD, "name": "x"}]}, None, 400, "Unknown input"),
    "bad base64": (f"{MODEL}/infer", {"inputs": [{**GOOD, "data": ["@@@"]}]}, None, 400, "base64"),
    "not an image": (f"{MODEL}/infer", {"inputs": [{**GOOD, "data": [b64(b"hello")]}]}, None, 400, "not an image"),
    "bad topk": (f"{MODEL}/infer", {"inputs": [GOOD], "parameters": {"topk": 11}}, None, 400, "topk"),
    "unknown output": (f"{MODEL}/infer", {"inputs": [GOOD], "outputs": [{"name": "logits"}]}, None, 400, "logits"),
    "not JSON": (f"{MODEL}/infer", b"{", None, 400, "JSON"),
    "no inputs": (f"{MODEL}/infer", {"inputs": []}, None, 400, "exactly one"),
    "header length too big": (f"{MODEL}/infer", {"inputs": [GOOD]}, {"Inference-Header-Content-Length": "9999"},
                              400, "Inference-Header-Content-Length"),
    "binary size too big": (f"{MODEL}/infer",
                            {"inputs": [{**GOOD, "data": None, "parameters": {"binary_data_size": 99}}]},
                            None, 400, "binary_data_size"),
    "unknown model": ("nope/infer", {"inputs": [GOOD]}, None, 404, "served models: "),
    "unknown version": (f"{MODEL}/versions/7/infer", {"inputs": [GOOD]}, None, 404, "no version '7'"),
    "unknown action": (f"{MODEL}/predict", {"inputs": [GOOD]}, None, 404, "ready, infer or explain"),
    "metadata of unknown version": (f"{MODEL}/versions/7", None, None, 404, "versions: 1.0"),
}


@pytest.mark.parametrize("case", MISTAKES, ids=str)
def test_client_mistakes_get_a_4xx_that_says_what_is_wrong(server, case):
    path, body, headers, status, words = MISTAKES[case]
    if isinstance(body, dict) and body.get("inputs") and body["inputs"][0].get("data", 0) is None:
        del body["inputs"][0]["data"]
    response = oip(server, path, body, headers)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_one_bad_image_in_a_batch_is_named_by_its_index(server, digits):
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                        "data": [b64(digits[0]), b64(digits[1]), b64(b"GIF89a broken")]}]}
    response = oip(server, f"{MODEL}/infer", body)
    assert response.status_code == 400 and response.json()["error"].startswith("Image 2: ")


def test_readiness_is_false_while_a_model_has_no_ready_worker(server, client):
    url = f"{server.management_url}/models"
    response = requests.post(url, params={"url": "digits_net.mar", "model_name": "digits_idle",
                                          "initial_workers": 0}, timeout=60)
    assert response.status_code == 200, response.text
    try:  # its archive's model-config.yaml starts a worker: scale it to none
        scaled = requests.put(f"{url}/digits_idle", params={"min_worker": 0, "max_worker": 0, "synchronous": "true"},
                              timeout=60)
        assert scaled.status_code == 200, scaled.text
        assert not client.is_model_ready("digits_idle") and not client.is_server_ready()
        assert client.is_model_ready(MODEL)
    finally:
        requests.delete(f"{url}/digits_idle", timeout=60)
    assert client.is_server_ready()


def test_kserve_v1_predict_answers_like_predictions(server, digits):
    body = {"instances": [{"b64": b64(data)} for data in digits], "parameters": {"topk": 2}}
    response = requests.post(f"{server.inference_url}/v1/models/{MODEL}:predict", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == [expected(server, data, 2) for data in digits]
    status = requests.get(f"{server.inference_url}/v1/models/{MODEL}", timeout=10)
    assert status.status_code == 200 and status.json() == {"name": MODEL, "ready": True}


@pytest.mark.parametrize("body, status, words", [
    ({"instances": [{"b64": "@@"}]}, 400, "base64"),
    ({"instances": []}, 400, "instances"),
    ({"instances": [{"image": "x"}]}, 400, '"b64"'),
    ({"instances": [{"b64": b64(b"no image")}]}, 400, "not an image"),
], ids=["bad base64", "no instances", "not b64", "not an image"])
def test_kserve_v1_mistakes_get_a_4xx(server, body, status, words):
    response = requests.post(f"{server.inference_url}/v1/models/{MODEL}:predict", json=body, timeout=30)
    assert response.status_code == status and words in response.json()["error"]
    missing = requests.post(f"{server.inference_url}/v1/models/nope:predict", json=body, timeout=30)
    assert missing.status_code == 404 and "served models" in missing.json()["error"]


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_put_and_delete_get_a_405_that_names_the_protocols_routes(server, method):
    for path, routes in ((f"/v2/models/{MODEL}/infer", "the Open Inference Protocol: GET metadata, POST .../infer."),
                         (f"/v1/models/{MODEL}", "KServe v1: GET /v1/models/{model}, POST /v1/models/{model}:predict.")):
        response = requests.request(method, f"{server.inference_url}{path}", timeout=30)
        assert response.status_code == 405, (method, path, response.text)
        assert response.json() == {"error": f"{method} is not part of {routes}"}


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "PATCH"])
def test_methods_the_protocols_do_not_have_get_a_405_not_a_500(server, method):
    for path in ("/v2/health/live", f"/v2/models/{MODEL}/infer", f"/v1/models/{MODEL}"):
        response = requests.request(method, f"{server.inference_url}{path}", timeout=30)
        assert response.status_code == 405, (method, path, response.text)
