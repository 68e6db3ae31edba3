"""The archiving CLI for the whole torchvision zoo and for any custom classifier."""

import json
import textwrap
from unittest import mock

import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.models import get_model_weights

from conftest import PHOTOS
from helpers import post_image, run_tvserve, served_probabilities, write_custom_model
from handlers.tasks.classification import PARITY_TOLERANCE
from tvserve import TvserveError
from tvserve.archiving.check import build_for_check, check_model
from tvserve.archiving.mar import read_record
from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_custom, archive_torchvision, torchvision_record
from tvserve.archiving.zoo import classification_models, preset_of, quantized_models
from tvserve.ops import client

ZOO = classification_models()
LIVE_SAMPLE = ["mobilenet_v3_small", "efficientnet_b0", "inception_v3", "vit_b_32"]


def test_zoo_json_lists_every_model_with_its_weights_meta():
    result = run_tvserve("zoo", "--json")
    assert result.returncode == 0, result.stderr
    rows = [row for row in json.loads(result.stdout) if row["task"] == "classification"]  # the other tasks: test_tasks.py
    assert {row["model"] for row in rows} == set(ZOO) | set(quantized_models())  # quantized: test_quantized.py
    for row in rows:
        weights = get_model_weights(row["model"])[row["weights"]]
        assert row["params"] == weights.meta["num_params"]
        assert (row["resize"], row["crop"]) == (preset_of(weights)["resize"], preset_of(weights)["crop"])
        acc = weights.meta["_metrics"]["ImageNet-1K"]["acc@1"]
        assert row["acc@1"] == (None if acc != acc else acc)  # NaN (features-only weights) -> null
    assert sum(row["default"] for row in rows) == len(ZOO) + len(quantized_models())


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_archive_metadata_checks_out_without_materialising(name, tmp_path):
    """Metadata from the DEFAULT weights; the module built on the meta device with the recorded
    arguments takes the preset's crop and gives one logit per label."""
    weights = get_model_weights(name).DEFAULT
    record = torchvision_record(name, weights)
    assert record.labels == weights.meta["categories"]
    assert record.preset.to_dict() == preset_of(weights)
    model = build_for_check(tmp_path, record.model)
    assert all(p.is_meta for p in model.parameters())
    # googlenet's and inception's weights hold auxiliary heads that eval mode never runs; their
    # meta counts them for inception_v3 and not for googlenet.
    auxiliary = ("aux1.", "aux2.", "AuxLogits.")
    total = sum(p.numel() for p in model.parameters())
    without_aux = sum(p.numel() for key, p in model.named_parameters() if not key.startswith(auxiliary))
    assert weights.meta["num_params"] in (total, without_aux)
    check_model(record, model.state_dict(), tmp_path)


def torchvision_reference(name, weights_file):
    """The model exactly as torchvision's own builder makes it for pretrained weights, with the
    weights loaded from our file instead of downloaded."""
    enum = get_model_weights(name).DEFAULT
    state = torch.load(weights_file, weights_only=True)
    with mock.patch.object(type(enum), "get_state_dict", lambda self, *args, **kwargs: state):
        return torchvision.models.get_model(name, weights=enum).eval(), enum.transforms()


@pytest.mark.parametrize("name", LIVE_SAMPLE)
def test_sample_model_round_trips_through_live_server(server, model_store, work, name):
    torch.manual_seed(0)
    weights_file = work / f"{name}-random.pth"
    kwargs = torchvision_record(name, get_model_weights(name).DEFAULT).model.kwargs
    torch.save(torchvision.models.get_model(name, weights=None, **kwargs).state_dict(), weights_file)
    archive = archive_torchvision(name, weights_file=weights_file,
                                  options=ArchiveOptions(export_path=model_store, startup_timeout=300))
    model, transform = torchvision_reference(name, weights_file)
    with torch.inference_mode():
        expected = torch.softmax(model(transform(Image.open(PHOTOS[0]).convert("RGB")).unsqueeze(0)), 1)[0]

    client.register(archive.name, management_url=server.management_url)
    try:
        served = served_probabilities(server, name, PHOTOS[0].read_bytes(), len(expected))
        torch.testing.assert_close(served, expected, rtol=0, atol=PARITY_TOLERANCE)
    finally:
        client.unregister(name, "1.0", management_url=server.management_url)
        archive.unlink()


CUSTOM_MODEL = textwrap.dedent('''
    import torch
    from torch import nn


    class Backbone(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x)).mean(dim=(2, 3))


    class TinyClassifier(nn.Module):
        def __init__(self, width=4, n_labels=3):
            super().__init__()
            self.backbone = Backbone(width)
            self.head = nn.Linear(width, n_labels)

        def forward(self, x):
            return self.head(self.backbone(x))
''')
CUSTOM_PRESET = dict(resize=40, crop=32, interpolation="bicubic", mean="0.5,0.4,0.3", std="0.2,0.25,0.3")


@pytest.fixture(scope="module")
def custom_files(work):
    folder = work / "custom"
    return folder, write_custom_model(folder, "tiny", CUSTOM_MODEL, "TinyClassifier", ["cat", "dog", "bird"], width=8)


def archive_tiny(folder, export_path, **changes):
    arguments = dict(model_file=folder / "tiny.py", class_name="TinyClassifier", init_args='{"width": 8}',
                     weights=folder / "tiny.pt", labels=folder / "labels.txt", **CUSTOM_PRESET,
                     options=ArchiveOptions(export_path=export_path))
    arguments.update(changes)
    return archive_custom(**arguments)


def test_custom_model_serves_like_in_process(server, model_store, custom_files):
    folder, model = custom_files
    archive = archive_tiny(folder, model_store)
    image = Image.open(PHOTOS[1]).convert("RGB")
    x = TF.resize(image, 40, interpolation=TF.InterpolationMode.BICUBIC)
    x = TF.normalize(TF.to_tensor(TF.center_crop(x, 32)), [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    with torch.inference_mode():
        expected = torch.softmax(model(x.unsqueeze(0)), dim=1)[0]
    client.register(archive.name, management_url=server.management_url)
    try:
        response = post_image(server, "tiny", PHOTOS[1].read_bytes())
        assert response.status_code == 200, response.text
        served = response.json()
        assert len(served) == 3  # top-5 capped at the 3 labels
        order = expected.argsort(descending=True).tolist()
        assert [item["label"] for item in served] == [["cat", "dog", "bird"][i] for i in order]
        for item, i in zip(served, order):
            assert item["probability"] == pytest.approx(expected[i].item(), abs=PARITY_TOLERANCE)
        meta = read_record(archive).to_dict()
        assert meta["source"] == "custom" and meta["model"]["class"] == "TinyClassifier"
        assert meta["preset"]["mean"] == [0.5, 0.4, 0.3]
    finally:
        client.unregister("tiny", "1.0", management_url=server.management_url)


@pytest.mark.parametrize("change, message", [
    ({"class_name": "Nope"}, "tiny.py defines no class 'Nope'; its nn.Module classes: Backbone, TinyClassifier"),
    ({"init_args": None}, "The weights do not fit the model: size mismatch for backbone.conv.weight"),
    ({"init_args": '{"width": 8, "depth": 2}'}, "unexpected keyword argument 'depth'"),
    ({"init_args": '{"width": 8'}, "--init-args is not valid JSON"),
    ({"mean": "0.5,0.5"}, "--mean needs three comma-separated numbers"),
    ({"labels": "two_labels"}, "gives (1, 3) for one image and 2 labels"),
    ({"interpolation": "lanczos"}, "Invalid interpolation 'lanczos'"),
])
def test_custom_validation_failures_are_clear(tmp_path, custom_files, change, message):
    folder, _ = custom_files
    if change.get("labels") == "two_labels":
        (tmp_path / "two.txt").write_text("a\nb\n")
        change = {"labels": tmp_path / "two.txt"}
    with pytest.raises(TvserveError) as error:
        archive_tiny(folder, tmp_path, **change)
    assert message in str(error.value)
    assert not list(tmp_path.glob("*.mar"))


def test_custom_validation_failure_from_the_cli_is_one_line(tmp_path, custom_files):
    folder, _ = custom_files
    result = run_tvserve("archive", "custom", "--model-file", folder / "tiny.py", "--class", "TinyClassifier",
                         "--weights", folder / "tiny.pt", "--labels", folder / "labels.txt", "--resize", 40,
                         "--crop", 32, "--mean", "0.5,0.4,0.3", "--std", "0.2,0.2,0.2", "--export-path", tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: The weights do not fit the model")
    assert "Traceback" not in result.stderr


def test_two_versions_served_side_by_side(server, model_store, digits_run, digit_files):
    archive = run_tvserve("archive", "checkpoint", digits_run / "checkpoint.pt", "--name", "digits_net",
                          "--version", "2.0", "--export-path", model_store)
    assert archive.returncode == 0, archive.stderr
    assert (model_store / "digits_net-2.0.mar").exists()
    management = ["--management-url", server.management_url]
    assert run_tvserve("register", "digits_net-2.0.mar", *management).returncode == 0
    try:
        image = digit_files[0][0].read_bytes()
        for version in ("1.0", "2.0"):
            response = post_image(server, f"digits_net/{version}", image)
            assert response.status_code == 200, response.text
        described = json.loads(run_tvserve("describe", "digits_net", *management).stdout)
        assert sorted(d["customizedMetadata"]["version"] for d in described) == ["1.0", "2.0"]
        assert run_tvserve("set-default", "digits_net", "2.0", *management).returncode == 0
        default = client.management("GET", "/models/digits_net", management_url=server.management_url)
        assert default[0]["modelVersion"] == "2.0"
    finally:
        client.set_default_version("digits_net", "1.0", management_url=server.management_url)
        client.unregister("digits_net", "2.0", management_url=server.management_url)
