"""The contract every destination implements, and the error taxonomy the engine acts on.

A destination is one module: a typed settings class (env ``CDP_SINK_<DEST>_*``),
its limits, a mapping from an EnrichedEvent to the destination's item, a request
builder, and a response classifier. The shared engine (:mod:`sinks.engine`)
does everything else — consuming, batching, rate limits, retries, the circuit
breaker, dead letters and offset commits — the same way for every destination.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    """The destination will never accept this item as it is: dead-letter it with the reason."""


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
    consent_categories: list[str] = Field(
        default_factory=list,
        description="Consent categories (context.consent.categoryPreferences) an event must "
        "grant to be sent here; empty = no consent needed.",
    )
    timeout_s: float = Field(10.0, gt=0, le=300)


class SinkLimits(BaseModel):
    """What one request may carry and how hard the destination may be pushed."""

    model_config = ConfigDict(frozen=True)

    max_batch_events: int = Field(gt=0)
    max_batch_bytes: int = Field(gt=0)
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
    item: dict[str, Any]
    size: int  # serialized bytes of ``item``, for batching by bytes
    source: Any = None  # engine bookkeeping (Kafka offset, original bytes); not for mappers


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


class Destination(ABC, Generic[S]):
    """One destination. Stateless apart from its settings; the engine owns all I/O."""

    #: Short name: topic ``cdp.sink.dlq.<name>``, group ``cdpflow-sink-<name>``, env prefix.
    name: ClassVar[str]
    #: Names the Segment ``integrations`` object uses for it (``{"Mixpanel": false}``).
    integration_names: ClassVar[tuple[str, ...]]
    settings_cls: ClassVar[type[DestinationSettings]]

    def __init__(self, settings: S) -> None:
        self.settings = settings

    @property
    @abstractmethod
    def limits(self) -> SinkLimits: ...

    @abstractmethod
    def map(self, enriched: Mapping[str, Any]) -> MappedEvent | None:
        """The destination's item for one EnrichedEvent (as decoded from Avro).

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
        the others count as delivered and must never be resent).
        """
