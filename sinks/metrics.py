"""Prometheus metrics of the sinks, one registry per engine instance.

A registry per instance (not the global one) lets tests, the demo and ``run
--all`` hold several engines in one process without duplicate-metric errors.
Counters are incremented per batch, never per event, to keep delivery cheap.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 5, 10, 50, 100, 250, 500, 1000, 2000, 2500, 5000)


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "cdpflow_sink_events",
            "Events by final outcome (delivered, dead_lettered, skipped) and reason.",
            ["destination", "outcome", "reason"],
            registry=r,
        )
        self.requests = Counter(
            "cdpflow_sink_requests",
            "HTTP requests by response status (or error kind when there was no response).",
            ["destination", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "cdpflow_sink_request_seconds",
            "HTTP request latency.",
            ["destination"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "cdpflow_sink_retries",
            "Requests retried, by the error that caused the retry.",
            ["destination", "reason"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "cdpflow_sink_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open.",
            ["destination"],
            registry=r,
        )
        self.breaker_opened = Counter(
            "cdpflow_sink_breaker_opened",
            "Times the circuit breaker opened.",
            ["destination"],
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "cdpflow_sink_end_to_end_seconds",
            "From the collector receiving an event (receivedAt) to the destination accepting it.",
            ["destination"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_events = Histogram(
            "cdpflow_sink_batch_events",
            "Events per request.",
            ["destination"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.buffered = Gauge(
            "cdpflow_sink_buffered_events",
            "Events read from Kafka and not yet finished (buffered or in flight).",
            ["destination"],
            registry=r,
        )
        self.up = Gauge(
            "cdpflow_sink_up",
            "1 while the destination's runner is consuming, 0 after it stopped or failed.",
            ["destination"],
            registry=r,
        )


@dataclass
class RunnerStats:
    """Plain counters and a latency sample, for tests, the demo and the health endpoint."""

    delivered: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    requests: int = 0
    retries: int = 0
    #: Most recent end-to-end latencies in seconds (a bounded sample).
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=200_000))

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
        return ordered[index]
