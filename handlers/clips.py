"""A clip from an untrusted client -> the windows a video model takes, or a RequestError (4xx).

A request carries either one encoded clip, MP4, WebM or animated GIF, decoded by torchcodec (with
FFmpeg's libraries: Debian's libavcodec59 and friends), or a list of frames (each an image in a
format handlers/images.py accepts, or RGB pixels uint8 [H, W, 3]), taken as consecutive frames
already at the model's frame rate.

Sampling follows torchvision's video references: the clip is resampled to the preset's
`frame_rate` (the frame shown at each multiple of 1/frame_rate seconds: floor(duration x rate)
frames, as `VideoClips` does), then cut into windows of `clip_len` frames: one window for a clip of
up to `clip_len` frames (a shorter one has its frames repeated in order to fill it), else
ceil(frames / clip_len) windows spread evenly from the first frame to the last (the last ones
overlap a little, so that every frame is seen). Each frame is resized and cropped as it is decoded
(handlers/preprocessing.py's video_geometry), so a long clip holds only small frames.

Limits, each a 413 that says it: MAX_CLIP_BYTES of body, MAX_CLIP_SECONDS of clip (a frame list's
duration is its frames / frame_rate), MAX_FRAME_PIXELS per frame.
"""

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from handlers.errors import RequestError
from handlers.images import open_image, open_pixels
from handlers.preprocessing import video_geometry, video_window

log = logging.getLogger(__name__)

MAX_CLIP_BYTES = 32 * 1024 * 1024  # under TorchServe's max_request_size (64 MiB), so this 413 is tvserve's own
MAX_CLIP_SECONDS = 30.0  # r3d_18 at 15 fps: 450 frames, 29 windows, ~10 s of forward on 2 cores
MAX_FRAME_PIXELS = 3840 * 2160  # a 4K frame
DECODE_CHUNK = 16  # frames decoded at full size at once, then resized (a 4K chunk: 400 MB)
TIME_EPSILON = 1e-6  # s: a sample time on a frame's start picks that frame, whatever the float rounding
CONTAINERS = ("MP4", "WebM", "GIF")  # what FFmpeg is handed: sniffed from the first bytes, nothing else


def container_of(data: bytes):
    """"MP4", "WebM" (Matroska's EBML header) or "GIF" from the body's first bytes; None otherwise."""
    if data[4:8] == b"ftyp":
        return "MP4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "WebM"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


@dataclass
class Clip:
    """One request's clip as sent: [encoded clip bytes], or its frames (encoded images or uint8 arrays [H, W, 3])."""

    items: list


def sample_count(seconds: float, frame_rate: float) -> int:
    """Frames a clip of `seconds` gives at `frame_rate` (torchvision's floor(frames x rate / fps)), at least one."""
    return max(1, math.floor(seconds * frame_rate + 1e-6))


def window_starts(frames: int, clip_len: int) -> list:
    """The first frame of each window: [0] up to clip_len frames, else ceil(frames / clip_len) starts
    spread evenly from 0 to frames - clip_len."""
    if frames <= clip_len:
        return [0]
    count = math.ceil(frames / clip_len)
    return [round(i * (frames - clip_len) / (count - 1)) for i in range(count)]


def window_indices(frames: int, clip_len: int) -> list:
    """[[frame index] * clip_len] per window; a clip shorter than the window has its frames repeated in order."""
    if frames < clip_len:
        return [[i * frames // clip_len for i in range(clip_len)]]
    return [list(range(start, start + clip_len)) for start in window_starts(frames, clip_len)]


def too_long(seconds: float, what: str) -> RequestError:
    return RequestError(413, "ClipTooLong", f"The {what} lasts {seconds:.1f} s; the limit is {MAX_CLIP_SECONDS:g} s. "
                                            "Send a shorter clip, or cut it and send the parts.")


def check_body(data: bytes) -> None:
    if len(data) > MAX_CLIP_BYTES:
        raise RequestError(413, "ClipTooLarge", f"The clip is {len(data)} bytes; the limit is {MAX_CLIP_BYTES} "
                                                f"bytes ({MAX_CLIP_BYTES // 2**20} MiB).")


class ClipDecoder:
    """A clip's frames sampled at the preset's frame rate, resized and cropped: uint8 Tensor[T, 3, h, w]."""

    def __init__(self, preset: dict):
        self.frame_rate, self.clip_len = preset["frame_rate"], preset["clip_len"]
        self.geometry = video_geometry(preset)

    def __call__(self, clip: Clip) -> torch.Tensor:
        if not clip.items:
            raise RequestError(400, "EmptyBody", "The request carries no clip: send an MP4, WebM or GIF, or its frames.")
        if len(clip.items) == 1 and not isinstance(clip.items[0], np.ndarray):
            check_body(clip.items[0])
            if container_of(clip.items[0]):
                return self.from_container(clip.items[0])
            try:
                return self.from_frames(clip.items)
            except RequestError as err:
                if err.type != "UnsupportedImage":
                    raise
                raise RequestError(400, "UnsupportedClip", f"The body is neither a clip ({', '.join(CONTAINERS)}) "
                                   "nor a frame (an image: JPEG, PNG, WebP, BMP, TIFF).") from None
        return self.from_frames(clip.items)

    def from_container(self, data: bytes) -> torch.Tensor:
        decoder, begin, seconds = open_container(data)
        if seconds > MAX_CLIP_SECONDS:
            raise too_long(seconds, container_of(data))
        times = [begin + k / self.frame_rate + TIME_EPSILON for k in range(sample_count(seconds, self.frame_rate))]
        chunks = []
        for first in range(0, len(times), DECODE_CHUNK):
            try:
                frames = decoder.get_frames_played_at(seconds=times[first:first + DECODE_CHUNK]).data
            except RuntimeError as err:  # FFmpeg's refusal of these untrusted bytes: the client's
                raise corrupt(container_of(data), err) from None
            chunks.append(self.geometry(frames))
        return torch.cat(chunks)

    def from_frames(self, items: list) -> torch.Tensor:
        """Frames sent one by one (images or pixels), consecutive at the model's frame rate."""
        seconds = len(items) / self.frame_rate
        if seconds > MAX_CLIP_SECONDS:
            raise too_long(seconds, f"list of {len(items)} frames at {self.frame_rate:g} fps")
        pictures = [frame_picture(item, index) for index, item in enumerate(items)]
        sizes = {picture.size for picture in pictures}
        if len(sizes) > 1:
            raise RequestError(400, "FrameSizesDiffer", f"The frames have {len(sizes)} different sizes "
                               f"({', '.join(f'{w}x{h}' for w, h in sorted(sizes))}): send frames of one size.")
        frames = torch.stack([torch.from_numpy(np.array(picture)).permute(2, 0, 1) for picture in pictures])
        return torch.cat([self.geometry(frames[first:first + DECODE_CHUNK])
                          for first in range(0, len(frames), DECODE_CHUNK)])


def frame_picture(item, index: int) -> Image.Image:
    """One sent frame -> an upright RGB image; its RequestError names it."""
    try:
        if isinstance(item, np.ndarray):
            return open_pixels(item, MAX_FRAME_PIXELS)
        if container_of(item) in ("MP4", "WebM"):
            raise RequestError(400, "UnsupportedClip", "A clip is one MP4, WebM or GIF alone, or a list of "
                                                       "frames (images): not several clips.")
        return open_image(item, MAX_FRAME_PIXELS)
    except RequestError as err:
        raise RequestError(err.status, err.type, f"Frame {index}: {err.message}") from None


def open_container(data: bytes) -> tuple:
    """(torchcodec VideoDecoder, first frame's time s, duration s) of an MP4, WebM or GIF body;
    RequestError when FFmpeg refuses it or a frame is over MAX_FRAME_PIXELS."""
    from torchcodec.decoders import VideoDecoder  # FFmpeg's libraries load with it: only video workers need them

    kind = container_of(data)
    try:
        decoder = VideoDecoder(data, seek_mode="exact", num_ffmpeg_threads=1)
    except (RuntimeError, ValueError) as err:
        raise corrupt(kind, err) from None
    meta = decoder.metadata
    if (meta.width or 0) * (meta.height or 0) > MAX_FRAME_PIXELS:
        raise RequestError(413, "FrameTooLarge", f"The {kind}'s frames are {meta.width}x{meta.height} = "
                           f"{meta.width * meta.height} pixels; the limit is {MAX_FRAME_PIXELS} (4K).")
    if not meta.num_frames:
        raise RequestError(400, "CorruptClip", f"The {kind} holds no video frames.")
    begin, end = meta.begin_stream_seconds or 0.0, meta.end_stream_seconds
    return decoder, begin, max(end - begin, 0.0)


def corrupt(kind: str, err: Exception) -> RequestError:
    log.info("refused a clip (%s): %s: %s", kind, type(err).__name__, err)
    return RequestError(400, "CorruptClip", f"The {kind} is truncated, corrupt or not decodable "
                                            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}).")


class ClipPreprocessing:
    """The prepare stage of a video model's requests (handlers/pipeline.py), one Clip per request:
    decoded and sampled (ClipDecoder), then cut into windows (window_indices), normalised."""

    name = "clip"
    batched = False

    def __init__(self, preset, device: str = "cpu"):
        preset = preset.to_dict()
        self.decode = ClipDecoder(preset)
        self.window = video_window(preset)
        self.clip_len = preset["clip_len"]
        self.device = torch.device(device)

    def prepare(self, clips: list, seconds=None) -> list:
        """Clips -> per clip (Tensor[windows, 3, clip_len, h, w] float32 on the device, (frames
        sampled, windows)) or its RequestError. `seconds(stage, s)` gets "decode" (decoding,
        sampling, resizing) and "preprocess" (windows, normalising) seconds."""
        prepared = []
        for clip in clips:
            try:
                start = time.perf_counter()
                frames = self.decode(clip)
                decoded = time.perf_counter()
                windows = torch.stack([self.window(frames[indices]) for indices in window_indices(len(frames), self.clip_len)])
            except RequestError as err:
                prepared.append(err)
                continue
            if seconds:
                seconds("decode", decoded - start)
                seconds("preprocess", time.perf_counter() - decoded)
            prepared.append((windows.to(self.device), (len(frames), len(windows))))
        return prepared
