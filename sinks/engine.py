"""The delivery engine: a source topic -> one destination, at least once.

Event destinations read ``cdp.events.enriched``; the ad-audience destinations
(``Destination.source == "audience"``) read ``cdp.audiences.updates`` the same way.

Every destination gets its own :class:`SinkRunner`: its own consumer group
(``cdpflow-sink-<name>``), HTTP session, rate limit, retry policy, circuit
breaker and dead-letter topic, so a slow or broken destination never holds back
another. ``cdpflow sink run --all`` puts several runners on one asyncio loop;
each Kafka consumer lives on its own thread (librdkafka calls block).

How an event travels through a runner:

1. The consumer thread polls a batch, decodes it (Avro, registry-cached), applies
   routing (``integrations``, consent) and the destination's ``map``: the CPU work
   stays off the event loop, in one pass per poll.
2. Each partition is a *lane*: its events are batched (count, bytes, time), and a
   lane sends one request at a time, in offset order, while different partitions
   send concurrently (bounded by ``max_concurrency``). A profile's events share a
   partition (the enriched topic is keyed by profileId), so per-user order holds,
   also across retries: a lane never sends batch N+1 before batch N is settled.
3. A request is retried on Retryable/Throttled errors with exponential backoff and
   jitter; Retry-After is a floor for the whole destination. Consecutive failures
   open the circuit breaker, which pauses the consumer instead of burning retries.
   A request the destination refuses as a whole (``Permanent`` raised) is bisected
   until only the offending items are left; those, per-item failures and
   unmappable events go to ``cdp.sink.dlq.<name>`` (acknowledged by the broker
   before anything is committed).
4. Offsets are committed per partition up to the first event not yet finished
   (delivered, dead-lettered or skipped), so a crash at any point re-sends only
   events whose dedupe key the destination has already seen or never got.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import aiohttp
from aiohttp import web
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from fastavro import parse_schema, schemaless_reader
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from sinks import registry as sink_registry
from sinks.base import (
    NOT_CONFIGURED,
    ConfigError,
    DeliveryError,
    Destination,
    HttpRequest,
    HttpResponse,
    ItemOutcome,
    MappedEvent,
    Permanent,
    Retryable,
    Throttled,
    parse_retry_after,
)
from sinks.batching import OffsetTracker, take_batch
from sinks.breaker import BreakerState, CircuitBreaker
from sinks.dlq import (
    DLQ_PRODUCER_OVERRIDES,
    DeadLetterWriter,
    DlqCodec,
    Scrubber,
    SourceRecord,
    build_dead_letter,
    ensure_dlq_topics,
    secret_values,
)
from sinks.metrics import RunnerStats, SinkMetrics
from sinks.ratelimit import TokenBucket
from sinks.retry import RetryPolicy, ThrottleGate
from sinks.routing import NOT_APPLICABLE, skip_reason
from sources.kafka_producer import ReliableProducer
from streams import topics
from streams.events import now_ms, to_ms
from streams.schemas import AUDIENCE_UPDATE, ENRICHED_EVENT
from streams.serde import (
    HEADER,
    MAGIC_BYTE,
    AvroSerde,
    DecodeError,
    MalformedAvro,
    NotWireFormat,
    RegistryUnavailable,
    SchemaMismatch,
)
from streams.settings import Settings, reject_unknown_env

log = logging.getLogger("cdpflow.sink")

SINK_ENV_PREFIX = "CDP_SINK_"
EVENT_TOO_LARGE = "EVENT_TOO_LARGE"
MAPPING_FAILED = "MAPPING_FAILED"
RETRIES_EXHAUSTED = "RETRIES_EXHAUSTED"

# --------------------------------------------------------------------------- settings


class SinkEngineSettings(BaseSettings):
    """Engine knobs shared by every destination: ``CDP_SINK_<OPTION>``.

    Destination options live under ``CDP_SINK_<DEST>_<OPTION>`` in each
    destination's own settings class.
    """

    model_config = SettingsConfigDict(env_prefix=SINK_ENV_PREFIX, extra="ignore")

    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve /metrics and /health here (0 = any free port)."
    )
    metrics_host: str = "127.0.0.1"
    group_prefix: str = Field("cdpflow-sink-", description="Consumer group = prefix + name.")
    source_topic: str = Field(
        topics.EVENTS_ENRICHED, description="Topic the event destinations read."
    )
    audience_topic: str = Field(
        topics.AUDIENCES_UPDATES, description="Topic the ad-audience destinations read."
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a new consumer group starts (earliest = deliver history)."
    )
    session_timeout_s: float = Field(
        10.0, ge=6, le=300, description="How soon a dead sink's partitions move to another."
    )
    instance_id: str | None = Field(
        None,
        description="Static group membership id: a restarted sink takes its partitions "
        "back at once instead of waiting for the session timeout.",
    )
    commit_interval_s: float = Field(1.0, gt=0, le=60)
    max_buffered_events: int = Field(
        20_000, ge=100, description="Per destination; partitions pause above this."
    )
    breaker_failure_threshold: int = Field(5, ge=1)
    breaker_cooldown_s: float = Field(5.0, gt=0)
    breaker_max_cooldown_s: float = Field(60.0, gt=0)
    retry_base_s: float = Field(0.5, gt=0)
    retry_throttle_base_s: float = Field(2.0, gt=0)
    retry_max_backoff_s: float = Field(60.0, gt=0)
    retry_max_elapsed_s: float = Field(
        4 * 3600.0, ge=0, description="Give a failing request up (to the DLQ) after this; 0=never."
    )
    shutdown_grace_s: float = Field(15.0, ge=0, description="Finish in-flight work on SIGTERM.")
    shared_decode_cache: int = Field(
        10_000,
        ge=0,
        description="With several destinations in one process, decoded records (about 4 KB "
        "each) kept for the others, so a record is decoded once, not once per destination. "
        "0 disables.",
    )

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            base_s=self.retry_base_s,
            throttle_base_s=self.retry_throttle_base_s,
            max_backoff_s=self.retry_max_backoff_s,
            max_elapsed_s=self.retry_max_elapsed_s,
        )


# --------------------------------------------------------------------------- destinations


def env_prefix_of(cls: type[Destination[Any]]) -> str:
    """``CDP_SINK_<NAME>_``; a settings class with another prefix is a bug, caught early."""
    expected = f"{SINK_ENV_PREFIX}{cls.name.upper()}_"
    prefix = str(cls.settings_cls.model_config.get("env_prefix") or "")
    if prefix.upper() != expected:
        raise ValueError(
            f"{cls.settings_cls.__name__} must set env_prefix={expected!r} (has {prefix!r})"
        )
    return expected


def check_sink_env(
    classes: Mapping[str, type[Destination[Any]]], environ: Mapping[str, str] | None = None
) -> None:
    """Reject ``CDP_SINK_*`` variables that neither the engine nor a destination reads."""
    prefixes = {name: env_prefix_of(cls) for name, cls in classes.items()}
    engine_known = [SINK_ENV_PREFIX + f for f in SinkEngineSettings.model_fields]
    reject_unknown_env(SINK_ENV_PREFIX, engine_known, tuple(prefixes.values()), environ)
    for name, cls in classes.items():
        prefix = prefixes[name]
        reject_unknown_env(prefix, settings_env_names(prefix, cls.settings_cls), (), environ)


def settings_env_names(prefix: str, settings_cls: type[BaseSettings]) -> list[str]:
    """Every env name a settings class reads: ``prefix + field`` and its aliases.

    An alias is taken as a full env name when it already starts with the prefix
    (``CDP_SINK_GA4_VALIDATE``), else as a field-like name under the prefix.
    """
    names: list[str] = []
    for field_name, info in settings_cls.model_fields.items():
        names.append(prefix + field_name)
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        for choice in choices:
            if isinstance(choice, str):
                names.append(choice if choice.upper().startswith(prefix) else prefix + choice)
        if info.alias:
            names.append(prefix + info.alias)
    return names


@dataclass
class DestinationConfig:
    """One registered destination and whether it can run."""

    name: str
    cls: type[Destination[Any]]
    destination: Destination[Any] | None = None
    #: Why it is not started (not configured, disabled, or a bad value).
    problem: str | None = None
    #: True when the problem is a wrong value (must fail) rather than absence.
    invalid: bool = False


def load_destination(cls: type[Destination[Any]]) -> DestinationConfig:
    prefix = env_prefix_of(cls)
    try:
        settings = cls.settings_cls()
    except ValidationError as exc:
        errors = exc.errors()
        absent = [e for e in errors if e["type"] in ("missing", NOT_CONFIGURED)]
        if len(absent) == len(errors):
            needs = [
                prefix + str(e["loc"][0]).upper()
                if e["type"] == "missing" and e["loc"]
                else str(e["msg"])
                for e in absent
            ]
            return DestinationConfig(cls.name, cls, problem="not configured: " + "; ".join(needs))
        bad = "; ".join(
            f"{prefix}{str(e['loc'][0]).upper() if e['loc'] else ''}: {e['msg']}" for e in errors
        )
        return DestinationConfig(cls.name, cls, problem=f"invalid settings: {bad}", invalid=True)
    if not settings.enabled:
        return DestinationConfig(cls.name, cls, problem=f"disabled ({prefix}ENABLED=false)")
    return DestinationConfig(cls.name, cls, destination=cls(settings))


def load_destinations(
    names: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> list[DestinationConfig]:
    """Registered destinations (all, or ``names``) with their settings from the environment."""
    classes = sink_registry.load_all()
    check_sink_env(classes, environ)
    wanted = [sink_registry.get(n).name for n in names] if names else list(classes)
    return [load_destination(classes[name]) for name in wanted]


# --------------------------------------------------------------------------- preparing


def _without_logical_types(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_without_logical_types(v) for v in node]
    return node


class RecordDecoder:
    """Wire-format record of one type -> dict, with timestamps left as epoch milliseconds.

    Decoding is most of a sink's CPU, and most of fastavro's time goes into
    building a tz-aware datetime for every timestamp-millis (five per record),
    which the mappers turn straight back into numbers. Reading with the writer
    schema minus its logical types gives the same record with plain longs, about
    2.5x faster. ``to_ms`` accepts both, so mappers work with either decoder.
    Records of another type are refused like ``AvroSerde.decode(reader=...)``.
    """

    def __init__(self, serde: AvroSerde, record: str = ENRICHED_EVENT) -> None:
        self.serde = serde
        self.record = record
        self._schemas: dict[int, Any] = {}
        self._lock = threading.Lock()

    def decode(self, data: bytes) -> dict[str, Any]:
        if len(data) < HEADER.size + 1:
            raise NotWireFormat("value is empty or shorter than the 5-byte wire-format header")
        magic, schema_id = HEADER.unpack_from(data)
        if magic != MAGIC_BYTE:
            raise NotWireFormat(f"magic byte is {magic}, expected 0 (Confluent wire format)")
        schema = self._schemas.get(schema_id)
        if schema is None:
            schema = self._load(schema_id)
        buf = io.BytesIO(data)
        buf.seek(HEADER.size)
        try:
            record = schemaless_reader(buf, schema, None)
        except Exception as exc:
            raise MalformedAvro(f"Avro body does not match schema id {schema_id}: {exc}") from exc
        if buf.tell() != len(data) or not isinstance(record, dict):
            raise MalformedAvro(f"trailing bytes after the Avro body (schema id {schema_id})")
        return record

    def _load(self, schema_id: int) -> Any:
        writer = self.serde.registry.writer_schema(schema_id)  # typed errors, cached
        if writer.get("name") != self.record:
            raise SchemaMismatch(
                f"schema id {schema_id} is {writer.get('name')}, expected {self.record}"
            )
        try:
            text = self.serde.registry.client.get_schema(schema_id).schema_str
        except Exception as exc:
            raise RegistryUnavailable(f"registry error for id {schema_id}: {exc}") from exc
        parsed = parse_schema(_without_logical_types(json.loads(text or "{}")))
        with self._lock:
            self._schemas[schema_id] = parsed
        return parsed


@dataclass(slots=True)
class Prepared:
    """One Kafka record after decode, routing and mapping (made on the consumer thread)."""

    source: SourceRecord
    mapped: MappedEvent | None = None
    skip: str | None = None
    error: DeliveryError | None = None


class SharedDecodes:
    """Decoded records of one source topic, shared by the runners of one process.

    ``run --all`` reads the same records once per destination (separate consumer
    groups); in the steady state the runners are close to each other, so the
    first one to decode a record leaves it here for the others. A Kafka record
    never changes, so (partition, offset) is a safe key; mappers must not mutate
    the record (see ``Destination.map``). Bounded, oldest out first.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._records: dict[tuple[int, int], dict[str, Any]] = {}
        self._order: deque[tuple[int, int]] = deque()
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, key: tuple[int, int]) -> dict[str, Any] | None:
        record = self._records.get(key)
        if record is not None:
            self.hits += 1
        return record

    def put(self, key: tuple[int, int], record: dict[str, Any]) -> None:
        with self._lock:
            if key in self._records:
                return
            self._records[key] = record
            self._order.append(key)
            while len(self._order) > self.capacity:
                self._records.pop(self._order.popleft(), None)


class Preparer:
    """Decode -> route -> map -> size check; pure CPU, shared by runners and replay."""

    def __init__(
        self,
        destination: Destination[Any],
        serde: AvroSerde,
        shared: SharedDecodes | None = None,
    ) -> None:
        self.destination = destination
        self.audience = destination.source == "audience"
        self.decoder = RecordDecoder(serde, AUDIENCE_UPDATE if self.audience else ENRICHED_EVENT)
        self.shared = shared
        self.names = tuple(destination.integration_names)
        self.consent = list(destination.settings.consent_categories)
        self.max_event_bytes = destination.limits.max_event_bytes
        self._mapping_bug_logged: set[str] = set()

    def prepare(self, source: SourceRecord) -> Prepared:
        """Raises RegistryUnavailable (transient); everything else becomes an outcome."""
        key = (source.partition or 0, source.offset or 0)
        enriched = self.shared.get(key) if self.shared is not None else None
        if enriched is None:
            try:
                enriched = self.decoder.decode(source.value)
            except DecodeError as exc:
                return Prepared(source, error=Permanent(exc.reason_code, str(exc)))
            if self.shared is not None:
                self.shared.put(key, enriched)
        if self.audience:
            # Consent was decided upstream: the audience agent never adds a profile
            # without it and removes it on withdrawal; these updates must all go out.
            source.message_id = enriched["updateId"]
            source.event_type = enriched["action"]
            source.event_name = enriched["audience"]
            source.timestamp_ms = to_ms(enriched["occurredAt"])
            received = enriched.get("triggerReceivedAt")
            source.received_at_ms = to_ms(received) if received is not None else None
        else:
            event = enriched["event"]
            source.message_id = event["messageId"]
            source.event_type = event["type"]
            source.event_name = event.get("event") or event.get("name")
            source.timestamp_ms = to_ms(event["timestamp"])
            source.received_at_ms = to_ms(event["receivedAt"])
            reason = skip_reason(enriched, self.names, self.consent)
            if reason is not None:
                return Prepared(source, skip=reason)
        try:
            mapped = self.destination.map(enriched)
        except Permanent as exc:
            return Prepared(source, error=exc)
        except Exception as exc:  # a mapper bug: dead-letter (replayable once fixed)
            kind = type(exc).__name__
            if kind not in self._mapping_bug_logged:
                self._mapping_bug_logged.add(kind)
                log.error("%s: map() raised %s; such events are dead-lettered", self.name, kind)
            return Prepared(source, error=Permanent(MAPPING_FAILED, f"map() raised {kind}"))
        if mapped is None:
            return Prepared(source, skip=NOT_APPLICABLE)
        if mapped.size > self.max_event_bytes:
            return Prepared(
                source,
                error=Permanent(
                    EVENT_TOO_LARGE,
                    f"event is {mapped.size} bytes for {self.name}, limit "
                    f"{self.max_event_bytes} bytes",
                ),
            )
        mapped.source = source
        return Prepared(source, mapped=mapped)

    @property
    def name(self) -> str:
        return self.destination.name


# --------------------------------------------------------------------------- delivering


@dataclass(slots=True)
class Failure:
    """An item the destination will not take: it goes to the DLQ."""

    item: MappedEvent
    error: DeliveryError
    request: HttpRequest | None = None
    response: HttpResponse | None = None
    attempts: int = 0


class DestinationFailed(Exception):
    """The destination refuses our credentials or settings: stop it, never retry."""

    def __init__(self, name: str, error: DeliveryError) -> None:
        super().__init__(f"{name}: {error.reason}: {error.detail}")
        self.destination = name
        self.error = error


class Deliverer:
    """Requests for batches: rate limit, concurrency, retries, breaker, bisecting.

    Shared by the Kafka runner and by ``cdpflow dlq replay``; it never touches
    Kafka. ``deliver`` returns the failures; delivered items are counted here.
    """

    def __init__(
        self,
        destination: Destination[Any],
        session: aiohttp.ClientSession,
        *,
        policy: RetryPolicy,
        breaker: CircuitBreaker,
        metrics: SinkMetrics,
        stats: RunnerStats,
        scrub: Scrubber,
    ) -> None:
        self.destination = destination
        self.name = destination.name
        self.session = session
        self.policy = policy
        self.breaker = breaker
        self.stats = stats
        self.scrub = scrub
        limits = destination.limits
        self.semaphore = asyncio.Semaphore(limits.max_concurrency)
        self.bucket = TokenBucket(limits.max_requests_per_second)
        self.gate = ThrottleGate()
        m = metrics
        self._delivered = m.events.labels(self.name, "delivered", "")
        self._e2e = m.end_to_end_seconds.labels(self.name)
        self._req_seconds = m.request_seconds.labels(self.name)
        self._batch_events = m.batch_events.labels(self.name)
        self._requests = m.requests
        self._retries = m.retries
        self._last_retry_log = 0.0
        self._retries_since_log = 0

    async def deliver(self, batch: Sequence[MappedEvent]) -> list[Failure]:
        """Send one batch; requests with disjoint order keys go concurrently.

        A destination that needs a request per user (GA4: one client_id per
        request) would otherwise send a batch's requests one after another. When
        no two requests share an order key, their relative order cannot matter;
        when any do, the requests go strictly in order.
        """
        return await self.deliver_requests(self.destination.build_requests(list(batch)))

    async def deliver_requests(self, requests: list[HttpRequest]) -> list[Failure]:
        """Send requests already built (``deliver``, and full re-syncs that build their own)."""
        failures: list[Failure] = []
        if len(requests) > 1 and _disjoint(requests):
            await asyncio.gather(*(self._send(r, failures) for r in requests))
        else:
            for request in requests:
                await self._send(request, failures)
        return failures

    async def _send(self, request: HttpRequest, failures: list[Failure]) -> None:
        passed = await self._preflight(request, failures)
        if passed is None:
            await self._transmit(request, failures)
            return
        if passed:
            for sub in self.destination.build_requests(passed):
                await self._transmit(sub, failures)

    async def _preflight(
        self, request: HttpRequest, failures: list[Failure]
    ) -> list[MappedEvent] | None:
        """The items the destination's preflight check passed; None = send all as they are."""
        try:
            outcomes = await self.destination.preflight(request, self._plain_send)
        except (DeliveryError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning(
                "%s: preflight check failed (%s); sending unchecked",
                self.name,
                exc.reason if isinstance(exc, DeliveryError) else type(exc).__name__,
            )
            return None
        if outcomes is None or all(o.error is None for o in outcomes):
            return None
        passed: list[MappedEvent] = []
        for item, outcome in zip(request.items, outcomes, strict=True):
            if outcome.error is None:
                passed.append(item)
            else:
                failures.append(Failure(item, outcome.error, request, None, 1))
        return passed

    async def _plain_send(self, request: HttpRequest) -> HttpResponse:
        """One HTTP call, no retries (a request's attempt, a preflight check)."""
        started = time.monotonic()
        async with self.session.request(
            request.method, request.url, data=request.body, headers=request.headers
        ) as resp:
            body = await resp.read()
            return HttpResponse(resp.status, resp.headers, body, time.monotonic() - started)

    async def _transmit(self, request: HttpRequest, failures: list[Failure]) -> None:
        attempt = 0
        first_failure: float | None = None
        while True:
            probe = await self.breaker.acquire()
            try:
                await self.gate.wait()
                await self.bucket.acquire()
                async with self.semaphore:
                    response, outcomes, error = await self._attempt(request)
            except BaseException:
                if probe:
                    self.breaker.release_probe()
                raise
            attempt += 1
            if outcomes is not None:
                self.breaker.record_success()
                ok: list[MappedEvent] = []
                for item, outcome in zip(request.items, outcomes, strict=True):
                    if outcome.error is None:
                        ok.append(item)
                    else:
                        failures.append(Failure(item, outcome.error, request, response, attempt))
                self._count_delivered(ok)
                return
            assert error is not None
            if isinstance(error, ConfigError):
                if probe:
                    self.breaker.release_probe()
                raise DestinationFailed(self.name, _scrubbed(error, self.scrub))
            if isinstance(error, Permanent):
                self.breaker.record_success()  # the destination is up; it refused the content
                if len(request.items) > 1:
                    half = len(request.items) // 2
                    for part in (request.items[:half], request.items[half:]):
                        for sub in self.destination.build_requests(part):
                            await self._transmit(sub, failures)
                else:
                    failures.extend(
                        Failure(item, error, request, response, attempt) for item in request.items
                    )
                return
            if isinstance(error, Throttled) or (response is not None and response.status == 429):
                # "Slow down", not "down": backoff and the Retry-After gate deal with it;
                # the breaker only counts failures that say the destination is unwell.
                if probe:
                    self.breaker.release_probe()
            else:
                self.breaker.record_failure()
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            if self.policy.exhausted(first_failure, now):
                gave_up = Retryable(
                    RETRIES_EXHAUSTED,
                    f"still failing after {attempt} attempts over {now - first_failure:.0f} s; "
                    f"last error {error.reason}: {error.detail}",
                )
                failures.extend(
                    Failure(item, gave_up, request, response, attempt) for item in request.items
                )
                return
            if response is not None and not (
                isinstance(error, Throttled) and error.retry_after_s is not None
            ):
                # Retry-After is honoured whatever the destination's classify made of it.
                retry_after = parse_retry_after(response.headers)
                if retry_after is not None:
                    error = Throttled(error.reason, error.detail, retry_after)
            delay = self.policy.delay(attempt, error)
            if isinstance(error, Throttled) and error.retry_after_s is not None:
                self.gate.hold(error.retry_after_s)
            self._retries.labels(self.name, error.reason).inc()
            self.stats.retries += 1
            self._log_retry(error, delay)
            await asyncio.sleep(delay)

    async def _attempt(
        self, request: HttpRequest
    ) -> tuple[HttpResponse | None, list[ItemOutcome] | None, DeliveryError | None]:
        started = time.monotonic()
        try:
            if self.destination.multi_call:
                response = await self.destination.send(self.session, request)
                response.elapsed_s = time.monotonic() - started
            else:
                response = await self._plain_send(request)
        except TimeoutError:
            self._requests.labels(self.name, "timeout").inc()
            return None, None, Retryable("TIMEOUT", "no response within the timeout")
        except aiohttp.InvalidURL:
            return None, None, ConfigError("INVALID_ENDPOINT", "the endpoint URL is invalid")
        except (aiohttp.ClientError, OSError) as exc:
            self._requests.labels(self.name, "connection_error").inc()
            return None, None, Retryable("CONNECTION_ERROR", type(exc).__name__)
        self.stats.requests += 1
        self._requests.labels(self.name, str(response.status)).inc()
        self._req_seconds.observe(response.elapsed_s)
        self._batch_events.observe(len(request.items))
        try:
            outcomes = self.destination.classify(request, response)
        except DeliveryError as exc:
            return response, None, exc
        except Exception as exc:  # a classifier bug: treat as a refusal, bisect, dead-letter
            return response, None, Permanent("CLASSIFY_FAILED", f"classify() raised {exc!r}")
        if len(outcomes) != len(request.items):
            return (
                response,
                None,
                Permanent(
                    "CLASSIFY_FAILED",
                    f"classify() returned {len(outcomes)} outcomes for {len(request.items)} items",
                ),
            )
        return response, outcomes, None

    def _count_delivered(self, items: list[MappedEvent]) -> None:
        if not items:
            return
        self.stats.delivered += len(items)
        self._delivered.inc(len(items))
        now = now_ms()
        latencies = self.stats.latencies
        observe = self._e2e.observe
        for item in items:
            source = item.source
            if source is not None and source.received_at_ms is not None and not source.replay_of:
                seconds = max(0.0, (now - source.received_at_ms) / 1000.0)
                latencies.append(seconds)
                observe(seconds)

    def _log_retry(self, error: DeliveryError, delay: float) -> None:
        """One line per destination every few seconds, not one per retry."""
        self._retries_since_log += 1
        now = time.monotonic()
        if now - self._last_retry_log >= 5.0:
            log.warning(
                "%s: %d request(s) retried in the last %.0f s (last: %s, next in %.1f s, "
                "breaker %s)",
                self.name,
                self._retries_since_log,
                now - self._last_retry_log if self._last_retry_log else 0.0,
                error.reason,
                delay,
                self.breaker.state.name.lower(),
            )
            self._last_retry_log = now
            self._retries_since_log = 0


def standalone_deliverer(
    destination: Destination[Any],
    session: aiohttp.ClientSession,
    engine: SinkEngineSettings,
    stats: RunnerStats | None = None,
) -> Deliverer:
    """A Deliverer outside a runner (DLQ replay, full audience syncs): own breaker and metrics."""
    return Deliverer(
        destination,
        session,
        policy=engine.retry_policy(),
        breaker=CircuitBreaker(
            engine.breaker_failure_threshold,
            engine.breaker_cooldown_s,
            engine.breaker_max_cooldown_s,
        ),
        metrics=SinkMetrics(),
        stats=stats if stats is not None else RunnerStats(),
        scrub=Scrubber(secret_values(destination.settings)),
    )


def _disjoint(requests: list[HttpRequest]) -> bool:
    seen: set[str] = set()
    for request in requests:
        keys = {item.order_key for item in request.items}
        if not seen.isdisjoint(keys):
            return False
        seen |= keys
    return True


def _scrubbed(error: DeliveryError, scrub: Scrubber) -> DeliveryError:
    return type(error)(error.reason, scrub(error.detail)) if error.detail else error


def make_session(destination: Destination[Any]) -> aiohttp.ClientSession:
    """One keep-alive connection pool per destination, sized to its concurrency."""
    limits = destination.limits
    connector = aiohttp.TCPConnector(
        limit=limits.max_concurrency * 2, ttl_dns_cache=300, enable_cleanup_closed=True
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=destination.settings.timeout_s),
        auto_decompress=True,
        raise_for_status=False,
        headers={"User-Agent": "cdpflow-sink/0.1"},
    )


# --------------------------------------------------------------------------- lanes


@dataclass(eq=False)
class Lane:
    """One assigned partition: its buffer, its one in-flight batch and its offsets."""

    partition: int
    tracker: OffsetTracker = field(default_factory=OffsetTracker)
    buffer: deque[MappedEvent] = field(default_factory=deque)
    buffer_bytes: int = 0
    first_at: float = 0.0
    task: asyncio.Task[None] | None = None
    #: The previous owner's in-flight batch (partition revoked then re-assigned):
    #: this lane sends nothing before it settled, so order holds across rebalances.
    after: asyncio.Task[None] | None = None
    revoked: bool = False
    paused: bool = False
    committed: int | None = None

    def add(self, item: MappedEvent, now: float) -> None:
        if not self.buffer:
            self.first_at = now
        self.buffer.append(item)
        self.buffer_bytes += item.size + 1


# --------------------------------------------------------------------------- runner

RunnerState = Literal["starting", "running", "stopping", "stopped", "failed"]


class SinkRunner:
    """One destination consuming its source topic in its own consumer group."""

    def __init__(
        self,
        destination: Destination[Any],
        settings: Settings,
        engine: SinkEngineSettings,
        serde: AvroSerde,
        dlq: DeadLetterWriter,
        metrics: SinkMetrics,
        shared: SharedDecodes | None = None,
    ) -> None:
        self.destination = destination
        self.name = destination.name
        self.settings = settings
        self.engine = engine
        self.topic = (
            engine.audience_topic if destination.source == "audience" else engine.source_topic
        )
        self.group = f"{engine.group_prefix}{self.name}"
        self.limits = destination.limits
        self.dlq = dlq
        self.metrics = metrics
        self.stats = RunnerStats()
        self.scrub = Scrubber(secret_values(destination.settings))
        self.preparer = Preparer(destination, serde, shared)
        self.state: RunnerState = "starting"
        self.failure: DestinationFailed | None = None
        self.lanes: dict[int, Lane] = {}
        self.breaker = CircuitBreaker(
            engine.breaker_failure_threshold,
            engine.breaker_cooldown_s,
            engine.breaker_max_cooldown_s,
            on_change=self._breaker_changed,
        )
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"sink-{self.name}")
        self._consumer: Consumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._aux: set[asyncio.Task[None]] = set()
        self._commit_errors: list[int] = []
        self._last_commit = 0.0
        self._skip_counters: dict[str, Any] = {}
        self._buffered = metrics.buffered.labels(self.name)
        self._deliverer: Deliverer | None = None
        metrics.breaker_state.labels(self.name).set(0)

    # -- public

    def stop(self) -> None:
        self._stop.set()

    @property
    def assigned(self) -> list[int]:
        return sorted(p for p, lane in self.lanes.items() if not lane.revoked)

    def health(self) -> dict[str, Any]:
        p50 = self.stats.percentile(0.5)
        p99 = self.stats.percentile(0.99)
        return {
            "state": self.state,
            "group": self.group,
            "assigned": self.assigned,
            "breaker": self.breaker.state.name.lower(),
            "delivered": self.stats.delivered,
            "deadLettered": self.stats.dead_lettered,
            "skipped": self.stats.skipped,
            "requests": self.stats.requests,
            "retries": self.stats.retries,
            "inFlight": sum(lane.tracker.in_flight for lane in self.lanes.values()),
            "latencyP50S": p50,
            "latencyP99S": p99,
            "error": str(self.failure) if self.failure else None,
        }

    async def run(self) -> None:
        """Consume and deliver until :meth:`stop` (or a ConfigError)."""
        self._loop = asyncio.get_running_loop()
        self.metrics.up.labels(self.name).set(1)
        async with make_session(self.destination) as session:
            self._deliverer = Deliverer(
                self.destination,
                session,
                policy=self.engine.retry_policy(),
                breaker=self.breaker,
                metrics=self.metrics,
                stats=self.stats,
                scrub=self.scrub,
            )
            try:
                await self._call(self._subscribe)
                self.state = "running"
                log.info("%s: consuming %s as group %s", self.name, self.topic, self.group)
                await self._consume_loop()
            finally:
                await self._shutdown()
                self.metrics.up.labels(self.name).set(0)
                self._executor.shutdown(wait=False)

    # -- consumer thread

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._executor, partial(fn, *args))

    def _consumer_config(self) -> dict[str, Any]:
        conf: dict[str, Any] = {
            **self.settings.librdkafka_common(),
            "group.id": self.group,
            "client.id": f"cdpflow-sink-{self.name}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": self.engine.auto_offset_reset,
            "session.timeout.ms": int(self.engine.session_timeout_s * 1000),
            "heartbeat.interval.ms": max(1000, int(self.engine.session_timeout_s * 1000 / 4)),
            "partition.assignment.strategy": "cooperative-sticky",
            "queued.max.messages.kbytes": 32768,
            "fetch.wait.max.ms": 100,
            "on_commit": self._on_commit,
        }
        if self.engine.instance_id:
            conf["group.instance.id"] = f"{self.engine.instance_id}-{self.name}"
        return conf

    def _subscribe(self) -> None:
        self._consumer = Consumer(self._consumer_config())
        self._consumer.subscribe(
            [self.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None:
            log.warning("%s: offset commit failed: %s", self.name, err)
            self._commit_errors.extend(tp.partition for tp in partitions)
        else:
            failed = [tp.partition for tp in partitions if tp.error is not None]
            self._commit_errors.extend(failed)

    def _in_loop(self, coro: Any) -> Any:
        """Run a coroutine on the loop from the consumer thread and wait for it.

        Safe: the loop never waits synchronously for this thread (every consumer
        call is awaited through the executor), so it is free to run this.
        """
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._in_loop(self._assign([tp.partition for tp in partitions]))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        offsets = self._in_loop(self._revoke([tp.partition for tp in partitions], settle=True))
        if offsets:
            with contextlib.suppress(KafkaException):
                consumer.commit(offsets=offsets, asynchronous=False)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._in_loop(self._revoke([tp.partition for tp in partitions], settle=False))

    def _poll(
        self,
        pause: list[int],
        resume: list[int],
        commits: list[TopicPartition],
        timeout: float,
    ) -> list[tuple[int, int, Prepared]]:
        consumer = self._consumer
        assert consumer is not None
        if pause:
            consumer.pause([TopicPartition(self.topic, p) for p in pause])
        if resume:
            consumer.resume([TopicPartition(self.topic, p) for p in resume])
        if commits:
            try:
                consumer.commit(offsets=commits, asynchronous=True)
            except KafkaException as exc:
                log.warning("%s: offset commit failed: %s", self.name, exc)
                self._commit_errors.extend(tp.partition for tp in commits)
        messages = consumer.consume(max(500, self.limits.max_batch_events), timeout)
        return self._prepare_all(messages)

    def _prepare_all(self, messages: list[Message]) -> list[tuple[int, int, Prepared]]:
        out: list[tuple[int, int, Prepared]] = []
        prepare = self.preparer.prepare
        topic = self.topic
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("%s: consumer error: %s", self.name, err)
                continue
            partition = msg.partition()
            offset = msg.offset()
            if partition is None or offset is None:
                continue
            source = SourceRecord(topic, partition, offset, msg.value() or b"")
            delay = 0.5
            while True:
                try:
                    prepared = prepare(source)
                    break
                except RegistryUnavailable as exc:
                    if self._stop.is_set():
                        return out  # not added: consumed again after a restart
                    log.warning("%s: schema registry unavailable, retrying: %s", self.name, exc)
                    time.sleep(delay)
                    delay = min(delay * 2, 10.0)
            out.append((partition, offset, prepared))
        return out

    # -- rebalances (on the loop)

    async def _assign(self, partitions: list[int]) -> None:
        for p in partitions:
            old = self.lanes.get(p)
            lane = Lane(p)
            if old is not None and old.task is not None and not old.task.done():
                lane.after = old.task
            self.lanes[p] = lane
        log.info("%s: assigned partitions %s", self.name, sorted(partitions))

    async def _revoke(self, partitions: list[int], settle: bool) -> list[TopicPartition]:
        """Stop the lanes; with ``settle``, let in-flight batches finish briefly first
        so the final commit covers them (fewer duplicates for the next owner)."""
        lanes = [self.lanes[p] for p in partitions if p in self.lanes]
        if settle:
            busy = [lane.task for lane in lanes if lane.task is not None]
            if busy:
                await asyncio.wait(busy, timeout=min(5.0, self.engine.session_timeout_s / 2))
        offsets = []
        for lane in lanes:
            position = lane.tracker.position()
            if settle and position is not None and position != lane.committed:
                offsets.append(TopicPartition(self.topic, lane.partition, position))
            lane.revoked = True
            lane.buffer.clear()
            lane.buffer_bytes = 0
            if self.lanes.get(lane.partition) is lane:
                del self.lanes[lane.partition]
        if lanes:
            log.info(
                "%s: partitions %s %s",
                self.name,
                sorted(partitions),
                "revoked" if settle else "lost",
            )
        self._update_buffered()
        return offsets

    # -- the loop

    async def _consume_loop(self) -> None:
        wait = self.limits.max_batch_wait_s
        poll_timeout = max(0.01, min(0.1, wait / 2))
        while not self._stop.is_set() and self.failure is None:
            pause, resume = self._flow_control()
            commits = self._due_commits(force=False)
            entries = await self._call(self._poll, pause, resume, commits, poll_timeout)
            if entries:
                self._ingest(entries)
            self._dispatch_all()

    def _ingest(self, entries: list[tuple[int, int, Prepared]]) -> None:
        now = time.monotonic()
        skipped: dict[str, int] = {}
        failed: dict[int, list[Prepared]] = {}
        lanes = self.lanes
        for partition, offset, prepared in entries:
            lane = lanes.get(partition)
            if lane is None or lane.revoked:
                continue  # revoked while the poll was on its way: the next owner reads it
            lane.tracker.add(offset)
            if prepared.mapped is not None:
                lane.add(prepared.mapped, now)
            elif prepared.skip is not None:
                lane.tracker.done(offset)
                skipped[prepared.skip] = skipped.get(prepared.skip, 0) + 1
            else:
                failed.setdefault(partition, []).append(prepared)
        for reason, n in skipped.items():
            self.stats.skipped += n
            self.metrics.events.labels(self.name, "skipped", reason).inc(n)
        for partition, items in failed.items():
            task = asyncio.create_task(self._dead_letter_prepared(lanes[partition], items))
            self._aux.add(task)
            task.add_done_callback(self._aux_done)
        self._update_buffered()

    def _dispatch_all(self, force: bool = False) -> None:
        for lane in list(self.lanes.values()):
            self._dispatch(lane, force)

    def _dispatch(self, lane: Lane, force: bool = False) -> None:
        if lane.task is not None or lane.revoked or not lane.buffer or self.failure is not None:
            return
        if lane.after is not None:
            if not lane.after.done():
                return
            lane.after = None
        now = time.monotonic()
        limits = self.limits
        full = (
            len(lane.buffer) >= limits.max_batch_events
            or lane.buffer_bytes >= limits.max_batch_bytes
        )
        if not (full or force or now - lane.first_at >= limits.max_batch_wait_s):
            return
        batch = take_batch(lane.buffer, limits)
        lane.buffer_bytes -= sum(item.size + 1 for item in batch)
        lane.first_at = now
        lane.task = asyncio.create_task(self._deliver_batch(lane, batch))
        lane.task.add_done_callback(partial(self._lane_done, lane))

    def _lane_done(self, lane: Lane, task: asyncio.Task[None]) -> None:
        lane.task = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._fail(exc)
            return
        self._dispatch(lane)

    def _aux_done(self, task: asyncio.Task[None]) -> None:
        self._aux.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())  # type: ignore[arg-type]

    def _fail(self, exc: BaseException) -> None:
        if self.failure is not None:
            return
        if isinstance(exc, DestinationFailed):
            self.failure = exc
            log.error(
                "%s: stopped: the destination refuses our credentials or settings (%s). "
                "Nothing more is sent; fix the configuration and restart.",
                self.name,
                exc,
            )
        else:
            self.failure = DestinationFailed(
                self.name, ConfigError("INTERNAL_ERROR", type(exc).__name__)
            )
            log.error("%s: stopped by an unexpected error", self.name, exc_info=exc)
        self.state = "failed"
        self._stop.set()

    async def _deliver_batch(self, lane: Lane, batch: list[MappedEvent]) -> None:
        assert self._deliverer is not None
        failures = await self._deliverer.deliver(batch)
        if failures:
            await self._write_failures(failures)
        if not lane.revoked:
            done = lane.tracker.done
            for item in batch:
                done(item.source.offset)
        self._update_buffered()

    async def _dead_letter_prepared(self, lane: Lane, items: list[Prepared]) -> None:
        records = []
        reasons: dict[str, int] = {}
        for prepared in items:
            assert prepared.error is not None
            records.append(
                build_dead_letter(self.name, prepared.source, prepared.error, self.scrub)
            )
            reasons[prepared.error.reason] = reasons.get(prepared.error.reason, 0) + 1
        await self.dlq.write(self.name, records)
        self._count_dead(reasons)
        if not lane.revoked:
            for prepared in items:
                lane.tracker.done(prepared.source.offset or 0)
        self._update_buffered()

    async def _write_failures(self, failures: list[Failure]) -> None:
        records = []
        reasons: dict[str, int] = {}
        for f in failures:
            records.append(
                build_dead_letter(
                    self.name,
                    f.item.source,
                    f.error,
                    self.scrub,
                    request=f.request,
                    response=f.response,
                    attempts=f.attempts,
                )
            )
            reasons[f.error.reason] = reasons.get(f.error.reason, 0) + 1
        await self.dlq.write(self.name, records)
        self._count_dead(reasons)

    def _count_dead(self, reasons: dict[str, int]) -> None:
        for reason, n in reasons.items():
            self.stats.dead_lettered += n
            self.metrics.events.labels(self.name, "dead_lettered", reason).inc(n)

    # -- flow control and commits

    def _breaker_changed(self, state: BreakerState) -> None:
        self.metrics.breaker_state.labels(self.name).set(int(state))
        if state == BreakerState.OPEN:
            self.metrics.breaker_opened.labels(self.name).inc()
            log.warning(
                "%s: circuit open after %d failed requests: consumption paused for %.0f s",
                self.name,
                self.breaker.consecutive_failures,
                self.breaker.open_remaining,
            )
        elif state == BreakerState.HALF_OPEN:
            log.info("%s: circuit half-open: probing", self.name)
        else:
            log.info("%s: circuit closed: consumption resumed", self.name)

    def _flow_control(self) -> tuple[list[int], list[int]]:
        """Partitions to pause / resume: all while the breaker is not closed, and any lane
        whose buffer is over its share of ``max_buffered_events``."""
        lanes = [lane for lane in self.lanes.values() if not lane.revoked]
        if not lanes:
            return [], []
        breaker_closed = self.breaker.state == BreakerState.CLOSED
        share = max(2 * self.limits.max_batch_events, self.engine.max_buffered_events // len(lanes))
        pause: list[int] = []
        resume: list[int] = []
        for lane in lanes:
            n = len(lane.buffer)
            want = (not breaker_closed) or n >= share or (lane.paused and n >= share // 2)
            if want and not lane.paused:
                pause.append(lane.partition)
            elif not want and lane.paused:
                resume.append(lane.partition)
            lane.paused = want
        return pause, resume

    def _due_commits(self, force: bool) -> list[TopicPartition]:
        now = time.monotonic()
        if not force and now - self._last_commit < self.engine.commit_interval_s:
            return []
        self._last_commit = now
        for p in self._commit_errors:
            lane = self.lanes.get(p)
            if lane is not None:
                lane.committed = None
        self._commit_errors.clear()
        out = []
        for lane in self.lanes.values():
            if lane.revoked:
                continue
            position = lane.tracker.position()
            if position is not None and position != lane.committed:
                out.append(TopicPartition(self.topic, lane.partition, position))
                lane.committed = position
        return out

    def _update_buffered(self) -> None:
        self._buffered.set(sum(lane.tracker.in_flight for lane in self.lanes.values()))

    # -- shutdown

    async def _shutdown(self) -> None:
        if self.state != "failed":
            self.state = "stopping"
        deadline = time.monotonic() + self.engine.shutdown_grace_s
        if self.failure is None:
            # Finish what is in flight and send what is buffered, within the grace period.
            while time.monotonic() < deadline and self.failure is None:
                self._dispatch_all(force=True)
                busy = [lane.task for lane in self.lanes.values() if lane.task is not None]
                busy += list(self._aux)
                if not busy and not any(lane.buffer for lane in self.lanes.values()):
                    break
                if busy:
                    await asyncio.wait(busy, timeout=max(0.0, deadline - time.monotonic()))
        pending = [lane.task for lane in self.lanes.values() if lane.task is not None]
        pending += list(self._aux)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(BaseException):
                await task
        if self._consumer is not None:
            commits = self._due_commits(force=True)
            if commits:
                with contextlib.suppress(KafkaException):
                    await self._call(
                        partial(self._consumer.commit, offsets=commits, asynchronous=False)
                    )
            with contextlib.suppress(Exception):
                await self._call(self._consumer.close)
            self._consumer = None
        if self.state != "failed":
            self.state = "stopped"
        log.info(
            "%s: stopped (delivered=%d dead_lettered=%d skipped=%d)",
            self.name,
            self.stats.delivered,
            self.stats.dead_lettered,
            self.stats.skipped,
        )


# --------------------------------------------------------------------------- service


class SinkService:
    """Runners for several destinations on one loop, a shared DLQ producer, metrics."""

    def __init__(
        self,
        destinations: Sequence[Destination[Any]],
        settings: Settings | None = None,
        engine: SinkEngineSettings | None = None,
        *,
        serde: AvroSerde | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not destinations:
            raise ValueError("no destination to run")
        self.settings = settings or Settings()
        self.engine = engine or SinkEngineSettings()
        self.serde = serde or AvroSerde.from_url(self.settings.schema_registry_url)
        self.metrics = SinkMetrics(registry)
        self.destinations = list(destinations)
        self.runners: dict[str, SinkRunner] = {}
        self.metrics_url: str | None = None
        self._producer: ReliableProducer | None = None
        self._stop = asyncio.Event()
        self._started = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()
        for runner in self.runners.values():
            runner.stop()

    async def wait_started(self) -> None:
        await self._started.wait()

    def health(self) -> dict[str, Any]:
        return {"destinations": {name: r.health() for name, r in self.runners.items()}}

    async def run(self) -> int:
        """Run until :meth:`stop`; 0 when every runner stopped cleanly, 3 if one failed."""
        names = [d.name for d in self.destinations]
        await asyncio.to_thread(ensure_dlq_topics, self.settings, names)
        codec = DlqCodec(self.serde)
        for name in names:
            await asyncio.to_thread(codec.encoder, name)  # register the DLQ schema up front
        self._producer = ReliableProducer(self.settings, **DLQ_PRODUCER_OVERRIDES)
        writer = DeadLetterWriter(self._producer, codec)
        # One cache per source topic: (partition, offset) only names a record within one.
        shared: dict[str, SharedDecodes] = {}
        if self.engine.shared_decode_cache > 0:
            for kind in {d.source for d in self.destinations}:
                if sum(d.source == kind for d in self.destinations) > 1:
                    shared[kind] = SharedDecodes(self.engine.shared_decode_cache)
        for dest in self.destinations:
            self.runners[dest.name] = SinkRunner(
                dest,
                self.settings,
                self.engine,
                self.serde,
                writer,
                self.metrics,
                shared.get(dest.source),
            )
        site_runner = await self._serve_metrics()
        tasks = {
            asyncio.create_task(r.run(), name=f"sink-{r.name}"): r for r in self.runners.values()
        }
        self._started.set()
        if self._stop.is_set():
            self.stop()
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        runner = tasks[task]
                        runner._fail(task.exception())  # type: ignore[arg-type]
        finally:
            if site_runner is not None:
                await site_runner.cleanup()
            producer, self._producer = self._producer, None
            await asyncio.to_thread(producer.close, 10.0)
        return 3 if any(r.failure is not None for r in self.runners.values()) else 0

    async def _serve_metrics(self) -> web.AppRunner | None:
        port = self.engine.metrics_port
        if port is None:
            return None

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(self.metrics.registry),
                headers={"Content-Type": CONTENT_TYPE_LATEST},
            )

        async def health(_: web.Request) -> web.Response:
            body = self.health()
            ok = all(r.state in ("starting", "running") for r in self.runners.values())
            return web.json_response(body, status=200 if ok else 503)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.engine.metrics_host, port)
        await site.start()
        host, bound = runner.addresses[0][:2]
        self.metrics_url = f"http://{host}:{bound}"
        log.info("sink metrics on %s/metrics", self.metrics_url)
        return runner


# --------------------------------------------------------------------------- entry points


def settings_env(name: str, values: Mapping[str, Any]) -> dict[str, str]:
    """``CDP_SINK_<NAME>_<KEY>`` variables for the keys the destination's settings declare.

    Keys it does not know are left out, so an emulator's credential dict (which may
    offer several schemes) can be passed as is.
    """
    cls = sink_registry.get(name)
    prefix = env_prefix_of(cls)
    fields = cls.settings_cls.model_fields
    return {
        prefix + key.upper(): value if isinstance(value, str) else str(value)
        for key, value in values.items()
        if key in fields and value is not None
    }


def emulator_env(cluster: Any) -> dict[str, str]:
    """Every ``CDP_SINK_*`` variable to point the sinks at running emulators.

    ``cluster`` is a :class:`sinks.emulators.EmulatorCluster` (``sink_envs`` and
    ``credentials`` per destination); credentials are mapped onto each
    destination's own setting names. Destinations not registered are ignored.
    """
    known = sink_registry.load_all()
    env: dict[str, str] = {}
    for name, sink_env in cluster.sink_envs.items():
        if name not in known:
            continue
        env.update(sink_env)
        for key, value in settings_env(name, cluster.credentials.get(name, {})).items():
            env.setdefault(key, value)
    return env


def run_forever(
    destinations: Sequence[Destination[Any]],
    settings: Settings | None = None,
    engine: SinkEngineSettings | None = None,
) -> int:
    """Run the sinks until SIGINT/SIGTERM; the exit code of :meth:`SinkService.run`."""
    import signal

    async def main() -> int:
        service = SinkService(destinations, settings, engine)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, service.stop)
        return await service.run()

    return asyncio.run(main())
