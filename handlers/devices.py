"""Where the work runs: the model on the worker's device (a GPU TorchServe assigned, else the CPU),
and decoding and preprocessing apart from it.

A preprocessor turns the images of one batch (encoded bytes, or RGB pixels uint8 [H, W, 3]) into
the model's inputs, Tensor[3, H, W] float32 each (the preset's crop for classification; see
handlers/preprocessing.py), or a RequestError for each image that is a client mistake; the others
of the batch are unaffected. Two are registered in PREPROCESSORS, chosen by the record's
`preset.decode` or, at serve time, by TVSERVE_DECODE:
- "pil": PIL on the worker's CPU, one image after another (exact: equal to the weights' own
  `transforms()`); the default.
- "tensor": the batch's JPEGs decoded together by torchvision.io (nvJPEG on a GPU, libjpeg-turbo on
  the CPU), turned upright and resized, cropped and normalised as tensor ops on the worker's device
  (lossy: the resize is not PIL's). Whatever that decoder does not decode as PIL does (other
  formats, CMYK, oversize or refused bodies) takes the "pil" path, image by image.
Tasks whose requests are not single images have their own (TASK_PREPROCESSORS): a video model's
clip (handlers/clips.py), an optical-flow model's pair of images (PairPreprocessing).
"""

import io
import logging
import os
import time
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from handlers.clips import ClipPreprocessing
from handlers.errors import RequestError
from handlers.images import MAX_PIXELS, check_pixels, open_image, open_pixels
from handlers.preprocessing import build_transform
from handlers.record import DECODE_ENV, Preset
from handlers.tasks.optical_flow import MAX_PAIR_PIXELS, pad, padded_size

log = logging.getLogger(__name__)

ORIENTATION = 0x0112  # the EXIF orientation tag
TENSOR_MODES = ("RGB", "L")  # JPEG modes torchvision.io decodes to RGB as PIL does (CMYK is left to PIL)

# EXIF orientation -> the tensor op on [..., H, W] equal to PIL's ImageOps.exif_transpose for it
UPRIGHT = {
    2: lambda image: image.flip(-1),  # FLIP_LEFT_RIGHT
    3: lambda image: image.flip((-2, -1)),  # ROTATE_180
    4: lambda image: image.flip(-2),  # FLIP_TOP_BOTTOM
    5: lambda image: image.transpose(-2, -1),  # TRANSPOSE
    6: lambda image: image.rot90(-1, (-2, -1)),  # ROTATE_270 (90 degrees clockwise)
    7: lambda image: image.transpose(-2, -1).flip((-2, -1)),  # TRANSVERSE
    8: lambda image: image.rot90(1, (-2, -1)),  # ROTATE_90 (90 degrees counter-clockwise)
}


def model_device(gpu_id) -> str:
    """cuda:N when TorchServe gave this worker GPU `gpu_id` and torch sees one, else cpu."""
    return f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu"


def value_or_error(function, data):
    """function(data), or the RequestError it raised (one image's client mistake, kept for its request)."""
    try:
        return function(data)
    except RequestError as err:
        return err


class Preprocessing:
    """The batch entry shared by every preprocessor; a subclass decodes (decode_batch) and
    transforms one decoded picture (transform), and says the picture's size (size)."""

    name = None
    batched = False  # True: decode_batch is cheaper per image on a list than image by image

    def prepare(self, images: list, seconds=None) -> list:
        """The images of one batch -> per image, (Tensor[3, H, W] float32 on the worker's device,
        (height, width) of the upright image) or its RequestError. `seconds(stage, s)`, if given,
        gets each decoded image's "decode" seconds (its share of the batch's) and "preprocess" seconds."""
        start = time.perf_counter()
        pictures = self.decode_batch(images)
        decoded = sum(not isinstance(picture, RequestError) for picture in pictures)
        share = (time.perf_counter() - start) / max(decoded, 1)
        prepared = []
        for picture in pictures:
            if isinstance(picture, RequestError):
                prepared.append(picture)
                continue
            began = time.perf_counter()
            prepared.append((self.transform(picture), self.size(picture)))
            if seconds:
                seconds("decode", share)
                seconds("preprocess", time.perf_counter() - began)
        return prepared

    def __call__(self, data) -> torch.Tensor:
        """One image -> the model's input Tensor[3, H', W'] float32; raises its RequestError."""
        result = self.prepare([data])[0]
        if isinstance(result, RequestError):
            raise result
        return result[0]


class PilPreprocessing(Preprocessing):
    """Decode with PIL (EXIF upright, RGB), then the preset's Compose, on this process's CPU, one
    image after another (the model's runner moves the batch to its device)."""

    name = "pil"

    def __init__(self, preset: Preset, device: str = "cpu"):
        self.compose = build_transform(preset.to_dict())
        # lossy, opt-in; only where the preset resizes (detection answers in the decoded image's pixels)
        self.draft_min_side = 2 * preset.resize if preset.jpeg_draft and preset.resize else None

    def decode(self, data) -> Image.Image:
        """Encoded image bytes, or RGB pixels uint8 [H, W, 3] -> an upright RGB PIL image."""
        if isinstance(data, np.ndarray):
            return open_pixels(data)
        return open_image(data, draft_min_side=self.draft_min_side)

    def decode_batch(self, images: list) -> list:
        return [value_or_error(self.decode, data) for data in images]

    def transform(self, picture: Image.Image) -> torch.Tensor:
        return self.compose(picture)

    @staticmethod
    def size(picture: Image.Image) -> tuple:
        return picture.height, picture.width


class TensorPreprocessing(Preprocessing):
    """The batch's JPEGs decoded in one torchvision.io call on the worker's device (nvJPEG on a GPU,
    libjpeg-turbo on the CPU: the same code), turned upright as PIL does, then the preset's steps as
    tensor ops there. Pixel arrays go to the device as they are. Every other image, and any JPEG the
    decoder refuses, takes the PIL path alone (its exact answer, or its own 4xx)."""

    name = "tensor"
    batched = True  # decodes a list of JPEGs in one call: the prepare pool hands it chunks (handlers/pipeline.py)

    def __init__(self, preset: Preset, device: str = "cpu"):
        self.device = torch.device(device)
        self.compose = build_transform(preset.to_dict(), pil=False)
        self.pil = PilPreprocessing(preset)

    def decode_batch(self, images: list) -> list:
        """Images -> per image an upright RGB uint8 Tensor[3, H, W] on the device, a PIL image (the
        PIL path's), or a RequestError."""
        pictures = [None] * len(images)
        jpegs = {}  # index -> (body, EXIF orientation) of the JPEGs this decoder takes
        for i, data in enumerate(images):
            if isinstance(data, np.ndarray):
                pictures[i] = value_or_error(self.from_pixels, data)
            elif (orientation := tensor_orientation(data)) is not None:
                jpegs[i] = (data, orientation)
            else:
                pictures[i] = value_or_error(self.pil.decode, data)
        decoded = self.decode_jpegs([body for body, _ in jpegs.values()])
        for (i, (body, orientation)), image in zip(jpegs.items(), decoded):
            if image is None:  # refused (corrupt, truncated, or beyond this decoder): PIL's answer or error
                pictures[i] = value_or_error(self.pil.decode, body)
            else:
                pictures[i] = UPRIGHT[orientation](image) if orientation in UPRIGHT else image
        return pictures

    def decode_jpegs(self, bodies: list) -> list:
        """JPEG bodies -> RGB uint8 Tensor[3, H, W] each on the device, as stored (not yet upright),
        None for each one the decoder refuses. One call for them all (nvJPEG decodes a list
        together); if it raises, each again alone, so one bad body never fails its batch-mates."""
        if not bodies:
            return []
        tensors = [torch.frombuffer(bytearray(body), dtype=torch.uint8) for body in bodies]
        try:
            return list(self.decode_jpeg(tensors))
        except Exception as err:  # noqa: BLE001 - untrusted bytes: any decoder failure is one body's
            if len(tensors) > 1:
                log.info("batch JPEG decode refused (%s: %s): decoding its %d images one by one",
                         type(err).__name__, err, len(tensors))
        return [self.decode_one(tensor) for tensor in tensors]

    def decode_one(self, tensor: torch.Tensor):
        try:
            return self.decode_jpeg([tensor])[0]
        except Exception as err:  # noqa: BLE001 - see decode_jpegs
            log.info("JPEG decoder refused a body (%s: %s): PIL decodes it", type(err).__name__, err)
            return None

    def decode_jpeg(self, tensors: list) -> list:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29's deprecation notice, every call
            return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)

    def from_pixels(self, pixels: np.ndarray) -> torch.Tensor:
        """RGB pixels uint8 [H, W, 3] -> Tensor[3, H, W] uint8 on the device (the same size limit)."""
        check_pixels(pixels)
        array = np.array(pixels, dtype=np.uint8)  # a writable copy: protocols hand read-only views
        return torch.from_numpy(array).permute(2, 0, 1).to(self.device)

    def transform(self, picture) -> torch.Tensor:
        if isinstance(picture, Image.Image):  # the PIL path's image: its exact input, moved to the device
            return self.pil.transform(picture).to(self.device)
        return self.compose(picture)

    @staticmethod
    def size(picture) -> tuple:
        if isinstance(picture, Image.Image):
            return picture.height, picture.width
        return tuple(picture.shape[-2:])


def tensor_orientation(data) -> int:
    """The EXIF orientation (1 where none) of a JPEG that torchvision.io decodes as PIL does (8-bit
    YCbCr or gray, baseline or progressive, within MAX_PIXELS), read from its header alone; None for
    anything else (other formats, CMYK, a header PIL refuses, oversize): the PIL path takes those
    and gives their answer or their error."""
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            if image.mode not in TENSOR_MODES or image.width * image.height > MAX_PIXELS:
                return None
            orientation = image.getexif().get(ORIENTATION, 1)
            return orientation if isinstance(orientation, int) else None  # an odd tag: PIL's own handling
    except Exception:  # noqa: BLE001 - untrusted bytes: the PIL path decides what they are
        return None


class PairPreprocessing(Preprocessing):
    """An optical-flow request's two images: each decoded by PIL (upright RGB) and normalised by
    the preset, both of one size (at most MAX_PAIR_PIXELS), padded to the size RAFT takes
    (handlers/tasks/optical_flow.py): (Tensor[2, 3, H', W'] float32, (height, width) as sent)."""

    name = "pair"

    def __init__(self, preset: Preset, device: str = "cpu"):
        self.pil = PilPreprocessing(preset)
        self.min_size = preset.min_size
        self.device = torch.device(device)

    def decode_batch(self, pairs: list) -> list:
        return [value_or_error(self.decode, pair) for pair in pairs]

    def decode(self, pair: list) -> list:
        """[first, second] (encoded images or pixels) -> two upright RGB images of one size."""
        images = []
        for index, data in enumerate(pair):
            try:
                images.append(self.pil.decode(data))
            except RequestError as err:
                raise RequestError(err.status, err.type, f"Image {index}: {err.message}") from None
        if images[0].size != images[1].size:
            raise RequestError(400, "ImageSizesDiffer", f"The two images must have one size; they are "
                               f"{images[0].width}x{images[0].height} and {images[1].width}x{images[1].height}.")
        if images[0].width * images[0].height > MAX_PAIR_PIXELS:
            raise RequestError(413, "ImageTooLarge", f"The images are {images[0].width}x{images[0].height} = "
                               f"{images[0].width * images[0].height} pixels; the limit for optical flow is "
                               f"{MAX_PAIR_PIXELS} (1024x576). Send smaller frames.")
        return images

    def transform(self, images: list) -> torch.Tensor:
        pair = torch.stack([self.pil.transform(image) for image in images])
        return pad(pair, padded_size(images[0].height, images[0].width, self.min_size)).to(self.device)

    @staticmethod
    def size(images: list) -> tuple:
        return images[0].height, images[0].width


PREPROCESSORS = {processor.name: processor for processor in (PilPreprocessing, TensorPreprocessing)}
TASK_PREPROCESSORS = {"video_classification": ClipPreprocessing, "optical_flow": PairPreprocessing}  # their own inputs


def preprocessor_for(task: str, preset: Preset, device: str):
    """The worker's preprocessor: the task's own where its requests are not single images (a clip,
    a pair of images), else the image decoding chosen (decode_choice)."""
    return (TASK_PREPROCESSORS.get(task) or PREPROCESSORS[decode_choice(preset)])(preset, device)


def decode_choice(preset: Preset) -> str:
    """The preprocessor this worker uses: TVSERVE_DECODE where set, else the record's preset.decode."""
    choice = os.environ.get(DECODE_ENV) or preset.decode
    if choice not in PREPROCESSORS:
        raise ValueError(f"Invalid decode {choice!r} (from {DECODE_ENV} or the archive's preset). "
                         f"Only {', '.join(PREPROCESSORS)} are supported.")
    return choice
