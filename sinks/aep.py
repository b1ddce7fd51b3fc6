"""Adobe Experience Platform destination: XDM ExperienceEvents to a DCS streaming inlet.

Requests go to the batch endpoint ``/collection/batch/{inletId}`` (destinations.md
§2) as ``{"messages": [envelope, ...]}``, each envelope carrying the header
(``schemaRef``, ``imsOrgId``, ``datasetId``, ``flowId``, ``source``) and the body
(``xdmMeta`` + ``xdmEntity``). The request also sends ``x-adobe-flow-id`` and,
for authenticated inlets, ``Authorization: Bearer <IMS token>``.

The record
    * ``_id`` = Segment ``messageId`` (the record id Adobe documents as what prevents
      duplicate data, so a re-delivery carries the same id), ``timestamp`` = the
      event time in RFC 3339 (a client clock in the future is clamped to now: XDM
      wants past observations).
    * ``identityMap`` — the identities we know, at most one primary:
      ``userId`` (or the stitched profile's) in the CRM namespace (``CRMID`` by
      default, ``authenticated``, primary; a user id that is an email address goes in
      hashed as ``Email_LC_SHA256`` instead); an Adobe ECID only when the client
      passed one (``integrations["Adobe Analytics"].marketingCloudVisitorId`` or
      ``integrations["Adobe Experience Platform"].ecid``) — Segment's anonymousId is
      not an ECID and is never sent as one; ``anonymousId`` in a custom namespace
      (``SegmentAnonymousId`` by default; create it in AEP Identity, or set another),
      ``ambiguous``; the profile's email as ``Email_LC_SHA256`` (SHA-256 of the
      trimmed, lower-cased address). A raw email address never leaves this module:
      it is not mapped anywhere, and email addresses in free-text fields such as
      page URLs are scrubbed.
    * ``eventType`` — Segment e-commerce spec events to the ``commerce.*`` types
      (:data:`EVENT_TYPES`), ``page`` to ``web.webpagedetails.pageViews``, others to
      ``default_event_type`` (``cdpflow.track``; XDM's ``eventType`` is an extensible
      enum), ``identify`` to ``identify_event_type`` (it carries the identity links).
      ``group``/``alias``: not applicable.
    * ``commerce`` measures (``{"productViews": {"value": 1}}``, ``order``),
      ``productListItems``, ``web.webPageDetails``/``webReferrer``,
      ``environment.browserDetails.userAgent``; with ``tenant_id`` set, the Segment
      event name, type and properties (JSON text, emails scrubbed) under
      ``_<tenant>.cdpflow`` (your schema needs that field group: three strings).

Responses: 207 ``responses[i]`` → per-item outcome (a 400 entry is Permanent and
dead-lettered; accepted entries are never resent; transient entry codes are
dead-lettered as Retryable for replay unless every entry is transient, then the
whole request is retried). 429/500/503 → retry; 401/403 → ConfigError (refresh
the token); 413 → RequestTooLarge (the engine halves the batch; one record still
too large is dead-lettered); 400 for the request → Permanent (the engine bisects).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

import orjson
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from sinks.base import (
    ConfigError,
    DeliveryError,
    Destination,
    DestinationSettings,
    HttpRequest,
    HttpResponse,
    ItemOutcome,
    MappedEvent,
    Permanent,
    Retryable,
    SinkLimits,
    Throttled,
    parse_retry_after,
    status_error,
)
from sinks.registry import register
from streams.events import context_to_json, to_ms

#: DCS batch endpoint: 413 when the whole request exceeds 1 MB (taken as 10^6 bytes).
MAX_REQUEST_BYTES = 1_000_000
#: Streaming guardrail: records up to 1 MB (Adobe recommends <= 10 KB).
MAX_RECORD_BYTES = 1_000_000
ENVELOPE_BYTES = len(b'{"messages":[]}')
#: Also URL-encoded (``%40``). The lookbehind keeps it linear on long values: a
#: match may only start where a local part starts.
EMAIL_RE = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+(?:@|%40)"
    r"[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
)

#: Segment e-commerce spec v2 → XDM ExperienceEvent eventType and commerce measure.
EVENT_TYPES: dict[str, str] = {
    "Product Viewed": "commerce.productViews",
    "Product Added": "commerce.productListAdds",
    "Product Removed": "commerce.productListRemovals",
    "Cart Viewed": "commerce.productListViews",
    "Checkout Started": "commerce.checkouts",
    "Order Completed": "commerce.purchases",
    "Product Added to Wishlist": "commerce.saveForLaters",
}
PAGE_VIEW = "web.webpagedetails.pageViews"
_SINGLE_PRODUCT = frozenset(
    {"Product Viewed", "Product Added", "Product Removed", "Product Added to Wishlist"}
)


class AepSettings(DestinationSettings):
    model_config = SettingsConfigDict(
        env_prefix="CDP_SINK_AEP_", extra="forbid", case_sensitive=False
    )

    endpoint: str = Field(
        "https://dcs.adobedc.net",
        description="DCS host (the part of the streaming connection's inletUrl before "
        "/collection), or an emulator.",
    )
    inlet_id: str = Field(description="inletId of the HTTP API streaming connection.")
    org_id: str = Field(description="IMS organisation, <id>@AdobeOrg.")
    dataset_id: str = Field(description="Target dataset (its schema must be schema_id).")
    schema_id: str = Field(description="https://ns.adobe.com/<tenant>/schemas/<id>.")
    schema_version: str = Field("1", pattern=r"^\d+(\.\d+)?$")
    flow_id: str | None = Field(None, description="Dataflow id (x-adobe-flow-id).")
    access_token: SecretStr | None = Field(
        None, description="IMS access token; required when the inlet is authenticated."
    )
    source_name: str = "cdpflow"
    crm_namespace: str = Field("CRMID", min_length=1)
    anonymous_namespace: str = Field("SegmentAnonymousId", min_length=1)
    default_event_type: str = Field("cdpflow.track", min_length=1)
    identify_event_type: str = Field("cdpflow.identify", min_length=1)
    tenant_id: str | None = Field(None, pattern=r"^_?[A-Za-z0-9]+$")
    default_currency: str = Field("USD", min_length=3, max_length=3)
    max_record_bytes: int = Field(MAX_RECORD_BYTES, gt=1000, le=MAX_RECORD_BYTES)
    max_batch_events: int = Field(500, ge=1, le=10_000)
    max_requests_per_second: float | None = Field(None, gt=0)
    max_concurrency: int = Field(4, ge=1, le=64)

    @field_validator("org_id")
    @classmethod
    def _org(cls, value: str) -> str:
        if not value.endswith("@AdobeOrg"):
            raise ValueError("org_id must look like <id>@AdobeOrg")
        return value


def _iso(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def hashed_email(email: Any) -> str | None:
    """``Email_LC_SHA256``: SHA-256 hex of the trimmed, lower-cased address."""
    if not isinstance(email, str) or "@" not in email:
        return None
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()


def _scrub(value: Any) -> Any:
    if isinstance(value, str) and ("@" in value or "%40" in value):
        return EMAIL_RE.sub("[redacted]", value)
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def product_item(product: Mapping[str, Any], currency: str) -> dict[str, Any] | None:
    """An XDM ``productListItems[]`` entry from a Segment product."""
    item: dict[str, Any] = {}
    sku = product.get("sku") or product.get("product_id") or product.get("id")
    if sku is not None:
        item["SKU"] = _scrub(str(sku))
    if isinstance(product.get("name"), str):
        item["name"] = _scrub(product["name"])
    quantity = _number(product.get("quantity"))
    qty = int(quantity) if quantity is not None else 1
    item["quantity"] = qty
    price = _number(product.get("price"))
    if price is not None:
        item["priceTotal"] = round(price * qty, 6)
        item["currencyCode"] = currency
    return item if ("SKU" in item or "name" in item) else None


@register
class AepDestination(Destination[AepSettings]):
    name: ClassVar[str] = "aep"
    integration_names: ClassVar[tuple[str, ...]] = ("Adobe Experience Platform", "AEP")
    settings_cls: ClassVar[type[DestinationSettings]] = AepSettings

    def __init__(self, settings: AepSettings) -> None:
        super().__init__(settings)
        self._url = f"{settings.endpoint.rstrip('/')}/collection/batch/{settings.inlet_id}"
        headers = {"Content-Type": "application/json", "x-gw-ims-org-id": settings.org_id}
        if settings.flow_id:
            headers["x-adobe-flow-id"] = settings.flow_id
        if settings.access_token is not None:
            headers["Authorization"] = "Bearer " + settings.access_token.get_secret_value()
        self._headers = headers
        schema_ref = {
            "id": settings.schema_id,
            "contentType": f"application/vnd.adobe.xed-full+json;version={settings.schema_version}",
        }
        self._header: dict[str, Any] = {
            "schemaRef": schema_ref,
            "imsOrgId": settings.org_id,
            "datasetId": settings.dataset_id,
            "source": {"name": settings.source_name},
        }
        if settings.flow_id:
            self._header["flowId"] = settings.flow_id
        self._meta = {"schemaRef": schema_ref}
        max_events = settings.max_batch_events
        self._limits = SinkLimits(
            max_batch_events=max_events,
            max_batch_bytes=MAX_REQUEST_BYTES - ENVELOPE_BYTES - max_events,
            max_event_bytes=min(settings.max_record_bytes, MAX_REQUEST_BYTES - ENVELOPE_BYTES),
            max_requests_per_second=settings.max_requests_per_second,
            max_concurrency=settings.max_concurrency,
        )

    @property
    def limits(self) -> SinkLimits:
        return self._limits

    # -- map

    def map(self, enriched: Mapping[str, Any]) -> MappedEvent | None:
        event = enriched["event"]
        etype = event["type"]
        if etype in ("group", "alias"):
            return None
        props = orjson.loads(event.get("properties") or "{}")
        props = props if isinstance(props, dict) else {}
        context = context_to_json(event.get("context"))
        integrations = orjson.loads(event.get("integrations") or "{}")
        integrations = integrations if isinstance(integrations, dict) else {}

        ts_ms = min(to_ms(event["timestamp"]), int(time.time() * 1000))
        entity: dict[str, Any] = {
            "_id": event["messageId"],
            "timestamp": _iso(ts_ms),
            "eventType": self._event_type(event),
        }
        identity_map = self._identity_map(enriched, event, context, integrations)
        if identity_map:
            entity["identityMap"] = identity_map
        if etype == "page":
            entity["web"] = self._web(props, context, event)
        if etype == "track" and event.get("event") in EVENT_TYPES:
            self._commerce(entity, str(event["event"]), props)
        user_agent = context.get("userAgent")
        if isinstance(user_agent, str) and user_agent:
            entity["environment"] = {"type": "browser", "browserDetails": {"userAgent": user_agent}}
        if self.settings.tenant_id:
            tenant = self.settings.tenant_id.lstrip("_")
            entity[f"_{tenant}"] = {
                "cdpflow": {
                    "eventName": _scrub(event.get("event") or event.get("name") or etype),
                    "eventType": etype,
                    # One string field keeps the schema fixed while properties vary freely.
                    "properties": _scrub(event.get("properties") or "{}"),
                }
            }
        message = {"header": self._header, "body": {"xdmMeta": self._meta, "xdmEntity": entity}}
        encoded = orjson.dumps(message)
        return MappedEvent(
            message_id=event["messageId"],
            order_key=enriched["profileId"],
            item=message,
            size=len(encoded),
            encoded=encoded,
        )

    def _event_type(self, event: Mapping[str, Any]) -> str:
        etype = event["type"]
        if etype == "page":
            return PAGE_VIEW
        if etype == "identify":
            return self.settings.identify_event_type
        if etype == "track":
            return EVENT_TYPES.get(str(event.get("event")), self.settings.default_event_type)
        return self.settings.default_event_type

    def _identity_map(
        self,
        enriched: Mapping[str, Any],
        event: Mapping[str, Any],
        context: Mapping[str, Any],
        integrations: Mapping[str, Any],
    ) -> dict[str, list[dict[str, Any]]]:
        ids: dict[str, list[dict[str, Any]]] = {}
        user_id = event.get("userId")
        profile_id = enriched.get("profileId") or ""
        if not user_id and profile_id and not profile_id.startswith("anon:"):
            user_id = profile_id
        primary_taken = False
        user_email = None
        if user_id and EMAIL_RE.fullmatch(str(user_id)):
            # Sites that use the email as the user id: it goes in hashed, never raw.
            user_email, user_id = str(user_id), None
        if user_id:
            ids[self.settings.crm_namespace] = [
                {"id": str(user_id), "authenticatedState": "authenticated", "primary": True}
            ]
            primary_taken = True
        ecid = _ecid(integrations)
        if ecid:
            ids["ECID"] = [
                {"id": ecid, "authenticatedState": "ambiguous", "primary": not primary_taken}
            ]
            primary_taken = True
        anonymous_id = event.get("anonymousId")
        if anonymous_id:
            ids.setdefault(self.settings.anonymous_namespace, []).append(
                {
                    "id": str(anonymous_id),
                    "authenticatedState": "ambiguous",
                    "primary": not primary_taken,
                }
            )
            primary_taken = True
        traits: dict[str, Any] = {}
        ctx_traits = context.get("traits")
        if isinstance(ctx_traits, dict):
            traits.update(ctx_traits)
        profile = orjson.loads(enriched.get("profileTraits") or "{}")
        if isinstance(profile, dict):
            traits.update(profile)
        if event["type"] == "identify":
            event_traits = orjson.loads(event.get("traits") or "{}")
            if isinstance(event_traits, dict):
                traits.update(event_traits)
        email_hash = hashed_email(traits.get("email") or user_email)
        if email_hash:
            ids["Email_LC_SHA256"] = [
                {
                    "id": email_hash,
                    "authenticatedState": "authenticated" if user_id or user_email else "ambiguous",
                    "primary": not primary_taken,
                }
            ]
        return ids

    def _web(
        self, props: Mapping[str, Any], context: Mapping[str, Any], event: Mapping[str, Any]
    ) -> dict[str, Any]:
        page = context.get("page") if isinstance(context.get("page"), dict) else {}
        assert isinstance(page, dict)
        details: dict[str, Any] = {"pageViews": {"value": 1}}
        url = props.get("url") or page.get("url")
        if isinstance(url, str):
            details["URL"] = _scrub(url)
        name = event.get("name") or props.get("title") or page.get("title")
        if isinstance(name, str):
            details["name"] = _scrub(name)
        web: dict[str, Any] = {"webPageDetails": details}
        referrer = props.get("referrer") or page.get("referrer")
        if isinstance(referrer, str) and referrer:
            web["webReferrer"] = {"URL": _scrub(referrer)}
        return web

    def _commerce(self, entity: dict[str, Any], event_name: str, props: Mapping[str, Any]) -> None:
        measure = EVENT_TYPES[event_name].split(".", 1)[1]
        commerce: dict[str, Any] = {measure: {"value": 1}}
        currency = props.get("currency")
        currency = (
            currency.upper()
            if isinstance(currency, str) and len(currency) == 3
            else self.settings.default_currency
        )
        if event_name in _SINGLE_PRODUCT:
            products: list[Any] = [props]
        else:
            raw = props.get("products")
            products = [p for p in raw if isinstance(p, dict)] if isinstance(raw, list) else []
        items = [it for p in products if (it := product_item(p, currency))]
        if items:
            entity["productListItems"] = items
        if event_name == "Order Completed":
            order: dict[str, Any] = {"currencyCode": currency}
            order_id = props.get("order_id") or props.get("checkout_id")
            if order_id is not None:
                order["purchaseID"] = _scrub(str(order_id))
            for key in ("total", "revenue", "value"):
                total = _number(props.get(key))
                if total is not None:
                    order["priceTotal"] = total
                    break
            commerce["order"] = order
        entity["commerce"] = commerce

    # -- requests

    def build_requests(self, batch: Sequence[MappedEvent]) -> list[HttpRequest]:
        """``{"messages": [...]}`` bodies, each under 1 MB whatever the engine's batching did."""
        requests: list[HttpRequest] = []
        chunk: list[MappedEvent] = []
        parts: list[bytes] = []
        used = ENVELOPE_BYTES
        for mapped in batch:
            encoded = mapped.encoded if mapped.encoded is not None else orjson.dumps(mapped.item)
            cost = len(encoded) + (1 if parts else 0)
            if chunk and used + cost > MAX_REQUEST_BYTES:
                requests.append(self._request(chunk, parts))
                chunk, parts, used = [], [], ENVELOPE_BYTES
                cost = len(encoded)
            chunk.append(mapped)
            parts.append(encoded)
            used += cost
        if chunk:
            requests.append(self._request(chunk, parts))
        return requests

    def _request(self, items: list[MappedEvent], parts: list[bytes]) -> HttpRequest:
        return HttpRequest(
            method="POST",
            url=self._url,
            headers=dict(self._headers),
            body=b'{"messages":[' + b",".join(parts) + b"]}",
            items=list(items),
        )

    def classify(self, request: HttpRequest, response: HttpResponse) -> list[ItemOutcome]:
        status = response.status
        detail = _problem_text(response)
        if status in (200, 207):
            return self._per_item(request, response)
        if status == 400:
            raise Permanent("AEP_BAD_REQUEST", detail)
        if status in (401, 403):
            raise ConfigError(
                "AEP_UNAUTHORIZED" if status == 401 else "AEP_FORBIDDEN",
                f"{detail} (refresh the IMS access token)",
            )
        if status == 404:
            raise ConfigError("AEP_UNKNOWN_INLET", detail)
        if status == 501:
            raise ConfigError("AEP_NOT_IMPLEMENTED", detail)
        error = status_error(response, detail)
        if error is None:  # another 2xx: nothing per item to read, DCS took it
            return [ItemOutcome() for _ in request.items]
        raise error

    def _per_item(self, request: HttpRequest, response: HttpResponse) -> list[ItemOutcome]:
        try:
            body = orjson.loads(response.body or b"{}")
        except orjson.JSONDecodeError:
            body = {}
        responses = body.get("responses") if isinstance(body, dict) else None
        if responses is None and response.status == 200:
            return [ItemOutcome() for _ in request.items]
        if not isinstance(responses, list) or len(responses) != len(request.items):
            # Unknown which messages were taken: resend all (same _id for every record).
            raise Retryable("AEP_BAD_RESPONSE", "207 without one response per message")
        outcomes: list[ItemOutcome] = []
        transient = 0
        for entry in responses:
            error = _entry_error(entry, response)
            if isinstance(error, Retryable):
                transient += 1
            outcomes.append(ItemOutcome(error))
        if transient == len(outcomes):
            # Nothing was taken, so retrying the whole request duplicates nothing.
            first = outcomes[0].error
            assert first is not None
            raise first
        return outcomes


def _ecid(integrations: Mapping[str, Any]) -> str | None:
    for key, field in (
        ("Adobe Analytics", "marketingCloudVisitorId"),
        ("Adobe Experience Platform", "ecid"),
    ):
        options = integrations.get(key)
        if isinstance(options, dict) and isinstance(options.get(field), str) and options[field]:
            return str(options[field])
    return None


def _entry_error(entry: Any, response: HttpResponse) -> DeliveryError | None:
    if not isinstance(entry, dict):
        return Permanent("AEP_BAD_RESPONSE", "response entry is not an object")
    code = entry.get("statusCode")
    if code is None or (isinstance(code, int) and 200 <= code < 300):
        return None
    message = str(entry.get("message", ""))[:500]
    if code == 429:
        return Throttled("AEP_THROTTLED", message, parse_retry_after(response.headers))
    if isinstance(code, int) and code >= 500 and code != 501:
        return Retryable(f"AEP_{code}", message)
    return Permanent(f"AEP_{code}", message)


def _problem_text(response: HttpResponse) -> str:
    """Title and report message of Adobe's problem JSON (ids only, no payload)."""
    try:
        body = orjson.loads(response.body or b"{}")
    except orjson.JSONDecodeError:
        return f"HTTP {response.status}"
    if not isinstance(body, dict):
        return f"HTTP {response.status}"
    report = body.get("report")
    message = report.get("message", "") if isinstance(report, dict) else ""
    return f"HTTP {response.status} {body.get('title', '')}: {message}"[:500]
