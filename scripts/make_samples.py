"""Writes samples/: handwritten-style digits drawn as pen strokes (dark on a white page and light
on a dark one, thin and thick pens, small and large margins) and one downsized real photo.

    .venv/bin/python scripts/make_samples.py

The digits are drawn here from stroke paths, not taken from the training scans, so they test
what a person sends. The photo is scikit-learn's china.jpg (see samples/README.md).
"""

import math
from pathlib import Path

import numpy as np
import sklearn.datasets
import torch
from PIL import Image, ImageDraw, ImageFilter

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def arc(cx, cy, rx, ry, start_deg, end_deg, steps=24):
    """Points of an elliptical arc in the unit box (y down), from start to end angle in degrees."""
    return [(cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a)))
            for a in np.linspace(start_deg, end_deg, steps)]


# Each digit: strokes, each a list of (x, y) in a unit box, y pointing down, as a pen would go.
STROKES = {
    0: [arc(0.5, 0.5, 0.33, 0.46, -90, 275)],
    1: [[(0.3, 0.25), (0.55, 0.03), (0.55, 0.97)]],
    2: [arc(0.5, 0.3, 0.32, 0.26, 195, 380) + [(0.15, 0.95), (0.88, 0.95)]],
    3: [arc(0.47, 0.27, 0.3, 0.23, 210, 450) + arc(0.47, 0.73, 0.34, 0.24, -90, 150)],
    4: [[(0.62, 0.97), (0.62, 0.03), (0.1, 0.66), (0.9, 0.66)]],
    5: [[(0.85, 0.04), (0.27, 0.04), (0.22, 0.45)] + arc(0.48, 0.68, 0.33, 0.28, 235, 500)],
    7: [[(0.1, 0.05), (0.9, 0.05), (0.35, 0.97)]],
    9: [arc(0.5, 0.3, 0.3, 0.26, 0, 365), [(0.8, 0.32), (0.72, 0.97)]],
}

# (file name, digit, canvas px, pen px, margin as a fraction of the canvas, dark ink on white?)
DIGITS = [
    ("7-dark-on-white.png", 7, 280, 18, 0.15, True),
    ("3-dark-on-white-thin-pen.png", 3, 320, 9, 0.22, True),
    ("4-dark-on-white-big-margins.png", 4, 400, 20, 0.28, True),
    ("0-light-on-dark.png", 0, 240, 20, 0.12, False),
    ("2-light-on-dark-thick-pen.png", 2, 300, 30, 0.15, False),
    ("5-dark-on-white.png", 5, 260, 14, 0.15, True),
]


def draw_digit(digit: int, size: int, pen: int, margin: float, dark_on_white: bool, seed: int) -> Image.Image:
    """Grayscale Image of `size` x `size` px: the digit's strokes with a round pen `pen` px wide,
    in a box inset by `margin` * size (narrower than tall, as handwriting is), slightly wobbly."""
    rng = np.random.default_rng(seed)
    paper, ink = (250, 25) if dark_on_white else (15, 235)
    image = Image.new("L", (size, size), paper)
    draw = ImageDraw.Draw(image)
    top, height = margin * size, (1 - 2 * margin) * size
    left, width = (size - 0.7 * height) / 2, 0.7 * height
    for stroke in STROKES[digit]:
        points = [(left + width * x + rng.normal(0, size / 500), top + height * y + rng.normal(0, size / 500))
                  for x, y in stroke]
        draw.line(points, fill=ink, width=pen, joint="curve")
        for x, y in (points[0], points[-1]):  # round pen ends
            draw.ellipse((x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2), fill=ink)
    return image.filter(ImageFilter.GaussianBlur(0.8))


def write_photo(path: Path, width: int = 200) -> None:
    photo = Image.open(Path(sklearn.datasets.__file__).parent / "images" / "china.jpg")
    photo.resize((width, round(photo.height * width / photo.width)), Image.Resampling.LANCZOS).save(
        path, "JPEG", quality=80, optimize=True)


def write_pan(folder: Path, width: int = 192, height: int = 144, frames: int = 30, fps: int = 15) -> None:
    """pan.mp4: the photo panned 3 px right and 2 px down a frame (2 s at 15 fps, H.264), for video
    models; pan-1.png and pan-2.png: its first two frames, a pair for optical flow."""
    from torchcodec.encoders import VideoEncoder

    photo = Image.open(folder / "photo.jpg").convert("RGB")
    wide = np.asarray(photo.resize((width + 3 * frames, height + 2 * frames)))
    clip = torch.stack([torch.from_numpy(wide[2 * i:2 * i + height, 3 * i:3 * i + width].copy()).permute(2, 0, 1)
                        for i in range(frames)])
    VideoEncoder(clip, frame_rate=fps).to_file(str(folder / "pan.mp4"), crf=28)
    for number in (1, 2):
        Image.fromarray(clip[number - 1].permute(1, 2, 0).numpy()).save(folder / f"pan-{number}.png", optimize=True)


def main() -> None:
    SAMPLES.mkdir(exist_ok=True)
    for seed, (name, digit, size, pen, margin, dark_on_white) in enumerate(DIGITS):
        draw_digit(digit, size, pen, margin, dark_on_white, seed).save(SAMPLES / name, optimize=True)
    write_photo(SAMPLES / "photo.jpg")
    write_pan(SAMPLES)


if __name__ == "__main__":
    main()
