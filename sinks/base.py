"""The contract every destination implements, and the error taxonomy the engine acts on.

A destination is one module: a typed settings class (env ``CDP_SINK_<DEST>_*``),
its limits, a mapping from an EnrichedEvent to the destination's item, a request
builder, and a response classifier. The shared engine (:mod:`sinks.engine`)
does everything else — consuming, batching, rate limits, retries, the circuit
breaker, dead letters and offset commits — the same way for every destination.
"""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Generic, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    import aiohttp

# --------------------------------------------------------------------------- errors


class DeliveryError(Exception):
    """Why an item or a request was not delivered. ``reason`` is a stable code for the DLQ."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.detail = message


class Retryable(DeliveryError):
    """Transient (5xx, timeout, connection reset): retry with exponential backoff + jitter."""


class Throttled(Retryable):
    """429 or a vendor rate-limit code; wait ``retry_after_s`` when the vendor says how long."""

    def __init__(self, reason: str, message: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(reason, message)
        self.retry_after_s = retry_after_s


class Permanent(DeliveryError):
    """The destination will never accept this item as it is: dead-letter it with the reason.

    Returned per item from :meth:`Destination.classify` it dead-letters that item.
    *Raised* from ``classify`` it means the destination refused the whole request
    (a 400 for the batch): the engine then splits the batch in halves and sends
    each half again, so only the items that really fail end up dead-lettered.
    """


class RequestTooLarge(Permanent):
    """413 / "payload too large" for the whole request: the engine halves the batch and resends.

    A single item that is still too large on its own is dead-lettered with this reason.
    """


class ConfigError(DeliveryError):
    """Credentials or settings are wrong (401/403, unknown property): stop, never burn retries."""


# --------------------------------------------------------------------------- settings


class DestinationSettings(BaseSettings):
    """Base of every destination's settings. Subclasses set ``env_prefix="CDP_SINK_<DEST>_"``.

    Unknown keys are rejected (``extra="forbid"`` plus an env scan in the engine),
    secrets are ``SecretStr`` so they never print.
    """

    model_config = SettingsConfigDict(extra="forbid", case_sensitive=False)

    endpoint: str = Field(description="Base URL (regional endpoints, or a local emulator).")
    enabled: bool = True
    consent_categories: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Consent categories (context.consent.categoryPreferences) an event must "
        "grant to be sent here; empty = no consent needed. Env: comma-separated or JSON list.",
    )
    timeout_s: float = Field(10.0, gt=0, le=300)

    @field_validator("consent_categories", mode="before")
    @classmethod
    def _split_categories(cls, value: Any) -> Any:
        """``Advertising,Analytics`` as well as ``["Advertising"]`` from the environment."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return orjson.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value


#: Error type of :func:`not_configured`; with pydantic's own "missing" it means "not set up".
NOT_CONFIGURED = "not_configured"


def not_configured(message: str) -> PydanticCustomError:
    """Raise from a settings validator when required credentials are absent altogether.

    ``cdpflow sink run --all`` then reports the destination as not configured and
    leaves it out, instead of failing the whole process the way a wrong value does.
    """
    return PydanticCustomError(NOT_CONFIGURED, message)


class SinkLimits(BaseModel):
    """What one request may carry and how hard the destination may be pushed."""

    model_config = ConfigDict(frozen=True)

    max_batch_events: int = Field(gt=0)
    #: Sum of item sizes (+1 per item for the separator) in one request. Leave room
    #: for the request envelope (``{"batch": [...], ...}``) below the vendor's limit.
    max_batch_bytes: int = Field(gt=0)
    #: Items larger than this are dead-lettered as EVENT_TOO_LARGE before any request.
    max_event_bytes: int = Field(gt=0)
    max_requests_per_second: float | None = None
    max_concurrency: int = Field(4, gt=0)
    max_batch_wait_s: float = Field(0.2, gt=0, description="Flush a partial batch after this.")


# --------------------------------------------------------------------------- data


@dataclass(slots=True)
class MappedEvent:
    """One enriched event turned into the destination's item (JSON-ready)."""

    message_id: str  # the original messageId: the dedupe key everywhere
    order_key: str  # profileId: items with the same key keep their order
    #: The destination's item: a JSON-ready dict for most; audience destinations use
    #: :class:`sinks.audience_base.AudienceItem`. Only the destination reads it.
    item: Any
    size: int  # serialized bytes of ``item``, for batching by bytes
    source: Any = None  # engine bookkeeping (Kafka offset, original bytes); not for mappers
    #: ``item`` already serialized (what ``size`` measured), so build_requests can join
    #: bytes instead of serializing every item a second time. Optional.
    encoded: bytes | None = None


@dataclass(slots=True)
class HttpRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    items: list[MappedEvent]
    #: Header names / query params holding secrets, removed before a request is dead-lettered.
    secret_headers: tuple[str, ...] = ("authorization",)
    secret_params: tuple[str, ...] = ()
    #: The destination's own notes for :meth:`Destination.send` (e.g. which user list a
    #: Google Ads job is for); the engine never reads it.
    context: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ItemOutcome:
    """``error is None`` means the destination took the item."""

    error: DeliveryError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


S = TypeVar("S", bound=DestinationSettings)

#: What a destination consumes: enriched events (``cdp.events.enriched``) or audience
#: membership changes (``cdp.audiences.updates``, AudienceUpdate records).
SourceKind = Literal["enriched", "audience"]


class Destination(ABC, Generic[S]):
    """One destination. Stateless apart from its settings; the engine owns all I/O."""

    #: Short name: topic ``cdp.sink.dlq.<name>``, group ``cdpflow-sink-<name>``, env prefix.
    name: ClassVar[str]
    #: Names the Segment ``integrations`` object uses for it (``{"Mixpanel": false}``).
    integration_names: ClassVar[tuple[str, ...]]
    settings_cls: ClassVar[type[DestinationSettings]]
    #: Which topic it reads; ``map`` receives that topic's decoded record.
    source: ClassVar[SourceKind] = "enriched"
    #: True when one logical request is several HTTP calls (Google Ads: create a job,
    #: add operations, run it): the engine then calls :meth:`send` instead of making
    #: one HTTP request itself, and classifies what ``send`` returns.
    multi_call: ClassVar[bool] = False

    def __init__(self, settings: S) -> None:
        self.settings = settings

    async def send(self, session: aiohttp.ClientSession, request: HttpRequest) -> HttpResponse:
        """Perform a multi-call request (only with ``multi_call = True``).

        Return the response that decides the outcome (the first failing call's,
        else the last one's); let aiohttp's connection errors and timeouts
        propagate, the engine turns them into retries like for a single call.
        Everything ``send`` does must be safe to repeat: a retry calls it again.
        """
        raise NotImplementedError(f"{self.name} sets multi_call but does not implement send()")

    async def preflight(
        self,
        request: HttpRequest,
        send: Callable[[HttpRequest], Awaitable[HttpResponse]],
    ) -> list[ItemOutcome] | None:
        """Optional check of a request before it is sent for real (GA4's validate mode).

        Return per-item outcomes (failed items are dead-lettered, the rest sent),
        or None for "no check" (the default). ``send`` makes one plain HTTP call.
        The engine calls it once per request, not per retry; if the check itself
        cannot be made (network, 5xx) the request is sent unchecked.
        """
        return None

    @property
    @abstractmethod
    def limits(self) -> SinkLimits: ...

    @abstractmethod
    def map(self, enriched: Mapping[str, Any]) -> MappedEvent | None:
        """The destination's item for one EnrichedEvent (as decoded from Avro).

        ``enriched`` is read-only: with several destinations in one process the
        same decoded record is handed to each of them.

        Timestamp fields (``timestamp-millis``) arrive as epoch-millisecond ints from
        the engine's fast decoder and as datetimes from ``AvroSerde.decode``: read
        them with ``streams.events.to_ms``, which takes both.

        Return None when the event does not apply (e.g. an alias for GA4): it is
        counted as skipped. Raise :class:`Permanent` when it can never be sent
        (too old for the API, unmappable): it is dead-lettered with the reason.
        """

    @abstractmethod
    def build_requests(self, batch: Sequence[MappedEvent]) -> list[HttpRequest]:
        """Requests for a batch already cut to :attr:`limits` (one or more)."""

    @abstractmethod
    def classify(self, request: HttpRequest, response: HttpResponse) -> list[ItemOutcome]:
        """Per-item outcomes, positionally matching ``request.items``.

        Raise :class:`Throttled` / :class:`Retryable` when the whole request must be
        retried, :class:`ConfigError` for bad credentials; return per-item
        :class:`Permanent` errors for partial failures (those items go to the DLQ,
        the others count as delivered and must never be resent). Raise
        :class:`Permanent` (or :class:`RequestTooLarge`) when the destination refused
        the request as a whole: the engine bisects the batch to find the culprits.
        :func:`status_error` maps the common statuses.
        """


# --------------------------------------------------------------------------- helpers
# Shared by the destination modules so every one reads HTTP the same way.

#: Longest wait we accept from a Retry-After header (analytics-python caps at 300 s too).
MAX_RETRY_AFTER_S = 300.0


def parse_retry_after(
    headers: Mapping[str, str], *, cap: float = MAX_RETRY_AFTER_S
) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or HTTP-date) or ``X-RateLimit-Reset``.

    Header lookup is case-insensitive (aiohttp's CIMultiDict, or a plain dict).
    None when the response names no delay; never negative, at most ``cap``.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    for name in ("retry-after", "x-ratelimit-reset"):
        raw = lowered.get(name)
        if raw is None:
            continue
        raw = raw.strip()
        try:
            seconds = float(raw)
        except ValueError:
            try:
                when = parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                continue
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            seconds = (when - datetime.now(UTC)).total_seconds()
        if seconds != seconds:  # NaN
            continue
        return min(max(seconds, 0.0), cap)
    return None


def status_error(response: HttpResponse, detail: str = "") -> DeliveryError | None:
    """The whole-request error an HTTP status means by the common rules (§8.1), or None for 2xx.

    429 -> Throttled (with Retry-After); 408, 5xx except 501/505 -> Retryable;
    401/403 -> ConfigError; 413 -> RequestTooLarge; any other status -> Permanent.
    Destinations call it for the statuses they have no special meaning for.
    """
    status = response.status
    if 200 <= status < 300:
        return None
    text = detail or f"HTTP {status}"
    if status == 429:
        return Throttled("RATE_LIMITED", text, parse_retry_after(response.headers))
    if status == 408 or (status >= 500 and status not in (501, 505)):
        return Retryable(f"HTTP_{status}", text)
    if status in (401, 403):
        return ConfigError("UNAUTHORIZED" if status == 401 else "FORBIDDEN", text)
    if status == 413:
        return RequestTooLarge("PAYLOAD_TOO_LARGE", text)
    return Permanent(f"HTTP_{status}", text)


def basic_auth(username: str, password: str = "") -> str:
    """An ``Authorization`` header value for HTTP Basic (``user:password``, base64)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
