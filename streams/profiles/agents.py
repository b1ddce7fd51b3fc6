"""Profile state and enrichment, keyed by canonical profile id.

Tables: ``profile_traits`` (traits merged from identify calls) and
``profile_recommendations`` (the latest ranked list per customer). Both live in
the partitions of the profile repartition topic, the topic that carries a
profile's events and its recommendation updates in order.

Events whose Avro body the EnrichedEvent can embed verbatim arrive with what
enrichment needs in headers (see :func:`streams.ingest.agents.enrichment_headers`):
they are not decoded, and their EnrichedEvent is spliced around the original
bytes (:mod:`streams.profiles.splice`). Others (a producer on an older schema
version, records from an older worker) are decoded and encoded in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sources.kafka_producer import OutRecord
from streams import schemas, topics
from streams.events import dumps_json, now_ms, to_ms
from streams.pipeline import (
    H_CONTEXT,
    H_KIND,
    H_PROFILE,
    H_RECEIVED,
    H_SRC_OFFSET,
    H_SRC_PARTITION,
    H_STITCHED,
    H_TRAITS,
    H_TYPE,
    KIND_RECOMMENDATION,
    PIPELINE_VERSION,
    Pipeline,
    bind_event,
    header_map,
    run_batches,
)
from streams.profiles.enrich import build_enriched, merge_traits, recommendation_state
from streams.serde import HEADER, MAGIC_BYTE, DecodeError

STAGE = "enrich"


def _int_header(headers: dict[str, bytes], name: str) -> int | None:
    value = headers.get(name)
    return int(value) if value else None


def register(p: Pipeline) -> None:
    traits_table = p.profile_traits
    recs_table = p.profile_recommendations
    layout = p.layout
    enriched_header = HEADER.pack(MAGIC_BYTE, p.serde.schema_id(topics.EVENTS_ENRICHED))
    observe_latency = p.metrics.event_to_enriched.observe

    async def handle(stream: Any, events: Sequence[Any]) -> list[OutRecord]:
        out: list[OutRecord] = []
        processed_at = now_ms()
        for event in events:
            headers = header_map(event.headers)
            value = event.value
            if headers.get(H_KIND) == KIND_RECOMMENDATION:
                _, rec = await p.decode(value, schemas.RECOMMENDATION_UPDATE)
                # After any await: table writes go to the current event's partition.
                bind_event(stream, event)
                customer = rec["customerId"]
                current = recs_table.get(customer)
                if current is None or current["generatedAt"] <= to_ms(rec["generatedAt"]):
                    recs_table[customer] = recommendation_state(rec)
                continue
            profile_id = (headers.get(H_PROFILE) or event.key or b"").decode()
            stitched = headers.get(H_STITCHED) == b"1"
            context_part = headers.get(H_CONTEXT)
            received = headers.get(H_RECEIVED)
            if context_part is None or received is None or value is None:
                out.append(
                    await full_encode(stream, event, headers, profile_id, stitched, processed_at)
                )
                continue
            bind_event(stream, event)
            traits = traits_table.get(profile_id)
            new_traits = headers.get(H_TRAITS)
            if new_traits is not None and headers.get(H_TYPE) == b"identify":
                traits = merge_traits(traits, new_traits.decode())
                traits_table[profile_id] = traits
            enriched = b"".join(
                (
                    enriched_header,
                    value[HEADER.size :],
                    layout.profile(profile_id, stitched, dumps_json(traits) if traits else "{}"),
                    layout.recommendations(recs_table.get(profile_id)),
                    context_part,
                    layout.enrichment(
                        {
                            "processedAt": processed_at,
                            "workerId": p.worker_label,
                            "pipelineVersion": PIPELINE_VERSION,
                            "sourcePartition": _int_header(headers, H_SRC_PARTITION),
                            "sourceOffset": _int_header(headers, H_SRC_OFFSET),
                        }
                    ),
                )
            )
            observe_latency(max(0.0, (processed_at - int(received)) / 1000))
            out.append((topics.EVENTS_ENRICHED, enriched, profile_id.encode(), None))
        return out

    async def full_encode(
        stream: Any,
        event: Any,
        headers: dict[str, bytes],
        profile_id: str,
        stitched: bool,
        processed_at: int,
    ) -> OutRecord:
        value = event.value
        try:
            _, record = await p.decode(value, schemas.CUSTOMER_EVENT)
        except DecodeError as exc:  # validated upstream; only a registry wipe gets here
            return p.dead_letter_record(
                value, stage=STAGE, reason=exc.reason_code, message=str(exc), event=event
            )
        bind_event(stream, event)
        traits = traits_table.get(profile_id)
        if record["type"] == "identify" and record.get("traits") not in (None, "{}"):
            traits = merge_traits(traits, record["traits"])
            traits_table[profile_id] = traits
        enriched = build_enriched(
            record,
            profile_id=profile_id,
            stitched=stitched,
            traits=traits,
            recommendations=recs_table.get(profile_id),
            worker_id=p.worker_label,
            pipeline_version=PIPELINE_VERSION,
            processed_at_ms=processed_at,
            source_partition=_int_header(headers, H_SRC_PARTITION),
            source_offset=_int_header(headers, H_SRC_OFFSET),
        )
        observe_latency(max(0.0, (processed_at - to_ms(record["receivedAt"])) / 1000))
        return (topics.EVENTS_ENRICHED, p.encode_enriched(enriched), profile_id.encode(), None)

    @p.app.agent(p.profile_topic, name="cdpflow.profiles.enrich")
    async def enrich(stream: Any) -> None:
        await run_batches(p, stream, STAGE, handle)
