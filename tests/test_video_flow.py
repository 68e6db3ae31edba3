"""Video classification and optical flow: the presets against the weights' own transforms(), the
sampling rule, and r3d_18 and raft_small archived with random weights from a file, served, and
compared over HTTP with torchvision's models in-process on clips and frame pairs made here (decoded
independently, resampled by torchvision's VideoClips rule, preprocessed by weights.transforms())."""

import base64
import io
import json
import math

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from torchcodec.decoders import VideoDecoder
from torchcodec.encoders import VideoEncoder
from torchvision.datasets.video_utils import VideoClips
from torchvision.models import get_model_weights
from torchvision.utils import flow_to_image

from conftest import FLOW, PHOTOS, VIDEO
from helpers import REPO, post_image, registered_torchvision
from test_tasks import TASKS, torchvision_model
from handlers.clips import MAX_CLIP_BYTES, MAX_CLIP_SECONDS, window_indices
from handlers.devices import PairPreprocessing
from handlers.preprocessing import video_geometry, video_window
from handlers.record import Preset
from handlers.tasks.optical_flow import MAX_PAIR_PIXELS, PARITY_TOLERANCE as FLOW_TOLERANCE, pad, padded_size
from handlers.tasks.video_classification import PARITY_TOLERANCE
from tvserve.archiving.mar import read_record
from tvserve import cli
from tvserve.archiving.zoo import preset_of
from tvserve.tools.draw import STRIP_FRAMES, STRIP_HEIGHT

VIDEO_WEIGHTS = [weights for name in TASKS["video_classification"] for weights in get_model_weights(name)]
FLOW_WEIGHTS = [weights for name in TASKS["optical_flow"] for weights in get_model_weights(name)]
ALL_LABELS = {"X-TopK": "400"}


def synthetic_frames(count: int, height: int = 96, width: int = 128, seed: int = 0) -> torch.Tensor:
    """uint8 Tensor[count, 3, H, W]: a photo panning right by 2 px a frame, with grain."""
    photo = torch.from_numpy(np.array(Image.open(PHOTOS[0]).convert("RGB").resize((width + 2 * count, height))))
    generator = torch.Generator().manual_seed(seed)
    frames = [photo[:, 2 * i:2 * i + width].permute(2, 0, 1) for i in range(count)]
    grain = torch.randint(-8, 9, (count, 3, height, width), generator=generator)
    return (torch.stack(frames).int() + grain).clamp(0, 255).to(torch.uint8)


def encoded(frames: torch.Tensor, fps: float, fmt: str) -> bytes:
    return VideoEncoder(frames, frame_rate=fps).to_tensor(format=fmt).numpy().tobytes()


def png(frame: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame.permute(1, 2, 0).numpy()).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("weights", VIDEO_WEIGHTS, ids=str)
def test_video_preset_matches_weights_transforms(weights):
    """The recorded preset, run as the worker runs it (each frame resized and cropped as decoded,
    then a window normalised), equals torchvision's VideoClassification on the whole clip."""
    preset = preset_of(weights)
    assert preset["clip_len"] >= 1 and preset["frame_rate"] > 0
    clip = torch.randint(0, 256, (5, 3, 131, 97), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ours = video_window(preset)(torch.cat([video_geometry(preset)(clip[:3]), video_geometry(preset)(clip[3:])]))
    torch.testing.assert_close(ours, weights.transforms()(clip), rtol=0, atol=1e-6)


@pytest.mark.parametrize("weights", FLOW_WEIGHTS, ids=str)
def test_flow_preset_matches_weights_transforms(weights):
    first, second = (Image.fromarray(np.random.default_rng(seed).integers(0, 256, (131, 97, 3), dtype=np.uint8))
                     for seed in (1, 2))
    preprocess = PairPreprocessing(Preset.from_dict(preset_of(weights)))
    pair = preprocess.transform([first, second])
    expected = torch.stack(weights.transforms()(first, second))
    assert tuple(pair.shape) == (2, 3, 136, 128)  # 131 x 97 padded to multiples of 8, at least 128
    torch.testing.assert_close(pair[:, :, :131, :97], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(pair[:, :, 131:, :97], expected[:, :, -1:].expand(-1, -1, 5, -1))  # edge repeated


def test_windows_cover_the_clip_evenly():
    assert window_indices(16, 16) == [list(range(16))]
    assert window_indices(40, 16) == [list(range(0, 16)), list(range(12, 28)), list(range(24, 40))]
    assert window_indices(5, 8) == [[0, 0, 1, 1, 2, 3, 3, 4]]  # shorter than a window: frames repeated in order


def reference_windows(frames: torch.Tensor, fps: float, weights) -> list:
    """torchvision's own way: VideoClips' resampling to the weights' frame rate, then the documented
    windows, each through weights.transforms(): [Tensor[3, T, h, w]]."""
    preset = preset_of(weights)
    count = math.floor(len(frames) * preset["frame_rate"] / fps)
    sampled = frames[VideoClips._resample_video_idx(count, fps, preset["frame_rate"])]
    return [weights.transforms()(sampled[indices]) for indices in window_indices(len(sampled), preset["clip_len"])]


def reference_probabilities(windows: list, weights_file) -> torch.Tensor:
    """torchvision's r3d_18 on one thread: the windows' softmax probabilities averaged, Tensor[400]."""
    model, _ = torchvision_model(VIDEO, weights_file)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return torch.softmax(model(torch.stack(windows)), dim=1).mean(dim=0)
    finally:
        torch.set_num_threads(previous)


def decoded_frames(data: bytes) -> torch.Tensor:
    """uint8 Tensor[N, 3, H, W]: every frame, decoded here with torchcodec."""
    return VideoDecoder(data)[:]


@pytest.fixture(scope="module")
def served(server, model_store, video_weights, flow_weights):
    """r3d_18 and raft_small archived by name (one worker) and registered."""
    with registered_torchvision(server, model_store, VIDEO, video_weights) as video, \
            registered_torchvision(server, model_store, FLOW, flow_weights) as flow:
        yield {VIDEO: video, FLOW: flow}


def served_probabilities(response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    probabilities = torch.zeros(400)
    for item in response.json()["predictions"]:
        probabilities[item["index"]] = item["probability"]
    return probabilities


def assert_same_answer(response, expected: torch.Tensor, windows: int):
    """Every probability within PARITY_TOLERANCE, the top-5 indices equal (and far enough apart to
    be decided), the window count equal."""
    body = response.json()
    assert body["windows"] == windows
    ours = served_probabilities(response)
    assert (ours - expected).abs().max().item() <= PARITY_TOLERANCE
    top = expected.topk(6)
    assert (top.values[:-1] - top.values[1:]).min() > 2 * PARITY_TOLERANCE  # within the tolerance, an order kept
    assert [item["index"] for item in body["predictions"][:5]] == top.indices[:5].tolist()


@pytest.mark.parametrize("fmt, fps, count", [("mp4", 30, 40), ("webm", 25, 30)])
def test_clip_served_like_torchvision_in_process(server, served, video_weights, fmt, fps, count):
    """An MP4 at 30 fps (resampled by 2 to 15: 20 frames, two windows) and a WebM at 25 fps (18
    frames, two overlapping windows): every probability as torchvision's, averaged over the windows."""
    record = read_record(served[VIDEO])
    assert record.task == "video_classification" and record.preset.clip_len == 16 and record.preset.frame_rate == 15
    assert record.backend.name == "eager" and record.weights.origin == "file"
    data = encoded(synthetic_frames(count), fps, fmt)
    frames = decoded_frames(data)
    windows = reference_windows(frames, fps, get_model_weights(VIDEO).DEFAULT)
    assert len(windows) == 2
    response = post_image(server, VIDEO, data, headers=ALL_LABELS, timeout=120)
    assert_same_answer(response, reference_probabilities(windows, video_weights), len(windows))
    assert response.json()["frames"] == math.floor(count * 15 / fps)


def test_frames_as_multipart_gif_and_oip_pixels_answer_alike(server, served, video_weights):
    """A list of 12 frames (one window, frames repeated to 16) as multipart PNG fields and as OIP
    pixels [T, H, W, 3], and a GIF of them at 10 fps (18 frames at 15 fps, two windows): the same
    answers as torchvision's on those frames."""
    frames = synthetic_frames(12, height=72, width=90, seed=3)
    expected = reference_probabilities(reference_windows(frames, 15, get_model_weights(VIDEO).DEFAULT), video_weights)
    files = [(f"frame{i:02d}", (f"frame{i:02d}.png", png(frame), "image/png")) for i, frame in enumerate(frames)]
    response = post_image(server, VIDEO, files=files, headers=ALL_LABELS, timeout=120)
    assert_same_answer(response, expected, 1)
    assert response.json()["frames"] == 12
    pixels = frames.permute(0, 2, 3, 1).contiguous().numpy()
    body = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                        "data": pixels.reshape(-1).tolist()}],
            "parameters": {"topk": 5}, "outputs": [{"name": "probabilities"}, {"name": "windows"}]}
    oip = requests.post(f"{server.inference_url}/v2/models/{VIDEO}/infer", json=body, timeout=120)
    assert oip.status_code == 200, oip.text
    outputs = {output["name"]: output for output in oip.json()["outputs"]}
    assert outputs["windows"]["data"] == [1]
    assert max(abs(a - b) for a, b in zip(outputs["probabilities"]["data"], expected.tolist())) <= PARITY_TOLERANCE
    gif = io.BytesIO()  # GIF's palette: lossy, so its own frames are the reference
    pictures = [Image.fromarray(frame.permute(1, 2, 0).numpy()) for frame in frames]
    pictures[0].save(gif, "GIF", save_all=True, append_images=pictures[1:], duration=100, loop=0)
    gif_frames = torch.stack([torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1)
                              for picture in decoded_gif(gif.getvalue())])
    expected = reference_probabilities(reference_windows(gif_frames, 10, get_model_weights(VIDEO).DEFAULT),
                                       video_weights)
    assert_same_answer(post_image(server, VIDEO, gif.getvalue(), headers=ALL_LABELS, timeout=120), expected, 2)


def decoded_gif(data: bytes) -> list:
    """Every frame of a GIF as PIL decodes it (an independent decoder)."""
    image = Image.open(io.BytesIO(data))
    frames = []
    for index in range(image.n_frames):
        image.seek(index)
        frames.append(image.convert("RGB"))
    return frames


def too_long_clip() -> bytes:
    """A 16x16 MP4 a little over the duration limit, at 2 fps (cheap to make and to refuse)."""
    return encoded(torch.zeros(int(MAX_CLIP_SECONDS * 2) + 4, 3, 16, 16, dtype=torch.uint8), 2, "mp4")


@pytest.mark.parametrize("case", ["too_big", "too_long", "not_a_clip", "truncated", "sizes_differ"])
def test_clip_mistakes_get_their_status_and_say_the_limit(server, served, case):
    small = encoded(synthetic_frames(8, 32, 32), 15, "mp4")
    kwargs = {
        "too_big": {"data": b"\x00\x00\x00\x18ftypisom" + bytes(MAX_CLIP_BYTES)},
        "too_long": {"data": too_long_clip()},
        "not_a_clip": {"data": b"plain text, not a clip"},
        "truncated": {"data": small[:len(small) // 3]},
        "sizes_differ": {"files": [("a", png(synthetic_frames(1, 32, 32)[0])), ("b", png(synthetic_frames(1, 32, 40)[0]))]},
    }[case]
    response = post_image(server, VIDEO, timeout=120, **kwargs)
    status, kind, words = {
        "too_big": (413, "ClipTooLarge", f"the limit is {MAX_CLIP_BYTES} bytes (32 MiB)"),
        "too_long": (413, "ClipTooLong", f"the limit is {MAX_CLIP_SECONDS:g} s"),
        "not_a_clip": (400, "UnsupportedClip", "neither a clip (MP4, WebM, GIF)"),
        "truncated": (400, "CorruptClip", "truncated, corrupt or not decodable"),
        "sizes_differ": (400, "FrameSizesDiffer", "32x32, 40x32"),
    }[case]
    assert response.status_code == status, response.text
    assert response.json()["type"] == kind and words in response.json()["message"]


def flow_pair(height: int = 130, width: int = 150) -> tuple:
    """Two frames of a photo, the second moved 3 px right and 2 px down: uint8 arrays [H, W, 3]."""
    photo = np.asarray(Image.open(PHOTOS[0]).convert("RGB").resize((width + 8, height + 8)))
    return photo[4:4 + height, 4:4 + width].copy(), photo[2:2 + height, 1:1 + width].copy()


def reference_flow(first: np.ndarray, second: np.ndarray, weights_file) -> torch.Tensor:
    """torchvision's raft_small on the pair through weights.transforms(), padded as documented
    (right and bottom, edge repeated, to multiples of 8 and at least min_size), cropped back: Tensor[2, H, W]."""
    model, transform = torchvision_model(FLOW, weights_file)
    height, width = first.shape[:2]
    images = transform(*(torch.from_numpy(image).permute(2, 0, 1) for image in (first, second)))
    size = padded_size(height, width, get_model_weights(FLOW).DEFAULT.meta["min_size"])
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            flow = model(*(pad(image[None], size) for image in images))[-1][0]
    finally:
        torch.set_num_threads(previous)
    return flow[:, :height, :width]


def as_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def assert_same_flow(served: np.ndarray, expected: torch.Tensor):
    """float16 of torchvision's flow: within PARITY_TOLERANCE before float16's rounding (half a unit
    in the last place: |x| x 2^-11)."""
    reference = expected.numpy()
    assert served.shape == reference.shape and served.dtype == np.float16
    bound = FLOW_TOLERANCE + np.abs(reference) * 2.0 ** -11
    assert (np.abs(served.astype(np.float64) - reference) <= bound).all()


def test_flow_served_like_torchvision_in_process(server, served, flow_weights):
    """Two PNGs as multipart fields, 150x130 (padded to 152x136 for RAFT): the float16 field and
    the colour PNG at the sent size, as torchvision's raft_small and flow_to_image give them."""
    record = read_record(served[FLOW])
    assert record.task == "optical_flow" and record.labels == [] and record.preset.min_size == [128, 128]
    first, second = flow_pair()
    expected = reference_flow(first, second, flow_weights)
    files = [("image1", ("a.png", as_png(first), "image/png")), ("image2", ("b.png", as_png(second), "image/png"))]
    response = post_image(server, FLOW, files=files, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == [130, 150] and body["flow"]["dtype"] == "float16" and body["flow"]["shape"] == [2, 130, 150]
    field = np.frombuffer(base64.b64decode(body["flow"]["data"]), "<f2").reshape(body["flow"]["shape"])
    assert_same_flow(field, expected)
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["png"]))))
    colours = flow_to_image(expected).permute(1, 2, 0).numpy()
    assert picture.shape == (130, 150, 3) and np.abs(picture.astype(int) - colours.astype(int)).max() <= 1


def test_flow_over_oip_pixels_answers_as_predictions(server, served, flow_weights):
    first, second = flow_pair(128, 136)
    pixels = np.stack([first, second])
    body = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                        "parameters": {"binary_data_size": pixels.nbytes}}],
            "outputs": [{"name": "flow", "parameters": {"binary_data": True}}]}
    head = json.dumps(body).encode()
    response = requests.post(f"{server.inference_url}/v2/models/{FLOW}/infer", data=head + pixels.tobytes(),
                             headers={"Inference-Header-Content-Length": str(len(head)),
                                      "Content-Type": "application/octet-stream"}, timeout=120)
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    output = json.loads(response.content[:length])["outputs"][0]
    assert output["name"] == "flow" and output["datatype"] == "FP16" and output["shape"] == [1, 2, 128, 136]
    field = np.frombuffer(response.content[length:], "<f2").reshape(output["shape"])[0]
    assert_same_flow(field, reference_flow(first, second, flow_weights))


@pytest.mark.parametrize("case", ["one_image", "sizes_differ", "too_large"])
def test_flow_mistakes_get_their_status_and_say_why(server, served, case):
    first, second = flow_pair()
    big = as_png(np.zeros((577, 1024, 3), np.uint8))
    files = {
        "one_image": [("image1", as_png(first))],
        "sizes_differ": [("image1", as_png(first)), ("image2", as_png(second[:-2]))],
        "too_large": [("image1", big), ("image2", big)],
    }[case]
    status, kind, words = {
        "one_image": (400, "NeedTwoImages", "this one carries 1"),
        "sizes_differ": (400, "ImageSizesDiffer", "150x130 and 150x128"),
        "too_large": (413, "ImageTooLarge", f"the limit for optical flow is {MAX_PAIR_PIXELS} (1024x576)"),
    }[case]
    response = post_image(server, FLOW, files=files, timeout=120)
    assert response.status_code == status, response.text
    assert response.json()["type"] == kind and words in response.json()["message"]


def test_predict_prints_and_draws_a_clip_and_a_pair(server, served, tmp_path, capsys):
    """`tvserve predict` (its code in this process) with the samples: a clip's labels and windows,
    drawn as a strip of frames; a pair (--pairs) described by its motion, drawn beside the flow's colours."""
    clip = REPO / "samples" / "pan.mp4"
    assert cli.main(["predict", VIDEO, str(clip), "--url", server.inference_url, "--topk", "3",
                     "--draw", str(tmp_path / "drawn")]) == 0
    printed = capsys.readouterr().out
    assert len([line for line in printed.splitlines() if line.strip().startswith("0.")]) == 3
    assert "(30 frames sampled, 2 window(s))" in printed
    strip = Image.open(tmp_path / "drawn" / f"pan.{VIDEO}.png")
    assert strip.height == STRIP_HEIGHT and strip.width == STRIP_FRAMES * round(192 * STRIP_HEIGHT / 144)
    first, second = REPO / "samples" / "pan-1.png", REPO / "samples" / "pan-2.png"
    assert cli.main(["predict", FLOW, str(first), str(second), "--pairs", "--url", server.inference_url,
                     "--draw", str(tmp_path / "drawn")]) == 0
    assert "flow 192x144: mean motion" in capsys.readouterr().out
    drawn = np.asarray(Image.open(tmp_path / "drawn" / f"pan-1.{FLOW}.png"))
    assert drawn.shape == (144, 2 * 192, 3)
    assert np.array_equal(drawn[:, :192], np.asarray(Image.open(first).convert("RGB")))


def test_pairs_take_an_even_number_of_images(capsys):
    assert cli.main(["predict", FLOW, "samples/pan-1.png", "--pairs"]) == 1
    assert "--pairs takes the images two at a time (first and second frame); got 1." in capsys.readouterr().err


def test_zoo_table_lists_the_video_and_flow_models(capsys):
    assert cli.main(["zoo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "video classification (9 models)" in lines and "optical flow (2 models)" in lines
    r3d = next(line for line in lines if line.startswith("r3d_18 "))
    assert "128x171/112x112" in r3d and "63.20" in r3d  # the preset's [h, w] sizes, Kinetics-400 acc@1
    assert any(line.startswith("raft_small ") and "C_T_V2 (default)" in line for line in lines)
