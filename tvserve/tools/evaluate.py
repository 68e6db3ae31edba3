"""Accuracy and confusion matrix of a checkpoint on its validation split, in-process and through
a running server; the two must agree. `inverted` scores the same images with their polarity
inverted (255 - pixel: dark digits on a light page instead of the scans' light on dark)."""

import io

import requests
import torch
import torchvision.transforms.functional as TF

from training.data import invert, load_dataset, normalise
from training.models import build_model
from tvserve import TvserveError
from tvserve.archiving.weights import load_checkpoint
from tvserve.ops import client


def validation_split(checkpoint: dict, dataset: str = None, data_dir=None):
    """The validation images and labels the checkpoint was selected on (unless `dataset` says
    otherwise): uint8 Tensor[N, 3, 32, 32], int64 Tensor[N]."""
    split = checkpoint.get("split") or {}
    data = load_dataset(dataset or checkpoint["dataset"], data_dir=data_dir or "data",
                        val_fraction=split.get("val_fraction", 0.2), seed=split.get("seed", 0))
    if data.classes != checkpoint["classes"]:
        raise TvserveError(f"The dataset's classes {data.classes} are not the checkpoint's {checkpoint['classes']}.")
    return data.val_images, data.val_labels


def predict_in_process(checkpoint: dict, images: torch.Tensor) -> torch.Tensor:
    """Predicted class per image, with the eval-mode model: int64 Tensor[N]."""
    model = build_model(checkpoint["arch"], **checkpoint["arch_args"])
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    with torch.inference_mode():
        logits = model(normalise(images, checkpoint["mean"], checkpoint["std"]))
    return logits.argmax(dim=1)


def predict_served(images: torch.Tensor, *, url: str, model: str, timeout: float = 60) -> torch.Tensor:
    """Predicted class per image from the server, each sent as a PNG: int64 Tensor[N]."""
    predictions = []
    with requests.Session() as session:
        for image in images:
            buffer = io.BytesIO()
            TF.to_pil_image(image).save(buffer, "PNG")
            top = client.predict(model, buffer.getvalue(), url=url, topk=1, timeout=timeout, session=session)
            predictions.append(top[0]["index"])
    return torch.as_tensor(predictions, dtype=torch.int64)


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Tensor[n_classes, n_classes]: row = true class, column = predicted class."""
    return torch.bincount(labels * n_classes + predictions, minlength=n_classes**2).reshape(n_classes, n_classes)


def report(name: str, labels, predictions, classes, *, inverted: bool = False) -> dict:
    matrix = confusion_matrix(labels, predictions, len(classes))
    return {"source": name, "inverted": inverted, "accuracy": (labels == predictions).float().mean().item(),
            "confusion_matrix": matrix.tolist(), "classes": list(classes), "n": len(labels)}


def evaluate(checkpoint_path, *, dataset=None, data_dir=None, url=None, model=None, inverted=False) -> list:
    """Reports (accuracy, confusion matrix) in-process and, with `url` and `model`, served;
    with `inverted`, of the validation images with their polarity inverted."""
    checkpoint = load_checkpoint(checkpoint_path)
    images, labels = validation_split(checkpoint, dataset, data_dir)
    if inverted:
        images = invert(images)
    classes = checkpoint["classes"]
    reports = [report("in-process", labels, predict_in_process(checkpoint, images), classes, inverted=inverted)]
    if url:
        served = predict_served(images, url=url, model=model)
        reports.append(report(f"{url}/predictions/{model}", labels, served, classes, inverted=inverted))
    return reports


def format_report(result: dict) -> str:
    classes = result["classes"]
    first = max(len("true\\pred"), *(len(c) for c in classes))
    width = max(5, *(len(c) for c in classes))
    polarity = ", inverted" if result.get("inverted") else ""
    lines = [f"{result['source']}: accuracy {100 * result['accuracy']:.2f}% on {result['n']} validation images{polarity}",
             "true\\pred".ljust(first) + " " + " ".join(c.rjust(width) for c in classes)]
    for name, row in zip(classes, result["confusion_matrix"]):
        lines.append(name.ljust(first) + " " + " ".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)
