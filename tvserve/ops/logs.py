"""TorchServe's logs: tvserve's logging configuration for its frontend, and reading what the
workers wrote (a model that does not come up is explained from its worker's log).

The log4j2 configuration is used when a config sets `tvserve_lean_logs=true`.

TorchServe's own configuration logs every request about a dozen times at DEBUG and INFO, each
line twice (its loggers add to the root logger's console and ts_log appenders): on 2 cores the
frontend spent about 6.5 ms of CPU per request of the book's Net, more than the model. This one
keeps the same files, each line once: every request in access_log.log, TorchServe's metrics in
ts_metrics.log and model_metrics.log, the workers' output in model_log.log, and TorchServe's
own messages from INFO up in ts_log.log, less the per-request ones of its batch aggregator and
jobs; warnings and errors also go to the console (console.log).

It also drops the INFO lines TorchServe writes for every batch that say nothing /metrics and the
access log do not (tvserve/tools/request_cost.py measures what they cost): the frontend's echo
of each `[METRICS]` line a worker prints ("result=..., pattern=[METRICS]", about 250 bytes each,
seven a request of the book's Net, the bulk of ts_log.log), its "Looping backend response at" and
"Backend response time" (ts_inference_latency_microseconds and the access log's time hold it),
and the worker's "Backend received inference at" in model_log.log. Each is matched on the
message's format before it is formatted (log4j2's RegexFilter with useRawMsg), so the lines
dropped cost no formatting or write; every other line of those loggers is kept.
"""

import gzip
import re
from dataclasses import dataclass
from pathlib import Path

ERROR_LINE = re.compile(r"\b\w*(Error|Exception)\b: .+")
WRAPPER_ERROR = re.compile(r"RuntimeError: \d{3} - ")  # TorchServe's re-raise of the real error

ROLLING_FILE = """
    <RollingFile name="{name}" fileName="${{env:{folder}:-logs}}/{name}.log"
                 filePattern="${{env:{folder}:-logs}}/{name}.%d{{dd-MMM}}.log.gz">
      <PatternLayout pattern="{pattern}"/>
      <Policies><SizeBasedTriggeringPolicy size="100 MB"/><TimeBasedTriggeringPolicy/></Policies>
      <DefaultRolloverStrategy max="5"/>
    </RollingFile>"""
PLAIN, DETAILED = "%d{ISO8601} - %m%n", "%d{ISO8601} [%-5p] %t %c - %m%n"
FILES = {"access_log": ("LOG_LOCATION", PLAIN), "model_log": ("LOG_LOCATION", DETAILED),
         "ts_log": ("LOG_LOCATION", DETAILED), "model_metrics": ("METRICS_LOCATION", PLAIN),
         "ts_metrics": ("METRICS_LOCATION", PLAIN)}
LOGGERS = [  # (logger, level, appender); none adds to the root logger's appenders
    ("ACCESS_LOG", "info", "access_log"), ("MODEL_LOG", "info", "model_log"),
    ("MODEL_METRICS", "info", "model_metrics"), ("TS_METRICS", "info", "ts_metrics"),
    ("org.pytorch.serve", "info", "ts_log"), ("org.pytorch.serve.wlm.BatchAggregator", "warn", "ts_log"),
    ("org.pytorch.serve.wlm.WorkerLifeCycle", "info", "ts_log"), ("org.pytorch.serve.wlm.WorkerThread", "info", "ts_log"),
    ("org.pytorch.serve.job", "warn", "ts_log"), ("io.netty", "error", "ts_log"),
    ("tvserve.plugin", "info", "ts_log"),  # the plugin's start-up lines: where the keys came from, the console's address
]
# The per-batch lines dropped (see above): {logger: regex matching the whole of a message's format}.
# The formats are TorchServe 0.12's (frontend WorkerLifeCycle.java, WorkerThread.java; the worker's
# ts/protocol/otf_message_handler.py).
DROPPED = {
    "org.pytorch.serve.wlm.WorkerLifeCycle": r"result=\{\}, pattern=\{\}",
    "org.pytorch.serve.wlm.WorkerThread": r"(Looping backend response at|Backend response time): \{\}",
    "MODEL_LOG": r"Backend received inference at: \d+",
}


def log4j2_xml() -> str:
    appenders = "".join(ROLLING_FILE.format(name=name, folder=folder, pattern=pattern)
                        for name, (folder, pattern) in FILES.items())
    loggers = "".join(f'\n    <Logger name="{name}" level="{level}" additivity="false">{dropped(name)}'
                      f'<AppenderRef ref="{ref}"/><AppenderRef ref="console" level="warn"/></Logger>'
                      for name, level, ref in LOGGERS)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <Console name="console" target="SYSTEM_OUT"><PatternLayout pattern="{DETAILED}"/></Console>{appenders}
  </Appenders>
  <Loggers>{loggers}
    <Logger name="org.apache" level="off"/>
    <Root level="warn"><AppenderRef ref="console"/><AppenderRef ref="ts_log"/></Root>
  </Loggers>
</Configuration>
"""


def dropped(logger: str) -> str:
    """The filter that drops `logger`'s lines of DROPPED, matched before formatting ("" for none)."""
    if logger not in DROPPED:
        return ""
    return f'<RegexFilter regex="{DROPPED[logger]}" useRawMsg="true" onMatch="DENY" onMismatch="NEUTRAL"/>'


def read_bytes(path: Path) -> bytes:
    """One log file, a rolled-over (gzipped) one included."""
    path = Path(path)
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def read_file(path: Path) -> str:
    return read_bytes(path).decode(errors="replace")


@dataclass(frozen=True)
class Mark:
    """Where a log stood when a server started: the current file's size and the parts already rolled
    over. A server that starts again in the same folder (a container restarted with its volumes) is
    judged on what it writes itself, not on an earlier run's dead workers."""
    offset: int = 0
    rolled: frozenset = frozenset()  # (name, mtime in ns) of each part rolled before the mark


def rolled_parts(folder: Path, name: str) -> list:
    """The gzipped parts log4j2 rolled `<name>.log` into (every midnight and at 100 MB, under both
    TorchServe's configuration and tvserve's), oldest first."""
    return sorted(folder.glob(f"{name}.*.log.gz"), key=lambda path: path.stat().st_mtime_ns)


def mark(log_dir: Path, name: str = "model_log") -> Mark:
    folder = Path(log_dir)
    current = folder / f"{name}.log"
    return Mark(current.stat().st_size if current.exists() else 0,
                frozenset((path.name, path.stat().st_mtime_ns) for path in rolled_parts(folder, name)))


def read(log_dir: Path, name: str = "model_log", since: Mark = Mark()) -> str:
    """One log from `since` on, rolled parts included: reading only `<name>.log` would lose what a
    server wrote before the last midnight. The parts rolled since the mark come first, then the
    current file; the first of them begins with what the current file held at the mark."""
    folder = Path(log_dir)
    rolled = [path for path in rolled_parts(folder, name) if (path.name, path.stat().st_mtime_ns) not in since.rolled]
    current = [folder / f"{name}.log"] if (folder / f"{name}.log").exists() else []
    return b"".join(read_bytes(path) for path in rolled + current)[since.offset:].decode(errors="replace")


def worker_lines(log_dir: Path, model: str, since: Mark = Mark()) -> list:
    """What `model`'s workers printed, from TorchServe's model log (messages only)."""
    return [line.split(" - ", 1)[-1] for line in read(log_dir, since=since).splitlines() if f"-{model}_" in line]


def failed_loads(log_dir: Path, model: str, since: Mark = Mark()) -> int:
    """How many of `model`'s workers have died since the mark."""
    return sum("Backend worker process died" in line for line in worker_lines(log_dir, model, since))


def worker_error(log_dir: Path, model: str, since: Mark = Mark()) -> str:
    """The last error a model's worker logged since the mark, with the lines that led to it."""
    mine = worker_lines(log_dir, model, since)
    errors = [i for i, line in enumerate(mine) if ERROR_LINE.search(line) and not WRAPPER_ERROR.search(line)]
    if not errors:
        return f"{model}: no worker error in the logs; see {log_dir}."
    last = errors[-1]
    context = "\n".join(f"    {line}" for line in mine[max(0, last - 8):last + 1])
    return f"{model}: worker error: {ERROR_LINE.search(mine[last]).group(0)}\n{context}"


def tail(path: Path, lines: int = 20) -> str:
    path = Path(path)
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
