"""Datasets for the 32x32 CNN family, as uint8 image tensors split into train and validation.

Each loader returns images as Tensor[N, 3, 32, 32] uint8 (what a served PNG decodes to) and
labels as Tensor[N] int64, so training sees exactly the pixels a client would send.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from training.models import INPUT_SIZE


@dataclass
class Split:
    train_images: torch.Tensor  # [N, 3, 32, 32] uint8
    train_labels: torch.Tensor  # [N] int64
    val_images: torch.Tensor
    val_labels: torch.Tensor
    classes: list


def digits_as_images():
    """scikit-learn's bundled 8x8 handwritten digit scans (1797, no download), as RGB 32x32.

    Returns (Tensor[N, 3, 32, 32] uint8, Tensor[N] int64, class names "0".."9").
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for scan in digits.images:  # values 0..16, ink high
        gray = Image.fromarray((scan * (255.0 / 16.0)).round().astype(np.uint8))
        rgb = gray.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR).convert("RGB")
        images.append(TF.pil_to_tensor(rgb))
    classes = [str(name) for name in digits.target_names]
    return torch.stack(images), torch.as_tensor(digits.target, dtype=torch.int64), classes


DATASETS = {"digits": digits_as_images}


def load_dataset(name: str, *, val_fraction: float = 0.2, seed: int = 0) -> Split:
    """Loads dataset `name` and splits it at random (fixed by `seed`) into train and validation."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}. Choose one of: {', '.join(DATASETS)}.")
    images, labels, classes = DATASETS[name]()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(len(labels) * val_fraction)))
    val, train = order[:n_val], order[n_val:]
    return Split(images[train], labels[train], images[val], labels[val], classes)


def channel_stats(images: torch.Tensor):
    """Per-channel mean and std of uint8 Tensor[N, 3, H, W], in [0, 1] units, as two lists."""
    pixels = images.permute(1, 0, 2, 3).reshape(3, -1).double() / 255.0
    return pixels.mean(dim=1).tolist(), pixels.std(dim=1).tolist()


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 Tensor[N, 3, H, W] -> float32, the same arithmetic as ToTensor() + Normalize()."""
    return TF.normalize(images.to(torch.float32).div(255), mean, std)
