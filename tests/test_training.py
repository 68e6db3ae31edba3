"""Training: the book's whole family on digits, CIFAR and image folders, with checkpoints that
load safely, repeat exactly and serve without edits."""

import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from handlers.preprocessing import build_geometry
from helpers import REPO, post_image, run_tvserve
from training.augment import augmentation, invert, photo, stroke_width
from training.data import CIFAR10Files, DatasetError, PRESET, decode_like_the_server, load_dataset, normalise
from training.errors import TrainingError
from training.models import ARCHITECTURES, build_model
from training.train import RECIPES, fill_defaults, get_args_parser, main as train_main
from handlers.tasks.classification import PARITY_TOLERANCE
from tvserve import TvserveError
from tvserve.archiving.defaults import prepare_default_archives
from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_checkpoint
from tvserve.ops import client


def test_checkpoint_is_a_plain_dict_loadable_with_weights_only(digits_run):
    checkpoint = torch.load(digits_run / "checkpoint.pt", weights_only=True)
    assert checkpoint["arch"] == "Net" and checkpoint["arch_args"] == {"n_classes": 10}
    assert checkpoint["classes"] == [str(i) for i in range(10)]
    assert checkpoint["input_size"] == 32
    assert len(checkpoint["mean"]) == 3 and len(checkpoint["std"]) == 3
    assert all(0 < s < 1 for s in checkpoint["std"])
    assert checkpoint["metrics"]["val_accuracy"] > 0.9
    model = build_model(checkpoint["arch"], **checkpoint["arch_args"])
    model.load_state_dict(checkpoint["state_dict"], strict=True)


def test_metrics_record_every_epoch_and_the_best(digits_run):
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == list(range(1, len(metrics["epochs"]) + 1))
    best = max(row["val_accuracy"] for row in metrics["epochs"])
    assert metrics["best"]["val_accuracy"] == best
    checkpoint = torch.load(digits_run / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == metrics["best"]["epoch"]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_takes_any_batch_size(arch):
    model = build_model(arch, n_classes=3).eval()
    for batch in (1, 5):
        assert model(torch.zeros(batch, 3, 32, 32)).shape == (batch, 3)


def test_unknown_architecture_lists_the_choices():
    with pytest.raises(ValueError, match="Choose one of: Net, NetWidth"):
        build_model("ResNet9000")


COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def train(out, *extra):
    args = get_args_parser().parse_args(["--out", str(out), "--quiet", *map(str, extra)])
    return train_main(args)


@pytest.fixture(scope="module")
def image_folder(work):
    """Three classes of noisy coloured shapes, any sizes, PNG and JPEG: a user's own folder."""
    root = work / "imagefolder"
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(16):
            width, height = rng.integers(24, 90, size=2)
            pixels = np.clip(rng.normal(colour, 40, size=(height, width, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def in_process_probabilities(checkpoint, files):
    model = build_model(checkpoint["arch"], **checkpoint["arch_args"])
    model.load_state_dict(checkpoint["state_dict"])
    geometry = build_geometry(PRESET)
    images = torch.stack([geometry(decode_like_the_server(path)) for path in files])
    batch = normalise(images, checkpoint["mean"], checkpoint["std"])
    with torch.inference_mode():
        eval_out = torch.softmax(model.eval()(batch), dim=1)
        train_out = torch.softmax(model.train()(batch), dim=1)
    return eval_out, train_out


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_trains_on_an_image_folder_and_serves_in_eval_mode(
        arch, image_folder, work, server, model_store):
    run = work / "family" / arch
    # Long enough for every architecture to learn the colours (a run at chance keeps no checkpoint).
    train(run, "--model", arch, "--dataset", f"imagefolder:{image_folder}", "--epochs", 15, "--augment",
          "--n-chans1", 16, "--n-blocks", 2, "--batch-size", 8)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["arch"] == arch and checkpoint["classes"] == ["blue", "green", "red"]
    name = f"family_{arch.lower()}"
    archive = archive_checkpoint(run / "checkpoint.pt", options=ArchiveOptions(model_name=name, export_path=model_store))
    files = sorted(image_folder.glob("*/*"))[::4]
    eval_out, train_out = in_process_probabilities(checkpoint, files)
    client.register(archive.name, management_url=server.management_url)
    try:
        for path, expected in zip(files, eval_out):
            response = post_image(server, name, path.read_bytes(), headers={"X-TopK": "3"})
            assert response.status_code == 200, response.text
            served = torch.zeros(3)
            for item in response.json():
                served[item["index"]] = item["probability"]
            torch.testing.assert_close(served, expected, rtol=0, atol=PARITY_TOLERANCE)
    finally:
        client.unregister(name, "1.0", management_url=server.management_url)
    if arch in ("NetDropout", "NetBatchNorm", "NetResDeep"):  # train mode would answer otherwise
        assert not torch.allclose(train_out, eval_out, atol=1e-3)


def test_same_seed_same_data_gives_identical_checkpoints(tmp_path, image_folder):
    for run in ("a", "b"):
        train(tmp_path / run, "--model", "NetDropout", "--dataset", f"imagefolder:{image_folder}",
              "--epochs", 2, "--augment", "--seed", 7, "--batch-size", 8)
    a, b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("a", "b"))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    train(tmp_path / "c", "--model", "NetDropout", "--dataset", f"imagefolder:{image_folder}",
          "--epochs", 2, "--augment", "--seed", 8, "--batch-size", 8)
    c = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)
    assert not torch.equal(a["state_dict"]["fc2.weight"], c["state_dict"]["fc2.weight"])


def test_resume_continues_exactly_where_it_stopped(tmp_path, image_folder):
    common = ["--model", "NetBatchNorm", "--dataset", f"imagefolder:{image_folder}", "--augment",
              "--batch-size", 8, "--n-chans1", 8]
    train(tmp_path / "straight", *common, "--epochs", 3)
    train(tmp_path / "resumed", *common, "--epochs", 1)
    train(tmp_path / "resumed", *common, "--epochs", 3, "--resume")
    straight, resumed = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("straight", "resumed"))
    for key in straight["model"]:
        assert torch.equal(straight["model"][key], resumed["model"][key]), key
    assert [row["val_loss"] for row in straight["history"]] == [row["val_loss"] for row in resumed["history"]]


@pytest.mark.parametrize("mode", ["optimizer", "loss"])
def test_weight_decay_either_way_shrinks_the_weights(tmp_path, mode):
    def weight_norm(run):
        state = torch.load(run / "last.pt", weights_only=True)["model"]
        return sum(t.pow(2).sum() for k, t in state.items() if k.endswith("weight")).item()

    train(tmp_path / "plain", "--epochs", 2)
    train(tmp_path / mode, "--epochs", 2, "--weight-decay", 0.01, "--l2-mode", mode)
    assert weight_norm(tmp_path / mode) < 0.95 * weight_norm(tmp_path / "plain")


def test_run_folder_has_metrics_and_a_curves_plot(digits_run):
    png = (digits_run / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == (1000, 400)


def write_tiny_cifar(root, per_batch=60, seed=0):
    """A small dataset in CIFAR-10's on-disk format (pickled batches of 3072-byte rows), whose
    images get brighter with the class index (so a short run learns and is not refused as chance)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        noise = rng.integers(0, 64, (per_batch, 3072))
        data = np.minimum(noise + 25 * np.asarray(labels)[:, None], 255).astype(np.uint8)
        with open(folder / batch, "wb") as stream:
            pickle.dump({"data": data, "labels": labels, "batch_label": batch}, stream)
    with open(folder / "batches.meta", "wb") as stream:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch}, stream)
    return labels


def test_cifar2_runs_through_torchvisions_loader_offline(tmp_path):
    write_tiny_cifar(tmp_path)
    split = load_dataset("cifar2", data_dir=tmp_path)
    full = CIFAR10Files(tmp_path, train=True)
    expected = sum(label in (0, 2) for label in full.targets)
    assert split.classes == ["airplane", "bird"] and len(split.train_labels) == expected
    assert set(split.train_labels.tolist()) <= {0, 1}
    first = next(i for i, label in enumerate(full.targets) if label in (0, 2))
    assert torch.equal(split.train_images[0], torch.from_numpy(full.data[first]).permute(2, 0, 1))
    best = train(tmp_path / "run", "--model", "NetBatchNorm", "--dataset", "cifar2", "--data-dir", tmp_path,
                 "--epochs", 5, "--n-chans1", 8, "--batch-size", 8)
    assert best["val_accuracy"] > 0.9
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["classes"] == ["airplane", "bird"] and checkpoint["arch_args"]["n_classes"] == 2


def test_cifar_offline_without_data_says_where_to_put_it(tmp_path, monkeypatch):
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    with pytest.raises(DatasetError) as error:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(error.value)
    assert "cifar-10-python.tar.gz" in str(error.value)


def test_evaluate_in_process_and_served_agree(server, digits_run):
    result = run_tvserve("evaluate", digits_run / "checkpoint.pt", "--url", server.inference_url,
                         "--model", "digits_net", "--json")
    assert result.returncode == 0, result.stderr
    local, served = json.loads(result.stdout)
    assert local["confusion_matrix"] == served["confusion_matrix"]
    assert local["accuracy"] == served["accuracy"] > 0.9
    assert sum(map(sum, local["confusion_matrix"])) == local["n"]


def run_training_script(*args, cwd=REPO):
    """`python -m training.train ARGS...` as a user runs it; returns the CompletedProcess (text)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "training.train", "--quiet", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def one_line_error(result) -> str:
    """The one `error: ...` line a failed run ends with (after any per-epoch log lines)."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    return errors[0]


def test_run_folder_defaults_to_model_and_dataset(tmp_path):
    parser = get_args_parser()
    assert str(fill_defaults(parser.parse_args(["--model", "NetResDeep", "--dataset", "cifar2"])).out) == \
        "runs/NetResDeep-cifar2"
    assert str(fill_defaults(parser.parse_args(["--dataset", f"imagefolder:{tmp_path / 'my photos'}"])).out) == \
        "runs/Net-imagefolder-my_photos"
    result = run_training_script("--model", "Net", "--epochs", 1, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "Net-digits" / "checkpoint.pt").is_file()
    assert not (tmp_path / "runs" / "digits_net").exists()


def test_resume_without_last_pt_says_so_in_one_line(tmp_path):
    line = one_line_error(run_training_script("--out", tmp_path / "never", "--resume"))
    assert str(tmp_path / "never" / "last.pt") in line and "Nothing to resume" in line


def test_recipes_fill_what_the_flags_leave_out():
    parser = get_args_parser()
    assert fill_defaults(parser.parse_args(["--model", "NetResDeep"])).lr == RECIPES["NetResDeep"]["lr"] == 3e-3
    assert fill_defaults(parser.parse_args(["--model", "Net"])).lr == 1e-2
    given = fill_defaults(parser.parse_args(["--model", "NetResDeep", "--lr", "0.05", "--momentum", "0"]))
    assert (given.lr, given.momentum) == (0.05, 0.0)


def test_netresdeep_learns_with_its_defaults(tmp_path):
    best = train(tmp_path / "deep", "--model", "NetResDeep", "--epochs", 3)
    assert best["val_accuracy"] > 0.8
    checkpoint = torch.load(tmp_path / "deep" / "checkpoint.pt", weights_only=True)
    assert checkpoint["recipe"]["lr"] == 3e-3 and checkpoint["recipe"]["momentum"] == 0.9


def test_a_run_at_chance_fails_in_one_line_and_keeps_no_checkpoint(tmp_path):
    line = one_line_error(run_training_script("--out", tmp_path / "still", "--epochs", 1, "--lr", 0))
    assert "did not learn" in line and "most common class" in line and "try --lr 0.01 (Net's recipe)" in line
    assert not (tmp_path / "still" / "checkpoint.pt").exists()
    assert "did not learn" in json.loads((tmp_path / "still" / "metrics.json").read_text())["error"]


def test_a_diverging_run_fails_in_one_line_and_keeps_no_checkpoint(tmp_path):
    with pytest.raises(TrainingError, match=r"diverged at epoch 1 .*try --lr 0.01 \(NetDepth's recipe\)") as error:
        train(tmp_path / "blown", "--model", "NetDepth", "--n-chans1", 8, "--epochs", 1, "--lr", 1e4)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "blown" / "checkpoint.pt").exists()


def test_digits_policy_inverts_and_changes_stroke_width():
    scans = load_dataset("digits").train_images[:200]
    torch.manual_seed(0)
    assert torch.equal(invert(scans.float(), p=1.0), 255.0 - scans.float())
    assert torch.equal(invert(scans.float(), p=0.0), scans.float())
    widths = stroke_width(scans.float())  # each scan thicker, thinner or as it was
    ink = lambda images: (images > 128).flatten(1).sum(dim=1)
    assert (ink(widths) > ink(scans)).any() and (ink(widths) < ink(scans)).any() and (ink(widths) == ink(scans)).any()
    batch = augmentation("digits")(scans)
    assert batch.shape == scans.shape and batch.dtype == torch.uint8
    light_page = (batch[:, 0, 0, 0] > 128).float().mean()
    assert 0.35 < light_page < 0.65  # dark ink on a light page about half of the time
    assert augmentation(None) is None


def test_photo_policy_crops_and_flips_each_image_on_its_own():
    """Each output is one 32x32 window of its image reflect-padded by 4, flipped or not, and the
    images of one batch get different windows."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    out = photo(images)
    padded = torch.nn.functional.pad(images.float(), [4] * 4, mode="reflect").to(torch.uint8)
    found = set()
    for image, result in zip(padded, out):
        windows = {(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)
                   if torch.equal(result, (lambda w: w.flip(-1) if flip else w)(image[:, top:top + 32, left:left + 32]))}
        assert len(windows) == 1
        found |= windows
    assert len(found) > 6 and {flip for _, _, flip in found} == {False, True}


def test_augment_flag_alone_is_the_photo_policy():
    parser = get_args_parser()
    assert parser.parse_args(["--augment"]).augment == "photo"
    assert parser.parse_args(["--augment", "--seed", "3"]).augment == "photo"
    assert parser.parse_args(["--augment", "digits"]).augment == "digits"
    assert parser.parse_args([]).augment is None


def test_prepare_refuses_a_run_that_is_not_net_on_digits(tmp_path):
    run = tmp_path / "runs" / "digits_net"
    run.mkdir(parents=True)
    torch.save({"arch": "NetResDeep", "dataset": "cifar2"}, run / "checkpoint.pt")
    with pytest.raises(TvserveError, match="holds NetResDeep trained on cifar2, not Net on digits: move"):
        prepare_default_archives(model_store=tmp_path / "store", runs=tmp_path / "runs")
    assert not (tmp_path / "store" / "digits_net.mar").exists()
