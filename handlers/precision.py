"""The numeric precision a worker runs its model in: the one place that says what each name does.

    fp32  IEEE float32 everywhere. On CUDA, TF32 is turned off for cuDNN convolutions and matmuls
          (PyTorch allows it for cuDNN by default, which moved resnet50's served probabilities
          2.8e-3 from the CPU's; off, 5.9e-6). On a CPU this is what PyTorch does anyway.
    tf32  float32 tensors, TF32 tensor-core math allowed for convolutions and matmuls on CUDA.
          A CPU has no TF32: there it computes fp32.
    bf16  the eager model under torch.autocast(device type, torch.bfloat16), on CUDA and on a CPU;
          the outputs go back to float32 (runtimes.to_cpu).
    fp16  the same with torch.float16.
    int8  an exported ONNX Runtime int8 model (handlers/runtimes.py), made at archive time from
          calibration images; it needs that file, so a server cannot switch to it.

The archive records its precision (handlers/record.py Backend.precision); a server may override it
for every worker with the environment variable TVSERVE_PRECISION (`tvserve serve --precision`),
among the precisions that run from the archive's weights alone (OVERRIDES).
"""

from dataclasses import dataclass

import torch

ENV = "TVSERVE_PRECISION"  # read by the worker; other tools (benchmarks) set it by this name


@dataclass(frozen=True)
class Precision:
    """What one precision does on each device: `tf32` whether CUDA may use TF32 math for float32
    convolutions and matmuls, `autocast` the dtype the eager model runs under torch.autocast
    (None: no autocast), `from_weights` whether any eager model can run in it (int8 cannot)."""

    name: str
    on_cuda: str
    on_cpu: str
    tf32: bool = False
    autocast: torch.dtype = None
    from_weights: bool = True


PRECISIONS = {precision.name: precision for precision in (
    Precision("fp32", on_cuda="IEEE fp32 (TF32 off)", on_cpu="IEEE fp32"),
    Precision("tf32", on_cuda="fp32 tensors, TF32 math in convolutions and matmuls", tf32=True,
              on_cpu="IEEE fp32 (a CPU has no TF32)"),
    Precision("bf16", on_cuda="torch.autocast(cuda, bfloat16)", on_cpu="torch.autocast(cpu, bfloat16)",
              autocast=torch.bfloat16),
    Precision("fp16", on_cuda="torch.autocast(cuda, float16)", on_cpu="torch.autocast(cpu, float16)",
              autocast=torch.float16),
    Precision("int8", on_cuda="not on CUDA: the worker runs fp32 eager", on_cpu="ONNX Runtime int8 (exported file)",
              from_weights=False),
)}
OVERRIDES = tuple(name for name, precision in PRECISIONS.items() if precision.from_weights)


def get_precision(name: str, allowed: tuple = tuple(PRECISIONS)) -> Precision:
    """The precision called `name`; ValueError listing the allowed names otherwise."""
    if name not in allowed:
        raise ValueError(f"Invalid precision {name!r}. Only {', '.join(allowed)} are supported.")
    return PRECISIONS[name]


def serving_precision(recorded: str, override: str = None) -> str:
    """The precision a worker runs in: the archive's `recorded` one, or `override` (TVSERVE_PRECISION)
    when set, which must be one of OVERRIDES."""
    if not override:
        return get_precision(recorded).name
    try:
        return get_precision(override, OVERRIDES).name
    except ValueError as err:
        raise ValueError(f"{ENV}={override}: {err} int8 needs the exported file of an archive built with "
                         "--precision int8; unset the override to serve an archive in its own precision.") from None


def describe(name: str, device) -> str:
    """What precision `name` does on `device` (cpu, cuda:N), for the worker's log and the record."""
    precision = get_precision(name)
    return f"{name}: {precision.on_cuda if torch.device(device).type == 'cuda' else precision.on_cpu}"


def set_tf32(precision: Precision, device) -> None:
    """On CUDA, allows TF32 for cuDNN convolutions and for matmuls exactly when `precision` does
    (process-wide: a worker serves one model). A CPU has no TF32: nothing to set."""
    if torch.device(device).type != "cuda":
        return
    mode = "tf32" if precision.tf32 else "ieee"
    torch.backends.cudnn.conv.fp32_precision = mode
    torch.backends.cuda.matmul.fp32_precision = mode


class Autocast:
    """A runner run under torch.autocast(`device_type`, `dtype`): float32 Tensor[N, 3, H, W] in,
    the model's output back in float32 (the eager runner's to_cpu converts it)."""

    def __init__(self, runner, device_type: str, dtype: torch.dtype):
        self.runner, self.device_type, self.dtype = runner, device_type, dtype

    def __call__(self, batch):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.runner(batch)


def apply_precision(runner, name: str, device):
    """`runner` set up to run in precision `name` on `device`: TF32 on or off (CUDA only), and
    autocast around it for bf16 and fp16 (an eager runner: runtimes.runtime_for picks one).
    fp32 and int8 runners come back as they are."""
    precision = get_precision(name)
    set_tf32(precision, device)
    if precision.autocast is None:
        return runner
    return Autocast(runner, torch.device(device).type, precision.autocast)
