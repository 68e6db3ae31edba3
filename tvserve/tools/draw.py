"""A served answer drawn on its image (`tvserve predict --draw`): boxes with labels and scores,
instance masks, keypoints, or a semantic segmentation's classes, with torchvision's
draw_bounding_boxes / draw_segmentation_masks / draw_keypoints; a clip's frames with its labels;
an optical-flow pair's first image beside the flow's colours (flow_to_image, as served). The image is decoded as the
server decodes it (upright, RGB), so the answer's pixels land where they belong."""

import base64
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.transforms.functional import pil_to_tensor, resize, to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

from handlers.clips import container_of
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


STRIP_FRAMES, STRIP_HEIGHT = 4, 160  # a clip's drawing: this many frames, evenly spread, this tall (px)


def clip_strip(clip: bytes) -> torch.Tensor:
    """uint8 Tensor[3, STRIP_HEIGHT, w]: STRIP_FRAMES frames of an encoded clip side by side (or the
    frame itself, for a single image)."""
    if not container_of(clip):
        frames = pil_to_tensor(open_image(clip))[None]
    else:
        from torchcodec.decoders import VideoDecoder

        decoder = VideoDecoder(clip)
        count = len(decoder)
        frames = decoder.get_frames_at(sorted({i * (count - 1) // max(STRIP_FRAMES - 1, 1)
                                              for i in range(min(STRIP_FRAMES, count))})).data
    width = round(frames.shape[-1] * STRIP_HEIGHT / frames.shape[-2])
    return torch.cat(list(resize(frames, [STRIP_HEIGHT, width], antialias=True)), dim=-1)


def draw_clip(clip: bytes, answer: dict) -> torch.Tensor:
    """The clip's strip of frames with the answer's top labels (and its windows) written on it."""
    strip = to_pil_image(clip_strip(clip))
    lines = [f"{item['probability']:.3f} {item['label']}" for item in answer["predictions"][:3]]
    lines.append(f"{answer['windows']} window(s), {answer['frames']} frames")
    canvas = ImageDraw.Draw(strip)
    for row, line in enumerate(lines):
        canvas.text((4, 4 + 12 * row), line, fill="yellow", stroke_width=2, stroke_fill="black")
    return pil_to_tensor(strip)


def draw_flow(image: torch.Tensor, answer: dict) -> torch.Tensor:
    """The pair's first image beside the flow's colour picture (the answer's PNG), one row."""
    colours = pil_to_tensor(Image.open(io.BytesIO(base64.b64decode(answer["png"]))).convert("RGB"))
    return torch.cat([image, colours], dim=-1)


def draw(image_file: Path, answer, out: Path) -> Path:
    """Writes `image_file` with `answer` drawn on it to `out` (PNG or JPEG by its suffix); returns `out`.
    A clip (video classification) is drawn as a strip of its frames with its labels; an
    optical-flow pair as its first image beside the flow's colours."""
    data = Path(image_file).read_bytes()
    if isinstance(answer, dict) and "windows" in answer:
        return save(draw_clip(data, answer), out)
    image = pil_to_tensor(open_image(data))
    if isinstance(answer, dict) and "flow" in answer:
        image = draw_flow(image, answer)
    elif isinstance(answer, dict) and "png" in answer:
        masks, _ = semantic_masks(answer)
        image = draw_segmentation_masks(image, masks, alpha=ALPHA)
    elif isinstance(answer, list) and (not answer or "box" in answer[0]):
        image = draw_detections(image, answer)
    else:
        raise TvserveError("--draw draws detection, instance segmentation, keypoints, semantic segmentation, video "
                           "and optical-flow answers; this model answers with class probabilities.")
    return save(image, out)


def save(image: torch.Tensor, out: Path) -> Path:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    to_pil_image(image).save(out)
    return Path(out)


def describe(answer) -> list:
    """Text lines of one answer, whatever its task."""
    if isinstance(answer, dict) and "classes" in answer:
        return [f"  {100 * item['fraction']:5.1f}%  {item['label']} ({item['index']})" for item in answer["classes"]]
    if isinstance(answer, dict) and "windows" in answer:  # a clip
        return [*describe(answer["predictions"]), f"  ({answer['frames']} frames sampled, {answer['windows']} window(s))"]
    if isinstance(answer, dict) and "flow" in answer:
        field = np.frombuffer(base64.b64decode(answer["flow"]["data"]), "<f2").reshape(answer["flow"]["shape"])
        length = np.hypot(field[0].astype(np.float32), field[1].astype(np.float32))
        return [f"  flow {answer['size'][1]}x{answer['size'][0]}: mean motion {length.mean():.2f} px, "
                f"largest {length.max():.2f} px (float16 field and colour PNG in the answer)"]
    lines = []
    for item in answer:
        if "probability" in item:
            lines.append(f"  {item['probability']:.4f}  {item['label']} ({item['index']})")
            continue
        box = ", ".join(f"{x:.1f}" for x in item["box"])
        extra = " + mask" if "mask" in item else f" + {len(item['keypoints'])} keypoints" if "keypoints" in item else ""
        lines.append(f"  {item['score']:.4f}  {item['label']} ({item['index']})  [{box}]{extra}")
    return lines or ["  (nothing above the threshold)"]
