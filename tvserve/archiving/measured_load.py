"""Sizing an archive by a short measured load on the machine that builds it (#22): its workers,
their threads and its batch size, for the sizes the user left to the archiver.

No TorchServe: its dispatch is emulated here. `workers` worker processes (multiprocessing spawn)
each initialise the real handler from the archive's own files with the candidate's threads, as a
TorchServe worker does; a dispatcher in this process holds `c` closed-loop clients (each sends its
next request as soon as its answer is back). A free worker takes up to `batch` queued requests at
once, as TorchServe's BatchAggregator does (without its batch delay's wait for more), and runs them through
`handler.handle(requests, context)`; a request's latency is its queue wait plus its batch's time.
Every request is the 0.5 MP photo-like JPEG the archiver times preprocessing with (tuning.sample_jpeg),
which every task's handler decodes.

Candidates: three shapes x batch in {1, BATCH_SIZE}: one worker with every core's threads; a worker
per core (at most budget.MAX_AUTO_WORKERS) with cores // workers threads; and SHARED_WORKERS workers
that each have every core's threads, taking turns: while one decodes its batch on its prepare pool,
the other's forward has the cores (on 2 cores, resnet18 OpenVINO served at c=4: 97-98% busy and
38.9-39.8 req/s, against 93% and 37.5-38.4 for one worker; two 2-thread OpenVINO forwards at once
on 2 cores run 57 img/s together, as many as one). --threads sets every shape's threads (no shared
shape then); a size the user gave is the only value tried. Each is measured at c=1 (p50) and at c=cores (req/s), POINT_S each after WARMUP_S. At c=1
there is never more than one request queued, so a candidate's batch size cannot matter there: c=1
is measured once per worker count, a batched candidate's adding the batch delay that TorchServe
holds a lone request for batch-mates. A candidate's req/s at load is each worker's requests over
the time between its answers in the point, not a count of whole requests in it. The choice
(`choose`): among those whose c=1 p50 is within P50_MARGIN of the fastest c=1 p50, the fastest at
load, where req/s within LOAD_TIE of the most count as equal and the most workers win among them
(why: `choose`).

What is not measured, and why:
- the batch delay stays options.DEFAULT_MAX_BATCH_DELAY (1 ms): with closed-loop clients a longer
  delay only adds its wait at low load (measured on 2 cores, resnet18 OpenVINO, 1 x 2 threads,
  batch 8: delay 5 ms gave c=1 29.3 req/s against 34.4 at 1 ms, and no more at c=4 or c=16), and
  0 ms cannot be had: TorchServe 0.12 reads it as unset and waits its default 100 ms (2 workers x
  2 threads, batch 8: c=1 p50 133-136 ms against 27-29 at 1 ms, c=4 20 req/s against 42-45);
- the prepare pool keeps its default (the worker's torch threads), to keep archiving in seconds;
- models whose batch-1 forward (timed when the backend was chosen) exceeds MAX_FORWARD_MS
  (detection and segmentation on a few cores: seconds): a point of half a second would hold one or no
  requests and decide on noise, while measuring them properly would take minutes per archive. They
  get one worker with every core's threads (the forward is the work, and it uses them all) and
  batches of BATCH_SIZE (the prepare pool decodes a batch on every core at once), the record
  saying why.
"""

import contextlib
import logging
import multiprocessing
import os
import statistics
import time
from collections import deque
from dataclasses import replace
from multiprocessing.connection import wait
from pathlib import Path

from handlers.budget import MAX_AUTO_WORKERS, worker_defaults
from handlers.record import MeasuredLoad
from tvserve import TvserveError

log = logging.getLogger(__name__)

BATCH_SIZE = 8  # the batched candidate: a batch's images are decoded on the prepare pool at once, then one forward
SHARED_WORKERS = 2  # the shared shape's workers, each with every core's threads (see the module docstring)
POINT_S = 0.5  # s measured per point: 15-25 requests of resnet18, 100-200 of the book's Net, on 2 cores
WARMUP_S = 0.2  # s of the same load first, unmeasured (runtimes settle their threads and caches)
P50_MARGIN = 0.10  # a candidate may be this much slower than the fastest alone, and no more
LOAD_TIE = 0.05  # req/s at load this close to the most count as equal (`choose`)
MAX_FORWARD_MS = 250  # slower batch-1 forwards are not measured (see the module docstring)
START_TIMEOUT_S = 600  # a worker that has not loaded the model by then is taken as stuck


def shapes_for(options, cores: int) -> list:
    """[(workers, threads per worker)] to measure: the workers the user gave, alone, else the three
    shapes of the module docstring (fewer where they coincide: one core, or --threads given)."""
    if options.workers:
        return [(options.workers, options.threads or max(1, cores // options.workers))]
    per_core = min(cores, MAX_AUTO_WORKERS)
    shapes = [(1, options.threads or cores), (per_core, options.threads or max(1, cores // per_core))]
    if not options.threads and cores > 1:
        shapes.append((SHARED_WORKERS, cores))
    return list(dict.fromkeys(shapes))


def candidates_for(options, cores: int) -> list:
    """[(workers, threads, batch_size)] to measure: each shape with the batch size the user gave,
    else with 1 and BATCH_SIZE."""
    batches = (options.batch_size,) if options.batch_size else (1, BATCH_SIZE)
    return [(w, t, b) for w, t in shapes_for(options, cores) for b in batches]


def choose(candidates: list) -> tuple:
    """(index, why) of the winner among the candidates whose "c1_p50_ms" is within P50_MARGIN of the
    fastest one's: of those within LOAD_TIE of the most req/s at load ("load_rps"), the one of the most
    workers, then the most req/s; on equal both, the first listed.

    Why the most workers among near-equals: this load has no TorchServe frontend, and a worker of the
    real server idles between its batches (its answers go back through the frontend, the next batch
    comes after TorchServe's batch delay), which a second worker's batch fills. Served over HTTP on 2
    cores (resnet18 OpenVINO, 0.5 MP JPEG, 30 s warm-up, two rounds, 2026-12-04 23:16 UTC, load
    1.5-2.9), 2 workers x 2 threads, batch 8 served 47.0-47.3 req/s at c=4 (96% busy) and 48.2-49.5 at
    c=16 (98%), against 45.2-45.5 (94%) and 46.3-47.1 (96%) for 1 worker x 2 threads; this load gave
    the two 48 req/s each. It is also the sturdier server: while one worker restarts, another serves."""
    fastest = min(c["c1_p50_ms"] for c in candidates)
    eligible = [i for i, c in enumerate(candidates) if c["c1_p50_ms"] <= fastest * (1 + P50_MARGIN)]
    most = max(candidates[i]["load_rps"] for i in eligible)
    near = [i for i in eligible if candidates[i]["load_rps"] >= most * (1 - LOAD_TIE)]
    best = max(near, key=lambda i: (candidates[i]["workers"], candidates[i]["load_rps"], -i))
    return best, (f"of the {len(eligible)} of {len(candidates)} candidates whose c=1 p50 is within {P50_MARGIN:.0%} "
                  f"of the fastest ({fastest:g} ms), the {len(near)} within {LOAD_TIE:.0%} of the most req/s at load "
                  f"({most:g}) count as equal: the most workers among them, then the most req/s "
                  f"({candidates[best]['load_rps']:g})")


def size_by_load(folder: Path, options, forward_ms: float, cores: int, body: bytes) -> tuple:
    """(options with workers and batch_size decided, MeasuredLoad) for the archive whose files are
    unpacked in `folder` (its record, weights and exported model), on `cores`. `forward_ms`: its
    batch-1 forward as timed when its backend was chosen (None: unknown, measured anyway)."""
    if forward_ms is not None and forward_ms > MAX_FORWARD_MS:
        why = (f"not measured: a batch-1 forward takes {forward_ms:.0f} ms here (over {MAX_FORWARD_MS} ms), too "
               f"few requests for a point of {POINT_S:g} s; one worker with every core's threads (the forward is "
               f"the work) and batches of {BATCH_SIZE} (decoded on every core at once)")
        log.info("sizing: %s", why)
        return (replace(options, workers=options.workers or 1, batch_size=options.batch_size or BATCH_SIZE),
                MeasuredLoad(concurrency=cores, point_s=POINT_S, candidates=[], why=why))
    measured = measure(folder, candidates_for(options, cores), cores, body, options.batch_delay())
    chosen, why = choose(measured)
    winner = measured[chosen]
    log.info("sizing: %d worker(s) x %d threads, batch %d: %s", winner["workers"], winner["threads"],
             winner["batch_size"], why)
    return (replace(options, workers=winner["workers"], batch_size=winner["batch_size"]),
            MeasuredLoad(concurrency=cores, point_s=POINT_S, candidates=measured, chosen=chosen, why=why))


def measure(folder: Path, candidates: list, concurrency: int, body: bytes, delay_ms: float) -> list:
    """Each candidate (workers, threads, batch) measured: {"workers", "threads", "batch_size",
    "c1_p50_ms", "load_rps"}. The processes of the most workers are started once and re-initialised
    for each worker count (fewer workers: the first ones). A batched candidate's c=1 p50 counts the
    batch delay `delay_ms` that TorchServe holds a lone request for batch-mates that never come."""
    spawn = multiprocessing.get_context("spawn")
    pipes = [spawn.Pipe() for _ in range(max(w for w, _, _ in candidates))]
    processes = [spawn.Process(target=worker_loop, args=(str(folder), child), daemon=True) for _, child in pipes]
    with worker_environment():
        for process in processes:
            process.start()
    conns = [parent for parent, _ in pipes]
    results = []
    try:
        for workers, threads in dict.fromkeys((w, t) for w, t, _ in candidates):
            started = conns[:workers]
            for conn in started:
                conn.send(("init", threads, body))
            for conn in started:
                answer(conn, START_TIMEOUT_S)
            alone = load_point(started, clients=1, batch=1)
            for w, t, batch in candidates:
                if (w, t) == (workers, threads):
                    loaded = load_point(started, clients=concurrency, batch=batch)
                    results.append({"workers": w, "threads": t, "batch_size": batch,
                                    "c1_p50_ms": alone["p50_ms"] + (delay_ms if batch > 1 else 0),
                                    "load_rps": loaded["rps"]})
                    log.info("sizing: %d worker(s) x %d threads, batch %d: c=1 p50 %.1f ms, c=%d %.1f req/s", w, t,
                             batch, results[-1]["c1_p50_ms"], concurrency, loaded["rps"])
    finally:
        for conn in conns:
            conn.send(("stop",))
        for process in processes:
            process.join(timeout=30)
    return results


@contextlib.contextmanager
def worker_environment():
    """This process's environment with a served worker's (budget.WORKER_ENV, where unset) while the
    measuring workers are spawned: they start with it, as TorchServe's workers do under `tvserve serve`."""
    added = worker_defaults(os.environ)
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def answer(conn, timeout: float):
    """The worker's next message; TvserveError where it died (its traceback is on stderr) or hangs."""
    try:
        if conn.poll(timeout):
            return conn.recv()
    except EOFError:
        pass
    raise TvserveError("sizing: a measuring worker failed (its traceback is above); archive with --workers and "
                       "--batch-size to skip the measurement.")


def load_point(conns: list, clients: int, batch: int) -> dict:
    """`clients` closed-loop clients served by the workers behind `conns`, each free worker taking up
    to `batch` queued requests: {"rps", "p50_ms"} of the requests answered in POINT_S after WARMUP_S
    (longer where none was answered by then: a slow model's point holds at least one answer)."""
    queue = deque([time.perf_counter()] * clients)  # each queued request's arrival time
    free, held, latencies = deque(conns), {}, []
    answered = {conn: [] for conn in conns}  # each worker's batches answered in the point: [(time, requests)]
    start = time.perf_counter() + WARMUP_S
    end = start + POINT_S
    while held or queue:
        while free and queue:  # the queued requests shared among the free workers (see `share`)
            taken = share(len(queue), len(free), batch)
            conn = free.popleft()
            held[conn] = [queue.popleft() for _ in range(taken)]
            conn.send(("handle", taken))
        for conn in wait(list(held)):
            answer(conn, 0)
            done = time.perf_counter()
            arrivals = held.pop(conn)
            free.append(conn)
            if done >= start and (done <= end or not latencies):
                latencies += [(done - arrival) * 1000 for arrival in arrivals]
                answered[conn].append((done, len(arrivals)))
            if done < end or not latencies:
                queue.extend([done] * len(arrivals))  # each client sends its next request at once
    return {"rps": round(sum(rate(batches) for batches in answered.values()), 1),
            "p50_ms": round(statistics.median(latencies), 2)}


def share(queued: int, free: int, batch: int) -> int:
    """How many of `queued` requests the next of `free` workers takes: an even share, at most `batch`.
    TorchServe's aggregator gives a free worker what arrives within its batch delay; its frontend
    handles requests one at a time, so requests sent at once reach it spread out and a second free
    worker takes those the first missed. This load's clients send theirs at the same instant, so
    without sharing the first free worker would take them all and the other would idle."""
    return min(batch, -(-queued // free))


def rate(batches: list) -> float:
    """One worker's requests a second from [(time, requests)] of the batches it answered in a point:
    those after its first batch over the time from it to its last, so that the figure is not rounded
    to whole requests a point (at 0.5 s and ~50 req/s, steps of 2-4 req/s); fewer than two batches,
    their requests over POINT_S."""
    if len(batches) < 2:
        return sum(n for _, n in batches) / POINT_S
    return sum(n for _, n in batches[1:]) / (batches[-1][0] - batches[0][0])


def worker_loop(folder: str, conn) -> None:
    """A measuring worker's process: ("init", threads, body) (re)initialises the handler from the
    archive's files in `folder` with `threads`; ("handle", n) runs a batch of n requests of `body`
    through it; ("stop",) ends."""
    from tvserve.tools.batches import run_handle
    from tvserve.tools.inprocess import initialise

    handler, body = None, None
    while True:
        message = conn.recv()
        if message[0] == "init":
            if handler is not None:
                handler.close()
            handler, body = initialise(Path(folder), {"handler": {"threads": message[1]}}), message[2]
            conn.send("ready")
        elif message[0] == "handle":
            run_handle(handler, [{"body": bytearray(body)} for _ in range(message[1])])
            conn.send("done")
        else:
            return
