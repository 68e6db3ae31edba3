"""`tvserve bench`: one model, the same JPEG files, four ways, side by side in one run.

  (a) forward     in-process, the archive's backend and the worker's thread count, batch 1
  (b) pipeline    in-process, decode + preprocess + forward + top-k, the handler's own code
  (c) tvserve     over HTTP (wrk), the archive as `tvserve archive` builds it by default, and `serial`:
                  the same model without the worker's pipeline (batches of 1, no prepare pool)
  (d) stock       TorchServe's own image_classifier handler, eager: one worker, and its defaults
  (e) litserve    LitServe 0.2.19, opt-in: the archive's model and weights, eager, the same PIL preset,
                  1 and 2 workers at batch 1 and 4 (tvserve/tools/litserve_peer.py)
plus `tvserve+draft` and `tvserve+tensor`, the same archive with the lossy --jpeg-draft or
--gpu-decode (decode: tensor), and `int8` columns for (a),
(b) and (c): the archive with --precision int8, calibrated on images of the model's own kind (the
book's Net: the digit scans it was not trained on, in class folders; a torchvision model: crops of
the benchmark photos, or --calibration). Each lossy option's effect (largest probability change and
top-1 and top-5 agreement, and the model inputs' difference, over the benchmark images) is
reported, and int8's measured cost from its record. `--systems` picks which of tvserve, draft,
tensor, int8, stock and litserve run (litserve only when asked: it needs the `peers` extra). Each
LitServe set-up's answers must equal the in-process handler's (probabilities within 1e-4) on every
benchmark image before it is timed. Servers run one at a time.
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
from tvserve.archiving import zoo
from handlers.budget import PREPARE_THREADS_ENV
from handlers.record import Quantization
from tvserve.archiving.mar import read_model_config
from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_checkpoint, archive_torchvision
from tvserve.archiving.tuning import cpu_name
from tvserve.archiving.weights import load_checkpoint
from tvserve.ops import client
from tvserve.ops.properties import DEVELOPMENT_CONFIG, free_ports_config
from tvserve.ops.server import Server
from tvserve.tools.batches import BatchRun, batch_rows, markdown as batch_markdown, targets as batch_targets
from tvserve.tools.inprocess import load_handler, predict, time_loop
from tvserve.tools.inprocess import probabilities
from tvserve.tools.loadgen import run_wrk, server_cpu_ms, wrk_path
from tvserve.tools.peers import LITSERVE_SETUPS, LitServePeer, litserve_name, require_litserve
from tvserve.tools.photos import PHOTOS
from tvserve.tools.stock import archive_stock_book_model, archive_stock_resnet18, stock_config

log = logging.getLogger(__name__)

IMAGE_SIZES = {"0.1MP": (387, 258), "0.5MP": (866, 577), "12MP": (4243, 2828)}
BOOK_MODEL = "net"
SYSTEMS = ("tvserve", "serial", "draft", "tensor", "int8", "stock", "litserve")  # tvserve (fp32) always runs: the others are measured against it
OPT_IN = ("litserve",)  # another server's package (the `peers` extra): measured only when --systems names it
GPU_ID = 0 if torch.cuda.is_available() else None  # in-process rows run where a worker would
# On a GPU every worker runs eager PyTorch (handlers/runtimes.py): the fp32 archive says channels_last, as
# cuDNN prefers, instead of timing CPU runtimes it will not use. Workers and batching are left to the
# archive, so that a server there sizes them for its GPUs (tvserve/ops/sizing.py), as a user's would.
ON_GPU = {"backend": "eager_channels_last"} if GPU_ID is not None else {}


@dataclass
class BenchConfig:
    models: tuple = ("resnet18", BOOK_MODEL)
    images: tuple = tuple(IMAGE_SIZES)
    concurrency: tuple = (1, 4, 16)
    duration: float = 8.0  # s measured per point
    warmup: float = 2.0  # s of the same load before each point
    server_warmup: float = 30.0  # s of load on each fresh server before its first point (warm_up)
    work: Path = Path(".tvserve/bench")
    out: Path = Path("benchmarks")
    checkpoint: Path = Path("runs/digits_net/checkpoint.pt")  # the book's Net (trained if missing)
    http: bool = True  # False: in-process only (a machine without Java or wrk)
    systems: tuple = tuple(system for system in SYSTEMS if system not in OPT_IN)
    calibration: Path = None  # int8 calibration images for a torchvision model (default: crops of the photos)
    batches: BatchRun = None  # in-process rows by batch size, precision and decode path (tvserve/tools/batches.py)
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


def in_process_rows(model: str, handler, batch: int, images: dict, config: BenchConfig) -> list:
    """(a) and (b) for each image with the archive's `handler`: its backend and the worker's thread
    budget (or the GPU, where there is one); (a) also at the archive's `batch` size, in images/s.
    An int8 archive's rows say "int8" after the letter: "(a) forward int8, onnxruntime_int8"."""
    rows, backend = [], f"{handler.backend}" + (", cuda" if torch.cuda.is_available() else "")
    int8 = " int8" if handler.record.backend and handler.record.backend.precision == "int8" else ""
    for name, paths in images.items():
        data = paths[0].read_bytes()
        tensor = handler.preprocess({"body": data}, {})[0].unsqueeze(0)
        with torch.inference_mode():
            forward = time_loop(lambda: handler.runner(tensor), config.duration / 2, config.warmup / 2)
            batched = time_loop(lambda: handler.runner(tensor.expand(batch, -1, -1, -1).contiguous()),
                                config.duration / 2, config.warmup / 2) if batch > 1 else None
        pipeline = time_loop(lambda: predict(handler, data), config.duration / 2, config.warmup / 2)
        rows.append({"model": model, "image": name, "system": f"(a) forward{int8}, {backend}", "concurrency": 1, **forward})
        if batched:
            batched["rps"] = round(batched["rps"] * batch, 2)  # images/s
            rows.append({"model": model, "image": name, "system": f"(a) forward{int8}, {backend}, batch {batch}",
                         "concurrency": 1, **batched})
        rows.append({"model": model, "image": name, "system": f"(b) pipeline{int8}, {backend}", "concurrency": 1,
                     **pipeline})
    return rows


def lossy_effect(exact, lossy, images: dict, option: str = "jpeg_draft") -> dict:
    """The `lossy` handler (JPEG draft, tensor decoding, int8) vs the `exact` one over every
    benchmark image (`images`: {name: [paths]}): the model inputs' largest difference in uint8
    levels (undoing the preset's std) and mean absolute difference (normalised units, None where the
    input sizes differ), the largest probability change, and top-1 and top-5 (set) agreement."""
    levels, means, gaps, top1, top5, total = [], [], [], 0, 0, 0
    scale = 255 * torch.tensor(exact.record.preset.std or [1.0, 1.0, 1.0]).view(3, 1, 1)
    for path in [path for paths in images.values() for path in paths]:
        data = path.read_bytes()
        x, y = (h.preprocess({"body": data}, {})[0].cpu() for h in (exact, lossy))
        if x.shape == y.shape:
            levels.append(((x - y).abs() * scale).max().item())
            means.append((x - y).abs().mean().item())
        p, q = (h.inference(t.unsqueeze(0))[0] for h, t in ((exact, x), (lossy, y)))
        k = min(5, p.numel())
        gaps.append((p - q).abs().max().item())
        top1 += int(p.argmax() == q.argmax())
        top5 += int(set(p.topk(k).indices.tolist()) == set(q.topk(k).indices.tolist()))
        total += 1
    same_size = len(levels) == total
    return {"option": option, "images": total, "max_input_levels": max(levels) if same_size else None,
            "mean_input_difference": sum(means) / total if same_size else None,
            "max_probability_change": max(gaps), "top1_agreement": f"{top1}/{total}", "top5_agreement": f"{top5}/{total}"}


def warm_up(url: str, images: dict, config: BenchConfig) -> dict:
    """`config.server_warmup` s of load on a fresh server, at the highest concurrency on the first
    image, before its first point, so that every point measures a warm server. TorchServe's Java
    frontend compiles its request path with C2 over its first minute of load: on resnet18 at c=4 its
    compiler threads took about 1 ms of CPU a request over the first 30 s (2 cores, 2026-12-04), which a
    server that has run for a while no longer pays. Every system gets the same, LitServe too.
    Returns wrk's result (None where `server_warmup` is 0: the smoke run's)."""
    if config.server_warmup <= 0:
        return None
    result = run_wrk(url, next(iter(images.values()))[0], concurrency=max(config.concurrency),
                     duration=config.server_warmup)
    log.info("warm-up %s: %d requests in %.0f s, %d errors", url, result["requests"], config.server_warmup, result["errors"])
    return result


def http_rows(system: str, model: str, server: Server, images: dict, config: BenchConfig) -> list:
    rows, url = [], f"{server.inference_url}/predictions/{model}"
    warm_up(url, images, config)
    for name, paths in images.items():
        answer = client.predict(model, paths[0].read_bytes(), url=server.inference_url, topk=1)  # answers, before load
        log.info("%s %s %s: top-1 %s", system, model, name, answer[0] if isinstance(answer, list) else answer)
        for concurrency in config.concurrency:
            run_wrk(url, paths[0], concurrency=concurrency, duration=config.warmup)
            result = run_wrk(url, paths[0], concurrency=concurrency, duration=config.duration)
            log.info("%-16s %-8s %-6s c=%-2d %7.1f req/s p50 %7.1f ms p99 %7.1f ms errors %d wrk CPU %.1f%% "
                     "machine %s%% busy", system, model, name, concurrency, result["rps"], result["p50_ms"],
                     result["p99_ms"], result["errors"], result["loadgen_cpu_pct"], result["machine_busy_pct"])
            rows.append({"model": model, "image": name, "system": system, "concurrency": concurrency, **result})
    return rows


def answer_gap(answer: list, reference, labels: list) -> float:
    """Largest |probability difference| between a top-k `answer` ([{"label", "index", "probability"}])
    and the in-process probabilities Tensor[n_labels] of the same image: each answered class against
    its own, and the answer's k probabilities against the reference's k largest (so a missing class
    counts, and classes tied within the tolerance may come in either order); inf where a label is wrong."""
    if any(labels[row["index"]] != row["label"] for row in answer):
        return float("inf")
    own = max(abs(row["probability"] - reference[row["index"]].item()) for row in answer)
    top = reference.topk(len(answer)).values.tolist()
    return max(own, *(abs(row["probability"] - value) for row, value in zip(answer, top)))


def litserve_rows(model: str, handler, images: dict, config: BenchConfig) -> tuple:
    """(rows, checks) of each LitServe set-up (LITSERVE_SETUPS) serving the archive `handler` was
    loaded from, one server at a time: its answers on every benchmark image against the in-process
    handler's first, then wrk at each concurrency, as http_rows. A set-up whose answers differ by
    more than the task's tolerance (1e-4) is not timed. checks: [{"system", "max_probability_gap",
    "images", "timed"}]."""
    rows, checks = [], []
    tolerance = handler.task.PARITY_TOLERANCE
    bodies = [path.read_bytes() for paths in images.values() for path in paths]
    references = [probabilities(handler, body) for body in bodies]
    for workers, batch in LITSERVE_SETUPS:
        system = litserve_name(workers, batch)
        workdir = config.work / model / "servers" / f"litserve-{workers}w-b{batch}"
        with LitServePeer(handler.model_dir, workdir=workdir, workers=workers, batch=batch) as peer:
            gap = max(answer_gap(peer.predict(body), reference, handler.record.labels)
                      for body, reference in zip(bodies, references))
            checks.append({"system": system, "max_probability_gap": gap, "images": len(bodies), "timed": gap <= tolerance})
            if gap > tolerance:
                log.error("%s %s: answers differ from in-process by up to %.2e (> %g): not timed", system, model, gap,
                          tolerance)
                config.notes.append(f"{model}: {system} NOT TIMED: its answers differ from in-process by up to "
                                    f"{gap:.2e} (tolerance {tolerance:g}); its log: {workdir / 'console.log'}")
                continue
            warm_up(peer.predict_url, images, config)
            for name, paths in images.items():
                for concurrency in config.concurrency:
                    run_wrk(peer.predict_url, paths[0], concurrency=concurrency, duration=config.warmup)
                    result = run_wrk(peer.predict_url, paths[0], concurrency=concurrency, duration=config.duration)
                    log.info("%-16s %-8s %-6s c=%-2d %7.1f req/s p50 %7.1f ms p99 %7.1f ms errors %d", system, model,
                             name, concurrency, result["rps"], result["p50_ms"], result["p99_ms"], result["errors"])
                    rows.append({"model": model, "image": name, "system": system, "concurrency": concurrency, **result})
    return rows, checks


def write_digits_folder(folder: Path) -> Path:
    """The digit scans of the default split's validation part (never trained on) as PNG files in
    class sub-folders 0-9: the book's Net's int8 calibration images."""
    from training.data import load_dataset

    if not folder.exists():
        split = load_dataset("digits")
        for i, (image, label) in enumerate(zip(split.val_images, split.val_labels)):
            (folder / str(int(label))).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / str(int(label)) / f"{i:04d}.png")
    return folder


def write_photo_crops(folder: Path, count: int = 32) -> Path:
    """`count` crops of the benchmark photos (JPEG): calibration images for a torchvision model
    when no --calibration is given (timing only: random weights say nothing about agreement)."""
    if not folder.exists():
        folder.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(count):
            photo = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB")
            left, top = rng.integers(0, photo.width // 3), rng.integers(0, photo.height // 3)
            photo.crop((left, top, left + photo.width // 2, top + photo.height // 2)).save(folder / f"{i:03d}.jpg")
    return folder


def variants(config: BenchConfig, base: Path, calibration: Path, min_agreement: float) -> dict:
    """{system: (store, archive options)} of the tvserve archives this run measures."""
    wanted = {"tvserve": {}, "serial": {"batch_size": 1}, "draft": {"jpeg_draft": True}, "tensor": {"decode": "tensor"},
              "int8": {"precision": "int8", "calibration": calibration, "min_agreement": min_agreement}}
    return {system: (base / f"tvserve-{system}", extra) for system, extra in wanted.items()
            if system == "tvserve" or system in config.systems}


def build_archives(model: str, config: BenchConfig) -> tuple:
    """({system: store} of the tvserve archives, stock store or None) for `model`."""
    base = config.work / model
    if model == BOOK_MODEL:
        if not config.checkpoint.exists():
            from tvserve.archiving.defaults import train_digits
            train_digits(config.checkpoint.parent)
        checkpoint = load_checkpoint(config.checkpoint)
        stores = variants(config, base, write_digits_folder(config.work / "calibration" / "digits"), 0.99)
        for store, extra in stores.values():
            archive_checkpoint(config.checkpoint, options=ArchiveOptions(
                model_name=model, export_path=store, force=True, **extra))
        stock = archive_stock_book_model(base / "stock", checkpoint, model) if "stock" in config.systems else None
        return {system: store for system, (store, _) in stores.items()}, stock
    enum = zoo.get_weights(model, "DEFAULT")
    try:
        weights, _ = zoo.find_weights_file(model, enum, None)
    except TvserveError as err:
        config.notes.append(f"{model}: RANDOM weights (timing only; the pretrained ones could not be had: {err})")
        weights = base / "random.pth"
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(torchvision.models.get_model(model, weights=None).state_dict(), weights)
    calibration = config.calibration or write_photo_crops(config.work / "calibration" / "photos")
    if not config.calibration:
        config.notes.append(f"{model}: int8 calibrated on {calibration} (crops of the benchmark photos), held to no "
                            "agreement threshold: the bench times it; agreement is measured on trained models")
    stores = variants(config, base, calibration, 0.99 if config.calibration else 0.0)
    for store, extra in stores.values():
        archive_torchvision(model, weights_file=weights, options=ArchiveOptions(
            model_name=model, export_path=store, force=True, **({} if "precision" in extra else ON_GPU), **extra))
    stock = (archive_stock_resnet18(base / "stock", weights, list(enum.meta["categories"]))
             if model == "resnet18" and "stock" in config.systems else None)
    return {system: store for system, (store, _) in stores.items()}, stock  # stock TorchServe: resnet18 and the Net


SERVED_AS = {"tvserve": "(c) tvserve", "serial": "(c) tvserve serial", "draft": "(c) tvserve+draft",
             "tensor": "(c) tvserve+tensor", "int8": "(c) tvserve int8"}
# The serial worker as it was before the pipeline: batches of one, each image prepared on the worker's thread.
SERVER_ENV = {"serial": {PREPARE_THREADS_ENV: "1"}}


def bench_model(model: str, images: dict, config: BenchConfig) -> dict:
    stores, stock_store = build_archives(model, config)
    handlers = {system: load_handler(store / f"{model}.mar", config.work / "unpacked" / model / system, gpu_id=GPU_ID)
                for system, store in stores.items()}
    rows, effects = [], {}
    for system in ("tvserve", "int8"):
        if system in handlers:
            batch = int(read_model_config(stores[system] / f"{model}.mar").get("batchSize", 1))
            rows += in_process_rows(model, handlers[system], batch, images, config)
    for system, option in (("draft", "jpeg_draft"), ("tensor", "decode_tensor"), ("int8", "int8")):
        if system in handlers:
            effects[option] = lossy_effect(handlers["tvserve"], handlers[system], images, option)
    base = config.work / model
    servers = [(SERVED_AS[system], store, free_ports_config(DEVELOPMENT_CONFIG, base / f"{system}.properties"),
                SERVER_ENV.get(system)) for system, store in stores.items()]
    if stock_store:
        servers += [("(d) stock, 1 worker", stock_store, stock_config(base / "stock1.properties", workers=1), None),
                    ("(d) stock, defaults", stock_store, stock_config(base / "stock.properties"), None)]
    for system, store, properties, env in servers if config.http else []:
        workdir = base / "servers" / "".join(c if c.isalnum() else "-" for c in system)
        with Server(model_store=store, config=properties, workdir=workdir, env=env) as server:
            rows += http_rows(system, model, server, images, config)
    peers = None
    if config.http and "litserve" in config.systems:
        if handlers["tvserve"].record.task == "classification":
            peer_rows, peers = litserve_rows(model, handlers["tvserve"], images, config)
            rows += peer_rows
        else:
            config.notes.append(f"{model}: no LitServe rows (the peer serves classifiers)")
    backends = {system: handler.record.backend.to_dict() for system, handler in handlers.items()}
    batches = config.batches and batch_rows(model, stores["tvserve"] / f"{model}.mar",
                                            [paths[0].read_bytes() for paths in images.values()],
                                            config.work / "unpacked" / model / "batches", config.batches)
    return {"rows": rows, "lossy": effects, "backend": backends["tvserve"], "int8_backend": backends.get("int8"),
            "batches": batches, "litserve": peers}


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run(config: BenchConfig) -> dict:
    if config.http:
        wrk_path()  # fail before any slow work
        if "litserve" in config.systems:
            require_litserve()
    else:
        config.notes.append("in-process only (--no-http): no TorchServe or wrk on this machine")
    images = make_images(config.work / "images", {name: IMAGE_SIZES[name] for name in config.images})
    report = {"machine": machine(), "config": {"duration_s": config.duration, "warmup_s": config.warmup,
                                               "server_warmup_s": config.server_warmup,
                                               "concurrency": list(config.concurrency)}, "models": {}}
    for model in config.models:
        report["models"][model] = bench_model(model, images, config)
    report["notes"] = config.notes
    report["http"] = config.http
    report["batch_rows"] = bool(config.batches)
    report["targets"] = targets(report)
    if config.batches:
        report["targets"] += batch_targets({model: result["batches"] for model, result in report["models"].items()})
    return report


def check_smoke(report: dict) -> None:
    """The harness worked: every system measured every model, and nothing failed."""
    for model, result in report["models"].items():
        systems = {row["system"].split(",")[0] for row in result["rows"]}
        wanted = {"(a) forward", "(b) pipeline", "(a) forward int8", "(b) pipeline int8"} | (
            {"(c) tvserve", "(c) tvserve serial", "(c) tvserve+draft", "(c) tvserve int8", "(d) stock"}
            if report["http"] else set())
        if not wanted <= systems:
            raise TvserveError(f"bench smoke: {model} lacks {', '.join(sorted(wanted - systems))}")
        if report.get("batch_rows") and not (result.get("batches") or {}).get("rows"):
            raise TvserveError(f"bench smoke: {model} lacks its batch rows")
        bad = [row for row in result["rows"] if row["errors"] or not row["requests"]]
        if bad:
            raise TvserveError(f"bench smoke: {model}: errors or no requests in {bad}")


def find(rows, **match) -> dict:
    return next((row for row in rows if all(row.get(key) == value for key, value in match.items())), None)


def ratio(numerator, denominator) -> float:
    """numerator / denominator to 3 decimals, so that a target is never met by rounding (45.4 / 35.0
    is 1.297, under 1.3); None where either is missing."""
    return round(numerator / denominator, 3) if numerator is not None and denominator else None


def targets(report: dict) -> list:
    """Each target of the performance issue with its measured ratio (None where not measured)."""
    out = []

    def add(name, value, target, at_least=True):
        out.append(goal(name, value, target, at_least))

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
    return out + pipeline_targets(report) + int8_targets(report) + litserve_targets(report)


def pipeline_targets(report: dict) -> list:
    """The pipelined worker's targets (issue #22) that need no peer: latency alone no worse than the
    serial worker's, the machine kept busy under load, and on a GPU the HTTP rate (values, not ratios,
    where the goal is one)."""
    out = []
    if "resnet18" not in report["models"]:
        return out
    rows = report["models"]["resnet18"]["rows"]
    ours, serial = (find(rows, system=system, image="0.5MP", concurrency=1) for system in ("(c) tvserve", "(c) tvserve serial"))
    out.append(goal("resnet18 0.5MP c=1 p50, tvserve / serial worker (batch 1, no prepare pool)",
                    ours and serial and ratio(ours["p50_ms"], serial["p50_ms"]), 1.0, at_least=False))
    for concurrency in (4, 16):
        row = find(rows, system="(c) tvserve", image="0.5MP", concurrency=concurrency)
        out.append(goal(f"resnet18 0.5MP c={concurrency}: machine busy %, tvserve", row and row.get("machine_busy_pct"), 95))
    if torch.cuda.is_available():
        row = find(rows, system="(c) tvserve", image="0.5MP", concurrency=64)
        out.append(goal("resnet18 0.5MP c=64 req/s over HTTP on the GPU", row and row["rps"], 1000))
    else:
        out.append(goal("resnet18 0.5MP c=64 req/s over HTTP on the GPU (not measured: no device)", None, 1000))
    return out


def goal(name: str, value, target, at_least: bool = True) -> dict:
    """One target row: the measured value against `target` (None: not measured)."""
    met = None if value is None else (value >= target if at_least else value <= target)
    return {"target": name, "ratio": value, "goal": f"{'>=' if at_least else '<='} {target}", "met": met}


def litserve_targets(report: dict) -> list:
    """Issue #22's targets against LitServe: tvserve's req/s over the best LitServe set-up's at the
    same point (None where either did not run)."""
    out = []
    rows = report["models"].get("resnet18", {}).get("rows", [])
    for concurrency in (4, 16):
        ours = find(rows, system="(c) tvserve", image="0.5MP", concurrency=concurrency)
        peers = [row["rps"] for row in rows if row["system"].startswith("(e) litserve")
                 and row["image"] == "0.5MP" and row["concurrency"] == concurrency]
        best = max(peers, default=None)
        out.append(goal(f"resnet18 0.5MP c={concurrency} req/s, tvserve / best LitServe set-up",
                        ratio(ours and ours["rps"], best), 1.3))
        out.append(goal(f"resnet18 0.5MP c={concurrency}: 1.3x the best LitServe set-up's req/s over tvserve's ceiling "
                        "in this run (every core busy at its CPU per request; above 1: out of reach at that cost)",
                        ratio(best and 1.3 * best, ours and ceiling_rps(ours, report["machine"]["cores"])), 1.0,
                        at_least=False))
    return out


def ceiling_rps(row: dict, cores: int):
    """The req/s a server would give with every core busy at the CPU per request it spent at this point
    (the machine's busy share less wrk's own CPU): what no overlap of stages can exceed."""
    cpu_ms = server_cpu_ms(row, cores)
    return round(cores * 1000 / cpu_ms, 1) if cpu_ms else None


def forward_rps(rows: list, int8: bool) -> float:
    """(a) in-process forward at batch 1, images/s, of the fp32 or the int8 archive (first image)."""
    prefix = "(a) forward int8," if int8 else "(a) forward,"
    row = next((r for r in rows if r["system"].startswith(prefix) and ", batch " not in r["system"]), None)
    return row and row["rps"]


def int8_targets(report: dict) -> list:
    """The int8 issue's targets with their measured ratios (None where not measured)."""
    out = []

    def add(name, value, goal):
        out.append({"target": name, "ratio": value, "goal": f">= {goal}", "met": None if value is None else value >= goal})

    def served(rows, system, image, concurrency):
        row = find(rows, system=system, image=image, concurrency=concurrency)
        return row and row["rps"]

    if "resnet18" in report["models"]:
        result = report["models"]["resnet18"]
        rows = result["rows"]
        add("resnet18 int8 forward / fastest fp32 backend's, in-process (a)", ratio(forward_rps(rows, True), forward_rps(rows, False)), 1.7)
        candidates = ((result.get("int8_backend") or {}).get("selection") or {}).get("candidates", [])
        fp32 = [c["ms_batch_1"] for c in candidates if "ms_batch_1" in c and c.get("precision", "fp32") == "fp32"]
        int8 = [c["ms_batch_1"] for c in candidates if "ms_batch_1" in c and c.get("precision") == "int8"]
        add("resnet18 int8 forward / fastest fp32 backend's, at archive time (turns)", ratio(min(fp32), min(int8)) if fp32 and int8 else None, 1.7)
        for image in sorted({row["image"] for row in rows}):
            add(f"resnet18 {image} c=4 req/s, tvserve int8 / tvserve fp32", ratio(served(rows, "(c) tvserve int8", image, 4), served(rows, "(c) tvserve", image, 4)), 1.5)
    if BOOK_MODEL in report["models"]:
        result = report["models"][BOOK_MODEL]
        cost = (result.get("int8_backend") or {}).get("quantization")
        add("Net int8 top-1 agreement with fp32 on the held-out digit scans", cost and cost["top1_agreement"], 0.99)
        rows = result["rows"]
        top = max(report["config"]["concurrency"])
        for image in sorted({row["image"] for row in rows}):
            add(f"Net {image} c={top} req/s, tvserve int8 / tvserve fp32", ratio(served(rows, "(c) tvserve int8", image, top), served(rows, "(c) tvserve", image, top)), 1.0)
    return out


def fmt(value) -> str:
    if isinstance(value, float) and 0 < abs(value) < 0.01:  # parity gaps: 5.9e-06, not 0.0
        return f"{value:.1e}"
    return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def timing_line(config: dict) -> str:
    warm = config.get("server_warmup_s", 0)
    return ((f"Each server had {fmt(warm)} s of load before its first point; each point " if warm else "Each point ")
            + f"is {fmt(config['warmup_s'])} s of warm-up at its concurrency, then {fmt(config['duration_s'])} s measured.")


def markdown(report: dict, command: str) -> str:
    m = report["machine"]
    lines = [f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores" + (f", GPU {m['gpu']}" if m["gpu"] else "")
             + f"; torch {m['torch']}. Command: `{command}`.", "", timing_line(report["config"]), ""]
    lines += [f"Note: {note}" for note in report["notes"]]
    for model, result in report["models"].items():
        backend = result["backend"]
        lines += ["", f"### {model} (tvserve backend: {backend['name']}, "
                  f"{backend.get('selection', {}).get('threads', '?')} threads)", "",
                  "| image | system | conc. | req/s | p50 ms | p90 ms | p99 ms | errors | wrk CPU % | machine busy % |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in result["rows"]:
            lines.append(f"| {row['image']} | {row['system']} | {row['concurrency']} | {fmt(row['rps'])} | {fmt(row['p50_ms'])} "
                         f"| {fmt(row['p90_ms'])} | {fmt(row['p99_ms'])} | {row['errors']} | {fmt(row.get('loadgen_cpu_pct'))} "
                         f"| {fmt(row.get('machine_busy_pct'))} |")
        for option, lossy in result["lossy"].items():
            lines += ["", f"Lossy `{OPTION_FLAGS[option]}` over the {lossy['images']} benchmark images: {effect_line(lossy)}."]
        if result.get("litserve"):
            checks = result["litserve"]
            lines += ["", f"LitServe against in-process over the {checks[0]['images']} benchmark images, largest probability "
                      "difference: " + "; ".join(f"{check['system'][len('(e) litserve, '):]} {check['max_probability_gap']:.1e}"
                                                 + ("" if check["timed"] else " (NOT TIMED)") for check in checks) + "."]
        cost = (result.get("int8_backend") or {}).get("quantization")
        if cost:
            from tvserve.archiving.calibration import summary
            lines += ["", f"int8 archive ({result['int8_backend']['name']}), measured at archive time on "
                      f"{cost['calibration_dir']}: {summary(Quantization.from_dict(cost))}."]
        lines += ["", *wide_table(result["rows"])]
        if result.get("batches"):
            lines += ["", *batch_markdown(model, result["batches"])]
    lines += ["", "### Targets", "", "| target | measured | goal | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {t['target']} | {t['ratio'] if t['ratio'] is not None else '-'} | {t['goal']} | {'-' if t['met'] is None else 'yes' if t['met'] else 'no'} |"
              for t in report["targets"]]
    return "\n".join(lines) + "\n"


def effect_line(lossy: dict) -> str:
    """One lossy_effect() result in words."""
    inputs = (f"inputs differ by up to {lossy['max_input_levels']:.1f} uint8 levels (mean "
              f"{lossy['mean_input_difference']:.4f} normalised), " if lossy.get("max_input_levels") is not None else "")
    return (f"{inputs}largest probability change {lossy['max_probability_change']:.2e}, top-1 agreement "
            f"{lossy['top1_agreement']}, top-5 {lossy.get('top5_agreement', '-')}")


OPTION_FLAGS = {"jpeg_draft": "--jpeg-draft", "decode_tensor": "--gpu-decode", "int8": "--precision int8"}
WIDE_COLUMNS = (("(a) forward", "(a) forward,"), ("(a) int8", "(a) forward int8,"), ("(b) pipeline", "(b) pipeline,"),
                ("(b) int8", "(b) pipeline int8,"), ("(c) tvserve", "(c) tvserve"), ("(c) tvserve int8", "(c) tvserve int8"),
                ("(c) +draft", "(c) tvserve+draft"), ("(c) +tensor", "(c) tvserve+tensor"), ("(d) stock, 1 worker", "(d) stock, 1 worker"),
                ("(d) stock, defaults", "(d) stock, defaults"),
                *((litserve_name(*setup),) * 2 for setup in LITSERVE_SETUPS))


def wide_table(rows: list) -> list:
    """Markdown lines: one row per image and concurrency, one column per system (those measured):
    req/s, and p50 / p99 ms for the HTTP ones (docs/performance.md, "Latest figures")."""
    def cell(image, concurrency, prefix):
        row = next((r for r in rows if r["image"] == image and r["concurrency"] == concurrency
                    and (r["system"] == prefix or r["system"].startswith(prefix) and prefix.endswith(",")
                         and ", batch " not in r["system"])), None)
        if row is None:
            return ""
        return f"{row['rps']:.1f}" + (f" ({row['p50_ms']:.0f} / {row['p99_ms']:.0f})" if row["system"].startswith(("(c)", "(d)", "(e)")) else "")

    points = list(dict.fromkeys((r["image"], r["concurrency"]) for r in sorted(rows, key=lambda r: r["concurrency"])))
    points = sorted(points, key=lambda p: (list(IMAGE_SIZES).index(p[0]) if p[0] in IMAGE_SIZES else 99, p[1]))
    columns = [(title, prefix) for title, prefix in WIDE_COLUMNS if any(cell(i, c, prefix) for i, c in points)]
    lines = ["| image | conc. | " + " | ".join(title for title, _ in columns) + " |",
             "| --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    return lines + [f"| {image} | {concurrency} | " + " | ".join(cell(image, concurrency, prefix) for _, prefix in columns)
                    + " |" for image, concurrency in points]


def write(report: dict, out: Path, command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2))
    text = markdown(report, command)
    (out / "latest.md").write_text(text)
    return text
