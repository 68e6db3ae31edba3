"""Serve-time sizing: each model's workers, batch size and batch delay for the machine that serves it.

An archive's sizes are decided where it is built, on that machine's CPU (tvserve/archiving/tuning.py),
and its record says which ones were decided and which the user gave (handlers/record.py Sizing).
Here the serving machine's facts (GPU count, cores) re-size the decided ones:

- Given sizes always win, and an archive that does not record its sizing (built before tvserve
  recorded it) keeps every size: it never says a size was decided.
- With GPUs: WORKERS_PER_GPU workers per GPU, at most one per core (TorchServe hands GPUs to
  workers round-robin), batches of the task's GPU_BATCH, and a GPU_BATCH_DELAY_MS batch delay.
- CPU only, on as many cores as the archive machine: the archive's values, chosen there by a
  measured load (tvserve/archiving/measured_load.py). On other cores the decided workers are
  re-planned from the shape of the measured winner (`measured_workers`): one worker with every
  core's threads stays one worker (now with this machine's cores), the shared shape (two workers
  that each had every core) stays two workers sharing this machine's cores, many workers of a few
  threads each become one per core here (at most budget.MAX_AUTO_WORKERS). The server's threads
  per worker count a model of the shared shape as one worker's worth of cores (Plan.cores_claimed).
  The batch size and delay stay: the load cannot be re-run here, and the winner's batch size is
  what its shape was measured with.
  Archives sized before sizes were measured keep their workers.

Pure apart from Machine.detect and plan_archive (which read the machine and the archive); no torch,
so the server starts without importing it (handlers/budget.py).
"""

import subprocess
from dataclasses import dataclass
from pathlib import Path

from handlers.budget import MAX_AUTO_WORKERS, cores
from handlers.record import DECODE_ENV, DEFAULT_DECODE, Sizing
from tvserve import TvserveError
from tvserve.archiving.mar import read_model_config, read_record, registered_version

GPUS_ENV = "TVSERVE_GPUS"  # GPUs to size for, over what is detected (tests size for a GPU on a CPU machine)
NUMBER_OF_GPU = "number_of_gpu"  # TorchServe's own property: it serves on at most this many
# Workers per GPU: two, so that one prepares its next batch while the other runs its forward. Each
# worker's own pipeline (handlers/pipeline.py) feeds its forward from a prepare pool of the cores
# dealt to it (TVSERVE_THREADS = cores / workers): with --gpu-decode the pool's chunks are decoded
# by nvJPEG on the card (4,732 img/s of 0.5 MP JPEGs on one H200, issue #13); with PIL each of its
# threads decodes on a core (about 100 img/s each, against a forward of thousands on the card:
# resnet50 8,125 img/s, issue #13), so the cores, not the workers, are what feeds the card.
WORKERS_PER_GPU = 2
# Batches that fill a GPU: a classifier's forward per image keeps getting cheaper up to 32 and
# little after (resnet50 on one H200, issue #13: 7,422 img/s at 32, 8,125 at 64). Detection and
# segmentation models take big images of their own sizes, each forward already fills the card.
GPU_BATCH = {"classification": 32, "semantic_segmentation": 8}
GPU_BATCH_OTHERS = 4  # detection, instance segmentation, keypoints
# A batch waits at most this long for batch-mates: at low load a lone request waits this much on top
# of its batch-1 latency (decoding a 0.5 MP photo alone takes ~10 ms), so p99 at low load stays near
# batch-1's; under load the queue fills a batch at once and nothing waits.
GPU_BATCH_DELAY_MS = 5
# TorchServe's own defaults where the archive's model-config.yaml sets no positive value.
TORCHSERVE_BATCH_SIZE, TORCHSERVE_BATCH_DELAY_MS, TORCHSERVE_TIMEOUT_S = 1, 100, 120


@dataclass(frozen=True)
class Machine:
    """The serving machine's facts: GPUs TorchServe will use, and the cores (budget.cores)."""

    gpus: int
    cores: int
    gpus_from: str = "detected"  # where the GPU count came from, for the plan lines
    decode: str = None  # TVSERVE_DECODE for every worker, where the server sets it (else each archive's own)

    @classmethod
    def detect(cls, env: dict, properties: dict) -> "Machine":
        """This machine as TorchServe with these `properties` and environment `env` sees it."""
        gpus, source = gpu_count(env, properties)
        return cls(gpus=gpus, cores=cores(env), gpus_from=source, decode=env.get(DECODE_ENV) or None)

    def describe(self) -> str:
        gpus = f"{self.gpus} GPU{'s' if self.gpus != 1 else ''} ({self.gpus_from})" if self.gpus else "no GPU"
        return f"{gpus}, {self.cores} cores"


def gpu_count(env: dict, properties: dict) -> tuple:
    """(GPUs, where the count came from): TVSERVE_GPUS where set; else the GPUs visible (as
    TorchServe counts them: CUDA_VISIBLE_DEVICES's entries, else nvidia-smi's list), capped by
    TorchServe's number_of_gpu property where set, as TorchServe's ConfigManager caps them."""
    if env.get(GPUS_ENV):
        return int(env[GPUS_ENV]), GPUS_ENV
    visible = env.get("CUDA_VISIBLE_DEVICES")
    count, source = (len(visible.split(",")), "CUDA_VISIBLE_DEVICES") if visible else (nvidia_smi_gpus(), "nvidia-smi")
    if properties.get(NUMBER_OF_GPU):
        return min(count, int(properties[NUMBER_OF_GPU])), f"{source}, {NUMBER_OF_GPU}={properties[NUMBER_OF_GPU]}"
    return count, source


def nvidia_smi_gpus() -> int:
    """The GPUs `nvidia-smi -L` lists (0 without the tool or a driver)."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines()) if listed.returncode == 0 else 0


@dataclass(frozen=True)
class Size:
    """One planned size and the one-line reason for it."""

    value: int
    why: str


@dataclass(frozen=True)
class Plan:
    """One model version's planned sizes and the archive's own (`archived`, as TorchServe would use
    its model-config.yaml: {"workers", "batch_size", "max_batch_delay", "response_timeout",
    "startup_timeout"})."""

    name: str
    version: str
    mar: Path
    workers: Size
    batch_size: Size
    max_batch_delay: Size
    archived: dict
    shares_cores: bool = False  # its workers take turns on every core (the measured shared shape)

    @property
    def cores_claimed(self) -> int:
        """Workers' worth of cores this model's workers take: its workers, or one for the shared
        shape (its two workers take turns on the same cores)."""
        return 1 if self.shares_cores else self.workers.value

    def changes(self) -> bool:
        """Whether this plan serves the model otherwise than its model-config.yaml would."""
        return any(getattr(self, size).value != self.archived[size] for size in ("workers", "batch_size", "max_batch_delay"))

    def line(self) -> str:
        shared = ", sharing every core" if self.shares_cores else ""
        return (f"{self.name} {self.version}: {self.workers.value} worker(s){shared} ({self.workers.why}), batch "
                f"{self.batch_size.value} ({self.batch_size.why}), delay {self.max_batch_delay.value} ms "
                f"({self.max_batch_delay.why})")

    def snapshot_entry(self, default: bool) -> dict:
        """This version as TorchServe's model_snapshot holds it (SnapshotManager.restore registers it
        with these values; Model.setModelState reads them)."""
        return {"defaultVersion": default, "marName": self.mar.name, "minWorkers": self.workers.value,
                "maxWorkers": self.workers.value, "batchSize": self.batch_size.value,
                "maxBatchDelay": self.max_batch_delay.value, "responseTimeout": self.archived["response_timeout"],
                "startupTimeout": self.archived["startup_timeout"]}


def archived_sizes(model_config: dict, default_workers: int) -> dict:
    """The sizes TorchServe serves an archive with from its model-config.yaml alone (ModelServer,
    ModelManager.createModel): its values where positive, else TorchServe's defaults."""
    min_workers, max_workers = int(model_config.get("minWorkers") or 0), int(model_config.get("maxWorkers") or 0)
    return {
        "workers": min_workers if min_workers > 0 and max_workers >= min_workers else default_workers,
        "batch_size": int(model_config.get("batchSize") or 0) or TORCHSERVE_BATCH_SIZE,
        "max_batch_delay": int(model_config.get("maxBatchDelay") or 0) or TORCHSERVE_BATCH_DELAY_MS,
        "response_timeout": int(model_config.get("responseTimeout") or 0) or TORCHSERVE_TIMEOUT_S,
        "startup_timeout": int(model_config.get("startupTimeout") or 0) or TORCHSERVE_TIMEOUT_S,
    }


def kept(size: str, archived: dict, sizing: Sizing) -> Size:
    """The archive's own value of a size the plan does not change, unless it was decided."""
    if sizing is None:
        return Size(archived[size], "archive records no sizing: kept")
    return Size(archived[size], "given when archived")


def plan_workers(archived: dict, sizing: Sizing, machine: Machine, decode: str = DEFAULT_DECODE) -> Size:
    if sizing is None or "workers" not in sizing.decided:
        return kept("workers", archived, sizing)
    if machine.gpus:
        return gpu_workers(machine, machine.decode or decode)
    if machine.cores == sizing.cores:
        how = "measured" if sizing.measured and sizing.measured.winner() else "decided"
        return Size(archived["workers"], f"{how} on {sizing.cores} cores, as here")
    if not (sizing.measured and sizing.measured.winner()):
        return Size(archived["workers"], f"decided on {sizing.cores} cores without a measured load: kept")
    return measured_workers(sizing, machine.cores)


def measured_workers(sizing: Sizing, cores: int) -> Size:
    """The measured winner's shape on `cores` (re-planned: its cores differ from `sizing.cores`): one
    worker with every core's threads stays one, the shared shape stays its workers sharing every
    core, several workers of a few threads each become one per core."""
    winner = sizing.measured.winner()
    shape = f"re-planned for {cores} cores from the load measured on {sizing.cores}: its winner, " \
            f"{winner['workers']} worker(s) x {winner['threads']} threads,"
    if winner["workers"] == 1:
        return Size(1, f"{shape} keeps one worker, with {cores} threads here")
    if sizing.shares_cores():
        return Size(winner["workers"], f"{shape} keeps its {winner['workers']} workers sharing every core")
    workers = min(cores, MAX_AUTO_WORKERS)
    return Size(workers, f"{shape} becomes one per core here (at most {MAX_AUTO_WORKERS})")


def gpu_workers(machine: Machine, decode: str) -> Size:
    """WORKERS_PER_GPU workers per GPU, at most one per core, each fed by its prepare pool."""
    workers = max(1, min(WORKERS_PER_GPU * machine.gpus, machine.cores))
    where = "decoded on the GPU" if decode == "tensor" else "decoded with PIL"
    return Size(workers, f"{where}: {WORKERS_PER_GPU} per GPU x {machine.gpus}, at most one per core of "
                         f"{machine.cores}, each preparing on {max(1, machine.cores // workers)} threads")


def plan_batch_size(archived: dict, sizing: Sizing, task: str, machine: Machine) -> Size:
    if sizing is None or "batch_size" not in sizing.decided:
        return kept("batch_size", archived, sizing)
    if machine.gpus:
        return Size(GPU_BATCH.get(task, GPU_BATCH_OTHERS), f"fills a GPU for {task.replace('_', ' ')}")
    if sizing.measured and sizing.measured.winner():
        return Size(archived["batch_size"], f"measured on {sizing.cores} cores: kept on a CPU")
    return Size(archived["batch_size"], "decided on the archive's CPU: kept on a CPU")


def plan_batch_delay(archived: dict, sizing: Sizing, machine: Machine) -> Size:
    if sizing is None or "max_batch_delay" not in sizing.decided:
        return kept("max_batch_delay", archived, sizing)
    if machine.gpus:
        return Size(GPU_BATCH_DELAY_MS, "the most a lone request waits for batch-mates")
    return Size(archived["max_batch_delay"], "archive default: kept on a CPU")


def plan_sizes(archived: dict, sizing: Sizing, task: str, machine: Machine, decode: str = DEFAULT_DECODE) -> dict:
    """{"workers", "batch_size", "max_batch_delay": Size} for one model on `machine`, from the
    archive's own sizes (`archived_sizes`), its record's `sizing` (None for older archives; its
    measured load, where recorded), its `task` and where its workers decode (its preset's
    `decode`; the server's TVSERVE_DECODE wins)."""
    return {"workers": plan_workers(archived, sizing, machine, decode),
            "batch_size": plan_batch_size(archived, sizing, task, machine),
            "max_batch_delay": plan_batch_delay(archived, sizing, machine)}


def plan_archive(name: str, mar: Path, machine: Machine, default_workers: int) -> Plan:
    """The Plan for archive `mar`, registered as `name` (an archive without a readable tvserve
    record keeps its model-config.yaml's sizes)."""
    archived = archived_sizes(read_model_config(mar), default_workers)
    try:
        record = read_record(mar)
    except TvserveError:
        record = None
    sizes = plan_sizes(archived, record and record.sizing, record.task if record else "classification", machine,
                       record.preset.decode if record else DEFAULT_DECODE)
    sizing = record and record.sizing
    shares = bool(sizing and sizing.shares_cores() and not machine.gpus and sizes["workers"].value > 1)
    return Plan(name=name, version=registered_version(mar), mar=Path(mar), archived=archived, shares_cores=shares,
                **sizes)


def model_snapshot(plans: list, created_ms: int) -> dict:
    """TorchServe's model_snapshot (SnapshotManager.restore) registering every plan's model version
    with its planned sizes; each model's first plan is its default version, as TorchServe makes
    the first version it registers (ModelVersionedRefs.addVersionModel)."""
    models = {}
    for plan in plans:
        versions = models.setdefault(plan.name, {})
        versions[plan.version] = plan.snapshot_entry(default=not versions)
    return {"name": "tvserve-sizing.cfg", "modelCount": len(plans), "created": created_ms, "models": models}
