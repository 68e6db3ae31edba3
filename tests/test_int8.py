"""int8 archives: calibrated on the user's images, their accuracy cost measured on the held-out
ones, recorded, shown by describe, refused below --min-agreement, and served over HTTP.

Agreement is measured on trained models only (the book's Net on digits and on an image folder);
resnet18's random weights say nothing about it and are archived for building and serving only."""

import json
import textwrap

import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageOps

from conftest import PHOTOS
from helpers import run_tvserve, served_probabilities, write_custom_model
from handlers.record import Backend, Record
from handlers.runtimes import Int8Recipe
from tvserve import TvserveError
from tvserve.archiving.calibration import split_files
from tvserve.archiving.mar import read_record
from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_checkpoint, archive_custom, archive_torchvision
from tvserve.ops import client
from tvserve.tools.inprocess import load_handler, probabilities
from training.train import get_args_parser, main as train_main

ACCURACY_POINTS = 0.005  # int8 within 0.5 points of fp32 over HTTP (the target)


@pytest.fixture(scope="module")
def digits_calibration(work, digit_files):
    """The held-out digit scans (never trained on), as scanned and inverted (the served model reads
    both polarities, so both set the activation ranges and both are measured), as an image folder of
    class sub-folders: 718 images, so that one image is 0.28 points of the held-out half."""
    folder = work / "int8" / "digits"
    for path, label in digit_files:
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        (folder / str(label) / path.name).symlink_to(path)
        ImageOps.invert(Image.open(path).convert("RGB")).save(folder / str(label) / f"inverted-{path.name}")
    return folder


COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def coloured_folder(root, per_class: int, seed: int):
    """Noisy coloured patches of any size, PNG and JPEG, in class sub-folders: a user's image folder."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            width, height = rng.integers(24, 90, size=2)
            pixels = np.clip(rng.normal(colour, 60, size=(height, width, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def folder_run(work):
    """The book's Net trained briefly on one image folder; (run folder, another folder of the same
    classes for calibration)."""
    base = work / "int8" / "colours"
    train_folder = coloured_folder(base / "train", per_class=40, seed=1)
    args = get_args_parser().parse_args(["--model", "Net", "--dataset", f"imagefolder:{train_folder}", "--epochs", "10",
                                         "--batch-size", "16", "--out", str(base / "run"), "--quiet"])
    train_main(args)
    return base / "run", coloured_folder(base / "calibration", per_class=50, seed=2)


def served_top1(server, model, files, n_classes) -> torch.Tensor:
    with requests.Session() as session:
        return torch.tensor([served_probabilities(server, model, path.read_bytes(), n_classes, session).argmax().item()
                             for path in files])


def check_int8_over_http(server, store, checkpoint, calibration, name, fp32_model):
    """Archives `checkpoint` in int8, serves it beside the fp32 archive `fp32_model` (registered
    when it is a path), and compares the two over HTTP on the held-out calibration images with
    what the int8 archive recorded."""
    int8 = archive_checkpoint(checkpoint, options=ArchiveOptions(
        model_name=f"{name}_int8", export_path=store, workers=1, batch_size=1, force=True, precision="int8", calibration=calibration))
    record = read_record(int8)
    cost = record.backend.quantization
    assert record.backend.precision == "int8" and record.backend.name == "onnxruntime_int8"
    assert cost.top1_agreement >= 0.99  # the agreement target, measured on the held-out split
    _, held_out, labels = split_files(calibration, record.labels)
    assert cost.held_out_images == len(held_out) and cost.calibration_images > 0
    labels, answers = torch.tensor(labels), {}
    for precision, mar in (("fp32", fp32_model), ("int8", int8)):
        model = mar if isinstance(mar, str) else mar.stem  # a model the server already serves, or an archive
        if not isinstance(mar, str):
            client.register(mar.name, management_url=server.management_url)
        try:
            answers[precision] = served_top1(server, model, held_out, len(record.labels))
        finally:
            if not isinstance(mar, str):
                client.unregister(model, "1.0", management_url=server.management_url)
    accuracy = {precision: (top1 == labels).float().mean().item() for precision, top1 in answers.items()}
    assert abs(accuracy["int8"] - accuracy["fp32"]) <= ACCURACY_POINTS, accuracy
    assert cost.accuracy_int8 == pytest.approx(accuracy["int8"], abs=1e-6)  # served as measured
    assert cost.accuracy_fp32 == pytest.approx(accuracy["fp32"], abs=1e-6)
    assert cost.top1_agreement == pytest.approx((answers["int8"] == answers["fp32"]).float().mean().item(), abs=1e-6)
    return cost


def test_int8_digits_net_serves_within_half_a_point_of_fp32(server, model_store, digits_run, digits_calibration):
    cost = check_int8_over_http(server, model_store, digits_run / "checkpoint.pt", digits_calibration, "digits",
                                fp32_model="digits_net")  # the session's fp32 archive of the same checkpoint
    assert cost.held_out_images >= 170  # about half of the 359 scans


def test_int8_image_folder_net_serves_within_half_a_point_of_fp32(server, model_store, folder_run):
    run, calibration = folder_run
    fp32 = archive_checkpoint(run / "checkpoint.pt", options=ArchiveOptions(
        model_name="colours_fp32", export_path=model_store, workers=1, batch_size=1, backend="onnxruntime"))
    check_int8_over_http(server, model_store, run / "checkpoint.pt", calibration, "colours", fp32_model=fp32)


def test_describe_shows_the_measured_cost(model_store, digits_run, digits_calibration, tmp_path):
    result = run_tvserve("archive", "checkpoint", digits_run / "checkpoint.pt", "--name", "digits_int8_cli",
                         "--export-path", tmp_path, "--workers", 1, "--batch-size", 1, "--backend", "onnxruntime_int8",
                         "--precision", "int8", "--calibration", digits_calibration)
    assert result.returncode == 0, result.stderr
    assert "int8: top-1 agreement with fp32" in result.stderr
    described = run_tvserve("describe", tmp_path / "digits_int8_cli.mar")
    assert described.returncode == 0, described.stderr
    backend = json.loads(described.stdout)["backend"]
    assert backend["precision"] == "int8" and backend["quantization"]["min_agreement"] == 0.99
    assert {c["name"] for c in backend["selection"]["candidates"]} == {"eager", "onnxruntime_int8"}
    assert "held-out images" in described.stderr and "accuracy fp32" in described.stderr
    record = read_record(tmp_path / "digits_int8_cli.mar")
    assert Record.from_json(record.to_json()) == record
    check_recipe_search(record.backend.quantization)


def check_recipe_search(cost):
    """Every recipe of both rounds was tried and measured, and the kept one agrees best (its
    agreement and probability change are the ones the archive records)."""
    tried = [row for row in cost.tried if "skipped" not in row]
    assert len(cost.tried) == 5 and len(tried) >= 1
    assert [row["method"] for row in cost.tried[:3]] == ["MinMax", "Percentile", "Entropy"]
    best = min(tried, key=lambda row: (-row["top1_agreement"], row["max_probability_change"]))
    assert {key: best[key] for key in cost.recipe} == cost.recipe
    assert best["top1_agreement"] == cost.top1_agreement  # measured again on the archive's own file
    assert best["max_probability_change"] == pytest.approx(cost.max_probability_change, abs=1e-5)
    round_two = [{key: row[key] for key in ("per_channel", "quant_format")} for row in cost.tried[3:]]
    assert round_two == [{"per_channel": False, "quant_format": "QOperator"}, {"per_channel": True, "quant_format": "QDQ"}]
    round_one_best = min(cost.tried[:3], key=lambda row: (-row["top1_agreement"], row["max_probability_change"]))
    assert {row["method"] for row in cost.tried[3:]} == {round_one_best["method"]}
    assert cost.method == Int8Recipe(**cost.recipe).describe()


def test_resnet18_int8_builds_and_serves_like_in_process(server, model_store, resnet18_weights, work):
    """Random weights: agreement means nothing (--min-agreement 0); unlabelled calibration images."""
    calibration = work / "int8" / "photos"
    calibration.mkdir(parents=True)
    for i, photo in enumerate(PHOTOS * 3):
        image = Image.open(photo).convert("RGB")
        image.crop((20 * i, 10 * i, image.width - 15 * i, image.height)).save(calibration / f"{i}.jpg")
    archive = archive_torchvision("resnet18", weights_file=resnet18_weights, options=ArchiveOptions(
        model_name="resnet18_int8", export_path=model_store, workers=1, batch_size=1, precision="int8",
        backend="onnxruntime_int8", calibration=calibration, min_agreement=0))
    cost = read_record(archive).backend.quantization
    assert (cost.calibration_images, cost.held_out_images, cost.accuracy_fp32) == (3, 3, None)
    check_recipe_search(cost)
    handler = load_handler(archive, work / "unpacked" / "resnet18_int8")
    assert handler.backend == "onnxruntime_int8"
    client.register(archive.name, management_url=server.management_url)
    try:
        data = PHOTOS[0].read_bytes()
        served = served_probabilities(server, "resnet18_int8", data, 1000)
        torch.testing.assert_close(served, probabilities(handler, data), rtol=0, atol=1e-6)
    finally:
        client.unregister("resnet18_int8", "1.0", management_url=server.management_url)


# Two logits a thousandth apart: fp32 tells them apart, 8 bits cannot (the archive must be refused).
NEAR_TIE_MODEL = textwrap.dedent('''
    import torch
    from torch import nn


    class NearTie(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, 2)
            with torch.no_grad():
                self.head.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [1.001, 1.001, 1.001]]))
                self.head.bias.zero_()

        def forward(self, x):
            return self.head(x.mean(dim=(2, 3)))
''')


def test_int8_below_the_agreement_threshold_is_refused_with_its_numbers(work, tmp_path):
    folder = work / "int8" / "near_tie"
    write_custom_model(folder, "model", NEAR_TIE_MODEL, "NearTie", ["a", "b"])
    calibration = tmp_path / "images"
    calibration.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(128, 256, (16, 16, 3), dtype=np.uint8)).save(calibration / f"{i}.png")
    with pytest.raises(TvserveError, match=r"int8 refused: top-1 agreement with fp32 .*% \(\d/4 held-out images\), "
                                           r"largest probability change .*below --min-agreement 0.99"):
        archive_custom(model_file=folder / "model.py", class_name="NearTie", weights=folder / "model.pt",
                       labels=folder / "labels.txt", resize=16, crop=16, mean="0,0,0", std="1,1,1",
                       options=ArchiveOptions(export_path=tmp_path, workers=1, batch_size=1, precision="int8",
                                              backend="onnxruntime_int8", calibration=calibration))
    assert not list(tmp_path.glob("*.mar*"))


@pytest.mark.parametrize("options, message", [
    (dict(precision="int8"), "--precision int8 needs --calibration DIR"),
    (dict(calibration="somewhere"), "--calibration is for --precision int8"),
    (dict(precision="int8", calibration="somewhere", min_agreement=99), "--min-agreement is a fraction"),
    (dict(precision="int8", calibration="somewhere", backend="onnxruntime"), "--backend onnxruntime runs in fp32"),
])
def test_inconsistent_precision_options_are_refused_before_any_work(options, message):
    with pytest.raises(TvserveError, match=message):
        ArchiveOptions(**options)


def test_a_calibration_mistake_is_one_line_from_the_cli(digits_run, tmp_path):
    result = run_tvserve("archive", "checkpoint", digits_run / "checkpoint.pt", "--export-path", tmp_path,
                         "--precision", "int8", "--calibration", tmp_path / "no-such-folder")
    assert result.returncode == 1 and "no-such-folder is not a folder" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert not list(tmp_path.glob("*.mar*"))


def test_records_without_a_precision_read_as_fp32():
    backend = Backend.from_dict({"name": "onnxruntime", "file": "model.onnx", "sha256": "0" * 64})
    assert backend.precision == "fp32" and backend.quantization is None
    assert "precision" in backend.to_dict() and "quantization" not in backend.to_dict()

