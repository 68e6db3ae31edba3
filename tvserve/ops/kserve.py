"""The storage layout KServe's TorchServe runtime (`kserve-torchserve`, modelFormat pytorch) reads
from an InferenceService's storageUri:

    DIR/config/config.properties    TorchServe's configuration, with a model_snapshot naming each archive
    DIR/model-store/NAME.mar        the archives

written by `tvserve export kserve DIR` from a model store. The runtime starts TorchServe with
`--model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties`.
"""

import json
import logging
import shutil
from pathlib import Path

from tvserve import TvserveError
from tvserve.archiving.mar import MANIFEST_FILE, read_member, read_model_config, registered_name
from tvserve.ops.properties import write_properties

log = logging.getLogger(__name__)

MOUNT = "/mnt/models"  # where KServe's storage initializer puts the storageUri's files
CONFIG_PATH = Path("config") / "config.properties"
STORE_DIR = "model-store"
INFERENCE_PORT = 8085  # KServe's TorchServe runtime samples: inference and management on 8085
METRICS_PORT = 8082  # the runtime's prometheus.kserve.io/port annotation
SNAPSHOT_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")
SNAPSHOT_DEFAULTS = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 1, "responseTimeout": 120}


def model_version(mar: Path) -> str:
    return json.loads(read_member(mar, MANIFEST_FILE))["model"].get("modelVersion", "1.0")


def snapshot(archives: list) -> dict:
    """TorchServe's model_snapshot for `archives`: each model's versions with their workers and
    batching as the archive's model-config.yaml sets them; the lowest version is the default."""
    models = {}
    for mar in sorted(archives):
        config = read_model_config(mar)
        entry = {key: int(config.get(key) or SNAPSHOT_DEFAULTS[key]) for key in SNAPSHOT_KEYS}
        models.setdefault(registered_name(mar), {})[model_version(mar)] = {"marName": mar.name, **entry}
    for versions in models.values():
        default = min(versions, key=lambda v: [int(p) if p.isdigit() else p for p in v.split(".")])
        for version, entry in versions.items():
            entry["defaultVersion"] = version == default
    count = sum(len(versions) for versions in models.values())
    return {"name": "startup.cfg", "modelCount": count, "models": models}


def kserve_properties(archives: list) -> dict:
    """config.properties for the runtime: tvserve's handler settings, KServe's ports and paths."""
    return {
        "inference_address": f"http://0.0.0.0:{INFERENCE_PORT}",
        "management_address": f"http://0.0.0.0:{INFERENCE_PORT}",
        "metrics_address": f"http://0.0.0.0:{METRICS_PORT}",
        "grpc_inference_port": "7070",
        "grpc_management_port": "7071",
        "enable_metrics_api": "true",
        "metrics_format": "prometheus",
        "enable_envvars_config": "true",  # the runtime sets TS_SERVICE_ENVELOPE
        "install_py_dep_per_model": "false",
        "disable_token_authorization": "true",  # TorchServe's random per-pod keys: KServe authenticates in front
        "enable_model_api": "false",  # no registration over the API (CVE-2023-43654)
        "decode_input_request": "false",  # tvserve's handler decodes bodies itself
        "job_queue_size": "100",
        "model_store": f"{MOUNT}/{STORE_DIR}",
        "model_snapshot": json.dumps(snapshot(archives), separators=(",", ":")),
    }


def export_kserve(model_store: Path, dest: Path, *, force: bool = False) -> list:
    """Writes dest/config/config.properties and copies every .mar of `model_store` to
    dest/model-store/; returns the files written."""
    archives = sorted(Path(model_store).glob("*.mar"))
    if not archives:
        raise TvserveError(f"No archives in {model_store}. Run `tvserve prepare` or `tvserve archive ...`, "
                           "or pass --model-store DIR.")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()) and not force:
        raise TvserveError(f"{dest} is not empty: pass --force to overwrite it, or choose another folder.")
    (dest / CONFIG_PATH).parent.mkdir(parents=True, exist_ok=True)
    (dest / STORE_DIR).mkdir(exist_ok=True)
    written = [write_properties(dest / CONFIG_PATH, kserve_properties(archives))]
    for mar in archives:
        written.append(Path(shutil.copy2(mar, dest / STORE_DIR / mar.name)))
        log.info("copied %s", mar.name)
    return written
