"""Prometheus metrics of ``visguard serve`` (one registry per app, so several apps can share a process).

Names (all prefixed ``visguard_``):

- ``checks_total{stage,mode}``: guard checks run (``stage``: input | output).
- ``verdicts_total{stage,label}``: their verdicts (``label``: safe | unsafe | unavailable).
- ``check_latency_seconds{stage}``: histogram, from the check's arrival at the batcher to its verdict.
- ``check_batch_size``: histogram of the batches sent to the guard backend.
- ``guarded_requests_total{outcome}``: chat completions and responses: passed | blocked | flagged | degraded | error.
- ``http_requests_total{path,status}`` and ``http_request_latency_seconds{path}``: every HTTP request.
- ``http_inflight_requests``: gated requests (``/v1/...``) being served now.
- ``http_rejected_total{reason}``: unauthorized (401) | too_large (413) | slow_body (408) | overloaded (429).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from visguard.core.types import Verdict

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """The metrics of one app, in their own :class:`~prometheus_client.CollectorRegistry`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.checks = Counter("visguard_checks_total", "Guard checks run.", ["stage", "mode"], registry=r)
        self.verdicts = Counter("visguard_verdicts_total", "Guard verdicts.", ["stage", "label"], registry=r)
        self.check_latency = Histogram(
            "visguard_check_latency_seconds", "Time from a check's arrival to its verdict (queueing included).",
            ["stage"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "visguard_check_batch_size", "Checks per batch sent to the guard backend.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.guarded = Counter("visguard_guarded_requests_total", "Guarded chat completions by outcome.", ["outcome"], registry=r)
        self.http_requests = Counter("visguard_http_requests_total", "HTTP requests.", ["path", "status"], registry=r)
        self.http_latency = Histogram(
            "visguard_http_request_latency_seconds", "HTTP request latency (streams: until the last byte).",
            ["path"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.inflight = Gauge("visguard_http_inflight_requests", "Gated requests being served.", registry=r)
        self.rejected = Counter("visguard_http_rejected_total", "Requests refused before reaching the guard.", ["reason"], registry=r)

    def observe_batch(self, mode: str, verdicts: list[Verdict], waited_s: list[float]) -> None:
        """Record one finished batch (registered with :meth:`visguard.Guard.add_batch_observer`)."""
        self.batch_size.observe(len(verdicts))
        for verdict, seconds in zip(verdicts, waited_s, strict=True):
            self.checks.labels(verdict.stage, mode).inc()
            self.verdicts.labels(verdict.stage, verdict.label).inc()
            self.check_latency.labels(verdict.stage).observe(seconds)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
