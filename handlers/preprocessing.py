"""The archive's preprocessing preset, turned into a `transforms.Compose`.

A preset is the plain dict recorded in an archive's `tvserve.json`:
    {"resize": 256, "crop": 224, "interpolation": "bilinear",
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
It holds what torchvision's `ImageClassification` preset holds, and the Compose below runs the
same functional ops in the same order, so a served tensor equals `weights.transforms()`'s.
"""

import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode

INTERPOLATIONS = {mode.value: mode for mode in (
    InterpolationMode.NEAREST, InterpolationMode.BILINEAR, InterpolationMode.BICUBIC,
)}


def build_geometry(preset: dict) -> transforms.Compose:
    """PIL RGB image -> Tensor[3, crop, crop] uint8: the preset's resize and center crop."""
    interpolation = preset.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"Invalid interpolation {interpolation!r}. Only {', '.join(INTERPOLATIONS)} are supported."
        )
    return transforms.Compose([
        transforms.Resize(preset["resize"], interpolation=INTERPOLATIONS[interpolation], antialias=True),
        transforms.CenterCrop(preset["crop"]),
        transforms.PILToTensor(),
    ])


def build_transform(preset: dict) -> transforms.Compose:
    """PIL RGB image -> Tensor[3, crop, crop] float32, normalised with the preset's mean/std."""
    return transforms.Compose([
        *build_geometry(preset).transforms,
        transforms.ConvertImageDtype(torch.float32),
        transforms.Normalize(preset["mean"], preset["std"]),
    ])
