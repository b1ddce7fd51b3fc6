"""``cdpflow dlq replay``: send dead letters through their destination again.

A replay starts from the enriched record kept in the dead letter (not from the
old request), so a fix to the mapping, to the destination's settings or to the
vendor account takes effect: routing, consent and ``map`` run again, then the
same Deliverer as the live sink (batching limits, rate limit, retries, breaker,
bisecting). Outcomes: delivered; skipped (routing or consent now says no); or
still failing, which writes a *new* dead letter pointing at the old one
(``replayOf``). The old records stay: Kafka topics are append-only, and the
dedupe key makes a second replay of the same range harmless.

The range is taken by time (the broker's offsets-for-times index) and capped at
the end offsets seen when the replay starts, so its own new dead letters are
never replayed again in the same run.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from sinks.base import Destination, MappedEvent
from sinks.batching import split_by_limits
from sinks.dlq import (
    DLQ_PRODUCER_OVERRIDES,
    DeadLetterEntry,
    DeadLetterWriter,
    DlqCodec,
    Scrubber,
    SourceRecord,
    build_dead_letter,
    dlq_bounds,
    ensure_dlq_topics,
    fetch_original,
    read_dead_letters,
    secret_values,
)
from sinks.engine import (
    Deliverer,
    Failure,
    Prepared,
    Preparer,
    SinkEngineSettings,
    make_session,
    standalone_deliverer,
)
from sinks.metrics import RunnerStats
from sources.kafka_producer import ReliableProducer
from streams.serde import AvroSerde, RegistryUnavailable
from streams.settings import Settings

log = logging.getLogger("cdpflow.sink.replay")

CHUNK = 1000


@dataclass
class ReplaySummary:
    total: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    still_failing: Counter[str] = field(default_factory=Counter)
    skipped_reasons: Counter[str] = field(default_factory=Counter)


Progress = Callable[[int], None]


async def replay_dead_letters(
    destination: Destination[Any],
    *,
    settings: Settings,
    since_ms: int | None = None,
    until_ms: int | None = None,
    reason: str | None = None,
    engine: SinkEngineSettings | None = None,
    serde: AvroSerde | None = None,
    on_total: Callable[[int], None] | None = None,
    progress: Progress | None = None,
) -> ReplaySummary:
    """Replay ``destination``'s dead letters written in [since, until) (optionally one reason)."""
    engine = engine or SinkEngineSettings()
    serde = serde or AvroSerde.from_url(settings.schema_registry_url)
    name = destination.name
    await asyncio.to_thread(ensure_dlq_topics, settings, [name])
    codec = DlqCodec(serde)
    await asyncio.to_thread(codec.encoder, name)
    bounds = await asyncio.to_thread(dlq_bounds, settings, name, since_ms, until_ms)
    summary = ReplaySummary()
    if on_total is not None:
        on_total(sum(hi - lo for lo, hi in bounds.values()))
    if not bounds:
        return summary
    scrub = Scrubber(secret_values(destination.settings))
    preparer = Preparer(destination, serde)
    stats = RunnerStats()
    producer = ReliableProducer(settings, **DLQ_PRODUCER_OVERRIDES)
    writer = DeadLetterWriter(producer, codec)
    reader = read_dead_letters(settings, codec, name, bounds)
    try:
        async with make_session(destination) as session:
            deliverer = standalone_deliverer(destination, session, engine, stats)
            while True:
                chunk = await asyncio.to_thread(_next_chunk, reader)
                if not chunk:
                    break
                selected = [e for e in chunk if reason is None or e.record["reasonCode"] == reason]
                if progress is not None and len(selected) < len(chunk):
                    progress(len(chunk) - len(selected))
                await _replay_chunk(
                    selected,
                    destination,
                    preparer,
                    deliverer,
                    writer,
                    scrub,
                    summary,
                    progress,
                    settings,
                )
    finally:
        await asyncio.to_thread(reader.close)
        await asyncio.to_thread(producer.close, 10.0)
    return summary


def _next_chunk(reader: Generator[DeadLetterEntry, None, None]) -> list[DeadLetterEntry]:
    out: list[DeadLetterEntry] = []
    for entry in reader:
        out.append(entry)
        if len(out) >= CHUNK:
            break
    return out


async def _replay_chunk(
    entries: list[DeadLetterEntry],
    destination: Destination[Any],
    preparer: Preparer,
    deliverer: Deliverer,
    writer: DeadLetterWriter,
    scrub: Scrubber,
    summary: ReplaySummary,
    progress: Progress | None,
    settings: Settings,
) -> None:
    name = destination.name
    mapped: list[MappedEvent] = []
    refused: list[tuple[SourceRecord, Any]] = []
    for entry in entries:
        summary.total += 1
        record = entry.record
        value = record["originalBytes"]
        if not value and record.get("sourcePartition") is not None:
            # Kept by reference (too large for the DLQ topic): read it from the source.
            value = await asyncio.to_thread(
                fetch_original,
                settings,
                record["sourceTopic"],
                record["sourcePartition"],
                record["sourceOffset"],
            )
        source = SourceRecord(
            topic=record["sourceTopic"],
            partition=record.get("sourcePartition"),
            offset=record.get("sourceOffset"),
            value=value or b"",
            replay_of=entry.ref,
        )
        prepared: Prepared | None = None
        while prepared is None:
            try:
                prepared = preparer.prepare(source)
            except RegistryUnavailable as exc:
                log.warning("schema registry unavailable, retrying: %s", exc)
                await asyncio.sleep(1.0)
        if prepared.skip is not None:
            summary.skipped += 1
            summary.skipped_reasons[prepared.skip] += 1
            if progress is not None:
                progress(1)
        elif prepared.mapped is not None:
            mapped.append(prepared.mapped)
        else:
            refused.append((source, prepared.error))
    records = [build_dead_letter(name, source, error, scrub) for source, error in refused]
    for _, error in refused:
        summary.still_failing[error.reason] += 1
    for batch in split_by_limits(mapped, destination.limits):
        failures: list[Failure] = await deliverer.deliver(batch)
        failed_ids = {id(f.item) for f in failures}
        summary.delivered += sum(1 for item in batch if id(item) not in failed_ids)
        for f in failures:
            summary.still_failing[f.error.reason] += 1
            records.append(
                build_dead_letter(
                    name,
                    f.item.source,
                    f.error,
                    scrub,
                    request=f.request,
                    response=f.response,
                    attempts=f.attempts,
                )
            )
        if progress is not None:
            progress(len(batch))
    if records:
        await writer.write(name, records)
        summary.dead_lettered += len(records)
    if progress is not None and refused:
        progress(len(refused))
