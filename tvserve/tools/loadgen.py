"""HTTP load with wrk (Debian's `wrk`, a native closed-loop load generator): POSTs one image file
from `concurrency` connections for a while and reports requests/s, latency percentiles, errors,
and the CPU wrk itself used, so a run can show the load generator was not the bottleneck."""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tvserve import TvserveError

# wrk's Lua: the body is the file named by TVSERVE_BODY; done() prints one JSON line.
WRK_SCRIPT = r'''
local file = assert(io.open(os.getenv("TVSERVE_BODY"), "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/octet-stream"
local authorization = os.getenv("TVSERVE_AUTHORIZATION")
if authorization then wrk.headers["Authorization"] = authorization end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'TVSERVE_RESULT {"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
'''


def wrk_path() -> str:
    path = shutil.which("wrk")
    if not path:
        raise TvserveError("The benchmark needs wrk, a native HTTP load generator: `apt-get install wrk` (Debian/Ubuntu).")
    return path


def run_wrk(url: str, body: Path, *, concurrency: int, duration: float, timeout_s: int = 60, headers: dict = None) -> dict:
    """One wrk run; returns {"rps", "p50_ms", "p90_ms", "p99_ms", "max_ms", "requests", "errors",
    "loadgen_cpu_pct", "machine_busy_pct"} (CPU: wrk's user+system time over the run's wall time, in
    % of one core; busy: the whole machine's non-idle share of every core over the run, /proc/stat).
    `headers` may hold an Authorization header (client.bearer(token)); no other header is sent."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    try:
        command = [wrk_path(), "-t", str(min(concurrency, 2)), "-c", str(concurrency), "-d", f"{max(1, round(duration))}s",
                   "--timeout", f"{timeout_s}s", "-s", script.name, url]
        busy = BusyMeter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "TVSERVE_BODY": str(body), **authorization_env(headers)})
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        busy_pct = busy.percent()
        process.returncode = os.waitstatus_to_exitcode(status)
    finally:
        os.unlink(script.name)
    line = next((line for line in output.splitlines() if line.startswith("TVSERVE_RESULT ")), None)
    if process.returncode != 0 or line is None:
        raise TvserveError(f"wrk failed ({' '.join(command)}):\n{output.strip()}")
    result = json.loads(line.removeprefix("TVSERVE_RESULT "))
    seconds = result["duration_us"] / 1e6
    errors = sum(result[key] for key in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    return {
        "rps": round((result["requests"] - errors) / seconds, 2),
        "p50_ms": result["p50_us"] / 1000, "p90_ms": result["p90_us"] / 1000, "p99_ms": result["p99_us"] / 1000,
        "max_ms": result["max_us"] / 1000, "requests": result["requests"], "errors": errors,
        "loadgen_cpu_pct": round(100 * (usage.ru_utime + usage.ru_stime) / seconds, 1),
        "machine_busy_pct": busy_pct,
    }


def server_cpu_ms(result: dict, cores: int):
    """CPU milliseconds a request cost the machine at one run_wrk point, wrk's own CPU left out
    (the machine's busy share of `cores`, less wrk's); None where busy was not measured or nothing
    was answered."""
    busy, loadgen = result.get("machine_busy_pct"), result.get("loadgen_cpu_pct") or 0.0
    server_cores = None if busy is None else busy / 100 * cores - loadgen / 100
    return 1000 * server_cores / result["rps"] if server_cores and server_cores > 0 and result["rps"] else None


class BusyMeter:
    """How busy the whole machine was since this was made: the share of every core's time that was
    not idle or waiting on I/O (Linux /proc/stat's first line), in %; None where /proc/stat is missing."""

    def __init__(self):
        self.start = cpu_times()

    def percent(self):
        end = cpu_times()
        if self.start is None or end is None:
            return None
        spent = [b - a for a, b in zip(self.start, end)]
        idle = spent[3] + spent[4]  # idle, iowait
        return round(100 * (sum(spent) - idle) / sum(spent), 1) if sum(spent) else None


def cpu_times():
    """The machine's CPU times (user, nice, system, idle, iowait, irq, softirq, steal), in ticks."""
    try:
        with open("/proc/stat") as stat:
            return [int(value) for value in stat.readline().split()[1:9]]
    except OSError:
        return None


def authorization_env(headers: dict = None) -> dict:
    """The wrk script's environment for `headers`: their Authorization header only."""
    unknown = set(headers or {}) - {"Authorization"}
    if unknown:
        raise ValueError(f"run_wrk sends an Authorization header only, not {', '.join(sorted(unknown))}.")
    return {"TVSERVE_AUTHORIZATION": headers["Authorization"]} if headers else {}
