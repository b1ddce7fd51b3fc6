"""LinkedIn Matched Audiences destination: DMP segment users (destinations.md §6).

``POST /rest/dmpSegments/{segmentId}/users`` with ``X-RestLi-Method: BATCH_CREATE``,
``X-Restli-Protocol-Version: 2.0.0``, ``LinkedIn-Version: YYYYMM`` and a Bearer
token; the body is ``{"elements": [{"action": "ADD"|"REMOVE", "userIds": [...]}]}``.
Sources: LinkedIn's "Create and manage segment users" page (via §6), and
Segment's action-destinations ``linkedin-audiences`` (``api/index.ts``:
``batchUpdate`` sends exactly these headers; ``versioning-info.ts`` pins
``202604``, our default).

Only hashed ids leave: ``userIds`` holds ``SHA256_EMAIL`` (the key the audience
agent emits for LinkedIn). LinkedIn also takes ``firstName``/``lastName``/
``company``/``title``/``country`` as *unhashed* match hints; they are never sent,
so no raw PII reaches LinkedIn.

Responses: the batch call answers 200 with one ``{"status": ...}`` per element,
positionally (Segment's connector reads ``elements[i].status``/``message``), so
each update gets its own outcome: 2xx delivered, anything else dead-lettered as
``ELEMENT_<status>``. Whole-request errors: 429 → throttled (LinkedIn sends no
Retry-After — third-party claim, §6.5 — so the engine's throttle backoff
applies; a Retry-After, if ever sent, is honoured); 401/403 and version errors
(400 ``VERSION_MISSING``, 426 ``NONEXISTENT_VERSION``; codes unconfirmed) → the
settings are wrong; 404 → the segment is unknown *or* was created seconds ago
(LinkedIn asks to wait ~5 s; Segment sees 404s for 1-2 min), retried for
``segment_not_ready_grace_s`` from the segment's first 404 and dead-lettered as
``SEGMENT_NOT_FOUND`` after that; 5xx → retried; other 4xx → the request is
refused as a whole and bisected.

Full sync: LinkedIn has no replace operation for segment users, and the
membership we hold says nothing about who else is in the segment, so a full sync
only ADDs every current member; members removed while the pipeline was not
looking cannot be derived and stay until LinkedIn's own expiry. To start clean,
create a new segment and sync into it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import orjson
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from sinks.audience_base import Action, AudienceDestination, audience_item
from sinks.base import (
    ConfigError,
    DestinationSettings,
    HttpRequest,
    HttpResponse,
    ItemOutcome,
    MappedEvent,
    Permanent,
    Retryable,
    SinkLimits,
    Throttled,
    not_configured,
    parse_retry_after,
    status_error,
)
from sinks.registry import register

#: Elements per batch (third-party connectors citing LinkedIn; unconfirmed, so configurable).
MAX_ELEMENTS = 5000
#: A supported ``LinkedIn-Version`` when written (Segment's linkedin-audiences pins it).
DEFAULT_VERSION = "202604"
#: idTypes LinkedIn takes in ``userIds``, in the order we list them.
ID_TYPES: tuple[str, ...] = ("SHA256_EMAIL", "SHA512_EMAIL", "GOOGLE_AID")
MAX_ELEMENT_BYTES = 2048
SEGMENT_NOT_FOUND = "SEGMENT_NOT_FOUND"
VERSION_CODES = frozenset({"VERSION_MISSING", "NONEXISTENT_VERSION", "VERSION_SUNSET"})


class LinkedInSettings(DestinationSettings):
    model_config = SettingsConfigDict(
        env_prefix="CDP_SINK_LINKEDIN_", extra="forbid", case_sensitive=False
    )

    endpoint: str = Field(
        "https://api.linkedin.com",
        description="REST API base URL (/rest is appended), or an emulator.",
    )
    access_token: SecretStr | None = Field(
        None, description="3-legged OAuth token with rw_dmp_segments (and rw_ads)."
    )
    api_version: str = Field(
        DEFAULT_VERSION, pattern=r"^\d{6}$", description="LinkedIn-Version header (YYYYMM)."
    )
    max_elements_per_request: int = Field(MAX_ELEMENTS, ge=1, le=MAX_ELEMENTS)
    segment_not_ready_grace_s: float = Field(
        300.0,
        ge=0,
        description="How long 404s for a segment are retried (it may have just been created).",
    )
    #: 600 requests/min per member on /users.
    max_requests_per_second: float | None = Field(9.0, gt=0, le=10.0)
    max_concurrency: int = Field(4, ge=1, le=64)
    max_batch_wait_s: float = Field(0.5, gt=0, le=60)

    @model_validator(mode="after")
    def _credentials(self) -> LinkedInSettings:
        if self.access_token is None or not self.access_token.get_secret_value():
            raise not_configured("set CDP_SINK_LINKEDIN_ACCESS_TOKEN")
        return self


@register
class LinkedInDestination(AudienceDestination[LinkedInSettings]):
    """LinkedIn DMP segment users: hashed-email elements with ADD / REMOVE."""

    name: ClassVar[str] = "linkedin"
    settings_cls: ClassVar[type[DestinationSettings]] = LinkedInSettings

    def __init__(self, settings: LinkedInSettings) -> None:
        super().__init__(settings)
        s = settings
        token = s.access_token.get_secret_value() if s.access_token else ""
        self._base = s.endpoint.rstrip("/") + "/rest/dmpSegments"
        self._headers = {
            "Authorization": f"Bearer {token}",
            "LinkedIn-Version": s.api_version,
            "X-Restli-Protocol-Version": "2.0.0",
            "X-RestLi-Method": "BATCH_CREATE",
            "Content-Type": "application/json",
        }
        #: segment id -> monotonic time of its first 404 in a row (reset on success).
        self._first_404: dict[str, float] = {}
        self._limits = SinkLimits(
            max_batch_events=s.max_elements_per_request,
            max_batch_bytes=s.max_elements_per_request * (MAX_ELEMENT_BYTES + 1),
            max_event_bytes=MAX_ELEMENT_BYTES,
            max_requests_per_second=s.max_requests_per_second,
            max_concurrency=s.max_concurrency,
            max_batch_wait_s=s.max_batch_wait_s,
        )

    @property
    def limits(self) -> SinkLimits:
        return self._limits

    def row(self, identifiers: Mapping[str, str]) -> dict[str, Any]:
        """``{"userIds": [...]}``: the element without its action (hashed ids only)."""
        return {
            "userIds": [
                {"idType": t, "idValue": identifiers[t]} for t in ID_TYPES if identifiers.get(t)
            ]
        }

    def _request(self, segment_id: str, action: Action, items: list[MappedEvent]) -> HttpRequest:
        elements = [{"action": action, **audience_item(m).row} for m in items]
        return HttpRequest(
            method="POST",
            url=f"{self._base}/{segment_id}/users",
            headers=dict(self._headers),
            body=orjson.dumps({"elements": elements}),
            items=items,
            context={"segment_id": segment_id},
        )

    def build_group_requests(
        self, audience_id: str, action: Action, items: list[MappedEvent]
    ) -> list[HttpRequest]:
        size = self.settings.max_elements_per_request
        return [
            self._request(audience_id, action, items[i : i + size])
            for i in range(0, len(items), size)
        ]

    def build_full_sync(
        self, audience_id: str, members: Sequence[MappedEvent]
    ) -> list[HttpRequest]:
        """ADD every member (LinkedIn has no replace; see the module docstring)."""
        return self.build_group_requests(audience_id, "ADD", list(members))

    def classify(self, request: HttpRequest, response: HttpResponse) -> list[ItemOutcome]:
        segment = str(request.context.get("segment_id", ""))
        status = response.status
        body = _json(response.body)
        if status == 404:
            return self._not_found(segment, len(request.items))
        if status == 429:
            raise Throttled(
                "RATE_LIMITED", "429 from LinkedIn", parse_retry_after(response.headers)
            )
        code = str(body.get("code") or "") if isinstance(body, dict) else ""
        message = str(body.get("message") or "")[:300] if isinstance(body, dict) else ""
        if status == 426 or code in VERSION_CODES:
            raise ConfigError(
                code or "UNSUPPORTED_VERSION",
                f"LinkedIn-Version {self.settings.api_version} refused: {message}",
            )
        if not 200 <= status < 300:
            error = status_error(response, message or f"HTTP {status}")
            assert error is not None
            raise error
        self._first_404.pop(segment, None)
        elements = body.get("elements") if isinstance(body, dict) else None
        if not isinstance(elements, list) or len(elements) != len(request.items):
            got = len(elements) if isinstance(elements, list) else "no"
            raise Permanent(
                "BAD_RESPONSE", f"{got} element results for {len(request.items)} elements"
            )
        outcomes: list[ItemOutcome] = []
        for result in elements:
            element_status = result.get("status") if isinstance(result, dict) else None
            if isinstance(element_status, int) and 200 <= element_status < 300:
                outcomes.append(ItemOutcome())
                continue
            text = str(result.get("message") or "")[:300] if isinstance(result, dict) else ""
            outcomes.append(ItemOutcome(Permanent(f"ELEMENT_{element_status}", text)))
        return outcomes

    def _not_found(self, segment: str, n: int) -> list[ItemOutcome]:
        """Retry while the segment may still be getting ready, then dead-letter every element."""
        now = time.monotonic()
        first = self._first_404.setdefault(segment, now)
        if now - first < self.settings.segment_not_ready_grace_s:
            raise Retryable(
                "SEGMENT_NOT_READY", f"segment {segment} answered 404 (new or unknown segment)"
            )
        error = Permanent(
            SEGMENT_NOT_FOUND,
            f"segment {segment} still answers 404 after "
            f"{self.settings.segment_not_ready_grace_s:.0f} s",
        )
        return [ItemOutcome(error) for _ in range(n)]


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None
