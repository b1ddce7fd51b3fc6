"""A collector that speaks the Segment HTTP Tracking API and writes events to Kafka.

Clients (analytics.js, analytics-python, plain ``curl``) keep working unchanged when
pointed at this host. Each valid message becomes a ``CustomerEvent`` on
``cdp.events.raw``; each invalid one becomes a ``DeadLetter`` on ``cdp.events.dlq``.

Routes
    ``POST /v1/{track,identify,page,screen,group,alias}`` one message; the path decides
    its type. ``POST /v1/batch`` (and ``/v1/import``) a ``{"batch": [...]}`` body.
    analytics.js posts to the short paths ``/v1/{t,i,p,s,g,a}`` (one message) and
    ``/v1/b`` (batching strategy) with ``Content-Type: text/plain`` so browsers skip
    the CORS preflight; those bodies carry ``writeKey``.
    ``GET /health/live``, ``GET /health/ready``, ``GET /metrics``.

Authentication
    HTTP Basic with the write key as user name (password empty, colon optional), else
    the body's ``writeKey``. A header key that is not valid falls back to the body key,
    so a Bearer (OAuth) header plus body key also works; the token itself is not
    checked. Events carry ``sourceId = write_key_id(key)``, never the key, and the key
    is stripped from dead-lettered JSON.

Responses (always JSON; errors are ``{"code", "message"}`` objects as the Segment SDKs
expect)
    ``200 {"success": true, "accepted": N, "rejected": M, "errors": [{"index",
    "messageId", "code", "message"}]}`` once the broker acknowledged (acks=all) every
    record of the request, accepted ones on the raw topic and rejected ones on the DLQ.
    A batch answers 200 even when every message was rejected: they are durably in the
    DLQ, and the SDKs treat anything but 200 as a failure to retry or drop, which
    would be wrong either way. A *single* call whose one message was rejected answers
    ``400 {"code": "invalid_event", ...}`` with the same counters: nothing of it was
    accepted, retrying cannot help (the SDKs drop on 4xx), and a developer calling
    ``/v1/track`` by hand should see why. This deviates from Segment, which answers
    200 and drops silently.

    ``400`` ``payload_too_large`` (body over 32 KB, or 500 KB for a batch, measured
    after decompression), ``invalid_json``, ``invalid_request`` (body not an object,
    ``batch`` not an array), ``batch_too_large`` (over 2500 messages; Segment drops
    these silently, we say so), ``invalid_encoding`` (corrupt gzip/deflate body). ``401
    unauthorized``. ``415`` ``unsupported_media_type`` / ``unsupported_encoding``.
    ``503 unavailable`` with ``Retry-After`` when Kafka or the registry cannot take
    the records: nothing is acknowledged that is not on the broker, so a client retry
    may duplicate records already written (consumers dedupe on ``messageId``).

    One oversized message inside a batch does not refuse the batch: it is
    dead-lettered as ``EVENT_TOO_LARGE`` and the rest is accepted. A dead letter holds
    the message as it was judged, with the batch-level ``context``/``integrations``/
    ``sentAt`` merged in so it can be replayed on its own, and without ``writeKey``.

Nothing here logs write keys or event payloads (they carry PII); per-event work is
counted in Prometheus metrics, not logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import threading
import time
import traceback
import zlib
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from aiohttp import web
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from sources.kafka_producer import DeliveryFailed, QueueFull, ReliableProducer
from streams import topics
from streams.events import (
    MAX_MESSAGE_ID_LENGTH,
    EventRejected,
    Limits,
    Reason,
    dead_letter,
    from_segment,
    identity_key,
    now_ms,
)
from streams.serde import AvroSerde, Encoder
from streams.settings import Settings, write_key_id

log = logging.getLogger(__name__)

#: Segment's batch body limit (the per-message and single-call limit is
#: ``Settings.cdp_max_event_bytes``, 32 KB by default).
MAX_BATCH_BYTES: Final = 500 * 1024
#: Segment's per-batch message count. Above it we answer 400 instead of dropping.
MAX_BATCH_MESSAGES: Final = 2500
#: Room for gzip framing on an incompressible body that is just under the limit.
COMPRESSION_MARGIN: Final = 4096
RETRY_AFTER_S: Final = 5
DEFAULT_DELIVERY_TIMEOUT_S: Final = 10.0

BATCH: Final = "batch"
SINGLE_PATHS: Final[dict[str, str]] = {
    "/v1/track": "track",
    "/v1/identify": "identify",
    "/v1/page": "page",
    "/v1/screen": "screen",
    "/v1/group": "group",
    "/v1/alias": "alias",
    "/v1/t": "track",
    "/v1/i": "identify",
    "/v1/p": "page",
    "/v1/s": "screen",
    "/v1/g": "group",
    "/v1/a": "alias",
}
BATCH_PATHS: Final = ("/v1/batch", "/v1/import", "/v1/b")

CORS_ALLOW_HEADERS: Final = "Content-Type, Authorization, Content-Encoding"
CORS_ALLOW_METHODS: Final = "POST, OPTIONS"
CORS_MAX_AGE_S: Final = "86400"

_JSON_TYPES: Final = frozenset(
    {"application/json", "text/plain", "application/octet-stream", ""}
)  # aiohttp reports a missing Content-Type as application/octet-stream

#: Byte table mapping digits to "0" and everything else to " ": a C-speed scan for
#: integers orjson would silently turn into floats (it parses > 64-bit ints as float).
_DIGITS: Final = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))
_BIG_INT_RUN: Final = b"0" * 20


class Refusal(Exception):
    """A request answered with an error before (or instead of) producing anything."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def _unavailable(message: str) -> Refusal:
    return Refusal(503, "unavailable", message, {"Retry-After": str(RETRY_AFTER_S)})


def json_response(
    status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers
    )


def error_response(refusal: Refusal) -> web.Response:
    return json_response(
        refusal.status, {"code": refusal.code, "message": refusal.message}, refusal.headers
    )


# --------------------------------------------------------------------------- body


def _decompress(data: bytes, wbits: int, limit: int) -> bytes:
    """Inflate at most ``limit`` bytes, so a zip bomb costs us ``limit`` bytes of memory."""
    out: list[bytes] = []
    size = 0
    rest = data
    try:
        while rest:  # a gzip stream may hold several members; decompress them all
            inflater = zlib.decompressobj(wbits)
            chunk = inflater.decompress(rest, limit + 1 - size)
            size += len(chunk)
            if size > limit:
                raise Refusal(
                    400, "payload_too_large", f"decompressed body is larger than {limit} bytes"
                )
            out.append(chunk)
            if not inflater.eof:
                raise Refusal(400, "invalid_encoding", "compressed body is truncated")
            rest = inflater.unused_data
    except zlib.error:
        raise Refusal(400, "invalid_encoding", "body is not valid compressed data") from None
    return b"".join(out)


_WBITS: Final[dict[str, int]] = {
    "gzip": zlib.MAX_WBITS | 16,
    "x-gzip": zlib.MAX_WBITS | 16,
    "deflate": zlib.MAX_WBITS | 32,  # zlib or gzip header, whatever the client sent
}


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, decompressed, refused past ``limit`` without buffering more."""
    if request.content_type not in _JSON_TYPES and not request.content_type.endswith("+json"):
        raise Refusal(
            415, "unsupported_media_type", "send application/json or text/plain JSON bodies"
        )
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    wbits = None
    if encoding not in ("", "identity"):
        wbits = _WBITS.get(encoding)
        if wbits is None:
            raise Refusal(
                415, "unsupported_encoding", "Content-Encoding must be gzip, deflate or identity"
            )
    wire_limit = limit if wbits is None else limit + COMPRESSION_MARGIN
    length = request.content_length
    if length is not None and length > wire_limit:
        raise Refusal(400, "payload_too_large", f"body is larger than {limit} bytes")
    try:
        data = await request.read()  # stops at the app's client_max_size (chunked bodies)
    except web.HTTPRequestEntityTooLarge:
        raise Refusal(400, "payload_too_large", f"body is larger than {limit} bytes") from None
    if wbits is not None and request.content.total_compressed_bytes is None:
        data = _decompress(data, wbits, limit)  # (None: aiohttp did not inflate it already)
    if len(data) > limit:
        raise Refusal(400, "payload_too_large", f"body is larger than {limit} bytes")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


def loads(data: bytes) -> Any:
    """Parse JSON so that every number round-trips exactly.

    orjson is the fast path; it reads integers beyond 64 bits as floats, which would
    silently change a customer's numbers, so bodies with a 20-digit run go through
    the stdlib parser (strict: no NaN/Infinity, no overflowing floats).
    """
    if _BIG_INT_RUN not in data.translate(_DIGITS):
        return orjson.loads(data)
    return json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)


def json_bytes(value: Any) -> bytes:
    """Compact JSON (orjson; the stdlib for > 64-bit ints and other oddities)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- auth


def basic_auth_user(header: str | None) -> str | None:
    """The user name of a Basic Authorization header (Segment: the write key)."""
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[0] or None


# --------------------------------------------------------------------------- delivery


class _Acks:
    """One asyncio future for all the delivery futures of a request.

    Delivery callbacks run on the producer's poll thread; waking the event loop once
    per request instead of once per record (as ``asyncio.wrap_future`` would) keeps
    large batches cheap.
    """

    __slots__ = ("_lock", "_loop", "_pending", "done", "error")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending = 1  # released by seal(), so the future cannot fire while we add
        self.error: BaseException | None = None
        self.done: asyncio.Future[None] = loop.create_future()

    def add(self, fut: Future[Any]) -> None:
        with self._lock:
            self._pending += 1
        fut.add_done_callback(self._settle)

    def _settle(self, fut: Future[Any]) -> None:
        exc = fut.exception()
        self._release(exc)

    def _release(self, exc: BaseException | None) -> None:
        with self._lock:
            if exc is not None and self.error is None:
                self.error = exc
            self._pending -= 1
            last = self._pending == 0
        if last:
            self._loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def seal(self) -> asyncio.Future[None]:
        self._release(None)
        return self.done


# --------------------------------------------------------------------------- metrics


@dataclass
class Metrics:
    """Per-app metrics (own registry, so tests can build several apps in one process)."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )
    requests: Counter = field(init=False)
    events: Counter = field(init=False)
    latency: Histogram = field(init=False)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "cdp_collector_requests",
            "HTTP requests by route and status.",
            ["path", "status"],
            registry=self.registry,
        )
        self.events = Counter(
            "cdp_collector_events",
            "Messages received: accepted to the raw topic or rejected to the DLQ.",
            ["outcome", "reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cdp_collector_request_seconds",
            "Request latency, including the wait for the broker's acknowledgement.",
            ["path"],
            registry=self.registry,
        )


# --------------------------------------------------------------------------- collector


@dataclass(slots=True)
class _Outcome:
    accepted: int
    rejected: int
    errors: list[dict[str, Any]]


def _message_id(item: Any) -> str | None:
    if isinstance(item, dict):
        value = item.get("messageId")
        if isinstance(value, str) and 0 < len(value) <= MAX_MESSAGE_ID_LENGTH:
            return value
    return None


def _without_key(item: Any) -> Any:
    if isinstance(item, dict) and "writeKey" in item:
        return {k: v for k, v in item.items() if k != "writeKey"}
    return item


class Collector:
    """The state behind one app: keys, limits, encoders, producer, readiness."""

    def __init__(
        self,
        settings: Settings,
        serde: AvroSerde | None,
        producer: ReliableProducer | None,
        producer_overrides: Mapping[str, Any] | None,
        delivery_timeout_s: float,
    ) -> None:
        self.settings = settings
        self.limits = Limits.from_settings(settings)
        self.source_ids = {key: write_key_id(key) for key in settings.write_keys()}
        self.serde = serde
        self.producer = producer
        self._own_producer = producer is None
        self._producer_overrides = dict(producer_overrides or {})
        self.delivery_timeout_s = delivery_timeout_s
        self.encode_raw: Encoder | None = None
        self.encode_dlq: Encoder | None = None
        self.broker_ok = False
        self.metrics = Metrics()
        self._ready_task: asyncio.Task[None] | None = None
        self._last_failure_log = 0.0

    # ---- lifecycle

    async def start(self) -> None:
        if self.producer is None:
            self.producer = ReliableProducer(self.settings, **self._producer_overrides)
        if self.serde is None:
            self.serde = AvroSerde.from_url(self.settings.schema_registry_url)
        with contextlib.suppress(Exception):  # logged and retried by _become_ready
            await asyncio.to_thread(self._load_encoders)
        self._ready_task = asyncio.create_task(self._become_ready(), name="collector-ready")

    async def stop(self) -> None:
        if self._ready_task is not None:
            self._ready_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ready_task
        if self._own_producer and self.producer is not None:
            producer, self.producer = self.producer, None  # frees librdkafka's threads now
            remaining = await asyncio.to_thread(producer.close, 10.0)
            if remaining:
                log.warning("collector stopped with %d undelivered records", remaining)

    def _load_encoders(self) -> None:
        """Register both value schemas (once); the encoders then never ask the registry."""
        assert self.serde is not None
        raw = self.serde.encoder(topics.EVENTS_RAW)
        dlq = self.serde.encoder(topics.EVENTS_DLQ)
        self.encode_raw, self.encode_dlq = raw, dlq

    def _probe_broker(self) -> bool:
        """True once the broker answers metadata and the collector's topics exist."""
        admin = AdminClient(self.settings.librdkafka_common())
        try:
            md = admin.list_topics(timeout=5)
        except KafkaException:
            return False  # (no traceback kept alive: the client must be freed now)
        return bool(md.brokers) and {topics.EVENTS_RAW, topics.EVENTS_DLQ} <= set(md.topics)

    async def _become_ready(self) -> None:
        delay = 0.5
        while self.encode_raw is None or not self.broker_ok:
            if self.encode_raw is None:
                try:
                    await asyncio.to_thread(self._load_encoders)
                except Exception as exc:
                    log.warning("schema registration failed, retrying: %s", type(exc).__name__)
            if not self.broker_ok:
                try:
                    self.broker_ok = await asyncio.to_thread(self._probe_broker)
                except Exception as exc:
                    log.warning("Kafka not reachable yet: %s", type(exc).__name__)
            if self.encode_raw is None or not self.broker_ok:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        log.info("collector ready")

    @property
    def ready(self) -> bool:
        return self.encode_raw is not None and self.broker_ok

    # ---- requests

    def authenticate(self, request: web.Request, body: Any) -> str:
        """The sourceId of the request's write key, or Refusal(401)."""
        header_key = basic_auth_user(request.headers.get("Authorization"))
        if header_key is not None:
            source = self.source_ids.get(header_key)
            if source is not None:
                return source
        body_key = body.get("writeKey") if isinstance(body, dict) else None
        if isinstance(body_key, str):
            source = self.source_ids.get(body_key)
            if source is not None:
                return source
        if header_key is None and body_key is None:
            raise Refusal(
                401, "unauthorized", "missing write key (Basic auth user or body writeKey)"
            )
        raise Refusal(401, "unauthorized", "unknown write key")

    async def handle(self, request: web.Request, kind: str) -> web.Response:
        """Parse, authenticate, split into raw/DLQ records, produce, await all acks."""
        limit = MAX_BATCH_BYTES if kind == BATCH else self.limits.max_event_bytes
        data = await read_body(request, limit)
        try:
            body = loads(data)
        except (ValueError, RecursionError):
            raise Refusal(400, "invalid_json", "body is not valid JSON") from None
        source_id = self.authenticate(request, body)
        if not isinstance(body, dict):
            raise Refusal(400, "invalid_request", "body must be a JSON object")
        encode_raw, encode_dlq, producer = self.encode_raw, self.encode_dlq, self.producer
        if encode_raw is None or encode_dlq is None or producer is None:
            raise _unavailable("schemas are not registered yet")

        if kind == BATCH:
            # No message can exceed the per-message limit if the whole body does not.
            oversize_check = len(data) > self.limits.max_event_bytes
            items, default_type = self._batch_items(body, oversize_check), None
        else:
            if body.get("type", kind) != kind:
                body = {**body, "type": kind}  # the path decides the type
            items, default_type = [body], kind
        outcome = await self._produce(
            items, default_type, source_id, producer, encode_raw, encode_dlq
        )
        payload = {
            "success": outcome.rejected == 0 or kind == BATCH,
            "accepted": outcome.accepted,
            "rejected": outcome.rejected,
            "errors": outcome.errors,
        }
        if kind != BATCH and outcome.accepted == 0:
            first = outcome.errors[0]
            payload = {"code": "invalid_event", "message": first["message"], **payload}
            return json_response(400, payload)
        return json_response(200, payload)

    def _batch_items(self, body: dict[str, Any], oversize_check: bool) -> list[Any]:
        """The batch's messages, with the batch-level context/integrations/sentAt merged in."""
        items = body.get("batch")
        if not isinstance(items, list):
            raise Refusal(400, "invalid_request", "batch must be a JSON array of messages")
        if len(items) > MAX_BATCH_MESSAGES:
            raise Refusal(
                400,
                "batch_too_large",
                f"batch has {len(items)} messages; at most {MAX_BATCH_MESSAGES} are accepted",
            )
        shared: dict[str, Any] = {}
        for key in ("context", "integrations"):
            value = body.get(key)
            if value is not None and not isinstance(value, dict):
                raise Refusal(400, "invalid_request", f"batch-level {key} must be a JSON object")
            if value:
                shared[key] = value
        sent_at = body.get("sentAt")
        max_bytes = self.limits.max_event_bytes
        out: list[Any] = []
        for item in items:
            if not isinstance(item, dict):
                out.append(item)  # from_segment rejects it with SCHEMA_INVALID
                continue
            if oversize_check and len(json_bytes(item)) > max_bytes:
                out.append(_TooLarge(item))
                continue
            if shared or sent_at is not None or "writeKey" in item:
                msg = dict(item)
                msg.pop("writeKey", None)
                for key, value in shared.items():
                    own = msg.get(key)
                    if own is None:
                        msg[key] = value
                    elif isinstance(own, dict):
                        msg[key] = {**value, **own}
                if sent_at is not None and "sentAt" not in msg:
                    msg["sentAt"] = sent_at  # SDKs stamp sentAt on the batch, not the items
                item = msg
            out.append(item)
        return out

    async def _produce(
        self,
        items: list[Any],
        default_type: str | None,
        source_id: str,
        producer: ReliableProducer,
        encode_raw: Encoder,
        encode_dlq: Encoder,
    ) -> _Outcome:
        received_at = now_ms()
        limits = self.limits
        acks = _Acks(asyncio.get_running_loop())
        errors: list[dict[str, Any]] = []
        reasons: Tally[str] = Tally()
        accepted = 0
        raw_topic, dlq_topic = topics.EVENTS_RAW, topics.EVENTS_DLQ
        try:
            for index, item in enumerate(items):
                try:
                    if isinstance(item, _TooLarge):
                        raise EventRejected(
                            Reason.EVENT_TOO_LARGE,
                            f"message is larger than {limits.max_event_bytes} bytes",
                        )
                    record = from_segment(
                        item,
                        received_at_ms=received_at,
                        source_id=source_id,
                        default_type=default_type,
                        limits=limits,
                    )
                    value = encode_raw(record)
                except EventRejected as exc:
                    reason, detail = exc.reason, exc.detail
                except Exception as exc:  # one odd message must not fail the whole request
                    reason = Reason.SCHEMA_INVALID
                    detail = f"message cannot be encoded ({type(exc).__name__})"
                else:
                    acks.add(producer.produce(raw_topic, value, identity_key(record), block=False))
                    accepted += 1
                    continue
                original = item.item if isinstance(item, _TooLarge) else item
                message_id = _message_id(original)
                letter = dead_letter(
                    json_bytes(_without_key(original)),
                    stage="collector",
                    reason=reason,
                    message=detail,
                    message_id=message_id,
                    failed_at_ms=received_at,
                )
                acks.add(producer.produce(dlq_topic, encode_dlq(letter), message_id, block=False))
                reasons[reason] += 1
                errors.append(
                    {
                        "index": index,
                        "messageId": message_id,
                        "code": str(reason),
                        "message": detail,
                    }
                )
        except (QueueFull, DeliveryFailed) as exc:
            self._log_failure(exc)
            raise _unavailable("the event log cannot take records right now; retry") from None
        try:
            await asyncio.wait_for(acks.seal(), self.delivery_timeout_s)
        except TimeoutError:
            self._log_failure(TimeoutError("broker acknowledgement timed out"))
            raise _unavailable("the event log did not acknowledge in time; retry") from None
        if acks.error is not None:
            self._log_failure(acks.error)
            raise _unavailable("the event log did not take every record; retry")
        events = self.metrics.events
        if accepted:
            events.labels("accepted", "").inc(accepted)
        for code, count in reasons.items():
            events.labels("rejected", code).inc(count)
        return _Outcome(accepted, len(errors), errors)

    def _log_failure(self, exc: BaseException) -> None:
        """Log delivery trouble at most every 10 s: when Kafka is down every request fails."""
        now = time.monotonic()
        if now - self._last_failure_log >= 10.0:
            self._last_failure_log = now
            log.warning("answering 503: Kafka delivery failed: %s", exc)


@dataclass(slots=True, frozen=True)
class _TooLarge:
    """A batch message over the per-message limit, kept only to be dead-lettered."""

    item: dict[str, Any]


# --------------------------------------------------------------------------- app

COLLECTOR: Final = web.AppKey("collector", Collector)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def _edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CORS, JSON error bodies (also for aiohttp's own 404/405) and request metrics."""
    started = time.perf_counter()
    try:
        response = await handler(request)
    except Refusal as refusal:
        response = error_response(refusal)
    except web.HTTPException as exc:
        if exc.empty_body or exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        response = json_response(exc.status, {"code": code, "message": exc.reason}, allow)
    except Exception as exc:
        # A bug. Log where, not the exception text: it could quote the payload (PII).
        where = "".join(traceback.format_tb(exc.__traceback__))
        log.error("unhandled %s on %s\n%s", type(exc).__name__, request.path, where)
        response = json_response(500, {"code": "internal_error", "message": "unexpected error"})
    origin = request.headers.get("Origin")
    if origin is not None and request.path.startswith("/v1/"):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Vary"] = "Origin"
    metrics = request.app[COLLECTOR].metrics
    path = _route_label(request)
    metrics.requests.labels(path, str(response.status)).inc()
    metrics.latency.labels(path).observe(time.perf_counter() - started)
    return response


async def _preflight(request: web.Request) -> web.Response:
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": CORS_ALLOW_METHODS,
            "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
            "Access-Control-Max-Age": CORS_MAX_AGE_S,
        },
    )


def _tracking_handler(kind: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await request.app[COLLECTOR].handle(request, kind)

    return handler


async def _live(request: web.Request) -> web.Response:
    return json_response(200, {"status": "live"})


async def _ready(request: web.Request) -> web.Response:
    collector = request.app[COLLECTOR]
    if collector.ready:
        return json_response(200, {"status": "ready"})
    return json_response(
        503,
        {
            "code": "not_ready",
            "message": "waiting for schema registration and a Kafka connection",
            "schemas": collector.encode_raw is not None,
            "broker": collector.broker_ok,
        },
        {"Retry-After": str(RETRY_AFTER_S)},
    )


async def _metrics(request: web.Request) -> web.Response:
    registry = request.app[COLLECTOR].metrics.registry
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def create_app(
    settings: Settings,
    serde: AvroSerde | None = None,
    producer: ReliableProducer | None = None,
    *,
    producer_overrides: Mapping[str, Any] | None = None,
    delivery_timeout_s: float = DEFAULT_DELIVERY_TIMEOUT_S,
) -> web.Application:
    """The collector app. A serde/producer passed in is used as is and left open.

    ``producer_overrides`` are librdkafka settings for the producer created here
    (e.g. a short ``message.timeout.ms``). ``delivery_timeout_s`` bounds how long a
    request waits for acknowledgements before answering 503, so clients (whose own
    timeout is 15 s in analytics-python) get an answer instead of a hang.
    """
    if not settings.write_keys():
        log.warning("CDP_WRITE_KEYS is empty: every tracking request will get 401")
    collector = Collector(settings, serde, producer, producer_overrides, delivery_timeout_s)
    app = web.Application(
        middlewares=[_edge],
        client_max_size=MAX_BATCH_BYTES + COMPRESSION_MARGIN,
        # We inflate bodies ourselves, capped at the request's limit (zip bombs).
        handler_args={"auto_decompress": False},
    )
    app[COLLECTOR] = collector
    for path, event_type in SINGLE_PATHS.items():
        app.router.add_post(path, _tracking_handler(event_type))
        app.router.add_route("OPTIONS", path, _preflight)
    for path in BATCH_PATHS:
        app.router.add_post(path, _tracking_handler(BATCH))
        app.router.add_route("OPTIONS", path, _preflight)
    app.router.add_get("/health/live", _live)
    app.router.add_get("/health/ready", _ready)
    app.router.add_get("/metrics", _metrics)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await collector.start()
        yield
        await collector.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


def run_collector(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests finish and the producer flushes."""
    log.info(
        "collector listening on %s:%s", settings.cdp_collector_host, settings.cdp_collector_port
    )
    web.run_app(
        create_app(settings),
        host=settings.cdp_collector_host,
        port=settings.cdp_collector_port,
        access_log=None,  # request counts and latencies are in /metrics; logging costs rps
        print=None,
    )
