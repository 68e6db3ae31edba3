"""The `tvserve` command as a user runs it: a real subprocess, real files, real server."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import REPO, run_tvserve
from tvserve.ops.properties import PRODUCTION_CONFIG, free_ports_config, read_properties


def offline_env(torch_home):
    """An empty torch hub cache, and a proxy on a closed loopback port: downloads fail at once."""
    closed = "http://127.0.0.1:9"
    return {"TORCH_HOME": str(torch_home), "https_proxy": closed, "HTTPS_PROXY": closed,
            "http_proxy": closed, "HTTP_PROXY": closed, "no_proxy": "", "NO_PROXY": ""}


def test_archive_torchvision_offline_without_weights_names_the_file(tmp_path):
    result = run_tvserve("archive", "torchvision", "resnet18", "--export-path", tmp_path / "store",
                         env=offline_env(tmp_path / "torch_home"))
    assert result.returncode == 1
    assert "resnet18-f37072fd.pth" in result.stderr
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in result.stderr
    assert "--weights-file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "store" / "resnet18.mar").exists()


def test_archive_uses_torch_hub_cache_and_checks_hash_prefix(tmp_path, resnet18_weights):
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "resnet18-f37072fd.pth").write_bytes(resnet18_weights.read_bytes())
    result = run_tvserve("archive", "torchvision", "resnet18", "--export-path", tmp_path,
                         env=offline_env(tmp_path / "torch_home"))
    # random weights under the real file name: the sha256 prefix in the name does not match
    assert result.returncode == 1
    assert "corrupt or not the file its name claims" in result.stderr


def test_archive_refuses_to_overwrite_without_force(tmp_path, digits_run):
    checkpoint = digits_run / "checkpoint.pt"
    assert run_tvserve("archive", "checkpoint", checkpoint, "--export-path", tmp_path).returncode == 0
    again = run_tvserve("archive", "checkpoint", checkpoint, "--export-path", tmp_path)
    assert again.returncode == 1 and "--force" in again.stderr
    assert run_tvserve("archive", "checkpoint", checkpoint, "--export-path", tmp_path, "--force").returncode == 0


def test_random_init_is_recorded_and_described(tmp_path):
    result = run_tvserve("archive", "torchvision", "squeezenet1_1", "--random-init", "--export-path", tmp_path)
    assert result.returncode == 0, result.stderr
    described = run_tvserve("describe", tmp_path / "squeezenet1_1.mar")
    meta = json.loads(described.stdout)
    assert meta["weights"]["random_init"] is True and meta["weights"]["origin"] == "random-init"
    assert meta["versions"]["torch"] and meta["versions"]["torchvision"]
    assert len(meta["weights"]["sha256"]) == 64


def broken_copy(mar: Path, dest: Path, edit) -> Path:
    """A copy of archive `mar` whose tvserve.json is changed by `edit(meta)`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(mar) as source, zipfile.ZipFile(dest, "w") as out:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "tvserve.json":
                meta = json.loads(data)
                edit(meta)
                data = json.dumps(meta)
            out.writestr(item, data)
    return dest


def missing_class(meta: dict) -> None:
    """Names a class the model file lacks; eager, so the worker builds the class (an exported
    backend would not need it)."""
    meta["model"]["class"] = "NoSuchNet"
    meta["backend"] = {"name": "eager"}


def newer_format(meta: dict) -> None:
    """A record written by a future tvserve."""
    meta["format"] = 99


def tampered(meta: dict) -> None:
    """Records other hashes than the files': the weights' and, if any, the exported model's."""
    for entry in (meta["weights"], meta.get("backend", {})):
        if "sha256" in entry:
            entry["sha256"] = "0" * 64


@pytest.mark.parametrize("case", ["missing_class", "tampered_weights", "newer_format"])
def test_serve_exits_nonzero_with_the_workers_error(tmp_path, model_store, case):
    edits = {
        "missing_class": (missing_class, "models.py defines no class 'NoSuchNet'"),
        "tampered_weights": (tampered, "Tampered archive"),
        "newer_format": (newer_format, "record is format 99; this tvserve reads formats up to"),
    }
    edit, expected = edits[case]
    store = tmp_path / "store"
    broken_copy(model_store / "digits_net.mar", store / "digits_net.mar", edit)
    config = free_ports_config(REPO / "config.properties", tmp_path / "config.properties")
    result = run_tvserve("serve", "--model-store", store, "--config", config, "--workdir", tmp_path / "w",
                         "--timeout", 120)
    assert result.returncode == 1
    assert "digits_net" in result.stderr and "server stopped" in result.stderr
    assert expected in result.stderr
    assert not (tmp_path / "w" / "server.json").exists()


def test_describe_refuses_a_newer_record_format_in_one_line(tmp_path, model_store):
    mar = broken_copy(model_store / "digits_net.mar", tmp_path / "future.mar", newer_format)
    result = run_tvserve("describe", mar)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "format 99" in result.stderr and "Upgrade tvserve" in result.stderr


def installed_tvserve(*args, cwd, timeout=600):
    """The installed `tvserve` command run from `cwd` (not the checkout), as a user runs it."""
    command = [str(Path(sys.executable).with_name("tvserve")), *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_serve_from_another_folder_never_prints_a_key_and_stops_its_own_server(tmp_path, model_store):
    """`tvserve serve --production` run outside the checkout: the configuration ships with the
    package, the current folder's model_store/ is served, the ready message says where the key is
    (never the key), and `tvserve stop` stops it."""
    (tmp_path / "model_store").mkdir()
    shutil.copy(model_store / "digits_net.mar", tmp_path / "model_store")
    config = free_ports_config(PRODUCTION_CONFIG, tmp_path / "production.properties")
    started = installed_tvserve("serve", "--production", "--config", config, "--detach", cwd=tmp_path)
    try:
        assert started.returncode == 0, started.stderr
        key_file = tmp_path / ".tvserve" / "key_file.json"
        keys = json.loads(key_file.read_text())
        printed = started.stdout + started.stderr
        assert "Ready: digits_net" in printed and str(key_file) in printed
        console = read_properties(config)["tvserve_console_address"]  # its own address (docs/operating.md, "The console")
        assert f"console:    {console}/console/" in printed
        assert all(keys[api]["key"] not in printed for api in ("inference", "management"))
        assert installed_tvserve("health", cwd=tmp_path).returncode == 0
    finally:
        stopped = installed_tvserve("stop", cwd=tmp_path)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    assert not (tmp_path / ".tvserve" / "server.json").exists()


def test_stop_leaves_alone_a_process_that_took_over_the_recorded_pid(tmp_path):
    """A server.json whose PID now belongs to another program (PIDs are reused): nothing is signalled."""
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (tmp_path / "server.json").write_text(json.dumps({
            "pid": bystander.pid, "started": 0.0, "owner": None,
            "inference": "http://127.0.0.1:9", "management": "http://127.0.0.1:9"}))
        result = run_tvserve("stop", "--workdir", tmp_path)
        assert result.returncode == 1 and "No running server recorded" in result.stderr
        assert bystander.poll() is None  # still running
        assert not (tmp_path / "server.json").exists()  # the stale record is gone
    finally:
        bystander.kill()
        bystander.wait()
