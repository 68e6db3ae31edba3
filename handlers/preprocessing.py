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
A video preset (torchvision's `VideoClassification`) runs on uint8 frame tensors as torchvision's
does, in two halves: each frame's resize (no antialiasing) and crop as it is decoded
(video_geometry), then a window's normalisation (video_window); together they equal the weights'
`transforms()` on the whole clip (tests/test_video_flow.py).
"""

import torch
from torchvision import transforms
from torchvision.transforms import functional as F
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


def video_geometry(preset: dict):
    """Frames Tensor[T, 3, H, W] uint8 -> Tensor[T, 3, crop_h, crop_w] uint8: torchvision's
    VideoClassification resize (to [h, w], or the shorter side to [s]; bilinear without
    antialiasing, as the weights were trained) and center crop, frame by frame."""
    interpolation = INTERPOLATIONS[preset.get("interpolation") or "bilinear"]

    def geometry(frames: torch.Tensor) -> torch.Tensor:
        resized = F.resize(frames, list(preset["resize"]), interpolation=interpolation, antialias=False)
        return F.center_crop(resized, list(preset["crop"]))
    return geometry


def video_window(preset: dict):
    """One window of frames Tensor[T, 3, h, w] uint8 (video_geometry's) -> the model's input
    Tensor[3, T, h, w] float32, normalised with the preset's mean/std: VideoClassification's last steps."""
    def window(frames: torch.Tensor) -> torch.Tensor:
        normalised = F.normalize(F.convert_image_dtype(frames, torch.float), mean=preset["mean"], std=preset["std"])
        return normalised.permute(1, 0, 2, 3)
    return window
