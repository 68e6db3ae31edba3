"""Explanations on the digits Net over all three routes: a heatmap in [0, 1] whose mass falls more
on the strokes than on the background."""

import base64

import numpy as np
import pytest
import requests
from PIL import Image

MODEL = "digits_net"


def explain(server, data: bytes, headers=None) -> dict:
    response = requests.post(f"{server.inference_url}/explanations/{MODEL}", data=data, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def stroke_mask(path, shape) -> np.ndarray:
    """The digit's ink (bright on dark), resized to the heatmap's grid."""
    ink = Image.open(path).convert("L").resize(shape[::-1], Image.BILINEAR)
    return np.asarray(ink, dtype=np.float32) / 255.0 > 0.5


def test_heatmaps_fall_more_on_the_strokes_than_on_the_background(server, digit_files):
    ratios = []
    for path, _ in digit_files[:10]:
        answer = explain(server, path.read_bytes())
        heatmap = np.array(answer["heatmap"], dtype=np.float32)
        assert list(heatmap.shape) == answer["shape"] and max(answer["shape"]) <= 32
        assert heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0)
        stroke = stroke_mask(path, heatmap.shape)
        ratios.append(heatmap[stroke].mean() / max(heatmap[~stroke].mean(), 1e-6))
    assert sum(ratio > 1 for ratio in ratios) >= 8, ratios
    assert np.median(ratios) > 1.5, ratios


def test_the_target_is_the_top1_or_the_one_asked_for(server, digit_files):
    data = digit_files[0][0].read_bytes()
    top1 = requests.post(f"{server.inference_url}/predictions/{MODEL}", data=data, timeout=30).json()[0]
    assert explain(server, data)["target"]["index"] == top1["index"]
    other = (top1["index"] + 1) % 10
    assert explain(server, data, {"X-Target": str(other)})["target"]["index"] == other
    refused = requests.post(f"{server.inference_url}/explanations/{MODEL}", data=data,
                            headers={"X-Target": "ten"}, timeout=30)
    assert refused.status_code == 400 and "target" in refused.json()["message"]


def test_kserve_v1_and_oip_explain_give_the_same_heatmap(server, digit_files):
    data = digit_files[1][0].read_bytes()
    reference = explain(server, data)
    v1 = requests.post(f"{server.inference_url}/v1/models/{MODEL}:explain",
                       json={"instances": [{"b64": base64.b64encode(data).decode()}]}, timeout=60)
    assert v1.status_code == 200 and v1.json()["explanations"] == [reference]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}]}
    v2 = requests.post(f"{server.inference_url}/v2/models/{MODEL}/explain", json=body, timeout=60)
    assert v2.status_code == 200, v2.text
    outputs = {output["name"]: output for output in v2.json()["outputs"]}
    assert outputs["heatmap"]["shape"] == [1, *reference["shape"]]
    assert outputs["target"]["data"] == [reference["target"]["index"]]
    heatmap = np.array(outputs["heatmap"]["data"]).reshape(reference["shape"])
    assert np.allclose(heatmap, reference["heatmap"], atol=1e-3)
