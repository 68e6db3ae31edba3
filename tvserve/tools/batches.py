"""In-process rows at several batch sizes: the handler's whole pipeline against the forward alone.

For each precision (fp32, tf32, bf16, fp16) and decode path (pil: exact; tensor: torchvision.io,
nvJPEG on a GPU) and each batch size, one archive's handler is loaded in this process as a
TorchServe worker loads it, and timed two ways on the same JPEG bodies:

  (a) forward    `handler.inference(batch)`: the preprocessed batch already on the worker's device,
                 forward, softmax and the copy back: the most the card can do
  (b) pipeline   `handler.handle(requests, context)`, exactly as the worker calls it for a batch of
                 that many requests: decode, preprocess, forward, top-k, JSON

in images per second. (b) / (a) says how well the pipeline feeds the device (the GPU issue's
target: resnet50 fp32 at batch 64 >= 0.5). fp32's parity against the same model in fp32 on the CPU
(largest probability change over the bodies; on a CPU-only machine it is the CPU itself) keeps the
1e-4 rule honest on every device.

The precision and decode path are chosen the way an operator chooses them when serving
(TVSERVE_PRECISION, TVSERVE_DECODE), so a row is what a worker started that way does.
"""

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from ts.context import Context, RequestProcessor

from handlers.devices import model_device
from handlers.record import DECODE_ENV
from handlers.precision import ENV as PRECISION_ENV
from tvserve.tools.inprocess import load_handler, probabilities, time_loop

log = logging.getLogger(__name__)

GPU_BATCHES = (1, 8, 32, 64)
GPU_PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
DECODES = ("pil", "tensor")
PARITY_TOLERANCE = 1e-4  # fp32 on any device against fp32 on the CPU (docs/precision.md, "Precision")


@dataclass
class BatchRun:
    batches: tuple = GPU_BATCHES
    precisions: tuple = GPU_PRECISIONS
    decodes: tuple = DECODES
    duration: float = 4.0  # s measured per point
    warmup: float = 1.0  # s of the same calls first (cuDNN picks its kernels, caches fill)
    gpu_id: int = 0 if torch.cuda.is_available() else None


@contextlib.contextmanager
def serving_as(precision: str, decode: str):
    """Inside, workers initialised in this process run in `precision` with `decode` (the variables
    `tvserve serve --precision/--decode` sets for its workers)."""
    saved = {name: os.environ.get(name) for name in (PRECISION_ENV, DECODE_ENV)}
    os.environ.update({PRECISION_ENV: precision, DECODE_ENV: decode})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def batch_context(handler, size: int) -> Context:
    """TorchServe's own Context for a batch of `size` plain /predictions requests."""
    context = Context(handler.record.name, None, {}, size, None, "tvserve-bench")
    context.request_processor = [RequestProcessor({}) for _ in range(size)]
    return context


def run_handle(handler, requests: list) -> None:
    """One batch through the worker's entry point; raises unless every request answered 200."""
    context = batch_context(handler, len(requests))
    handler.handle(requests, context)
    failed = [(i, p.get_response_status_code()) for i, p in enumerate(context.request_processor)
              if p.get_response_status_code() != 200]
    if failed:
        raise RuntimeError(f"batch rows: requests answered {failed}, not 200: see the handler's log")


def point(handler, bodies: list, batch: int, device: str, run: BatchRun) -> dict:
    """(a) and (b) images/s at `batch`, bodies taken in turn."""
    picked = [bodies[i % len(bodies)] for i in range(batch)]
    requests = [{"body": bytearray(body)} for body in picked]
    inputs = torch.stack([handler.preprocess({"body": body}, {})[0].to(device) for body in picked])
    with torch.inference_mode():
        # both end on the CPU (the scores are copied back, the answers encoded), so each call waits for the GPU
        forward = time_loop(lambda: handler.inference(inputs), run.duration / 2, run.warmup / 2)
    pipeline = time_loop(lambda: run_handle(handler, requests), run.duration / 2, run.warmup / 2)
    return {"forward_img_s": round(forward["rps"] * batch, 1), "pipeline_img_s": round(pipeline["rps"] * batch, 1),
            "pipeline_p50_ms": pipeline["p50_ms"], "pipeline_p99_ms": pipeline["p99_ms"],
            "fed": round(pipeline["rps"] / forward["rps"], 3) if forward["rps"] else None}


def parity_gap(handler, reference, bodies: list) -> float:
    """Largest |probability change| between `handler` and the CPU fp32 `reference` over `bodies`."""
    return max((probabilities(handler, body).cpu() - probabilities(reference, body)).abs().max().item()
               for body in bodies)


def batch_rows(model: str, mar: Path, bodies: list, folder: Path, run: BatchRun) -> dict:
    """{"rows": one per (precision, decode, batch), "parity": fp32 on the worker's device against
    fp32 on the CPU, per decode path} for the archive `mar`."""
    device = model_device(run.gpu_id)
    rows, parity = [], {}
    for precision in run.precisions:
        for decode in run.decodes:
            with serving_as(precision, decode):
                handler = load_handler(mar, folder / f"{precision}-{decode}", gpu_id=run.gpu_id)
            if precision == "fp32":
                with serving_as("fp32", decode):  # the same decode path, on the CPU
                    reference = load_handler(mar, folder / f"cpu-fp32-{decode}", gpu_id=None)
                parity[decode] = parity_gap(handler, reference, bodies)
            for batch in run.batches:
                measured = point(handler, bodies, batch, device, run)
                log.info("%s %s %s batch %d: forward %.0f img/s, pipeline %.0f img/s (%.0f%%)", model, precision,
                         decode, batch, measured["forward_img_s"], measured["pipeline_img_s"],
                         100 * (measured["fed"] or 0))
                rows.append({"model": model, "precision": precision, "decode": decode, "batch": batch,
                             "device": device, "backend": handler.backend, **measured})
            del handler
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return {"rows": rows, "parity": parity, "device": device}


def markdown(model: str, result: dict) -> list:
    """Markdown lines: the rows, and fp32's parity with the CPU."""
    lines = [f"#### {model}: in-process, by batch size, on {result['device']}", "",
             "| precision | decode | batch | (a) forward img/s | (b) pipeline img/s | (b)/(a) | (b) p50 ms | (b) p99 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['precision']} | {r['decode']} | {r['batch']} | {r['forward_img_s']:.1f} | {r['pipeline_img_s']:.1f} "
              f"| {r['fed']:.2f} | {r['pipeline_p50_ms']:.1f} | {r['pipeline_p99_ms']:.1f} |" for r in result["rows"]]
    for decode, gap in result["parity"].items():
        verdict = "within" if gap <= PARITY_TOLERANCE else "BEYOND"
        lines += ["", f"fp32 ({decode} decode) on {result['device']} against fp32 on the CPU: largest probability "
                  f"change {gap:.1e}, {verdict} {PARITY_TOLERANCE:g}."]
    return lines


def targets(results: dict) -> list:
    """The GPU issue's in-process targets, measured where the rows ran (None where not measured)."""
    def best(model, precision, batch=None):
        rows = [r for r in (results.get(model) or {}).get("rows", [])
                if r["precision"] == precision and (batch is None or r["batch"] == batch)]
        return max(rows, key=lambda r: r["pipeline_img_s"], default=None)

    r50, r18 = best("resnet50", "fp32", 64), best("resnet18", "fp32")
    parity = [gap for result in results.values() for gap in result["parity"].values()]
    return [
        {"target": "resnet50 fp32 batch 64: pipeline / forward", "ratio": r50 and r50["fed"], "goal": ">= 0.5",
         "met": None if r50 is None else r50["fed"] >= 0.5},
        {"target": "resnet18 fp32 pipeline img/s (best batch and decode)", "ratio": r18 and r18["pipeline_img_s"],
         "goal": ">= 2500", "met": None if r18 is None else r18["pipeline_img_s"] >= 2500},
        {"target": "fp32 on the device against fp32 on the CPU, largest probability change",
         "ratio": max(parity, default=None), "goal": f"<= {PARITY_TOLERANCE:g}",
         "met": None if not parity else max(parity) <= PARITY_TOLERANCE},
    ]
