"""Backends, thread budget and the lossy JPEG draft decode, against the live server.

Each non-eager backend is served and compared with the same backend in-process (the handler's
own code on the same archive) and with eager PyTorch, every probability within PARITY_TOLERANCE.
"""

import io
import json
import os
import re
import textwrap

import pytest
import torch
import torchvision
from PIL import Image

from conftest import PHOTOS
from helpers import served_probabilities, write_custom_model
from handlers.images import open_image
from handlers.runtimes import EAGER
from handlers.tasks.classification import PARITY_TOLERANCE
from tvserve import TvserveError
from tvserve.archiving.mar import read_model_config as archive_config, read_record
from tvserve.archiving.options import DEFAULT_MAX_BATCH_DELAY, ArchiveOptions
from tvserve.archiving.sources import archive_checkpoint, archive_custom, archive_torchvision
from tvserve.archiving.measured_load import BATCH_SIZE, SHARED_WORKERS, choose, shapes_for
from tvserve.ops import client
from tvserve.ops.properties import write_properties
from tvserve.ops.server import Server
from tvserve.tools.inprocess import load_handler, predict, probabilities

CPU_BACKENDS = ["eager_channels_last", "torchscript", "onnxruntime", "openvino"]
EXPORTED = ["torchscript", "onnxruntime", "openvino"]


def eager_resnet18(weights_file, photo):
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(torch.load(weights_file, weights_only=True))
    transform = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    with torch.inference_mode():
        return torch.softmax(model.eval()(transform(Image.open(photo).convert("RGB")).unsqueeze(0)), 1)[0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_serves_like_itself_in_process_and_like_eager(server, model_store, resnet18_weights, work, backend):
    name = f"resnet18_{backend}"
    archive = archive_torchvision("resnet18", weights_file=resnet18_weights, options=ArchiveOptions(
        model_name=name, export_path=model_store, backend=backend))
    meta = read_record(archive).to_dict()
    assert meta["backend"]["name"] == backend
    handler = load_handler(archive, work / "unpacked" / name)
    assert handler.backend == backend
    client.register(archive.name, management_url=server.management_url)
    try:
        for photo in PHOTOS:
            served = served_probabilities(server, name, photo.read_bytes(), 1000)
            torch.testing.assert_close(served, probabilities(handler, photo.read_bytes()),
                                       rtol=0, atol=1e-6)
            torch.testing.assert_close(served, eager_resnet18(resnet18_weights, photo), rtol=0, atol=PARITY_TOLERANCE)
    finally:
        client.unregister(name, "1.0", management_url=server.management_url)


def test_auto_keeps_the_fastest_backend_that_passes_parity(model_store):
    meta = read_record(model_store / "resnet18.mar").to_dict()
    selection = meta["backend"]["selection"]
    candidates = {c["name"]: c for c in selection["candidates"]}
    assert set(candidates) == {"eager", *CPU_BACKENDS}
    timed = {name: c["ms"] for name, c in candidates.items() if "ms" in c}
    assert "eager" in timed and all(candidates[name]["parity"] <= PARITY_TOLERANCE for name in timed)
    assert meta["backend"]["name"] == min(timed, key=timed.get)
    assert selection["threads"] >= 1


# Traced exporters record the branch the example batch (of 1) takes: batches of 3 answer differently.
SHAPE_DEPENDENT_MODEL = textwrap.dedent('''
    import torch
    from torch import nn


    class ShapeDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            logits = self.head(x.mean(dim=(2, 3)))
            return logits if x.shape[0] == 1 else logits * 3
''')


@pytest.fixture(scope="module")
def shape_dependent(work):
    folder = work / "shape_dependent"
    write_custom_model(folder, "model", SHAPE_DEPENDENT_MODEL, "ShapeDependent", ["a", "b"])
    return dict(model_file=folder / "model.py", class_name="ShapeDependent", weights=folder / "model.pt",
                labels=folder / "labels.txt", resize=8, crop=8, mean="0.5,0.5,0.5", std="0.2,0.2,0.2")


def test_auto_falls_back_to_eager_when_exports_differ(shape_dependent, tmp_path):
    archive = archive_custom(**shape_dependent, options=ArchiveOptions(export_path=tmp_path))
    meta = read_record(archive).to_dict()
    assert meta["backend"]["name"] in EAGER and "file" not in meta["backend"]  # eager, NCHW or NHWC
    errors = {c["name"]: c.get("error", "") for c in meta["backend"]["selection"]["candidates"]}
    assert all("differ from eager" in errors[name] for name in EXPORTED), errors


def test_a_backend_that_fails_parity_is_refused_by_name(shape_dependent, tmp_path):
    with pytest.raises(TvserveError, match="Backend onnxruntime cannot serve this model: probabilities differ"):
        archive_custom(**shape_dependent, options=ArchiveOptions(export_path=tmp_path, backend="onnxruntime"))
    assert not list(tmp_path.glob("*.mar*"))


def test_worker_thread_budget_fits_the_cores(server, model_store):
    """auto: the cores shared among all workers the server starts with (3 archives, 1 worker each);
    each worker logs what it got."""
    expected = max(1, os.cpu_count() // 3)
    loaded = re.findall(r"tvserve: loaded (\S+) .* (\d+) threads", server.log())
    assert {"digits_net", "digits_batched", "resnet18"} <= {name for name, _ in loaded}
    assert all(int(count) == expected for _, count in loaded)


def winner_shape(measured) -> tuple:
    return measured.winner()["workers"], measured.winner()["threads"]


def test_auto_workers_and_batching_follow_the_measured_load(digits_run, model_store, tmp_path):
    """Sizes left to the archiver are the winner of a short load measured here with the real handler
    (tvserve/archiving/measured_load.py), recorded with every candidate; resnet18's workers are
    pinned by the fixture, so only its batch size was measured."""
    net = archive_checkpoint(digits_run / "checkpoint.pt", options=ArchiveOptions(model_name="net", export_path=tmp_path))
    measured = read_record(net).sizing.measured
    shapes = shapes_for(ArchiveOptions(), os.cpu_count())
    assert [(c["workers"], c["threads"], c["batch_size"]) for c in measured.candidates] == [
        (w, t, b) for w, t in shapes for b in (1, BATCH_SIZE)]
    assert all(c["c1_p50_ms"] > 0 and c["load_rps"] > 0 for c in measured.candidates)
    for alone, batched in zip(measured.candidates[::2], measured.candidates[1::2]):  # a lone request waits the delay
        assert batched["c1_p50_ms"] == pytest.approx(alone["c1_p50_ms"] + DEFAULT_MAX_BATCH_DELAY)
    shared = os.cpu_count() > 1 and winner_shape(measured) == (SHARED_WORKERS, os.cpu_count())
    assert read_record(net).sizing.shares_cores() == shared
    handler = load_handler(net, tmp_path / "unpacked")  # as under a TorchServe tvserve did not start
    assert handler.prepare_pool.threads == (os.cpu_count() if shared else max(1, os.cpu_count() // winner_shape(measured)[0]))
    handler.close()
    assert measured.chosen == choose(measured.candidates)[0] and measured.concurrency == os.cpu_count()
    winner = measured.winner()
    assert (archive_config(net)["minWorkers"], archive_config(net)["batchSize"]) == (winner["workers"], winner["batch_size"])
    resnet18 = read_record(model_store / "resnet18.mar").sizing
    assert {c["workers"] for c in resnet18.measured.candidates} == {1} and "workers" not in resnet18.decided
    assert archive_config(model_store / "resnet18.mar")["batchSize"] == resnet18.measured.winner()["batch_size"]


def test_given_sizes_are_not_measured(digits_run, tmp_path):
    net = archive_checkpoint(digits_run / "checkpoint.pt", options=ArchiveOptions(
        model_name="net", export_path=tmp_path, workers=2, batch_size=3))
    assert read_record(net).sizing.measured is None and read_record(net).sizing.decided == ("max_batch_delay",)
    assert (archive_config(net)["minWorkers"], archive_config(net)["batchSize"]) == (2, 3)


def test_thread_budget_can_be_set_in_the_config(model_store, tmp_path):
    config = write_properties(tmp_path / "config.properties", {"tvserve_threads_per_worker": 3})
    assert Server(model_store=model_store, config=config, workdir=tmp_path).threads_per_worker() == 3


def big_jpeg(width=2400, height=1600) -> bytes:
    photo = Image.open(PHOTOS[0]).convert("RGB").resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_jpeg_draft_decodes_at_least_twice_the_resize_and_leaves_other_formats_alone():
    data = big_jpeg()
    full, drafted = open_image(data), open_image(data, draft_min_side=512)
    assert full.size == (2400, 1600)
    assert drafted.size == (1200, 800)  # 1/2 scale: 1/4 would give 400 < 512
    assert min(open_image(data, draft_min_side=64).size) == 200  # 1/8, the smallest DCT scale
    png = io.BytesIO()
    Image.open(io.BytesIO(data)).save(png, "PNG")
    assert open_image(png.getvalue(), draft_min_side=64).size == (2400, 1600)


def test_jpeg_draft_archive_is_served_and_its_effect_is_small(server, model_store, resnet18_weights, work):
    archive = archive_torchvision("resnet18", weights_file=resnet18_weights, options=ArchiveOptions(
        model_name="resnet18_draft", export_path=model_store, backend="eager", jpeg_draft=True))
    assert read_record(archive).to_dict()["preset"]["jpeg_draft"] is True
    data = big_jpeg()
    exact = load_handler(model_store / "resnet18.mar", work / "unpacked" / "resnet18-exact")
    draft = load_handler(archive, work / "unpacked" / "resnet18-draft")
    client.register(archive.name, management_url=server.management_url)
    try:
        served = served_probabilities(server, "resnet18_draft", data, 1000)
        torch.testing.assert_close(served, probabilities(draft, data), rtol=0, atol=1e-6)
        assert (served - probabilities(exact, data)).abs().max() > 0  # decoded otherwise
        assert len(predict(draft, data)) == 5
    finally:
        client.unregister("resnet18_draft", "1.0", management_url=server.management_url)


def test_archive_records_the_backend_file_and_its_hash(model_store):
    meta = read_record(model_store / "resnet18.mar").to_dict()
    backend = meta["backend"]
    if backend["name"] == "eager":
        assert "file" not in backend
    else:
        assert backend["file"] in ("model.onnx", "model.ts") and len(backend["sha256"]) == 64
    assert json.dumps(meta)  # plain JSON throughout
