"""Turns one TorchServe request into an RGB PIL image and its options, or a client error.

Accepted bodies: raw image bytes (any or no Content-Type; the format is read from the bytes),
a multipart/form-data file field, or JSON {"data": "<base64>"} (strict base64).
Accepted formats: JPEG, PNG, WebP, BMP, GIF (first frame), TIFF. Alpha is composited on white.
"""

import base64
import binascii
import io
import json
import logging
import math

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
MAX_PIXELS = 50_000_000  # a 50 MP photo decodes; a bigger header is refused before decoding
BACKGROUND = (255, 255, 255)  # where alpha is composited
OPTION_NAMES = ("topk",)  # query parameters or form fields; every other field may carry the image
TOPK_HEADER = "x-topk"
IMAGE_FIELDS = ("body", "data", "file", "image")  # preferred fields, in order


class RequestError(Exception):
    """A client mistake: answered with `status` and a JSON body {"code", "type", "message"}."""

    def __init__(self, status: int, type_: str, message: str):
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message

    def body(self) -> dict:
        return {"code": self.status, "type": self.type, "message": self.message}


def as_text(value) -> str:
    """A request field that should be text (bytes when TorchServe does not decode inputs)."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(400, "InvalidParameter", "Parameters must be UTF-8 text.") from None
    return str(value)


def parse_topk(text, n_classes: int, default: int) -> int:
    """`topk` as sent (None when absent): a whole number from 1 to n_classes."""
    if text is None:
        return min(default, n_classes)
    text = as_text(text).strip()
    if not text.isdigit() or not 1 <= int(text) <= n_classes:
        raise RequestError(
            400, "InvalidParameter", f"topk must be a whole number from 1 to {n_classes}, got {text!r}."
        )
    return int(text)


def header(headers: dict, name: str):
    """A request header's value, whatever the case the client sent its name in."""
    return next((value for key, value in headers.items() if key.lower() == name), None)


def parse_request(request: dict, headers: dict) -> tuple:
    """Returns (image bytes, topk text or None) from one request.

    The image comes from the raw body, a multipart file field, or JSON {"data": "<base64>"}.
    `topk` comes from a form field or query parameter, the JSON body, or the X-TopK header.
    (TorchServe 0.12 drops the query string of /predictions/NAME; /NAME/predict keeps it.)
    """
    topk = request.get("topk", header(headers, TOPK_HEADER))
    fields = [name for name in request if name not in OPTION_NAMES]
    if not fields:
        raise RequestError(
            400, "EmptyBody",
            'The request carries no image: send image bytes as the body, a multipart file field, '
            'or JSON {"data": "<base64>"}.',
        )
    value = request[next((field for field in IMAGE_FIELDS if field in fields), fields[0])]
    if isinstance(value, str):
        value = value.encode("utf-8")
    if isinstance(value, (bytes, bytearray)) and value.lstrip()[:1] != b"{":
        return bytes(value), topk
    payload = json_payload(bytes(value)) if isinstance(value, (bytes, bytearray)) else value
    if not isinstance(payload, dict):
        raise RequestError(400, "InvalidBody", 'A JSON body must be an object: {"data": "<base64 image>"}.')
    return base64_payload(payload), payload.get("topk", topk)


def json_payload(raw: bytes) -> dict:
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, "InvalidJSON", f"The body is not valid JSON: {err}.") from None
    return payload


def base64_payload(payload: dict) -> bytes:
    data = payload.get("data")
    if not isinstance(data, str):
        raise RequestError(400, "InvalidBody", 'A JSON body needs "data": a base64 string of the image.')
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, "InvalidBase64", f'"data" is not valid base64: {err}.') from None


def open_image(data: bytes, max_pixels: int = MAX_PIXELS, draft_min_side: int = None) -> Image.Image:
    """Decodes `data` into an upright RGB image, refusing oversize images before decoding pixels.

    With `draft_min_side`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4 or 1/8) that
    keeps its shorter side at least that long: lossy, much faster for big photos (see draft()).

    Every failure of PIL's decoders on these untrusted bytes is the client's (a 400), whatever
    exception the decoder raises: truncated headers alone raise OSError, SyntaxError, struct.error...
    """
    if not data:
        raise RequestError(400, "EmptyBody", "The request body is empty: send image bytes.")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as err:
        raise RequestError(413, "ImageTooLarge", str(err)) from None
    except UnidentifiedImageError:
        raise RequestError(
            400, "UnsupportedImage",
            f"The body is not an image in a supported format ({', '.join(ALLOWED_FORMATS)}).",
        ) from None
    except Exception as err:  # noqa: BLE001 - see the docstring
        raise corrupt("image", err) from None
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(
            413, "ImageTooLarge",
            f"The image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}.",
        )
    if draft_min_side and image.format == "JPEG":
        draft(image, draft_min_side)
    try:
        image.load()  # GIF: the first frame
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright 12 MP photo
        return to_rgb(image)
    except Image.DecompressionBombError as err:
        raise RequestError(413, "ImageTooLarge", str(err)) from None
    except Exception as err:  # noqa: BLE001 - see the docstring
        raise corrupt(f"{image.format} image", err) from None


def draft(image: Image.Image, min_side: int) -> None:
    """Asks libjpeg to decode `image` scaled down by 2, 4 or 8 in the DCT domain, as far as its
    shorter side stays >= `min_side`. Callers pass twice the preset's resize, so the final
    antialiased resize still averages at least 2x2 decoded pixels per output pixel."""
    width, height = image.size
    shorter = min(width, height)
    if shorter >= 2 * min_side:
        image.draft(None, (math.ceil(width * min_side / shorter), math.ceil(height * min_side / shorter)))


def corrupt(what: str, err: Exception) -> RequestError:
    log.info("refused a corrupt %s: %s: %s", what, type(err).__name__, err)
    return RequestError(400, "CorruptImage", f"The {what} is truncated or corrupt ({type(err).__name__}: {err}).")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16/32-bit gray scaled by range, alpha composited on BACKGROUND."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((np.clip(pixels, 0, 65535) / 257.0).round().astype(np.uint8))
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255.0).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
