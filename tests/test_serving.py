"""End to end: archives served by a real TorchServe answer like the same model in-process."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import PHOTOS
from helpers import post_image, served_probabilities
from training.data import normalise
from training.models import build_model
from handlers.tasks.classification import PARITY_TOLERANCE
from tvserve.archiving.weights import load_checkpoint


def resnet18_in_process(weights_file):
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(torch.load(weights_file, weights_only=True))
    return model.eval()


@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
def test_torchvision_parity_with_weights_transforms(server, resnet18_weights, photo):
    """Every probability within PARITY_TOLERANCE of weights.transforms() + the eager model in-process
    (the archive's backend is whichever `auto` chose), and the same labels for the top 5."""
    transform = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    batch = transform(Image.open(photo).convert("RGB")).unsqueeze(0)
    with torch.inference_mode():
        expected = torch.softmax(resnet18_in_process(resnet18_weights)(batch), dim=1)[0]
    served = served_probabilities(server, "resnet18", photo.read_bytes(), 1000)
    torch.testing.assert_close(served, expected, rtol=0, atol=PARITY_TOLERANCE)

    response = post_image(server, "resnet18", photo.read_bytes())
    categories = torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]
    assert [item["label"] for item in response.json()] == [categories[item["index"]] for item in response.json()]


def digits_in_process(digits_run, files):
    """Predicted class of each file by the checkpoint's model, preprocessed as in training."""
    checkpoint = load_checkpoint(digits_run / "checkpoint.pt")
    model = build_model(checkpoint["arch"], **checkpoint["arch_args"])
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    images = torch.stack([TF.pil_to_tensor(Image.open(path)) for path, _ in files])
    with torch.inference_mode():
        probabilities = torch.softmax(model(normalise(images, checkpoint["mean"], checkpoint["std"])), dim=1)
    return probabilities


def test_digits_served_like_in_process_and_accurate(server, digits_run, digit_files):
    expected = digits_in_process(digits_run, digit_files)
    served_top1, correct = [], 0
    with requests.Session() as session:
        for (path, label), row in zip(digit_files, expected):
            response = session.post(f"{server.inference_url}/predictions/digits_net", data=path.read_bytes(),
                                    headers={"X-TopK": "1"}, timeout=30)
            assert response.status_code == 200, response.text
            (top,) = response.json()
            served_top1.append(top["index"])
            assert top["probability"] == pytest.approx(row.max().item(), abs=PARITY_TOLERANCE)
            correct += top["index"] == label
    assert served_top1 == expected.argmax(dim=1).tolist()
    accuracy = correct / len(digit_files)
    assert accuracy > 0.90, f"served accuracy {accuracy:.3f} on {len(digit_files)} held-out digits"


def test_concurrent_requests_to_batched_model_get_their_own_answers(server, digits_run, digit_files):
    files = digit_files[:24]
    expected = digits_in_process(digits_run, files).argmax(dim=1).tolist()

    def top1(path):
        response = post_image(server, "digits_batched", path.read_bytes())
        assert response.status_code == 200, response.text
        return response.json()[0]["index"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        served = list(pool.map(top1, [path for path, _ in files]))
    assert served == expected
    description = requests.get(f"{server.management_url}/models/digits_batched", timeout=10).json()
    assert description[0]["batchSize"] == 4


def test_topk_settable_per_request(server, digit_files):
    path = digit_files[0][0]
    assert len(post_image(server, "digits_net", path.read_bytes()).json()) == 5  # default
    assert len(post_image(server, "digits_net", path.read_bytes(), headers={"X-TopK": "3"}).json()) == 3
    form = post_image(server, "digits_net", files={"file": path.read_bytes()}, data={"topk": "2"})
    assert len(form.json()) == 2
    probabilities = [item["probability"] for item in post_image(server, "digits_net", path.read_bytes(),
                                                                headers={"X-TopK": "10"}).json()]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)


def test_describe_served_model_returns_archive_metadata(server):
    response = requests.get(f"{server.management_url}/models/resnet18?customized=true", timeout=30)
    assert response.status_code == 200
    meta = response.json()[0]["customizedMetadata"]  # TorchServe parses the handler's JSON
    assert meta["source"] == "torchvision"
    assert meta["preset"] == {"resize": 256, "crop": 224, "interpolation": "bilinear",
                              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert meta["weights"]["origin"] == "file" and meta["weights"]["random_init"] is False
    assert len(meta["labels"]) == 1000
