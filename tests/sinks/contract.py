"""The contract every destination must pass, and the harness the sink tests share.

The contract runs the real engine (:class:`sinks.engine.SinkService`) on the real
broker and registry, against the destination's emulator (``sinks.emulators``),
for every destination in :mod:`sinks.registry`. Each test gets a private source
topic (enriched records produced here, so tests never read each other's events)
and a fresh emulator, and checks what the destination's users rely on:

* duplicates: a re-delivered event (same messageId, new offset) reaches the
  vendor under the same dedupe key (or byte-identical when it has none);
* 429 + Retry-After: nothing is sent before the delay, then everything arrives;
* partial batch failure: only the refused items are dead-lettered, the others
  are never sent twice (destinations with per-item outcomes);
* a request refused as a whole (400) is bisected: nothing the vendor accepts
  ends up in the DLQ;
* oversize: an event over the destination's ``max_event_bytes`` is dead-lettered
  as EVENT_TOO_LARGE, and a burst of large events is split into requests
  within the byte limit;
* hashing / redaction: no secret and no raw email in dead letters (except the
  enriched record kept verbatim for replay) or in logs; identifiers the vendor
  wants hashed arrive hashed (the emulator's PII hook stays empty).

Audience destinations (``Destination.source == "audience"``: Meta, Google Ads,
LinkedIn) read AudienceUpdate records instead. For them the harness produces
updates with realistic hashed identifiers (``streams.audiences.identifiers``) to
a private audience topic and the same tests check what applies to audiences:
re-delivery leaves membership unchanged and sends the same hashed rows; a
throttle is honoured (its stated wait, when the vendor states one); only the
rows the vendor refuses are dead-lettered; a whole-request refusal is bisected;
more rows than the per-request limit are split (``ContractHooks.request_limit``);
an unhashed identifier is dead-lettered as UNHASHED_IDENTIFIER before any
request, and the emulator's PII hook stays empty. Their emulators must expose
``members(audience_id) -> set`` and record each applied row in
``state.accepted`` with a key derived from (audience, action, row).

Per-destination knobs: a destination's own test module (``tests/sinks/test_<name>.py``)
may define ``CONTRACT_HOOKS = ContractHooks(...)`` (see :class:`ContractHooks`);
the suite imports it from there. The contract tests themselves are collected
once, from ``tests/sinks/test_engine.py``; do not import them elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import importlib
import importlib.util
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from sinks import registry
from sinks.base import Destination
from sinks.dlq import ensure_dlq_topics, secret_values
from sinks.emulators import EMULATORS, Emulator
from sinks.engine import SinkEngineSettings, SinkRunner, SinkService, env_prefix_of
from sources.kafka_producer import ReliableProducer
from streams import topics
from streams.audiences.identifiers import HASHED_KEYS, identifiers_for
from streams.events import Limits, from_segment, now_ms
from streams.profiles.enrich import build_enriched
from streams.serde import AvroSerde
from streams.settings import Settings
from streams.topics import TopicSpec, ensure_topics, sink_dlq_topic
from tests.conftest import StackEndpoints
from tests.kafka_helpers import TopicReader, end_offsets

EMAIL_RE = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
#: Every consent category any destination may require, all granted.
ALL_CONSENT = {
    "categoryPreferences": {
        c: True
        for c in (
            "Advertising",
            "Analytics",
            "Marketing",
            "Personalization",
            "Functional",
            "DataSharing",
            "Preferences",
            "Statistics",
            "Necessary",
        )
    }
}
#: Large enough for the oversize tests (Mixpanel's limit is 1 MB per event).
PRIVATE_TOPIC_CONFIG = {"max.message.bytes": str(8 * 1024 * 1024)}
BIG_PRODUCER = {"message.max.bytes": 8 * 1024 * 1024}

# --------------------------------------------------------------------------- events


def segment_event(tag: str, i: int, *, user: str | None = None, **extra: Any) -> dict[str, Any]:
    """A Segment-spec track call every destination maps (ids, consent, email in traits)."""
    user = user or f"user-{tag}-{i % 7}"
    msg: dict[str, Any] = {
        "type": "track",
        "messageId": f"{tag}-{i:05d}",
        "userId": user,
        "anonymousId": f"anon-{tag}-{i % 7}",
        "event": "Order Completed",
        "properties": {
            "order_id": f"o-{tag}-{i}",
            "revenue": 12.5 + i,
            "currency": "EUR",
            "products": [{"product_id": f"sku-{i}", "price": 12.5, "quantity": 1}],
        },
        "context": {
            "ip": "203.0.113.7",
            "locale": "en-GB",
            "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_1) AppleWebKit/605.1.15 "
            "(KHTML, like Gecko) Version/17.1 Safari/605.1.15",
            "page": {"url": f"https://shop.example/checkout?utm_source=news&tag={tag}"},
            "traits": {"email": f"{user}@example.com", "phone": "+44 20 7946 0958"},
            "consent": ALL_CONSENT,
        },
    }
    msg.update(extra)
    return msg


def enriched_record(
    msg: dict[str, Any],
    *,
    received_at_ms: int | None = None,
    profile_id: str | None = None,
    traits: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The EnrichedEvent the worker would write for ``msg`` (no size limit: tests go big)."""
    received = received_at_ms if received_at_ms is not None else now_ms()
    record = from_segment(
        msg, received_at_ms=received, limits=Limits(max_event_bytes=64 * 1024 * 1024)
    )
    pid = profile_id or record["userId"] or f"anon:{record['anonymousId']}"
    return build_enriched(
        record,
        profile_id=pid,
        stitched=False,
        traits=traits if traits is not None else _traits_of(msg),
        recommendations=None,
        worker_id="contract-test",
        pipeline_version="test",
        processed_at_ms=received,
        source_partition=None,
        source_offset=None,
    )


def _traits_of(msg: Mapping[str, Any]) -> dict[str, Any] | None:
    ctx = msg.get("context") or {}
    traits = dict(ctx.get("traits") or {})
    traits.update(msg.get("traits") or {})
    return traits or None


class EnrichedProducer:
    """Writes EnrichedEvent records (Confluent wire format) to a test topic."""

    def __init__(self, settings: Settings, serde: AvroSerde, topic: str) -> None:
        self.topic = topic
        self.encode = serde.encoder(topics.EVENTS_ENRICHED)
        self.producer = ReliableProducer(settings, **BIG_PRODUCER)
        self.pending: list[Any] = []
        self.values: dict[str, bytes] = {}

    def send(self, msg: dict[str, Any], **kwargs: Any) -> str:
        record = enriched_record(msg, **kwargs)
        value = self.encode(record)
        self.values[record["event"]["messageId"]] = value
        return self.send_bytes(value, record["profileId"], record["event"]["messageId"])

    def send_bytes(self, value: bytes, key: str, message_id: str = "") -> str:
        self.pending.append(self.producer.produce(self.topic, value, key=key))
        return message_id

    def flush(self) -> None:
        for fut in self.pending:
            fut.result(30)
        self.pending.clear()

    def close(self) -> None:
        self.flush()
        self.producer.close()


def private_topic(settings: Settings, partitions: int = 3) -> str:
    name = f"cdp.test.sinks.{uuid.uuid4().hex[:10]}"
    ensure_topics(settings, [TopicSpec(name, partitions, PRIVATE_TOPIC_CONFIG)])
    return name


# --------------------------------------------------------------------------- audience updates


def audience_traits(user: str) -> dict[str, Any]:
    """Profile traits a realistic member has (the identifiers module normalises them)."""
    return {
        "email": f"  {user}@Example.com ",
        "phone": "+44 20 7946 0958",
        "firstName": "Jane",
        "lastName": "O'Doe",
        "city": "London",
        "postalCode": "SW1A 1AA",
        "country": "GB",
    }


def member_identifiers(platform: str, user: str) -> dict[str, str]:
    """What the audience agent would put in ``identifiers`` for ``user`` on ``platform``."""
    return identifiers_for(platform, audience_traits(user), user_id=user, default_country="GB")


def audience_update(
    platform: str,
    audience_id: str,
    profile_id: str,
    identifiers: Mapping[str, str],
    *,
    action: str = "ADD",
    version: int = 1,
    audience: str = "contract-audience",
) -> dict[str, Any]:
    """An AudienceUpdate record as the audience agent writes it (updateId deterministic)."""
    now = now_ms()
    key = f"{audience}|{platform}|{profile_id}|{action}|{version}"
    return {
        "updateId": hashlib.sha256(key.encode()).hexdigest(),
        "audience": audience,
        "audienceVersion": "contract-1",
        "platform": platform,
        "platformAudienceId": audience_id,
        "profileId": profile_id,
        "action": action,
        "reason": "RULE_MATCHED" if action == "ADD" else "RULE_UNMATCHED",
        "identifiers": dict(identifiers),
        "membershipVersion": version,
        "occurredAt": now,
        "triggerMessageId": None,
        "triggerReceivedAt": now,
        "emittedAt": now,
    }


class AudienceProducer:
    """Writes AudienceUpdate records (Confluent wire format) to a test topic."""

    def __init__(self, settings: Settings, serde: AvroSerde, topic: str) -> None:
        self.topic = topic
        self.encode = serde.encoder(topics.AUDIENCES_UPDATES)
        self.producer = ReliableProducer(settings)
        self.pending: list[Any] = []
        self.values: dict[str, bytes] = {}
        self.keys: dict[str, str] = {}

    def send(self, update: dict[str, Any]) -> str:
        value = self.encode(update)
        uid = str(update["updateId"])
        self.values[uid] = value
        self.keys[uid] = str(update["profileId"])
        return self.send_bytes(value, self.keys[uid], uid)

    def send_bytes(self, value: bytes, key: str, message_id: str = "") -> str:
        self.pending.append(self.producer.produce(self.topic, value, key=key))
        return message_id

    def flush(self) -> None:
        for fut in self.pending:
            fut.result(30)
        self.pending.clear()

    def close(self) -> None:
        self.flush()
        self.producer.close()


# --------------------------------------------------------------------------- destinations


@dataclass(frozen=True)
class ContractHooks:
    """What the contract needs to know about one destination beyond the registry."""

    #: Keyword arguments for the emulator's constructor.
    emulator_kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: Settings overrides (field name -> value) on top of the emulator's wiring.
    settings: Mapping[str, Any] = field(default_factory=dict)
    #: A Segment message (from tag, index) the pipeline accepts and the destination
    #: maps, but the vendor refuses *per item* (partial failure). None: the vendor
    #: reports no per-item outcome, so there is no partial failure to test.
    rejected_item: Callable[[str, int], dict[str, Any]] | None = None
    # -- audience destinations only
    #: The platform audience id the contract's updates go to.
    audience_id: str = "23850000000000001"
    #: Identifiers (for a user name) that pass our hashing check but the vendor
    #: refuses per row. None: the vendor reports no per-row outcome.
    rejected_identifiers: Callable[[str], dict[str, str]] | None = None
    #: (settings field, emulator keyword) of the rows-per-request limit, so the
    #: contract can make it small on both sides and check the split. Required.
    request_limit: tuple[str, str] | None = None
    #: Whether the vendor's throttle answer says how long to wait (Meta: in a usage
    #: header; LinkedIn: never). When it does, nothing may be sent before it.
    throttle_states_wait: bool = True


def _mixpanel_rejected(tag: str, i: int) -> dict[str, Any]:
    """Mixpanel refuses events more than 1 h in the future; cdpflow allows 24 h of skew."""
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3 * 3600))
    return segment_event(tag, i, timestamp=future)


BUILTIN_HOOKS: dict[str, ContractHooks] = {
    "segment": ContractHooks(),
    "mixpanel": ContractHooks(rejected_item=_mixpanel_rejected),
}


def hooks_for(name: str) -> ContractHooks:
    module = f"tests.sinks.test_{name}"
    if importlib.util.find_spec(module) is not None:
        hooks = getattr(importlib.import_module(module), "CONTRACT_HOOKS", None)
        if isinstance(hooks, ContractHooks):
            return hooks
    return BUILTIN_HOOKS.get(name, ContractHooks())


def destination_names() -> list[str]:
    return [name for name in registry.load_all() if name in EMULATORS]


def is_audience(name: str) -> bool:
    return registry.get(name).source == "audience"


def members_of(emulator: Emulator, audience_id: str) -> set[Any]:
    """The emulator's current membership of one platform audience."""
    members = getattr(emulator, "members", None)
    assert callable(members), f"{emulator.name}: audience emulators must expose members()"
    result = members(audience_id)
    assert isinstance(result, set)
    return result


def make_emulator(name: str, **kwargs: Any) -> Emulator:
    return EMULATORS[name](**{**hooks_for(name).emulator_kwargs, **kwargs})


def make_destination(name: str, emulator: Emulator, url: str, **overrides: Any) -> Destination[Any]:
    """The destination wired to an emulator: its ``sink_env`` plus its credentials."""
    cls = registry.get(name)
    prefix = env_prefix_of(cls)
    fields = cls.settings_cls.model_fields
    values: dict[str, Any] = {
        key[len(prefix) :].lower(): value
        for key, value in emulator.sink_env(url).items()
        if key.upper().startswith(prefix)
    }
    for key, value in emulator.credentials().items():
        if key in fields:
            values.setdefault(key, value)
    values.update(hooks_for(name).settings)
    values.update(overrides)
    return cls(cls.settings_cls(**values))


# --------------------------------------------------------------------------- running


def fast_engine(topic: str, **overrides: Any) -> SinkEngineSettings:
    """Engine settings for tests: short cool-downs and backoffs, quick commits."""
    values: dict[str, Any] = {
        "source_topic": topic,
        "audience_topic": topic,
        "group_prefix": f"cdpflow-test-sink-{uuid.uuid4().hex[:8]}-",
        "session_timeout_s": 6,
        "commit_interval_s": 0.2,
        "breaker_failure_threshold": 5,
        "breaker_cooldown_s": 0.5,
        "breaker_max_cooldown_s": 2.0,
        "retry_base_s": 0.05,
        "retry_throttle_base_s": 0.1,
        "retry_max_backoff_s": 1.0,
        "shutdown_grace_s": 5.0,
    }
    values.update(overrides)
    return SinkEngineSettings(**values)


@contextlib.asynccontextmanager
async def running(
    destinations: list[Destination[Any]],
    settings: Settings,
    serde: AvroSerde,
    engine: SinkEngineSettings,
) -> AsyncIterator[SinkService]:
    service = SinkService(destinations, settings, engine, serde=serde)
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.wait_started(), 60)
        yield service
    finally:
        service.stop()
        await asyncio.wait_for(task, 60)


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    what: str = "condition",
    interval: float = 0.1,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


def finished(runner: SinkRunner) -> int:
    s = runner.stats
    return s.delivered + s.dead_lettered + s.skipped


def _end_offsets_when_led(bootstrap: str, topic: str, timeout: float = 30.0) -> dict[int, int]:
    """High watermarks of a topic that may have been created a moment ago.

    A DLQ topic made by this test run (a destination's first test) can answer
    NOT_LEADER_FOR_PARTITION until its leader is elected: ask again until then.
    """
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + timeout
    while True:
        try:
            return end_offsets(bootstrap, topic)
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class DlqTail:
    """Reads one destination's DLQ topic from "now" with Confluent's AvroDeserializer."""

    def __init__(self, stack: StackEndpoints, settings: Settings, name: str) -> None:
        ensure_dlq_topics(settings, [name])
        topic = sink_dlq_topic(name)
        self.reader = TopicReader(
            stack.bootstrap_servers,
            stack.registry_url,
            topic,
            _end_offsets_when_led(stack.bootstrap_servers, topic),
        )

    def records(
        self, ids: set[str], *, expect: int | None = None, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Dead letters for ``ids``; waits for ``expect`` of them (or reads for ``timeout``)."""

        def enough(values: list[dict[str, Any]]) -> bool:
            mine = [v for v in values if v.get("messageId") in ids]
            return expect is not None and len(mine) >= expect

        values = self.reader.poll_until(enough, timeout=timeout)
        return [v for v in values if v.get("messageId") in ids]

    def close(self) -> None:
        self.reader.close()


def leaked_secrets(text: str, destination: Destination[Any]) -> list[str]:
    """Secret values (and their Basic-auth encodings) found in ``text``."""
    found = []
    for secret in secret_values(destination.settings):
        variants = {
            secret,
            base64.b64encode(f"{secret}:".encode()).decode(),
            base64.b64encode(secret.encode()).decode()[:-2] or secret,
        }
        if any(v and v in text for v in variants):
            found.append(secret[:3] + "...")
    return found


def inject_echoing_refusal(h: Harness, dest: Destination[Any]) -> None:
    """The vendor's next answer refuses the request and echoes our secret and an email back."""
    echo = " ".join(secret_values(dest.settings)) or "no-secret"
    h.emulator.inject(
        {
            "kind": "status",
            "status": 400,
            "count": 1,
            "body": {
                "code": "invalid",
                "message": f"rejected {echo} for jane.doe@example.com",
                "error": f"key={echo} user jane.doe@example.com",
            },
        }
    )


def assert_dead_letters_redacted(dead: list[dict[str, Any]], dest: Destination[Any]) -> None:
    """No secret, no raw email (outside the messageId the test chose) and no credentials."""
    for record in dead:
        text = readable_part(record)
        assert not leaked_secrets(text, dest), f"secret in a dead letter: {text[:300]}"
        assert not EMAIL_RE.search(text.replace(record["messageId"] or "", "")), (
            f"raw email in a dead letter: {text[:400]}"
        )
        if record["request"] is not None:
            headers = {k.lower(): v for k, v in record["request"]["headers"].items()}
            if "authorization" in headers:
                assert headers["authorization"] == "<redacted>"


def assert_logs_redacted(caplog: pytest.LogCaptureFixture, dest: Destination[Any]) -> None:
    log_text = "\n".join(r.getMessage() for r in caplog.records)
    log_text += "\n".join(str(r.exc_info) for r in caplog.records if r.exc_info)
    assert not leaked_secrets(log_text, dest), "a secret was logged"
    assert not EMAIL_RE.search(log_text), "an email was logged"


def readable_part(dead_letter: Mapping[str, Any]) -> str:
    """A dead letter without the enriched record kept verbatim for replay."""
    return orjson.dumps(
        {k: v for k, v in dead_letter.items() if k != "originalBytes"}, default=str
    ).decode()


def accepted_keys(emulator: Emulator) -> list[str]:
    """The dedupe key of every item the vendor took (the item itself when it has none)."""
    out = []
    for a in emulator.state.accepted:
        key = a["key"]
        out.append(
            key
            if key is not None
            else orjson.dumps(a["item"], option=orjson.OPT_SORT_KEYS).decode()
        )
    return out


def items_with(emulator: Emulator, needle: str) -> list[Any]:
    return [
        a["item"] for a in emulator.state.accepted if needle in orjson.dumps(a["item"]).decode()
    ]


# --------------------------------------------------------------------------- fixtures

NAMES = destination_names()


@dataclass
class Harness:
    name: str
    settings: Settings
    serde: AvroSerde
    stack: StackEndpoints
    topic: str
    producer: Any  # EnrichedProducer, or AudienceProducer for audience destinations
    emulator: Emulator
    url: str
    dlq: DlqTail
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    def destination(self, **overrides: Any) -> Destination[Any]:
        return make_destination(self.name, self.emulator, self.url, **overrides)

    @property
    def audience_id(self) -> str:
        return hooks_for(self.name).audience_id

    def update(self, i: int, *, action: str = "ADD", user: str | None = None, **kw: Any) -> str:
        """Produce one AudienceUpdate for user ``i`` of this test (realistic identifiers)."""
        user = user or f"member-{self.tag}-{i}"
        identifiers = kw.pop("identifiers", None) or member_identifiers(self.name, user)
        record = audience_update(
            self.name, self.audience_id, f"profile-{user}", identifiers, action=action, **kw
        )
        sent: str = self.producer.send(record)
        return sent

    def members(self) -> set[Any]:
        return members_of(self.emulator, self.audience_id)

    def run(self, destination: Destination[Any] | None = None, **engine: Any) -> Any:
        return running(
            [destination or self.destination()],
            self.settings,
            self.serde,
            fast_engine(self.topic, **engine),
        )


@contextlib.asynccontextmanager
async def harness(
    name: str,
    settings: Settings,
    serde: AvroSerde,
    stack: StackEndpoints,
    *,
    partitions: int = 3,
    **emulator_kwargs: Any,
) -> AsyncIterator[Harness]:
    topic = private_topic(settings, partitions)
    emulator = make_emulator(name, **emulator_kwargs)
    producer: Any = (
        AudienceProducer(settings, serde, topic)
        if is_audience(name)
        else EnrichedProducer(settings, serde, topic)
    )
    dlq = DlqTail(stack, settings, name)
    try:
        async with emulator.serve() as url:
            yield Harness(name, settings, serde, stack, topic, producer, emulator, url, dlq)
            assert emulator.state.pii_violations == [], (
                f"{name}: PII reached the vendor where it must not: "
                f"{emulator.state.pii_violations[:5]}"
            )
    finally:
        producer.close()
        dlq.close()


@contextlib.contextmanager
def captured_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG, logger="cdpflow"):
        yield caplog


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", NAMES)
async def test_contract_redelivery_is_harmless(
    name: str, settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    if is_audience(name):
        return await audience_redelivery(name, settings, serde, stack)
    async with harness(name, settings, serde, stack) as h:
        ids = [h.producer.send(segment_event(h.tag, i)) for i in range(6)]
        # The same records again at new offsets: what a crash before the commit causes.
        for mid in ids[:3]:
            value = h.producer.values[mid]
            h.producer.send_bytes(value, f"user-{h.tag}-{int(mid[-5:]) % 7}", mid)
        h.producer.flush()
        async with h.run() as service:
            runner = service.runners[name]
            await wait_until(lambda: finished(runner) >= 9, 60, "9 events finished")
        assert (runner.stats.delivered, runner.stats.dead_lettered) == (9, 0)
        keys = accepted_keys(h.emulator)
        # A second copy either never counts (the vendor dropped it) or carries the same key.
        assert len(set(keys)) == 6, f"{len(set(keys))} distinct keys for 6 events"
        assert 6 <= len(keys) <= 9
        assert h.dlq.records(set(ids), timeout=1.0) == []


@pytest.mark.parametrize("name", NAMES)
async def test_contract_retry_after_is_honoured(
    name: str, settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    if is_audience(name):
        return await audience_throttle(name, settings, serde, stack)
    async with harness(name, settings, serde, stack) as h:
        h.emulator.throttle_next(1, retry_after_s=2)
        ids = [h.producer.send(segment_event(h.tag, i, user=f"user-{h.tag}")) for i in range(3)]
        h.producer.flush()
        async with h.run() as service:
            runner = service.runners[name]
            await wait_until(lambda: finished(runner) >= 3, 60, "3 events finished")
        state = h.emulator.state
        assert len(state.faults_applied) == 1
        throttled_at = state.faults_applied[0]["at"]
        assert state.accepted, "nothing arrived after the 429"
        first_accepted = min(a["at"] for a in state.accepted)
        assert first_accepted - throttled_at >= 1.95, "retried before Retry-After had passed"
        assert runner.stats.retries >= 1
        assert runner.stats.dead_lettered == 0
        assert h.dlq.records(set(ids), timeout=1.0) == []


def _has_per_item_refusal(name: str) -> bool:
    hooks = hooks_for(name)
    if is_audience(name):
        return hooks.rejected_identifiers is not None
    return hooks.rejected_item is not None


@pytest.mark.parametrize("name", [n for n in NAMES if _has_per_item_refusal(n)])
async def test_contract_partial_failure_dead_letters_only_the_refused(
    name: str, settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    if is_audience(name):
        return await audience_partial_failure(name, settings, serde, stack)
    rejected = hooks_for(name).rejected_item
    assert rejected is not None
    async with harness(name, settings, serde, stack, partitions=1) as h:
        user = f"user-{h.tag}"
        good = [h.producer.send(segment_event(h.tag, i, user=user)) for i in (0, 1)]
        bad = h.producer.send(rejected(h.tag, 2))
        good.append(h.producer.send(segment_event(h.tag, 3, user=user)))
        h.producer.flush()
        async with h.run() as service:  # all four are in the topic: one batch
            runner = service.runners[name]
            await wait_until(lambda: finished(runner) >= 4, 60, "4 events finished")
        dead = h.dlq.records({bad, *good}, expect=1)
        assert [d["messageId"] for d in dead] == [bad]
        assert dead[0]["reasonCode"] and dead[0]["responseStatus"] is not None
        assert dead[0]["request"] is not None and dead[0]["request"]["itemCount"] >= 2
        state = h.emulator.state
        assert len(state.rejected_items) == 1, "the refused item was sent more than once"
        keys = accepted_keys(h.emulator)
        assert len(keys) == len(set(keys)) == 3, "accepted items were sent again"
        assert runner.stats.delivered == 3 and runner.stats.dead_lettered == 1


@pytest.mark.parametrize("name", NAMES)
async def test_contract_whole_request_refusal_is_bisected(
    name: str, settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    if is_audience(name):
        return await audience_bisect(name, settings, serde, stack)
    async with harness(name, settings, serde, stack, partitions=1) as h:
        h.emulator.fail_next(1, status=400)
        # One user and one device: destinations that group a request per user (GA4's
        # client_id) still put all four in one request.
        user, anon = f"user-{h.tag}", f"anon-{h.tag}"
        ids = [
            h.producer.send(segment_event(h.tag, i, user=user, anonymousId=anon)) for i in range(4)
        ]
        h.producer.flush()
        async with h.run() as service:
            runner = service.runners[name]
            await wait_until(lambda: finished(runner) >= 4, 60, "4 events finished")
        assert runner.stats.dead_lettered == 0, "items the vendor accepts were dead-lettered"
        assert runner.stats.delivered == 4
        assert len(set(accepted_keys(h.emulator))) == 4
        assert h.dlq.records(set(ids), timeout=1.0) == []


def _padded(tag: str, i: int, pad: int, user: str) -> dict[str, Any]:
    """An event with about ``pad`` more bytes of properties, as many short strings in
    groups (vendors limit string lengths, array lengths and keys per object)."""
    chunk = "n" * 96
    strings = max(1, pad // (len(chunk) + 3))
    groups = {f"g{g}": [chunk] * min(200, strings - g * 200) for g in range(-(-strings // 200))}
    msg = segment_event(tag, i, user=user)
    msg["properties"]["notes"] = groups
    return msg


def _mapped_size(destination: Destination[Any], msg: dict[str, Any]) -> int | None:
    mapped = destination.map(enriched_record(msg))
    return None if mapped is None else mapped.size


@pytest.mark.parametrize("name", NAMES)
async def test_contract_oversize_event_and_split_by_bytes(
    name: str, settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    if is_audience(name):
        return await audience_split_by_rows(name, settings, serde, stack)
    async with harness(name, settings, serde, stack, partitions=1) as h:
        dest = h.destination()
        limits = dest.limits
        user = f"user-{h.tag}"
        # One event over the per-event limit (if the mapping carries the padding at all).
        big = _padded(h.tag, 0, limits.max_event_bytes + 2048, user)
        big_size = _mapped_size(dest, big)
        big_id = h.producer.send(big)
        # Events each about a third of a request, so the batch must be cut by bytes.
        per_event = min(int(limits.max_event_bytes * 0.8), limits.max_batch_bytes // 3)
        base = _mapped_size(dest, _padded(h.tag, 1, 0, user)) or 0
        count = min(
            2 * limits.max_batch_events,
            60,
            max(4, -(-16 * limits.max_batch_bytes // (10 * per_event))),
        )
        ids = [
            h.producer.send(_padded(h.tag, 1 + i, max(0, per_event - base - 200), user))
            for i in range(count)
        ]
        h.producer.flush()
        async with h.run(dest) as service:
            runner = service.runners[name]
            await wait_until(lambda: finished(runner) >= 1 + count, 90, "all events finished")
        too_large = big_size is not None and big_size > limits.max_event_bytes
        dead = h.dlq.records({big_id, *ids}, expect=1 if too_large else None, timeout=5.0)
        if too_large:
            assert [(d["messageId"], d["reasonCode"]) for d in dead] == [
                (big_id, "EVENT_TOO_LARGE")
            ]
            assert dead[0]["request"] is None, "an oversize event must not be sent at all"
            assert "limit" in dead[0]["message"]
        else:
            assert dead == []
        assert runner.stats.delivered == count + (0 if too_large else 1)
        state = h.emulator.state
        assert state.rejected_requests == [], f"a request broke a limit: {state.rejected_requests}"
        sizes = [_mapped_size(dest, _padded(h.tag, 1, max(0, per_event - base - 200), user))]
        if sizes[0] is not None and sizes[0] * count > limits.max_batch_bytes:
            assert runner.stats.requests >= 2, "the batch was not split by bytes"


@pytest.mark.parametrize("name", NAMES)
async def test_contract_no_secret_or_raw_email_in_dead_letters_or_logs(
    name: str,
    settings: Settings,
    serde: AvroSerde,
    stack: StackEndpoints,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if is_audience(name):
        return await audience_hashing_and_redaction(name, settings, serde, stack, caplog)
    async with harness(name, settings, serde, stack, partitions=1) as h:
        dest = h.destination()
        inject_echoing_refusal(h, dest)
        user = f"jane.doe.{h.tag}@example.com"  # an email as userId: the worst case
        refused = h.producer.send(segment_event(h.tag, 0, user=user))
        h.producer.flush()
        with captured_logs(caplog):
            async with h.run(dest) as service:
                runner = service.runners[name]
                await wait_until(lambda: finished(runner) >= 1, 60, "the refused event")
                big = _padded(h.tag, 1, dest.limits.max_event_bytes + 2048, user)
                big_id = h.producer.send(big)
                ok = h.producer.send(segment_event(h.tag, 2, user=user))
                h.producer.flush()
                await wait_until(lambda: finished(runner) >= 3, 60, "three events finished")
        dead = h.dlq.records({refused, big_id, ok}, expect=runner.stats.dead_lettered, timeout=20.0)
        assert len(dead) == runner.stats.dead_lettered >= 1
        assert_dead_letters_redacted(dead, dest)
        assert_logs_redacted(caplog, dest)


# --------------------------------------------------------------------------- audiences
# The same contract for destinations reading AudienceUpdate records.


def _distinct_accepted(h: Harness) -> tuple[int, int]:
    keys = accepted_keys(h.emulator)
    return len(keys), len(set(keys))


async def audience_redelivery(
    name: str, settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    async with harness(name, settings, serde, stack) as h:
        ids = [h.update(i) for i in range(6)]
        # The same records again at new offsets: what a crash before the commit causes.
        for uid in ids[:3]:
            h.producer.send_bytes(h.producer.values[uid], h.producer.keys[uid], uid)
        h.producer.flush()
        async with h.run() as service:
            runner = service.runners[name]
            await wait_until(lambda: finished(runner) >= 9, 60, "9 updates finished")
        assert (runner.stats.delivered, runner.stats.dead_lettered) == (9, 0)
        assert len(h.members()) == 6, "re-delivery changed the membership"
        total, distinct = _distinct_accepted(h)
        # A second copy carries exactly the same hashed row (same key) or never counts.
        assert distinct == 6, f"{distinct} distinct rows for 6 members"
        assert 6 <= total <= 9
        assert h.dlq.records(set(ids), timeout=1.0) == []


async def audience_throttle(
    name: str, settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    hooks = hooks_for(name)
    # One partition: one lane, so no request is already in flight when the throttle lands.
    async with harness(name, settings, serde, stack, partitions=1) as h:
        h.emulator.throttle_next(1, retry_after_s=2)
        ids = [h.update(i) for i in range(3)]
        h.producer.flush()
        async with h.run() as service:
            runner = service.runners[name]
            await wait_until(lambda: finished(runner) >= 3, 60, "3 updates finished")
        state = h.emulator.state
        assert len(state.faults_applied) == 1
        throttled_at = state.faults_applied[0]["at"]
        assert state.accepted, "nothing arrived after the throttle"
        first_accepted = min(a["at"] for a in state.accepted)
        if hooks.throttle_states_wait:
            assert first_accepted - throttled_at >= 1.95, "retried before the stated wait"
        else:
            assert first_accepted > throttled_at
        assert runner.stats.retries >= 1
        assert runner.stats.dead_lettered == 0
        assert len(h.members()) == 3
        assert h.dlq.records(set(ids), timeout=1.0) == []


async def audience_partial_failure(
    name: str, settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    rejected = hooks_for(name).rejected_identifiers
    assert rejected is not None
    async with harness(name, settings, serde, stack, partitions=1) as h:
        good = [h.update(i) for i in (0, 1)]
        bad = h.update(2, identifiers=rejected(f"member-{h.tag}-2"))
        good.append(h.update(3))
        h.producer.flush()
        async with h.run() as service:  # all four are in the topic: one batch
            runner = service.runners[name]
            await wait_until(lambda: finished(runner) >= 4, 60, "4 updates finished")
        dead = h.dlq.records({bad, *good}, expect=1)
        assert [d["messageId"] for d in dead] == [bad]
        assert dead[0]["reasonCode"] and dead[0]["responseStatus"] is not None
        assert dead[0]["request"] is not None and dead[0]["request"]["itemCount"] >= 2
        state = h.emulator.state
        assert len(state.rejected_items) == 1, "the refused row was sent more than once"
        total, distinct = _distinct_accepted(h)
        assert total == distinct == 3, "accepted rows were sent again"
        assert len(h.members()) == 3
        assert runner.stats.delivered == 3 and runner.stats.dead_lettered == 1


async def audience_bisect(
    name: str, settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    async with harness(name, settings, serde, stack, partitions=1) as h:
        h.emulator.fail_next(1, status=400)
        ids = [h.update(i) for i in range(4)]
        h.producer.flush()
        async with h.run() as service:
            runner = service.runners[name]
            await wait_until(lambda: finished(runner) >= 4, 60, "4 updates finished")
        assert runner.stats.dead_lettered == 0, "rows the vendor accepts were dead-lettered"
        assert runner.stats.delivered == 4
        assert runner.stats.requests >= 3, "the refused request was not split"
        assert len(h.members()) == 4
        assert h.dlq.records(set(ids), timeout=1.0) == []


async def audience_split_by_rows(
    name: str, settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    limit_hook = hooks_for(name).request_limit
    assert limit_hook is not None, (
        f"{name}: set ContractHooks.request_limit=(settings field, emulator keyword) "
        "in its test module"
    )
    setting, emulator_kwarg = limit_hook
    limit = 5
    count = 2 * limit + 3
    async with harness(name, settings, serde, stack, partitions=1, **{emulator_kwarg: limit}) as h:
        dest = h.destination(**{setting: limit})
        assert dest.limits.max_batch_events <= limit
        ids = [h.update(i) for i in range(count)]
        h.producer.flush()
        async with h.run(dest) as service:
            runner = service.runners[name]
            await wait_until(lambda: finished(runner) >= count, 90, "all updates finished")
        state = h.emulator.state
        assert state.rejected_requests == [], f"a request broke a limit: {state.rejected_requests}"
        assert runner.stats.delivered == count and runner.stats.dead_lettered == 0
        assert runner.stats.requests >= -(-count // limit), "more rows than the limit per request"
        assert len(h.members()) == count
        assert h.dlq.records(set(ids), timeout=1.0) == []


async def audience_hashing_and_redaction(
    name: str,
    settings: Settings,
    serde: AvroSerde,
    stack: StackEndpoints,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with harness(name, settings, serde, stack, partitions=1) as h:
        dest = h.destination()
        inject_echoing_refusal(h, dest)
        user = f"jane.doe.{h.tag}"
        refused = h.update(0, user=user)
        h.producer.flush()
        with captured_logs(caplog):
            async with h.run(dest) as service:
                runner = service.runners[name]
                await wait_until(lambda: finished(runner) >= 1, 60, "the refused update")
                # An identifier the agent failed to hash: the raw address under a hashed key.
                clean = member_identifiers(name, f"raw.{h.tag}")
                key = next(k for k in clean if k in HASHED_KEYS[name])
                raw_email = f"raw.{h.tag}@example.com"
                unhashed = h.update(1, user=f"raw.{h.tag}", identifiers={**clean, key: raw_email})
                ok = h.update(2, user=user, version=2)
                h.producer.flush()
                await wait_until(lambda: finished(runner) >= 3, 60, "three updates finished")
        dead = h.dlq.records(
            {refused, unhashed, ok}, expect=runner.stats.dead_lettered, timeout=20.0
        )
        assert len(dead) == runner.stats.dead_lettered >= 2
        by_id = {d["messageId"]: d for d in dead}
        assert by_id[unhashed]["reasonCode"] == "UNHASHED_IDENTIFIER"
        assert by_id[unhashed]["request"] is None, "an unhashed identifier must never be sent"
        assert_dead_letters_redacted(dead, dest)
        sent = orjson.dumps(h.emulator.state.accepted_items()).decode()
        assert raw_email not in sent and "@" not in sent, "a raw identifier reached the vendor"
        assert_logs_redacted(caplog, dest)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A cdpflow command as a real OS process (so a test can SIGKILL it), logging to a file."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Any) -> None:
        import os
        import subprocess
        import sys

        from tests.kafka_helpers import REPO

        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        lines = self.log_path.read_bytes().decode(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def kill(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def stop(self, timeout: float = 60) -> int | None:
        import signal
        import subprocess

        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


class SinkProcess(Process):
    """``python -m sinks.cli sink run ...`` with /health on a free port."""

    def __init__(
        self, env: Mapping[str, str], log_path: Any, names: list[str] | None = None
    ) -> None:
        self.port = free_port()
        args = ["-m", "sinks.cli", "sink", "run", *(names or ["--all"])]
        super().__init__(args, {**env, "CDP_SINK_METRICS_PORT": str(self.port)}, log_path)

    def health(self) -> dict[str, Any] | None:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as resp:
                result: dict[str, Any] = orjson.loads(resp.read())
                return result
        except Exception:
            return None

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    async def wait_assigned(self, names: list[str], timeout: float = 60) -> None:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"sink process exited:\n{self.tail()}")
            h = self.health()
            return h is not None and all(
                h["destinations"].get(n, {}).get("assigned") for n in names
            )

        await wait_until(ready, timeout, f"sinks {names} to be assigned partitions")


def start_groups_at_end(bootstrap: str, groups: list[str], topic: str) -> None:
    """New sink groups on a shared topic start at its end instead of its whole history."""
    from tests.kafka_helpers import start_group_at_end

    for group in groups:
        start_group_at_end(bootstrap, group, [topic])
