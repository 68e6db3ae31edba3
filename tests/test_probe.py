"""The probe endpoint `tvserve serve` runs beside TorchServe (tvserve/ops/probe.py): /ready is
true readiness (every model's workers READY) and turns 503 when the server is stopping; /live
and /metrics; nothing else."""

import re
from types import SimpleNamespace

import pytest
import requests

from tvserve.ops import probe
from tvserve.ops.properties import free_port


@pytest.fixture
def probe_of():
    """Starts a Probe for a server (real or stub); closes them all at the end."""
    started = []

    def start(server):
        started.append(probe.Probe(server, f"http://127.0.0.1:{free_port()}").start())
        return started[-1], started[-1].address

    yield start
    for item in started:
        item.close()


def test_ready_live_and_metrics_of_a_ready_server(server, probe_of):
    item, url = probe_of(server)
    ready = requests.get(url + probe.READY_PATH, timeout=10)
    assert ready.status_code == 200 and "digits_net 1/1" in ready.text
    assert requests.get(url + probe.LIVE_PATH, timeout=10).status_code == 200
    metrics = requests.get(url + probe.METRICS_PATH, timeout=10).text
    assert f"{probe.READY_METRIC} 1" in metrics
    assert re.search(rf"^{probe.INFLIGHT_METRIC} \d+$", metrics, re.MULTILINE)
    assert requests.get(url + "/ping", timeout=10).status_code == 404
    item.stopping()  # SIGTERM: balancers must stop routing before the drain
    stopping = requests.get(url + probe.READY_PATH, timeout=10)
    assert stopping.status_code == 503 and "stopping" in stopping.text
    assert f"{probe.READY_METRIC} 0" in requests.get(url + probe.METRICS_PATH, timeout=10).text


def test_not_ready_and_not_live_when_the_management_api_does_not_answer(tmp_path, probe_of):
    stub = SimpleNamespace(process=SimpleNamespace(poll=lambda: None), keys=dict, busy_dir=tmp_path,
                           management_url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    _, url = probe_of(stub)
    ready = requests.get(url + probe.READY_PATH, timeout=30)
    assert ready.status_code == 503 and "does not answer" in ready.text
    assert requests.get(url + probe.LIVE_PATH, timeout=30).status_code == 503


def test_an_address_without_a_port_is_refused_in_one_line():
    with pytest.raises(ValueError, match="expected http://HOST:PORT"):
        probe.host_port("http://0.0.0.0")
