"""Delivered events per second, per destination, against its local emulator.

For ``bench/`` and the demo: :func:`delivery_rates` produces a backlog of
realistic enriched events to a private topic, starts the emulators in their own
process (so the vendor stand-in does not share the engine's GIL), and runs one
destination's engine at a time on the backlog. The rate is measured from the
first accepted event to the last (start-up excluded), and latencies are the
engine's own (receivedAt -> accepted), which on a backlog mostly measure queueing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sinks import registry
from sinks.engine import SinkEngineSettings, SinkService, emulator_env, load_destinations
from sources.kafka_producer import ReliableProducer
from streams import topics
from streams.events import from_segment, now_ms
from streams.profiles.enrich import build_enriched
from streams.serde import AvroSerde
from streams.settings import Settings
from streams.topics import TopicSpec, ensure_topics

UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
)
CONSENT = {"categoryPreferences": {c: True for c in ("Advertising", "Analytics", "Marketing")}}


@dataclass
class DeliveryRate:
    destination: str
    events: int
    seconds: float
    events_per_s: float
    requests: int
    dead_lettered: int
    latency_p50_s: float | None
    latency_p99_s: float | None


def _event(i: int, run: str, users: int) -> dict[str, Any]:
    user = f"bench-{run}-{i % users}"
    kind = i % 4
    msg: dict[str, Any] = {
        "messageId": f"{run}-{i}",
        "userId": user,
        "anonymousId": f"anon-{run}-{i % users}",
        "context": {
            "ip": "203.0.113.7",
            "userAgent": UA,
            "page": {"url": f"https://shop.example/p/{i % 50}?utm_source=bench"},
            "traits": {"email": f"{user}@example.com"},
            "consent": CONSENT,
        },
    }
    if kind == 0:
        msg.update(type="page", name="Product", properties={"sku": f"sku-{i % 50}"})
    elif kind == 3:
        msg.update(
            type="track",
            event="Order Completed",
            properties={
                "order_id": f"o-{run}-{i}",
                "revenue": 42.5,
                "currency": "EUR",
                "products": [{"product_id": f"sku-{i % 50}", "price": 42.5, "quantity": 1}],
            },
        )
    else:
        msg.update(
            type="track",
            event="Product Viewed",
            properties={"product_id": f"sku-{i % 50}", "price": 42.5, "currency": "EUR"},
        )
    return msg


def produce_backlog(
    settings: Settings, serde: AvroSerde, topic: str, events: int, users: int = 500
) -> None:
    run = uuid.uuid4().hex[:8]
    encode = serde.encoder(topics.EVENTS_ENRICHED)
    producer = ReliableProducer(settings)
    pending = []
    for i in range(events):
        record = from_segment(_event(i, run, users), received_at_ms=now_ms())
        enriched = build_enriched(
            record,
            profile_id=record["userId"],
            stitched=False,
            traits=None,
            recommendations=None,
            worker_id="bench",
            pipeline_version="bench",
            processed_at_ms=now_ms(),
            source_partition=None,
            source_offset=None,
        )
        pending.append(producer.produce(topic, encode(enriched), key=record["userId"]))
    for fut in pending:
        fut.result(60)
    producer.close()


async def _measure(
    name: str,
    settings: Settings,
    serde: AvroSerde,
    topic: str,
    events: int,
    env: dict[str, str],
    timeout_s: float,
) -> DeliveryRate:
    import os

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        (config,) = load_destinations([name])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if config.destination is None:
        raise RuntimeError(f"{name}: {config.problem}")
    engine = SinkEngineSettings(
        source_topic=topic, group_prefix=f"cdpflow-bench-{uuid.uuid4().hex[:8]}-"
    )
    service = SinkService([config.destination], settings, engine, serde=serde)
    task = asyncio.create_task(service.run())
    try:
        await service.wait_started()
        runner = service.runners[name]
        deadline = time.monotonic() + timeout_s
        first: float | None = None
        while time.monotonic() < deadline:
            s = runner.stats
            if first is None and s.delivered:
                first = time.monotonic() - 0.001
            if s.delivered + s.dead_lettered + s.skipped >= events:
                break
            if runner.state == "failed":
                raise RuntimeError(f"{name}: {runner.failure}")
            await asyncio.sleep(0.02)
        done = time.monotonic()
        s = runner.stats
        seconds = done - (first or done)
        return DeliveryRate(
            destination=name,
            events=s.delivered,
            seconds=round(seconds, 3),
            events_per_s=round(s.delivered / seconds, 1) if seconds > 0 else 0.0,
            requests=s.requests,
            dead_lettered=s.dead_lettered,
            latency_p50_s=s.percentile(0.5),
            latency_p99_s=s.percentile(0.99),
        )
    finally:
        service.stop()
        await task


def delivery_rates(
    settings: Settings,
    names: Sequence[str] | None = None,
    *,
    events: int = 20_000,
    partitions: int = 6,
    timeout_s: float = 300.0,
) -> list[dict[str, Any]]:
    """Events/s per destination (all registered ones with an emulator by default)."""
    from sinks.emulators import EMULATORS, start_all

    wanted = list(names or [n for n in registry.load_all() if n in EMULATORS])
    serde = AvroSerde.from_url(settings.schema_registry_url)
    topic = f"cdp.bench.sinks.{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, [TopicSpec(topic, partitions, {})])
    produce_backlog(settings, serde, topic, events)
    results = []
    with start_all(wanted, mode="process") as cluster:
        env = emulator_env(cluster)
        for name in wanted:
            rate = asyncio.run(_measure(name, settings, serde, topic, events, env, timeout_s))
            results.append(asdict(rate))
    return results


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(delivery_rates(Settings(), sys.argv[1:] or None), indent=2))
