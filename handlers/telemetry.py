"""tvserve's own Prometheus metrics, handed by the worker to TorchServe's frontend, which serves them
on the metrics port's /metrics with `metrics_mode=prometheus` and `model_metrics_auto_detect=true`,
both set in the shipped configurations: no YAML to write.

    tvserve_requests_total{protocol, status, error_type}      every request the worker answered
    tvserve_decode_seconds, tvserve_preprocess_seconds       per image
    tvserve_inference_seconds, tvserve_batch_images          per forward pass (images actually run together)
    tvserve_request_seconds                                  per request, in the worker (decode to encoded answer)
    tvserve_queue_seconds                                    per /v2 or /v1 request: frontend arrival to worker
    tvserve_worker_starts_total                              each worker (re)start: restarts = starts - workers

Every series also carries TorchServe's ModelName, Level and Hostname labels and tvserve's
model_version. Histograms use the Prometheus client's default buckets (5 ms to 10 s).

How they travel: the frontend reads each `[METRICS]` line the worker prints (TorchServe's backend
metric format, the one ts/metrics/caching_metric.py writes) and updates its Prometheus registry.
A batch's lines are collected and printed together at `flush()` (the handler calls it at the end
of every `handle()`), in one write: one wake-up of the frontend's reader instead of one per line,
and the counters of a batch summed into one line per label set (the same totals). A histogram
needs one line per observation. Collecting and printing them this way costs the worker a few
microseconds a line, where TorchServe's `context.metrics.add_metric` costs it tens
(tvserve/tools/request_cost.py measures both).
"""

import logging
import os
import socket
import threading
import time

log = logging.getLogger(__name__)

ARRIVAL_HEADER = "tvserve-received-ms"  # set by the frontend plugin: epoch milliseconds at arrival
ENV = "TVSERVE_METRICS"  # "off": the worker reports no tvserve_* metric (to measure what they cost)
MAX_PENDING = 1000  # lines kept before a flush is forced (a caller that never flushes still reports)


class Telemetry:
    """One model version's metrics, collected per batch and printed at `flush()` for TorchServe's
    frontend. Thread-safe: any thread of the worker may report."""

    def __init__(self, context):
        # In-process use (tools, tests) has no TorchServe metrics cache: there is nothing to report to.
        self.enabled = getattr(context, "metrics", None) is not None and os.environ.get(ENV, "on") != "off"
        self.context = context
        model = getattr(context, "model_name", None)
        manifest = getattr(context, "manifest", None) or {}
        version = str(manifest.get("model", {}).get("modelVersion", "1.0"))
        self.labels = f"ModelName:{model},Level:Model,model_version:{version}"
        self.hostname = socket.gethostname()
        self.lock = threading.Lock()
        self.lines = []  # histogram observations of the batch, formatted
        self.counts = {}  # (name, unit, labels) -> the batch's sum

    def emit(self, name: str, value: float, unit: str, kind, **labels) -> None:
        """Queues one observation (`kind` "histogram") or adds to a counter (`kind` "counter"; either
        may be TorchServe's MetricTypes)."""
        if not self.enabled:
            return
        kind = getattr(kind, "value", kind)
        dimensions = self.labels + "".join(f",{key}:{value}" for key, value in labels.items())
        with self.lock:
            if kind == "counter":
                key = (name, unit, dimensions)
                self.counts[key] = self.counts.get(key, 0) + value
            else:
                self.lines.append(self.line(name, unit, value, dimensions, "HISTOGRAM"))
            pending = len(self.lines) + len(self.counts)
        if pending >= MAX_PENDING:
            self.flush()

    def line(self, name: str, unit: str, value, dimensions: str, kind: str) -> str:
        """TorchServe's backend metric line (ts/metrics/caching_metric.py), which its frontend parses
        (org.pytorch.serve.metrics.Metric.parse); the batch's request ids last, as TorchServe's."""
        ids = getattr(self.context.metrics, "request_ids", None)
        suffix = "," + ",".join(ids.values()) if isinstance(ids, dict) and ids else ""
        return f"[METRICS]{name}.{unit}:{value}|#{dimensions}|#type:{kind}|#hostname:{self.hostname},{int(time.time())}{suffix}"

    def flush(self) -> None:
        """Prints what was reported since the last flush, every line in one write."""
        if not self.enabled:
            return
        with self.lock:
            lines, counts = self.lines, self.counts
            self.lines, self.counts = [], {}
        lines += [self.line(name, unit, value, dimensions, "COUNTER") for (name, unit, dimensions), value in counts.items()]
        if lines:
            log.info("%s", "\n".join(lines))

    def request(self, protocol: str, status: int, error_type: str = "") -> None:
        self.emit("tvserve_requests_total", 1, "requests", "counter",
                  protocol=protocol, status=status, error_type=error_type or "none")

    def seconds(self, stage: str, seconds: float) -> None:
        self.emit(f"tvserve_{stage}_seconds", seconds, "seconds", "histogram")

    def batch(self, images: int) -> None:
        self.emit("tvserve_batch_images", images, "images", "histogram")

    def worker_started(self) -> None:
        self.emit("tvserve_worker_starts_total", 1, "starts", "counter")
        self.flush()  # at start-up, outside any batch

    def queued(self, arrival_ms) -> None:
        """The time since the frontend plugin stamped the request's arrival (same machine's clock);
        nothing for requests it did not route (/predictions: TorchServe's ts_queue_latency_microseconds)."""
        if arrival_ms is None:
            return
        try:
            self.seconds("queue", max(time.time() - int(arrival_ms) / 1000.0, 0.0))
        except (TypeError, ValueError):
            log.debug("no arrival stamp: %r", arrival_ms)
