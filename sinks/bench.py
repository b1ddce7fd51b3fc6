"""Delivered events per second, per destination, against its local emulator.

For ``make bench`` (:func:`bench_destinations`, :func:`render_destinations_table`)
and the demo (:func:`delivery_rates`). Each destination gets a backlog on a
private topic of its source kind, and its engine (a :class:`SinkService` with
that one destination, as ``cdpflow sink run`` would start it) drains it while
the emulators run in their own process, so the vendor stand-in does not share
the engine's GIL:

* event destinations (segment, mixpanel, aep, ga4) read realistic
  EnrichedEvents (page views, product views, orders of a few hundred shoppers);
* ad-audience destinations (``Destination.source == "audience"``) read
  AudienceUpdate records for one audience the platform's emulator is told to
  know: about three ADDs to one REMOVE, interleaved, each REMOVE carrying the
  identifiers its ADD carried. Identifiers come from
  :func:`streams.audiences.identifiers.identifiers_for`, so they are hashed and
  normalised exactly as the audience agent would emit them.

Why these numbers mean something:

* The rate is ``delivered / (last event finished - first record read)``: it
  includes decoding, mapping and batching, and excludes the service start
  (topics, schema registration, group join). It is the throughput of the sink on
  a backlog, bounded by the destination's own limits (requests/s, concurrency,
  events per request), which are left at their defaults.
* Latencies are the engine's (``receivedAt`` / ``triggerReceivedAt`` ->
  accepted by the vendor), counted from the first read rather than from
  production: a backlog's records share one ``receivedAt``, and the time they
  waited for their destination's turn is taken off (:func:`burst_latencies`).
  What is left is how long the k-th event of a burst of N waits: queueing,
  which grows with N, not the latency of a steady stream.
* ``requests`` counts logical requests (a Google Ads job flow, create ->
  addOperations -> run, is one).

Time: the whole section keeps to ``budget_s``. Producing the backlogs (building
and encoding records is most of the section's CPU) may take at most
:data:`PRODUCE_SHARE` of it; a backlog not finished in its part is cut, and the
smaller count is what that destination is measured on (and its note says so).
Destinations whose requests carry few events (GA4: one user per request, at most
25 events) get at most :data:`REQUEST_ROUNDS` requests' worth of events and run
last, so they inherit the time faster ones leave. Each run gets an equal part of
what is left, may go on up to twice that when its rate so far says it will then
finish, and is otherwise cut; a cut run is reported with its partial count and
a note, never dropped. Rates are comparable across destinations only roughly:
the machine's load and the emulators' own cost are part of every number.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from confluent_kafka.admin import AdminClient

from sinks import registry
from sinks.base import Destination
from sinks.engine import (
    SinkEngineSettings,
    SinkRunner,
    SinkService,
    emulator_env,
    load_destinations,
)
from sinks.metrics import RunnerStats
from sources.kafka_producer import ReliableProducer
from streams import topics
from streams.audiences.identifiers import UnknownPlatformError, identifiers_for
from streams.audiences.rules import update_id
from streams.events import from_segment, now_ms
from streams.profiles.enrich import build_enriched
from streams.serde import AvroSerde
from streams.settings import Settings
from streams.topics import TopicSpec, ensure_topics

UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
)
CONSENT = {"categoryPreferences": {c: True for c in ("Advertising", "Analytics", "Marketing")}}

#: A destination gets at most this many full requests' worth of events: enough
#: requests for a steady rate, and a destination with small requests (GA4's 25
#: events, one user each) still finishes within its share.
REQUEST_ROUNDS = 100
#: Share of REMOVEs among the audience updates (the rest are ADDs).
REMOVE_SHARE = 0.25
#: Seconds kept back per destination for stopping its engine and reading the
#: emulator's state; the engine's shutdown grace is set to 1 s for the bench.
STOP_ALLOWANCE_S = 3.0
#: Producing the backlogs may take at most this part of the budget (a slow machine
#: gets smaller backlogs, and still time to measure every destination).
PRODUCE_SHARE = 0.5
#: Kept back at the end for stopping the emulators and deleting the private topics.
TEARDOWN_S = 3.0
#: A destination is not started with less than this left of the budget.
MIN_SHARE_S = 5.0


@dataclass(frozen=True)
class BenchAudience:
    """The audience an ad platform's emulator is told to know, and its id in the updates."""

    #: Emulator constructor keyword listing the platform audiences it knows.
    emulator_kwarg: str
    #: The emulator's own id of the audience (what goes into ``emulator_kwarg``).
    emulator_id: str
    #: ``platformAudienceId`` as the audience agent writes it; ``{name}`` fields
    #: are filled from the emulator's credentials (Google Ads' customer id).
    audience_id: str


#: Per ad platform: the bench audience. A platform missing here is reported as not run.
BENCH_AUDIENCES: dict[str, BenchAudience] = {
    "meta": BenchAudience("audiences", "23850000000000777", "23850000000000777"),
    "google_ads": BenchAudience("user_lists", "7001", "customers/{customer_id}/userLists/7001"),
    "linkedin": BenchAudience("segments", "900777", "900777"),
}


@dataclass
class DeliveryRate:
    """One destination's run (``asdict`` of it is the JSON of ``make bench``)."""

    destination: str
    #: ``enriched`` (cdp.events.enriched records) or ``audience`` (AudienceUpdate records).
    source: str
    #: Records in its backlog.
    produced: int = 0
    #: Delivered (accepted by the vendor).
    events: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    #: Whether every record of the backlog was finished (delivered, dead-lettered, skipped).
    complete: bool = False
    seconds: float = 0.0
    events_per_s: float | None = None
    requests: int = 0
    retries: int = 0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    #: Identifier values the emulator found unhashed (must be 0), and items it refused.
    vendor_pii_violations: int | None = None
    vendor_rejected_items: int | None = None
    #: Its turn from start to stop (engine start-up, draining, shutdown).
    wall_s: float | None = None
    #: Why it did not run, or did not finish.
    note: str | None = None


# --------------------------------------------------------------------------- backlogs


def _event(i: int, run: str, users: int) -> dict[str, Any]:
    user = f"bench-{run}-{i % users}"
    kind = i % 4
    msg: dict[str, Any] = {
        "messageId": f"{run}-{i}",
        "userId": user,
        "anonymousId": f"anon-{run}-{i % users}",
        "context": {
            "ip": "203.0.113.7",
            "userAgent": UA,
            "page": {"url": f"https://shop.example/p/{i % 50}?utm_source=bench"},
            "traits": {"email": f"{user}@example.com"},
            "consent": CONSENT,
        },
    }
    if kind == 0:
        msg.update(type="page", name="Product", properties={"sku": f"sku-{i % 50}"})
    elif kind == 3:
        msg.update(
            type="track",
            event="Order Completed",
            properties={
                "order_id": f"o-{run}-{i}",
                "revenue": 42.5,
                "currency": "EUR",
                "products": [{"product_id": f"sku-{i % 50}", "price": 42.5, "quantity": 1}],
            },
        )
    else:
        msg.update(
            type="track",
            event="Product Viewed",
            properties={"product_id": f"sku-{i % 50}", "price": 42.5, "currency": "EUR"},
        )
    return msg


def _produce(
    settings: Settings,
    topic: str,
    records: Iterator[tuple[str, bytes]],
    deadline: float | None = None,
) -> int:
    """Produce ``records`` (stopping early at ``deadline``); the number acknowledged."""
    producer = ReliableProducer(settings)
    pending = []
    try:
        for key, value in records:
            pending.append(producer.produce(topic, value, key=key))
            if deadline is not None and len(pending) % 100 == 0 and time.monotonic() > deadline:
                break
        for fut in pending:
            fut.result(60)
    finally:
        producer.close()
    return len(pending)


def produce_backlog(
    settings: Settings,
    serde: AvroSerde,
    topic: str,
    events: int,
    users: int = 500,
    *,
    received_at_ms: int | None = None,
    deadline: float | None = None,
) -> int:
    """``events`` EnrichedEvents (page views, product views, orders) of ``users`` shoppers.

    All share one ``receivedAt`` (``received_at_ms``, default now), so the engine's
    latency of each can be taken from any instant (see :func:`measure_backlog`).
    """
    run = uuid.uuid4().hex[:8]
    encode = serde.encoder(topics.EVENTS_ENRICHED)
    stamp = now_ms() if received_at_ms is None else received_at_ms

    def records() -> Iterator[tuple[str, bytes]]:
        for i in range(events):
            record = from_segment(_event(i, run, users), received_at_ms=stamp)
            enriched = build_enriched(
                record,
                profile_id=record["userId"],
                stitched=False,
                traits=None,
                recommendations=None,
                worker_id="bench",
                pipeline_version="bench",
                processed_at_ms=now_ms(),
                source_partition=None,
                source_offset=None,
            )
            yield record["userId"], encode(enriched)

    return _produce(settings, topic, records(), deadline)


_FIRST = ("Jane", "Oskar", "Amélie", "Kenji", "Priya", "Lukas", "María", "Tom", "Zoë", "Ahmed")
_LAST = ("Doe", "Müller", "Martin", "Tanaka", "Sharma", "O'Neil", "García", "van Dijk", "Ng")


def _phone(i: int, country: str) -> str:
    """A valid number in the profile's national format (international when it has no country)."""
    if country == "US":
        return f"(415) 2{i % 100:02d}-{i % 10_000:04d}"
    if country == "DE":
        return f"030 {1_000_000 + i % 9_000_000}"
    if country == "GB":
        return f"020 7{i % 1000:03d} {i % 10_000:04d}"
    return f"+33 1 42 {i % 100:02d} {i // 100 % 100:02d} {i // 10_000 % 100:02d}"


_PLACES = (
    ("US", "San Francisco", "California", "94105-1804"),
    ("DE", "Berlin", "Berlin", "10115"),
    ("GB", "London", "", "SW1A 1AA"),
    ("FR", "Paris", "", "75001"),
)


def bench_traits(i: int) -> dict[str, Any]:
    """Identify traits of shopper ``i``, as messy as real ones (case, spaces, accents).

    Every profile has an email (so every platform can match it); two in three a
    phone, four in five an address.
    """
    first, last = _FIRST[i % len(_FIRST)], _LAST[i // len(_FIRST) % len(_LAST)]
    if i % 4 == 3:
        email = f"{first.lower()}.{last.lower().replace(' ', '')}{i}@gmail.com"
    else:
        email = f" {first}.{last.replace(' ', '')}.{i}@Example.COM "
    traits: dict[str, Any] = {"email": email, "firstName": first, "lastName": last}
    country, city, state, postal = _PLACES[i % len(_PLACES)]
    if i % 5 != 4:
        traits["address"] = {
            "city": city,
            "state": state,
            "postalCode": postal,
            "country": country,
        }
        if i % 3 != 2:
            traits["phone"] = _phone(i, country)
    elif i % 3 != 2:
        traits["phone"] = _phone(i, "FR")
    return traits


def audience_plan(n: int, seed: int = 7) -> list[tuple[int, Literal["ADD", "REMOVE"]]]:
    """``n`` membership changes: (profile index, action), ADDs and REMOVEs interleaved.

    A REMOVE always takes out a current member; a removed profile is not added
    again (so every profile has at most one ADD and one REMOVE).
    """
    rng = random.Random(seed)
    members: list[int] = []
    plan: list[tuple[int, Literal["ADD", "REMOVE"]]] = []
    next_profile = 0
    for _ in range(n):
        if members and rng.random() < REMOVE_SHARE:
            index = rng.randrange(len(members))
            members[index], members[-1] = members[-1], members[index]
            plan.append((members.pop(), "REMOVE"))
        else:
            plan.append((next_profile, "ADD"))
            members.append(next_profile)
            next_profile += 1
    return plan


def audience_updates(
    platform: str,
    audience_id: str,
    n: int,
    *,
    default_country: str = "US",
    received_at_ms: int | None = None,
) -> Iterator[dict[str, Any]]:
    """AudienceUpdate records as the audience agent writes them (see :func:`audience_plan`).

    All share one ``triggerReceivedAt`` (``received_at_ms``, default now). Raises
    :class:`UnknownPlatformError` for a platform without identifier rules.
    """
    run = uuid.uuid4().hex[:8]
    now = now_ms() if received_at_ms is None else received_at_ms
    audience = "bench-high-intent"
    identifiers: dict[int, dict[str, str]] = {}
    for profile, action in audience_plan(n):
        if action == "ADD":
            identifiers[profile] = identifiers_for(
                platform, bench_traits(profile), default_country=default_country
            )
        ids = identifiers[profile]
        version = 1 if action == "ADD" else 2
        profile_id = f"bench-{run}-{profile}"
        yield {
            "updateId": update_id(audience, platform, profile_id, action, version),
            "audience": audience,
            "audienceVersion": "bench",
            "platform": platform,
            "platformAudienceId": audience_id,
            "profileId": profile_id,
            "action": action,
            "reason": "RULE_MATCHED" if action == "ADD" else "RULE_UNMATCHED",
            "identifiers": ids,
            "membershipVersion": version,
            "occurredAt": now,
            "triggerMessageId": f"bench-{run}-trigger-{profile}-{version}",
            "triggerReceivedAt": now,
            "emittedAt": now,
        }


def produce_audience_backlog(
    settings: Settings,
    serde: AvroSerde,
    topic: str,
    platform: str,
    audience_id: str,
    n: int,
    *,
    received_at_ms: int | None = None,
    deadline: float | None = None,
) -> int:
    """``n`` AudienceUpdate records for ``platform`` to ``topic`` (keyed by profileId)."""
    encode = serde.encoder(topics.AUDIENCES_UPDATES)
    updates = audience_updates(platform, audience_id, n, received_at_ms=received_at_ms)
    records = ((u["profileId"], encode(u)) for u in updates)
    return _produce(settings, topic, records, deadline)


# --------------------------------------------------------------------------- measuring


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    """Destination settings are read from the environment: set the emulators' env for a while."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _started(runner: SinkRunner) -> bool:
    """Whether the runner has read anything yet (a lane that has seen an offset)."""
    return any(lane.tracker.position() is not None for lane in list(runner.lanes.values()))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def burst_latencies(stats: RunnerStats, offset_s: float) -> RunnerStats:
    """The engine's latencies counted from the first read instead of the common ``receivedAt``.

    A backlog's records share one ``receivedAt``, produced a while before its
    destination's turn; ``offset_s`` (first read - receivedAt) is that wait, and
    what is left is how long each event of a burst of N took once the engine
    began reading: queueing behind the others plus its own delivery.
    """
    return RunnerStats(latencies=deque(max(0.0, x - offset_s) for x in stats.latencies))


async def measure_backlog(
    destination: Destination[Any],
    settings: Settings,
    serde: AvroSerde,
    topic: str,
    rate: DeliveryRate,
    share_s: float,
    received_at_ms: int,
    max_s: float | None = None,
) -> None:
    """Run ``destination`` on its backlog until it is drained or ``share_s`` is used up.

    A run still making progress at the end of its share may go on up to ``max_s``
    when its rate so far says it will finish by then (the destinations after it
    share what is left). ``received_at_ms`` is the backlog's common ``receivedAt``
    (see :func:`burst_latencies`).
    """
    name = destination.name
    engine = SinkEngineSettings(
        source_topic=topic,
        audience_topic=topic,
        group_prefix=f"cdpflow-bench-{uuid.uuid4().hex[:8]}-",
        shutdown_grace_s=1.0,
    )
    service = SinkService([destination], settings, engine, serde=serde)
    started = time.monotonic()
    deadline = started + max(0.0, share_s - STOP_ALLOWANCE_S)
    limit = started + max(0.0, (max_s or share_s) - STOP_ALLOWANCE_S)
    task = asyncio.create_task(service.run())
    first: float | None = None
    first_wall_ms = 0
    done = time.monotonic()
    try:
        await asyncio.wait_for(service.wait_started(), max(1.0, deadline - time.monotonic()))
        runner = service.runners[name]
        while True:
            now = time.monotonic()
            if first is None and _started(runner):
                first = now - 0.01  # it read something within the last poll interval
                first_wall_ms = now_ms() - 10
            s = runner.stats
            if s.delivered + s.dead_lettered + s.skipped >= rate.produced:
                rate.complete = True
                break
            if runner.state == "failed":
                _note(rate, f"failed: {runner.failure}")
                break
            if task.done():
                _note(rate, "the engine stopped by itself")
                break
            if now >= deadline:
                finished = s.delivered + s.dead_lettered + s.skipped
                if first is not None and finished and deadline < limit:
                    eta = (rate.produced - finished) / (finished / (now - first))
                    if now + 1.2 * eta + 0.5 <= limit:
                        deadline = now + 1.2 * eta + 0.5
                        continue
                _note(
                    rate,
                    f"cut at its time share ({now - started:.0f} s): {finished:,} of "
                    f"{rate.produced:,} finished"
                    if first is not None
                    else f"read nothing within its time share ({now - started:.0f} s)",
                )
                break
            await asyncio.sleep(0.02)
        done = time.monotonic()
        s = runner.stats
        rate.events, rate.dead_lettered, rate.skipped = s.delivered, s.dead_lettered, s.skipped
        rate.requests, rate.retries = s.requests, s.retries
        burst = burst_latencies(s, max(0, first_wall_ms - received_at_ms) / 1000.0)
        rate.latency_p50_ms = _ms(burst.percentile(0.5))
        rate.latency_p99_ms = _ms(burst.percentile(0.99))
    except TimeoutError:
        _note(rate, f"the engine did not start within its time share ({share_s:.0f} s)")
    finally:
        service.stop()
        await task
    if first is not None:
        rate.seconds = round(done - first, 3)
        rate.events_per_s = round(rate.events / rate.seconds, 1) if rate.seconds > 0 else None


def _target(destination: Destination[Any], events: int) -> int:
    return max(1, min(events, REQUEST_ROUNDS * destination.limits.max_batch_events))


def _delete_topics(settings: Settings, names: Sequence[str]) -> None:
    if not names:
        return
    admin = AdminClient(settings.librdkafka_common())
    for fut in admin.delete_topics(list(names), operation_timeout=10).values():
        with contextlib.suppress(Exception):
            fut.result(15)


@dataclass
class _Plan:
    """What the section will run: loaded destinations, their backlog sizes and topics."""

    rates: dict[str, DeliveryRate] = field(default_factory=dict)
    destinations: dict[str, Destination[Any]] = field(default_factory=dict)
    topic_of: dict[str, str] = field(default_factory=dict)
    #: The common receivedAt of each destination's backlog (epoch ms).
    stamp_of: dict[str, int] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)


@dataclass
class _Backlog:
    """One private topic and the destinations that read it."""

    topic: str
    target: int
    names: list[str]
    #: Ad platform and ``platformAudienceId`` (audience backlogs only).
    platform: str | None = None
    audience_id: str = ""


def _note(rate: DeliveryRate, text: str) -> None:
    rate.note = f"{rate.note}; {text}" if rate.note else text


def _prepare(
    settings: Settings,
    serde: AvroSerde,
    wanted: Sequence[str],
    env: Mapping[str, str],
    credentials: Mapping[str, Mapping[str, str]],
    events: int,
    partitions: int,
    produce_until: float,
    plan: _Plan,
) -> None:
    """Load each destination with the emulators' env and produce its backlog by ``produce_until``.

    Each backlog gets an equal part of the time left; one that is not finished by
    then is cut (its destination is told so in its note), so a slow machine
    still leaves time to measure every destination.
    """
    with _environ(env):
        configs = load_destinations(list(wanted))
    run = uuid.uuid4().hex[:8]
    backlogs: dict[str, _Backlog] = {}
    for config in configs:
        name = config.name
        rate = plan.rates[name]
        if config.destination is None:
            rate.note = f"not run: {config.problem}"
            continue
        dest = config.destination
        target = _target(dest, events)
        if dest.source == "audience":
            bench = BENCH_AUDIENCES.get(name)
            if bench is None:
                rate.note = (
                    "not run: no bench audience for this platform (sinks.bench.BENCH_AUDIENCES)"
                )
                continue
            audience_id = bench.audience_id.format(**credentials.get(name, {}))
            backlogs[name] = _Backlog(
                f"cdp.bench.sinks.{run}.{name}", target, [name], name, audience_id
            )
        else:
            key = f"enriched-{target}"
            backlog = backlogs.setdefault(key, _Backlog(f"cdp.bench.sinks.{run}.{key}", target, []))
            backlog.names.append(name)
        plan.destinations[name] = dest
    if not backlogs:
        return
    ensure_topics(settings, [TopicSpec(b.topic, partitions, {}) for b in backlogs.values()])
    plan.created.extend(b.topic for b in backlogs.values())
    for i, backlog in enumerate(backlogs.values()):
        deadline = time.monotonic() + (produce_until - time.monotonic()) / (len(backlogs) - i)
        stamp = now_ms()
        try:
            if backlog.platform is not None:
                produced = produce_audience_backlog(
                    settings,
                    serde,
                    backlog.topic,
                    backlog.platform,
                    backlog.audience_id,
                    backlog.target,
                    received_at_ms=stamp,
                    deadline=deadline,
                )
            else:
                produced = produce_backlog(
                    settings,
                    serde,
                    backlog.topic,
                    backlog.target,
                    received_at_ms=stamp,
                    deadline=deadline,
                )
        except UnknownPlatformError:
            for name in backlog.names:
                plan.rates[name].note = "not run: streams.audiences.identifiers has no rules for it"
                del plan.destinations[name]
            continue
        for name in backlog.names:
            rate = plan.rates[name]
            rate.produced = produced
            plan.topic_of[name] = backlog.topic
            plan.stamp_of[name] = stamp
            if produced < backlog.target:
                _note(
                    rate,
                    f"backlog cut to {produced:,} of {backlog.target:,}: producing it ran "
                    "out of its part of the budget",
                )


def _run_all(
    settings: Settings,
    wanted: Sequence[str],
    *,
    events: int,
    partitions: int,
    deadline: float,
    progress: Callable[[str], None],
) -> tuple[list[DeliveryRate], float]:
    """Every destination's rate, and the seconds taken by the setup (emulators, backlogs)."""
    from sinks.emulators import EMULATORS, start_all

    t0 = time.monotonic()
    setup_s = 0.0
    classes = registry.load_all()
    plan = _Plan()
    for name in wanted:
        plan.rates[name] = DeliveryRate(name, classes[name].source)
    runnable = [n for n in wanted if n in EMULATORS]
    for name in wanted:
        if name not in EMULATORS:
            plan.rates[name].note = "not run: no emulator (sinks.emulators.EMULATORS)"
    if not runnable:
        return list(plan.rates.values()), setup_s
    configs = {
        name: {bench.emulator_kwarg: [bench.emulator_id]}
        for name in runnable
        if (bench := BENCH_AUDIENCES.get(name)) is not None and classes[name].source == "audience"
    }
    serde = AvroSerde.from_url(settings.schema_registry_url)
    try:
        with start_all(runnable, mode="process", configs=configs) as cluster:
            progress(f"sinks: emulators up; producing backlogs of up to {events:,} records")
            _prepare(
                settings,
                serde,
                runnable,
                emulator_env(cluster),
                cluster.credentials,
                events,
                partitions,
                time.monotonic() + PRODUCE_SHARE * (deadline - time.monotonic()),
                plan,
            )
            setup_s = round(time.monotonic() - t0, 1)
            # Small requests last: they inherit the time the others leave.
            order = sorted(
                plan.destinations,
                key=lambda n: -plan.destinations[n].limits.max_batch_events,
            )
            for i, name in enumerate(order):
                rate = plan.rates[name]
                left = deadline - TEARDOWN_S - time.monotonic()
                # An equal part of what is left, but enough to start and stop an engine:
                # when time is short the last ones are not run, rather than all cut.
                share = max(left / (len(order) - i), MIN_SHARE_S)
                if left < MIN_SHARE_S:
                    _note(rate, f"not run: the section's budget was used up ({left:.0f} s left)")
                    continue
                progress(f"sinks: {name} ({rate.produced:,} records, up to {share:.0f} s)")
                began = time.monotonic()
                try:
                    asyncio.run(
                        measure_backlog(
                            plan.destinations[name],
                            settings,
                            serde,
                            plan.topic_of[name],
                            rate,
                            share,
                            plan.stamp_of[name],
                            # Up to twice its share, leaving the others at least their minimum.
                            min(2 * share, left - MIN_SHARE_S * (len(order) - i - 1)),
                        )
                    )
                except Exception as exc:  # one broken destination must not hide the others
                    _note(rate, f"failed: {type(exc).__name__}: {exc}")
                rate.wall_s = round(time.monotonic() - began, 1)
                with contextlib.suppress(Exception):
                    state = cluster.state(name, items=False)
                    rate.vendor_pii_violations = len(state.get("piiViolations") or [])
                    rate.vendor_rejected_items = int(state.get("rejectedItemCount") or 0)
    finally:
        _delete_topics(settings, plan.created)
    return [plan.rates[n] for n in wanted], setup_s


def _quiet(_: str) -> None:
    return None


def bench_destinations(
    settings: Settings,
    *,
    events_per_destination: int,
    budget_s: float,
    names: Sequence[str] | None = None,
    partitions: int = 6,
    progress: Callable[[str], None] = _quiet,
) -> dict[str, Any]:
    """Delivery rates of every registered destination with an emulator, within ``budget_s``.

    JSON-ready: ``destinations`` is one dict per destination (see
    :class:`DeliveryRate`), in registry order; ``note`` is a one-line summary.
    Never raises for a failing destination or a failed setup: the failure is
    reported in ``error`` / the destination's ``note`` so the rest of the bench
    still gets written.
    """
    started = time.monotonic()
    deadline = started + budget_s
    result: dict[str, Any] = {
        "events_per_destination": events_per_destination,
        "budget_s": budget_s,
        "partitions": partitions,
        "method": (
            "per destination: a backlog on a private topic (enriched events, or AudienceUpdate "
            f"records with ~{REMOVE_SHARE:.0%} REMOVEs), at most {REQUEST_ROUNDS} full requests' "
            "worth; its engine drains it against the emulator (own process); events/s = "
            "delivered / (last finished - first read); latency = first read -> accepted by "
            "the vendor, per event of the burst (mostly queueing behind the others)"
        ),
        "destinations": [],
    }
    try:
        wanted = [registry.get(n).name for n in names] if names else list(registry.load_all())
        rates, result["setup_s"] = _run_all(
            settings,
            wanted,
            events=events_per_destination,
            partitions=partitions,
            deadline=deadline,
            progress=progress,
        )
        result["destinations"] = [asdict(r) for r in rates]
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["note"] = _summary(result)
    return result


def _summary(result: Mapping[str, Any]) -> str:
    if result.get("error"):
        return f"failed: {result['error']}"
    rows = result.get("destinations") or []
    ran = [r for r in rows if r.get("events_per_s") is not None]
    cut = [
        r["destination"] for r in rows if r.get("events_per_s") is not None and not r["complete"]
    ]
    skipped = [r["destination"] for r in rows if r.get("events_per_s") is None]
    text = f"{len(ran)} of {len(rows)} destinations measured in {result.get('elapsed_s', 0):.0f} s"
    if cut:
        text += f"; cut short: {', '.join(cut)}"
    if skipped:
        text += f"; not measured: {', '.join(skipped)}"
    return text


def _num(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


def render_destinations_table(results: Mapping[str, Any]) -> str:
    """The section as markdown: a heading line, one row per destination, the method."""
    lines = [
        f"### Sinks: delivery per destination against its emulator "
        f"(budget {_num(results.get('budget_s'))} s, took {_num(results.get('elapsed_s'))} s, "
        f"of which {_num(results.get('setup_s'))} s emulators and backlogs)",
        "",
    ]
    if results.get("error"):
        lines.append(f"Sinks: failed: {results['error']}")
        return "\n".join(lines)
    lines.append(
        "| destination | reads | backlog | delivered | events/s | requests | "
        "dead-lettered | burst latency p50 ms | p99 ms | note |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results.get("destinations") or []:
        note = r.get("note") or ""
        pii = r.get("vendor_pii_violations")
        if pii:
            note = f"{note}; {pii} PII violations at the vendor".lstrip("; ")
        lines.append(
            f"| {r['destination']} | {r['source']} | {_num(r.get('produced'))} | "
            f"{_num(r.get('events'))} | {_num(r.get('events_per_s'))} | "
            f"{_num(r.get('requests'))} | {_num(r.get('dead_lettered'))} | "
            f"{_num(r.get('latency_p50_ms'))} | {_num(r.get('latency_p99_ms'))} | "
            f"{note.replace('|', '/')} |"
        )
    lines.append("")
    lines.append(f"Method: {results.get('method', '')}.")
    return "\n".join(lines)


def delivery_rates(
    settings: Settings,
    names: Sequence[str] | None = None,
    *,
    events: int = 20_000,
    partitions: int = 6,
    timeout_s: float = 300.0,
) -> list[dict[str, Any]]:
    """Events/s per destination (all registered ones with an emulator by default).

    ``timeout_s`` is per destination. Raises when the setup fails.
    """
    count = len(names) if names else len(registry.load_all())
    result = bench_destinations(
        settings,
        events_per_destination=events,
        budget_s=timeout_s * count,
        names=names,
        partitions=partitions,
    )
    if result.get("error"):
        raise RuntimeError(result["error"])
    rows: list[dict[str, Any]] = result["destinations"]
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sinks.bench [--events N] [--budget S] [NAME...]``: the table on stdout."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m sinks.bench")
    parser.add_argument("names", nargs="*", help="destinations (default: all registered)")
    parser.add_argument("--events", type=int, default=5000, help="backlog per destination")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds for all")
    parser.add_argument("--json", action="store_true", help="print the JSON too")
    args = parser.parse_args(argv)

    def to_stderr(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results = bench_destinations(
        Settings(),
        events_per_destination=args.events,
        budget_s=args.budget,
        names=args.names or None,
        progress=to_stderr,
    )
    if args.json:
        import json

        print(json.dumps(results, indent=2))
    print(render_destinations_table(results))


if __name__ == "__main__":
    main()
