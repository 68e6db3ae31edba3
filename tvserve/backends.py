"""Choosing an archive's backend when it is built: export, check parity, time, keep the fastest.

Each candidate (eager with channels_last, frozen TorchScript, ONNX Runtime, OpenVINO) is exported
from the eager model (or, for channels_last, the same model stored NHWC),
loaded with the worker's own code (handlers/backends.py) and the worker's thread count, and
 - checked: its softmax probabilities on random images, batches of 1 and 3, within
   PARITY_TOLERANCE of eager's; a candidate that fails to export or differs more is dropped;
 - timed: the median of batch-1 forwards after a warm-up.
`auto` keeps the fastest that passed (eager always passes). The report goes into tvserve.json.
"""

import copy
import logging
import statistics
import time
import warnings
from pathlib import Path

import torch

from handlers.backends import BACKENDS, EAGER, EXPORT_FILES, load_runner, set_threads
from tvserve import TvserveError

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # largest allowed |p_backend - p_eager| of any softmax probability
PARITY_BATCHES = (1, 3)
TIME_BUDGET_S = 1.0  # per candidate, after the warm-up
WARMUP_RUNS = 3
MAX_RUNS = 60
RUNS_PER_TURN = 3
TURN_PAUSE_S = 0.02


def export(model: torch.nn.Module, name: str, crop: int, folder: Path) -> Path:
    """Writes backend `name`'s file for `model` (eval mode, CPU) into `folder`; returns its path."""
    path = Path(folder) / EXPORT_FILES[name]
    example = torch.randn(1, 3, crop, crop)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's and the TorchScript-based ONNX exporter's deprecation notices
        if name == "torchscript":
            with torch.no_grad():
                torch.jit.save(torch.jit.trace(model, example), str(path))  # frozen when loaded
        elif not path.exists():  # ONNX Runtime and OpenVINO read the same ONNX file
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return path


def median_ms(runners: dict, batch: torch.Tensor) -> dict:
    """{name: median ms of one forward of `batch`}. The runners take turns, a few forwards each,
    round after round, so that a load spike on the machine hits them all alike; a short pause
    before each turn lets the previous runtime's threads go idle (some spin for a while)."""
    for runner in runners.values():
        for _ in range(WARMUP_RUNS):
            runner(batch)
    times = {name: [] for name in runners}
    deadline = time.perf_counter() + TIME_BUDGET_S * len(runners)
    while len(next(iter(times.values()))) < MAX_RUNS:
        for name, runner in runners.items():
            time.sleep(TURN_PAUSE_S)
            for _ in range(RUNS_PER_TURN):
                start = time.perf_counter()
                runner(batch)
                times[name].append((time.perf_counter() - start) * 1000)
        if len(times[name]) >= 3 * RUNS_PER_TURN and time.perf_counter() > deadline:
            break
    return {name: statistics.median(values) for name, values in times.items()}


def parity_gap(runner, reference, inputs) -> float:
    """Largest |probability difference| between `runner` and eager `reference` over `inputs`."""
    return max((torch.softmax(runner(x), 1) - torch.softmax(reference(x), 1)).abs().max().item()
               for x in inputs)


def try_candidate(name, model, eager, inputs, crop, threads, folder) -> tuple:
    """(report, runner) for one backend: report {"name", "parity", "file"?}, or
    {"name", "error"} and no runner when it fails to export, load or match eager."""
    try:
        path = None if name in EAGER else export(model, name, crop, folder)
        own = copy.deepcopy(model) if name == "eager_channels_last" else None  # .to() converts in place
        runner = eager if name == "eager" else load_runner(name, model=own, path=path, threads=threads)
        with torch.inference_mode():
            gap = parity_gap(runner, eager, inputs)
    except Exception as err:  # noqa: BLE001 - an exporter or runtime that cannot take this model
        return {"name": name, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"}, None
    if gap > PARITY_TOLERANCE:
        return {"name": name, "error": f"probabilities differ from eager by {gap:.2e}"}, None
    return {"name": name, "parity": gap, **({"file": str(path)} if path else {})}, runner


def select_backend(model: torch.nn.Module, crop: int, threads: int, wanted: str, folder: Path) -> dict:
    """Tries `wanted` (or every backend for "auto") on `model` and returns
    {"name", "file" (None for eager), "selection": {"threads", "candidates": [...]}}."""
    if wanted != "auto" and wanted not in BACKENDS:
        raise TvserveError(f"Unknown backend {wanted!r}: choose auto, {', '.join(BACKENDS)}.")
    previous = torch.get_num_threads()
    set_threads(threads)
    try:
        torch.manual_seed(0)
        inputs = [torch.randn(n, 3, crop, crop) for n in PARITY_BATCHES]
        eager = load_runner("eager", model=model.eval())
        names = BACKENDS if wanted == "auto" else ("eager", wanted)
        tried = [try_candidate(name, model, eager, inputs, crop, threads, folder) for name in dict.fromkeys(names)]
        with torch.inference_mode():
            timings = median_ms({report["name"]: runner for report, runner in tried if runner}, inputs[0])
        candidates = [{**report, **({"ms": round(timings[report["name"]], 3)} if report["name"] in timings else {})}
                      for report, _ in tried]
    finally:
        torch.set_num_threads(previous)
    for candidate in candidates:
        log.info("backend %-11s %s", candidate["name"], f"{candidate['ms']:.2f} ms/image, parity {candidate['parity']:.1e}"
                 if "ms" in candidate else f"refused: {candidate['error']}")
    passed = [c for c in candidates if "ms" in c and (wanted == "auto" or c["name"] == wanted)]
    if not passed:
        refused = next(c for c in candidates if c["name"] == wanted)
        raise TvserveError(f"Backend {wanted} cannot serve this model: {refused['error']}. Use --backend auto or eager.")
    best = min(passed, key=lambda c: c["ms"])
    return {"name": best["name"], "file": best.get("file"),
            "selection": {"wanted": wanted, "threads": threads, "cpu": cpu_name(),
                          "candidates": [{k: v for k, v in c.items() if k != "file"} for c in candidates]}}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
