"""Tuning an archive for the machine that builds it: its backend (its workers and batch size are
measured under load after: measured_load.py).

Each runtime of handlers/runtimes.py (eager with channels_last, frozen TorchScript, ONNX Runtime,
OpenVINO) is exported from the eager model (or, for channels_last, the same model stored NHWC),
loaded with the worker's own code and the worker's thread count, and
 - checked: the task's answers on random images, batches of 1 and 3, within the task's
   PARITY_TOLERANCE of eager's (classification: softmax probabilities within 1e-4); a candidate
   that fails to export or differs more is dropped;
 - timed: the median forward after a warm-up, per image, at batch 1 and at the served batch size.
`auto` keeps the fastest that passed (eager always passes). The report goes into tvserve.json.
Detection and segmentation models take images of their own sizes (a list, or one forward each),
which the exporters here are not made for: they run eager, timed the same way on a preprocessed
0.5 MP photo, and the report says why the others were not tried (select_eager).
With precision int8, the int8 runtimes are exported from calibration images and timed beside the
fp32 ones (so the record shows what int8 gains here); they are held to no parity tolerance, their
cost is measured on the held-out images instead (calibration.py), and the fastest int8 one is kept.
tf32, bf16 and fp16 are applied to eager PyTorch (handlers/precision.py): only the eager runtimes
are tried, timed in that precision, and the effect is measured afterwards (calibration.py).
"""

import copy
import io
import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from handlers.devices import PilPreprocessing
from handlers.precision import apply_precision
from handlers.record import Preset
from handlers.runtimes import RUNTIMES, backends_of, export, load_runner, quantized_runtime, set_threads
from tvserve import TvserveError

log = logging.getLogger(__name__)

PARITY_BATCHES = (1, 3)
TIME_BUDGET_S = 1.0  # per candidate and batch size, after the warm-up
WARMUP_RUNS = 3
MAX_RUNS = 60
TIMED_BATCH = 4  # the largest batch timed: bigger ones cost archive time for little news
RUNS_PER_TURN = 3
TURN_PAUSE_S = 0.02


def median_ms(runners: dict, batch: torch.Tensor, warmup: int = WARMUP_RUNS, per_turn: int = RUNS_PER_TURN) -> dict:
    """{name: median ms of one forward of `batch`}. The runners take turns, `per_turn` forwards each,
    round after round, so that a load spike on the machine hits them all alike; a short pause
    before each turn lets the previous runtime's threads go idle (some spin for a while). Models
    of seconds per forward (Mask R-CNN on 2 cores) take fewer warm-up and per-turn runs."""
    for runner in runners.values():
        for _ in range(warmup):
            runner(batch)
    times = {name: [] for name in runners}
    deadline = time.perf_counter() + TIME_BUDGET_S * len(runners)
    while len(next(iter(times.values()))) < MAX_RUNS:
        for name, runner in runners.items():
            time.sleep(TURN_PAUSE_S)
            for _ in range(per_turn):
                start = time.perf_counter()
                runner(batch)
                times[name].append((time.perf_counter() - start) * 1000)
        if time.perf_counter() > deadline:  # at least one turn each, however slow the model
            break
    return {name: statistics.median(values) for name, values in times.items()}


def timing(alone: float, together: float, size: int) -> dict:
    """A candidate's timings, ms per image: alone (batch 1) and in a batch of `size` (the `together`
    ms of the whole batch, shared out); its score "ms" is the slower of the two, so the choice
    holds at low and high load (a runtime can be slower per image in batches)."""
    return {"ms_batch_1": round(alone, 3), f"ms_batch_{size}": round(together / size, 3),
            "ms": round(max(alone, together / size), 3)}


def parity_gap(task, runner, reference, inputs) -> float:
    """The task's largest answer difference between `runner` and eager `reference` over `inputs`."""
    return max(task.parity_gap(runner(x), reference(x)) for x in inputs)


def try_candidate(name, task, model, eager, inputs, crop, threads, folder, calibration=None, prepared=None) -> tuple:
    """(report, runner) for one backend: report {"name", "parity", "file"?}, or
    {"name", "error"} and no runner when it fails to export, load or (fp32) match eager.
    `calibration`: Tensor[N, 3, crop, crop] batches for an int8 runtime's exporter; `prepared`:
    {name: file} already exported (int8: the recipe search's choice)."""
    precision = RUNTIMES[name].precision
    try:
        path = RUNTIMES[name].file and ((prepared or {}).get(name)
                                        or export(name, model, crop, folder, calibration=calibration))
        own = copy.deepcopy(model) if name == "eager_channels_last" else None  # .to() converts in place
        runner = eager if name == "eager" else load_runner(name, model=own, path=path, threads=threads)
        with torch.inference_mode():
            gap = parity_gap(task, runner, eager, inputs)
    except Exception as err:  # noqa: BLE001 - an exporter or runtime that cannot take this model
        return {"name": name, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"}, None
    if precision == "fp32" and gap > task.PARITY_TOLERANCE:
        return {"name": name, "error": f"{task.parity_what} differ from eager by {gap:.2e}"}, None
    return {"name": name, "parity": gap, **({"precision": precision} if precision != "fp32" else {}),
            **({"file": str(path)} if path else {})}, runner


def candidate_names(wanted: str, precision: str) -> tuple:
    """The backends to try: every one of `precision` for auto (for int8, every fp32 one too, timed
    beside them; tf32, bf16 and fp16: the eager ones), else eager (the reference) and `wanted`.
    Raises TvserveError for a backend unknown or of another precision."""
    fp32, chosen = backends_of("fp32"), backends_of(precision)
    if wanted != "auto" and wanted not in chosen:
        others = f" (it runs in {RUNTIMES[wanted].precision})" if wanted in RUNTIMES else ""
        raise TvserveError(f"Unknown {precision} backend {wanted!r}{others}: choose auto, {', '.join(chosen)}.")
    if wanted == "auto":
        return fp32 + chosen if precision == "int8" else chosen  # int8: shows what it gains over fp32
    return tuple(dict.fromkeys(("eager", wanted)))  # eager: the reference, always timed


def select_backend(model: torch.nn.Module, task, crop: int, threads: int, wanted: str, folder: Path,
                   batch: int = 1, precision: str = "fp32", calibration=None, prepared=None) -> dict:
    """Tries `wanted` (or every backend of `precision` for "auto") on `model` and returns
    {"name", "file" (None for eager), "precision", "selection": {"threads", "candidates": [...]}}.
    Each candidate is timed at batch 1 and at the served batch size (at most TIMED_BATCH), per
    image; its score ("ms") is the slower of the two, so the choice holds at low and high load
    (a runtime can be slower per image in batches). int8 needs `calibration` batches, or its file
    in `prepared` ({name: path}, made by calibration.choose_recipe)."""
    names = candidate_names(wanted, precision)
    previous = torch.get_num_threads()
    set_threads(threads)
    try:
        torch.manual_seed(0)
        inputs = [torch.randn(n, 3, crop, crop) for n in PARITY_BATCHES]
        eager = load_runner("eager", model=model.eval())
        tried = [try_candidate(name, task, model, eager, inputs, crop, threads, folder, calibration, prepared)
                 for name in names]
        runners = {report["name"]: apply_precision(runner, precision, "cpu") for report, runner in tried if runner}
        batched = torch.randn(min(batch, TIMED_BATCH), 3, crop, crop)
        with torch.inference_mode():
            alone = median_ms(runners, inputs[0])
            together = median_ms(runners, batched) if len(batched) > 1 else alone
        candidates = [{**report, **(timing(alone[name], together[name], len(batched)) if name in runners else {})}
                      for report, _ in tried for name in [report["name"]]]
    finally:
        torch.set_num_threads(previous)
    for candidate in candidates:
        gap = "gap on random inputs" if "precision" in candidate else "parity"  # int8: measured on images instead
        log.info("backend %-19s %s", candidate["name"], f"{candidate['ms']:.2f} ms/image, {gap} {candidate['parity']:.1e}"
                 if "ms" in candidate else f"refused: {candidate['error']}")
    eligible = [c for c in candidates if c["name"] in backends_of(precision) and (wanted in ("auto", c["name"]))]
    passed = [c for c in eligible if "ms" in c]
    if not passed:
        refused = eligible[0] if wanted == "auto" else next(c for c in candidates if c["name"] == wanted)
        fallback = "Use --backend auto or eager." if precision == "fp32" else "Archive in fp32."
        raise TvserveError(f"Backend {refused['name']} cannot serve this model: {refused['error']}. {fallback}")
    best = min(passed, key=lambda c: c["ms"])
    return {"name": best["name"], "file": best.get("file"), "precision": precision,
            "selection": {"wanted": wanted, "threads": threads, "cpu": cpu_name(),
                          "candidates": [{k: v for k, v in c.items() if k != "file"} for c in candidates]}}


def select_eager(model: torch.nn.Module, task, preset: Preset, threads: int, wanted: str, batch: int = 1) -> dict:
    """select_backend for tasks whose images keep their own sizes: eager only, timed per image on
    the preprocessed sample photo at batch 1 and at the served batch size (at most TIMED_BATCH)."""
    if wanted not in ("auto", "eager"):
        raise TvserveError(f"Backend {wanted} cannot serve this model: {task.name} models take images of their "
                           "own sizes, which tvserve's exports are not checked for. Use --backend auto or eager.")
    previous = torch.get_num_threads()
    set_threads(threads)
    try:
        image = PilPreprocessing(preset)(sample_jpeg())
        eager = load_runner("eager", model=model.eval())
        size = min(batch, TIMED_BATCH)
        runners = {"eager": lambda b: task.forward(eager, b)}
        with torch.inference_mode():
            alone = median_ms(runners, task.batch([image]), warmup=1, per_turn=1)["eager"]
            together = median_ms(runners, task.batch([image] * size), warmup=1, per_turn=1)["eager"] if size > 1 else alone
    finally:
        torch.set_num_threads(previous)
    log.info("backend eager: %.1f ms/image (%s: exports not tried)", alone, task.name)
    eager_report = {"name": "eager", "parity": 0.0, **timing(alone, together, size)}
    others = [{"name": name, "error": f"not tried: {task.name} models take images of their own sizes"}
              for name in RUNTIMES if name != "eager"]
    return {"name": "eager", "file": None,
            "selection": {"wanted": wanted, "threads": threads, "cpu": cpu_name(), "candidates": [eager_report, *others]}}


def select_quantized(model: torch.nn.Module, fp32_model: torch.nn.Module, engine: str, crop: int, threads: int,
                     batch: int = 1) -> dict:
    """select_backend for a classifier torchvision quantized: its engine's runtime (quantized_fbgemm,
    quantized_qnnpack), the only one its int8 weights run on, timed in turns with `fp32_model` (its
    fp32 counterpart, eager) on random images at batch 1 and at the served batch size (at most
    TIMED_BATCH), per image. Returns select_backend's dict, precision int8."""
    name = quantized_runtime(engine)
    previous = torch.get_num_threads()
    set_threads(threads)
    try:
        runners = {name: load_runner(name, model=model), "eager": load_runner("eager", model=fp32_model.eval())}
        torch.manual_seed(0)
        alone_batch, batched = torch.randn(1, 3, crop, crop), torch.randn(min(batch, TIMED_BATCH), 3, crop, crop)
        with torch.inference_mode():
            alone = median_ms(runners, alone_batch)
            together = median_ms(runners, batched) if len(batched) > 1 else alone
    finally:
        torch.set_num_threads(previous)
    size = len(batched)
    candidates = [{"name": name, "precision": "int8", **timing(alone[name], together[name], size)},
                  {"name": "eager", "model": "fp32 counterpart", **timing(alone["eager"], together["eager"], size)}]
    log.info("backend %s: %.2f ms/image, its fp32 counterpart (eager) %.2f ms/image", name, candidates[0]["ms"],
             candidates[1]["ms"])
    return {"name": name, "file": None, "precision": "int8",
            "selection": {"wanted": name, "threads": threads, "cpu": cpu_name(), "candidates": candidates}}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def sample_jpeg(width: int = 866, height: int = 577, seed: int = 0) -> bytes:
    """A 0.5 MP photo-like JPEG (smooth gradients and grain) for timing preprocessing; other seeds
    give other grain, and their colour channels in another order (measuring a precision's effect)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    if seed:
        pixels = pixels[..., rng.permutation(3)]
    pixels += rng.normal(0, 12, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def archive_cores() -> int:
    """The cores this machine's archives are sized for (recorded in the archive's Sizing)."""
    return os.cpu_count() or 1
