"""The model's runtime in the worker: eager PyTorch, frozen TorchScript, ONNX Runtime or OpenVINO.

An archive records its backend in tvserve.json, chosen when it was built (tvserve/backends.py):
    "backend": {"name": "openvino", "file": "model.onnx", "sha256": "...", "selection": {...}}
Eager archives (also eager_channels_last) have no file: the model is built from its weights. Every runner maps a float32
Tensor[N, 3, H, W] to logits Tensor[N, n_classes], with `threads` intra-op threads and one
inter-op thread, in float32 (no reduced precision: served probabilities stay within 1e-4 of eager).
On a CUDA device the worker runs eager PyTorch, whatever the archive's CPU backend.
"""

import os
import warnings

import torch

BACKENDS = ("eager", "eager_channels_last", "torchscript", "onnxruntime", "openvino")
EAGER = ("eager", "eager_channels_last")  # built from the weights, no exported file
EXPORT_FILES = {"torchscript": "model.ts", "onnxruntime": "model.onnx", "openvino": "model.onnx"}


class Eager:
    """The model itself; `channels_last` stores weights and inputs NHWC (faster for some CPUs/GPUs)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, channels_last: bool = False):
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.model, self.device = model.to(device, memory_format=self.format), device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=self.format)
        return self.model(batch).float().cpu()


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
        })
        self.request = self.compiled.create_infer_request()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.request.infer([batch.numpy()])[0].copy())


def cores_per_worker(workers: int) -> int:
    """This machine's cores shared evenly among `workers` (at least 1): workers x threads <= cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def set_threads(threads: int) -> None:
    """torch's intra-op threads for this process, and one inter-op thread where still settable."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass


def load_runner(name: str, *, model=None, path=None, threads: int = 1, device: str = "cpu"):
    """The runner for backend `name`: eager needs `model`, the others their exported file `path`."""
    if name not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}: this archive needs a newer tvserve ({', '.join(BACKENDS)} known).")
    if name in EAGER or torch.device(device).type != "cpu":
        return Eager(model, torch.device(device), channels_last=name == "eager_channels_last")
    if name == "torchscript":
        return TorchScript(path)
    if name == "onnxruntime":
        return OnnxRuntime(path, threads)
    return OpenVino(path, threads)
