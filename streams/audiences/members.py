"""Current audience membership, read from the ``audience_state`` table's changelog topic.

The changelog is compacted and keyed by profile id; its latest value per key is
the profile's state as the agent last wrote it, and the agent writes a state only
after the AudienceUpdates it implies were acknowledged, so the membership read
here is what the platforms were sent. Reading it needs no running worker.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, TopicPartition

from streams.audiences.settings import changelog_topic
from streams.audiences.state import ProfileState
from streams.settings import Settings


class ChangelogMissing(RuntimeError):
    """The worker group's audience changelog topic does not exist."""


@dataclass(frozen=True)
class Member:
    profile_id: str
    identifiers: dict[str, str]


def read_states(
    settings: Settings,
    worker_id: str | None = None,
    *,
    timeout: float = 30.0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, ProfileState]:
    """The latest state of every profile (tombstones drop it), up to the current end."""
    topic = changelog_topic(worker_id or settings.cdp_worker_id)
    consumer = Consumer(
        {
            **settings.librdkafka_common(),
            "group.id": f"cdpflow-audiences-read-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            raise ChangelogMissing(
                f"topic {topic} not found: has a worker with CDP_AUDIENCES_CONFIG run in group "
                f"{worker_id or settings.cdp_worker_id!r}?"
            )
        ends: dict[int, int] = {}
        starts: list[TopicPartition] = []
        for partition in metadata.partitions:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout
            )
            if high > low:
                ends[partition] = high
                starts.append(TopicPartition(topic, partition, low))
        states: dict[str, ProfileState] = {}
        if not starts:
            return states
        consumer.assign(starts)
        while ends:
            for msg in consumer.consume(1000, 1.0):
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise RuntimeError(f"reading {topic}: {error}")
                partition, offset = msg.partition(), msg.offset()
                _apply(states, msg.key(), msg.value())
                if partition in ends and offset is not None and offset + 1 >= ends[partition]:
                    del ends[partition]
            if progress is not None:
                progress(len(states))
        return states
    finally:
        consumer.close()


def _apply(states: dict[str, ProfileState], key: bytes | None, value: bytes | None) -> None:
    if key is None:
        return
    pid = orjson.loads(key)
    if not isinstance(pid, str):
        return
    if value is None:
        states.pop(pid, None)
        return
    state: Any = orjson.loads(value)
    if isinstance(state, dict):
        states[pid] = state
    else:
        states.pop(pid, None)


def members_of(states: dict[str, ProfileState], audience: str, platform: str) -> list[Member]:
    """Profiles currently in (audience, platform), with the identifiers they were added with."""
    key = f"{audience}|{platform}"
    out = []
    for pid, state in states.items():
        entry = (state.get("m") or {}).get(key)
        if entry and entry.get("ids"):
            out.append(Member(pid, dict(entry["ids"])))
    out.sort(key=lambda m: m.profile_id)
    return out
