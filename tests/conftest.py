"""Shared fixtures: a short digits training run, archives built by the real CLI code, and one real
TorchServe on free loopback ports for the whole session (stopped with its workers at the end)."""

import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF

from training.data import load_dataset
from training.train import get_args_parser, main as train_main
from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_checkpoint, archive_torchvision
from tvserve.ops.properties import free_ports_config
from tvserve.ops.server import Server
from tvserve.tools.photos import PHOTOS  # noqa: F401 - the tests import it from here

from helpers import REPO
VIDEO, FLOW = "r3d_18", "raft_small"  # the cheapest video and optical-flow models
DIGITS_EPOCHS = 20  # with the digits augmentation: both polarities above 85% (tests/test_digits.py)


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("tvserve")


@pytest.fixture(scope="session")
def digits_run(work):
    """A short real training run of the book's Net on digits; returns its run folder."""
    out = work / "runs" / "digits"
    args = get_args_parser().parse_args(
        ["--model", "Net", "--dataset", "digits", "--augment", "digits", "--batch-size", "32",
         "--epochs", str(DIGITS_EPOCHS), "--out", str(out), "--quiet"]
    )
    train_main(args)
    return out


@pytest.fixture(scope="session")
def digit_files(work):
    """The held-out (validation) digits of the default split, as PNG files: [(path, label)]."""
    split = load_dataset("digits")
    folder = work / "digits"
    folder.mkdir()
    files = []
    for i, (image, label) in enumerate(zip(split.val_images, split.val_labels)):
        path = folder / f"{i:04d}_{int(label)}.png"
        TF.to_pil_image(image).save(path)
        files.append((path, int(label)))
    return files


@pytest.fixture(scope="session")
def resnet18_weights(work):
    """resnet18 with random weights saved as a state_dict file, so the real file path loads them."""
    torch.manual_seed(0)
    path = work / "resnet18-random.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def model_store(work, digits_run, resnet18_weights):
    store = work / "model_store"
    checkpoint = digits_run / "checkpoint.pt"
    # One worker each, as the fault tests expect (one PID to kill); backend and batching as `auto` decides.
    archive_checkpoint(checkpoint, options=ArchiveOptions(model_name="digits_net", export_path=store, workers=1))
    archive_checkpoint(checkpoint, options=ArchiveOptions(
        model_name="digits_batched", export_path=store, workers=1, batch_size=4, max_batch_delay=200))
    archive_torchvision("resnet18", weights_file=resnet18_weights, options=ArchiveOptions(export_path=store, workers=1))
    return store


@pytest.fixture(scope="session")
def server(work, model_store):
    config = free_ports_config(REPO / "config.properties", work / "config.properties")
    with Server(model_store=model_store, config=config, workdir=work / "server") as server:
        yield server



@pytest.fixture(scope="session")
def video_weights(work):
    """r3d_18's random weights, its classifier scaled up 20 times so that its top probabilities are
    apart (random ones are near-uniform, 0.0034-0.0038, and float noise could reorder the top-k)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(VIDEO, weights=None, num_classes=400)
    with torch.no_grad():
        model.fc.weight.mul_(20)
    path = work / f"{VIDEO}-random.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def flow_weights(work):
    """raft_small's random weights."""
    torch.manual_seed(0)
    path = work / f"{FLOW}-random.pth"
    torch.save(torchvision.models.get_model(FLOW, weights=None).state_dict(), path)
    return path
