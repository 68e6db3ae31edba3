"""Elastic threads (handlers/elastic.py): a worker's forward runs on all its threads while the cores
are free and on half of them while other workers' forwards hold the cores, as seen through real
lock files held by other processes; its answers do not change with the threads it ran on."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import requests
import torch

from handlers.elastic import ENV, Elastic, Siblings, TorchThreads, elastic, folder
from handlers.runtimes import export, load_runner
from handlers.tasks.classification import PARITY_TOLERANCE
from helpers import REPO, wait_until
from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_checkpoint
from tvserve.ops.properties import free_ports_config
from tvserve.ops.server import Server
from tvserve.tools.inprocess import load_handler, probabilities

WAIT_S = 120  # the most a background build or a worker's start may take: far above any machine's need

HOLDER = textwrap.dedent("""
    import sys
    from handlers.elastic import Siblings
    siblings = Siblings(sys.argv[1], int(sys.argv[2]))
    for line in sys.stdin:
        if line.strip() == "hold":
            lock = siblings.forward()
            lock.__enter__()
        elif line.strip() == "release":
            lock.__exit__(None, None, None)
        print(line.strip(), flush=True)
""")


class Holder:
    """Another process with a lock file in `where`, which takes and gives up its forward's lock
    when told (as a sibling worker's forward starts and ends)."""

    def __init__(self, where, threads: int):
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(where), str(threads)], cwd=REPO,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def tell(self, what: str) -> None:
        self.process.stdin.write(what + "\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == what  # done, in the other process

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture
def holder(tmp_path):
    started = Holder(tmp_path / "locks", 2)
    started.tell("ready")
    yield started
    started.kill()


def test_a_forward_of_another_process_counts_its_threads_while_it_holds_its_lock(tmp_path, holder):
    siblings = Siblings(tmp_path / "locks", 2)
    assert siblings.busy_threads() == 0  # its file is there, not held
    holder.tell("hold")
    assert siblings.busy_threads() == 2
    with siblings.forward():  # this process's own lock is never counted
        assert siblings.busy_threads() == 2
    holder.tell("release")
    assert siblings.busy_threads() == 0


def test_a_killed_worker_never_counts_and_its_file_goes_with_the_next_start(tmp_path, holder):
    holder.tell("hold")
    siblings = Siblings(tmp_path / "locks", 2)
    assert siblings.busy_threads() == 2
    holder.kill()  # killed inside its forward
    assert siblings.busy_threads() == 0
    assert len(list((tmp_path / "locks").glob("*.lock"))) == 2
    Siblings(tmp_path / "locks", 2)
    assert {path.name.split("-")[0] for path in (tmp_path / "locks").glob("*.lock")} == {str(os.getpid())}


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_forwards_narrow_while_a_sibling_holds_the_cores_with_the_same_answers(tmp_path, holder, runtime):
    """On 2 cores, a 2-thread worker beside a 2-thread sibling in its forward: the first overlapping
    forward runs wide while the 1-thread session is built, the next ones on it; alone, wide again."""
    torch.manual_seed(0)
    model = Model().eval()
    path = export(runtime, model, 32, tmp_path)
    wide = load_runner(runtime, path=path, threads=2)
    runner = Elastic(wide, lambda: load_runner(runtime, path=path, threads=1), 2, 2, Siblings(tmp_path / "locks", 2))
    batch = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        expected = model(batch)
    outputs = [runner(batch)]
    holder.tell("hold")
    outputs.append(runner(batch))
    runner.building.join(WAIT_S)
    outputs.append(runner(batch))
    holder.tell("release")
    outputs.append(runner(batch))
    assert runner.forwards == {2: 3, 1: 1}
    for output in outputs:
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-4)


def test_more_cores_than_both_forwards_need_never_narrow(tmp_path, holder):
    holder.tell("hold")
    runner = Elastic(lambda batch: batch, lambda: pytest.fail("built a narrow runner"), 2, 4,
                     Siblings(tmp_path / "locks", 2))
    runner(torch.zeros(1))
    assert runner.forwards == {2: 1} and runner.building is None


def test_torch_runtimes_narrow_torch_s_threads_around_the_forward_only():
    seen = []
    torch.set_num_threads(2)
    TorchThreads(lambda batch: seen.append(torch.get_num_threads()), 1, 2)(None)
    assert seen == [1] and torch.get_num_threads() == 2


def test_one_thread_or_turned_off_leaves_the_runner_as_it_is(tmp_path, monkeypatch):
    def runner(batch):
        return batch

    assert elastic(runner, None, 1, 2, tmp_path / "locks") is runner
    monkeypatch.setenv(ENV, "off")
    assert elastic(runner, None, 2, 2, tmp_path / "locks") is runner
    monkeypatch.delenv(ENV)
    assert isinstance(elastic(runner, None, 2, 2, tmp_path / "locks"), Elastic)


def test_a_served_worker_narrows_beside_a_sibling_s_forward_and_answers_the_same(tmp_path, digits_run, digit_files):
    """A real TorchServe worker of 2 threads on 2 cores (OpenVINO), while another process holds a
    2-thread forward's lock in the server's folder: it builds its 1-thread session and says so, and
    every answer, before and after, equals the in-process handler's."""
    store = tmp_path / "store"
    archive = archive_checkpoint(digits_run / "checkpoint.pt", options=ArchiveOptions(
        model_name="elastic_net", export_path=store, workers=1, batch_size=1, backend="openvino"))
    local = load_handler(archive, tmp_path / "unpacked", threads=1)
    config = free_ports_config(REPO / "config.properties", tmp_path / "config.properties")
    bodies = [path.read_bytes() for path, _ in digit_files[:4]]
    with Server(model_store=store, config=config, workdir=tmp_path / "server",
                env={"TVSERVE_CPUS": "2", "TVSERVE_THREADS": "2", ENV: "on"}) as server:
        served = []

        def predict(body):
            response = requests.post(f"{server.inference_url}/predictions/elastic_net", data=body, timeout=60)
            assert response.status_code == 200, response.text
            served.append((body, response.json()))

        predict(bodies[0])
        locks = tmp_path / "server" / "tmp" / folder().name
        sibling = Holder(locks, 2)
        try:
            sibling.tell("hold")
            wait_until(lambda: predict(bodies[1]) or "forwards that overlap them now run on 1" in server.log(),
                       "the worker's 1-thread session", timeout=WAIT_S, poll=0.2)
            for body in bodies:
                predict(body)
            sibling.tell("release")
            predict(bodies[2])
        finally:
            sibling.kill()
    for body, answer in served:
        alone = probabilities(local, body)
        for row in answer:
            assert abs(row["probability"] - alone[row["index"]].item()) <= PARITY_TOLERANCE


def test_the_overlap_tool_runs_two_workers_forwards_at_once_elastic_then_rigid(model_store):
    """tvserve/tools/overlap.py on the digits archive, two 2-thread workers on 2 cores: a line per
    mode with the workers' images/s; the rigid one ran every forward on 2 threads, the elastic one
    on 2 or 1 (which depends on how the forwards met, not asserted)."""
    done = subprocess.run([sys.executable, "-m", "tvserve.tools.overlap", str(model_store / "digits_net.mar"),
                           "--threads", "2", "--seconds", "0.5", "--rounds", "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TVSERVE_CPUS": "2"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["elastic", "rigid"]
    for line in lines:
        assert float(line.split()[1]) > 0
    elastic_counts, rigid = (json.loads(line.split("forwards by threads ")[1].split("  load")[0]) for line in lines)
    assert len(rigid) == 2 and all(set(counts) == {"2"} for counts in rigid)  # [{threads: forwards}] per worker
    assert len(elastic_counts) == 2 and all(counts and set(counts) <= {"1", "2"} for counts in elastic_counts)
