"""Helpers for tests: HTTP against the live server, and the CLI as a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import requests
import torch

REPO = Path(__file__).resolve().parents[1]


def post_image(server, model, data=None, *, headers=None, files=None, timeout=30):
    """POSTs to /predictions/MODEL: a raw body `data`, or multipart `files`. Returns the response."""
    url = f"{server.inference_url}/predictions/{model}"
    return requests.post(url, data=data, files=files, headers=headers, timeout=timeout)


def run_tvserve(*args, env=None, timeout=600):
    """Runs `tvserve ARGS...` from the repository root; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "tvserve.cli", *map(str, args)], cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def served_probabilities(server, model, data, n_classes, session=requests) -> torch.Tensor:
    """The whole probability vector the server answers for image bytes `data` (top-k = every class)."""
    response = session.post(f"{server.inference_url}/predictions/{model}", data=data,
                            headers={"X-TopK": str(n_classes)}, timeout=120)
    assert response.status_code == 200, response.text
    probabilities = torch.zeros(n_classes)
    for item in response.json():
        probabilities[item["index"]] = item["probability"]
    return probabilities


def write_custom_model(folder: Path, name: str, source: str, class_name: str, labels: list, **init):
    """Writes a model file (folder/NAME.py), its labels (labels.txt) and random weights (NAME.pt)
    for `tvserve archive custom`; returns the model, in eval mode, that the weights belong to."""
    folder.mkdir(parents=True)
    (folder / f"{name}.py").write_text(source)
    (folder / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
    namespace = {}
    exec(compile(source, f"{name}.py", "exec"), namespace)
    torch.manual_seed(0)
    model = namespace[class_name](**init)
    torch.save(model.state_dict(), folder / f"{name}.pt")
    return model.eval()
