"""Prometheus metrics and health endpoints of the worker.

Metrics live in a registry per pipeline (not the global one) so tests can run
several pipelines in one process. They are served on the worker's Faust web
server (``/metrics``, ``/health/live``, ``/health/ready``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from streams.pipeline import Pipeline

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class PipelineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_in = Counter(
            "cdp_worker_events_in_total",
            "Records consumed per stage",
            ["stage", "topic"],
            registry=r,
        )
        self.events_out = Counter(
            "cdp_worker_events_out_total",
            "Records produced per stage",
            ["stage", "topic"],
            registry=r,
        )
        self.dead_letters = Counter(
            "cdp_dlq_records_total",
            "Dead letters by stage and reason code",
            ["stage", "reason"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "cdp_worker_batch_seconds",
            "Time to process and deliver one batch",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.event_to_enriched = Histogram(
            "cdp_event_to_enriched_seconds",
            "Latency from the collector/producer receiving an event to its enrichment",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "cdp_consumer_lag",
            "Records behind the high watermark",
            ["group", "topic", "partition"],
            registry=r,
        )
        self.ready = Gauge(
            "cdp_worker_ready", "1 once partitions are assigned and recovered", registry=r
        )

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


def register_metrics(p: Pipeline) -> None:
    """Health and metrics pages, and a timer that refreshes consumer lag."""
    app = p.app
    metrics = p.metrics
    group = p.settings.cdp_worker_id

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        # aiohttp refuses a charset inside content_type; Prometheus' text format is UTF-8.
        return web.bytes(metrics.render(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/health/live")
    async def live(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/health/ready")
    async def ready(web: Any, request: Any) -> Any:
        ok = _is_ready(p)
        return web.json({"ready": ok}, status=200 if ok else 503)

    @app.timer(interval=5.0)  # type: ignore[untyped-decorator]
    async def refresh_lag() -> None:
        consumer = app.consumer
        metrics.ready.set(1 if _is_ready(p) else 0)
        for tp in consumer.assignment():
            position = await consumer.position(tp)
            highwater = consumer.highwater(tp)
            if position is None or highwater is None:
                continue
            metrics.consumer_lag.labels(group, tp.topic, str(tp.partition)).set(
                max(0, highwater - position)
            )


def _is_ready(p: Pipeline) -> bool:
    app = p.app
    try:
        return bool(app.consumer.assignment()) and not app.rebalancing
    except Exception:  # consumer not started yet
        return False
