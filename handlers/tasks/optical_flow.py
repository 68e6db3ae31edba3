"""Optical flow (RAFT): two images of one size per request -> the motion of each pixel of the first
to the second, at the size sent:

    {"size": [height, width], "png": "<base64 PNG>",
     "flow": {"dtype": "float16", "shape": [2, height, width], "data": "<base64>"}}

"png" is the flow drawn in colour by torchvision.utils.flow_to_image (hue: direction, saturation:
length relative to the longest); "flow" the raw field, the horizontal then the vertical
displacement in pixels, float16 little-endian in C order (numpy: np.frombuffer(base64.b64decode(data),
"<f2").reshape(shape)); float16 keeps 11 significant bits: 0.004 px at 8 px, 0.03 px at 64.
RAFT takes sizes that are multiples of 8 and at least the weights' min_size: the images are padded
on the right and bottom by repeating their edge (torch's "replicate") to the next such size, and
the flow is cropped back to the size sent. The model's last (finest) estimate is answered.
"""

import base64
import io
import math

import numpy as np
import torch
from PIL import Image
from torchvision.utils import flow_to_image

from handlers.errors import RequestError

PARITY_TOLERANCE = 1e-4  # largest allowed |difference| of any flow value, in pixels, before float16
MULTIPLE = 8  # RAFT's feature maps are 1/8 of the input: sizes must be multiples of 8
MAX_PAIR_PIXELS = 1024 * 576  # per image: RAFT's correlation volume grows with its square (0.5 GB here), and the
# answer (float16 field and PNG, base64) stays under TorchServe's 8 MiB max_response_size even for a noisy flow


def padded_size(height: int, width: int, min_size: list) -> tuple:
    """The smallest (height, width) RAFT takes that holds the image: multiples of 8, at least min_size."""
    return tuple(max(math.ceil(side / MULTIPLE) * MULTIPLE, least) for side, least in zip((height, width), min_size))


def pad(images: torch.Tensor, size: tuple) -> torch.Tensor:
    """Tensor[..., 3, H, W] -> Tensor[..., 3, size] padded on the right and bottom with the edge pixels."""
    bottom, right = size[0] - images.shape[-2], size[1] - images.shape[-1]
    flat = images.reshape(-1, *images.shape[-3:])
    return torch.nn.functional.pad(flat, (0, right, 0, bottom), mode="replicate").reshape(*images.shape[:-2], *size)


def flow_png(flow: torch.Tensor) -> bytes:
    """Flow Tensor[2, H, W] -> its colour picture (flow_to_image) as PNG bytes."""
    pixels = flow_to_image(flow).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def half_bytes(flow: torch.Tensor) -> bytes:
    """Flow Tensor[2, H, W] -> float16 little-endian bytes, C order."""
    return np.ascontiguousarray(flow.numpy(), dtype="<f2").tobytes()


class OpticalFlow:
    name = "optical_flow"
    protocols = ("predictions", "v2")
    option_names = ()
    PARITY_TOLERANCE = PARITY_TOLERANCE
    parity_what = "flow values"

    def __init__(self, labels: list = (), keypoint_names: list = None):
        self.labels = list(labels)  # none: flow has no classes

    @staticmethod
    def inputs(items: list) -> list:
        """A request's items -> its one pair of images (first, second). Raises RequestError unless two."""
        if len(items) != 2:
            raise RequestError(400, "NeedTwoImages", f"An optical-flow request carries two images of one size, "
                               f"the first and the second frame; this one carries {len(items)}.")
        return [list(items)]

    @staticmethod
    def meta_example(preset) -> torch.Tensor:
        """One pair of the smallest size the weights take, on the meta device: Tensor[2, 1, 3, h, w]."""
        return torch.zeros(2, 1, 3, *preset.min_size, device="meta")

    @staticmethod
    def meta_forward(model, example):
        """What runs on the meta device: the feature and context encoders (the correlation lookup
        needs real values); their outputs' sizes."""
        features = model.feature_encoder(torch.cat([example[0], example[1]]))
        context = model.context_encoder(example[0])
        return {"features": tuple(features.shape), "context": tuple(context.shape), "input": tuple(example.shape)}

    def check_output(self, sizes: dict) -> None:
        """Raises ValueError unless the encoders give 1/8-size maps of the pair."""
        _, _, _, height, width = sizes["input"]
        expected = (height // MULTIPLE, width // MULTIPLE)
        if sizes["features"][-2:] != expected or sizes["context"][-2:] != expected:
            raise ValueError(f"The model's encoders give {sizes['features']} and {sizes['context']} for a "
                             f"{height}x{width} pair: a RAFT model gives maps of 1/8 the size.")

    def parse_options(self, raw: dict) -> dict:
        return {}

    @staticmethod
    def batch(tensors: list) -> list:
        """Pairs keep their own sizes: a list of Tensor[2, 3, H, W]."""
        return list(tensors)

    def forward(self, runner, batch: list) -> list:
        """Per pair, the model's finest flow Tensor[2, H', W'] at its padded size (padded_size)."""
        return [runner((pair[0:1], pair[1:2]))[-1][0] for pair in batch]

    @staticmethod
    def scores(outputs: list) -> list:
        return outputs

    def parity_gap(self, outputs: list, reference: list) -> float:
        return max((ours - theirs).abs().max().item() for ours, theirs in zip(outputs, reference, strict=True))

    @staticmethod
    def cropped(flow: torch.Tensor, options: dict) -> torch.Tensor:
        height, width = options["image_size"]
        return flow[:, :height, :width].contiguous()

    def postprocess(self, flow: torch.Tensor, options: dict) -> dict:
        """One pair's padded flow -> its answer at options["image_size"] (see the module docstring)."""
        flow = self.cropped(flow, options)
        return {"size": list(flow.shape[1:]), "png": base64.b64encode(flow_png(flow)).decode("ascii"),
                "flow": {"dtype": "float16", "shape": list(flow.shape),
                         "data": base64.b64encode(half_bytes(flow)).decode("ascii")}}

    @staticmethod
    def output_metadata() -> list:
        return [{"name": "flow", "datatype": "FP16", "shape": [-1, 2, -1, -1]},
                {"name": "png", "datatype": "BYTES", "shape": [-1]}]

    def tensors(self, flows: list, options: dict) -> dict:
        """flow FP16 [N, 2, H, W] (pixels) and png BYTES [N] (base64 PNG of flow_to_image)."""
        cropped = [self.cropped(flow, options) for flow in flows]
        return {"flow": ("FP16", np.stack([flow.numpy() for flow in cropped]).astype("<f2")),
                "png": ("BYTES", np.array([base64.b64encode(flow_png(flow)).decode("ascii") for flow in cropped],
                                          dtype=object))}
