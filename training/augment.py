"""Augmentation policies: each maps a batch of training images, uint8 Tensor[N, 3, H, W], to a
randomly altered batch of the same shape and dtype, each image drawn independently.

    photo   a random HxW crop of each image padded by 4 (reflected), flipped left-right half of
            the time: for photos (CIFAR, image folders of objects). What `--augment` alone is.
    digits  for handwriting, so that neither polarity nor stroke width decides the answer: a
            small random rotation, shear, shift, shrink and narrowing (a digit drawn with margins
            on a big page, or by a narrow hand, still reads), strokes thickened or thinned by a 3x3 max or min filter, random
            ink and paper levels, and dark ink on a light page half of the time.

The digits policy expects images as the training scans show them (light ink on a dark ground)
and is only applied in training: the served preprocessing stays the archive's plain preset.
Whole batches are transformed at once (a per-image loop costs more than the training itself on
a small CPU). All randomness comes from torch's global generator, so `--seed` repeats a run and
`--resume` carries on exactly.
"""

import torch
import torch.nn.functional as F

PHOTO_PADDING = 4  # pixels of reflected border the crop may shift into
DIGITS = {
    "degrees": 10.0,      # rotation, uniform in +-degrees
    "shear": 0.1,         # horizontal shear factor, uniform in +-shear (a slanted hand)
    "scale": (0.5, 1.05),  # digit size relative to the scans, which fill the frame
    "aspect": (0.6, 1.1),  # width relative to height, times the scans' (a narrow hand draws tall digits)
    "translate": 0.1,     # shift, uniform in +- this fraction of the width and of the height
    "stroke": 1 / 3,      # probability of thicker strokes, and of thinner ones
    "paper": (0, 50),     # uint8 level the scans' ground (0) is mapped to
    "ink": (190, 255),    # uint8 level the scans' full ink (255) is mapped to
    "invert": 0.5,        # probability of dark ink on a light page
}


def uniform(n: int, low: float, high: float) -> torch.Tensor:
    """Tensor[n] float32, uniform in [low, high)."""
    return low + (high - low) * torch.rand(n)


def photo(images: torch.Tensor) -> torch.Tensor:
    """Random crop after reflect padding, and a random horizontal flip, per image."""
    n, _, height, width = images.shape
    padded = F.pad(images.float(), [PHOTO_PADDING] * 4, mode="reflect")
    top = torch.randint(0, 2 * PHOTO_PADDING + 1, (n, 1))
    left = torch.randint(0, 2 * PHOTO_PADDING + 1, (n, 1))
    rows = (top + torch.arange(height))[:, None, :, None]   # [N, 1, H, 1]
    cols = (left + torch.arange(width))[:, None, None, :]   # [N, 1, 1, W]
    batch = torch.arange(n)[:, None, None, None]
    channels = torch.arange(images.shape[1])[None, :, None, None]
    cropped = padded[batch, channels, rows, cols]
    flip = torch.rand(n) < 0.5
    cropped[flip] = cropped[flip].flip(-1)
    return cropped.to(torch.uint8)


def random_affine(images: torch.Tensor) -> torch.Tensor:
    """float Tensor[N, C, H, W] rotated, sheared, scaled and shifted per image, ground filled with 0.
    The sampling grid maps output to input coordinates, so a scale s samples the input at 1/s."""
    n = images.shape[0]
    angle = torch.deg2rad(uniform(n, -DIGITS["degrees"], DIGITS["degrees"]))
    shear = uniform(n, -DIGITS["shear"], DIGITS["shear"])
    scale = uniform(n, *DIGITS["scale"])
    aspect = uniform(n, *DIGITS["aspect"])  # sampling at x / aspect draws the digit aspect times as wide
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos / aspect, -sin + shear * cos, uniform(n, -2, 2) * DIGITS["translate"]], dim=1),
                         torch.stack([sin / aspect, cos + shear * sin, uniform(n, -2, 2) * DIGITS["translate"]], dim=1)],
                        dim=1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def stroke_width(images: torch.Tensor) -> torch.Tensor:
    """float Tensor[N, C, H, W] of light strokes on a dark ground: per image, thickened by a 3x3
    max filter, thinned by a 3x3 min filter, or left alone."""
    draw = torch.rand(images.shape[0])[:, None, None, None]
    thick = F.max_pool2d(images, 3, stride=1, padding=1)
    thin = -F.max_pool2d(-images, 3, stride=1, padding=1)
    p = DIGITS["stroke"]
    return torch.where(draw < p, thick, torch.where(draw < 2 * p, thin, images))


def ink_levels(images: torch.Tensor) -> torch.Tensor:
    """float Tensor[N, C, H, W] in 0..255 with 0 and 255 mapped to random paper and ink levels."""
    n = images.shape[0]
    paper = uniform(n, *DIGITS["paper"])[:, None, None, None]
    ink = uniform(n, *DIGITS["ink"])[:, None, None, None]
    return paper + images * ((ink - paper) / 255.0)


def invert(images: torch.Tensor, p: float) -> torch.Tensor:
    """255 - image for each image with probability `p`."""
    flip = (torch.rand(images.shape[0]) < p)[:, None, None, None]
    return torch.where(flip, 255.0 - images, images)


def digits(images: torch.Tensor) -> torch.Tensor:
    """The handwriting policy (see the module's docstring) on uint8 Tensor[N, 3, H, W]."""
    out = ink_levels(stroke_width(random_affine(images.float())))
    return invert(out, DIGITS["invert"]).round().clamp(0, 255).to(torch.uint8)


AUGMENTATIONS = {"photo": photo, "digits": digits}


def augmentation(policy: str):
    """The batch transform of `policy` (a key of AUGMENTATIONS), or None for no policy."""
    return None if policy in (None, "none") else AUGMENTATIONS[policy]
