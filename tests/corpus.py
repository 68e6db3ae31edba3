"""A generated corpus of real-world request bodies: accepted ones with the plain RGB image each
must answer like, and refused ones with the status and error type each must get.

The equivalent RGB image of each accepted case is computed here independently of the handler
where the conversion is exact (lossless formats, 16-bit scaling, EXIF rotation, palette
transparency); lossy or codec-defined conversions (JPEG, CMYK, GIF quantisation) use PIL's
decode of the same bytes.
"""

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from conftest import PHOTOS

WHITE = 255


@dataclass
class Case:
    name: str
    body: bytes = None  # raw body
    files: dict = None  # multipart upload instead of a raw body
    headers: dict = field(default_factory=dict)
    reference: Image.Image = None  # accepted: the plain RGB image it must answer like
    status: int = 200
    error_type: str = None  # refused: the JSON body's "type"


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def base_image() -> Image.Image:
    """A real photo, cut to 300x200 so every case stays small."""
    return Image.open(PHOTOS[0]).convert("RGB").resize((300, 200), Image.Resampling.BILINEAR)


def gradient_alpha(size) -> np.ndarray:
    width, height = size
    return np.tile(np.linspace(0, 255, width).round().astype(np.uint8), (height, 1))


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> Image.Image:
    """Alpha compositing over white, as the handler documents it, by PIL's own arithmetic."""
    rgba = Image.fromarray(np.dstack([rgb, alpha]))
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (WHITE,) * 4), rgba).convert("RGB")


def png_with_size(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header declares width x height (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def accepted_cases() -> list:
    rgb = base_image()
    pixels = np.asarray(rgb)
    gray = rgb.convert("L")
    cases = [
        Case("png-rgb", encode(rgb, "PNG"), reference=rgb),
        Case("webp-lossless", encode(rgb, "WEBP", lossless=True), reference=rgb),
        Case("bmp", encode(rgb, "BMP"), reference=rgb),
        Case("tiff", encode(rgb, "TIFF"), reference=rgb),
        Case("no-content-type", encode(rgb, "PNG"), headers={"Content-Type": ""}, reference=rgb),
        Case("wrong-content-type", encode(rgb, "PNG"), headers={"Content-Type": "text/plain"}, reference=rgb),
        Case("multipart", files={"file": ("photo.png", encode(rgb, "PNG"), "image/png")}, reference=rgb),
        Case("json-base64", json.dumps({"data": base64.b64encode(encode(rgb, "PNG")).decode()}).encode(),
             headers={"Content-Type": "application/json"}, reference=rgb),
        Case("gray-L", encode(gray, "PNG"), reference=gray.convert("RGB")),
        Case("bilevel-1", encode(rgb.convert("1"), "PNG"), reference=rgb.convert("1").convert("RGB")),
        Case("ycbcr-tiff", encode(rgb.convert("YCbCr"), "TIFF"), reference=rgb.convert("YCbCr").convert("RGB")),
    ]
    jpeg = encode(rgb, "JPEG", quality=90)
    cases.append(Case("jpeg", jpeg, reference=decoded(jpeg)))
    cmyk = encode(rgb.convert("CMYK"), "JPEG", quality=90)
    cases.append(Case("cmyk-jpeg", cmyk, reference=decoded(cmyk)))

    alpha = gradient_alpha(rgb.size)
    cases.append(Case("rgba-png", encode(Image.fromarray(np.dstack([pixels, alpha])), "PNG"),
                      reference=on_white(pixels, alpha)))
    gray_pixels = np.asarray(gray)
    cases.append(Case("la-png", encode(Image.fromarray(np.dstack([gray_pixels, alpha])), "PNG"),
                      reference=on_white(np.dstack([gray_pixels] * 3), alpha)))

    palette = rgb.quantize(64)
    indices = np.asarray(palette)
    transparent = int(indices[0, 0])
    palette.info["transparency"] = transparent
    colours = np.asarray(palette.getpalette()[:3 * 64], dtype=np.uint8).reshape(-1, 3)
    expected = colours[indices].copy()
    expected[indices == transparent] = WHITE
    cases.append(Case("palette-transparency", encode(palette, "PNG", transparency=transparent),
                      reference=Image.fromarray(expected)))

    noise = np.random.default_rng(0).integers(0, 100, gray_pixels.shape)
    sixteen = gray_pixels.astype(np.int32) * 257 + noise  # rounds back to the 8-bit gray exactly
    cases.append(Case("gray-16bit-png", encode(Image.fromarray(sixteen.astype(np.uint16)), "PNG"),
                      reference=gray.convert("RGB")))
    cases.append(Case("gray-32bit-tiff", encode(Image.fromarray(sixteen.astype(np.int32)), "TIFF"),
                      reference=gray.convert("RGB")))

    frames = [rgb.quantize(256), rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT).quantize(256)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    cases.append(Case("animated-gif-first-frame", gif, reference=frames[0].convert("RGB")))

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    stored = rgb.transpose(Image.Transpose.ROTATE_90)  # what a phone writes for that tag
    cases.append(Case("exif-rotated-png", encode(stored, "PNG", exif=exif), reference=rgb))
    rotated_jpeg = encode(stored, "JPEG", quality=95, exif=exif)
    cases.append(Case("exif-rotated-jpeg", rotated_jpeg,
                      reference=decoded(rotated_jpeg).transpose(Image.Transpose.ROTATE_270)))
    return cases


def refused_cases() -> list:
    png = encode(base_image(), "PNG")
    jpeg = encode(base_image(), "JPEG")
    corrupt_png = bytearray(png)
    corrupt_png[len(png) // 2:len(png) // 2 + 40] = b"\xff" * 40  # inside the pixel data
    return [
        Case("empty-body", b"", status=400, error_type="EmptyBody"),
        Case("text-body", b"hello, this is not an image", headers={"Content-Type": "text/plain"},
             status=400, error_type="UnsupportedImage"),
        Case("random-bytes", bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)),
             status=400, error_type="UnsupportedImage"),
        Case("truncated-jpeg", jpeg[: len(jpeg) // 2], status=400, error_type="CorruptImage"),
        Case("truncated-png", png[: len(png) // 2], status=400, error_type="CorruptImage"),
        Case("corrupt-png", bytes(corrupt_png), status=400, error_type="CorruptImage"),
        Case("unsupported-ico", encode(base_image().resize((32, 32)), "ICO"), status=400,
             error_type="UnsupportedImage"),
        Case("unsupported-ppm", encode(base_image(), "PPM"), status=400, error_type="UnsupportedImage"),
        Case("bomb-30000x30000", png_with_size(30000, 30000), status=413, error_type="ImageTooLarge"),
        Case("over-limit-10000x6000", png_with_size(10000, 6000), status=413, error_type="ImageTooLarge"),
        Case("malformed-json", b'{"data": "abc"', headers={"Content-Type": "application/json"},
             status=400, error_type="InvalidJSON"),
        Case("json-without-data", b'{"image": "abc"}', headers={"Content-Type": "application/json"},
             status=400, error_type="InvalidBody"),
        Case("invalid-base64", b'{"data": "iVBOR!!w0KGgo="}', headers={"Content-Type": "application/json"},
             status=400, error_type="InvalidBase64"),
        Case("base64-of-garbage", json.dumps({"data": base64.b64encode(b"garbage").decode()}).encode(),
             status=400, error_type="UnsupportedImage"),
    ] + [
        Case(f"topk-{value}", png, headers={"X-TopK": value}, status=400, error_type="InvalidParameter")
        for value in ("0", "-1", "1001", "abc", "2.5", "")
    ]
