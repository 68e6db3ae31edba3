"""Video classification (R3D, MC3, R(2+1)D, S3D, MViT, Swin3D): one clip per request -> the top-k
labels of the softmax probabilities averaged over its windows, as torchvision's video references
average a video's clips, with the number of windows:

    {"windows": 2, "frames": 40, "predictions": [{"label": "juggling balls", "index": 166, "probability": 0.61}, ...]}

"frames" are the frames sampled at the preset's frame rate, "windows" the model's forwards over
them (handlers/clips.py: how a clip is decoded, sampled and cut; its limits).
"""

from dataclasses import dataclass

import numpy as np
import torch

from handlers.clips import Clip
from handlers.tasks.classification import Classification

PARITY_TOLERANCE = 1e-4  # largest allowed |p_runtime - p_eager| of any averaged probability
WINDOWS_PER_FORWARD = 4  # windows of one clip stacked into one forward (bounds the activations' memory)


@dataclass
class ClipScores:
    """One clip's answer material: probabilities Tensor[n_labels] averaged over its windows, and how many."""

    probabilities: torch.Tensor
    windows: int


class VideoClassification:
    name = "video_classification"
    protocols = ("predictions", "v2", "v1")
    option_names = ("topk",)
    PARITY_TOLERANCE = PARITY_TOLERANCE
    parity_what = "averaged probabilities"

    def __init__(self, labels: list, keypoint_names: list = None):
        self.labels = list(labels)
        self.top = Classification(labels)  # top-k parsing and answers, as for images

    @staticmethod
    def inputs(items: list) -> list:
        """A request's items (one encoded clip, or its frames) -> the one Clip the model answers."""
        return [Clip(list(items))]

    @staticmethod
    def meta_example(preset) -> torch.Tensor:
        """One window on the meta device: Tensor[1, 3, clip_len, crop_h, crop_w]."""
        return torch.zeros(1, 3, preset.clip_len, *preset.crop, device="meta")

    @staticmethod
    def meta_forward(model, example):
        return model(example)

    def check_output(self, output) -> None:
        """Raises ValueError unless `output` (for one window) is one logit per label: (1, n_labels)."""
        self.top.check_output(output)

    def parse_options(self, raw: dict) -> dict:
        return {"topk": self.top.parse_topk(raw.get("topk"))}

    @staticmethod
    def batch(tensors: list) -> list:
        """Clips keep their own number of windows: a list of Tensor[windows, 3, clip_len, h, w]."""
        return list(tensors)

    @staticmethod
    def forward(runner, batch: list) -> list:
        """Logits Tensor[windows, n_labels] per clip, WINDOWS_PER_FORWARD windows a forward."""
        return [torch.cat([runner(clip[first:first + WINDOWS_PER_FORWARD])
                           for first in range(0, len(clip), WINDOWS_PER_FORWARD)]) for clip in batch]

    @staticmethod
    def scores(outputs: list) -> list:
        """Per clip, its windows' softmax probabilities averaged: a ClipScores."""
        return [ClipScores(torch.softmax(logits, dim=1).mean(dim=0), len(logits)) for logits in outputs]

    def parity_gap(self, outputs: list, reference: list) -> float:
        return max((ours.probabilities - theirs.probabilities).abs().max().item()
                   for ours, theirs in zip(self.scores(outputs), self.scores(reference), strict=True))

    def postprocess(self, scores: ClipScores, options: dict) -> dict:
        """One clip's scores -> its answer (see the module docstring); options["image_size"] is
        (frames sampled, windows) for a clip (handlers/clips.py)."""
        frames, _ = options["image_size"]
        return {"windows": scores.windows, "frames": frames,
                "predictions": self.top.postprocess(scores.probabilities, options)}

    def output_metadata(self) -> list:
        """Classification's tensors, and windows INT64 [N]."""
        return [*self.top.output_metadata(), {"name": "windows", "datatype": "INT64", "shape": [-1]}]

    def tensors(self, rows: list, options: dict) -> dict:
        """Classification's tensors of the averaged probabilities, and windows INT64 [N]."""
        probabilities = torch.stack([row.probabilities for row in rows])
        windows = np.array([row.windows for row in rows], dtype=np.int64)
        return {**self.top.tensors(probabilities, options), "windows": ("INT64", windows)}
