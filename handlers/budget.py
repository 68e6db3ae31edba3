"""The CPU thread budget of a worker: workers x threads <= cores. No torch
here, so the server side (tvserve/ops/server.py, tvserve/ops/sizing.py) shares these rules with the
archiver and the worker without importing it."""

import os


CPUS_ENV = "TVSERVE_CPUS"  # cores this server may use; Kubernetes sets it from the container's CPU limit
MAX_AUTO_WORKERS = 8  # the most workers the archiver tries on a CPU (tvserve/archiving/measured_load.py)
PREPARE_THREADS_ENV = "TVSERVE_PREPARE_THREADS"  # every worker's prepare pool (handlers/pipeline.py)
# What a worker's environment holds unless the server's own says otherwise: idle torch (OpenMP)
# threads sleep instead of spinning on the cores the prepare pool, the other workers and the frontend
# need (docs/performance.md, "Idle threads sleep"). The archiver's measuring workers get it too: a
# spinning pool made a 2-thread worker prepare a batch of two 0.5 MP JPEGs for the Net at 236 img/s
# against 324 with it (2 cores).
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def worker_defaults(env) -> dict:
    """WORKER_ENV's entries that `env` (a dict, or os.environ) does not set: a worker's environment
    is `env` updated with them."""
    return {key: value for key, value in WORKER_ENV.items() if key not in env}


def cores(env: dict = None) -> int:
    """TVSERVE_CPUS where set in `env` (default: this process's environment; a container sees the
    node's CPUs, not its limit), else this machine's."""
    env = os.environ if env is None else env
    return int(env.get(CPUS_ENV) or os.cpu_count() or 1)


def cores_per_worker(workers: int, env: dict = None) -> int:
    """The cores (see `cores`) shared evenly among `workers` (at least 1)."""
    return max(1, cores(env) // max(1, workers))


def thread_budget(model_yaml_config: dict, shares_cores: bool = False) -> int:
    """Torch threads for one worker: model-config.yaml's handler.threads, else TVSERVE_THREADS (set
    by the server for all workers), else the cores shared evenly among this model's workers, or
    every core where its workers take turns on them (`shares_cores`: the archive's measured shared
    shape, record.Sizing.shares_cores), as under a TorchServe that tvserve did not start (KServe)."""
    config = model_yaml_config or {}
    threads = (config.get("handler") or {}).get("threads") or os.environ.get("TVSERVE_THREADS")
    if threads:
        return int(threads)
    return cores_per_worker(1 if shares_cores else int(config.get("maxWorkers") or config.get("minWorkers") or 1))


def prepare_threads(model_yaml_config: dict, threads: int) -> int:
    """Threads of one worker's prepare pool (handlers/pipeline.py): model-config.yaml's
    handler.prepare_threads, else TVSERVE_PREPARE_THREADS, else as many as its torch `threads`:
    decoding then has the worker's cores while the forward waits for its first images, and shares
    them with the forward after."""
    config = (model_yaml_config or {}).get("handler") or {}
    return int(config.get("prepare_threads") or os.environ.get(PREPARE_THREADS_ENV) or threads)
