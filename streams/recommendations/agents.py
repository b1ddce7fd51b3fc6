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
from streams.audiences.settings import audience_repartition_topic
from streams.events import EventRejected, check_recommendation
from streams.pipeline import H_KIND, KIND_RECOMMENDATION, Pipeline, run_batches
from streams.serde import DecodeError

STAGE = "recommendations"


def register(p: Pipeline) -> None:
    # With audiences configured, valid updates also go (same bytes, keyed by customer)
    # to the audience agent's repartition topic.
    audience_topic = audience_repartition_topic(p.settings)

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
            key = record["customerId"].encode()
            out.append((p.profile_topic_name, value, key, [(H_KIND, KIND_RECOMMENDATION)]))
            if audience_topic is not None:
                out.append((audience_topic, value, key, [(H_KIND, KIND_RECOMMENDATION)]))
        return out

    @p.app.agent(p.recommendations_topic, name="cdpflow.recommendations.route")
    async def route(stream: Any) -> None:
        await run_batches(p, stream, STAGE, handle)
