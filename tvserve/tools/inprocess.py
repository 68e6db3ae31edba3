"""An archive served in this process by the same handler code a TorchServe worker runs (no server).

Used by the benchmark (in-process forward and full pipeline) and by parity tests. The handler
is this checkout's `handlers/`, which is what `tvserve archive` copies into every archive.
"""

import time
import types
import zipfile
from pathlib import Path

import numpy as np
import yaml

from handlers.tvserve_handler import TvserveHandler


def load_handler(mar: Path, folder: Path, *, threads: int = None, gpu_id: int = None) -> TvserveHandler:
    """The handler initialised from `mar` unpacked into `folder`, as a worker initialises it.
    `threads` overrides the archive's thread budget (as TVSERVE_THREADS does for a worker)."""
    folder = Path(folder)
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(folder)
    config = yaml.safe_load((folder / "model-config.yaml").read_text()) or {}
    if threads:
        config = {**config, "handler": {**(config.get("handler") or {}), "threads": threads}}
    return initialise(folder, config, gpu_id=gpu_id)


def initialise(folder: Path, config: dict, gpu_id: int = None) -> TvserveHandler:
    """The handler initialised from the archive files in `folder` with the model-config.yaml `config`,
    as a worker initialises it (also the archiver's measuring workers: tvserve/archiving/measured_load.py)."""
    context = types.SimpleNamespace(
        system_properties={"model_dir": str(folder), "gpu_id": gpu_id}, model_yaml_config=config,
    )
    handler = TvserveHandler()
    handler.initialize(context)
    return handler


def probabilities(handler: TvserveHandler, image: bytes):
    """Every class's probability for one image (decode, preprocess, forward), as served."""
    tensor, _ = handler.preprocess({"body": image}, {})
    return handler.inference(tensor.unsqueeze(0))[0]


def predict(handler: TvserveHandler, image: bytes) -> list:
    """The full pipeline for one image: decode, preprocess, forward, top-k, as served."""
    tensor, options = handler.preprocess({"body": image}, {})
    return handler.postprocess(handler.inference(tensor.unsqueeze(0))[0], options)


def percentiles(latencies_ms: list, seconds: float) -> dict:
    q = np.percentile(latencies_ms, [50, 90, 99])
    return {"rps": round(len(latencies_ms) / seconds, 2), "p50_ms": round(q[0], 2), "p90_ms": round(q[1], 2),
            "p99_ms": round(q[2], 2), "requests": len(latencies_ms), "errors": 0}


def time_loop(call, duration: float, warmup: float) -> dict:
    """Calls `call()` back to back: `warmup` s unmeasured, then `duration` s measured."""
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        call()
    latencies, start = [], time.perf_counter()
    while (now := time.perf_counter()) - start < duration:
        call()
        latencies.append((time.perf_counter() - now) * 1000)
    return percentiles(latencies, time.perf_counter() - start)
