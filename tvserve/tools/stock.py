"""Stock TorchServe, for side-by-side comparisons: its own `image_classifier` handler, eager,
archived the stock way (torch-model-archiver, a model file with one class, the state_dict and an
index_to_name.json), served with TorchServe's defaults (only the ports moved to free loopback
ones and token auth off), or with one worker.

For the book's 32x32 models the handler is `image_classifier` with only `image_processing`
overridden, as TorchServe's MNIST example does.
"""

import json
import subprocess
import sys
from pathlib import Path

from tvserve.ops.properties import free_ports_config, write_properties

RESNET18_MODEL_FILE = '''
from torchvision.models.resnet import BasicBlock, ResNet


class ResNet18(ResNet):
    def __init__(self):
        super().__init__(BasicBlock, [2, 2, 2, 2])
'''

BOOK_MODEL_FILE = '''
from book_models import {arch} as Base


class BookModel(Base):
    def __init__(self):
        super().__init__(**{kwargs!r})
'''

SMALL_IMAGE_HANDLER = '''
from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class SmallImageClassifier(ImageClassifier):
    image_processing = transforms.Compose([
        transforms.Resize({size}),
        transforms.CenterCrop({size}),
        transforms.ToTensor(),
        transforms.Normalize({mean!r}, {std!r}),
    ])
'''


def archive_stock(folder: Path, name: str, *, model_file: str, weights: Path, labels: list,
                  handler: str = "image_classifier", extra_files=()) -> Path:
    """A stock .mar of `name` in folder/model_store; returns the model store."""
    folder, store = Path(folder), Path(folder) / "model_store"
    store.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(model_file)
    index = folder / "index_to_name.json"
    index.write_text(json.dumps({str(i): label for i, label in enumerate(labels)}))
    subprocess.run([
        str(Path(sys.executable).with_name("torch-model-archiver")), "--model-name", name, "--version", "1.0",
        "--model-file", str(folder / "model.py"), "--serialized-file", str(weights), "--handler", handler,
        "--extra-files", ",".join(map(str, [index, *extra_files])), "--export-path", str(store), "--force",
    ], check=True)
    return store


def archive_stock_resnet18(folder: Path, weights: Path, labels: list) -> Path:
    return archive_stock(folder, "resnet18", model_file=RESNET18_MODEL_FILE, weights=weights, labels=labels)


def archive_stock_book_model(folder: Path, checkpoint: dict, name: str) -> Path:
    """The book's model of a training checkpoint, with the MNIST example's kind of handler."""
    import torch

    import training.models

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "weights.pt"
    torch.save(checkpoint["state_dict"], weights)
    (folder / "book_models.py").write_text(Path(training.models.__file__).read_text())
    size = int(checkpoint["input_size"])
    handler = folder / "small_image_classifier.py"
    handler.write_text(SMALL_IMAGE_HANDLER.format(size=size, mean=list(checkpoint["mean"]), std=list(checkpoint["std"])))
    return archive_stock(folder, name, weights=weights, labels=list(checkpoint["classes"]), handler=str(handler),
                         model_file=BOOK_MODEL_FILE.format(arch=checkpoint["arch"], kwargs=dict(checkpoint["arch_args"])),
                         extra_files=[folder / "book_models.py"])


def stock_config(path: Path, workers: int = None) -> Path:
    """TorchServe's defaults on free loopback ports, token auth off; `workers` per model if given."""
    properties = {"disable_token_authorization": "true"}
    if workers:
        properties["default_workers_per_model"] = workers
    return free_ports_config(write_properties(path, properties), path)
