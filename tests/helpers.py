"""Helpers for tests: HTTP against the live server, the CLI as a subprocess, custom models, and a
model whose requests finish only when the test says so."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import requests
import torch

from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_custom, archive_torchvision
from tvserve.ops import client
from tvserve.ops.management import pending_requests

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's chromium, chromium-driver


def chrome_options(profile: str):
    """Selenium's options for Debian's chromium, headless, with its profile in `profile`, and silent
    towards the network: this machine's closed network refuses Chromium's background connections
    (updates, sync, Google's hosts)."""
    from selenium import webdriver  # the test extra's; only the browser tests need it

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return options


def post_image(server, model, data=None, *, headers=None, files=None, timeout=30):
    """POSTs to /predictions/MODEL: a raw body `data`, or multipart `files`. Returns the response."""
    url = f"{server.inference_url}/predictions/{model}"
    return requests.post(url, data=data, files=files, headers=headers, timeout=timeout)


@contextlib.contextmanager
def registered_torchvision(server, store: Path, name: str, weights_file: Path, **options):
    """torchvision's `name` with the weights in `weights_file`, archived into `store` (one worker;
    `options`: ArchiveOptions' fields, model_name among them) and registered on `server` for the
    block; yields the archive's path."""
    archive = archive_torchvision(name, weights_file=weights_file, options=ArchiveOptions(
        **{"export_path": store, "workers": 1, "startup_timeout": 300, **options}))
    client.register(archive.name, management_url=server.management_url)
    try:
        yield archive
    finally:
        client.unregister(options.get("model_name", name), "1.0", management_url=server.management_url)


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


# Two logits from the image's mean colour; each forward waits while the file `gate` exists, so a
# test decides when requests can finish, whatever the machine's speed.
GATED_MODEL = textwrap.dedent('''
    import os
    import time

    import torch
    from torch import nn


    class Gated(nn.Module):
        def __init__(self, gate=""):
            super().__init__()
            self.gate = gate
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            while self.gate and os.path.exists(self.gate):
                time.sleep(0.01)
            return self.head(x.mean(dim=(2, 3)))
''')


class Gate:
    """The file that holds every forward of GATED_MODEL while it exists."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def close(self) -> None:
        self.path.touch()

    def open(self) -> None:
        self.path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def closed(self):
        """Closed inside the block, open again after it (also when the test fails)."""
        self.close()
        try:
            yield self
        finally:
            self.open()


def archive_gated(folder: Path, export_path: Path, gate: Gate, name: str = "gated", **options) -> Path:
    """Archives GATED_MODEL as NAME.mar in `export_path`: eager, one worker, batches of one (so a
    held forward holds exactly one request, and nothing is timed at archive time); `options`
    (ArchiveOptions' fields) override those."""
    init = {"gate": str(gate.path)}
    write_custom_model(folder, name, GATED_MODEL, "Gated", ["a", "b"], **init)
    return archive_custom(model_file=folder / f"{name}.py", class_name="Gated", init_args=json.dumps(init),
                          weights=folder / f"{name}.pt", labels=folder / "labels.txt", resize=8, crop=8,
                          mean="0.5,0.5,0.5", std="0.25,0.25,0.25",
                          options=ArchiveOptions(**{"export_path": export_path, "workers": 1, "batch_size": 1,
                                                    "backend": "eager", **options}))


def held(server, model: str = "gated") -> tuple:
    """(requests queued for `model`, whether a worker is inside a batch) from the live server."""
    return pending_requests(server.management_url).get(model, 0), any(server.busy_dir.iterdir())


def wait_until(condition, what: str, timeout: float = 60, poll: float = 0.05) -> None:
    """Polls `condition()` until it is true; fails naming `what` after `timeout` s, a bound for a
    hung server far above what any machine needs."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not seen within {timeout:.0f} s"
        time.sleep(poll)
