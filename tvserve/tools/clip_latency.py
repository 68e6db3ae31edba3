"""Served latency of the video and optical-flow models on this machine:
`python -m tvserve.tools.clip_latency [--requests 8] [--out benchmarks]`.

r3d_18 (the cheapest video model), raft_small and raft_large are archived as `tvserve archive
torchvision` does by default (eager, one worker, batch 1) with random weights (no timing depends
on their values) and served by a TorchServe on free loopback ports. Each input gets 2 warm-up
requests, then `--requests` sequential ones: samples/pan.mp4 (2 s, two windows) and a 10 s
320x240 H.264 clip made here (ten windows) for r3d_18; samples/pan-1.png and pan-2.png
(192x144) and a 640x480 pair for the flow models. Writes OUT/clips.md and OUT/clips.json.
"""

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import requests
import torch
import torchvision
from PIL import Image

from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_torchvision
from tvserve.ops.properties import DEVELOPMENT_CONFIG, free_ports_config
from tvserve.ops.server import Server
from tvserve.tools.photos import PHOTOS
from tvserve.tools.tasks_latency import report_intro

log = logging.getLogger(__name__)

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
MODELS = ("r3d_18", "raft_small", "raft_large")


def random_weights(name: str, path: Path) -> Path:
    torch.manual_seed(0)
    kwargs = {"num_classes": 400} if name == "r3d_18" else {}
    torch.save(torchvision.models.get_model(name, weights=None, **kwargs).state_dict(), path)
    return path


def long_clip(seconds: int = 10, fps: int = 30) -> bytes:
    """A 320x240 H.264 clip of the photo panning, `seconds` long."""
    from torchcodec.encoders import VideoEncoder

    photo = np.array(Image.open(PHOTOS[0]).convert("RGB").resize((320 + seconds * fps, 240)))
    frames = torch.stack([torch.from_numpy(photo[:, i:i + 320].copy()).permute(2, 0, 1) for i in range(seconds * fps)])
    return VideoEncoder(frames, frame_rate=fps).to_tensor(format="mp4").numpy().tobytes()


def png(pixels: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def inputs() -> list:
    """[(model, what, requests.post keyword arguments)]."""
    pan = [("image1", (SAMPLES / "pan-1.png").read_bytes()), ("image2", (SAMPLES / "pan-2.png").read_bytes())]
    photo = np.array(Image.open(PHOTOS[0]).convert("RGB").resize((660, 500)))
    vga = [("image1", png(photo[:480, :640].copy())), ("image2", png(photo[4:484, 6:646].copy()))]
    return [("r3d_18", "samples/pan.mp4: 192x144, 2 s at 15 fps", {"data": (SAMPLES / "pan.mp4").read_bytes()}),
            ("r3d_18", "320x240 H.264, 10 s at 30 fps", {"data": long_clip()}),
            *[(name, what, {"files": files}) for name in ("raft_small", "raft_large")
              for what, files in (("samples/pan-1.png + pan-2.png: 192x144", pan), ("640x480 PNG pair", vga))]]


def measure(url: str, body: dict, requests_: int) -> dict:
    """Sequential requests after 2 warm-ups: p50 / max (ms), the answer's size (bytes), its windows or size."""
    with requests.Session() as session:
        for _ in range(2):
            session.post(url, timeout=600, **body).raise_for_status()
        times = []
        for _ in range(requests_):
            start = time.perf_counter()
            response = session.post(url, timeout=600, **body)
            times.append(1000 * (time.perf_counter() - start))
            response.raise_for_status()
    answer = response.json()
    return {"p50_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1),
            "body_bytes": len(response.content), "load_average_1min": round(os.getloadavg()[0], 2),
            **{key: answer[key] for key in ("windows", "frames", "size") if key in answer}}


def run(requests_: int) -> dict:
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "load_average_1min": os.getloadavg()[0], "rows": []}
    with tempfile.TemporaryDirectory(prefix="tvserve-clips-") as tmp:
        tmp = Path(tmp)
        store = tmp / "model_store"
        for name in MODELS:
            archive_torchvision(name, weights_file=random_weights(name, tmp / f"{name}.pth"),
                                options=ArchiveOptions(export_path=store, startup_timeout=600, response_timeout=600))
        config = free_ports_config(DEVELOPMENT_CONFIG, tmp / "config.properties")
        with Server(model_store=store, config=config, workdir=tmp / "server") as server:
            for name, what, body in inputs():
                row = {"model": name, "input": what,
                       **measure(f"{server.inference_url}/predictions/{name}", body, requests_)}
                log.info("%s", row)
                report["rows"].append(row)
    return report


def write(report: dict, out: Path, command: str) -> Path:
    lines = [*report_intro(report, out, "clips", "Served latency of video and optical-flow models", command,
                           "Random weights; eager, one worker, batch 1; sequential requests over HTTP."),
             "| model | input | served p50 (ms) | max (ms) | windows (frames) or flow size | answer (bytes) | load (1 min) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["rows"]:
        shape = f"{row['windows']} ({row['frames']})" if "windows" in row else "x".join(map(str, row["size"][::-1]))
        lines.append(f"| {row['model']} | {row['input']} | {row['p50_ms']:.0f} | {row['max_ms']:.0f} | {shape} | "
                     f"{row['body_bytes']:,} | {row['load_average_1min']:.2f} |")
    path = out / "clips.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = "python -m tvserve.tools.clip_latency " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write(run(args.requests), args.out, command.strip()))


if __name__ == "__main__":
    main()
