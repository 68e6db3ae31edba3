"""Where the work runs: the model on the worker's device (a GPU TorchServe assigned, else the CPU),
and decoding and preprocessing apart from it.

A preprocessor turns one image (encoded bytes, or RGB pixels uint8 [H, W, 3]) into the model's
input, Tensor[3, H, W] float32 (the preset's crop for classification; see
handlers/preprocessing.py), or raises a RequestError. Today's is PIL on the CPU (exact: equal to the
weights' own `transforms()`); a GPU one (nvJPEG batch decode, resize on the device) is one new class
registered in PREPROCESSORS and chosen by the record.
"""

import numpy as np
import torch

from handlers.images import open_image, open_pixels
from handlers.preprocessing import build_transform
from handlers.record import Preset


def model_device(gpu_id) -> str:
    """cuda:N when TorchServe gave this worker GPU `gpu_id` and torch sees one, else cpu."""
    return f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu"


class PilPreprocessing:
    """Decode with PIL (EXIF upright, RGB), then the preset's Compose, on this process's CPU."""

    name = "pil"

    def __init__(self, preset: Preset):
        self.transform = build_transform(preset.to_dict())
        # lossy, opt-in; only where the preset resizes (detection answers in the decoded image's pixels)
        self.draft_min_side = 2 * preset.resize if preset.jpeg_draft and preset.resize else None

    def decode(self, data):
        """Encoded image bytes, or RGB pixels uint8 [H, W, 3] -> an upright RGB PIL image."""
        if isinstance(data, np.ndarray):
            return open_pixels(data)
        return open_image(data, draft_min_side=self.draft_min_side)

    def __call__(self, data) -> torch.Tensor:
        """One image -> the model's input Tensor[3, H', W'] float32 (the handler times the two steps
        apart and also keeps the decoded image's size: TvserveHandler.preprocess_image)."""
        return self.transform(self.decode(data))


PREPROCESSORS = {PilPreprocessing.name: PilPreprocessing}
