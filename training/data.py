"""Datasets for the 32x32 CNN family, as uint8 image tensors split into train and validation.

Each loader returns images as Tensor[N, 3, 32, 32] uint8 (what a served PNG decodes to) and
labels as Tensor[N] int64, so training sees exactly the pixels a client would send.

    digits            scikit-learn's bundled 8x8 handwritten digit scans (offline; the default)
    cifar10, cifar2   torchvision's CIFAR10 from --data-dir (downloaded when online); cifar2 is
                      the book's airplanes vs birds. Validation is CIFAR's own test batch.
    imagefolder:PATH  a folder of class sub-folders of images of any size, resized and
                      center-cropped to 32x32 exactly as the served archive's preset does
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.datasets import CIFAR10, ImageFolder

from handlers.errors import RequestError
from handlers.images import open_image
from handlers.preprocessing import build_geometry
from training.errors import DatasetError
from training.models import INPUT_SIZE

log = logging.getLogger(__name__)

PRESET = {"resize": INPUT_SIZE, "crop": INPUT_SIZE, "interpolation": "bilinear"}  # what archives record
CIFAR2_CLASSES = {0: "airplane", 2: "bird"}  # CIFAR-10 label -> name, as in the book


@dataclass
class Split:
    train_images: torch.Tensor  # [N, 3, 32, 32] uint8
    train_labels: torch.Tensor  # [N] int64
    val_images: torch.Tensor
    val_labels: torch.Tensor
    classes: list


def random_split(images, labels, classes, *, val_fraction: float, seed: int) -> Split:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(len(labels) * val_fraction)))
    val, train = order[:n_val], order[n_val:]
    return Split(images[train], labels[train], images[val], labels[val], classes)


def digits(*, val_fraction: float, seed: int, **_) -> Split:
    """scikit-learn's 1797 scans, scaled from 0..16 to 0..255 and resized from 8x8 to 32x32 RGB."""
    from sklearn.datasets import load_digits

    scans = load_digits()
    images = []
    for scan in scans.images:  # values 0..16, ink high
        gray = Image.fromarray((scan * (255.0 / 16.0)).round().astype(np.uint8))
        rgb = gray.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR).convert("RGB")
        images.append(TF.pil_to_tensor(rgb))
    classes = [str(name) for name in scans.target_names]
    labels = torch.as_tensor(scans.target, dtype=torch.int64)
    return random_split(torch.stack(images), labels, classes, val_fraction=val_fraction, seed=seed)


class CIFAR10Files(CIFAR10):
    """torchvision's CIFAR10 loader that checks the batch files exist, not their official md5:
    for a re-packed or custom dataset in CIFAR-10's on-disk format."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


def cifar_split(data_dir: Path, train: bool) -> CIFAR10:
    """One CIFAR-10 split from `data_dir`: verified, else as found, else downloaded."""
    try:
        return CIFAR10(data_dir, train=train)
    except RuntimeError:
        pass
    if (Path(data_dir) / CIFAR10.base_folder).is_dir():
        try:
            dataset = CIFAR10Files(data_dir, train=train)
        except RuntimeError as err:
            raise DatasetError(f"CIFAR-10 in {data_dir / CIFAR10.base_folder} is incomplete: {err}") from None
        log.warning("CIFAR-10 files in %s do not match the official checksums: using them as found",
                    data_dir / CIFAR10.base_folder)
        return dataset
    try:
        return CIFAR10(data_dir, train=train, download=True)
    except (OSError, RuntimeError) as err:
        raise DatasetError(
            f"CIFAR-10 is not in {Path(data_dir) / CIFAR10.base_folder} and could not be downloaded ({err}). "
            f"Download {CIFAR10.url}, extract it into {data_dir}, or pass --data-dir where it is."
        ) from None


def cifar_tensors(dataset: CIFAR10, keep: dict = None):
    """(uint8 images [N, 3, 32, 32], int64 labels) of a CIFAR split; `keep` maps label -> new label."""
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    if keep is None:
        return images, labels
    mask = torch.isin(labels, torch.as_tensor(list(keep)))
    remapped = torch.as_tensor([keep[int(label)] for label in labels[mask]], dtype=torch.int64)
    return images[mask], remapped


def cifar10(*, data_dir: Path, **_) -> Split:
    train, val = cifar_split(data_dir, True), cifar_split(data_dir, False)
    return Split(*cifar_tensors(train), *cifar_tensors(val), list(train.classes))


def cifar2(*, data_dir: Path, **_) -> Split:
    keep = {label: new for new, label in enumerate(CIFAR2_CLASSES)}
    train, val = cifar_split(data_dir, True), cifar_split(data_dir, False)
    return Split(*cifar_tensors(train, keep), *cifar_tensors(val, keep), list(CIFAR2_CLASSES.values()))


def decode_like_the_server(file) -> Image.Image:
    """The served handler's own decoding (formats, EXIF rotation, RGB conversion) of one file."""
    try:
        return open_image(Path(file).read_bytes())
    except RequestError as err:
        raise DatasetError(f"{file}: {err.message}") from None


def imagefolder(path: str, *, val_fraction: float, seed: int, **_) -> Split:
    """ROOT/<class>/<image>: any format and size, converted and cropped as served images are."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"No image folder at {root}: give imagefolder:PATH, with one sub-folder per class.")
    geometry = build_geometry(PRESET)
    folder = ImageFolder(root, loader=decode_like_the_server, is_valid_file=lambda file: not Path(file).name.startswith("."))
    images = torch.stack([geometry(image) for image, _ in folder])
    labels = torch.as_tensor(folder.targets, dtype=torch.int64)
    return random_split(images, labels, list(folder.classes), val_fraction=val_fraction, seed=seed)


DATASETS = {"digits": digits, "cifar10": cifar10, "cifar2": cifar2}


def load_dataset(name: str, *, data_dir: Path = Path("data"), val_fraction: float = 0.2, seed: int = 0) -> Split:
    """Dataset `name` (digits, cifar10, cifar2 or imagefolder:PATH), split into train and validation."""
    options = dict(data_dir=Path(data_dir), val_fraction=val_fraction, seed=seed)
    if name.startswith("imagefolder:"):
        return imagefolder(name.split(":", 1)[1], **options)
    if name not in DATASETS:
        raise DatasetError(f"Unknown dataset {name!r}. Choose one of: {', '.join(DATASETS)}, imagefolder:PATH.")
    return DATASETS[name](**options)


def channel_stats(images: torch.Tensor):
    """Per-channel mean and std of uint8 Tensor[N, 3, H, W], in [0, 1] units, as two lists."""
    pixels = images.permute(1, 0, 2, 3).reshape(3, -1).double() / 255.0
    return pixels.mean(dim=1).tolist(), pixels.std(dim=1).tolist()


def invert(images: torch.Tensor) -> torch.Tensor:
    """The other polarity (dark ink on a light page <-> light ink on dark) of uint8 Tensor[..., H, W]."""
    return 255 - images


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 Tensor[N, 3, H, W] -> float32, the same arithmetic as ToTensor() + Normalize()."""
    return TF.normalize(images.to(torch.float32).div(255), mean, std)
