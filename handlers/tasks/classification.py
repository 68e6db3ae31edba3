"""Image classification: logits Tensor[N, n_labels] -> the top-k labels with their softmax
probabilities, most probable first: [{"label": "tabby", "index": 281, "probability": 0.93}, ...]."""

import numpy as np
import torch

from handlers.errors import RequestError

DEFAULT_TOPK = 5
PARITY_TOLERANCE = 1e-4  # largest allowed |p_runtime - p_eager| of any softmax probability


def as_text(value) -> str:
    """A request option that should be text (bytes when TorchServe does not decode inputs)."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(400, "InvalidParameter", "Parameters must be UTF-8 text.") from None
    return str(value)


class Classification:
    name = "classification"
    protocols = ("predictions", "v2", "v1")  # the protocols whose answers it has: /predictions JSON, OIP v2, KServe v1
    option_names = ("topk", "target")
    PARITY_TOLERANCE = PARITY_TOLERANCE
    parity_what = "probabilities"

    def __init__(self, labels: list, keypoint_names: list = None):
        self.labels = list(labels)

    @staticmethod
    def meta_example(preset) -> torch.Tensor:
        """One image of the preset's crop on the meta device: Tensor[1, 3, crop, crop]."""
        return torch.zeros(1, 3, preset.crop, preset.crop, device="meta")

    @staticmethod
    def meta_forward(model, example):
        return model(example)

    @staticmethod
    def batch(tensors: list) -> torch.Tensor:
        """Every image has the preset's crop: one Tensor[N, 3, crop, crop]."""
        return torch.stack(tensors)

    @staticmethod
    def forward(runner, batch: torch.Tensor) -> torch.Tensor:
        return runner(batch)

    def check_output(self, output) -> None:
        """Raises ValueError unless `output` (for one image) is one logit per label: (1, n_labels)."""
        if not isinstance(output, torch.Tensor) or tuple(output.shape) != (1, len(self.labels)):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"The model gives {shape} for one image and {len(self.labels)} labels: "
                             "it must give one logit per label, shape (1, n_labels).")

    def parse_options(self, raw: dict) -> dict:
        """{"topk": k, "target": class index or None}. topk: a whole number from 1 to the number of
        labels (default 5, capped); target (explanations): a class index or label (default: the top-1)."""
        return {"topk": self.parse_topk(raw.get("topk")), "target": self.parse_target(raw.get("target"))}

    def parse_topk(self, text) -> int:
        if text is None:
            return min(DEFAULT_TOPK, len(self.labels))
        text = as_text(text).strip()
        if not text.isdigit() or not 1 <= int(text) <= len(self.labels):
            raise RequestError(
                400, "InvalidParameter", f"topk must be a whole number from 1 to {len(self.labels)}, got {text!r}."
            )
        return int(text)

    def parse_target(self, text):
        if text is None:
            return None
        text = as_text(text).strip()
        if text in self.labels:
            return self.labels.index(text)
        if text.isdigit() and int(text) < len(self.labels):
            return int(text)
        raise RequestError(400, "InvalidParameter", f"target must be a class index from 0 to "
                           f"{len(self.labels) - 1} or one of the labels, got {text!r}.")

    def explain_target(self, probabilities: torch.Tensor, options: dict) -> dict:
        """The class to explain for one image's probabilities Tensor[n_labels]: the requested target,
        else the top-1: {"label", "index", "probability"}."""
        index = options["target"] if options["target"] is not None else int(probabilities.argmax())
        return {"label": self.labels[index], "index": index, "probability": float(probabilities[index])}

    @staticmethod
    def scores(outputs: torch.Tensor) -> torch.Tensor:
        """Logits Tensor[N, n_labels] -> probabilities Tensor[N, n_labels]."""
        return torch.softmax(outputs, dim=1)

    def parity_gap(self, outputs: torch.Tensor, reference: torch.Tensor) -> float:
        """Largest |probability difference| between two runs' logits of the same images."""
        return (self.scores(outputs) - self.scores(reference)).abs().max().item()

    def postprocess(self, probabilities: torch.Tensor, options: dict) -> list:
        """One image's probabilities Tensor[n_labels] -> its top-k answer."""
        values, indices = probabilities.topk(options["topk"])
        return [{"label": self.labels[index], "index": index, "probability": value}
                for value, index in zip(values.tolist(), indices.tolist())]

    def output_metadata(self) -> list:
        """The answer as named tensors (name, datatype, shape; -1 where it varies), for tensor protocols."""
        n = len(self.labels)
        return [{"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
                {"name": "indices", "datatype": "INT64", "shape": [-1, -1]},
                {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, n]}]

    def tensors(self, probabilities: torch.Tensor, options: dict) -> dict:
        """Probabilities Tensor[N, n_labels] -> {name: (datatype, array)}: the top-k labels [N, k]
        (text), indices [N, k] int64 and scores [N, k] float32, and every probability [N, n_labels]."""
        values, indices = probabilities.float().topk(options["topk"], dim=1)
        labels = np.array([[self.labels[i] for i in row] for row in indices.tolist()], dtype=object)
        return {"labels": ("BYTES", labels), "indices": ("INT64", indices.numpy().astype(np.int64)),
                "scores": ("FP32", values.numpy().astype(np.float32)),
                "probabilities": ("FP32", probabilities.float().numpy().astype(np.float32))}
