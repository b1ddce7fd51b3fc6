"""Validate raw events and stitch their identity in the same pass.

Raw events are keyed by their identity key (anonymousId, else userId), so the
identity link an event needs is normally in the ``identity_links`` partition
co-partitioned with the raw partition it came from: such events are decoded,
checked, stitched and sent straight to the profile repartition topic. Only an
event whose identity key belongs to another partition (an alias, whose link is
under its previousId, or an event keyed differently by a third-party producer)
is re-keyed through the identity repartition topic and stitched there
(:mod:`streams.identity.agents`). Invalid input goes to the DLQ with its reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sources.kafka_producer import Headers, OutRecord
from streams import schemas
from streams.events import EventRejected, check_rules, now_ms, to_ms
from streams.identity.agents import profile_headers, resolve_record
from streams.pipeline import (
    H_ANON,
    H_CONTEXT,
    H_PREVIOUS,
    H_RECEIVED,
    H_SRC_OFFSET,
    H_SRC_PARTITION,
    H_TRAITS,
    H_TYPE,
    H_USER,
    Pipeline,
    bind_event,
    run_batches,
)
from streams.profiles.splice import EnrichedLayout
from streams.serde import DecodeError

STAGE = "validate"


def identity_routing_key(record: dict[str, Any]) -> str:
    """The id whose link stitching reads or writes (the table key the event needs).

    alias → previousId (the id being linked); otherwise anonymousId when present
    (where anonymous → user links live); else userId.
    """
    if record["type"] == "alias":
        return str(record["previousId"])
    return str(record.get("anonymousId") or record.get("userId"))


def routing_headers(record: dict[str, Any], partition: int, offset: int) -> Headers:
    headers: Headers = [
        (H_TYPE, record["type"].encode()),
        (H_SRC_PARTITION, str(partition).encode()),
        (H_SRC_OFFSET, str(offset).encode()),
    ]
    for name, field in ((H_USER, "userId"), (H_ANON, "anonymousId"), (H_PREVIOUS, "previousId")):
        value = record.get(field)
        if value:
            headers.append((name, value.encode()))
    return headers


def enrichment_headers(layout: EnrichedLayout, record: dict[str, Any]) -> Headers:
    """What the profile stage needs besides profile state, so it need not decode the event.

    Only for records whose body the EnrichedEvent can embed verbatim (the caller checks).
    """
    headers: Headers = [
        (H_RECEIVED, str(to_ms(record["receivedAt"])).encode()),
        (H_CONTEXT, layout.context(record)),
    ]
    traits = record.get("traits")
    if record["type"] == "identify" and traits not in (None, "{}"):
        headers.append((H_TRAITS, traits.encode()))
    return headers


def register(p: Pipeline) -> None:
    links = p.identity_links
    partition_of = p.partition_of

    async def handle(stream: Any, events: Sequence[Any]) -> list[OutRecord]:
        out: list[OutRecord] = []
        now = now_ms()
        identity_topic = p.identity_topic_name
        profile_topic = p.profile_topic_name
        for event in events:
            value: bytes | None = event.value
            message_id = None
            try:
                schema_id, record = await p.decode(value, schemas.CUSTOMER_EVENT)
                message_id = record.get("messageId")
                check_rules(record, now=now, limits=p.limits)
            except DecodeError as exc:
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
            except EventRejected as exc:
                out.append(
                    p.dead_letter_record(
                        value,
                        stage=STAGE,
                        reason=exc.reason,
                        message=exc.detail,
                        event=event,
                        message_id=message_id,
                    )
                )
                continue
            msg = event.message
            key = identity_routing_key(record).encode()
            headers = routing_headers(record, msg.partition, msg.offset)
            if p.serde.writes_as_reader(schema_id, schemas.CUSTOMER_EVENT):
                headers += enrichment_headers(p.layout, record)
            if partition_of(key) != msg.partition:
                # The link lives in another partition: stitch there.
                out.append((identity_topic, value, key, headers))
                continue
            bind_event(stream, event)  # table writes go to this event's partition
            profile_id, stitched = resolve_record(record, links)
            out.append(
                (
                    profile_topic,
                    value,
                    profile_id.encode(),
                    profile_headers(headers, profile_id, stitched),
                )
            )
        return out

    @p.app.agent(p.raw_topic, name="cdpflow.ingest.validate")
    async def validate(stream: Any) -> None:
        await run_batches(p, stream, STAGE, handle)
