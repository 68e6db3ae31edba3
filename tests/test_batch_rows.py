"""The bench's batch rows (tvserve/tools/batches.py), on this machine's CPU: the same code that
measures a GPU drives the archive's real handler through TorchServe's own Context, batch by batch,
and says so when a request of a batch is not answered. Nothing here depends on speed."""

import pytest

from tvserve.tools.batches import BatchRun, batch_rows, markdown, run_handle, targets
from tvserve.tools.inprocess import load_handler

from conftest import PHOTOS


@pytest.fixture(scope="module")
def rows(model_store, work):
    run = BatchRun(batches=(1, 3), precisions=("fp32",), decodes=("pil",), duration=0.2, warmup=0.1, gpu_id=None)
    bodies = [path.read_bytes() for path in PHOTOS]
    return batch_rows("resnet18", model_store / "resnet18.mar", bodies, work / "batch-rows", run)


def test_one_row_per_point_with_both_rates(rows):
    assert [(r["precision"], r["decode"], r["batch"]) for r in rows["rows"]] == [("fp32", "pil", 1), ("fp32", "pil", 3)]
    for row in rows["rows"]:
        assert row["device"] == "cpu"
        assert row["forward_img_s"] > 0 and row["pipeline_img_s"] > 0
        assert row["fed"] == pytest.approx(row["pipeline_img_s"] / row["forward_img_s"], rel=0.01)


def test_fp32_on_the_cpu_is_the_cpu_reference(rows):
    assert rows["parity"] == {"pil": 0.0}
    parity = next(t for t in targets({"resnet18": rows}) if t["target"].startswith("fp32 on the device"))
    assert parity["met"] is True
    gpu_only = [t for t in targets({"resnet18": rows}) if t["target"].startswith("resnet50")]
    assert gpu_only[0]["ratio"] is None and gpu_only[0]["met"] is None  # not measured, not claimed


def test_markdown_has_every_row(rows):
    lines = markdown("resnet18", rows)
    assert sum(line.startswith("| fp32 | pil |") for line in lines) == 2
    assert any("within 0.0001" in line for line in lines)


def test_a_batch_with_a_failed_request_is_reported(model_store, work):
    handler = load_handler(model_store / "resnet18.mar", work / "batch-rows-failing")
    good = PHOTOS[0].read_bytes()
    with pytest.raises(RuntimeError, match=r"\(1, 400\)"):
        run_handle(handler, [{"body": bytearray(good)}, {"body": bytearray(b"not an image")}])
