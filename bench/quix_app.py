"""Scenario (c): cdpflow's pipeline written in Quix Streams 3.x, the best-known Python peer.

Runs in its own virtualenv (``.bench/quix-venv``, made by :mod:`bench.run`) as
``python -m bench.quix_app --bootstrap ... --registry ... --group ... --state-dir ...``.

Written the way Quix documents it, doing cdpflow's per-event work (:mod:`bench.work`):

* the raw topic's values go through a custom **Deserializer** for the Confluent
  wire format (cdpflow's :class:`~streams.serde.AvroSerde`, schema ids cached),
  the output's through a custom **Serializer** (the same encoder as the worker);
* ``validate`` applies the CDP rules; rejected events, like undecodable ones,
  reach the DLQ through Quix's error callbacks;
* ``group_by`` re-keys by the identity key (Quix's repartition topic, JSON, as
  Quix does by default), and a **stateful** ``apply`` keeps the
  ``anonymousId -> userId`` links in the RocksDB state store;
* Quix allows one ``group_by`` per dataframe, so the events go ``to_topic`` a
  profile topic keyed by profile id, where recommendation updates (keyed by
  customer id) join them, and a third dataframe's **stateful** ``apply`` holds a
  profile's traits and latest recommendations (cdpflow's profiles agent);
* the EnrichedEvent goes ``to_topic(cdp.events.enriched)``.

Timestamps are turned from datetimes into epoch millis before the first
repartition (Quix's JSON cannot carry datetimes; the Avro encoder takes both).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import time
from typing import Any

from confluent_kafka import Message, Producer
from quixstreams import Application, State, message_context  # type: ignore[import-not-found,unused-ignore]
from quixstreams.models import (  # type: ignore[import-not-found,unused-ignore]
    Deserializer,
    SerializationContext,
    Serializer,
    TopicConfig,
)

from bench import work
from streams import schemas, topics
from streams.events import EventRejected, Limits, Reason, check_rules, dead_letter, now_ms, to_ms
from streams.serde import AvroSerde, DecodeError, Encoder, RegistryUnavailable
from streams.settings import Settings

KIND = "kind"
KIND_REC = "rec"


class WireAvroDeserializer(Deserializer):  # type: ignore[misc]
    """Confluent wire format -> dict, resolved into cdpflow's reader schema."""

    def __init__(self, serde: AvroSerde, reader: str) -> None:
        super().__init__()
        self._serde = serde
        self._reader = reader

    def __call__(self, value: bytes, ctx: SerializationContext) -> Any:
        delay = 0.5
        while True:
            try:
                return self._serde.decode(value, reader=self._reader)[1]
            except RegistryUnavailable:
                time.sleep(delay)
                delay = min(delay * 2, 30.0)


class WireAvroSerializer(Serializer):  # type: ignore[misc]
    """dict -> Confluent wire format with the topic's registered schema id."""

    def __init__(self, encode: Encoder) -> None:
        self._encode = encode

    def __call__(self, value: Any, ctx: SerializationContext) -> bytes:
        return self._encode(value)


class DeadLetters:
    """Dead letters from Quix's error callbacks, through the collector's producer settings."""

    def __init__(self, settings: Settings, serde: AvroSerde) -> None:
        self._producer = Producer(settings.reliable_producer_config())
        self._encode = serde.encoder(topics.EVENTS_DLQ)
        self.count = 0

    def send(
        self,
        original: bytes | None,
        *,
        stage: str,
        reason: Reason | str,
        detail: str,
        topic: str | None,
        partition: int | None,
        offset: int | None,
        message_id: str | None = None,
    ) -> None:
        letter = dead_letter(
            original or b"",
            stage=stage,
            reason=reason,
            message=detail,
            topic=topic,
            partition=partition,
            offset=offset,
            message_id=message_id,
        )
        key = message_id.encode() if message_id else None
        self._producer.produce(topics.EVENTS_DLQ, self._encode(letter), key)
        self._producer.poll(0)
        self.count += 1

    def close(self) -> None:
        self._producer.flush(30)


def build_app(
    bootstrap: str, registry: str, group: str, state_dir: str, partitions: int
) -> tuple[Any, DeadLetters]:
    settings = Settings(kafka_bootstrap_servers=bootstrap, schema_registry_url=registry)
    serde = AvroSerde.from_url(registry)
    limits = Limits.from_settings(settings)
    worker_id = f"bench-quix@{socket.gethostname()}:{os.getpid()}"
    dead = DeadLetters(settings, serde)

    def on_consumer_error(exc: BaseException, message: Message | None, logger: Any) -> bool:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        if isinstance(cause, DecodeError) and message is not None:
            dead.send(
                message.value(),
                stage="validate",
                reason=cause.reason_code,
                detail=str(cause),
                topic=message.topic(),
                partition=message.partition(),
                offset=message.offset(),
            )
            return True
        return False

    def on_processing_error(exc: BaseException, row: Any, logger: Any) -> bool:
        if isinstance(exc, EventRejected) and row is not None:
            ctx = row.context
            value = row.value if isinstance(row.value, dict) else {}
            event = value.get("event", value)
            dead.send(
                serde.encode(topics.EVENTS_RAW, event) if event else None,
                stage="validate",
                reason=exc.reason,
                detail=exc.detail,
                topic=ctx.topic,
                partition=ctx.partition,
                offset=ctx.offset,
                message_id=event.get("messageId") if event else None,
            )
            return True
        return False

    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        state_dir=state_dir,
        on_consumer_error=on_consumer_error,
        on_processing_error=on_processing_error,
        # The worker's producer: lz4, 5 ms linger, idempotent acks=all.
        producer_extra_config={
            "compression.type": "lz4",
            "linger.ms": 5,
            "enable.idempotence": True,
            "acks": "all",
        },
        loglevel="INFO",
    )
    raw = app.topic(
        topics.EVENTS_RAW,
        key_deserializer="str",
        value_deserializer=WireAvroDeserializer(serde, schemas.CUSTOMER_EVENT),
    )
    updates = app.topic(
        topics.RECOMMENDATIONS_UPDATES,
        key_deserializer="str",
        value_deserializer=WireAvroDeserializer(serde, schemas.RECOMMENDATION_UPDATE),
    )
    enriched = app.topic(
        topics.EVENTS_ENRICHED,
        key_serializer="str",
        value_serializer=WireAvroSerializer(serde.encoder(topics.EVENTS_ENRICHED)),
    )

    def validate(record: dict[str, Any]) -> dict[str, Any]:
        check_rules(record, now=now_ms(), limits=limits)
        ctx = message_context()
        return {
            "event": work.timestamps_to_ms(record),
            "srcP": ctx.partition,
            "srcO": ctx.offset,
        }

    def stitch(value: dict[str, Any], state: State) -> dict[str, Any]:
        # The state is scoped to the message key, the identity key: the only link read
        # or written for this event (see bench.work.resolve_profile).
        profile_id, stitched = work.resolve_profile(
            value["event"],
            lambda _key: state.get("link"),
            lambda _key, user_id: state.set("link", user_id),
        )
        value["profileId"] = profile_id
        value["stitched"] = stitched
        return value

    def recommendation(record: dict[str, Any]) -> dict[str, Any]:
        work.check_recommendation(record)
        record["generatedAt"] = to_ms(record["generatedAt"])
        return {KIND: KIND_REC, "update": record}

    def profile(value: dict[str, Any], state: State) -> dict[str, Any] | None:
        if value.get(KIND) == KIND_REC:
            newer = work.newer_recommendations(state.get("recs"), value["update"])
            if newer is not None:
                state.set("recs", newer)
            return None
        event = value["event"]
        traits, changed = work.update_traits(event, state.get("traits"))
        if changed:
            state.set("traits", traits)
        return work.enrich(
            event,
            profile_id=value["profileId"],
            stitched=value["stitched"],
            traits=traits,
            recommendations=state.get("recs"),
            worker_id=worker_id,
            processed_at_ms=now_ms(),
            source_partition=value["srcP"],
            source_offset=value["srcO"],
        )

    # Quix allows one group_by per dataframe: the second re-key goes through an explicit
    # topic, which recommendation updates join too (as in cdpflow's profile hop).
    by_profile = app.topic(
        f"{group}-profile",
        key_serializer="str",
        key_deserializer="str",
        config=TopicConfig(num_partitions=partitions, replication_factor=1),
    )
    events = app.dataframe(raw).apply(validate)
    events = events.group_by(lambda v: work.identity_routing_key(v["event"]), name="identity")
    events = events.apply(stitch, stateful=True)
    events.to_topic(by_profile, key=lambda v: v["profileId"])
    recs = app.dataframe(updates).apply(recommendation)
    recs.to_topic(by_profile, key=lambda v: v["update"]["customerId"])
    profiles = app.dataframe(by_profile).apply(profile, stateful=True)
    profiles = profiles.filter(lambda v: v is not None)
    profiles.to_topic(enriched)
    return app, dead


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="cdpflow's pipeline in Quix Streams")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--partitions", type=int, default=6)
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app, dead = build_app(
        args.bootstrap, args.registry, args.group, args.state_dir, args.partitions
    )
    try:
        app.run()
    finally:
        dead.close()


if __name__ == "__main__":
    main()
