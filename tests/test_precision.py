"""Precision (handlers/precision.py): what each name does, the runtime a worker picks for it, the
effect a tf32/bf16/fp16 archive records, its answers over HTTP against the in-process reference,
and the server-wide TVSERVE_PRECISION override.

All of it runs on the CPU: bf16 and fp16 by torch.autocast(cpu), tf32 as fp32 (a CPU has no TF32).
The CUDA lines (TF32 flags, channels_last on a GPU) are checked as settings and as a pure rule."""

import re

import pytest
import torch
from torch import nn

from helpers import REPO, run_tvserve, served_probabilities
from handlers.precision import ENV, OVERRIDES, PRECISIONS, Autocast, apply_precision, describe, serving_precision, set_tf32
from handlers.record import Backend, PrecisionEffect
from handlers.runtimes import EAGER, load_runner, runtime_for
from tvserve import TvserveError
from tvserve.archiving.calibration import SYNTHETIC_IMAGES
from tvserve.archiving.mar import read_record
from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_checkpoint
from tvserve.archiving.tuning import candidate_names, sample_jpeg
from tvserve.ops import client, logs
from tvserve.ops.properties import free_ports_config
from tvserve.ops.server import Server
from tvserve.tools.inprocess import load_handler, probabilities

FP32_PARITY = 1e-4  # fp32's parity tolerance on every device (docs/precision.md, "Precision")
SAME_CODE = 1e-5  # the worker against the same precision in this process: same kernels, other thread counts
N_CLASSES = 10
AUTOCAST = {"bf16": "torch.autocast(cpu, bfloat16)", "fp16": "torch.autocast(cpu, float16)"}  # as the log says


# --- the helper, no server ---

def test_fp32_on_a_cpu_is_a_no_op():
    runner = load_runner("eager", model=nn.Linear(3, 2))
    flags = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    assert apply_precision(runner, "fp32", "cpu") is runner
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == flags


def test_names_are_validated_and_the_error_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"Invalid precision 'fp64'. Only fp32, tf32, bf16, fp16, int8 are supported."):
        apply_precision(lambda batch: batch, "fp64", "cpu")
    assert OVERRIDES == ("fp32", "tf32", "bf16", "fp16")
    assert serving_precision("int8") == "int8" and serving_precision("bf16", "fp32") == "fp32"
    with pytest.raises(ValueError, match=rf"{ENV}=int8: Invalid precision 'int8'. Only fp32, tf32, bf16, fp16 are "
                                         r"supported. int8 needs the exported file"):
        serving_precision("fp32", "int8")


@pytest.mark.parametrize("name, mode", [("fp32", "ieee"), ("bf16", "ieee"), ("tf32", "tf32")])
def test_on_cuda_tf32_is_allowed_only_where_the_precision_says(name, mode):
    """The settings themselves need no GPU (a worker on CUDA sets them before its first forward)."""
    saved = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    try:
        set_tf32(PRECISIONS[name], "cuda:0")
        assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == (mode, mode)
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved
    assert describe(name, "cpu").startswith(f"{name}: ") and describe("tf32", "cpu").endswith("(a CPU has no TF32)")


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_bf16_and_fp16_run_under_autocast_and_answer_float32(name, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    batch = torch.randn(2, 3, 8, 8)
    runner = apply_precision(load_runner("eager", model=model), name, "cpu")
    assert isinstance(runner, Autocast) and runner.dtype == dtype
    with torch.inference_mode():
        reduced, exact = runner(batch), model(batch)
        with torch.autocast("cpu", dtype=dtype):
            expected = model(batch).float()
    assert reduced.dtype == torch.float32
    assert torch.equal(reduced, expected) and not torch.equal(reduced, exact)


@pytest.mark.parametrize("backend, device, precision, runtime", [
    ("eager_channels_last", "cuda:0", None, "eager_channels_last"),  # kept on a GPU where the archive chose it
    ("eager", "cuda:0", "bf16", "eager"),
    ("onnxruntime", "cuda:0", None, "eager"),  # exported files run on the CPU only
    ("torchscript", "cpu", "fp32", "torchscript"),
    ("openvino", "cpu", "bf16", "eager"),  # tf32, bf16, fp16 are applied to eager PyTorch
    ("eager_channels_last", "cpu", "fp16", "eager_channels_last"),
    ("onnxruntime_int8", "cpu", None, "onnxruntime_int8"),
    ("onnxruntime_int8", "cpu", "fp32", "eager"),  # an int8 archive served in fp32: from its weights
])
def test_the_runtime_a_worker_runs_for_its_backend_device_and_precision(backend, device, precision, runtime):
    assert runtime_for(backend, device, precision) == runtime


def test_autocast_precisions_consider_only_eager_backends():
    assert candidate_names("auto", "bf16") == EAGER and candidate_names("eager_channels_last", "fp16") == EAGER
    with pytest.raises(TvserveError, match="Unknown bf16 backend 'onnxruntime' .*choose auto, eager, eager_channels_last"):
        candidate_names("onnxruntime", "bf16")
    with pytest.raises(TvserveError, match="--backend openvino runs in fp32, not tf32: choose auto or eager, eager_"):
        ArchiveOptions(precision="tf32", backend="openvino")


def test_records_keep_their_effect_and_old_ones_have_none():
    effect = PrecisionEffect(precision="bf16", method="eager", images="2 images", measured_images=2,
                             top1_agreement=1.0, max_probability_change=0.01, min_agreement=0.99, measured_on="cpu (x)")
    backend = Backend(name="eager", precision="bf16", effect=effect)
    assert Backend.from_dict(backend.to_dict()) == backend
    assert Backend.from_dict({"name": "eager"}).effect is None


def test_serve_refuses_int8_and_unknown_precisions_before_starting(tmp_path):
    for precision in ("int8", "fp64"):
        result = run_tvserve("serve", "--precision", precision, "--model-store", tmp_path, "--workdir", tmp_path / "w")
        assert result.returncode == 1, result.stderr
        assert re.fullmatch(rf"error: --precision {precision}: Invalid precision '{precision}'. Only fp32, tf32, bf16, "
                            r"fp16 are supported. .*--precision int8`\).\n", result.stderr), result.stderr


# --- archives, served ---

@pytest.fixture(scope="module")
def reduced_archives(model_store, digits_run):
    """{precision: archive} of the digits Net in bf16 and fp16, in the session's model store."""
    return {precision: archive_checkpoint(digits_run / "checkpoint.pt", options=ArchiveOptions(
        model_name=f"digits_{precision}", export_path=model_store, workers=1, batch_size=1, precision=precision))
        for precision in ("bf16", "fp16")}


def synthetic_images() -> list:
    """The images the archive measured its effect on (calibration.synthetic_measurement_set)."""
    return [sample_jpeg(seed=seed) for seed in range(SYNTHETIC_IMAGES)]


def in_process(archive, folder, images, precision=None, monkeypatch=None) -> tuple:
    """(probabilities Tensor[N, classes], handler): the archive's handler in this process, in its own
    precision or in `precision` by TVSERVE_PRECISION."""
    if precision:
        monkeypatch.setenv(ENV, precision)
    handler = load_handler(archive, folder)
    if precision:
        monkeypatch.delenv(ENV)
    return torch.stack([probabilities(handler, image) for image in images]), handler


def served(server, model, images) -> torch.Tensor:
    return torch.stack([served_probabilities(server, model, image, N_CLASSES) for image in images])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_reduced_precision_archive_records_its_effect_and_serves_it(server, reduced_archives, precision, work,
                                                                      monkeypatch):
    archive = reduced_archives[precision]
    backend = read_record(archive).backend
    effect = backend.effect
    assert backend.precision == precision and backend.name in EAGER and backend.quantization is None
    assert effect.precision == precision and effect.measured_images == SYNTHETIC_IMAGES
    assert "synthetic" in effect.images and effect.measured_on.startswith("cpu (")
    assert effect.method.endswith(f"{precision}: {AUTOCAST[precision]}")
    assert 0 < effect.max_probability_change < 0.2 and effect.accuracy_fp32 is None

    images = synthetic_images()
    reduced, handler = in_process(archive, work / "unpacked" / archive.stem, images)
    fp32, _ = in_process(archive, work / "unpacked" / f"{archive.stem}-fp32", images, "fp32", monkeypatch)
    assert handler.precision == precision
    client.register(archive.name, management_url=server.management_url)
    try:
        answers = served(server, archive.stem, images)
    finally:
        client.unregister(archive.stem, "1.0", management_url=server.management_url)
    torch.testing.assert_close(answers, reduced, rtol=0, atol=SAME_CODE)
    change = (answers - fp32).abs().max().item()  # one image at a time here, batches of 16 at archive time
    assert change == pytest.approx(effect.max_probability_change, rel=0.25, abs=1e-3), (change, effect)
    loaded = re.findall(rf"tvserve: loaded {archive.stem} .* precision (\w+): (.*)",
                        server.log())
    assert loaded and loaded[-1] == (precision, AUTOCAST[precision])


def test_describe_shows_the_precision_and_its_effect(reduced_archives):
    described = run_tvserve("describe", reduced_archives["bf16"])
    assert described.returncode == 0, described.stderr
    assert re.search(r"digits_bf16.mar: bf16: top-1 agreement with fp32 \d+\.\d% \(\d+/16 images\), largest "
                     r"probability change [\d.e-]+ \(measured on cpu \(.*\): eager(_channels_last)?, bf16: "
                     r"torch.autocast\(cpu, bfloat16\)\)", described.stderr), described.stderr


def test_tf32_on_a_cpu_computes_fp32_and_says_so(digits_run, tmp_path):
    archive = archive_checkpoint(digits_run / "checkpoint.pt", options=ArchiveOptions(
        model_name="digits_tf32", export_path=tmp_path, workers=1, batch_size=1, precision="tf32"))
    effect = read_record(archive).backend.effect
    assert effect.max_probability_change == 0 and effect.top1_agreement == 1
    assert effect.method.endswith("tf32: IEEE fp32 (a CPU has no TF32)")


@pytest.fixture(scope="module")
def bf16_store(work, reduced_archives):
    store = work / "precision" / "model_store"
    store.mkdir(parents=True)
    (store / "digits_bf16.mar").write_bytes(reduced_archives["bf16"].read_bytes())
    return store


def precision_server(work, store, name, precision) -> Server:
    folder = work / "precision" / name
    folder.mkdir(parents=True, exist_ok=True)
    config = free_ports_config(REPO / "config.properties", folder / "config.properties")
    return Server(model_store=store, config=config, workdir=folder / "server", env={ENV: precision})


def test_serving_with_tvserve_precision_fp32_gives_fp32_answers(work, bf16_store, monkeypatch):
    images = synthetic_images()[:4]
    fp32, handler = in_process(bf16_store / "digits_bf16.mar", work / "unpacked" / "bf16-as-fp32", images, "fp32",
                               monkeypatch)
    bf16, _ = in_process(bf16_store / "digits_bf16.mar", work / "unpacked" / "bf16-as-bf16", images)
    assert handler.precision == "fp32" and not torch.allclose(fp32, bf16, rtol=0, atol=FP32_PARITY)
    with precision_server(work, bf16_store, "fp32", "fp32") as server:
        answers = served(server, "digits_bf16", images)
        log = server.log()
    torch.testing.assert_close(answers, fp32, rtol=0, atol=FP32_PARITY)
    assert re.search(r"tvserve: loaded digits_bf16 .* precision fp32: IEEE fp32", log)


def test_an_invalid_override_stops_the_server_with_the_workers_reason(work, bf16_store):
    with pytest.raises(TvserveError, match=r"(?s)digits_bf16: workers keep dying while loading.*TVSERVE_PRECISION=int8: "
                                           r"Invalid precision 'int8'"):
        with precision_server(work, bf16_store, "int8", "int8"):
            pass


def test_a_server_restarted_in_its_folder_is_judged_on_its_own_workers(work, bf16_store):
    """A container restarted with its volumes keeps the earlier run's logs: that run's dead workers
    must not stop the next start, and what the next run reads is its own."""
    with pytest.raises(TvserveError, match="digits_bf16: workers keep dying while loading"):
        with precision_server(work, bf16_store, "restarted", "int8"):
            pass
    with precision_server(work, bf16_store, "restarted", "fp32") as server:
        served(server, "digits_bf16", synthetic_images()[:1])
        assert logs.failed_loads(server.log_dir, "digits_bf16") >= 2  # the earlier run's, still in the log
        assert server.failed_loads("digits_bf16") == 0 and "Invalid precision" not in server.log()
        assert re.search(r"tvserve: loaded digits_bf16 .* precision fp32", server.log())
