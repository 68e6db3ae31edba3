"""Object detection (Faster R-CNN, FCOS, RetinaNet, SSD, SSDlite): a list of images of their own
sizes -> per image its detections, most confident first:

    [{"label": "dog", "index": 18, "score": 0.97, "box": [x1, y1, x2, y2]}, ...]

Boxes are in the pixels of the image as sent (after its EXIF orientation): the weights' preset only
converts to float, and the model's own transform resizes and maps its boxes back. Per request,
`threshold` (the least score answered, default 0.5) and `max_detections` (default 100) filter the
model's own output; the model keeps at most its own number of detections above its own score floor
(e.g. Faster R-CNN: 100 above 0.05), so a lower threshold or a larger count cannot add any.
Instance segmentation and keypoints (their own modules) answer the same with a mask or keypoints.
"""

import math

import torch

from handlers.errors import RequestError
from handlers.tasks.classification import as_text

DEFAULT_THRESHOLD = 0.5
DEFAULT_MAX_DETECTIONS = 100
MAX_DETECTIONS_LIMIT = 1000
PARITY_TOLERANCE = 1e-4  # largest allowed |difference| of any box coordinate (px) or score
META_IMAGE = (3, 480, 640)  # the meta-device check's image: the model's transform resizes it anyway


def parse_threshold(raw) -> float:
    """A score from 0 to 1 (default DEFAULT_THRESHOLD)."""
    if raw is None:
        return DEFAULT_THRESHOLD
    text = as_text(raw).strip()
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise RequestError(400, "InvalidParameter", f"threshold must be a number from 0 to 1, got {text!r}.")
    return value


def parse_max_detections(raw) -> int:
    """A whole number from 1 to MAX_DETECTIONS_LIMIT (default DEFAULT_MAX_DETECTIONS)."""
    if raw is None:
        return DEFAULT_MAX_DETECTIONS
    text = as_text(raw).strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_DETECTIONS_LIMIT:
        raise RequestError(400, "InvalidParameter",
                           f"max_detections must be a whole number from 1 to {MAX_DETECTIONS_LIMIT}, got {text!r}.")
    return int(text)


def class_head_size(model) -> int:
    """How many classes the detector's head scores (background included where it has one)."""
    if hasattr(model, "roi_heads"):  # Faster / Mask / Keypoint R-CNN
        return model.roi_heads.box_predictor.cls_score.out_features
    head = model.head.classification_head  # RetinaNet and FCOS: num_classes; SSD: num_columns
    return getattr(head, "num_classes", None) or head.num_columns


def max_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


class Detection:
    name = "detection"
    protocols = ("predictions",)  # answered as /predictions JSON only (the tensor protocols carry classification)
    option_names = ("threshold", "max_detections")
    PARITY_TOLERANCE = PARITY_TOLERANCE
    parity_what = "boxes or scores"

    def __init__(self, labels: list, keypoint_names: list = None):
        self.labels = list(labels)

    @staticmethod
    def meta_example(preset) -> list:
        return [torch.zeros(*META_IMAGE, device="meta")]

    def meta_forward(self, model, images: list) -> dict:
        """What can run on the meta device: the model's own transform and its backbone (proposal
        filtering and NMS need real values); then the head's sizes, {"classes": n, ...}."""
        batched, _ = model.transform(images)
        model.backbone(batched.tensors)
        return self.head_sizes(model)

    @staticmethod
    def head_sizes(model) -> dict:
        return {"classes": class_head_size(model)}

    def check_output(self, sizes: dict) -> None:
        """Raises ValueError unless the head scores one class per label."""
        if sizes["classes"] != len(self.labels):
            raise ValueError(f"The detector's head scores {sizes['classes']} classes, but there are "
                             f"{len(self.labels)} labels: give one label per class, background included.")

    def parse_options(self, raw: dict) -> dict:
        return {"threshold": parse_threshold(raw.get("threshold")),
                "max_detections": parse_max_detections(raw.get("max_detections"))}

    @staticmethod
    def batch(tensors: list) -> list:
        """Images keep their own sizes: the model takes a list of Tensor[3, H, W]."""
        return list(tensors)

    @staticmethod
    def forward(runner, batch: list) -> list:
        """One forward per image: an R-CNN's transform pads a batch to its largest image, which
        moves its proposals, so an answer would depend on its batch-mates. On a CPU a batch saves
        little (the archive's sizing measures it, see tvserve/archiving/tuning.py)."""
        return [runner([image])[0] for image in batch]

    @staticmethod
    def scores(outputs: list) -> list:
        """One dict per image: boxes Tensor[K, 4] (x1, y1, x2, y2 px), labels Tensor[K], scores Tensor[K]."""
        return outputs

    def parity_gap(self, outputs: list, reference: list) -> float:
        """Largest |difference| of any box coordinate or score between two runs on the same images;
        infinite where they detect other labels, or (instance segmentation) other mask pixels."""
        gaps = [0.0]
        for ours, theirs in zip(outputs, reference, strict=True):
            if ours["labels"].tolist() != theirs["labels"].tolist():
                return math.inf
            gaps += [max_gap(ours[key], theirs[key]) for key in ("boxes", "scores", "keypoints", "keypoints_scores")
                     if key in ours]
            if "masks" in ours and not torch.equal(binary_masks(ours), binary_masks(theirs)):
                return math.inf
        return max(gaps)

    def kept(self, output: dict, options: dict) -> torch.Tensor:
        """Indices of the detections answered: score >= threshold, most confident first, at most
        max_detections."""
        scores = output["scores"]
        order = torch.argsort(scores, descending=True, stable=True)
        order = order[scores[order] >= options["threshold"]]
        return order[:options["max_detections"]]

    def postprocess(self, output: dict, options: dict) -> list:
        """One image's detections -> its answer (see the module docstring)."""
        return [self.item(output, index, options) for index in self.kept(output, options).tolist()]

    def item(self, output: dict, index: int, options: dict) -> dict:
        label = int(output["labels"][index])
        return {"label": self.labels[label], "index": label, "score": float(output["scores"][index]),
                "box": [float(x) for x in output["boxes"][index]]}


MASK_THRESHOLD = 0.5  # a pixel belongs to an instance where its mask probability is above this


def binary_masks(output: dict) -> torch.Tensor:
    """Mask R-CNN's masks Tensor[K, 1, H, W] of probabilities -> Tensor[K, H, W] bool."""
    return output["masks"][:, 0] > MASK_THRESHOLD
