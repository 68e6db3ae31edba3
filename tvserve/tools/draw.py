"""A served answer drawn on its image (`tvserve predict --draw`): boxes with labels and scores,
instance masks, keypoints, or a semantic segmentation's classes, with torchvision's
draw_bounding_boxes / draw_segmentation_masks / draw_keypoints. The image is decoded as the
server decodes it (upright, RGB), so the answer's pixels land where they belong."""

import base64
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

from handlers.images import open_image
from handlers.tasks.instance_segmentation import masks_of
from tvserve import TvserveError

ALPHA = 0.45  # how much of a mask's colour covers the image


def semantic_masks(answer: dict) -> tuple:
    """(Tensor[C, H, W] bool, one per class present, [label, ...]) from a semantic segmentation answer."""
    classes = torch.from_numpy(np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["png"])))).astype(np.int64))
    present = [item for item in answer["classes"] if item["fraction"] > 0]
    return torch.stack([classes == item["index"] for item in present]), [item["label"] for item in present]


def draw_detections(image: torch.Tensor, answer: list) -> torch.Tensor:
    """uint8 Tensor[3, H, W] with the answer's masks, boxes (label and score) and keypoints on it."""
    if not answer:
        return image
    if "mask" in answer[0]:
        image = draw_segmentation_masks(image, masks_of(answer), alpha=ALPHA)
    boxes = torch.tensor([item["box"] for item in answer])
    labels = [f"{item['label']} {item['score']:.2f}" for item in answer]
    image = draw_bounding_boxes(image, boxes, labels, colors="yellow", width=max(2, min(image.shape[1:]) // 200))
    if "keypoints" in answer[0]:
        points = torch.tensor([[[p["x"], p["y"]] for p in item["keypoints"]] for item in answer])
        image = draw_keypoints(image, points, colors="red", radius=max(2, min(image.shape[1:]) // 150))
    return image


def draw(image_file: Path, answer, out: Path) -> Path:
    """Writes `image_file` with `answer` drawn on it to `out` (PNG or JPEG by its suffix); returns `out`."""
    image = pil_to_tensor(open_image(Path(image_file).read_bytes()))
    if isinstance(answer, dict) and "png" in answer:
        masks, _ = semantic_masks(answer)
        image = draw_segmentation_masks(image, masks, alpha=ALPHA)
    elif isinstance(answer, list) and (not answer or "box" in answer[0]):
        image = draw_detections(image, answer)
    else:
        raise TvserveError("--draw draws detection, instance segmentation, keypoints and semantic segmentation "
                           "answers; this model answers with class probabilities.")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    to_pil_image(image).save(out)
    return Path(out)


def describe(answer) -> list:
    """Text lines of one answer, whatever its task."""
    if isinstance(answer, dict) and "classes" in answer:
        return [f"  {100 * item['fraction']:5.1f}%  {item['label']} ({item['index']})" for item in answer["classes"]]
    lines = []
    for item in answer:
        if "probability" in item:
            lines.append(f"  {item['probability']:.4f}  {item['label']} ({item['index']})")
            continue
        box = ", ".join(f"{x:.1f}" for x in item["box"])
        extra = " + mask" if "mask" in item else f" + {len(item['keypoints'])} keypoints" if "keypoints" in item else ""
        lines.append(f"  {item['score']:.4f}  {item['label']} ({item['index']})  [{box}]{extra}")
    return lines or ["  (nothing above the threshold)"]
