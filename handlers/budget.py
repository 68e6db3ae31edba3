"""The CPU thread budget of a worker: workers x threads <= cores. No torch here, so the server side
(tvserve/ops/server.py) shares this one rule without importing it."""

import os


def cores_per_worker(workers: int) -> int:
    """This machine's cores shared evenly among `workers` (at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def thread_budget(model_yaml_config: dict) -> int:
    """Torch threads for one worker: model-config.yaml's handler.threads, else TVSERVE_THREADS (set
    by the server for all workers), else the cores shared evenly among this model's workers."""
    config = model_yaml_config or {}
    threads = (config.get("handler") or {}).get("threads") or os.environ.get("TVSERVE_THREADS")
    if threads:
        return int(threads)
    return cores_per_worker(int(config.get("maxWorkers") or config.get("minWorkers") or 1))
