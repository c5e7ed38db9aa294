"""The service's own metrics, recorded through Ray's metrics system and exported on Ray's Prometheus endpoint.

Why Ray's and not a second exporter: every Ray node already serves its processes' metrics on one port (set with
``ray start --metrics-export-port`` or ``ecgad serve --metrics-port``), next to Serve's own (``ray_serve_*``:
replicas, queue lengths, proxy latencies), so one scrape configuration covers both and nothing more listens.
Ray prefixes every application metric with ``ray_`` on that endpoint: ``ecgad_requests_total`` below is scraped
as ``ray_ecgad_requests_total`` (`EXPORTED_PREFIX`); the dashboards and alert rules in ``ops/`` use those names.
Serve adds the ``deployment``, ``replica`` and ``application`` tags itself. Ray rebuilds a histogram's ``_sum``
from its bucket midpoints, so totals come from counters and counts (``ecgad_records_scored_total`` over
``ecgad_batch_size_count`` is the mean batch size), never from a ``_sum``.

Each process records its own; Prometheus sums over replicas. `IngressMetrics` lives in an ingress replica (requests
by route and status, rejection reasons, preparation time, request latency) and is fed by the ASGI middleware
`RequestMetrics`; `ModelMetrics` lives in a model replica (batch sizes, queue wait, model time per batch, scores,
predicted anomalies and drift per model version).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from ray.serve.metrics import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ecgad.drift import DriftReading

#: How Ray names our metrics on its Prometheus endpoint.
EXPORTED_PREFIX = "ray_"
#: Seconds: request latency, preparation, queue wait and model time share these buckets (1 ms to 60 s).
SECONDS_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
#: Records per model batch.
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
#: Record scores (positive, unbounded; their scale is the model's): geometric from 1e-4 to 1e4.
SCORE_BUCKETS = [10.0 ** (e / 2) for e in range(-8, 9)]


class IngressMetrics:
    """What an ingress replica records (created in the replica: a Ray metric belongs to its process)."""

    def __init__(self) -> None:
        self.requests = Counter("ecgad_requests_total", description="HTTP requests answered, by route and status "
                                "code (200, 400, 401, 403, 413, 415, 422, 503, 5xx; 'cancelled' when the client "
                                "left or the proxy timed out first)",
                                tag_keys=("route", "code"))
        self.rejections = Counter("ecgad_rejections_total", tag_keys=("reason",),
                                  description="records answered 422, by rejection code (flat_lead, ...)")
        self.latency = Histogram("ecgad_request_seconds", description="time from request to answer, by route",
                                 boundaries=SECONDS_BUCKETS, tag_keys=("route",))
        self.preparation = Histogram("ecgad_preparation_seconds", description="parsing, validating and preparing "
                                     "one record in the ingress (rejected records included)",
                                     boundaries=SECONDS_BUCKETS)


class ModelMetrics:
    """What a model replica records; ``model_version`` tags everything that depends on the model."""

    def __init__(self, model_version: str) -> None:
        self.tags = {"model_version": model_version}
        version = ("model_version",)
        self.batch_size = Histogram("ecgad_batch_size", description="records per model batch",
                                    boundaries=BATCH_BUCKETS)
        self.queue_wait = Histogram("ecgad_queue_wait_seconds", description="time a record waited in the model "
                                    "replica before its batch started", boundaries=SECONDS_BUCKETS)
        self.model_time = Histogram("ecgad_model_seconds", description="model time per batch",
                                    boundaries=SECONDS_BUCKETS)
        self.queue_depth = Gauge("ecgad_model_queue_depth", description="records in the model replica: waiting "
                                 "for a batch or being scored")
        self.scores = Histogram("ecgad_score", description="record scores, by model version",
                                boundaries=SCORE_BUCKETS, tag_keys=version)
        self.records = Counter("ecgad_records_scored_total", description="records scored, by model version and "
                               "predicted label (anomalous, normal)", tag_keys=(*version, "label"))
        self.drift_ks = Gauge("ecgad_drift_ks", description="Kolmogorov-Smirnov distance between the recent "
                              "scores and the calibration scores (ecgad.drift)", tag_keys=version)
        self.drift_ks_threshold = Gauge("ecgad_drift_ks_threshold", description="the distance that chance alone "
                                        "passes with probability 0.001 at this window size", tag_keys=version)
        self.drift_flagged = Gauge("ecgad_drift_flagged_share", description="share of the recent records flagged "
                                   "anomalous", tag_keys=version)
        self.drift_calibration_flagged = Gauge("ecgad_drift_calibration_flagged_share", description="share of "
                                               "the calibration records above the threshold", tag_keys=version)
        self.drift_records = Gauge("ecgad_drift_window_records", description="records in the drift window",
                                   tag_keys=version)

    def batch(self, size: int, waits_s: Sequence[float], model_s: float) -> None:
        self.batch_size.observe(size)
        self.model_time.observe(model_s)
        for wait in waits_s:
            self.queue_wait.observe(wait)

    def scored(self, scores: Sequence[float], flagged: Sequence[bool]) -> None:
        for score, is_flagged in zip(scores, flagged):
            self.scores.observe(max(float(score), 0.0), tags=self.tags)
            self.records.inc(tags={**self.tags, "label": "anomalous" if is_flagged else "normal"})

    def drift(self, reading: DriftReading) -> None:
        self.drift_ks.set(reading.ks, tags=self.tags)
        self.drift_ks_threshold.set(reading.ks_threshold, tags=self.tags)
        self.drift_flagged.set(reading.flagged_share, tags=self.tags)
        self.drift_records.set(reading.records, tags=self.tags)
        if reading.calibration_flagged_share == reading.calibration_flagged_share:   # not NaN
            self.drift_calibration_flagged.set(reading.calibration_flagged_share, tags=self.tags)


class RequestMetrics:
    """ASGI middleware: counts every HTTP answer by route and status code and times it. Outermost, so that the
    guard's 400/403 count too; an exception nothing answered counts as 500 (Starlette's answer to it).

    The route is the path template the router matched (``scope["route"]``, set while routing), so the number of
    series is bounded by the application's routes: an unmatched path (a scanner's guesses, a request the guard
    refused before routing) counts as ``other``."""

    #: The metrics of this process, set by `install` when the ingress replica starts; None records nothing.
    metrics: IngressMetrics | None = None

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = RequestMetrics.metrics
        if scope["type"] != "http" or metrics is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def record_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        except asyncio.CancelledError:   # the client left or the proxy timed out (it answers 408 itself)
            status["code"] = "cancelled"
            raise
        finally:
            route = getattr(scope.get("route"), "path", "other")
            metrics.requests.inc(tags={"route": route, "code": str(status["code"])})
            metrics.latency.observe(time.perf_counter() - started, tags={"route": route})


def install() -> IngressMetrics:
    """Create this ingress replica's metrics and make `RequestMetrics` record into them."""
    RequestMetrics.metrics = IngressMetrics()
    return RequestMetrics.metrics


def exported_series() -> dict[str, str]:
    """Every series name our metrics have on Ray's Prometheus endpoint, with its type (``counter``, ``gauge``, or
    ``histogram`` for each of a histogram's ``_bucket``, ``_count`` and ``_sum``): what dashboards and alert rules
    may query. Built from the metric objects themselves (outside Ray they record nothing), so it cannot drift
    from what the replicas export."""
    series: dict[str, str] = {}
    for holder in (IngressMetrics(), ModelMetrics("")):
        for metric in vars(holder).values():
            if isinstance(metric, Histogram):
                name = EXPORTED_PREFIX + metric.info["name"]
                series.update({f"{name}{suffix}": "histogram" for suffix in ("_bucket", "_count", "_sum")})
            elif isinstance(metric, (Counter, Gauge)):
                series[EXPORTED_PREFIX + metric.info["name"]] = "counter" if isinstance(metric, Counter) else "gauge"
    return series
