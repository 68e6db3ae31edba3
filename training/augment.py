"""Augmentation policies for training images: uint8 Tensor[3, 32, 32] in, the same out.

    photo   random 32x32 crop of the image padded by 4 (reflected) and a horizontal flip: for
            photos (CIFAR, image folders of objects). What `--augment` alone chooses.
    digits  for handwriting, so that neither polarity nor stroke width decides the answer: a
            small random rotation, shift and shrink (a digit drawn with margins on a big page
            still reads), strokes thickened or thinned by a 3x3 max or min filter, random ink
            and paper levels, and dark ink on a light page half of the time.

The digits policy expects images as the training scans show them (light ink on dark ground) and
is only ever applied in training: the served preprocessing stays the archive's plain preset.
All randomness comes from torch's global generator, so `--seed` repeats a run and `--resume`
carries on exactly.
"""

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from training.models import INPUT_SIZE

DIGITS_AFFINE = dict(degrees=10, translate=(0.1, 0.1), scale=(0.55, 1.05), shear=5)
LEVELS = dict(ink=(190, 255), paper=(0, 50))  # uint8 ranges the scans' 255 and 0 are mapped to


def photo() -> v2.Transform:
    return v2.Compose([v2.RandomCrop(INPUT_SIZE, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip()])


def uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


class StrokeWidth(torch.nn.Module):
    """Thickens (3x3 max filter) or thins (3x3 min filter) light strokes on a dark ground, each
    with probability `p`; otherwise leaves the image alone."""

    def __init__(self, p: float = 1 / 3):
        super().__init__()
        self.p = p

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        draw = torch.rand(()).item()
        if draw >= 2 * self.p:
            return image
        sign = 1.0 if draw < self.p else -1.0  # max filter thickens, min filter (= -max(-x)) thins
        pooled = sign * F.max_pool2d(sign * image.unsqueeze(0).float(), 3, stride=1, padding=1)
        return pooled[0].round().to(torch.uint8)


class InkLevels(torch.nn.Module):
    """Maps the ground (0) and full ink (255) to random levels: grey paper, faint or dark ink."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        paper, ink = uniform(*LEVELS["paper"]), uniform(*LEVELS["ink"])
        return (paper + image.float() * ((ink - paper) / 255.0)).round().clamp(0, 255).to(torch.uint8)


class RandomInvert(torch.nn.Module):
    """255 - image with probability `p`: light ink on dark becomes dark ink on light."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return 255 - image if torch.rand(()).item() < self.p else image


def digits() -> v2.Transform:
    return v2.Compose([v2.RandomAffine(**DIGITS_AFFINE, interpolation=v2.InterpolationMode.BILINEAR, fill=0),
                       StrokeWidth(), InkLevels(), RandomInvert()])


AUGMENTATIONS = {"photo": photo, "digits": digits}


def augmentation(policy: str):
    """The transform of `policy` (a key of AUGMENTATIONS), or None for no policy."""
    return None if policy in (None, "none") else AUGMENTATIONS[policy]()
