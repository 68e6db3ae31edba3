"""One archive served with several sizings, side by side, in alternating rounds: how the measured
sizing's shapes compare over real HTTP, where the archiver's own short load cannot tell them apart.

    python -m tvserve.tools.sizings ARCHIVE.mar --sizings 1x2b8,2x2b8,2x1b1 --image photo.jpg \
        --concurrency 4,16 --rounds 2

A sizing WxTbB is W workers of T threads each, batches of B (1 ms batch delay; WxTbBdD: D ms); a
-rigid suffix serves it with elastic threads off (TVSERVE_ELASTIC=off: every forward on all T
threads, handlers/elastic.py). Each is a copy of the archive whose model-config.yaml says so (handler.threads pins the threads: 2x2 on 2 cores is the
shared shape, two workers each with every core), served by `tvserve serve`'s Server on free ports
and loaded with wrk (`apt-get install wrk`). Each line: req/s, p50 / p99 ms, the machine's busy %,
the CPU ms a request took (busy cores / req/s) and the load average, so that a figure taken on a
busy machine shows it. This machine moves by 10-40% between runs of the same server: read the
rounds together, not one line.
"""

import argparse
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from handlers.elastic import ENV as ELASTIC_ENV
from tvserve import TvserveError
from tvserve.archiving.mar import registered_name
from tvserve.ops.properties import DEVELOPMENT_CONFIG, free_ports_config
from tvserve.ops.server import Server
from tvserve.tools.loadgen import run_wrk, server_cpu_ms

SIZING = re.compile(r"(\d+)x(\d+)b(\d+)(?:d(\d+))?(-rigid)?")


def match_sizing(text: str) -> re.Match:
    """SIZING's match of `text`; a TvserveError saying the form otherwise."""
    match = SIZING.fullmatch(text.strip())
    if not match:
        raise TvserveError(f"Sizing {text!r}: write WORKERSxTHREADSbBATCH[dDELAY][-rigid], e.g. 2x2b8 or 2x2b8d5-rigid.")
    return match


def parse_sizing(text: str) -> tuple:
    """'2x2b8' -> (workers 2, threads 2, batch 8, delay 1 ms); '2x2b8d5' -> (2, 2, 8, 5). A delay of 0 is
    TorchServe's unset: it waits its default 100 ms (docs/performance.md, Batching)."""
    workers, threads, batch, delay, _ = match_sizing(text).groups()
    return int(workers), int(threads), int(batch), int(delay or 1)


def server_env(text: str) -> dict:
    """The server's environment for sizing `text`: elastic threads off for a -rigid one."""
    return {ELASTIC_ENV: "off"} if match_sizing(text).group(5) else {}


def model_config(workers: int, threads: int, batch: int, delay: int = 1) -> str:
    return (f"minWorkers: {workers}\nmaxWorkers: {workers}\nbatchSize: {batch}\nmaxBatchDelay: {delay}\n"
            f"responseTimeout: 120\nstartupTimeout: 120\nhandler:\n  threads: {threads}\n")


def sized_copy(mar: Path, store: Path, sizing: tuple) -> Path:
    """A copy of `mar` in its own store folder whose model-config.yaml is `sizing`'s."""
    store.mkdir(parents=True, exist_ok=True)
    out = store / mar.name
    with zipfile.ZipFile(mar) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as copy:
        for item in source.infolist():
            data = model_config(*sizing).encode() if item.filename == "model-config.yaml" else source.read(item)
            copy.writestr(item, data)
    return store


def measure(store: Path, model: str, image: Path, concurrency: list, duration: float, work: Path,
            env: dict = None, server_warmup: float = 0.0) -> list:
    """[(concurrency, wrk's result)] of one served store (its server's environment updated with `env`),
    after `server_warmup` s of load at the highest concurrency (the frontend's JIT compiles its request
    path over its first minute: `tvserve bench --server-warmup`)."""
    work.mkdir(parents=True, exist_ok=True)
    config = free_ports_config(DEVELOPMENT_CONFIG, work / "config.properties")
    with Server(model_store=store, config=config, workdir=work / "server", env=env) as server:
        url = f"{server.inference_url}/predictions/{model}"
        if server_warmup > 0:
            run_wrk(url, image, concurrency=max(concurrency), duration=server_warmup)
        results = []
        for clients in concurrency:
            run_wrk(url, image, concurrency=clients, duration=min(3.0, duration))  # warm-up
            results.append((clients, run_wrk(url, image, concurrency=clients, duration=duration)))
        return results


def line(name: str, clients: int, result: dict) -> str:
    cpu_ms = server_cpu_ms(result, os.cpu_count() or 1)
    return (f"{name:8s} c={clients:<3d} {result['rps']:7.1f} req/s  p50 {result['p50_ms']:7.1f}  p99 "
            f"{result['p99_ms']:7.1f} ms  busy {result['machine_busy_pct']:5.1f}%  "
            f"{cpu_ms or float('nan'):5.1f} ms CPU/req  load {os.getloadavg()[0]:.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", type=Path)
    parser.add_argument("--sizings", required=True,
                        help="comma-separated WORKERSxTHREADSbBATCH[dDELAY][-rigid], e.g. 1x2b8,2x2b8d5,2x2b8-rigid")
    parser.add_argument("--image", type=Path, required=True, help="the request body (one image file)")
    parser.add_argument("--concurrency", default="4,16", help="comma-separated connection counts")
    parser.add_argument("--duration", type=float, default=8.0, help="s measured per point, after 3 s of warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="times every sizing is served, in turns")
    parser.add_argument("--server-warmup", type=float, default=30.0,
                        help="s of load on each fresh server before its first point, at the highest concurrency")
    args = parser.parse_args(argv)
    try:
        sizings = {text: parse_sizing(text) for text in args.sizings.split(",")}
        model = registered_name(args.archive)
        with tempfile.TemporaryDirectory(prefix="tvserve-sizings-") as folder:
            stores = {text: sized_copy(args.archive, Path(folder) / text, sizing) for text, sizing in sizings.items()}
            for _ in range(args.rounds):
                for text, store in stores.items():
                    work = Path(folder) / "work" / text
                    for clients, result in measure(store, model, args.image, [int(c) for c in args.concurrency.split(",")],
                                                   args.duration, work, server_env(text), args.server_warmup):
                        print(line(text, clients, result), flush=True)
                    shutil.rmtree(work, ignore_errors=True)
    except TvserveError as err:
        print(f"error: {err}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
