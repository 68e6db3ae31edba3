"""Training writes plain, safely loadable checkpoints with everything serving needs."""

import json

import pytest
import torch

from training.models import ARCHITECTURES, build_model


def test_checkpoint_is_a_plain_dict_loadable_with_weights_only(digits_run):
    checkpoint = torch.load(digits_run / "checkpoint.pt", weights_only=True)
    assert checkpoint["arch"] == "Net" and checkpoint["arch_args"] == {"n_classes": 10}
    assert checkpoint["classes"] == [str(i) for i in range(10)]
    assert checkpoint["input_size"] == 32
    assert len(checkpoint["mean"]) == 3 and len(checkpoint["std"]) == 3
    assert all(0 < s < 1 for s in checkpoint["std"])
    assert checkpoint["metrics"]["val_accuracy"] > 0.9
    model = build_model(checkpoint["arch"], **checkpoint["arch_args"])
    model.load_state_dict(checkpoint["state_dict"], strict=True)


def test_metrics_record_every_epoch_and_the_best(digits_run):
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == list(range(1, len(metrics["epochs"]) + 1))
    best = max(row["val_accuracy"] for row in metrics["epochs"])
    assert metrics["best"]["val_accuracy"] == best
    checkpoint = torch.load(digits_run / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == metrics["best"]["epoch"]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_takes_any_batch_size(arch):
    model = build_model(arch, n_classes=3).eval()
    for batch in (1, 5):
        assert model(torch.zeros(batch, 3, 32, 32)).shape == (batch, 3)


def test_unknown_architecture_lists_the_choices():
    with pytest.raises(ValueError, match="Choose one of: Net, NetWidth"):
        build_model("ResNet9000")
