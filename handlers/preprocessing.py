"""The archive's preprocessing preset, turned into a `transforms.Compose`.

A preset is the plain dict recorded in an archive's `tvserve.json`:
    {"resize": 256, "crop": 224, "interpolation": "bilinear",
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
It holds what torchvision's `ImageClassification` preset holds, and the Compose below runs the
same functional ops in the same order, so a served tensor equals `weights.transforms()`'s. The
other tasks' presets leave steps out: `SemanticSegmentation` has no "crop" (resize, then
normalise), `ObjectDetection` neither "resize", "crop" nor "mean"/"std" (uint8 to float only).
The same steps also run on uint8 image tensors (`pil=False`: the tensor path of handlers/devices.py,
on the worker's device), as torchvision's presets do; there the resize is not PIL's, so the inputs
differ from PIL's by a few uint8 levels (measured in docs/gpu.md, "Decoding on the worker's device").
"""

import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode

INTERPOLATIONS = {mode.value: mode for mode in (
    InterpolationMode.NEAREST, InterpolationMode.BILINEAR, InterpolationMode.BICUBIC,
)}


def build_geometry(preset: dict, pil: bool = True) -> transforms.Compose:
    """PIL RGB image (or, with `pil=False`, Tensor[3, H, W] uint8 on any device) -> Tensor[3, crop,
    crop] uint8: the preset's resize and center crop, each where the preset has it (no crop:
    Tensor[3, H', W'] with the shorter side `resize`; neither: the image's own size)."""
    steps = []
    if preset.get("resize"):
        interpolation = preset.get("interpolation") or "bilinear"
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"Invalid interpolation {interpolation!r}. Only {', '.join(INTERPOLATIONS)} are supported."
            )
        steps.append(transforms.Resize(preset["resize"], interpolation=INTERPOLATIONS[interpolation], antialias=True))
    if preset.get("crop"):
        steps.append(transforms.CenterCrop(preset["crop"]))
    return transforms.Compose([*steps, transforms.PILToTensor()] if pil else steps)


def build_transform(preset: dict, pil: bool = True) -> transforms.Compose:
    """PIL RGB image (or, with `pil=False`, Tensor[3, H, W] uint8) -> Tensor[3, crop, crop] float32
    in [0, 1], normalised with the preset's mean/std where it has them (see build_geometry for the
    size), on the input's device."""
    normalise = [transforms.Normalize(preset["mean"], preset["std"])] if preset.get("mean") else []
    return transforms.Compose([
        *build_geometry(preset, pil).transforms,
        transforms.ConvertImageDtype(torch.float32),
        *normalise,
    ])
