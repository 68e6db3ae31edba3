"""What one request costs, stage by stage, in CPU milliseconds, on the book's Net (a digit scan) and
on resnet18 (random weights, a 0.5 MP JPEG), one /predictions request per batch:

- In-process, the worker's whole path with the handler's own code (tvserve/tools/inprocess.py)
  and TorchServe's own Python side: the frontend's message for the request is read from a socket
  by ts/protocol/otf_message_handler.py, ts/service.py runs the handler, the answer is encoded and
  sent back. Each stage is timed where it runs (process CPU time, exclusive of the stages inside
  it): message protocol, metrics emission (tvserve's and TorchServe's PredictionTime), the worker's
  log line, decode, preprocess, forward, encode, and the handler's own bookkeeping. The worker's log
  output goes to a pipe that a thread drains, as the frontend's reader does.
- Served, by a real TorchServe under a steady wrk load: the Java frontend's and the worker's CPU
  time per request (/proc/PID/stat), the log lines and bytes written per request, and the same
  with tvserve's metrics off (TVSERVE_METRICS=off) and with every log off (a log4j2 configuration
  that writes nothing, given by `vmargs`): the differences are what metrics and logging cost the
  frontend.

    python -m tvserve.tools.request_cost                 # both models, ~4 min; `make request-cost`
    python -m tvserve.tools.request_cost --models net --duration 5

Writes request_cost.md and request_cost.json to --out (default benchmarks/). Run it on a quiet
machine: the load average is recorded with each model's figures.
"""

import os

from handlers.budget import worker_defaults

os.environ.update(worker_defaults(os.environ))  # as in a worker (tvserve/ops/server.py), before torch is loaded

import argparse
import contextlib
import fcntl
import json
import logging
import socket
import struct
import time
import uuid
import zipfile
from collections import defaultdict
from pathlib import Path

import torch

from handlers.budget import cores_per_worker
from tvserve.ops import logs
from tvserve.ops.properties import DEVELOPMENT_CONFIG, free_ports_config, read_properties, write_properties
from tvserve.ops.server import Server
from tvserve.tools import bench
from tvserve.tools.loadgen import run_wrk, wrk_path

log = logging.getLogger(__name__)

MODELS = ("net", "resnet18")
LOG_FILES = ("ts_log", "model_log", "access_log")
SILENT_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration><Loggers><Root level="off"/></Loggers></Configuration>
"""
# The served variants: (name, extra properties, extra environment)
VARIANTS = {
    "shipped": ({}, {}),
    "metrics off": ({}, {"TVSERVE_METRICS": "off"}),
    "logs off": ({"tvserve_lean_logs": "false"}, {}),  # + vmargs naming SILENT_LOG4J2, set in serve_variant
}
CLK_TCK = os.sysconf("SC_CLK_TCK")
IDLE_SECONDS = 5.0  # after the load: what the server's processes burn with no request (timers, GC)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


# ---------------------------------------------------------------- in-process: the worker's path


class Stages:
    """CPU time (`clock`) charged to named stages, each exclusive of the stages that run inside it."""

    def __init__(self, clock=time.process_time):
        self.clock, self.totals, self.stack, self.mark = clock, defaultdict(float), [], 0.0
        self.calls = defaultdict(int)

    def clear(self):
        self.totals.clear()
        self.calls.clear()

    def per_call_overhead(self, n: int = 20000) -> float:
        """CPU s that timing one call adds to its own stage (two clock reads and the bookkeeping)."""
        probe = Stages(self.clock)
        nothing = probe.wrap("inner", lambda: None)
        with probe.stage("outer"):
            for _ in range(n):
                nothing()
        return probe.totals["inner"] / n

    def corrected(self) -> dict:
        """{stage: CPU s} less what timing its calls added."""
        overhead = self.per_call_overhead()
        return {name: max(total - self.calls[name] * overhead, 0.0) for name, total in self.totals.items()}

    @contextlib.contextmanager
    def stage(self, name: str):
        self.calls[name] += 1
        now = self.clock()
        if self.stack:
            self.totals[self.stack[-1]] += now - self.mark
        self.stack.append(name)
        self.mark = now
        try:
            yield
        finally:
            now = self.clock()
            self.totals[self.stack.pop()] += now - self.mark
            self.mark = now

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            with self.stage(name):
                return function(*args, **kwargs)
        return timed


class TimedLogging:
    """The `logging` module as ts/protocol/otf_message_handler.py calls it, its INFO lines charged to
    a stage (its per-batch "Backend received inference at" line)."""

    def __init__(self, stages: Stages, name: str):
        self.info = stages.wrap(name, logging.info)

    def __getattr__(self, name):
        return getattr(logging, name)


def frontend_message(body: bytes, host: str = "127.0.0.1:8080") -> bytes:
    """The frontend's inference message for one raw-body /predictions request, as wrk sends it
    (TorchServe's ModelRequestEncoder frame; ts/protocol/otf_message_handler.py reads it)."""
    def text(value) -> bytes:
        value = value if isinstance(value, bytes) else value.encode()
        return struct.pack("!i", len(value)) + value

    headers = {"Host": host, "Content-Type": "application/octet-stream", "Content-Length": str(len(body))}
    frame = b"I" + text(str(uuid.uuid4()))
    frame += b"".join(text(name) + text(value) for name, value in headers.items()) + struct.pack("!i", -1)
    frame += text("body") + text("application/octet-stream") + text(body) + struct.pack("!i", -1)
    return frame + struct.pack("!i", -1)


def drain(fd: int) -> None:
    """Reads what is waiting on non-blocking `fd` (the frontend's side of a pipe or socket)."""
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 1 << 20):
            pass


def worker_service(mar: Path, folder: Path):
    """(ts.service.Service, its handler): the archive unpacked into `folder` and initialised as a
    worker initialises it, with TorchServe's own metrics cache (ts/configs/metrics.yaml)."""
    import ts
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.service import Service

    from handlers.tvserve_handler import TvserveHandler

    with zipfile.ZipFile(mar) as archive:
        archive.extractall(folder)
    manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())
    cache = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    cache.initialize_cache()
    handler = TvserveHandler()
    service = Service(manifest["model"]["modelName"], str(folder), manifest, handler.handle, None, 1, metrics_cache=cache)
    handler.initialize(service.context)
    return service, handler


def in_process(mar: Path, folder: Path, image: bytes, seconds: float) -> dict:
    """{stage: CPU ms per request} of one request after another through the worker's path (see the
    module's docstring), `seconds` of them after a warm-up."""
    import ts.protocol.otf_message_handler as otf

    service, handler = worker_service(mar, folder)
    stages = Stages()
    # The worker's stdout, where its log and [METRICS] lines go, and its socket to the frontend: both
    # large enough for a request's bytes, read between requests, so that no other thread of this
    # process runs while the worker's stages are timed (process CPU time counts every thread).
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, F_SETPIPE_SZ, 1 << 20)
    os.set_blocking(read_fd, False)
    root = logging.getLogger()
    console = logging.StreamHandler(os.fdopen(write_fd, "w"))
    console.setFormatter(logging.Formatter("%(message)s"))  # ts/model_service_worker.py's
    saved = root.handlers[:], root.level
    root.handlers[:] = [console]
    root.setLevel(logging.INFO)

    # The stages, wrapped where the worker calls them (instance attributes shadow the class's).
    preprocessor, telemetry = handler.preprocessor, handler.telemetry
    handler.parse = stages.wrap("decode", handler.parse)
    preprocessor.decode_batch = stages.wrap("decode", preprocessor.decode_batch)
    preprocessor.transform = stages.wrap("preprocess", preprocessor.transform)
    handler.inference = stages.wrap("forward", handler.inference)
    for protocol in {handler.protocol}:
        protocol.encode = stages.wrap("encode", protocol.encode)
    for name in ("emit", "flush"):
        if hasattr(telemetry, name):
            setattr(telemetry, name, stages.wrap("metrics emission", getattr(telemetry, name)))
    service.context.metrics.add_time = stages.wrap("metrics emission", service.context.metrics.add_time)  # PredictionTime
    service._entry_point = stages.wrap("handler, the rest", handler.handle)
    otf_logging, otf.logging = otf.logging, TimedLogging(stages, "logging")

    worker, frontend = socket.socketpair()
    for sock in (worker, frontend):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    service.set_cl_socket(worker)
    message = frontend_message(image)
    frontend.setblocking(False)

    def one_request():
        frontend.sendall(message)  # the frontend's side: not timed
        with stages.stage("message protocol"):
            _, batch = otf.retrieve_msg(worker)
            worker.sendall(service.predict(batch))
        console.flush()
        drain(read_fd)
        drain(frontend.fileno())

    try:
        for _ in range(3):
            one_request()
        stages.clear()
        count, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end or count < 20:
            one_request()
            count += 1
    finally:
        otf.logging = otf_logging
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        worker.close()
        frontend.close()
        console.close()
    return {"requests": count, **{stage: 1000 * total / count for stage, total in stages.corrected().items()}}


# ---------------------------------------------------------------- served: TorchServe under load


def proc_cpu(pid) -> float:
    """CPU seconds (user + system, all threads) process `pid` has used (or one thread: "PID/task/TID")."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def compiler_cpu(pid: int) -> float:
    """CPU seconds the JVM `pid`'s JIT compiler threads (C1, C2) have used: a young server's frontend
    compiles its request path over its first minutes of load, and no longer pays that once warm."""
    seconds = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().startswith(("C1 Compiler", "C2 Compiler")):
                seconds += proc_cpu(f"{pid}/task/{task.name}")
        except OSError:  # a thread that ended
            continue
    return seconds


def cpu_seconds(pids: dict) -> dict:
    """{role: CPU seconds its processes have used} of server_processes' roles, and "frontend_jit":
    the part of the frontend's in its JIT compiler threads."""
    seconds = {role: sum(proc_cpu(pid) for pid in found) for role, found in pids.items()}
    seconds["frontend_jit"] = sum(compiler_cpu(pid) for pid in pids["frontend"])
    return seconds


def server_processes(session: int) -> dict:
    """{"frontend": [pid], "worker": [pids]} of the TorchServe whose launcher leads `session`."""
    found = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[3]) != session:
            continue
        if "org.pytorch.serve.ModelServer" in cmdline:
            found["frontend"].append(int(entry.name))
        elif "model_service_worker" in cmdline:
            found["worker"].append(int(entry.name))
    return dict(found)


def log_sizes(server: Server) -> dict:
    """{log: (lines, bytes)} written since the server started."""
    text = {name: server.log(name) for name in LOG_FILES}
    return {name: (value.count("\n"), len(value.encode())) for name, value in text.items()}


def serve_variant(variant: str, store: Path, model: str, body: Path, work: Path, *, concurrency: int,
                  duration: float, warmup: float) -> dict:
    """One served measurement: CPU ms per request of the frontend (and of its JIT compiler threads)
    and the worker(s), log lines and bytes per request, under `duration` s of wrk load at
    `concurrency` after `warmup` s of the same."""
    extra, env = VARIANTS[variant]
    workdir = work / "servers" / model / variant.replace(" ", "-")
    workdir.mkdir(parents=True, exist_ok=True)
    config = free_ports_config(DEVELOPMENT_CONFIG, workdir / "config.properties")
    properties = {**read_properties(config), **extra}
    if variant == "logs off":
        (workdir / "silent-log4j2.xml").write_text(SILENT_LOG4J2)
        properties["vmargs"] = f"-Dlog4j.configurationFile=file://{workdir / 'silent-log4j2.xml'}"
    write_properties(config, properties)
    with Server(model_store=store, config=config, workdir=workdir, env=env) as server:
        url = f"{server.inference_url}/predictions/{model}"
        run_wrk(url, body, concurrency=concurrency, duration=warmup)  # the JIT compiles the hot paths meanwhile
        pids = server_processes(server.process.pid)
        before_logs = log_sizes(server)
        before = cpu_seconds(pids)
        load = os.getloadavg()
        result = run_wrk(url, body, concurrency=concurrency, duration=duration)
        after = cpu_seconds(pids)
        time.sleep(1.0)  # the last lines reach the logs
        after_logs = log_sizes(server)
        idle_start = cpu_seconds(pids)
        time.sleep(IDLE_SECONDS)
        idle_end = cpu_seconds(pids)
    idle = {f"{role}_idle_ms_per_s": 1000 * (idle_end[role] - idle_start[role]) / IDLE_SECONDS for role in idle_end}
    requests = result["requests"]
    cpu = {f"{role}_ms": 1000 * (after[role] - before[role]) / requests for role in after}
    logged = {name: {"lines": (after_logs[name][0] - before_logs[name][0]) / requests,
                     "bytes": (after_logs[name][1] - before_logs[name][1]) / requests} for name in LOG_FILES}
    return {"variant": variant, "requests": requests, "errors": result["errors"], "rps": result["rps"],
            "p50_ms": result["p50_ms"], "load_average": [round(value, 2) for value in load], **cpu, **idle,
            "logs": logged}


# ---------------------------------------------------------------- the report


def prepare(model: str, work: Path) -> tuple:
    """(model store, image file) for `model`: the tvserve archive as `tvserve bench` builds it."""
    config = bench.BenchConfig(models=(model,), systems=("tvserve",), work=work)
    stores, _ = bench.build_archives(model, config)
    if model == bench.BOOK_MODEL:
        digits = bench.write_digits_folder(work / "calibration" / "digits")
        image = sorted(digits.glob("*/*.png"))[0]
    else:
        image = bench.make_images(work / "images", {"0.5MP": bench.IMAGE_SIZES["0.5MP"]})["0.5MP"][0]
    return stores["tvserve"], image, config.notes


def measure(model: str, work: Path, *, concurrency: int, duration: float, warmup: float, http: bool) -> dict:
    store, image, notes = prepare(model, work)
    os.environ["TVSERVE_THREADS"] = str(cores_per_worker(1))  # as a server sizes its one worker
    result = {"image": f"{image.name} ({image.stat().st_size} B)", "notes": notes,
              "load_average_in_process": [round(value, 2) for value in os.getloadavg()]}
    result["in_process"] = in_process(store / f"{model}.mar", work / "unpacked" / model / "cost",
                                      image.read_bytes(), seconds=duration)
    result["served"] = [serve_variant(variant, store, model, image, work, concurrency=concurrency, duration=duration,
                                      warmup=warmup) for variant in VARIANTS] if http else []
    return result


IN_PROCESS_ROWS = ("message protocol", "metrics emission", "logging", "decode", "preprocess", "forward", "encode",
                   "handler, the rest")


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def rows(report: dict) -> list:
    """[(stage, how it was measured, {model: CPU ms per request or None})] of the cost table."""
    models = report["models"]

    def served(model, variant):
        return next((row for row in models[model]["served"] if row["variant"] == variant), None)

    def diff(model, key, a, b):
        x, y = served(model, a), served(model, b)
        return x and y and x[key] - y[key]

    def path(model, variant):
        """The frontend's CPU a request less its JIT compiler's: what the request path itself cost
        (None for a report from before the compiler was counted)."""
        row = served(model, variant)
        if not row or row.get("frontend_jit_ms") is None:
            return None
        return row["frontend_ms"] - row["frontend_jit_ms"]

    def path_diff(model, a, b):
        x, y = path(model, a), path(model, b)
        return x and y and x - y

    def idle_share(model):
        row = served(model, "shipped")
        return row and row["frontend_idle_ms_per_s"] / row["rps"]

    table = [("frontend (Java), all", "java CPU / requests, wrk load",
              {m: (served(m, "shipped") or {}).get("frontend_ms") for m in models}),
             ("frontend: its JIT compiler", "java's C1/C2 compiler threads' CPU / requests, wrk load",
              {m: (served(m, "shipped") or {}).get("frontend_jit_ms") for m in models}),
             ("frontend: the request path", "java CPU less its compiler threads' / requests, wrk load",
              {m: path(m, "shipped") for m in models}),
             ("frontend: idle background", "java CPU with no load, per s / req/s", {m: idle_share(m) for m in models}),
             ("frontend: parsing tvserve's metrics", "the request path: shipped - TVSERVE_METRICS=off",
              {m: path_diff(m, "shipped", "metrics off") for m in models}),
             ("frontend: logging", "the request path: shipped - every log off",
              {m: path_diff(m, "shipped", "logs off") for m in models}),
             ("worker (Python), all", "worker CPU / requests, wrk load",
              {m: (served(m, "shipped") or {}).get("worker_ms") for m in models}),
             ("worker: tvserve's metrics", "worker CPU: shipped - TVSERVE_METRICS=off",
              {m: diff(m, "worker_ms", "shipped", "metrics off") for m in models})]
    how = {"message protocol": "in-process: otf_message_handler read + service + encode + send",
           "metrics emission": "in-process: Telemetry + TorchServe's PredictionTime",
           "logging": "in-process: the worker's INFO line per batch",
           "handler, the rest": "in-process: handle() less the stages above"}
    table += [(f"worker: {stage}", how.get(stage, "in-process: the handler's own code"),
               {m: models[m]["in_process"].get(stage, 0.0) for m in models}) for stage in IN_PROCESS_ROWS]
    table.append(("worker: in-process sum", "in-process: every stage above",
                  {m: sum(models[m]["in_process"].get(stage, 0.0) for stage in IN_PROCESS_ROWS) for m in models}))
    return table


def markdown(report: dict) -> str:
    m, models = report["machine"], list(report["models"])
    lines = [f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores; torch {m['torch']}. "
             f"Command: `{report['command']}`. CPU milliseconds per request (process CPU time, all threads), "
             f"in-process one request per batch; served rows under wrk at c={report['concurrency']} for "
             f"{report['duration_s']:.0f} s per variant, after {report.get('warmup_s', report['duration_s']):.0f} s "
             "of the same load on the fresh server.", ""]
    for model in models:
        result = report["models"][model]
        loads = ", ".join(f"{row['variant']} {row['load_average'][0]:.2f}" for row in result["served"])
        lines.append(f"- {model}: {result['image']}; load average (1 min) in-process "
                     f"{result['load_average_in_process'][0]:.2f}" + (f", served: {loads}" if loads else ""))
        lines += [f"  - note: {note}" for note in result["notes"]]
    lines += ["", "| stage | how | " + " | ".join(f"{model} ms" for model in models) + " |",
              "| --- | --- | " + " | ".join("---" for _ in models) + " |"]
    lines += [f"| {stage} | {how} | " + " | ".join(fmt(values[model]) for model in models) + " |"
              for stage, how, values in rows(report)]
    lines += ["", "Served, per variant: req/s, CPU ms per request of the frontend and the worker, and lines "
              "(bytes) written per request to each log.", "",
              "| model | variant | req/s | frontend ms | worker ms | ts_log | model_log | access_log | load avg |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model in models:
        for row in report["models"][model]["served"]:
            logged = " | ".join(f"{row['logs'][name]['lines']:.2f} ({row['logs'][name]['bytes']:.0f} B)"
                                for name in LOG_FILES)
            lines.append(f"| {model} | {row['variant']} | {row['rps']:.1f} | {fmt(row.get('frontend_ms'))} | "
                         f"{fmt(row.get('worker_ms'))} | {logged} | {row['load_average'][0]:.2f} |")
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="wrk connections for the served rows (1: every batch holds one request, as in-process)")
    parser.add_argument("--duration", type=float, default=10.0, help="s measured per variant and in-process")
    parser.add_argument("--warmup", type=float, default=30.0, help="s of the same load on each fresh server before "
                        "its served rows (the frontend's JIT compiles its request path meanwhile)")
    parser.add_argument("--work", type=Path, default=Path(".tvserve/request-cost"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--no-http", dest="http", action="store_false", help="in-process rows only")
    return parser


def main(args) -> dict:
    models = [model.strip() for model in args.models.split(",") if model.strip()]
    unknown = set(models) - set(MODELS)
    if unknown:
        raise SystemExit(f"Invalid model {', '.join(sorted(unknown))}. Only {', '.join(MODELS)} are supported.")
    if args.http:
        wrk_path()
    report = {"machine": bench.machine(), "command": "python -m tvserve.tools.request_cost " + " ".join(args.argv),
              "concurrency": args.concurrency, "duration_s": args.duration, "warmup_s": args.warmup, "models": {}}
    for model in models:
        log.info("%s: measuring", model)
        report["models"][model] = measure(model, args.work, concurrency=args.concurrency, duration=args.duration,
                                          warmup=args.warmup, http=args.http)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "request_cost.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (args.out / "request_cost.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    arguments = get_args_parser().parse_args()
    arguments.argv = sys.argv[1:]
    main(arguments)
