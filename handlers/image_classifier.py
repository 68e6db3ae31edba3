"""tvserve's TorchServe handler: one image classifier for torchvision models and trained checkpoints.

Lifecycle, in the TorchServe worker:
- `initialize(context)` once: reads the archive's `tvserve.json`, sets its thread budget, checks
  the sha256 of the weights (or of the exported model) and loads the recorded backend (eager
  model in eval mode, TorchScript, ONNX Runtime or OpenVINO; eager on a GPU), and builds the
  preprocessing `Compose` from the recorded preset.
- `handle(data, context)` per batch: decode and validate each request (a client mistake gets its
  own 4xx with a JSON body, the rest of the batch still runs), stack, one forward under
  `torch.inference_mode()`, then one JSON top-k list per request:
  [{"label": "tabby", "index": 281, "probability": 0.93}, ...], most probable first.
- The management API's `GET /models/NAME?customized=true` gets the archive's metadata.

Everything here imports torch, torchvision, PIL, the backend's runtime and the files shipped in
the archive only.
"""

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
import torchvision

from handlers.backends import EAGER, cores_per_worker, load_runner, set_threads
from handlers.decoding import RequestError, open_image, parse_request, parse_topk
from handlers.preprocessing import build_transform

log = logging.getLogger(__name__)

METADATA_FILE = "tvserve.json"
DEFAULT_TOPK = 5


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_model(model_dir: Path, spec: dict) -> torch.nn.Module:
    """The untrained module that `spec` (the metadata's "model" entry) names."""
    kwargs = spec.get("kwargs", {})
    if spec["builder"] == "torchvision":
        return torchvision.models.get_model(spec["name"], weights=None, **kwargs)
    if spec["builder"] == "python":
        source = model_dir / spec["file"]
        module_spec = importlib.util.spec_from_file_location(source.stem, source)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not isinstance(getattr(module, spec["class"], None), type):
            defined = [name for name, value in vars(module).items()
                       if isinstance(value, type) and issubclass(value, torch.nn.Module)
                       and value.__module__ == module.__name__]
            raise ValueError(f"{source.name} defines no class {spec['class']!r}; its nn.Module classes: "
                             f"{', '.join(defined) or 'none'}.")
        return getattr(module, spec["class"])(**kwargs)
    raise ValueError(f"Unknown model builder {spec['builder']!r}: this archive needs a newer tvserve.")


def verified(model_dir: Path, entry: dict) -> Path:
    """The archive file that `entry` ({"file", "sha256"}) names, after checking its sha256."""
    path = model_dir / entry["file"]
    actual = sha256_of(path)
    if actual != entry["sha256"]:
        raise RuntimeError(
            f"Tampered archive: {entry['file']} has sha256 {actual}, but the archive's "
            f"{METADATA_FILE} records {entry['sha256']}. Rebuild the archive with `tvserve archive`."
        )
    return path


def load_model(model_dir: Path, meta: dict) -> torch.nn.Module:
    """Builds the model, loads its verified weights strictly, and switches it to eval mode."""
    model = build_model(model_dir, meta["model"])
    weights = torch.load(verified(model_dir, meta["weights"]), map_location="cpu", weights_only=True)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def device_of(context) -> str:
    """cuda:N when TorchServe gave this worker a GPU and torch sees one, else cpu."""
    gpu_id = context.system_properties.get("gpu_id")
    return f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu"


def load_backend(model_dir: Path, meta: dict, threads: int, device: str):
    """The runner of the archive's recorded backend (eager for archives that record none)."""
    backend = meta.get("backend") or {"name": "eager"}
    name = backend["name"] if device == "cpu" else "eager"
    if name in EAGER:
        return name, load_runner(name, model=load_model(model_dir, meta), device=device)
    return name, load_runner(name, path=verified(model_dir, backend), threads=threads)


def thread_budget(context) -> int:
    """Torch threads for this worker: model-config.yaml's handler.threads, else TVSERVE_THREADS,
    else the cores shared evenly among this model's workers."""
    yaml_config = getattr(context, "model_yaml_config", None) or {}
    threads = (yaml_config.get("handler") or {}).get("threads") or os.environ.get("TVSERVE_THREADS")
    if threads:
        return int(threads)
    workers = int(yaml_config.get("maxWorkers") or yaml_config.get("minWorkers") or 1)
    return cores_per_worker(workers)


@contextlib.contextmanager
def busy_marker():
    """A file that exists while this worker runs a batch, so that a graceful stop
    (tvserve.server.drain) waits for it. Only when the server names a folder for them."""
    folder = os.environ.get("TVSERVE_BUSY_DIR")
    marker = Path(folder) / str(os.getpid()) if folder else None
    if marker:
        marker.touch()
    try:
        yield
    finally:
        if marker:
            marker.unlink(missing_ok=True)


class ImageClassifier:
    """TorchServe entry point (the archive's only handler class)."""

    def __init__(self):
        self.initialized = False

    def initialize(self, context):
        model_dir = Path(context.system_properties["model_dir"])
        self.meta = json.loads((model_dir / METADATA_FILE).read_text())
        threads, device = thread_budget(context), device_of(context)
        set_threads(threads)
        self.backend, self.runner = load_backend(model_dir, self.meta, threads, device)
        self.transform = build_transform(self.meta["preset"])
        preset = self.meta["preset"]
        self.draft_min_side = 2 * preset["resize"] if preset.get("jpeg_draft") else None  # lossy, opt-in
        self.labels = self.meta["labels"]
        self.default_topk = int(self.meta.get("topk", DEFAULT_TOPK))
        self.initialized = True
        log.info("tvserve: loaded %s (%s), %d labels, backend %s on %s, %d threads",
                 self.meta["name"], self.meta["source"], len(self.labels), self.backend, device, threads)

    def preprocess(self, request: dict, headers: dict):
        """One request -> (Tensor[3, H, W] float32, topk). Raises RequestError for client mistakes."""
        data, topk = parse_request(request, headers)
        topk = parse_topk(topk, len(self.labels), self.default_topk)
        return self.transform(open_image(data, draft_min_side=self.draft_min_side)), topk

    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        """Tensor[N, 3, H, W] -> probabilities Tensor[N, n_classes]."""
        with torch.inference_mode():
            return torch.softmax(self.runner(batch), dim=1)

    def postprocess(self, probabilities: torch.Tensor, topk: int) -> list:
        values, indices = probabilities.topk(topk)
        return [
            {"label": self.labels[index], "index": index, "probability": value}
            for value, index in zip(values.tolist(), indices.tolist())
        ]

    def handle(self, data, context):
        if context.get_request_header(0, "describe") == "True":  # GET /models/NAME?customized=true
            return [json.dumps(self.meta)]
        with busy_marker():
            return self.handle_batch(data, context)

    def handle_batch(self, data, context):
        responses = [None] * len(data)
        accepted, tensors = [], []
        for idx, request in enumerate(data):
            try:
                tensor, topk = self.preprocess(request, context.get_all_request_header(idx))
            except RequestError as err:
                context.set_response_status(err.status, err.type, idx=idx)
                context.set_response_content_type(idx, "application/json")
                responses[idx] = err.body()
                continue
            accepted.append((idx, topk))
            tensors.append(tensor)
        if tensors:
            probabilities = self.inference(torch.stack(tensors))
            for (idx, topk), row in zip(accepted, probabilities):
                context.set_response_content_type(idx, "application/json")
                responses[idx] = self.postprocess(row, topk)
        return responses
