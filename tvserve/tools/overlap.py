"""Two workers' forwards at once, with and without elastic threads (handlers/elastic.py):
`python -m tvserve.tools.overlap ARCHIVE.mar [--threads 2] [--batch 1] [--seconds 10] [--rounds 3]`.

Each of `--workers` processes (spawned) initialises the archive's handler as a TorchServe worker
does, with `--threads` threads, then runs its runner on the same batch back to back for `--seconds`
(after 2 s unmeasured), all at once: the worst case of workers that share the cores, with no
decoding or HTTP between forwards. Each round measures elastic threads on, then off
(TVSERVE_ELASTIC=off), and prints the images/s of all the workers together, each worker's CPU ms
per image and how many forwards ran on each thread count (JSON, one object per worker), with the
load average.
"""

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from handlers.elastic import ENV


def worker(mar: str, threads: int, batch: int, seconds: float, elastic: bool, results) -> None:
    """One process: the handler from `mar` (in its own folder), its runner timed back to back."""
    os.environ[ENV] = "on" if elastic else "off"
    import torch

    from tvserve.tools.inprocess import load_handler

    with tempfile.TemporaryDirectory(prefix="tvserve-overlap-") as folder:
        handler = load_handler(Path(mar), Path(folder), threads=threads)
        crop = handler.record.preset.crop
        images = torch.rand(batch, 3, crop, crop)
        end = time.perf_counter() + 2.0
        with torch.inference_mode():
            while time.perf_counter() < end:
                handler.runner(images)
            forwards, start, cpu = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - start < seconds:
                handler.runner(images)
                forwards += 1
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        counts = dict(getattr(handler.runner, "forwards", None) or {threads: forwards})  # rigid: all on `threads`
        results.put((forwards * batch / wall, cpu * 1000 / (forwards * batch), counts))
        handler.close()


def measure(mar: Path, workers: int, threads: int, batch: int, seconds: float, elastic: bool) -> list:
    """[(images/s, CPU ms per image, {threads: forwards})] of each worker, run at once."""
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    processes = [spawn.Process(target=worker, args=(str(mar), threads, batch, seconds, elastic, results))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    measured = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return measured


def line(elastic: bool, measured: list) -> str:
    return (f"{'elastic' if elastic else 'rigid':8s} {sum(rate for rate, _, _ in measured):7.1f} img/s together  "
            f"CPU ms/img {' '.join(f'{cpu:.1f}' for _, cpu, _ in measured)}  "
            f"forwards by threads {json.dumps([counts for _, _, counts in measured])}  load {os.getloadavg()[0]:.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="each worker's (default: every core)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured per point, after 2 s")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    for _ in range(args.rounds):
        for elastic in (True, False):
            print(line(elastic, measure(args.archive, args.workers, args.threads, args.batch, args.seconds, elastic)),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
