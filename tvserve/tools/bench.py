"""`tvserve bench`: one model, the same JPEG files, four ways, side by side in one run.

  (a) forward     in-process, the archive's backend and the worker's thread count, batch 1
  (b) pipeline    in-process, decode + preprocess + forward + top-k, the handler's own code
  (c) tvserve     over HTTP (wrk), the archive as `tvserve archive` builds it by default
  (d) stock       TorchServe's own image_classifier handler, eager: one worker, and its defaults
plus `tvserve+draft`, the same archive with the lossy --jpeg-draft, and the lossy option's effect
(largest probability change and top-1 agreement over the images). Servers run one at a time.
Output: Markdown and JSON in --out; the Markdown also goes to stdout.
"""

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from tvserve import TvserveError
from tvserve.build import zoo
from tvserve.build.mar import read_model_config
from tvserve.build.options import ArchiveOptions
from tvserve.build.sources import archive_checkpoint, archive_torchvision
from tvserve.build.tuning import cpu_name
from tvserve.build.weights import load_checkpoint
from tvserve.ops import client
from tvserve.ops.properties import DEVELOPMENT_CONFIG, free_ports_config
from tvserve.ops.server import Server
from tvserve.tools.inprocess import load_handler, predict, probabilities
from tvserve.tools.loadgen import run_wrk, wrk_path
from tvserve.tools.photos import PHOTOS
from tvserve.tools.stock import archive_stock_book_model, archive_stock_resnet18, stock_config

log = logging.getLogger(__name__)

IMAGE_SIZES = {"0.1MP": (387, 258), "0.5MP": (866, 577), "12MP": (4243, 2828)}
BOOK_MODEL = "net"
GPU_ID = 0 if torch.cuda.is_available() else None  # in-process rows run where a worker would


@dataclass
class BenchConfig:
    models: tuple = ("resnet18", BOOK_MODEL)
    images: tuple = tuple(IMAGE_SIZES)
    concurrency: tuple = (1, 4, 16)
    duration: float = 8.0  # s measured per point
    warmup: float = 2.0  # s of the same load before each point
    work: Path = Path(".tvserve/bench")
    out: Path = Path("benchmarks")
    checkpoint: Path = Path("runs/digits_net/checkpoint.pt")  # the book's Net (trained if missing)
    http: bool = True  # False: in-process only (a machine without Java or wrk)
    notes: list = field(default_factory=list)


def make_images(folder: Path, sizes: dict) -> dict:
    """{size name: [JPEG path per photo]}: sklearn's real photos resized to each size, with mild
    sensor-like grain so big ones compress like camera JPEGs (quality 90, 4:2:0)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = {}
    for name in sizes:
        width, height = sizes[name]
        images[name] = []
        for photo in PHOTOS:
            path = folder / f"{photo.stem}-{name}.jpg"
            if not path.exists():
                pixels = np.asarray(Image.open(photo).convert("RGB").resize((width, height), Image.BICUBIC), np.float32)
                pixels += rng.normal(0, 4, pixels.shape).astype(np.float32)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
            images[name].append(path)
    return images


def percentiles(latencies_ms: list, seconds: float) -> dict:
    q = np.percentile(latencies_ms, [50, 90, 99])
    return {"rps": round(len(latencies_ms) / seconds, 2), "p50_ms": round(q[0], 2), "p90_ms": round(q[1], 2),
            "p99_ms": round(q[2], 2), "requests": len(latencies_ms), "errors": 0}


def time_loop(call, duration: float, warmup: float) -> dict:
    """Calls `call()` back to back: `warmup` s unmeasured, then `duration` s measured."""
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        call()
    latencies, start = [], time.perf_counter()
    while (now := time.perf_counter()) - start < duration:
        call()
        latencies.append((time.perf_counter() - now) * 1000)
    return percentiles(latencies, time.perf_counter() - start)


def in_process_rows(model: str, handler, batch: int, images: dict, config: BenchConfig) -> list:
    """(a) and (b) for each image with the archive's `handler`: its backend and the worker's thread
    budget (or the GPU, where there is one); (a) also at the archive's `batch` size, in images/s."""
    rows, backend = [], f"{handler.backend}" + (", cuda" if torch.cuda.is_available() else "")
    for name, paths in images.items():
        data = paths[0].read_bytes()
        tensor = handler.preprocess({"body": data}, {})[0].unsqueeze(0)
        with torch.inference_mode():
            forward = time_loop(lambda: handler.runner(tensor), config.duration / 2, config.warmup / 2)
            batched = time_loop(lambda: handler.runner(tensor.expand(batch, -1, -1, -1).contiguous()),
                                config.duration / 2, config.warmup / 2) if batch > 1 else None
        pipeline = time_loop(lambda: predict(handler, data), config.duration / 2, config.warmup / 2)
        rows.append({"model": model, "image": name, "system": f"(a) forward, {backend}", "concurrency": 1, **forward})
        if batched:
            batched["rps"] = round(batched["rps"] * batch, 2)  # images/s
            rows.append({"model": model, "image": name, "system": f"(a) forward, {backend}, batch {batch}",
                         "concurrency": 1, **batched})
        rows.append({"model": model, "image": name, "system": f"(b) pipeline, {backend}", "concurrency": 1, **pipeline})
    return rows


def lossy_effect(exact, draft_mar: Path, images: dict, work: Path) -> dict:
    """JPEG draft vs the `exact` handler over every benchmark image: largest probability change and
    top-1 agreement."""
    draft = load_handler(draft_mar, work / "effect-draft", gpu_id=GPU_ID)
    gaps, agree, total = [], 0, 0
    for path in [path for paths in images.values() for path in paths]:
        data = path.read_bytes()
        p, q = (probabilities(h, data) for h in (exact, draft))
        gaps.append((p - q).abs().max().item())
        agree += int(p.argmax() == q.argmax())
        total += 1
    return {"option": "jpeg_draft", "images": total, "max_probability_change": max(gaps), "top1_agreement": f"{agree}/{total}"}


def http_rows(system: str, model: str, server: Server, images: dict, config: BenchConfig) -> list:
    rows, url = [], f"{server.inference_url}/predictions/{model}"
    for name, paths in images.items():
        answer = client.predict(model, paths[0].read_bytes(), url=server.inference_url, topk=1)  # answers, before load
        log.info("%s %s %s: top-1 %s", system, model, name, answer[0] if isinstance(answer, list) else answer)
        for concurrency in config.concurrency:
            run_wrk(url, paths[0], concurrency=concurrency, duration=config.warmup)
            result = run_wrk(url, paths[0], concurrency=concurrency, duration=config.duration)
            log.info("%-16s %-8s %-6s c=%-2d %7.1f req/s p50 %7.1f ms p99 %7.1f ms errors %d wrk CPU %.1f%%",
                     system, model, name, concurrency, result["rps"], result["p50_ms"], result["p99_ms"],
                     result["errors"], result["loadgen_cpu_pct"])
            rows.append({"model": model, "image": name, "system": system, "concurrency": concurrency, **result})
    return rows


def build_archives(model: str, config: BenchConfig) -> tuple:
    """(tvserve store, tvserve+draft store, stock store) for `model`."""
    base = config.work / model
    stores = [base / "tvserve", base / "tvserve-draft"]
    if model == BOOK_MODEL:
        if not config.checkpoint.exists():
            from tvserve.build.defaults import train_digits
            train_digits(config.checkpoint.parent)
        checkpoint = load_checkpoint(config.checkpoint)
        for store, draft in zip(stores, (False, True)):
            archive_checkpoint(config.checkpoint, options=ArchiveOptions(
                model_name=model, export_path=store, force=True, jpeg_draft=draft))
        stock = archive_stock_book_model(base / "stock", checkpoint, model)
        return (*stores, stock)
    enum = zoo.get_weights(model, "DEFAULT")
    try:
        weights, _ = zoo.find_weights_file(model, enum, None)
    except TvserveError as err:
        config.notes.append(f"{model}: RANDOM weights (timing only; the pretrained ones could not be had: {err})")
        weights = base / "random.pth"
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(torchvision.models.get_model(model, weights=None).state_dict(), weights)
    for store, draft in zip(stores, (False, True)):
        archive_torchvision(model, weights_file=weights, options=ArchiveOptions(
            model_name=model, export_path=store, force=True, jpeg_draft=draft))
    stock = archive_stock_resnet18(base / "stock", weights, list(enum.meta["categories"])) if model == "resnet18" else None
    return (*stores, stock)  # stock TorchServe: resnet18 and the book's Net only


def bench_model(model: str, images: dict, config: BenchConfig) -> dict:
    tvserve_store, draft_store, stock_store = build_archives(model, config)
    mar = tvserve_store / f"{model}.mar"
    handler = load_handler(mar, config.work / "unpacked" / model, gpu_id=GPU_ID)
    rows = in_process_rows(model, handler, int(read_model_config(mar).get("batchSize", 1)), images, config)
    effect = lossy_effect(handler, draft_store / f"{model}.mar", images, config.work / "unpacked" / model)
    base = config.work / model
    servers = [
        ("(c) tvserve", tvserve_store, free_ports_config(DEVELOPMENT_CONFIG, base / "tvserve.properties")),
        ("(c) tvserve+draft", draft_store, free_ports_config(DEVELOPMENT_CONFIG, base / "draft.properties")),
    ]
    if stock_store:
        servers += [("(d) stock, 1 worker", stock_store, stock_config(base / "stock1.properties", workers=1)),
                    ("(d) stock, defaults", stock_store, stock_config(base / "stock.properties"))]
    for system, store, properties in servers if config.http else []:
        workdir = base / "servers" / "".join(c if c.isalnum() else "-" for c in system)
        with Server(model_store=store, config=properties, workdir=workdir) as server:
            rows += http_rows(system, model, server, images, config)
    return {"rows": rows, "lossy": effect, "backend": handler.record.backend.to_dict()}


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run(config: BenchConfig) -> dict:
    if config.http:
        wrk_path()  # fail before any slow work
    else:
        config.notes.append("in-process only (--no-http): no TorchServe or wrk on this machine")
    images = make_images(config.work / "images", {name: IMAGE_SIZES[name] for name in config.images})
    report = {"machine": machine(), "config": {"duration_s": config.duration, "warmup_s": config.warmup,
                                               "concurrency": list(config.concurrency)}, "models": {}}
    for model in config.models:
        report["models"][model] = bench_model(model, images, config)
    report["notes"] = config.notes
    report["http"] = config.http
    report["targets"] = targets(report)
    return report


def check_smoke(report: dict) -> None:
    """The harness worked: every system measured every model, and nothing failed."""
    for model, result in report["models"].items():
        systems = {row["system"].split(",")[0] for row in result["rows"]}
        wanted = {"(a) forward", "(b) pipeline"} | ({"(c) tvserve", "(c) tvserve+draft", "(d) stock"} if report["http"] else set())
        if not wanted <= systems:
            raise TvserveError(f"bench smoke: {model} lacks {', '.join(sorted(wanted - systems))}")
        bad = [row for row in result["rows"] if row["errors"] or not row["requests"]]
        if bad:
            raise TvserveError(f"bench smoke: {model}: errors or no requests in {bad}")


def find(rows, **match) -> dict:
    return next((row for row in rows if all(row.get(key) == value for key, value in match.items())), None)


def ratio(numerator, denominator) -> float:
    return round(numerator / denominator, 2) if numerator is not None and denominator else None


def targets(report: dict) -> list:
    """Each target of the performance issue with its measured ratio (None where not measured)."""
    out = []

    def add(name, value, goal, at_least=True):
        met = None if value is None else (value >= goal if at_least else value <= goal)
        out.append({"target": name, "ratio": value, "goal": f"{'>=' if at_least else '<='} {goal}", "met": met})

    def rps(rows, system, image, concurrency):
        row = find(rows, system=system, image=image, concurrency=concurrency)
        return row and row["rps"]

    if "resnet18" in report["models"]:
        rows = report["models"]["resnet18"]["rows"]
        image = "0.1MP"
        ours = rps(rows, "(c) tvserve", image, 4)
        add("resnet18 c=4 req/s, tvserve / stock 1 worker", ratio(ours, rps(rows, "(d) stock, 1 worker", image, 4)), 1.6)
        add("resnet18 c=4 req/s, tvserve / stock defaults", ratio(ours, rps(rows, "(d) stock, defaults", image, 4)), 3)
        for name in {row["image"] for row in rows}:
            pipeline = next((row["rps"] for row in rows if row["image"] == name and row["system"].startswith("(b)")), None)
            add(f"resnet18 {name} req/s, tvserve c=4 / in-process pipeline", ratio(rps(rows, "(c) tvserve", name, 4), pipeline), 0.9)
            row = find(rows, system="(c) tvserve", image=name, concurrency=4)
            add(f"resnet18 {name} c=4 p99 / p50", row and ratio(row["p99_ms"], row["p50_ms"]), 1.5, at_least=False)
        big, small = (find(rows, system="(c) tvserve+draft", image=name, concurrency=1) for name in ("12MP", "0.5MP"))
        add("resnet18 c=1 p50 latency, 12MP / 0.5MP (tvserve+draft)", big and small and ratio(big["p50_ms"], small["p50_ms"]), 1.3, at_least=False)
    if BOOK_MODEL in report["models"]:
        rows = report["models"][BOOK_MODEL]["rows"]
        for stock in ("(d) stock, 1 worker", "(d) stock, defaults"):
            for name in sorted({row["image"] for row in rows}):
                add(f"Net {name} c=16 req/s, tvserve / {stock[4:]}", ratio(rps(rows, "(c) tvserve", name, 16), rps(rows, stock, name, 16)), 2)
    return out


def fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def markdown(report: dict, command: str) -> str:
    m = report["machine"]
    lines = [f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores" + (f", GPU {m['gpu']}" if m["gpu"] else "")
             + f"; torch {m['torch']}. Command: `{command}`.", ""]
    lines += [f"Note: {note}" for note in report["notes"]]
    for model, result in report["models"].items():
        backend = result["backend"]
        lines += ["", f"### {model} (tvserve backend: {backend['name']}, "
                  f"{backend.get('selection', {}).get('threads', '?')} threads)", "",
                  "| image | system | conc. | req/s | p50 ms | p90 ms | p99 ms | errors | wrk CPU % |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in result["rows"]:
            lines.append(f"| {row['image']} | {row['system']} | {row['concurrency']} | {fmt(row['rps'])} | {fmt(row['p50_ms'])} "
                         f"| {fmt(row['p90_ms'])} | {fmt(row['p99_ms'])} | {row['errors']} | {fmt(row.get('loadgen_cpu_pct'))} |")
        lossy = result["lossy"]
        lines += ["", f"Lossy `--jpeg-draft` over {lossy['images']} images: largest probability change "
                  f"{lossy['max_probability_change']:.2e}, top-1 agreement {lossy['top1_agreement']}."]
    lines += ["", "### Targets", "", "| target | measured | goal | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {t['target']} | {fmt(t['ratio'])} | {t['goal']} | {'-' if t['met'] is None else 'yes' if t['met'] else 'no'} |"
              for t in report["targets"]]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path, command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2))
    text = markdown(report, command)
    (out / "latest.md").write_text(text)
    return text
