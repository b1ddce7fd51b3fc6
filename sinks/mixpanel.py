"""Mixpanel destination: server-side ``/import?strict=1`` (destinations.md §7).

``/import`` (not ``/track``) because it is the authenticated, server-side API: it
takes events of any age, validates each one with ``strict=1`` and reports the
failures per event (400 + ``failed_records``) while importing the rest — exactly
the per-item outcome the engine needs to dead-letter only what was refused and
never resend what was taken.

Identity (``CDP_SINK_MIXPANEL_IDENTITY``):

* ``simplified`` (default): Mixpanel's Simplified ID Merge. Every event carries
  ``$device_id`` (the anonymousId) and, once the user is known, ``$user_id`` —
  the event's userId, or the profile our pipeline stitched an anonymous event to.
  ``distinct_id`` is ``$user_id`` when known, else ``$device:<anonymousId>``, as
  Mixpanel's own SDKs set it. Mixpanel merges a device's earlier anonymous events
  into the user as soon as one event has both ids, so history before the first
  identify is attributed too (which our stitching, being forward-only, cannot do).
* ``profile``: ``distinct_id`` is cdpflow's profileId (``anon:<id>`` before the
  user is known), for projects on Original ID Merge that want cdpflow to be the
  only identity authority.

Mapping: ``track`` -> its event name and properties; ``page`` / ``screen`` ->
"Loaded a Page" / "Loaded a Screen" with ``name`` and ``category`` (Segment's
classic Mixpanel naming); ``identify`` -> ``$identify`` with the ids only (traits
are profile data for ``/engage`` and PII; they are not copied into events);
``alias`` and ``group`` are not events in Mixpanel and are skipped. Context adds
``ip`` (geolocation), ``$current_url``, ``$referrer``, UTM fields and the parsed
browser / OS / device. ``time`` is the event time in milliseconds.

Dedupe: ``$insert_id`` is the messageId when it fits Mixpanel's rule (at most 36
characters of ``[A-Za-z0-9-]``, e.g. every UUID), else a UUIDv5 of it: the same
event always gets the same id, so a re-delivery after a crash is harmless.

No ``Retry-After`` is documented for 429: the engine backs off from 2 s,
doubling to 60 s, with jitter (Mixpanel's guidance); a header, if ever sent, is
honoured.
"""

from __future__ import annotations

import gzip
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import orjson
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from sinks.base import (
    Destination,
    DestinationSettings,
    HttpRequest,
    HttpResponse,
    ItemOutcome,
    MappedEvent,
    Permanent,
    SinkLimits,
    basic_auth,
    not_configured,
    status_error,
)
from sinks.registry import register
from streams.events import to_ms

MAX_BATCH_EVENTS = 2000
#: The reference page says 10 MB, the OpenAPI spec and its 413 example 2 MB: stay
#: under the stricter one by default (configurable up to 10 MB).
DEFAULT_MAX_BATCH_BYTES = 2_000_000
#: "< 1 MB" of uncompressed JSON per event.
MAX_EVENT_BYTES = 1024 * 1024 - 1
INSERT_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,36}$")
FORBIDDEN_IDS = frozenset(
    {
        "00000000-0000-0000-0000-000000000000",
        "anon",
        "anonymous",
        "nil",
        "none",
        "null",
        "n/a",
        "na",
        "undefined",
        "unknown",
        "<nil>",
        "0",
        "-1",
        "true",
        "false",
        "[]",
        "{}",
    }
)
#: Fixed namespace: $insert_id = uuid5(namespace, messageId) for ids Mixpanel would refuse.
INSERT_ID_NAMESPACE = uuid.UUID("6f0d5b8e-3c1a-5e4f-9a7b-2d8c4e6f1a3b")
EVENT_NAMES = {"page": "Loaded a Page", "screen": "Loaded a Screen", "identify": "$identify"}
_UTM = (("name", "utm_campaign"), ("source", "utm_source"), ("medium", "utm_medium"),
        ("term", "utm_term"), ("content", "utm_content"))  # fmt: skip


class MixpanelSettings(DestinationSettings):
    model_config = SettingsConfigDict(
        env_prefix="CDP_SINK_MIXPANEL_", extra="forbid", case_sensitive=False
    )

    endpoint: str = Field(
        description="https://api.mixpanel.com, https://api-eu.mixpanel.com (EU), or an emulator."
    )
    project_token: SecretStr | None = Field(
        None, description="Project token (Basic username, empty password)."
    )
    service_account_username: str | None = Field(
        None, description="Service account (Owner/Admin); preferred over the project token."
    )
    service_account_secret: SecretStr | None = None
    project_id: str | None = Field(None, description="Required with a service account.")
    identity: Literal["simplified", "profile"] = "simplified"
    gzip: bool = Field(False, description="Send request bodies gzip-compressed.")
    max_batch_events: int = Field(MAX_BATCH_EVENTS, ge=1, le=MAX_BATCH_EVENTS)
    max_batch_bytes: int = Field(DEFAULT_MAX_BATCH_BYTES, ge=10_000, le=10_000_000)
    max_requests_per_second: float | None = Field(50.0, gt=0)
    max_concurrency: int = Field(4, ge=1, le=64)
    max_batch_wait_s: float = Field(0.1, gt=0, le=60)

    @model_validator(mode="after")
    def _credentials(self) -> MixpanelSettings:
        has_sa = bool(self.service_account_username) and self.service_account_secret is not None
        if not has_sa and self.project_token is None:
            if self.service_account_username or self.service_account_secret is not None:
                raise ValueError(
                    "a service account needs both SERVICE_ACCOUNT_USERNAME and "
                    "SERVICE_ACCOUNT_SECRET"
                )
            raise not_configured(
                "set CDP_SINK_MIXPANEL_PROJECT_TOKEN, or CDP_SINK_MIXPANEL_SERVICE_ACCOUNT_"
                "USERNAME + _SERVICE_ACCOUNT_SECRET + _PROJECT_ID"
            )
        if has_sa and not self.project_id:
            raise ValueError("CDP_SINK_MIXPANEL_PROJECT_ID is required with a service account")
        return self


def insert_id_for(message_id: str) -> str:
    """The messageId itself when Mixpanel accepts it, else a deterministic UUIDv5 of it."""
    if INSERT_ID_RE.match(message_id) and message_id.lower() not in FORBIDDEN_IDS:
        return message_id
    return str(uuid.uuid5(INSERT_ID_NAMESPACE, message_id))


def _usable_id(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    return None if value.strip().lower() in FORBIDDEN_IDS else value


@register
class MixpanelDestination(Destination[MixpanelSettings]):
    name: ClassVar[str] = "mixpanel"
    integration_names: ClassVar[tuple[str, ...]] = ("Mixpanel",)
    settings_cls: ClassVar[type[DestinationSettings]] = MixpanelSettings

    def __init__(self, settings: MixpanelSettings) -> None:
        super().__init__(settings)
        base = settings.endpoint.rstrip("/") + "/import?strict=1"
        if settings.service_account_username and settings.service_account_secret is not None:
            auth = basic_auth(
                settings.service_account_username,
                settings.service_account_secret.get_secret_value(),
            )
            self._url = f"{base}&project_id={settings.project_id}"
        else:
            assert settings.project_token is not None
            auth = basic_auth(settings.project_token.get_secret_value())
            self._url = base + (f"&project_id={settings.project_id}" if settings.project_id else "")
        self._headers = {"Content-Type": "application/json", "Authorization": auth}
        if settings.gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._limits = SinkLimits(
            max_batch_events=settings.max_batch_events,
            max_batch_bytes=settings.max_batch_bytes,
            max_event_bytes=MAX_EVENT_BYTES,
            max_requests_per_second=settings.max_requests_per_second,
            max_concurrency=settings.max_concurrency,
            max_batch_wait_s=settings.max_batch_wait_s,
        )

    @property
    def limits(self) -> SinkLimits:
        return self._limits

    # ------------------------------------------------------------------ mapping

    def map(self, enriched: Mapping[str, Any]) -> MappedEvent | None:
        event = enriched["event"]
        etype = event["type"]
        name = event.get("event") if etype == "track" else EVENT_NAMES.get(etype)
        if not name:
            return None  # alias, group: not events in Mixpanel
        props: dict[str, Any] = {}
        _context_properties(props, event.get("context") or {}, enriched)
        if etype != "identify":
            user_props = orjson.loads(event.get("properties") or "{}")
            if isinstance(user_props, dict):
                props.update(user_props)
            if etype in ("page", "screen"):
                for key in ("name", "category"):
                    if event.get(key) is not None:
                        props.setdefault(key, event[key])
        self._identity(props, event, enriched)
        props["time"] = to_ms(event["timestamp"])
        props["$insert_id"] = insert_id_for(event["messageId"])
        item = {"event": name, "properties": props}
        encoded = orjson.dumps(item)
        return MappedEvent(
            message_id=event["messageId"],
            order_key=enriched["profileId"],
            item=item,
            size=len(encoded),
            encoded=encoded,
        )

    def _identity(
        self, props: dict[str, Any], event: Mapping[str, Any], enriched: Mapping[str, Any]
    ) -> None:
        profile_id = enriched["profileId"]
        for key in ("distinct_id", "$user_id", "$device_id", "token"):
            props.pop(key, None)  # ours, not the client's
        if self.settings.identity == "profile":
            distinct = _usable_id(profile_id)
            if distinct is None:
                raise Permanent("INVALID_DISTINCT_ID", "the profile id is a value Mixpanel refuses")
            props["distinct_id"] = distinct
            return
        user = _usable_id(event.get("userId"))
        if user is None and enriched.get("stitched"):
            user = _usable_id(profile_id)
        device = _usable_id(event.get("anonymousId"))
        if user is None and device is None:
            raise Permanent(
                "INVALID_DISTINCT_ID",
                "neither userId nor anonymousId is a value Mixpanel accepts as an id",
            )
        if device is not None:
            props["$device_id"] = device
        if user is not None:
            props["$user_id"] = user
            props["distinct_id"] = user
        else:
            props["distinct_id"] = f"$device:{device}"
        if event["type"] == "identify" and user is not None:
            # Original ID Merge reads these two; Simplified ID Merge ignores them.
            props["$identified_id"] = user
            if device is not None:
                props["$anon_distinct_id"] = device

    # ------------------------------------------------------------------ requests

    def build_requests(self, batch: Sequence[MappedEvent]) -> list[HttpRequest]:
        body = (
            b"["
            + b",".join(m.encoded if m.encoded is not None else orjson.dumps(m.item) for m in batch)
            + b"]"
        )
        if self.settings.gzip:
            body = gzip.compress(body, compresslevel=1)
        return [
            HttpRequest(
                method="POST",
                url=self._url,
                headers=dict(self._headers),
                body=body,
                items=list(batch),
            )
        ]

    def classify(self, request: HttpRequest, response: HttpResponse) -> list[ItemOutcome]:
        status = response.status
        if 200 <= status < 300:
            return [ItemOutcome() for _ in request.items]
        body = _json_body(response.body)
        message = str(body.get("error") or f"HTTP {status}")[:300] if body else f"HTTP {status}"
        if (
            status == 400
            and isinstance(body.get("failed_records"), list)
            and body["failed_records"]
        ):
            return _per_item(request.items, body["failed_records"])
        error = status_error(response, f"HTTP {status}: {message}")
        if error is None:  # pragma: no cover - 2xx handled above
            return [ItemOutcome() for _ in request.items]
        raise error


def _context_properties(
    props: dict[str, Any], context: Mapping[str, Any], enriched: Mapping[str, Any]
) -> None:
    props["mp_lib"] = "cdpflow"
    if context.get("ip"):
        props["ip"] = context["ip"]
    page = context.get("page") or {}
    if page.get("url"):
        props["$current_url"] = page["url"]
    if page.get("referrer"):
        props["$referrer"] = page["referrer"]
    campaign = enriched.get("campaign") or {}
    for src, dst in _UTM:
        if campaign.get(src):
            props[dst] = campaign[src]
    ua = enriched.get("userAgent") or {}
    if ua.get("browserFamily") and ua["browserFamily"] != "Other":
        props["$browser"] = ua["browserFamily"]
        if ua.get("browserVersion"):
            props["$browser_version"] = ua["browserVersion"]
    if ua.get("osFamily") and ua["osFamily"] != "Other":
        props["$os"] = ua["osFamily"]
    if ua.get("deviceFamily") and ua["deviceFamily"] != "Other":
        props["$device"] = ua["deviceFamily"]


def _json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def _reason(field: Any) -> str:
    """``properties.$insert_id`` -> ``REJECTED_INSERT_ID``: a stable, readable DLQ code."""
    text = str(field or "event")
    text = text.removeprefix("properties.").replace("$", "")
    code = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").upper() or "EVENT"
    return f"REJECTED_{code}"


def _per_item(items: Sequence[MappedEvent], failed: list[Any]) -> list[ItemOutcome]:
    """Map ``failed_records`` onto the request's items: by index, checked against $insert_id."""
    outcomes = [ItemOutcome() for _ in items]
    by_insert_id: dict[str, int] = {}
    for i, item in enumerate(items):
        insert_id = item.item.get("properties", {}).get("$insert_id")
        if isinstance(insert_id, str):
            by_insert_id.setdefault(insert_id, i)
    for record in failed:
        if not isinstance(record, dict):
            continue
        insert_id = record.get("$insert_id") or record.get("insert_id")
        index = record.get("index")
        target: int | None = None
        if isinstance(index, int) and 0 <= index < len(items):
            own = items[index].item.get("properties", {}).get("$insert_id")
            if not insert_id or own == insert_id:
                target = index
        if target is None and isinstance(insert_id, str):
            target = by_insert_id.get(insert_id)
        if target is None:
            continue
        field = record.get("field")
        outcomes[target] = ItemOutcome(
            Permanent(_reason(field), f"{field}: {str(record.get('message', ''))[:300]}")
        )
    return outcomes
