"""Profile state and enrichment, keyed by canonical profile id.

Tables: ``profile_traits`` (traits merged from identify calls) and
``profile_recommendations`` (the latest ranked list per customer). Both live in
the partitions of ``the profile repartition topic``, the topic that carries a profile's
events and its recommendation updates in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sources.kafka_producer import OutRecord
from streams import schemas, topics
from streams.events import now_ms, to_ms
from streams.pipeline import (
    H_KIND,
    H_PROFILE,
    H_SRC_OFFSET,
    H_SRC_PARTITION,
    H_STITCHED,
    KIND_RECOMMENDATION,
    PIPELINE_VERSION,
    Pipeline,
    bind_event,
    header_map,
    run_batches,
)
from streams.profiles.enrich import build_enriched, merge_traits, recommendation_state
from streams.serde import DecodeError

STAGE = "enrich"


def _int_header(headers: dict[str, bytes], name: str) -> int | None:
    value = headers.get(name)
    return int(value) if value else None


def register(p: Pipeline) -> None:
    traits_table = p.profile_traits
    recs_table = p.profile_recommendations

    async def handle(stream: Any, events: Sequence[Any]) -> list[OutRecord]:
        out: list[OutRecord] = []
        processed_at = now_ms()
        for event in events:
            bind_event(stream, event)
            headers = header_map(event.headers)
            value = event.value
            if headers.get(H_KIND) == KIND_RECOMMENDATION:
                _, rec = await p.decode(value, schemas.RECOMMENDATION_UPDATE)
                customer = rec["customerId"]
                current = recs_table.get(customer)
                if current is None or current["generatedAt"] <= to_ms(rec["generatedAt"]):
                    recs_table[customer] = recommendation_state(rec)
                continue
            try:
                _, record = await p.decode(value, schemas.CUSTOMER_EVENT)
            except DecodeError as exc:  # validated upstream; only a registry wipe gets here
                out.append(
                    p.dead_letter_record(
                        value,
                        stage=STAGE,
                        reason=exc.reason_code,
                        message=str(exc),
                        event=event,
                    )
                )
                continue
            profile_id = (headers.get(H_PROFILE) or event.key or b"").decode()
            traits = traits_table.get(profile_id)
            if record["type"] == "identify" and record.get("traits") not in (None, "{}"):
                traits = merge_traits(traits, record["traits"])
                traits_table[profile_id] = traits
            enriched = build_enriched(
                record,
                profile_id=profile_id,
                stitched=headers.get(H_STITCHED) == b"1",
                traits=traits,
                recommendations=recs_table.get(profile_id),
                worker_id=p.worker_label,
                pipeline_version=PIPELINE_VERSION,
                processed_at_ms=processed_at,
                source_partition=_int_header(headers, H_SRC_PARTITION),
                source_offset=_int_header(headers, H_SRC_OFFSET),
            )
            p.metrics.event_to_enriched.observe(
                max(0.0, (processed_at - to_ms(record["receivedAt"])) / 1000)
            )
            out.append(
                (topics.EVENTS_ENRICHED, p.encode_enriched(enriched), profile_id.encode(), None)
            )
        return out

    @p.app.agent(p.profile_topic, name="cdpflow.profiles.enrich")
    async def enrich(stream: Any) -> None:
        await run_batches(p, stream, STAGE, handle)
