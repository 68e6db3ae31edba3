"""The CPU thread budget of a worker: workers x threads <= cores. No torch here, so the server side
(tvserve/ops/server.py) shares this one rule without importing it."""

import os


CPUS_ENV = "TVSERVE_CPUS"  # cores this server may use; Kubernetes sets it from the container's CPU limit


def cores() -> int:
    """TVSERVE_CPUS where set (a container sees the node's CPUs, not its limit), else this machine's."""
    return int(os.environ.get(CPUS_ENV) or os.cpu_count() or 1)


def cores_per_worker(workers: int) -> int:
    """The cores (see `cores`) shared evenly among `workers` (at least 1)."""
    return max(1, cores() // max(1, workers))


def thread_budget(model_yaml_config: dict) -> int:
    """Torch threads for one worker: model-config.yaml's handler.threads, else TVSERVE_THREADS (set
    by the server for all workers), else the cores shared evenly among this model's workers."""
    config = model_yaml_config or {}
    threads = (config.get("handler") or {}).get("threads") or os.environ.get("TVSERVE_THREADS")
    if threads:
        return int(threads)
    return cores_per_worker(int(config.get("maxWorkers") or config.get("minWorkers") or 1))
