"""Semantic segmentation (DeepLabV3, FCN, LR-ASPP): each pixel's most likely class.

    {"size": [height, width], "png": "<base64 PNG>",
     "classes": [{"label": "dog", "index": 12, "fraction": 0.31}, ...]}

The PNG is one channel (8-bit, 16-bit past 256 classes) of class indices at the size of the image
as sent (after its EXIF orientation); "classes" are the classes present, by the fraction of the
image's pixels they cover, largest first. The weights' preset resizes the image (shorter side 520);
the model's "out" logits at that size give each pixel's class (argmax), and that map is resized to
the image's size by nearest neighbour (upsampling 21 logits to a 12 MP photo would take 1 GB).
The body stays small: the class map is piecewise constant, and PNG's row filters and deflate
take it down to a few bytes per row of the model's map (measured in docs/performance.md, "Per-task latency").
"""

import base64
import io

import numpy as np
import torch
from PIL import Image

PARITY_TOLERANCE = 0.0  # class maps must be identical


def class_png(class_map: np.ndarray) -> bytes:
    """Class indices array[H, W] -> PNG bytes (mode L up to 256 classes, else I;16)."""
    image = Image.fromarray(class_map.astype(np.uint8 if class_map.max(initial=0) < 256 else np.uint16))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=6)
    return buffer.getvalue()


def to_image_size(class_map: torch.Tensor, size: tuple) -> torch.Tensor:
    """Class indices Tensor[h, w] at the model's size -> Tensor[H, W] at `size` (height, width),
    nearest neighbour (torch's "nearest", as in torch.nn.functional.interpolate)."""
    resized = torch.nn.functional.interpolate(class_map[None, None].float(), size=tuple(size), mode="nearest")
    return resized[0, 0].to(torch.int64)


class SemanticSegmentation:
    name = "semantic_segmentation"
    protocols = ("predictions",)  # answered as /predictions JSON only (the tensor protocols carry classification)
    option_names = ()
    PARITY_TOLERANCE = PARITY_TOLERANCE
    parity_what = "class maps"

    def __init__(self, labels: list, keypoint_names: list = None):
        self.labels = list(labels)

    @staticmethod
    def meta_example(preset) -> torch.Tensor:
        """A 4:3 image after the preset's resize, on the meta device: Tensor[1, 3, resize, resize * 4/3]."""
        return torch.zeros(1, 3, preset.resize, preset.resize * 4 // 3, device="meta")

    @staticmethod
    def meta_forward(model, example):
        return model(example)

    def check_output(self, output) -> None:
        """Raises ValueError unless output["out"] holds one logit map per label: (1, n_labels, h, w)."""
        out = output.get("out") if isinstance(output, dict) else None
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[1] != len(self.labels):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(output).__name__
            raise ValueError(f"The model gives {shape} for one image and {len(self.labels)} labels: it must give "
                             "{'out': logits of shape (1, n_labels, h, w)}.")

    def parse_options(self, raw: dict) -> dict:
        return {}

    @staticmethod
    def batch(tensors: list) -> list:
        """Resized images keep their aspect ratios (no crop): one Tensor[3, h, w] each."""
        return list(tensors)

    @staticmethod
    def forward(runner, batch: list) -> list:
        """One forward per image (their sizes differ; padding would change the border pixels):
        logits Tensor[n_labels, h, w] each."""
        return [runner(image.unsqueeze(0))["out"][0] for image in batch]

    @staticmethod
    def scores(outputs: list) -> list:
        """Logits -> class indices Tensor[h, w] (int64) at the model's size, per image."""
        return [logits.argmax(dim=0) for logits in outputs]

    def parity_gap(self, outputs: list, reference: list) -> float:
        """The fraction of pixels whose class differs between two runs on the same images."""
        return max((ours != theirs).float().mean().item()
                   for ours, theirs in zip(self.scores(outputs), self.scores(reference), strict=True))

    def postprocess(self, class_map: torch.Tensor, options: dict) -> dict:
        """One image's class map at the model's size -> its answer, at options["image_size"]."""
        full = to_image_size(class_map, options["image_size"])
        counts = torch.bincount(full.flatten(), minlength=len(self.labels))
        present = [index for index in torch.argsort(counts, descending=True, stable=True).tolist() if counts[index]]
        return {"size": list(full.shape), "png": base64.b64encode(class_png(full.numpy())).decode("ascii"),
                "classes": [{"label": self.labels[index], "index": index, "fraction": counts[index].item() / full.numel()}
                            for index in present]}
