"""Steady load on one served model for a set time (loopback, bounded), then a report: requests,
every error, latency, and each worker's resident memory at the start and the end."""

import itertools
import threading
import time

import psutil
import requests

from tvserve.ops.client import bearer
from tvserve.ops.management import model_versions

WARM_UP_REQUESTS = 50  # before the first RSS reading: allocator pools reach their steady size
MAX_OVERRUN = 10  # a soak with a request floor stops at this many times its duration in any case


def worker_rss(management_url: str, model: str, token: str = None) -> dict:
    """{worker pid: resident bytes} of `model`'s workers (they run on this machine)."""
    versions = model_versions(management_url, token).get(model, [])
    return {w["pid"]: psutil.Process(w["pid"]).memory_info().rss for v in versions for w in v.get("workers", [])}


def soak(model: str, images: list, *, url: str, management_url: str, token: str = None,
         management_token: str = None, duration: float = 600, concurrency: int = 4, timeout: float = 30,
         min_requests: int = 0) -> dict:
    """Sends `images` (bytes) round-robin from `concurrency` threads for `duration` seconds, and on
    until `min_requests` were answered (on a slow machine), at most MAX_OVERRUN times `duration`.
    `token` and `management_token` are the server's inference and management keys, if it has any."""
    target = f"{url}/predictions/{model}"
    headers = bearer(token)
    with requests.Session() as session:
        for image in itertools.islice(itertools.cycle(images), WARM_UP_REQUESTS):
            session.post(target, data=image, headers=headers, timeout=timeout)
    rss_start = worker_rss(management_url, model, management_token)
    latencies, errors, lock = [], [], threading.Lock()
    started_at = time.monotonic()
    deadline, cap = started_at + duration, started_at + MAX_OVERRUN * duration

    def done() -> bool:
        now = time.monotonic()
        return now >= cap or (now >= deadline and len(latencies) >= min_requests)

    def load(offset: int):
        with requests.Session() as session:
            for image in itertools.islice(itertools.cycle(images), offset, None):
                if done():
                    return
                started = time.monotonic()
                try:
                    response = session.post(target, data=image, headers=headers, timeout=timeout)
                    error = None if response.status_code == 200 else f"HTTP {response.status_code}: {response.text[:200]}"
                except requests.RequestException as err:
                    error = f"{type(err).__name__}: {err}"
                with lock:
                    latencies.append(time.monotonic() - started)
                    if error:
                        errors.append(error)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rss_end = worker_rss(management_url, model, management_token)
    growth = max((rss_end[pid] / rss_start[pid] - 1 for pid in rss_start if pid in rss_end), default=None)
    latencies.sort()
    return {
        "model": model, "seconds": round(time.monotonic() - started_at, 1), "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors, "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
        "rss_start": rss_start, "rss_end": rss_end, "rss_growth": growth,
        "workers_replaced": sorted(set(rss_start) ^ set(rss_end)),
    }
