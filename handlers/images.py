"""Image bytes from an untrusted client -> an upright RGB PIL image, or a RequestError (4xx).

Accepted formats: JPEG, PNG, WebP, BMP, GIF (first frame), TIFF. Alpha is composited on white.
"""

import io
import logging
import math

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from handlers.errors import RequestError

log = logging.getLogger(__name__)

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
MAX_PIXELS = 50_000_000  # a 50 MP photo decodes; a bigger header is refused before decoding
BACKGROUND = (255, 255, 255)  # where alpha is composited


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


def open_pixels(pixels: np.ndarray, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """RGB pixels uint8 [H, W, 3] -> an RGB image (the same size limit as encoded images)."""
    check_pixels(pixels, max_pixels)
    return Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB")


def check_pixels(pixels: np.ndarray, max_pixels: int = MAX_PIXELS) -> None:
    """Raises a 413 RequestError when RGB pixels [H, W, 3] are over the size limit."""
    height, width = pixels.shape[:2]
    if width * height > max_pixels:
        raise RequestError(413, "ImageTooLarge",
                           f"The pixels are {width}x{height} = {width * height}; the limit is {max_pixels}.")


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
