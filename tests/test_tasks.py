"""Detection, instance segmentation, keypoints and semantic segmentation: every pretrained weight's
preset and meta-device check, the answers' encodings, and one model of each task archived with
random weights from a file, served, and compared over HTTP with torchvision's model in-process on
the same image files fed through the weights' own transforms()."""

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import numpy as np
import pytest
import requests
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from torchvision.models import get_model_weights

from conftest import PHOTOS
from corpus import Case, accepted_cases, encode, refused_cases
from helpers import post_image, run_tvserve
from test_inputs import bodies as fuzz_bodies
from handlers.errors import RequestError
from handlers.preprocessing import build_transform
from handlers.tasks import get_task
from handlers.tasks.detection import PARITY_TOLERANCE, binary_masks
from handlers.tasks.instance_segmentation import masks_of, rle_decode, rle_encode
from tvserve import TvserveError
from tvserve.archiving.check import check_model
from tvserve.archiving.mar import read_model_config, read_record
from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_torchvision, random_state_dict, torchvision_record
from tvserve.archiving.zoo import models_by_task, preset_of
from tvserve.ops import client
from tvserve.tools.tasks_latency import detecting_weights  # random weights that detect something

TASKS = models_by_task()
OTHER_WEIGHTS = [weights for task, names in TASKS.items() if task != "classification"
                 for name in names for weights in get_model_weights(name)]
CLIP_TASKS = ("video_classification", "optical_flow")  # their presets: tests/test_video_flow.py
IMAGE_WEIGHTS = [weights for task, names in TASKS.items() if task not in ("classification", *CLIP_TASKS)
                 for name in names for weights in get_model_weights(name)]
NAME_OF = {weights: name for task, names in TASKS.items() for name in names for weights in get_model_weights(name)}


def odd_images() -> list:
    """A real photo at an odd size, and random pixels at awkward aspect ratios."""
    generator = torch.Generator().manual_seed(0)
    images = [Image.open(PHOTOS[0]).convert("RGB").resize((333, 217), Image.BILINEAR)]
    for width, height in [(97, 333), (1001, 250)]:
        images.append(Image.fromarray(torch.randint(0, 256, (height, width, 3), dtype=torch.uint8,
                                                    generator=generator).numpy()))
    return images


def test_zoo_lists_every_task():
    assert set(TASKS) == {"classification", "detection", "instance_segmentation", "keypoints", "semantic_segmentation",
                          "video_classification", "optical_flow"}
    assert TASKS["video_classification"] == ["mc3_18", "mvit_v1_b", "mvit_v2_s", "r2plus1d_18", "r3d_18", "s3d",
                                             "swin3d_b", "swin3d_s", "swin3d_t"]
    assert TASKS["optical_flow"] == ["raft_large", "raft_small"]
    assert {"fasterrcnn_resnet50_fpn", "fcos_resnet50_fpn", "retinanet_resnet50_fpn", "ssd300_vgg16",
            "ssdlite320_mobilenet_v3_large"} <= set(TASKS["detection"])
    assert "maskrcnn_resnet50_fpn" in TASKS["instance_segmentation"]
    assert TASKS["keypoints"] == ["keypointrcnn_resnet50_fpn"]
    assert {"deeplabv3_resnet50", "fcn_resnet50", "lraspp_mobilenet_v3_large"} <= set(TASKS["semantic_segmentation"])
    result = run_tvserve("zoo", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {(row["task"], row["model"]) for row in rows} == {(t, n) for t, names in TASKS.items() for n in names}
    assert len([row for row in rows if row["task"] != "classification"]) == len(OTHER_WEIGHTS)


@pytest.mark.parametrize("weights", IMAGE_WEIGHTS, ids=str)
def test_preset_matches_weights_transforms(weights):
    ours, theirs = build_transform(preset_of(weights)), weights.transforms()
    for image in odd_images():
        expected = theirs(image)
        torch.testing.assert_close(ours(image), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("weights", OTHER_WEIGHTS, ids=str)
def test_every_weight_passes_the_meta_device_check(weights, tmp_path):
    """Built by torchvision's builder for these weights, on the meta device: the state_dict loads
    strictly, the forward that can run there runs, and the head fits the categories."""
    name = NAME_OF[weights]
    record = torchvision_record(name, weights)
    assert record.labels == weights.meta.get("categories", [])  # optical flow: no classes
    with torch.device("meta"):
        state = random_state_dict(record, tmp_path)
    assert all(tensor.is_meta for tensor in state.values())
    check_model(record, state, tmp_path)
    if record.task == "keypoints":
        assert record.keypoint_names == weights.meta["keypoint_names"]


def test_meta_check_refuses_a_head_that_does_not_fit_the_labels(tmp_path):
    weights = get_model_weights("ssdlite320_mobilenet_v3_large").DEFAULT
    record = torchvision_record("ssdlite320_mobilenet_v3_large", weights)
    with torch.device("meta"):
        state = random_state_dict(record, tmp_path)
    record.labels = record.labels[:10]
    with pytest.raises(TvserveError, match="head scores 91 classes, but there are 10 labels"):
        check_model(record, state, tmp_path)
    state.pop(next(iter(state)))
    with pytest.raises(TvserveError, match="The weights do not fit the model: Missing key"):
        check_model(torchvision_record("ssdlite320_mobilenet_v3_large", weights), state, tmp_path)


def test_rle_is_cocos_compressed_string_and_round_trips():
    mask = np.array([[0, 1], [1, 1]], dtype=bool)  # column-major: 0, 1, 1, 1 -> counts 1, 3
    assert rle_encode(mask) == {"size": [2, 2], "counts": "13"}
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 13), (64, 48)]:
        for density in (0.0, 0.3, 1.0):
            mask = rng.random(shape) < density
            assert np.array_equal(rle_decode(rle_encode(mask)), mask)
    blob = np.zeros((300, 400), dtype=bool)
    blob[50:250, 100:300] = True
    assert np.array_equal(rle_decode(rle_encode(blob)), blob)


@pytest.mark.parametrize("raw, message", [
    ({"threshold": "1.5"}, "threshold must be a number from 0 to 1"),
    ({"threshold": "nan"}, "threshold must be a number from 0 to 1"),
    ({"threshold": "abc"}, "threshold must be a number from 0 to 1"),
    ({"max_detections": "0"}, "max_detections must be a whole number from 1 to 1000"),
    ({"max_detections": "2.5"}, "max_detections must be a whole number from 1 to 1000"),
])
def test_detection_options_are_checked(raw, message):
    with pytest.raises(RequestError, match=message):
        get_task("detection", ["a", "b"]).parse_options(raw)


def test_detection_answer_is_filtered_sorted_and_capped():
    task = get_task("detection", ["__background__", "cat", "dog"])
    output = {"boxes": torch.tensor([[0., 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3]]),
              "labels": torch.tensor([1, 2, 1]), "scores": torch.tensor([0.4, 0.9, 0.6])}
    answer = task.postprocess(output, task.parse_options({"threshold": "0.5"}))
    assert [(item["label"], item["box"]) for item in answer] == [("dog", [1, 1, 2, 2]), ("cat", [2, 2, 3, 3])]
    assert len(task.postprocess(output, task.parse_options({"threshold": "0", "max_detections": "1"}))) == 1


# One model per task, random weights saved to a file. Random R-CNN heads score every class about
# alike, below the models' own 0.05 floor: their classifier weights are redrawn so that each
# model detects something, with scores that differ between boxes.
LIVE = {
    "detection": "fasterrcnn_mobilenet_v3_large_320_fpn",
    "instance_segmentation": "maskrcnn_resnet50_fpn",
    "keypoints": "keypointrcnn_resnet50_fpn",
    "semantic_segmentation": "lraspp_mobilenet_v3_large",
}
ALL_DETECTIONS = {"X-Threshold": "0", "X-Max_Detections": "1000"}


def torchvision_model(name, weights_file):
    """The model exactly as torchvision's builder makes it for its pretrained weights, given our file."""
    enum = get_model_weights(name).DEFAULT
    state = torch.load(weights_file, weights_only=True)
    with mock.patch.object(type(enum), "get_state_dict", lambda self, *args, **kwargs: state):
        return torchvision.models.get_model(name, weights=enum).eval(), enum.transforms()


def upright(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


def exif_rotated(image: Image.Image, fmt: str = "JPEG") -> bytes:
    """`image` stored turned a quarter, with the EXIF orientation that turns it back (as phones write)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image.transpose(Image.Transpose.ROTATE_90), fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))


def live_images(task: str) -> list:
    """Small images of odd sizes, one EXIF-rotated. The ResNet-50 R-CNNs resize the shorter side to
    800 up to a longer side of 1333: one long thin image keeps their heavy forwards small."""
    photo = Image.open(PHOTOS[0]).convert("RGB")
    if task in ("instance_segmentation", "keypoints"):
        return [exif_rotated(photo.resize((387, 57)))]
    return [encode(photo.resize((333, 217)), "PNG"), exif_rotated(photo.resize((251, 163))),
            encode(photo.resize((97, 301)), "JPEG", quality=90)]


@pytest.fixture(scope="module")
def served_tasks(server, model_store, work):
    """The LIVE models archived (eager, one worker; detection batching 4) and registered."""
    archives = {}
    for task, name in LIVE.items():
        weights_file = work / f"{name}-random.pth"
        detecting_weights(name, weights_file, work)
        archives[task] = archive_torchvision(name, weights_file=weights_file, options=ArchiveOptions(
            export_path=model_store, backend="eager", workers=1, batch_size=4 if task == "detection" else 1,
            max_batch_delay=200 if task == "detection" else 1, startup_timeout=300))
        client.register(archives[task].name, management_url=server.management_url)
    yield archives
    for task, name in LIVE.items():
        client.unregister(name, "1.0", management_url=server.management_url)


def in_process(task, weights_file, data: bytes):
    """torchvision's model on the upright image through weights.transforms(), on one thread as the
    worker runs: a detector's output dict, or segmentation logits Tensor[n_labels, h, w]."""
    model, transform = torchvision_model(LIVE[task], weights_file)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            x = transform(upright(data))
            return model(x[None])["out"][0] if task == "semantic_segmentation" else model([x])[0]
    finally:
        torch.set_num_threads(previous)


def assert_same_detections(answer: list, expected: dict, labels: list):
    """Every detection answered matches one of torchvision's (label, box and score within
    PARITY_TOLERANCE, keypoints too; masks identical), none left over; sorted by score."""
    assert len(answer) == len(expected["scores"]) > 0
    scores = [item["score"] for item in answer]
    assert scores == sorted(scores, reverse=True)
    masks = binary_masks(expected) if "masks" in expected else None
    unmatched = set(range(len(answer)))
    for item_index, item in enumerate(answer):
        assert item["label"] == labels[item["index"]]
        for i in sorted(unmatched):
            close = (item["index"] == expected["labels"][i].item()
                     and abs(item["score"] - expected["scores"][i].item()) <= PARITY_TOLERANCE
                     and (torch.tensor(item["box"]) - expected["boxes"][i]).abs().max() <= PARITY_TOLERANCE)
            if close:
                break
        else:
            raise AssertionError(f"served detection {item} is not torchvision's")
        unmatched.remove(i)
        if masks is not None:
            assert torch.equal(masks_of([item])[0], masks[i])
        if "keypoints" in expected:
            points = torch.tensor([[p["x"], p["y"]] for p in item["keypoints"]])
            torch.testing.assert_close(points, expected["keypoints"][i, :, :2], rtol=0, atol=PARITY_TOLERANCE)
            scores = torch.tensor([p["score"] for p in item["keypoints"]])
            torch.testing.assert_close(scores, expected["keypoints_scores"][i], rtol=0, atol=PARITY_TOLERANCE)


@pytest.mark.parametrize("task", ["detection", "instance_segmentation", "keypoints"])
def test_detections_served_like_torchvision_in_process(server, served_tasks, work, task):
    name = LIVE[task]
    record = read_record(served_tasks[task])
    assert record.task == task and record.preset.to_dict() == {}
    for data in live_images(task):
        response = post_image(server, name, data, headers=ALL_DETECTIONS, timeout=300)
        assert response.status_code == 200, response.text
        expected = in_process(task, work / f"{name}-random.pth", data)
        assert_same_detections(response.json(), expected, record.labels)
        height, width = upright(data).height, upright(data).width
        for item in response.json():
            x1, y1, x2, y2 = item["box"]  # clipped to the image (to float rounding: scaled back from the model's size)
            assert -1e-3 <= x1 <= x2 <= width + 1e-3 and -1e-3 <= y1 <= y2 <= height + 1e-3
            if task == "instance_segmentation":
                assert item["mask"]["size"] == [height, width]
            if task == "keypoints":
                assert [p["name"] for p in item["keypoints"]] == record.keypoint_names


def test_semantic_segmentation_served_like_torchvision_in_process(server, served_tasks, work):
    name, labels = LIVE["semantic_segmentation"], read_record(served_tasks["semantic_segmentation"]).labels
    for data in live_images("semantic_segmentation"):
        response = post_image(server, name, data, timeout=300)
        assert response.status_code == 200, response.text
        answer = response.json()
        image = upright(data)
        classes = in_process("semantic_segmentation", work / f"{name}-random.pth", data).argmax(dim=0)
        expected = torch.nn.functional.interpolate(classes[None, None].float(), size=(image.height, image.width),
                                                   mode="nearest")[0, 0].to(torch.int64)
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["png"]))))
        assert answer["size"] == [image.height, image.width] and served.shape == (image.height, image.width)
        assert np.array_equal(served, expected.numpy())
        counts = torch.bincount(expected.flatten(), minlength=len(labels))
        assert {item["index"]: item["fraction"] for item in answer["classes"]} == {
            index: count / expected.numel() for index, count in enumerate(counts.tolist()) if count}
        assert all(item["label"] == labels[item["index"]] for item in answer["classes"])


def test_threshold_and_max_detections_per_request(server, served_tasks):
    data = live_images("detection")[0]
    everything = post_image(server, LIVE["detection"], data, headers=ALL_DETECTIONS).json()
    threshold = everything[len(everything) // 2]["score"]
    above = post_image(server, LIVE["detection"], data, headers={"X-Threshold": str(threshold)}).json()
    assert above == [item for item in everything if item["score"] >= threshold]
    form = post_image(server, LIVE["detection"], files={"file": data}, data={"threshold": "0", "max_detections": "3"})
    assert form.json() == everything[:3]


def test_images_of_different_sizes_share_a_batch(server, served_tasks):
    """Concurrent requests of several sizes (the archive batches 4, waiting up to 200 ms) and bad
    ones among them: each good one gets its own answer, each bad one its own 400."""
    images = live_images("detection")
    alone = [post_image(server, LIVE["detection"], data, headers=ALL_DETECTIONS).json() for data in images]
    mixed = [(i, data) for i, data in enumerate(images)] + [(None, b"not an image"), (None, b"")]
    with ThreadPoolExecutor(max_workers=len(mixed)) as pool:
        responses = list(pool.map(lambda item: post_image(server, LIVE["detection"], item[1], headers=ALL_DETECTIONS),
                                  mixed * 2))
    for (index, _), response in zip(mixed * 2, responses):
        if index is None:
            assert response.status_code == 400 and response.json()["type"] in ("EmptyBody", "UnsupportedImage")
        else:
            assert response.status_code == 200 and response.json() == alone[index]
    assert read_model_config(served_tasks["detection"])["batchSize"] == 4


REFUSED = [case for case in refused_cases() if not case.name.startswith("topk")] + [
    case for value in ("-0.1", "1.5", "abc", "nan", "")
    for case in [Case(f"threshold-{value}", encode(Image.new("RGB", (64, 48)), "PNG"),
                                          headers={"X-Threshold": value}, status=400, error_type="InvalidParameter")]
] + [
    case for value in ("0", "-1", "1001", "2.5")
    for case in [Case(f"max-detections-{value}", encode(Image.new("RGB", (64, 48)), "PNG"),
                                          headers={"X-Max_Detections": value}, status=400, error_type="InvalidParameter")]
]


@pytest.mark.parametrize("task", ["detection", "semantic_segmentation"])
@pytest.mark.parametrize("case", REFUSED, ids=lambda case: case.name)
def test_refused_input_gets_its_status_and_a_json_reason(server, served_tasks, task, case):
    if task == "semantic_segmentation" and case.name.startswith(("threshold", "max-detections")):
        pytest.skip("semantic segmentation takes no options")
    response = requests_post(server, LIVE[task], case)
    assert response.status_code == case.status, response.text
    body = response.json()
    assert body["code"] == case.status and body["type"] == case.error_type and len(body["message"]) > 10


def requests_post(server, model, case):
    return post_image(server, model, case.body, files=case.files, headers=case.headers)


@pytest.mark.parametrize("case", accepted_cases(), ids=lambda case: case.name)
def test_accepted_input_gets_the_plain_rgb_images_detections(server, served_tasks, case):
    reference = post_image(server, LIVE["detection"], encode(case.reference, "PNG"), headers=ALL_DETECTIONS)
    response = post_image(server, LIVE["detection"], case.body, files=case.files,
                          headers={**case.headers, **ALL_DETECTIONS})
    assert response.status_code == 200, response.text
    assert response.json() == reference.json()


def test_auto_sizing_of_a_list_input_model_keeps_eager_and_says_why(tmp_path):
    """Workers and batch size measured as for classifiers; the backend stays eager, and the record
    says why the exports were not tried."""
    archive = archive_torchvision("lraspp_mobilenet_v3_large", random_init=True,
                                  options=ArchiveOptions(export_path=tmp_path))
    backend = read_record(archive).backend
    assert backend.name == "eager" and backend.file is None
    candidates = {c["name"]: c for c in backend.selection["candidates"]}
    assert candidates["eager"]["ms"] > 0 and "ms_batch_4" in candidates["eager"]
    assert all("not tried: semantic_segmentation models take images of their own sizes" in c["error"]
               for name, c in candidates.items() if name != "eager")
    config = read_model_config(archive)
    assert config["minWorkers"] >= 1 and config["batchSize"] in (1, 8)
    with pytest.raises(TvserveError, match="Backend onnxruntime cannot serve this model: semantic_segmentation"):
        archive_torchvision("lraspp_mobilenet_v3_large", random_init=True,
                            options=ArchiveOptions(export_path=tmp_path, backend="onnxruntime", force=True))


FUZZ_SESSION = requests.Session()
option_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12).map(str.strip)
option_headers = st.dictionaries(st.sampled_from(["X-Threshold", "X-Max_Detections", "Content-Type"]), option_values)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=fuzz_bodies, headers=option_headers, task=st.sampled_from(["detection", "semantic_segmentation"]))
def test_fuzzed_requests_to_the_new_tasks_never_get_5xx(server, served_tasks, body, headers, task):
    response = FUZZ_SESSION.post(f"{server.inference_url}/predictions/{LIVE[task]}", data=body, headers=headers,
                                 timeout=60)
    assert response.status_code in (200, 400, 413, 415), (response.status_code, response.text)


def test_offline_refusal_names_the_weights_file_to_supply(tmp_path, monkeypatch):
    """No --weights-file, nothing in the hub cache, no download: one line naming the file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    weights = get_model_weights("ssdlite320_mobilenet_v3_large").DEFAULT
    with mock.patch.object(type(weights), "get_state_dict", side_effect=OSError("network unreachable")):
        with pytest.raises(TvserveError) as error:
            archive_torchvision("ssdlite320_mobilenet_v3_large", options=ArchiveOptions(export_path=tmp_path))
    assert "ssdlite320_mobilenet_v3_large_coco-a79551df.pth" in str(error.value) and "--weights-file" in str(error.value)
    assert not list(tmp_path.glob("*.mar"))


def test_predict_prints_and_draws_a_detection_answer(server, served_tasks, tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(live_images("detection")[0])
    result = run_tvserve("predict", LIVE["detection"], image, "--url", server.inference_url, "--threshold", "0",
                         "--max-detections", "5", "--draw", tmp_path / "drawn")
    assert result.returncode == 0, result.stderr
    assert len([line for line in result.stdout.splitlines() if line.strip().startswith("0.")]) == 5
    drawn = Image.open(tmp_path / "drawn" / f"photo.{LIVE['detection']}.png")
    assert drawn.size == Image.open(image).size
    assert not np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(Image.open(image).convert("RGB")))
