"""Audience agent throughput: a backlog of enriched events through one worker.

Produces ``--profiles`` x ``--per-profile`` EnrichedEvents straight to
``cdp.events.enriched`` (an identify with consent and an email, then alternating
Product Added / Order Completed, so every later event flips cart-abandoner
membership on two platforms), THEN starts one worker with an audiences config,
and reads ``cdp.audiences.updates`` until every expected update arrived. Rates
come from the updates' ``emittedAt`` (first to last), so worker start-up and
table recovery are not counted.

    KAFKA_BOOTSTRAP_SERVERS=... SCHEMA_REGISTRY_URL=... python -m bench.audience_agent
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from sources.kafka_producer import ReliableProducer
from streams import topics
from streams.events import from_segment, now_ms
from streams.profiles.enrich import build_enriched
from streams.serde import AvroSerde
from streams.settings import Settings
from streams.topics import ensure_topics
from streams.worker import worker_topic_specs
from tests.kafka_helpers import (
    TopicReader,
    WorkerProcess,
    end_offsets,
    start_group_at_end,
    worker_env,
)

CONFIG = """\
version: bench
audiences:
  - name: cart
    platforms: {meta: {audience_id: "1"}, linkedin: {segment_id: "2"}}
    rule:
      all:
        - event: {name: Product Added, within: 1h}
        - not:
            event: {name: Order Completed, within: 1h, since_last: Product Added}
"""


def _ms(value: Any) -> int:
    return int(value.timestamp() * 1000) if isinstance(value, datetime) else int(value)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.audience_agent")
    parser.add_argument("--profiles", type=int, default=2000)
    parser.add_argument("--per-profile", type=int, default=10)
    args = parser.parse_args()
    boot, registry = os.environ["KAFKA_BOOTSTRAP_SERVERS"], os.environ["SCHEMA_REGISTRY_URL"]
    tmp = Path(tempfile.mkdtemp(prefix="aud-bench-"))
    (tmp / "audiences.yaml").write_text(CONFIG)
    group = f"aud-bench-{uuid.uuid4().hex[:6]}"
    settings = Settings()
    ensure_topics(settings, worker_topic_specs(Settings(cdp_worker_id=group)))
    inputs = [topics.EVENTS_RAW, topics.RECOMMENDATIONS_UPDATES, topics.EVENTS_ENRICHED]
    start_group_at_end(boot, group, inputs)
    encode = AvroSerde.from_url(registry).encoder(topics.EVENTS_ENRICHED)
    start = end_offsets(boot, topics.AUDIENCES_UPDATES)
    producer = ReliableProducer(settings)
    futures = []
    t0, tag = now_ms(), uuid.uuid4().hex[:6]
    for i in range(args.per_profile):
        for p in range(args.profiles):
            pid = f"b{tag}-{p}"
            traits = {"email": f"{pid}@example.com"}
            if i == 0:
                consent = {"consent": {"categoryPreferences": {"Advertising": True}}}
                msg: dict[str, Any] = {
                    "type": "identify",
                    "userId": pid,
                    "traits": traits,
                    "context": consent,
                }
            else:
                name = "Product Added" if i % 2 else "Order Completed"
                msg = {"type": "track", "userId": pid, "event": name}
            record = from_segment(msg, received_at_ms=t0 + i)
            enriched = build_enriched(
                record, profile_id=pid, stitched=False, traits=traits, recommendations=None,
                worker_id="bench", pipeline_version="bench", processed_at_ms=t0,
                source_partition=None, source_offset=None,
            )  # fmt: skip
            futures.append(producer.produce(topics.EVENTS_ENRICHED, encode(enriched), key=pid))
    for fut in futures:
        fut.result(60)
    producer.close()
    events = len(futures)
    expected = args.profiles * 2 * (args.per_profile - 1)
    env = worker_env(
        boot, registry, group, tmp / "data", CDP_AUDIENCES_CONFIG=str(tmp / "audiences.yaml")
    )
    worker = WorkerProcess(env, tmp / "worker.log").start()
    try:
        worker.wait_ready(180)
        reader = TopicReader(boot, registry, topics.AUDIENCES_UPDATES, start)

        def mine(values: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [v for v in values if v["profileId"].startswith(f"b{tag}-")]

        values = mine(reader.poll_until(lambda vs: len(mine(vs)) >= expected, timeout=1800))
        reader.close()
    finally:
        worker.stop()
    emitted = sorted(_ms(v["emittedAt"]) for v in values)
    span = max(0.001, (emitted[-1] - emitted[0]) / 1000)
    print(
        json.dumps(
            {
                "events": events,
                "updates": len(values),
                "expected_updates": expected,
                "span_s": span,
                "updates_per_s": round(len(values) / span),
                "events_per_s": round(events / span),
            }
        )
    )


if __name__ == "__main__":
    main()
