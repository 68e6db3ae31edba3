"""torchvision's quantized classifiers (torchvision.models.quantization): listed by `tvserve zoo`,
checked before archiving, archived by name with their int8 weights, served on the engine
torchvision made them for, with their fp32 counterpart's accuracy and time recorded.

No weights can be downloaded here: the served models are torchvision's own int8 modules with
random fp32 weights quantized by torchvision's builder (quantize=True), saved to a file."""

from unittest import mock

import pytest
import requests
import torch
import torchvision
from PIL import Image
from torchvision.models import get_model_weights

from conftest import PHOTOS
from helpers import run_tvserve, served_probabilities
from handlers.tasks.classification import PARITY_TOLERANCE
from tvserve import TvserveError
from tvserve.archiving.check import check_model
from tvserve.archiving.mar import read_record
from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_torchvision, random_state_dict, torchvision_record
from tvserve.archiving.zoo import imagenet_acc1, preset_of, quantized_models, zoo
from tvserve.ops import client
from tvserve.tools.inprocess import load_handler, probabilities

QUANTIZED_WEIGHTS = [weights for name in quantized_models() for weights in get_model_weights(name)]
NAME_OF = {weights: name for name in quantized_models() for weights in get_model_weights(name)}


def test_zoo_lists_the_twelve_quantized_classifiers_with_engine_and_fp32_counterpart():
    rows = {(row["model"], row["weights"]): row for row in zoo() if row["model"] in quantized_models()}
    assert len(quantized_models()) == 12 and len(rows) == len(QUANTIZED_WEIGHTS)
    for weights in QUANTIZED_WEIGHTS:
        row = rows[NAME_OF[weights], weights.name]
        assert row["task"] == "classification" and row["engine"] == weights.meta["backend"]
        assert row["acc@1"] == weights.meta["_metrics"]["ImageNet-1K"]["acc@1"]
        assert row["fp32_weights"] == str(weights.meta["unquantized"])
        assert row["fp32_acc@1"] == weights.meta["unquantized"].meta["_metrics"]["ImageNet-1K"]["acc@1"]
    assert {row["engine"] for row in rows.values()} == {"fbgemm", "qnnpack"}


@pytest.mark.parametrize("weights", QUANTIZED_WEIGHTS, ids=str)
def test_every_quantized_weight_passes_the_check(weights, tmp_path):
    """Built by torchvision's builder for these int8 weights (on the CPU: quantized modules have no
    meta kernels), the state_dict loads strictly and one image of the crop gives one logit per label."""
    name = NAME_OF[weights]
    record = torchvision_record(name, weights)
    assert record.labels == weights.meta["categories"] and record.preset.to_dict() == preset_of(weights)
    state = random_state_dict(record, tmp_path)
    int8 = any(tensor.is_quantized for tensor in state.values() if isinstance(tensor, torch.Tensor))
    qat = any(".weight_fake_quant." in key for key in state)  # quantization-aware training's state, converted by the builder
    assert int8 or (qat and name == "quantized_mobilenet_v3_large")
    check_model(record, state, tmp_path)


def test_the_check_refuses_int8_weights_that_do_not_fit(tmp_path):
    record = torchvision_record("quantized_shufflenet_v2_x0_5", get_model_weights("quantized_shufflenet_v2_x0_5").DEFAULT)
    state = random_state_dict(record, tmp_path)
    state.pop("conv1.0.weight")
    with pytest.raises(TvserveError, match="The weights do not fit the model: [Mm]issing key.*conv1.0.weight"):
        check_model(record, state, tmp_path)


@pytest.mark.parametrize("options, message", [
    (dict(precision="bf16"), "is int8 already .*archive resnet18 with --precision bf16 instead"),
    (dict(backend="onnxruntime"), "run on their quantized engine's runtime only: leave --backend out"),
])
def test_other_precisions_and_backends_are_refused_before_any_work(options, message, tmp_path):
    with pytest.raises(TvserveError, match=message):
        archive_torchvision("quantized_resnet18", random_init=True,
                            options=ArchiveOptions(export_path=tmp_path, **options))
    assert not list(tmp_path.iterdir())


def random_quantized_weights(name: str, path):
    """torchvision's int8 module for `name` made from random fp32 weights (quantize=True), saved as
    the state_dict file a user would pass with --weights-file."""
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(name, weights=None, quantize=True).state_dict(), path)
    return path


def torchvision_in_process(name: str, weights_file):
    """(model, transforms) exactly as torchvision's builder makes them for the DEFAULT int8 weights,
    with the weights loaded from our file instead of downloaded."""
    enum = get_model_weights(name).DEFAULT
    state = torch.load(weights_file, weights_only=True)
    with mock.patch.object(type(enum), "get_state_dict", lambda self, *args, **kwargs: state):
        return torchvision.models.get_model(name, weights=enum, quantize=True).eval(), enum.transforms()


def expected_probabilities(model, transform, engine: str, photo) -> torch.Tensor:
    torch.backends.quantized.engine = engine
    with torch.inference_mode():
        return torch.softmax(model(transform(Image.open(photo).convert("RGB")).unsqueeze(0)), 1)[0]


@pytest.fixture(scope="module")
def quantized_resnet18(server, model_store, work):
    """quantized_resnet18 archived by name from a file of int8 weights, as `tvserve archive` does
    (once the server runs: it registers the archive itself)."""
    weights_file = random_quantized_weights("quantized_resnet18", work / "quantized_resnet18-random.pth")
    return archive_torchvision("quantized_resnet18", weights_file=weights_file,
                               options=ArchiveOptions(export_path=model_store, workers=1, batch_size=1)), weights_file


def test_quantized_resnet18_records_its_engine_and_fp32_counterpart(quantized_resnet18):
    record = read_record(quantized_resnet18[0])
    backend, counterpart = record.backend, record.backend.counterpart
    assert (backend.name, backend.precision, backend.file) == ("quantized_fbgemm", "int8", None)
    assert (counterpart.model, counterpart.weights, counterpart.engine) == ("resnet18", "ResNet18_Weights.IMAGENET1K_V1",
                                                                           "fbgemm")
    assert counterpart.acc1_int8 == imagenet_acc1(get_model_weights("quantized_resnet18").DEFAULT)
    assert counterpart.acc1_fp32 == imagenet_acc1(torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    timed = {c["name"]: c["ms_batch_1"] for c in backend.selection["candidates"]}
    assert (counterpart.forward_ms_int8, counterpart.forward_ms_fp32) == (timed["quantized_fbgemm"], timed["eager"])
    assert record.weights.origin == "file" and not record.weights.random_init
    described = run_tvserve("describe", quantized_resnet18[0])
    assert described.returncode == 0, described.stderr
    assert "int8 (torchvision, fbgemm): ImageNet-1K acc@1 69.49% against resnet18's 69.76%" in described.stderr


def test_quantized_resnet18_served_like_torchvision_in_process(server, quantized_resnet18):
    archive, weights_file = quantized_resnet18
    model, transform = torchvision_in_process("quantized_resnet18", weights_file)
    client.register(archive.name, management_url=server.management_url)
    try:
        for photo in PHOTOS:
            expected = expected_probabilities(model, transform, "fbgemm", photo)
            served = served_probabilities(server, "quantized_resnet18", photo.read_bytes(), len(expected))
            torch.testing.assert_close(served, expected, rtol=0, atol=PARITY_TOLERANCE)
            assert served.topk(5).indices.tolist() == expected.topk(5).indices.tolist()
        refused = requests.post(f"{server.inference_url}/explanations/quantized_resnet18", data=PHOTOS[0].read_bytes(),
                                timeout=60)
        assert refused.status_code == 400 and "no gradients to explain with" in refused.json()["message"], refused.text
    finally:
        client.unregister("quantized_resnet18", "1.0", management_url=server.management_url)


def test_a_qnnpack_model_runs_on_qnnpack_beside_an_fbgemm_one(quantized_resnet18, work, tmp_path):
    """quantized_mobilenet_v2 (made for qnnpack) and quantized_resnet18 (fbgemm) in one process, each
    handler answering as torchvision does on its own engine, whichever ran last."""
    weights_file = random_quantized_weights("quantized_mobilenet_v2", tmp_path / "mobilenet.pth")
    archive = archive_torchvision("quantized_mobilenet_v2", weights_file=weights_file,
                                  options=ArchiveOptions(export_path=tmp_path, workers=1, batch_size=1))
    assert read_record(archive).backend.name == "quantized_qnnpack"
    handlers = {"qnnpack": load_handler(archive, tmp_path / "mobilenet"),
                "fbgemm": load_handler(quantized_resnet18[0], tmp_path / "resnet18")}
    references = {"qnnpack": torchvision_in_process("quantized_mobilenet_v2", weights_file),
                  "fbgemm": torchvision_in_process("quantized_resnet18", quantized_resnet18[1])}
    data = PHOTOS[1].read_bytes()
    for engine in ("qnnpack", "fbgemm", "qnnpack"):
        served = probabilities(handlers[engine], data)
        expected = expected_probabilities(*references[engine], engine, PHOTOS[1])
        torch.testing.assert_close(served, expected, rtol=0, atol=PARITY_TOLERANCE)
