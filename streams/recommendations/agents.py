"""Recommendation updates: validate, then route into the profile stream by customer id.

Routing through ``the profile repartition topic`` (instead of a second table fed from
the public topic) keeps recommendations and events of one customer in one
partition, in order, whatever key or partitioner the model service used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sources.kafka_producer import OutRecord
from streams import schemas
from streams.events import EventRejected, check_recommendation
from streams.pipeline import H_KIND, KIND_RECOMMENDATION, Pipeline, run_batches
from streams.serde import DecodeError

STAGE = "recommendations"


def register(p: Pipeline) -> None:

    async def handle(stream: Any, events: Sequence[Any]) -> list[OutRecord]:
        out: list[OutRecord] = []
        for event in events:
            value = event.value
            try:
                _, record = await p.decode(value, schemas.RECOMMENDATION_UPDATE)
                check_recommendation(record)
            except (DecodeError, EventRejected) as exc:
                reason = exc.reason if isinstance(exc, EventRejected) else exc.reason_code
                out.append(
                    p.dead_letter_record(
                        value, stage=STAGE, reason=reason, message=str(exc), event=event
                    )
                )
                continue
            out.append(
                (
                    p.profile_topic_name,
                    value,
                    record["customerId"].encode(),
                    [(H_KIND, KIND_RECOMMENDATION)],
                )
            )
        return out

    @p.app.agent(p.recommendations_topic, name="cdpflow.recommendations.route")
    async def route(stream: Any) -> None:
        await run_batches(p, stream, STAGE, handle)
