"""The default digits model reads digits as people send them: the shipped samples (drawn dark on
a white page and light on a dark one, thin and thick pens, small and large on the page) through
the live server, and the held-out scans in both polarities in-process."""

import re
from pathlib import Path

import pytest
import torch

from handlers.preprocessing import build_geometry
from helpers import REPO, post_image
from training.data import PRESET, decode_like_the_server, normalise
from training.models import build_model
from tvserve.tools.evaluate import evaluate

SAMPLES = REPO / "samples"
DIGIT_SAMPLES = sorted(SAMPLES.glob("[0-9]-*.png"))  # named DIGIT-description.png


def drawn_digit(path: Path) -> int:
    return int(path.name.split("-", 1)[0])


def test_samples_cover_both_polarities_and_a_photo():
    names = [path.name for path in DIGIT_SAMPLES]
    assert any("dark-on-white" in name for name in names) and any("light-on-dark" in name for name in names)
    assert (SAMPLES / "photo.jpg").read_bytes().startswith(b"\xff\xd8")
    assert all(path.stat().st_size < 10_000 for path in DIGIT_SAMPLES)
    assert sum(path.stat().st_size for path in SAMPLES.iterdir()) < 200_000  # the clip and frame pair included


def test_readme_first_requests_name_files_that_exist():
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("---", 1)[0]
    named = re.findall(r"curl -T (\S+)", quick_start) + re.findall(r"tvserve predict \S+ (\S+)", quick_start)
    assert len(named) >= 3
    for name in named:
        assert (REPO / name).is_file(), name


@pytest.mark.parametrize("path", DIGIT_SAMPLES, ids=lambda p: p.name)
def test_served_digits_net_reads_each_sample_as_drawn(server, path):
    response = post_image(server, "digits_net", path.read_bytes(), headers={"X-TopK": "3"})
    assert response.status_code == 200, response.text
    assert response.json()[0]["label"] == str(drawn_digit(path)), response.json()


def test_served_photo_sample_gets_a_top5(server):
    response = post_image(server, "resnet18", (SAMPLES / "photo.jpg").read_bytes())
    assert response.status_code == 200, response.text
    assert len(response.json()) == 5


def test_dark_on_light_digits_answered_in_process(digits_run):
    """The checkpoint alone, as the worker preprocesses: every dark-on-white sample is its digit."""
    checkpoint = torch.load(digits_run / "checkpoint.pt", weights_only=True)
    model = build_model(checkpoint["arch"], **checkpoint["arch_args"]).eval()
    model.load_state_dict(checkpoint["state_dict"])
    files = [path for path in DIGIT_SAMPLES if "dark-on-white" in path.name]
    geometry = build_geometry(PRESET)
    images = torch.stack([geometry(decode_like_the_server(path)) for path in files])
    with torch.inference_mode():
        predicted = model(normalise(images, checkpoint["mean"], checkpoint["std"])).argmax(dim=1)
    assert predicted.tolist() == [drawn_digit(path) for path in files]


def test_validation_accuracy_in_both_polarities(digits_run):
    (plain,) = evaluate(digits_run / "checkpoint.pt")
    (inverted,) = evaluate(digits_run / "checkpoint.pt", inverted=True)
    assert inverted["inverted"] and not plain["inverted"] and inverted["n"] == plain["n"] == 359
    # A model trained without --augment digits gets under 1% of the inverted scans right.
    assert plain["accuracy"] > 0.85 and inverted["accuracy"] > 0.85
