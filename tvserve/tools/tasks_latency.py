"""Served latency of one model per task beyond classification, on this machine:
`python -m tvserve.tools.tasks_latency [--requests 10] [--out benchmarks]`.

Each model is archived as `tvserve archive torchvision` does by default (workers, batch size and
backend measured here), with random weights whose classifier is redrawn so that the detectors
detect (random R-CNN heads score every class below the models' 0.05 floor): the R-CNN heads then
run on their full 100 detections, the slowest case. A TorchServe on free loopback ports serves them
all; each model gets 2 warm-up requests, then `--requests` sequential ones of a 640x427 photo (and
of that photo at 12 MP, for the body size). Writes OUT/tasks.md and OUT/tasks.json, and a drawn
answer of each detector into OUT/drawn/ (`tvserve predict --draw`'s code).
"""

import argparse
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import requests
import torch
from PIL import Image
from torchvision.models import get_model_weights

from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_torchvision, random_state_dict, torchvision_record
from tvserve.archiving.mar import read_model_config, read_record
from tvserve.ops.properties import DEVELOPMENT_CONFIG, free_ports_config
from tvserve.ops.server import Server
from tvserve.tools.draw import draw
from tvserve.tools.photos import PHOTOS

log = logging.getLogger(__name__)

MODELS = {
    "detection": "fasterrcnn_mobilenet_v3_large_320_fpn",
    "instance_segmentation": "maskrcnn_resnet50_fpn",
    "keypoints": "keypointrcnn_resnet50_fpn",
    "semantic_segmentation": "lraspp_mobilenet_v3_large",
}
OPTIONS = {"X-Threshold": "0"}  # every detection the model keeps


def detecting_weights(name: str, path: Path, folder: Path) -> Path:
    """Random weights for `name` whose R-CNN classifier scores some classes above the model's floor."""
    torch.manual_seed(0)
    state = random_state_dict(torchvision_record(name, get_model_weights(name).DEFAULT), folder)
    for key, value in state.items():
        if key.endswith("cls_score.weight"):
            value.normal_(0, 0.05)
        if key.endswith("cls_score.bias"):
            value.normal_(-1.5, 2.0) if len(value) > 2 else value.copy_(torch.tensor([0.0, -2.0]))
    torch.save(state, path)
    return path


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def measure(url: str, data: bytes, requests_: int) -> dict:
    """Sequential requests after 2 warm-ups: latency p50 / max (ms) and the body size (bytes)."""
    with requests.Session() as session:
        for _ in range(2):
            session.post(url, data=data, headers=OPTIONS, timeout=300).raise_for_status()
        times, size = [], 0
        for _ in range(requests_):
            start = time.perf_counter()
            response = session.post(url, data=data, headers=OPTIONS, timeout=300)
            times.append(1000 * (time.perf_counter() - start))
            response.raise_for_status()
            size = len(response.content)
    return {"p50_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1), "body_bytes": size,
            "answer": response.json()}


def run(requests_: int, out: Path, measure_sizing: bool = True) -> dict:
    photo = PHOTOS[0].read_bytes()
    big = jpeg(Image.open(PHOTOS[0]).convert("RGB").resize((4000, 3000), Image.BICUBIC))
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "load_average_1min": os.getloadavg()[0], "rows": []}
    with tempfile.TemporaryDirectory(prefix="tvserve-tasks-") as tmp:
        tmp = Path(tmp)
        store = tmp / "model_store"
        for task, name in MODELS.items():
            weights = detecting_weights(name, tmp / f"{name}.pth", tmp)
            sizing = {} if measure_sizing else {"backend": "eager", "workers": 1, "batch_size": 1}
            archive_torchvision(name, weights_file=weights, options=ArchiveOptions(
                export_path=store, startup_timeout=600, response_timeout=600, **sizing))
        config = free_ports_config(DEVELOPMENT_CONFIG, tmp / "config.properties")
        with Server(model_store=store, config=config, workdir=tmp / "server") as server:
            for task, name in MODELS.items():
                url = f"{server.inference_url}/predictions/{name}"
                row = {"task": task, "model": name, **measure(url, photo, requests_)}
                # Mask R-CNN pastes every mask as floats at the image's size: 100 at 12 MP would take 4.8 GB
                row["body_bytes_12MP"] = None if task == "instance_segmentation" else measure(url, big, 1)["body_bytes"]
                mar = store / f"{name}.mar"
                chosen = read_record(mar).backend
                eager = next((c for c in chosen.selection.get("candidates", []) if c["name"] == "eager"), {})
                row.update(workers=read_model_config(mar)["minWorkers"], batch_size=read_model_config(mar)["batchSize"],
                           backend=chosen.name, forward_ms_at_archive=eager.get("ms_batch_1"),
                           detections=len(row["answer"]) if isinstance(row["answer"], list) else None)
                drawn = draw(PHOTOS[0], row.pop("answer"), out / "drawn" / f"{name}.jpg")
                log.info("%s: %s (drawn: %s)", name, row, drawn)
                report["rows"].append(row)
    return report


def report_intro(report: dict, out: Path, name: str, title: str, command: str, conditions: str) -> list:
    """Writes `report` to out/NAME.json; returns the Markdown report's first lines: its title with
    the date, and the command, machine and load it was measured with, then `conditions`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    return [f"# {title} ({report['date']})", "",
            f"`{command}` on {report['cpu_count']} cores ({report['machine']}), torch {report['torch']}, "
            f"1-minute load average {report['load_average_1min']:.1f} at the start. {conditions}", ""]


def write(report: dict, out: Path, command: str) -> Path:
    lines = [*report_intro(report, out, "tasks", "Served latency per task", command,
                           "Random weights, classifier redrawn so that detectors keep their full 100 detections "
                           "(`threshold` 0). Sequential requests of a 640x427 JPEG over HTTP; body size also for "
                           "that photo at 12 MP."),
             "| task | model | backend, workers x batch | forward at archive time (ms) | served p50 (ms) | max (ms) "
             "| detections | body (bytes) | body at 12 MP (bytes) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["rows"]:
        lines.append(f"| {row['task']} | {row['model']} | {row['backend']}, {row['workers']} x {row['batch_size']} | "
                     f"{format(row['forward_ms_at_archive'], '.0f') if row['forward_ms_at_archive'] else '-'} | {row['p50_ms']:.0f} | {row['max_ms']:.0f} | "
                     f"{row['detections'] if row['detections'] is not None else '-'} | {row['body_bytes']:,} | "
                     f"{format(row['body_bytes_12MP'], ',') if row['body_bytes_12MP'] else '-'} |")
    path = out / "tasks.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--no-sizing", action="store_true",
                        help="archive eager, 1 worker, batch 1 instead of measuring them (minutes per R-CNN here)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = "python -m tvserve.tools.tasks_latency " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write(run(args.requests, args.out, measure_sizing=not args.no_sizing), args.out, command.strip()))


if __name__ == "__main__":
    main()
