"""The worker's Prometheus metrics and health endpoints, scraped during a real run."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import httpx
from rich.console import Console

from streams import topics
from streams.serde import AvroSerde
from streams.settings import Settings
from streams.status import render
from streams.topics import ensure_topics
from streams.worker import worker_topic_specs
from tests.conftest import StackEndpoints
from tests.kafka_helpers import WorkerProcess, start_group_at_end, worker_env
from tests.streams.pipeline_helpers import RawProducer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def test_worker_serves_metrics_and_health(
    stack: StackEndpoints, settings: Settings, serde: AvroSerde, tmp_path: Path
) -> None:
    group = f"cdpflow-test-{uuid.uuid4().hex[:8]}"
    ensure_topics(Settings(), worker_topic_specs(Settings(cdp_worker_id=group)))
    start_group_at_end(
        stack.bootstrap_servers, group, [topics.EVENTS_RAW, topics.RECOMMENDATIONS_UPDATES]
    )
    port = _free_port()
    env = worker_env(
        stack.bootstrap_servers,
        stack.registry_url,
        group,
        tmp_path / "data",
        CDP_WORKER_WEB_ENABLED="true",
        CDP_WORKER_WEB_PORT=str(port),
    )
    worker = WorkerProcess(env, tmp_path / "w.log").start()
    base = f"http://127.0.0.1:{port}"
    try:
        worker.wait_ready()
        assert httpx.get(f"{base}/health/live", timeout=5).status_code == 200
        out = RawProducer(settings, serde)
        for i in range(20):
            out.segment({"type": "track", "userId": f"m-{i}", "event": "Metric Test"})
        out.raw_bytes(b"definitely not avro")
        out.close()
        deadline = time.monotonic() + 90
        text = ""
        while time.monotonic() < deadline:
            text = httpx.get(f"{base}/metrics", timeout=5).text
            enriched = _metric(text, "cdp_worker_events_out_total", topic=topics.EVENTS_ENRICHED)
            dead = _metric(text, "cdp_dlq_records_total", reason="NOT_WIRE_FORMAT")
            if enriched >= 20 and dead >= 1:
                break
            time.sleep(1)
        assert _metric(text, "cdp_worker_events_in_total", stage="validate") >= 21
        assert _metric(text, "cdp_worker_events_out_total", topic=topics.EVENTS_ENRICHED) >= 20
        assert (
            _metric(text, "cdp_dlq_records_total", stage="validate", reason="NOT_WIRE_FORMAT") >= 1
        )
        assert _metric(text, "cdp_event_to_enriched_seconds_count") >= 20
        assert _metric(text, "cdp_worker_batch_seconds_count", stage="enrich") >= 1
        # Lag and readiness are refreshed by a 5 s timer.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "cdp_consumer_lag{" not in text:
            time.sleep(1)
            text = httpx.get(f"{base}/metrics", timeout=5).text
        assert (
            f'cdp_consumer_lag{{group="{group}",partition="0",topic="{topics.EVENTS_RAW}"}}' in text
        )
        assert httpx.get(f"{base}/health/ready", timeout=5).status_code == 200

        # `cdpflow status` shows the worker up and its group's lag from the broker.
        console = Console(record=True, width=250)
        console.print(
            render(Settings(cdp_worker_id=group), {"worker": f"{base}/metrics"}, interval=1.0)
        )
        screen = console.export_text()
        assert "worker" in screen and "up" in screen
        assert f"group {group}" in screen and "stable" in screen
    finally:
        worker.stop()
