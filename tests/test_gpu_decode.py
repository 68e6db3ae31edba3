"""The tensor preprocessing path (`--gpu-decode`, decode: tensor) on the CPU, where it runs the same
code as on a GPU with torchvision.io's CPU decoder: within a stated bound of the exact PIL path,
upright as PIL, each body it does not decode as PIL does taken by the PIL path alone, and, through a
real TorchServe, a corrupt body in a batch getting its own 400 while its batch-mates get their
tensor-path answers."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from torchvision.models import get_weight

from conftest import PHOTOS
from corpus import accepted_cases, encode, refused_cases
from handlers.devices import DECODE_ENV, PilPreprocessing, TensorPreprocessing, decode_choice
from handlers.errors import RequestError
from handlers.images import open_image
from handlers.record import Preset
from helpers import Gate, archive_gated, held, served_probabilities, wait_until
from tvserve import TvserveError
from tvserve.archiving.mar import read_record
from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_checkpoint
from tvserve.archiving.zoo import preset_of
from tvserve.ops import client
from tvserve.tools.bench import lossy_effect
from tvserve.tools.inprocess import load_handler, probabilities

# Bounds on the CPU, where both paths decode with libjpeg-turbo and only the resize differs
# (measured on these images: at most 1 level bilinear, 8 bicubic, where overshoot at sharp edges
# is rounded differently; mean at most 0.0031 normalised; docs/gpu.md, "Decoding on the worker's device").
MAX_INPUT_LEVELS = {"bilinear": 2, "bicubic": 10}  # uint8 levels, after undoing the preset's std
MAX_MEAN_DIFFERENCE = 0.01  # mean absolute difference of the normalised inputs
PRESETS = {  # one of each task's presets, both classification interpolations
    "classification-bilinear": "ResNet18_Weights.DEFAULT",
    "classification-bicubic": "EfficientNet_B0_Weights.DEFAULT",
    "semantic_segmentation": "LRASPP_MobileNet_V3_Large_Weights.DEFAULT",
    "detection": "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.DEFAULT",
}
SIZES = [(97, 333), (387, 258), (866, 577), (1600, 1067)]  # width x height


def jpegs() -> list:
    """The real photos as they are, and resized to awkward and large sizes (quality 90)."""
    photos = [Image.open(path).convert("RGB") for path in PHOTOS]
    return [path.read_bytes() for path in PHOTOS] + [
        encode(photo.resize(size, Image.Resampling.BICUBIC), "JPEG", quality=90) for photo in photos for size in SIZES]


def case_body(name: str) -> bytes:
    return next(case.body for case in accepted_cases() + refused_cases() if case.name == name)


@pytest.mark.parametrize("preset_name", PRESETS)
def test_tensor_path_is_within_its_bound_of_the_pil_path_for_each_task(preset_name):
    preset = Preset.from_dict(preset_of(get_weight(PRESETS[preset_name])))
    bodies = jpegs()
    exact, tensor = PilPreprocessing(preset).prepare(bodies), TensorPreprocessing(preset).prepare(bodies)
    scale = 255 * torch.tensor(preset.std or [1.0] * 3).view(3, 1, 1)
    for (x, x_size), (y, y_size) in zip(exact, tensor):
        assert x.shape == y.shape and x_size == y_size and y.dtype == torch.float32
        if preset.resize is None:  # nothing resized: the same decoder's pixels, exactly
            assert torch.equal(x, y)
        assert ((x - y).abs() * scale).max() <= MAX_INPUT_LEVELS[preset.interpolation] + 1e-3
        assert (x - y).abs().mean() <= MAX_MEAN_DIFFERENCE


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pil_applies_it(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    body = encode(Image.open(PHOTOS[0]).convert("RGB").resize((300, 200)), "JPEG", quality=95, exif=exif)
    picture = TensorPreprocessing(Preset()).decode_batch([body])[0]
    assert isinstance(picture, torch.Tensor)  # the tensor decoder's, turned upright by tensor ops
    assert np.array_equal(picture.permute(1, 2, 0).numpy(), np.asarray(open_image(body)))


def test_each_body_takes_the_path_that_decodes_it_as_pil_does():
    """JPEGs in RGB or gray: the tensor decoder; PNG, CMYK, 16-bit PNG: the PIL path; a truncated
    JPEG, which makes the batch's decode call raise: its own 400, its batch-mates still decoded."""
    gray = encode(Image.open(PHOTOS[1]).convert("L"), "JPEG", quality=90)
    bodies = {"jpeg": case_body("jpeg"), "gray-jpeg": gray, "exif-rotated-jpeg": case_body("exif-rotated-jpeg"),
              "png-rgb": case_body("png-rgb"), "cmyk-jpeg": case_body("cmyk-jpeg"),
              "gray-16bit-png": case_body("gray-16bit-png"), "truncated-jpeg": case_body("truncated-jpeg"),
              "not-an-image": b"not an image"}
    pictures = dict(zip(bodies, TensorPreprocessing(Preset()).decode_batch(list(bodies.values()))))
    tensor_decoded = {name for name, picture in pictures.items() if isinstance(picture, torch.Tensor)}
    assert tensor_decoded == {"jpeg", "gray-jpeg", "exif-rotated-jpeg"}
    assert {name for name, picture in pictures.items() if isinstance(picture, Image.Image)} == {
        "png-rgb", "cmyk-jpeg", "gray-16bit-png"}
    assert (pictures["truncated-jpeg"].status, pictures["truncated-jpeg"].type) == (400, "CorruptImage")
    assert (pictures["not-an-image"].status, pictures["not-an-image"].type) == (400, "UnsupportedImage")
    for name in tensor_decoded:
        assert np.array_equal(pictures[name].permute(1, 2, 0).numpy(), np.asarray(open_image(bodies[name])))


def test_pixel_arrays_keep_the_size_limit():
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    tensor, size = TensorPreprocessing(Preset()).prepare([pixels])[0]
    assert size == (10, 20) and tensor.shape == (3, 10, 20)
    huge = np.lib.stride_tricks.as_strided(pixels, shape=(10000, 6000, 3), strides=(0, 0, 1))  # no memory
    refused = TensorPreprocessing(Preset()).prepare([huge])[0]
    assert isinstance(refused, RequestError) and refused.status == 413


def test_decode_is_recorded_overridable_and_checked(monkeypatch):
    assert Preset().to_dict().get("decode") is None and Preset.from_dict({}).decode == "pil"  # old records: pil
    assert Preset.from_dict(Preset(decode="tensor").to_dict()).decode == "tensor"
    monkeypatch.setenv(DECODE_ENV, "tensor")
    assert decode_choice(Preset()) == "tensor"
    monkeypatch.setenv(DECODE_ENV, "gpu")
    with pytest.raises(ValueError, match="Only pil, tensor"):
        decode_choice(Preset())
    with pytest.raises(TvserveError, match="choose one"):
        ArchiveOptions(decode="tensor", jpeg_draft=True)


def test_lossy_effect_of_tensor_decoding_on_the_trained_digits_net(digits_run, digit_files, tmp_path, monkeypatch):
    """The book's Net (trained) on the held-out digits as JPEG scans of 97x97 (so that both paths
    resize them to its 32x32): inputs, probabilities and top-1/top-5 of the tensor path against the
    PIL path, in-process through each archive's own handler."""
    folder = tmp_path / "jpegs"
    folder.mkdir()
    for path, _ in digit_files:
        scan = Image.open(path).convert("RGB").resize((97, 97), Image.Resampling.BICUBIC)
        (folder / f"{path.stem}.jpg").write_bytes(encode(scan, "JPEG", quality=90))
    handlers = {}
    for decode in ("pil", "tensor"):
        archive = archive_checkpoint(digits_run / "checkpoint.pt", options=ArchiveOptions(
            model_name=f"digits_{decode}", export_path=tmp_path / "store", workers=1, batch_size=1,
            backend="eager", decode=decode))
        assert read_record(archive).preset.decode == decode
        handlers[decode] = load_handler(archive, tmp_path / decode)
    assert handlers["tensor"].preprocessor.name == "tensor"
    monkeypatch.setenv(DECODE_ENV, "pil")  # the serve-time override wins over the record
    assert load_handler(archive, tmp_path / "overridden").preprocessor.name == "pil"
    monkeypatch.delenv(DECODE_ENV)
    effect = lossy_effect(handlers["pil"], handlers["tensor"], {"digits": sorted(folder.iterdir())}, "decode_tensor")
    print(f"\ntensor decoding on {effect['images']} digit JPEGs: {effect}")
    agree = int(effect["top1_agreement"].split("/")[0])
    assert effect["max_input_levels"] <= MAX_INPUT_LEVELS["bilinear"] + 1e-3
    assert effect["max_probability_change"] <= 0.05
    assert agree >= 0.99 * effect["images"]


@pytest.fixture(scope="module")
def gated_tensor(server, model_store, work):
    """(archive, Gate): the gated model archived with --gpu-decode's choice, batches of up to 8,
    registered on the session's server; its forward waits while the gate is closed."""
    folder = work / "gated_tensor"
    gate = Gate(folder / "gate")
    archive = archive_gated(folder / "model", model_store, gate, name="gated_tensor", decode="tensor", batch_size=8)
    client.register(archive.name, management_url=server.management_url)
    yield archive, gate
    gate.open()
    client.unregister("gated_tensor", "1.0", management_url=server.management_url)


def test_a_corrupt_body_in_a_batch_gets_its_own_400_and_the_others_their_tensor_answers(server, gated_tensor, work):
    """A plug request held in the worker, then eight bodies queued behind it: when the gate opens
    they are one batch (batch size 8, all queued). Each good one answers what the tensor path
    answers for it in-process; the corrupt ones their own 400; nothing 5xx."""
    archive, gate = gated_tensor
    gray = encode(Image.open(PHOTOS[1]).convert("L"), "JPEG", quality=90)
    good = {name: case_body(name) for name in ("jpeg", "exif-rotated-jpeg", "png-rgb", "cmyk-jpeg", "gray-16bit-png")}
    good["gray-jpeg"] = gray
    bad = {"truncated-jpeg": case_body("truncated-jpeg"), "garbage": b"not an image"}
    handler = load_handler(archive, work / "gated_tensor" / "in_process")
    expected = {name: probabilities(handler, body) for name, body in good.items()}
    bodies = list(good.items()) + list(bad.items())
    with ThreadPoolExecutor(max_workers=len(bodies) + 1) as pool, gate.closed():
        plug = pool.submit(served_probabilities, server, "gated_tensor", PHOTOS[0].read_bytes(), 2)
        wait_until(lambda: held(server, "gated_tensor") == (0, True), "the plug request inside the worker")
        futures = {name: pool.submit(post, server, body) for name, body in bodies}
        wait_until(lambda: held(server, "gated_tensor") == (len(bodies), True), "the batch queued behind it")
    plug.result()
    for name, future in futures.items():
        response = future.result()
        if name in bad:
            assert response.status_code == 400 and response.json()["type"] in ("CorruptImage", "UnsupportedImage")
            continue
        assert response.status_code == 200, (name, response.text)
        served = torch.zeros(2)
        for item in response.json():
            served[item["index"]] = item["probability"]
        torch.testing.assert_close(served, expected[name], rtol=0, atol=1e-6)


def post(server, body: bytes):
    """The gated model's answer for `body`: both classes' probabilities."""
    return requests.post(f"{server.inference_url}/predictions/gated_tensor", data=body, headers={"X-TopK": "2"},
                         timeout=120)
