"""Several tvserve replicas on one machine behind HAProxy (Debian's `haproxy`), which health-checks
each replica's /ready (tvserve/ops/probe.py), as a Kubernetes Service's endpoints would.

Every replica is a real `tvserve serve` process (TorchServe frontend + workers) on its own
loopback ports. Under steady load from the project's client (with its retries), `run` shows:
- `kill -9` of one replica's Java frontend: the balancer takes it out, no request is lost, and it
  rejoins when restarted;
- a rolling update from model version 1.0 to 2.0, one replica at a time, each drained by SIGTERM:
  no request fails, and afterwards every answer comes from 2.0 (answers are told apart by their
  probabilities: the two versions are different trainings);
- throughput with 1, 2 and 3 replicas in the pool (wrk), and HAProxy's own CPU per request.

Token authorization is on, as in production, and every replica takes its API keys from one folder
(TVSERVE_KEYS_DIR, as a Kubernetes Secret mounted in every pod): every client sends the one
inference key, whichever replica answers, restarted or updated; one without it is refused.

Figures are returned and printed, never asserted on: `make cluster-test`, tests/test_cluster.py.
"""

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import psutil
import requests

from tvserve import TvserveError
from tvserve.ops import client
from tvserve.ops.probe import PROBE_PROPERTY, READY_PATH, UNREADY_PROPERTY
from tvserve.ops.client import bearer
from tvserve.ops.properties import DEVELOPMENT_CONFIG, free_port, free_ports_config, read_properties, write_properties

log = logging.getLogger(__name__)

MODEL = "digits_net"
CHECK_INTERVAL_MS = 500  # HAProxy asks /ready this often; 2 failures take a replica out, 2 successes bring it back
UNREADY_SECONDS = 2  # a stopping replica's 503 on /ready before it drains: > 2 check intervals
START_TIMEOUT = 240  # s for a replica's models to become READY (3 JVMs starting at once on 2 cores)


def haproxy_path() -> str:
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if not path:
        raise TvserveError("The multi-replica test needs HAProxy: `apt-get install haproxy` (Debian/Ubuntu).")
    return path


def write_keys(folder: Path) -> dict:
    """A folder holding an inference and a management key, as a Secret mounted at TVSERVE_KEYS_DIR
    holds them (tvserve/ops/plugin/SuppliedKeys.java); returns {api: key}."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = {api: secrets.token_urlsafe(24) for api in ("inference", "management")}
    for api, key in keys.items():
        (folder / api).write_text(key + "\n")
        (folder / api).chmod(0o600)
    return keys


class Replica:
    """One `tvserve serve` (its own ports, working directory and model store), token authorization
    on, its API keys from `keys_dir` (shared by every replica)."""

    def __init__(self, name: str, folder: Path, keys_dir: Path):
        self.name, self.folder, self.keys_dir = name, folder, keys_dir
        self.folder.mkdir(parents=True, exist_ok=True)
        config = free_ports_config(DEVELOPMENT_CONFIG, folder / "config.properties")
        properties = read_properties(config)
        properties.update({PROBE_PROPERTY: f"http://127.0.0.1:{free_port()}", UNREADY_PROPERTY: str(UNREADY_SECONDS),
                           "default_workers_per_model": "1", "tvserve_threads_per_worker": "1",
                           "disable_token_authorization": "false"})
        self.config = write_properties(config, properties)
        self.inference_port = int(properties["inference_address"].rsplit(":", 1)[1])
        self.probe_url = properties[PROBE_PROPERTY]
        self.process = None

    def start(self, model_store: Path) -> "Replica":
        log_file = open(self.folder / "serve.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tvserve.cli", "serve", "--config", str(self.config),
             "--workdir", str(self.folder / "work"), "--model-store", str(model_store)],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "TVSERVE_KEYS_DIR": str(self.keys_dir)})
        log_file.close()
        return self

    def ready(self) -> bool:
        try:
            return requests.get(self.probe_url + READY_PATH, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise TvserveError(f"replica {self.name} did not become ready:\n{self.log_tail()}")
            time.sleep(0.25)

    def frontend_pid(self) -> int:
        """The TorchServe Java frontend's PID (a descendant of `tvserve serve`)."""
        for child in psutil.Process(self.process.pid).children(recursive=True):
            if child.name() == "java":
                return child.pid
        raise TvserveError(f"replica {self.name}: no java process under pid {self.process.pid}")

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM, as Kubernetes sends it: /ready turns 503, then drain, then stop. Exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        kill_leftovers(self.folder)
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        path = self.folder / "serve.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def kill_leftovers(folder: Path) -> None:
    """Workers whose frontend was killed with -9 may outlive it: end those started for `folder`."""
    marker = str(folder) + os.sep  # LOG_LOCATION is FOLDER/work/logs (tvserve/ops/server.py)
    for process in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            environment = process.info["environ"] or {}
            if environment.get("LOG_LOCATION", "").startswith(marker):
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


class Balancer:
    """HAProxy in front of the replicas: round robin, health checks on each probe's /ready, and
    retries on another replica for a connection that fails or closes without an answer."""

    def __init__(self, folder: Path, replicas: list):
        self.folder, self.replicas = folder, replicas
        self.port = free_port()
        self.socket_path = folder / "haproxy.sock"
        self.config = folder / "haproxy.cfg"
        self.config.write_text(haproxy_config(self.port, self.socket_path, replicas))
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Balancer":
        check = subprocess.run([haproxy_path(), "-c", "-f", str(self.config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise TvserveError(f"HAProxy refuses {self.config}:\n{check.stdout}{check.stderr}")
        self.process = subprocess.Popen([haproxy_path(), "-db", "-f", str(self.config)],
                                        stdout=open(self.folder / "haproxy.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self.socket_path.exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise TvserveError(f"HAProxy did not start: {(self.folder / 'haproxy.log').read_text()}")
            time.sleep(0.1)
        return self

    def command(self, line: str) -> str:
        """One command on HAProxy's admin socket (`show stat`, `disable server tvserve/r1`, ...)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def status(self) -> dict:
        """{replica name: HAProxy's status, e.g. "UP", "DOWN", "UP 1/2", "MAINT"}."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "tvserve"
                and row["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_status(self, name: str, wanted: str, timeout: float) -> float:
        """Seconds until replica `name`'s status is `wanted` (UP or DOWN)."""
        started = time.monotonic()
        while self.status().get(name) != wanted:
            if time.monotonic() - started > timeout:
                raise TvserveError(f"HAProxy: {name} not {wanted} after {timeout:.0f} s: {self.status()}")
            time.sleep(0.05)
        return time.monotonic() - started

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def haproxy_config(port: int, socket_path: Path, replicas: list) -> str:
    """HAProxy's configuration: one loopback frontend, the replicas checked on their /ready."""
    servers = "\n".join(
        f"  server {r.name} 127.0.0.1:{r.inference_port} check port {r.probe_url.rsplit(':', 1)[1]}"
        for r in replicas)
    return f"""global
  maxconn 2000
  stats socket {socket_path} mode 600 level admin
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  timeout check 3s  # a readiness answer asks TorchServe's management API: slower on a busy machine
  # A prediction is idempotent: a request whose replica refused or dropped the connection
  # (kill -9) is sent again to another replica. A retry needs the whole body in the buffer.
  option http-buffer-request
  retries 3
  option redispatch 1
  retry-on conn-failure empty-response response-timeout
listen tvserve
  bind 127.0.0.1:{port}
  balance roundrobin
  option httpchk
  http-check send meth GET uri {READY_PATH}
  http-check expect status 200
  default-server inter {CHECK_INTERVAL_MS}ms fastinter {CHECK_INTERVAL_MS}ms downinter {CHECK_INTERVAL_MS}ms fall 2 rise 2
{servers}
"""


@dataclass
class Load:
    """Steady load through the balancer from `threads` clients (tvserve.ops.client.predict, with
    its retries), cycling over `images`; answers are sorted by version through `fingerprints`."""

    url: str
    images: list  # bytes
    fingerprints: dict  # {version: [answer for each image]}
    token: str = None  # the inference key
    threads: int = 4
    sent: int = 0
    answered: int = 0
    failed: list = field(default_factory=list)  # non-200 answers after retries
    lost: list = field(default_factory=list)  # no answer at all after retries
    answers: list = field(default_factory=list)  # (monotonic time, image index, answer)

    def __post_init__(self):
        self.stop_event, self.lock, self.workers = threading.Event(), threading.Lock(), []

    def start(self) -> "Load":
        self.workers = [threading.Thread(target=self.loop, args=(i,), daemon=True) for i in range(self.threads)]
        for worker in self.workers:
            worker.start()
        return self

    def loop(self, offset: int) -> None:
        session = requests.Session()
        for i in count(offset):
            if self.stop_event.is_set():
                return
            index = i % len(self.images)
            with self.lock:
                self.sent += 1
            try:
                answer = client.predict(MODEL, self.images[index], url=self.url, session=session, timeout=60,
                                        token=self.token)
            except TvserveError as err:
                with self.lock:
                    (self.lost if "No server answers" in str(err) else self.failed).append(str(err))
                continue
            with self.lock:
                self.answered += 1
                self.answers.append((time.monotonic(), index, answer))

    def stop(self) -> None:
        self.stop_event.set()
        for worker in self.workers:
            worker.join(120)

    def versions_since(self, since: float) -> dict:
        """{version (or "unknown"): answers since `since`}, by comparing each answer with the
        fingerprints known now."""
        counts = {}
        with self.lock:
            for at, index, answer in self.answers:
                if at >= since:
                    version = next((v for v, known in self.fingerprints.items() if known[index] == answer), "unknown")
                    counts[version] = counts.get(version, 0) + 1
        return counts

    def summary(self) -> dict:
        with self.lock:
            return {"sent": self.sent, "answered": self.answered, "failed": len(self.failed), "lost": len(self.lost),
                    "errors": (self.failed + self.lost)[:5]}


def fingerprints(replica: Replica, images: list, token: str) -> list:
    """The answer one replica gives to each image (straight to it, not through the balancer)."""
    url = f"http://127.0.0.1:{replica.inference_port}"
    return [client.predict(MODEL, image, url=url, token=token) for image in images]


def refusals(balancer: Balancer, image: bytes) -> dict:
    """The statuses of predictions sent through the balancer without a key and with a wrong one
    (TorchServe 0.12 answers 400 to the first, 401 to the second)."""
    url = f"{balancer.url}/predictions/{MODEL}"
    return {"without_key": requests.post(url, data=image, timeout=30).status_code,
            "wrong_key": requests.post(url, data=image, headers=bearer("not-the-key"), timeout=30).status_code}


def kill_and_rejoin(balancer: Balancer, replica: Replica, model_store: Path) -> dict:
    """kill -9 of the replica's Java frontend; seconds until HAProxy takes it out, then, restarted,
    until it is back in the pool."""
    pid = replica.frontend_pid()
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    out = balancer.wait_status(replica.name, "DOWN", 30)
    replica.process.wait(60)  # `tvserve serve` sees its server gone and exits 1 (a pod would restart)
    kill_leftovers(replica.folder)
    restarted = time.monotonic()
    replica.start(model_store)
    back = balancer.wait_status(replica.name, "UP", START_TIMEOUT)
    log.info("kill -9 %s (pid %d): out of the pool in %.2f s; restarted, back in %.1f s", replica.name, pid, out, back)
    return {"replica": replica.name, "out_of_pool_s": round(out, 2), "rejoined_after_restart_s": round(back, 1),
            "down_total_s": round(time.monotonic() - killed, 1), "restart_at_s": round(restarted - killed, 1)}


def rolling_update(balancer: Balancer, replicas: list, new_store: Path) -> dict:
    """One replica at a time: SIGTERM (503 on /ready, out of the pool, drain, stop), start it on the
    new model store, wait until the balancer has it UP again, then the next."""
    started = time.monotonic()
    steps = []
    for replica in replicas:
        step = time.monotonic()
        code = replica.stop()
        out = time.monotonic() - step
        replica.start(new_store)
        balancer.wait_status(replica.name, "UP", START_TIMEOUT)
        steps.append({"replica": replica.name, "exit_code": code, "stopped_s": round(out, 1),
                      "step_s": round(time.monotonic() - step, 1)})
        log.info("rolling update: %s stopped in %.1f s (exit %d), back UP after %.1f s", replica.name, out, code,
                 time.monotonic() - step)
    return {"duration_s": round(time.monotonic() - started, 1), "steps": steps}


def throughput(balancer: Balancer, replicas: list, body: Path, seconds: float, concurrency: int, token: str) -> list:
    """wrk through HAProxy with 1, 2 and 3 replicas enabled; HAProxy's CPU per request."""
    from tvserve.tools.loadgen import run_wrk

    rows = []
    for active in range(1, len(replicas) + 1):
        for i, replica in enumerate(replicas):
            balancer.command(f"{'enable' if i < active else 'disable'} server tvserve/{replica.name}")
        time.sleep(1)
        cpu = balancer.cpu_seconds()
        result = run_wrk(f"{balancer.url}/predictions/{MODEL}", body, concurrency=concurrency, duration=seconds,
                         headers=bearer(token))
        used = balancer.cpu_seconds() - cpu
        rows.append({"replicas": active, "rps": round(result["rps"], 1), "p50_ms": result["p50_ms"],
                     "p99_ms": result["p99_ms"], "errors": result["errors"], "requests": result["requests"],
                     "haproxy_cpu_ms_per_request": round(1000 * used / max(result["requests"], 1), 3)})
    for replica in replicas:
        balancer.command(f"enable server tvserve/{replica.name}")
    return rows


@dataclass
class ClusterConfig:
    v1_store: Path  # digits_net 1.0
    v2_store: Path  # digits_net 2.0 (another training: different answers)
    images: list  # image files
    work: Path
    replicas: int = 3
    load_threads: int = 4
    steady_seconds: float = 5  # load before and after each phase
    wrk_seconds: float = 5
    wrk_concurrency: int = 8


def run(config: ClusterConfig) -> dict:
    """The whole scenario; returns its figures. Replicas and HAProxy are stopped at the end."""
    images = [Path(p).read_bytes() for p in config.images]
    keys = write_keys(config.work / "keys")  # one Secret for every replica
    replicas = [Replica(f"r{i + 1}", config.work / f"r{i + 1}", config.work / "keys") for i in range(config.replicas)]
    balancer, load = Balancer(config.work, replicas), None
    try:
        for replica in replicas:
            replica.start(config.v1_store)
        started = time.monotonic()
        for replica in replicas:
            replica.wait_ready()
        report = {"replicas_ready_s": round(time.monotonic() - started, 1)}
        balancer.start()
        for replica in replicas:
            balancer.wait_status(replica.name, "UP", 30)
        prints = {"1.0": fingerprints(replicas[0], images, keys["inference"])}
        report["refused"] = refusals(balancer, images[0])
        load = Load(balancer.url, images, prints, token=keys["inference"], threads=config.load_threads).start()
        time.sleep(config.steady_seconds)
        report["kill"] = kill_and_rejoin(balancer, replicas[0], config.v1_store)
        time.sleep(config.steady_seconds)
        report["after_kill"] = load.summary()
        report["rolling_update"] = rolling_update(balancer, replicas, config.v2_store)
        prints["2.0"] = fingerprints(replicas[0], images, keys["inference"])
        finished = time.monotonic()
        time.sleep(config.steady_seconds)
        load.stop()
        report["load"] = load.summary()
        report["versions_after_update"] = load.versions_since(finished)
        report["versions_all"] = load.versions_since(0)
        report["throughput"] = throughput(balancer, replicas, Path(config.images[0]), config.wrk_seconds,
                                          config.wrk_concurrency, keys["inference"])
        report["cores"] = os.cpu_count()
        return report
    finally:
        if load is not None:
            load.stop()
        balancer.stop()
        for replica in replicas:
            if replica.process is not None:
                replica.stop()


def format_report(report: dict) -> str:
    """The figures, in a few lines."""
    load, kill, update = report["load"], report["kill"], report["rolling_update"]
    lines = [
        f"replicas ready in {report['replicas_ready_s']} s ({report['cores']} cores)",
        f"requests: {load['sent']} sent, {load['answered']} answered, {load['failed']} failed, {load['lost']} lost "
        f"(all with the one inference key from the shared keys folder; without a key: "
        f"{report['refused']['without_key']}, with a wrong one: {report['refused']['wrong_key']})",
        f"kill -9 of {kill['replica']}'s frontend: out of the pool in {kill['out_of_pool_s']} s; restarted, "
        f"back in the pool {kill['rejoined_after_restart_s']} s after the restart",
        f"rolling update 1.0 -> 2.0: {update['duration_s']} s for {len(update['steps'])} replicas "
        "(" + ", ".join(f"{step['replica']} {step['step_s']} s" for step in update["steps"]) + ")",
        f"answers after the update: {report['versions_after_update']}; over the whole run: {report['versions_all']}",
    ]
    lines += [f"throughput, {row['replicas']} replica(s): {row['rps']} req/s, p50 {row['p50_ms']:.1f} ms, "
              f"p99 {row['p99_ms']:.1f} ms, {row['errors']} errors; HAProxy "
              f"{row['haproxy_cpu_ms_per_request']} ms CPU per request" for row in report["throughput"]]
    return "\n".join(lines)


def check(report: dict) -> list:
    """What must hold (never a timing): every request answered, 2.0 alone after the update."""
    problems = []
    load = report["load"]
    if load["failed"] or load["lost"]:
        problems.append(f"{load['failed']} failed and {load['lost']} lost requests: {load['errors']}")
    after = report["versions_after_update"]
    if set(after) != {"2.0"}:
        problems.append(f"answers after the rolling update are not all from 2.0: {after}")
    if "unknown" in report["versions_all"]:
        problems.append(f"answers that match neither version: {report['versions_all']}")
    if any(step["exit_code"] != 0 for step in report["rolling_update"]["steps"]):
        problems.append(f"a replica did not stop cleanly: {report['rolling_update']['steps']}")
    if set(report["refused"].values()) - {400, 401}:
        problems.append(f"predictions without the key or with a wrong one were not refused: {report['refused']}")
    if any(row["errors"] for row in report["throughput"]):
        problems.append(f"wrk saw errors: {report['throughput']}")
    return problems


def build_stores(work: Path, epochs: int = 3) -> tuple:
    """Two model stores: digits_net 1.0 and 2.0 from two short trainings (seeds 0 and 1), one
    worker each with one thread, eager; and a few held-out digits as PNG files."""
    import torchvision.transforms.functional as TF

    from training.data import load_dataset
    from training.train import get_args_parser, main as train_main
    from tvserve.archiving.options import ArchiveOptions
    from tvserve.archiving.sources import archive_checkpoint

    stores = []
    for seed, version in ((0, "1.0"), (1, "2.0")):
        run_dir = work / f"run-{version}"
        train_main(get_args_parser().parse_args(["--model", "Net", "--dataset", "digits", "--epochs", str(epochs),
                                                 "--seed", str(seed), "--out", str(run_dir), "--quiet"]))
        store = work / f"store-{version}"
        archive_checkpoint(run_dir / "checkpoint.pt", options=ArchiveOptions(
            model_name=MODEL, version=version, export_path=store, workers=1, batch_size=1, threads=1,
            backend="eager", force=True))
        stores.append(store)
    split = load_dataset("digits")
    images = []
    for i in range(4):
        path = work / f"digit_{i}.png"
        TF.to_pil_image(split.val_images[i]).save(path)
        images.append(path)
    return stores[0], stores[1], images


def main(argv=None) -> int:
    """`python -m tvserve.tools.cluster [--short]`: the scenario, its figures, exit 1 on a problem."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="CI: short load phases")
    parser.add_argument("--work", type=Path, help="default: a temporary folder, removed afterwards")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = args.work or Path(tempfile.mkdtemp(prefix="tvserve-cluster-"))
    v1, v2, images = build_stores(work)
    seconds = 3 if args.short else 20
    report = run(ClusterConfig(v1, v2, images, work / "cluster", steady_seconds=seconds, wrk_seconds=seconds))
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    problems = check(report)
    print("cluster test: " + ("; ".join(problems) if problems else "passed"))
    if not args.work and not problems:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
