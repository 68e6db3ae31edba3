"""tvserve's own Prometheus metrics, emitted by the worker through TorchServe's metrics pipeline
(its frontend serves them on the metrics port's /metrics with `metrics_mode=prometheus` and
`model_metrics_auto_detect=true`, both set in the shipped configurations: no YAML to write).

    tvserve_requests_total{protocol, status, error_type}      every request the worker answered
    tvserve_decode_seconds, tvserve_preprocess_seconds       per image
    tvserve_inference_seconds, tvserve_batch_images          per forward pass (images actually run together)
    tvserve_request_seconds                                  per request, in the worker (decode to encoded answer)
    tvserve_queue_seconds                                    per /v2 or /v1 request: frontend arrival to worker
    tvserve_worker_starts_total                              each worker (re)start: restarts = starts - workers

Every series also carries TorchServe's ModelName, Level and Hostname labels and tvserve's
model_version. Histograms use the Prometheus client's default buckets (5 ms to 10 s).
"""

import logging
import os
import time

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

log = logging.getLogger(__name__)

ARRIVAL_HEADER = "tvserve-received-ms"  # set by the frontend plugin: epoch milliseconds at arrival
ENV = "TVSERVE_METRICS"  # "off": the worker reports no tvserve_* metric (to measure what they cost)


class Telemetry:
    """Emits one model version's metrics through a TorchServe context's metrics cache."""

    def __init__(self, context):
        self.metrics = getattr(context, "metrics", None) if os.environ.get(ENV, "on") != "off" else None
        self.model = getattr(context, "model_name", None)
        manifest = getattr(context, "manifest", None) or {}
        self.version = str(manifest.get("model", {}).get("modelVersion", "1.0"))

    def dimensions(self, **labels) -> list:
        base = [Dimension("ModelName", self.model), Dimension("Level", "Model"),
                Dimension("model_version", self.version)]
        return base + [Dimension(name, str(value)) for name, value in labels.items()]

    def emit(self, name: str, value: float, unit: str, kind: MetricTypes, **labels) -> None:
        if self.metrics is None:  # in-process use (tools, tests): nothing to report to
            return
        self.metrics.add_metric(name, value, unit, dimensions=self.dimensions(**labels), metric_type=kind)

    def request(self, protocol: str, status: int, error_type: str = "") -> None:
        self.emit("tvserve_requests_total", 1, "requests", MetricTypes.COUNTER,
                  protocol=protocol, status=status, error_type=error_type or "none")

    def seconds(self, stage: str, seconds: float) -> None:
        self.emit(f"tvserve_{stage}_seconds", seconds, "seconds", MetricTypes.HISTOGRAM)

    def batch(self, images: int) -> None:
        self.emit("tvserve_batch_images", images, "images", MetricTypes.HISTOGRAM)

    def worker_started(self) -> None:
        self.emit("tvserve_worker_starts_total", 1, "starts", MetricTypes.COUNTER)

    def queued(self, arrival_ms) -> None:
        """The time since the frontend plugin stamped the request's arrival (same machine's clock);
        nothing for requests it did not route (/predictions: TorchServe's ts_queue_latency_microseconds)."""
        if arrival_ms is None:
            return
        try:
            self.seconds("queue", max(time.time() - int(arrival_ms) / 1000.0, 0.0))
        except (TypeError, ValueError):
            log.debug("no arrival stamp: %r", arrival_ms)
