"""`tvserve export kserve DIR`: the layout KServe's TorchServe runtime reads, served by TorchServe
started the way that runtime starts it (its model_snapshot, no --models)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from helpers import run_tvserve
from tvserve.ops import kserve
from tvserve.ops.properties import free_ports_config, read_properties, write_properties
from tvserve.ops.stopping import stop_group


def test_export_writes_config_and_model_store(model_store, tmp_path):
    dest = tmp_path / "kserve"
    result = run_tvserve("export", "kserve", dest, "--model-store", model_store)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (dest / kserve.STORE_DIR).iterdir()) == sorted(p.name for p in model_store.glob("*.mar"))
    properties = read_properties(dest / kserve.CONFIG_PATH)
    assert properties["model_store"] == f"{kserve.MOUNT}/{kserve.STORE_DIR}"
    snapshot = json.loads(properties["model_snapshot"])
    assert snapshot["modelCount"] == len(list(model_store.glob("*.mar")))
    assert snapshot["models"]["digits_batched"]["1.0"] == {
        "marName": "digits_batched.mar", "minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 200,
        "responseTimeout": 120, "defaultVersion": True}
    again = run_tvserve("export", "kserve", dest, "--model-store", model_store)
    assert again.returncode == 1 and "--force" in again.stderr


def test_exported_layout_serves_as_the_kserve_runtime_starts_it(model_store, tmp_path, digit_files):
    store = tmp_path / "store"
    store.mkdir()
    (store / "digits_net.mar").write_bytes((model_store / "digits_net.mar").read_bytes())
    dest = tmp_path / "kserve"
    kserve.export_kserve(store, dest)
    config = free_ports_config(dest / kserve.CONFIG_PATH, tmp_path / "config.properties")  # /mnt/models is here
    write_properties(config, {**read_properties(config), "model_store": str(dest / kserve.STORE_DIR)})
    properties = read_properties(config)
    work = tmp_path / "work"
    work.mkdir()
    command = [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground",
               f"--model-store={dest / kserve.STORE_DIR}", f"--ts-config={config}"]
    with open(work / "console.log", "wb") as console:
        process = subprocess.Popen(command, cwd=work, stdout=console, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "LOG_LOCATION": str(work), "METRICS_LOCATION": str(work)})
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                workers = requests.get(f"{properties['management_address']}/models/digits_net", timeout=5).json()[0]["workers"]
                if workers and all(w["status"] == "READY" for w in workers):
                    break
            except (requests.RequestException, ValueError, KeyError, IndexError):
                pass
            assert process.poll() is None and time.monotonic() < deadline, (work / "console.log").read_text()[-3000:]
            time.sleep(0.5)
        path, label = digit_files[0]
        answer = requests.post(f"{properties['inference_address']}/predictions/digits_net", data=path.read_bytes(), timeout=30)
        assert answer.status_code == 200 and answer.json()[0]["label"] == str(label)
    finally:
        stop_group(process.pid, management_url=properties["management_address"], token=None, busy_dir=work / "none",
                   timeout=30, drain_timeout=5)
        process.wait(30)
