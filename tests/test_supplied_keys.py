"""API keys supplied as files (TVSERVE_KEYS_DIR, as Kubernetes mounts a Secret) on a real
TorchServe with the production configuration: the supplied keys are the ones accepted, every
server given the same folder accepts the same keys, the local tools read them, and a bad key
stops the start instead of leaving TorchServe's random one (tvserve/ops/plugin/SuppliedKeys.java)."""

import json
import secrets
import shutil
from pathlib import Path

import pytest
import requests

from helpers import REPO, run_tvserve, wait_until
from test_safety import make_server
from tvserve.ops import client, logs
from tvserve.ops.properties import free_ports_config, read_properties

PRODUCTION = REPO / "config.production.properties"
KEYS_ENV = "TVSERVE_KEYS_DIR"


def write_keys(folder: Path, **keys) -> Path:
    """A folder as Kubernetes mounts a Secret: one file per key, here with a trailing newline (echo's)."""
    folder.mkdir(parents=True, exist_ok=True)
    for api, key in keys.items():
        (folder / api).write_text(f"{key}\n")
    return folder


def local(url: str) -> str:
    return url.replace("0.0.0.0", "127.0.0.1")


@pytest.fixture(scope="module")
def supplied_keys():
    return {"inference": "inf-" + secrets.token_hex(12), "management": "mgt-" + secrets.token_hex(12)}


@pytest.fixture(scope="module")
def keys_dir(work, supplied_keys):
    return write_keys(work / "supplied" / "secret", **supplied_keys)


@pytest.fixture(scope="module")
def digits_store(work, model_store):
    store = work / "supplied" / "model_store"
    store.mkdir(parents=True)
    shutil.copy(model_store / "digits_net.mar", store)
    return store


@pytest.fixture(scope="module")
def supplied(work, digits_store, keys_dir):
    """A production server given the keys folder."""
    with make_server(work / "supplied" / "first", digits_store, PRODUCTION, env={KEYS_ENV: str(keys_dir)}) as server:
        yield server


def test_the_supplied_inference_key_is_the_one_accepted(supplied, supplied_keys, digit_files):
    image, label = digit_files[0][0].read_bytes(), digit_files[0][1]
    url = f"{local(supplied.inference_url)}/predictions/digits_net"
    assert requests.post(url, data=image, timeout=30).status_code in (400, 401)
    wrong = client.bearer(supplied_keys["inference"][:-1] + "x")
    assert requests.post(url, data=image, headers=wrong, timeout=30).status_code in (400, 401)
    management_key = client.bearer(supplied_keys["management"])  # each API has its own key
    assert requests.post(url, data=image, headers=management_key, timeout=30).status_code in (400, 401)
    answered = requests.post(url, data=image, headers=client.bearer(supplied_keys["inference"]), timeout=30)
    assert answered.status_code == 200 and answered.json()[0]["label"] == str(label)


def test_the_supplied_management_key_opens_the_management_api(supplied, supplied_keys):
    url = f"{supplied.management_url}/models"
    assert requests.get(url, timeout=30).status_code in (400, 401)
    assert requests.get(url, headers=client.bearer(supplied_keys["inference"]), timeout=30).status_code in (400, 401)
    listing = requests.get(url, headers=client.bearer(supplied_keys["management"]), timeout=30)
    assert listing.status_code == 200 and listing.json()["models"][0]["modelName"] == "digits_net"


def test_the_key_file_holds_the_supplied_keys_privately(supplied, supplied_keys, keys_dir):
    key_file = supplied.workdir / client.KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert client.read_keys(supplied.workdir) == supplied_keys  # the trailing newlines stripped
    assert client.key_sources(supplied.workdir) == {api: str(keys_dir / api) for api in supplied_keys}
    entries = json.loads(key_file.read_text())
    assert {entries[api]["expiration time"] for api in supplied_keys} == {"never"}
    assert "key" not in entries["API"] and entries["API"]["status"].startswith("off: the keys are supplied")
    assert not list(supplied.workdir.glob(".key_file*"))  # no staging file left behind
    secret = supplied_keys["inference"]
    assert all(secret not in logs.read_file(path) for path in supplied.log_dir.glob("*.log*"))  # rolled ones too


def test_the_token_api_cannot_replace_a_supplied_key(supplied, supplied_keys, digit_files):
    """TorchServe's /token would give this one replica a new random key; with keys supplied its own key
    is kept nowhere, so no key a client holds opens it, and the supplied keys stay the ones accepted."""
    url = f"{local(supplied.management_url)}/token"
    for token in (None, supplied_keys["management"], supplied_keys["inference"]):
        answer = requests.get(url, params={"type": "inference"}, headers=client.bearer(token), timeout=30)
        assert answer.status_code in (400, 401), answer.text
    assert client.read_keys(supplied.workdir) == supplied_keys
    answered = requests.post(f"{local(supplied.inference_url)}/predictions/digits_net", data=digit_files[0][0].read_bytes(),
                             headers=client.bearer(supplied_keys["inference"]), timeout=30)
    assert answered.status_code == 200


def test_a_second_server_on_the_same_folder_accepts_the_same_keys_and_the_tools_read_them(
        supplied, tmp_path, digits_store, keys_dir, supplied_keys, digit_files):
    """Replicas share the Secret: a second server (the CLI, as the container runs it) takes the same
    keys; `tvserve serve` says where they came from and never prints them; health and predict work."""
    config = free_ports_config(PRODUCTION, tmp_path / "production.properties")
    workdir = tmp_path / "second"
    started = run_tvserve("serve", "--production", "--config", config, "--model-store", digits_store,
                          "--workdir", workdir, "--detach", env={KEYS_ENV: str(keys_dir)})
    try:
        assert started.returncode == 0, started.stderr
        printed = started.stdout + started.stderr
        assert f"inference key: {keys_dir / 'inference'}" in printed
        assert f"management key: {keys_dir / 'management'}" in printed
        assert all(key not in printed for key in supplied_keys.values())
        url = local(read_properties(config)["inference_address"])
        image, label = digit_files[1][0].read_bytes(), digit_files[1][1]
        answer = client.predict("digits_net", image, url=url, token=supplied_keys["inference"])
        assert answer[0]["label"] == str(label)
        assert run_tvserve("health", "--workdir", workdir).returncode == 0
        predicted = run_tvserve("predict", "digits_net", digit_files[1][0], "--url", url, "--workdir", workdir)
        assert predicted.returncode == 0 and str(label) in predicted.stdout, predicted.stderr
    finally:
        stopped = run_tvserve("stop", "--workdir", workdir)
    assert stopped.returncode == 0, stopped.stderr


def start_and_fail(folder: Path, keys_dir: Path, **overrides) -> str:
    """Starts a production server (no models: the keys are installed before any) and returns what
    it printed; fails unless its frontend stopped by itself."""
    server = make_server(folder, folder / "model_store", PRODUCTION, env={KEYS_ENV: str(keys_dir)}, **overrides)
    server.model_store.mkdir(parents=True, exist_ok=True)
    server.start()
    try:
        server.process.wait(timeout=120)  # a hung frontend is a failure far beyond any machine's start
    finally:
        server.stop()
    return server.console_tail(lines=200)


BAD_KEYS = {  # name: (files in the folder, what the refusal says)
    "short": ({"inference": "fifteen-chars15"}, "has 15 characters, fewer than 16"),
    "empty": ({"inference": ""}, "is empty"),
    "blank": ({"management": "two words here, 24 chars"}, "holds blanks"),
    "none": ({"inference.txt": "a-key-under-another-name"}, "holds neither `inference` nor `management`"),
}


@pytest.mark.parametrize("case", sorted(BAD_KEYS))
def test_a_bad_key_stops_the_start_with_the_reason(tmp_path, case):
    files, reason = BAD_KEYS[case]
    keys_dir = write_keys(tmp_path / "secret", **files)
    printed = start_and_fail(tmp_path, keys_dir)
    assert "supplied API keys refused, the server stops" in printed and reason in printed, printed
    assert "supplied API keys refused" in printed.splitlines()[-1]  # the reason ends the output, no stack below it
    assert all(key not in printed for key in files.values() if key)


def test_keys_with_token_authorization_off_stop_the_start(tmp_path):
    keys_dir = write_keys(tmp_path / "secret", inference="a-perfectly-good-key-0123")
    printed = start_and_fail(tmp_path, keys_dir, disable_token_authorization="true")
    assert "token authorization is off" in printed, printed


def test_a_missing_keys_folder_stops_the_start(tmp_path):
    printed = start_and_fail(tmp_path, tmp_path / "not-mounted")
    assert "is not a folder" in printed, printed


def management_answers(server) -> bool:
    """Whether the management API answers 200 to the key in the server's key file."""
    try:
        token = server.keys().get("management")
        return bool(token) and requests.get(f"{server.management_url}/models", headers=client.bearer(token), timeout=5).ok
    except (requests.ConnectionError, ValueError):  # not listening yet, or the key file half written
        return False


def test_without_a_keys_folder_the_keys_are_torchserve_random_ones(tmp_path, monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)
    server = make_server(tmp_path, tmp_path / "model_store", PRODUCTION)
    server.model_store.mkdir()
    server.start()
    try:
        wait_until(lambda: management_answers(server), "the management API with TorchServe's key", timeout=120)
        assert client.key_sources(server.workdir) == {"inference": client.RANDOM_KEY, "management": client.RANDOM_KEY}
        assert all(len(key) < 16 for key in server.keys().values())  # TorchServe's: 6 random bytes in base64
        api_key = json.loads((server.workdir / client.KEY_FILE).read_text())["API"]["key"]
        before = server.keys()["inference"]
        renewed = requests.get(f"{local(server.management_url)}/token", params={"type": "inference"},
                               headers=client.bearer(api_key), timeout=30)
        assert renewed.status_code == 200 and server.keys()["inference"] != before  # TorchServe's token API as shipped
    finally:
        server.stop()
