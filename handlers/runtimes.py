"""Runtimes the worker can run a model with, one registry entry each: eager PyTorch (NCHW or
channels_last), frozen TorchScript, ONNX Runtime and OpenVINO in float32, ONNX Runtime in int8,
and PyTorch's own quantized engines (fbgemm, qnnpack) for torchvision's int8 classifiers.

An entry names its exported file (none for eager), how to export it from the eager model (used at
archive time, tvserve/archiving/tuning.py), how to load it (used in the worker) and its precision.
Every runner maps a float32 Tensor[N, 3, H, W] to the model's raw output Tensor[N, ...] in float32
(eager also a list of Tensor[3, H, W] of different sizes, for detection models, to their list of
dicts), with `threads` intra-op threads and one inter-op thread. An fp32 runtime's answers stay
within the task's parity tolerance of eager; an int8 one's are not exact, and its cost is measured
on the user's own images instead (tvserve/archiving/calibration.py). Exported files run on the CPU only:
on a CUDA device, and in the precisions applied to eager PyTorch (tf32, bf16, fp16:
handlers/precision.py), the worker runs eager from the weights, in channels_last where the archive
chose it (runtime_for). Adding a runtime is one `Runtime(...)` in RUNTIMES.
"""

import contextlib
import io
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from handlers.precision import get_precision


class Eager:
    """The model itself; `channels_last` stores weights and inputs NHWC (faster for some CPUs/GPUs)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, channels_last: bool = False):
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.model, self.device = model.to(device, memory_format=self.format), device

    def __call__(self, batch):
        if isinstance(batch, torch.Tensor):
            batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=self.format)
        elif isinstance(batch, tuple):  # the model's positional arguments (optical flow: the two images)
            return to_cpu(self.model(*[tensor.to(self.device, non_blocking=True) for tensor in batch]))
        else:  # detection models: a list of images of their own sizes
            batch = [image.to(self.device, non_blocking=True) for image in batch]
        return to_cpu(self.model(batch))


def to_cpu(output):
    """The model's output on the CPU, floating tensors in float32; dicts and lists (detection and
    segmentation outputs) item by item."""
    if isinstance(output, torch.Tensor):
        return output.float().cpu() if output.is_floating_point() else output.cpu()
    if isinstance(output, dict):
        return type(output)((key, to_cpu(value)) for key, value in output.items())
    if isinstance(output, (list, tuple)):
        return type(output)(to_cpu(value) for value in output)
    return output


class TorchScript:
    """A traced module, frozen (weights folded in as constants) and optimised when loaded: a frozen
    module does not survive torch.jit.save/load in torch 2.14, a traced one does."""

    def __init__(self, path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
            traced = torch.jit.load(str(path), map_location="cpu").eval()
            self.module = torch.jit.optimize_for_inference(torch.jit.freeze(traced))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.module(batch)


class OnnxRuntime:
    def __init__(self, path, threads: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle threads sleep instead of spinning: a spinning pool takes the cores that decoding,
        # the other workers and TorchServe's frontend need between forwards.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: batch.numpy()})[0])


class OpenVino:
    def __init__(self, path, threads: int):
        import openvino

        self.compiled = openvino.Core().compile_model(str(path), "CPU", {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",  # never bf16/fp16, even where the CPU has them
            # OpenVINO pins its threads to cores by default, the same cores in every process: two
            # workers of one thread each then ran one at a time (resnet18, 2 cores, c=4: 26 req/s
            # pinned, 48 not), and a worker's prepare threads and TorchServe's frontend share them.
            "ENABLE_CPU_PINNING": False,
        })
        self.request = self.compiled.create_infer_request()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.request.infer([batch.numpy()])[0].copy())


class Quantized:
    """A torch.ao int8 module (torchvision.models.quantization) on the CPU, on the quantized engine its
    weights were packed for. PyTorch keeps one engine per process, so it is set before each forward
    (one attribute write): runners of both engines can share a process (the archiver, tests). Its
    int8 kernels exist for the CPU only: a batch on another device is copied to the CPU."""

    def __init__(self, model: torch.nn.Module, engine: str):
        self.model, self.engine = model.eval(), engine

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        torch.backends.quantized.engine = self.engine
        return self.model(batch.cpu())


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, example), str(path))  # frozen when loaded


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    if not path.exists():  # ONNX Runtime and OpenVINO read the same ONNX file
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})


@dataclass(frozen=True)
class Int8Recipe:
    """How ONNX Runtime's static quantizer makes the int8 model: the activation ranges' calibration
    `method` (MinMax: the extremes seen; Percentile: the 99.999th percentile of |x|; Entropy: the
    range whose 8-bit histogram keeps the KL divergence from the full one smallest, entropy_ranges), int8 weights `per_channel` (one scale
    per output channel) or per tensor, and the graph's `quant_format`: QOperator (quantized
    operators, e.g. QLinearConv) or QDQ (QuantizeLinear/DequantizeLinear pairs around float
    operators, fused by ONNX Runtime). Activations are uint8, weights int8, whatever the recipe."""

    method: str = "MinMax"
    per_channel: bool = True
    quant_format: str = "QOperator"

    def describe(self) -> str:
        return (f"onnxruntime.quantization.quantize_static: {self.quant_format} ops, int8 weights per "
                f"{'output channel' if self.per_channel else 'tensor'}, uint8 activations, {self.method} ranges "
                "from the calibration images")

    def to_dict(self) -> dict:
        return {"method": self.method, "per_channel": self.per_channel, "quant_format": self.quant_format}


DEFAULT_INT8_RECIPE = Int8Recipe()  # the first tried: the fastest here (docs/precision.md)


class CalibrationBatches:
    """ONNX Runtime's CalibrationDataReader over preprocessed images, Tensor[N, 3, H, W] float32
    batches: one {input: array[1, 3, H, W]} per image, then None. One image at a time: ONNX Runtime
    1.32's histogram calibrators (Percentile, Entropy) stack what they collect and fail on a last
    batch smaller than the others."""

    def __init__(self, batches, input_name: str = "image"):
        self.images, self.input_name = (image for batch in batches for image in batch.split(1)), input_name

    def get_next(self):
        image = next(self.images, None)
        return None if image is None else {self.input_name: image.numpy()}


ENTROPY_BINS = {"num_bins": 2048, "num_quantized_bins": 128}  # TensorRT's: 2048-bin histograms, 128-bin candidates


def entropy_ranges(prepared: Path, calibration, cache: Path) -> None:
    """Writes ONNX Runtime's calibration cache `cache` with Entropy ranges (the KL-divergence search
    TensorRT uses) from ENTROPY_BINS histograms of `calibration` batches. quantize_static's own
    Entropy passes no bin counts: 128 bins searched at 128 leave one candidate, the whole range."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator, save_tensors_data

    calibrator = create_calibrator(prepared, augmented_model_path=str(Path(prepared).with_name("augmented.onnx")),
                                   calibrate_method=CalibrationMethod.Entropy, extra_options=ENTROPY_BINS)
    calibrator.collect_data(CalibrationBatches(calibration))
    save_tensors_data(calibrator.compute_data(), cache)


def export_onnx_int8(model: torch.nn.Module, example: torch.Tensor, path: Path, calibration=(),
                     recipe: Int8Recipe = DEFAULT_INT8_RECIPE, ranges: Path = None) -> None:
    """Post-training static quantization of the ONNX export by `recipe`: activation ranges from
    `calibration`, an iterable of Tensor[N, 3, H, W] float32 batches preprocessed as the worker
    does. `ranges` (optional): ONNX Runtime's calibration cache, a JSON file of the ranges, written
    on first use and read after, so that recipes of one method share one calibration. The
    quantizer runs at archive time only; the worker needs ONNX Runtime alone."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="tvserve-int8-") as tmp, \
            contextlib.redirect_stdout(io.StringIO()):  # the calibrators print their progress: not on the CLI's stdout
        fp32, prepared = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx"
        export_onnx(model, example, fp32)
        quant_pre_process(str(fp32), str(prepared))  # shapes inferred and graph folded, as the quantizer expects
        ranges = Path(ranges or Path(tmp) / "ranges.json")
        if recipe.method == "Entropy" and not ranges.exists():
            entropy_ranges(prepared, calibration, ranges)
        quantize_static(str(prepared), str(path), CalibrationBatches(calibration),
                        quant_format=QuantFormat[recipe.quant_format], per_channel=recipe.per_channel,
                        calibrate_method=CalibrationMethod[recipe.method], calibration_cache_path=ranges,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


@dataclass(frozen=True)
class Runtime:
    """One way to run a model. `load(model=, path=, threads=, device=)` returns the runner;
    `export(model, example, path[, calibration])` writes `file` from the eager model (None: built
    from the weights); an int8 runtime's exporter also takes the calibration batches."""

    name: str
    load: Callable
    file: str = None
    export: Callable = None
    precision: str = "fp32"  # fp32: within the task's parity tolerance of eager; int8: measured on images
    own_threads: bool = False  # its threads are its session's (`load(threads=)`), not torch's (set_threads)
    engine: str = None  # a quantized engine: serves only models torchvision quantized for it, never tried on others


RUNTIMES = {runtime.name: runtime for runtime in (
    Runtime("eager", lambda model, device, **_: Eager(model, device)),
    Runtime("eager_channels_last", lambda model, device, **_: Eager(model, device, channels_last=True)),
    Runtime("torchscript", lambda path, **_: TorchScript(path), "model.ts", export_torchscript),
    Runtime("onnxruntime", lambda path, threads, **_: OnnxRuntime(path, threads), "model.onnx", export_onnx,
            own_threads=True),
    Runtime("openvino", lambda path, threads, **_: OpenVino(path, threads), "model.onnx", export_onnx,
            own_threads=True),
    Runtime("onnxruntime_int8", lambda path, threads, **_: OnnxRuntime(path, threads), "model.int8.onnx",
            export_onnx_int8, precision="int8", own_threads=True),
    *(Runtime(f"quantized_{engine}", lambda model, engine=engine, **_: Quantized(model, engine), precision="int8",
              engine=engine) for engine in ("fbgemm", "qnnpack")),
)}


def get_runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise ValueError(f"Unknown backend {name!r}: this archive needs a newer tvserve ({', '.join(RUNTIMES)} known).")
    return RUNTIMES[name]


def export(name: str, model: torch.nn.Module, crop: int, folder: Path, calibration=None,
           recipe: Int8Recipe = DEFAULT_INT8_RECIPE, ranges: Path = None) -> Path:
    """Writes runtime `name`'s file for `model` (eval mode, CPU) into `folder`; returns its path.
    An int8 runtime needs `calibration`: Tensor[N, 3, crop, crop] float32 batches, quantized by
    `recipe`, with its activation ranges kept in (or read from) `ranges` when given."""
    runtime = get_runtime(name)
    path = Path(folder) / runtime.file
    extra = {} if runtime.precision == "fp32" else {"calibration": calibration, "recipe": recipe, "ranges": ranges}
    if runtime.precision != "fp32" and not calibration:
        raise ValueError(f"Backend {name} runs in {runtime.precision} and needs calibration images.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's and the TorchScript-based ONNX exporter's deprecation notices
        runtime.export(model, torch.randn(1, 3, crop, crop), path, **extra)
    return path


def set_threads(threads: int) -> None:
    """torch's intra-op threads for this process, and one inter-op thread where still settable."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass


def load_runner(name: str, *, model=None, path=None, threads: int = 1, device: str = "cpu"):
    """The runner for runtime `name`: eager ones need `model`, the others their exported file `path`.
    Off the CPU, an exported runtime runs as eager (runtime_for; the model must be given)."""
    device = torch.device(device)
    return get_runtime(runtime_for(name, device)).load(model=model, path=path, threads=threads, device=device)


EAGER = tuple(name for name, runtime in RUNTIMES.items() if runtime.file is None and not runtime.engine)  # from weights


def backends_of(precision: str) -> tuple:
    """The runtimes that run in `precision`, in registry order: those of their own precision (fp32,
    int8), else the eager ones, which tf32, bf16 and fp16 are applied to (handlers/precision.py).
    The quantized engines are not among them: they run only the models quantized for them."""
    get_precision(precision)
    return tuple(name for name, runtime in RUNTIMES.items()
                 if runtime.precision == precision and not runtime.engine) or EAGER


def quantized_runtime(engine: str) -> str:
    """The runtime of quantized `engine` (fbgemm, qnnpack: a torchvision int8 weights' meta "backend")."""
    names = [name for name, runtime in RUNTIMES.items() if runtime.engine == engine]
    if not names:
        raise ValueError(f"No runtime for the quantized engine {engine!r}: this tvserve runs "
                         f"{', '.join(runtime.engine for runtime in RUNTIMES.values() if runtime.engine)}.")
    return names[0]


def runtime_for(name: str, device="cpu", precision: str = None) -> str:
    """The runtime a worker on `device` runs an archive whose backend is `name` with, in `precision`
    (None: the backend's own): the backend itself where it can (an exported file runs on the CPU
    only, in its own precision), else eager from the weights; channels_last stays where chosen. A
    quantized engine's runtime always (its weights are int8: it runs on the CPU whatever the device)."""
    precision = precision or get_runtime(name).precision  # (an unknown name is refused here)
    if get_runtime(name).engine:  # int8 weights: they run on their engine's CPU kernels or nowhere
        return name
    if name in EAGER or (torch.device(device).type == "cpu" and name in backends_of(precision)):
        return name
    return "eager"
