"""Validate raw events: decode, check the CDP rules, route or dead-letter each one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sources.kafka_producer import Headers, OutRecord
from streams import schemas
from streams.events import EventRejected, check_rules, now_ms
from streams.pipeline import (
    H_ANON,
    H_PREVIOUS,
    H_SRC_OFFSET,
    H_SRC_PARTITION,
    H_TYPE,
    H_USER,
    Pipeline,
    run_batches,
)
from streams.serde import DecodeError

STAGE = "validate"


def identity_routing_key(record: dict[str, Any]) -> str:
    """Key for the identity hop: the id whose link the identity table must see.

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


def register(p: Pipeline) -> None:

    async def handle(stream: Any, events: Sequence[Any]) -> list[OutRecord]:
        out: list[OutRecord] = []
        now = now_ms()
        for event in events:
            value: bytes | None = event.value
            message_id = None
            try:
                _, record = await p.decode(value, schemas.CUSTOMER_EVENT)
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
            out.append(
                (
                    p.identity_topic_name,
                    value,
                    identity_routing_key(record).encode(),
                    routing_headers(record, msg.partition, msg.offset),
                )
            )
        return out

    @p.app.agent(p.raw_topic, name="cdpflow.ingest.validate")
    async def validate(stream: Any) -> None:
        await run_batches(p, stream, STAGE, handle)
