"""The audience agent: per-profile audience membership, kept in a Faust table, emitted as
``AudienceUpdate`` records to ``cdp.audiences.updates`` only when it changes.

Inputs, all keyed by canonical profile id and co-partitioned (same partition
count, murmur2 placement), so a profile's state is local to the worker that owns
its partition:

* ``cdp.events.enriched``: events (identify, referenced track events, deletion
  requests, events carrying consent; the rest is skipped before touching state);
* ``<group>-audience-repartition``: recommendation updates forwarded by the
  recommendations route agent (header ``cdp-kind: rec``) and clock ticks
  (header ``cdp-kind: tick``, value = the sender's clock in epoch ms).

Time passing: a timer sends a tick every ``CDP_AUDIENCES_TICK_S`` to each
partition of the repartition topic this worker owns. A tick re-evaluates the
partition's profiles whose ``next_change_at`` has come, from an in-memory heap
per partition (rebuilt from the table, lazily, on the first tick after a
rebalance). Ticks travel through the partition itself, so they are processed in
order with the partition's events, by the agent that owns the state, after
table recovery.

Delivery: a batch's updates are produced and acknowledged by the broker BEFORE
the batch's new states are written to the table (and so to its changelog), and
only then does Faust ack the input offsets. A crash in between replays the batch
against the old state, which emits the same updates again with the same
``updateId`` (at-least-once with stable ids) instead of losing them.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import Counter

from sources.kafka_producer import OutRecord
from streams import schemas, topics
from streams.audiences.config import AudiencesConfig, load_config
from streams.audiences.rules import AudienceRules, Trigger
from streams.audiences.settings import (
    AUDIENCE_REPARTITION_SUFFIX,
    AUDIENCE_STATE_TABLE,
    AudienceSettings,
)
from streams.audiences.state import ProfileState, new_state
from streams.events import now_ms, to_ms
from streams.pipeline import (
    H_KIND,
    KIND_RECOMMENDATION,
    Pipeline,
    bind_event,
    header_map,
    run_batches,
)
from streams.serde import DecodeError

log = logging.getLogger(__name__)

STAGE = "audiences"
KIND_TICK = b"tick"


class AudienceMetrics:
    def __init__(self, p: Pipeline) -> None:
        r = p.metrics.registry
        self.updates = Counter(
            "cdp_audience_updates_total",
            "AudienceUpdate records emitted",
            ["audience", "platform", "action"],
            registry=r,
        )
        self.evaluated = Counter(
            "cdp_audience_profiles_evaluated_total",
            "Profile evaluations (after an input changed a state, or a window came due)",
            ["trigger"],
            registry=r,
        )
        self.no_identifiers = Counter(
            "cdp_audience_no_identifiers_total",
            "Evaluations where a consenting profile matched but the platform had no identifier",
            ["platform"],
            registry=r,
        )


@dataclass
class _Schedule:
    """Per partition: when each profile's membership may next change (window expiry)."""

    heap: list[tuple[int, str]] = field(default_factory=list)
    at: dict[str, int] = field(default_factory=dict)
    built: bool = False

    def set(self, pid: str, when: int | None) -> None:
        if when is None:
            self.at.pop(pid, None)
            return
        if self.at.get(pid) == when:
            return
        self.at[pid] = when
        heapq.heappush(self.heap, (when, pid))

    def due(self, now: int) -> list[str]:
        out: list[str] = []
        while self.heap and self.heap[0][0] <= now:
            when, pid = heapq.heappop(self.heap)
            if self.at.get(pid) == when:  # else superseded by a later schedule
                del self.at[pid]
                out.append(pid)
        return out


class AudienceAgent:
    def __init__(
        self,
        p: Pipeline,
        config: AudiencesConfig,
        settings: AudienceSettings,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.p = p
        self.config = config
        self.settings = settings
        self.clock = clock
        self.rules = AudienceRules(config)
        self.updater = self.rules.updater
        self.metrics = AudienceMetrics(p)
        n = p.settings.cdp_topic_partitions
        self.repartition_name = topics.internal_topic(
            p.settings.cdp_worker_id, AUDIENCE_REPARTITION_SUFFIX
        )
        app = p.app
        self.source = app.topic(
            topics.EVENTS_ENRICHED,
            self.repartition_name,
            partitions=n,
            key_serializer="raw",
            value_serializer="raw",
            allow_empty=True,
        )
        self.tick_topic = app.topic(
            self.repartition_name,
            partitions=n,
            key_serializer="raw",
            value_serializer="raw",
            allow_empty=True,
        )
        self.table = app.Table(AUDIENCE_STATE_TABLE, default=None, partitions=n)
        self.encode = p.serde.encoder(topics.AUDIENCES_UPDATES)
        self.schedules: dict[int, _Schedule] = {}

    # ------------------------------------------------------------------ wiring

    def register(self) -> None:
        app = self.p.app

        @app.agent(self.source, name="cdpflow.audiences.membership")
        async def membership(stream: Any) -> None:
            await run_batches(self.p, stream, STAGE, self.handle)

        @app.timer(interval=self.settings.tick_s)  # type: ignore[untyped-decorator]
        async def audience_clock() -> None:
            await self.send_ticks()

        @app.on_partitions_assigned.connect  # type: ignore[arg-type,untyped-decorator]
        async def on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
            # Another worker may have changed states of partitions we get back.
            self.schedules.clear()

    async def send_ticks(self) -> None:
        try:
            assignment = self.p.app.consumer.assignment()
        except Exception:  # consumer not started yet
            return
        now = self.clock()
        for tp in sorted(assignment):
            if tp.topic == self.repartition_name:
                await self.tick_topic.send(
                    key=None,
                    value=str(now).encode(),
                    partition=tp.partition,
                    headers=[(H_KIND, KIND_TICK)],
                )

    # ---------------------------------------------------------------- handling

    def _schedule(self, partition: int) -> _Schedule:
        schedule = self.schedules.get(partition)
        if schedule is None:
            schedule = self.schedules[partition] = _Schedule()
        return schedule

    def _build(self, partition: int, schedule: _Schedule, now: int) -> None:
        """Schedule every stored profile of ``partition`` not scheduled yet (after a rebalance)."""
        partition_of = self.p.partition_of
        for pid, state in self.table.items():
            if pid in schedule.at or partition_of(pid.encode()) != partition or not state:
                continue
            schedule.set(pid, self.rules.next_change_at(state, now))
        schedule.built = True

    async def handle(self, stream: Any, events: Sequence[Any]) -> list[OutRecord]:
        now = self.clock()
        touched: dict[str, tuple[ProfileState, Any]] = {}
        out: list[OutRecord] = []
        emitted = [0]

        def load(pid: str) -> ProfileState:
            if pid in touched:
                return touched[pid][0]
            stored = self.table.get(pid)
            # A copy: the table keeps the old state until the updates are acknowledged.
            return orjson.loads(orjson.dumps(stored)) if stored else new_state(pid)

        def evaluate(pid: str, state: ProfileState, event: Any, trigger: Trigger) -> None:
            updates = self.rules.transition(state, now, trigger, self._no_identifiers)
            self.metrics.evaluated.labels(trigger.kind).inc()
            touched[pid] = (state, event)
            self._schedule(event.message.partition).set(pid, self.rules.next_change_at(state, now))
            emitted[0] += len(updates)
            for u in updates:
                out.append((topics.AUDIENCES_UPDATES, self.encode(u), pid.encode(), None))
                self.metrics.updates.labels(u["audience"], u["platform"], u["action"]).inc()

        for event in events:
            message = event.message
            value = event.value
            if message.topic == topics.EVENTS_ENRICHED:
                try:
                    _, record = await self.p.decode(value, schemas.ENRICHED_EVENT)
                except DecodeError as exc:
                    out.append(self._dead_letter(value, exc, event))
                    continue
                if not self.updater.is_relevant(record):
                    continue
                pid = record["profileId"]
                state = load(pid)
                if not self.updater.apply_event(state, record, now, message.offset):
                    continue
                ev = record["event"]
                trigger = Trigger(
                    "event", to_ms(ev["timestamp"]), ev["messageId"], to_ms(ev["receivedAt"])
                )
                evaluate(pid, state, event, trigger)
                continue
            kind = header_map(event.headers).get(H_KIND)
            if kind == KIND_RECOMMENDATION:
                try:
                    _, rec = await self.p.decode(value, schemas.RECOMMENDATION_UPDATE)
                except DecodeError as exc:
                    out.append(self._dead_letter(value, exc, event))
                    continue
                pid = rec["customerId"]
                state = load(pid)
                if not self.updater.apply_recommendation(state, rec):
                    continue
                trigger = Trigger("recommendation", to_ms(rec["generatedAt"]), rec["updateId"])
                evaluate(pid, state, event, trigger)
            elif kind == KIND_TICK:
                schedule = self._schedule(message.partition)
                if not schedule.built:
                    self._build(message.partition, schedule, now)
                for pid in schedule.due(now):
                    stored = touched.get(pid, (None, None))[0] or self.table.get(pid)
                    if not stored:
                        continue
                    state = load(pid)
                    evaluate(pid, state, event, Trigger.clock(now))
        # Updates first (acknowledged by the broker), then the states that record them.
        await self.p.sender.send(out)
        for pid, (state, event) in touched.items():
            bind_event(stream, event)
            self.table[pid] = state
        if emitted[0]:
            self.p.metrics.events_out.labels(STAGE, topics.AUDIENCES_UPDATES).inc(emitted[0])
        return []

    def _no_identifiers(self, platform: str) -> None:
        self.metrics.no_identifiers.labels(platform).inc()

    def _dead_letter(self, value: bytes | None, exc: DecodeError, event: Any) -> OutRecord:
        return self.p.dead_letter_record(
            value, stage=STAGE, reason=exc.reason_code, message=str(exc), event=event
        )


def register(p: Pipeline, *, clock: Callable[[], int] = now_ms) -> None:
    """Wire the audience agent when ``CDP_AUDIENCES_CONFIG`` is set (else do nothing).

    An invalid config raises :class:`~streams.audiences.config.AudienceConfigError`
    naming file and line, so the worker refuses to start.
    """
    settings = AudienceSettings()
    if not settings.config:
        return
    config = load_config(settings.config)
    AudienceAgent(p, config, settings, clock).register()
    log.info(
        "audiences: %d audience(s) from %s (version %s)",
        len(config.audiences),
        settings.config,
        config.version,
    )
