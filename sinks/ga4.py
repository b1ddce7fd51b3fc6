"""GA4 Measurement Protocol destination (destinations.md §3).

GA4 answers 2xx to everything it receives, valid or not, and silently discards
what it cannot use. So this module does the validation GA4 would do *before*
sending — names, lengths, counts, the 72-hour window — and makes every event
something GA4 will keep; what can never be kept is dead-lettered here with a
reason instead of vanishing on Google's side.

Mapping
    * ``client_id``: the event's ``anonymousId`` when it already is a GA client id
      (``<digits>.<digits>``, e.g. the site copies the ``_ga`` cookie into it), else a
      stable GA-shaped id derived from it (SHA-256 → two positive 31-bit numbers),
      because the reference requires "two positive numbers joined by a period".
      Events with only a ``userId`` (server side) get one derived from the userId the
      same way, so all of that user's server events share one GA client. An explicit
      ``integrations["Google Analytics 4"].clientId`` (and ``sessionId``) wins.
    * ``user_id``: the event's userId, else the stitched profile id (never the
      ``anon:`` ones); omitted beyond 256 characters or when it is an email address.
    * Segment e-commerce spec → GA4 recommended events (:data:`ECOMMERCE_EVENTS`),
      ``page`` → ``page_view``; any other ``track`` → its name in snake_case made
      valid (≤ 40 chars, letters/digits/underscore, starting with a letter, reserved
      names and prefixes moved under ``cdp_``). ``identify``/``group``/``alias`` and
      ``screen`` (``screen_view`` is reserved for app streams) are not applicable.
    * At most 25 params (standard ones first), values ≤ 100 characters (``page_*``
      longer), email addresses scrubbed from every value: GA forbids PII.
    * ``timestamp_micros`` per event. Events older than 72 h (minus a safety margin)
      raise :class:`Permanent` ``GA4_TOO_OLD``: GA4 would silently move them to
      "72 h ago" (RELAXED) or drop them (ENFORCE_RECOMMENDATIONS).
    * ``user_data`` from the profile traits, normalised and SHA-256 hashed per §3.6
      (never raw), unless the event's consent denies ``ad_user_data``.
    * ``consent`` from ``context.consent.categoryPreferences`` through configurable
      category names.

Requests carry one user each (the body has a single ``client_id``/``user_id``):
a batch is grouped by those request-level fields, then cut to ≤ 25 events and
< 130 kB.

Validate mode (``CDP_SINK_GA4_VALIDATE=true``): :meth:`Ga4Destination.preflight`
sends each request to ``/debug/mp/collect`` with ``ENFORCE_RECOMMENDATIONS`` first;
items with validation messages become :class:`Permanent` ``GA4_INVALID`` with the
messages, the others are then sent for real. It is a development aid (one extra
round trip per request), off by default.
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any, ClassVar
from urllib.parse import quote

import orjson
from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from sinks.base import (
    ConfigError,
    Destination,
    DestinationSettings,
    HttpRequest,
    HttpResponse,
    ItemOutcome,
    MappedEvent,
    Permanent,
    SinkLimits,
    status_error,
)
from sinks.registry import register
from streams.events import context_to_json, to_ms

MAX_EVENTS_PER_REQUEST = 25
MAX_PARAMS = 25
MAX_BODY_BYTES = 130_000  # GA4: "POST body < 130 kB"; kept just under 130 * 1000
MAX_PARAM_VALUE = 100
LONG_PARAM_VALUES = {"page_title": 300, "page_referrer": 420, "page_location": 1000}
MAX_ITEMS = 200
MAX_USER_ID = 256
BACKDATE_LIMIT_S = 72 * 3600
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,39}$")
CLIENT_ID_RE = re.compile(r"^\d+\.\d+$")
#: Also URL-encoded (``%40``). The lookbehind keeps it linear on long values: a
#: match may only start where a local part starts.
EMAIL_RE = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+(?:@|%40)"
    r"[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
)

#: Measurement Protocol reference, "Reserved names" (plus app-only events, since we
#: send to web streams).
RESERVED_EVENT_NAMES = frozenset(
    {
        "ad_activeview",
        "ad_click",
        "ad_exposure",
        "ad_impression",
        "ad_query",
        "ad_reward",
        "adunit_exposure",
        "app_clear_data",
        "app_exception",
        "app_install",
        "app_remove",
        "app_store_refund",
        "app_update",
        "app_upgrade",
        "dynamic_link_app_open",
        "dynamic_link_app_update",
        "dynamic_link_first_open",
        "error",
        "firebase_campaign",
        "firebase_in_app_message_action",
        "firebase_in_app_message_dismiss",
        "firebase_in_app_message_impression",
        "first_open",
        "first_visit",
        "in_app_purchase",
        "notification_dismiss",
        "notification_foreground",
        "notification_open",
        "notification_receive",
        "notification_send",
        "os_update",
        "screen_view",
        "session_start",
        "user_engagement",
    }
)
RESERVED_PARAM_NAMES = frozenset({"firebase_conversion"})
RESERVED_PREFIXES = ("_", "firebase_", "ga_", "google_", "gtag.")
RENAME_PREFIX = "cdp_"

#: Segment e-commerce spec v2 (and a few common spec events) → GA4 recommended events.
ECOMMERCE_EVENTS: dict[str, str] = {
    "Product Viewed": "view_item",
    "Product Added": "add_to_cart",
    "Product Removed": "remove_from_cart",
    "Cart Viewed": "view_cart",
    "Checkout Started": "begin_checkout",
    "Order Completed": "purchase",
    "Products Searched": "search",
    "Product Clicked": "select_item",
    "Product List Viewed": "view_item_list",
    "Product Added to Wishlist": "add_to_wishlist",
    "Payment Info Entered": "add_payment_info",
    "Order Refunded": "refund",
    "Promotion Viewed": "view_promotion",
    "Promotion Clicked": "select_promotion",
    "Signed Up": "sign_up",
    "Signed In": "login",
}
_SINGLE_PRODUCT = frozenset(
    {"view_item", "add_to_cart", "remove_from_cart", "select_item", "add_to_wishlist"}
)
_PRODUCT_LIST = frozenset(
    {"view_cart", "begin_checkout", "purchase", "refund", "view_item_list", "add_payment_info"}
)
GA4_INTEGRATION = "Google Analytics 4"


class Ga4Settings(DestinationSettings):
    model_config = SettingsConfigDict(
        env_prefix="CDP_SINK_GA4_", extra="forbid", case_sensitive=False, populate_by_name=True
    )

    endpoint: str = Field(
        "https://www.google-analytics.com",
        description="https://www.google-analytics.com, https://region1.google-analytics.com "
        "(EU collection) or an emulator; /mp/collect is appended.",
    )
    api_secret: SecretStr = Field(description="Measurement Protocol API secret of the stream.")
    measurement_id: str = Field(description="Web stream measurement id (G-XXXXXXX).")
    #: ``validate`` itself would shadow pydantic's BaseModel.validate; the env var and
    #: the keyword stay ``VALIDATE`` / ``validate``.
    validate_first: bool = Field(
        False,
        validation_alias=AliasChoices("validate_first", "validate", "CDP_SINK_GA4_VALIDATE"),
        description="Check every request on /debug/mp/collect before sending it.",
    )
    backdate_margin_s: float = Field(
        900.0,
        ge=0,
        le=24 * 3600,
        description="Events older than 72 h minus this are dead-lettered (GA4_TOO_OLD), "
        "leaving room for retries before GA4's window closes.",
    )
    engagement_time_msec: int | None = Field(
        1, ge=0, description="engagement_time_msec on every event (GA needs it for Realtime)."
    )
    default_currency: str = Field("USD", min_length=3, max_length=3)
    send_user_data: bool = True
    ad_user_data_categories: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["Advertising"],
        description="Segment consent categories deciding GA4 consent.ad_user_data.",
    )
    ad_personalization_categories: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["Advertising"],
        description="Segment consent categories deciding GA4 consent.ad_personalization.",
    )
    max_requests_per_second: float | None = Field(None, gt=0)
    max_concurrency: int = Field(4, ge=1, le=64)

    @field_validator("ad_user_data_categories", "ad_personalization_categories", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return orjson.loads(text)
            return [p.strip() for p in text.split(",") if p.strip()]
        return value

    @field_validator("measurement_id")
    @classmethod
    def _measurement_id(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("measurement_id must not be empty")
        return value


# ---------------------------------------------------------------------- naming


def snake_case(text: str) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", text)
    text = re.sub(r"[^A-Za-z0-9]+", "_", text)
    return re.sub(r"_+", "_", text).strip("_").lower()


def ga4_name(raw: str, *, reserved: frozenset[str]) -> str:
    """A name GA4 accepts for ``raw``: ≤ 40 chars, ``[A-Za-z][A-Za-z0-9_]*``, not reserved."""
    name = snake_case(raw) or "event"
    if not name[0].isalpha():
        name = "e_" + name
    if name in reserved or name.startswith(RESERVED_PREFIXES):
        name = RENAME_PREFIX + name
    name = name[:40]
    if name in reserved:  # a truncated rename that became reserved again: practically never
        name = RENAME_PREFIX + name[: 40 - len(RENAME_PREFIX)]
    return name


def scrub(text: str) -> str:
    """Email addresses out of free text (GA forbids PII in any parameter)."""
    return EMAIL_RE.sub("[redacted]", text) if ("@" in text or "%40" in text) else text


def param_value(name: str, value: Any) -> str | int | float | None:
    """A GA4 parameter value (string ≤ limit or number), or None when it cannot be one."""
    if value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    text = scrub(str(value))
    return text[: LONG_PARAM_VALUES.get(name, MAX_PARAM_VALUE)]


# ---------------------------------------------------------------------- hashing (§3.6)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def normalize_email(email: str) -> str | None:
    email = email.strip().lower()
    if "@" not in email:
        return None
    local, _, domain = email.rpartition("@")
    if not local or "." not in domain:
        return None
    if domain in ("gmail.com", "googlemail.com"):
        local = local.replace(".", "")
    return f"{local}@{domain}"


def normalize_phone(phone: str) -> str | None:
    """E.164 (``+`` and 8 to 15 digits). Numbers without a country code cannot be normalised."""
    text = phone.strip()
    if text.startswith("00"):
        text = "+" + text[2:]
    if not text.startswith("+"):
        return None
    digits = re.sub(r"\D", "", text)
    return f"+{digits}" if 8 <= len(digits) <= 15 else None


def _name_part(text: str) -> str:
    return re.sub(r"[^a-z]", "", unicodedata.normalize("NFKD", text).lower())


def user_data(traits: Mapping[str, Any]) -> dict[str, Any] | None:
    """GA4 ``user_data`` from Segment traits: hashed identifiers, normalised address."""
    out: dict[str, Any] = {}
    email = traits.get("email")
    if isinstance(email, str) and (norm := normalize_email(email)):
        out["sha256_email_address"] = [sha256_hex(norm)]
    phone = traits.get("phone")
    if isinstance(phone, str) and (norm_phone := normalize_phone(phone)):
        out["sha256_phone_number"] = [sha256_hex(norm_phone)]
    address: dict[str, str] = {}
    first = traits.get("firstName") or traits.get("first_name")
    last = traits.get("lastName") or traits.get("last_name")
    if isinstance(first, str) and _name_part(first):
        address["sha256_first_name"] = sha256_hex(_name_part(first))
    if isinstance(last, str) and _name_part(last):
        address["sha256_last_name"] = sha256_hex(_name_part(last))
    addr = traits.get("address")
    if isinstance(addr, dict):
        street = addr.get("street")
        if isinstance(street, str) and street.strip():
            address["sha256_street"] = sha256_hex(street.strip().lower())
        for src, dst in (
            ("city", "city"),
            ("state", "region"),
            ("region", "region"),
            ("postalCode", "postal_code"),
            ("postal_code", "postal_code"),
        ):
            v = addr.get(src)
            if isinstance(v, str) and v.strip() and dst not in address:
                address[dst] = v.strip().lower()
        country = addr.get("country")
        if isinstance(country, str) and len(country.strip()) == 2:
            address["country"] = country.strip().upper()
    if address:
        out["address"] = [address]
    return out or None


# ---------------------------------------------------------------------- identity


def derived_client_id(seed: str) -> str:
    """A stable GA-shaped client id (two positive numbers) for a non-GA identifier."""
    digest = hashlib.sha256(seed.encode()).digest()
    a = int.from_bytes(digest[:4], "big") % 2_147_483_647 + 1
    b = int.from_bytes(digest[4:8], "big") % 2_147_483_647 + 1
    return f"{a}.{b}"


def client_id_for(event: Mapping[str, Any], ga4_options: Mapping[str, Any]) -> str | None:
    explicit = ga4_options.get("clientId") or ga4_options.get("client_id")
    if isinstance(explicit, str) and CLIENT_ID_RE.match(explicit):
        return explicit
    anonymous_id = event.get("anonymousId")
    if anonymous_id:
        return (
            anonymous_id
            if CLIENT_ID_RE.match(anonymous_id)
            else derived_client_id("anonymousId:" + anonymous_id)
        )
    user_id = event.get("userId")
    if user_id:
        return derived_client_id("userId:" + user_id)
    return None


# ---------------------------------------------------------------------- e-commerce


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def ga4_item(product: Mapping[str, Any], index: int | None = None) -> dict[str, Any] | None:
    """A GA4 ``items[]`` entry from a Segment product (needs an id or a name)."""
    item: dict[str, Any] = {}
    for src, dst in (
        ("product_id", "item_id"),
        ("sku", "item_id"),
        ("id", "item_id"),
        ("name", "item_name"),
        ("brand", "item_brand"),
        ("category", "item_category"),
        ("variant", "item_variant"),
        ("coupon", "coupon"),
        ("affiliation", "affiliation"),
    ):
        v = product.get(src)
        if dst not in item and v is not None and not isinstance(v, dict | list):
            pv = param_value(dst, str(v))
            if pv:
                item[dst] = pv
    for src, dst in (("price", "price"), ("quantity", "quantity")):
        n = _number(product.get(src))
        if n is not None:
            item[dst] = n
    position = _number(product.get("position"))
    if position is not None:
        item["index"] = int(position)
    elif index is not None:
        item["index"] = index
    if "item_id" not in item and "item_name" not in item:
        return None
    return item


def _line_value(product: Mapping[str, Any]) -> float | None:
    price = _number(product.get("price"))
    if price is None:
        return None
    quantity = _number(product.get("quantity"))
    return float(price) * float(quantity if quantity is not None else 1)


def ecommerce_params(name: str, props: Mapping[str, Any], currency: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    products: list[Any]
    if name in _SINGLE_PRODUCT:
        products = [props]
        value = _line_value(props)
    else:
        raw = props.get("products")
        products = [p for p in raw if isinstance(p, dict)] if isinstance(raw, list) else []
        value = None
        for key in ("value", "total", "revenue"):
            value_n = _number(props.get(key))
            if value_n is not None:
                value = float(value_n)
                break
        if value is None and products:
            lines = [_line_value(p) for p in products]
            if any(v is not None for v in lines):
                value = sum(v for v in lines if v is not None)
    if name in _SINGLE_PRODUCT or name in _PRODUCT_LIST:
        items = [it for i, p in enumerate(products[:MAX_ITEMS]) if (it := ga4_item(p, i))]
        if items:
            params["items"] = items
        if value is not None:
            params["value"] = round(value, 6)
            cur = props.get("currency")
            params["currency"] = cur if isinstance(cur, str) and len(cur) == 3 else currency
            params["currency"] = params["currency"].upper()
    if name in ("purchase", "refund"):
        tid = props.get("order_id") or props.get("checkout_id")
        if tid is not None:
            params["transaction_id"] = param_value("transaction_id", str(tid))
        for key in ("tax", "shipping"):
            n = _number(props.get(key))
            if n is not None:
                params[key] = n
        for key in ("coupon", "affiliation"):
            if isinstance(props.get(key), str):
                params[key] = param_value(key, props[key])
    elif name == "begin_checkout" and isinstance(props.get("coupon"), str):
        params["coupon"] = param_value("coupon", props["coupon"])
    elif name == "view_item_list":
        for src, dst in (("list_id", "item_list_id"), ("category", "item_list_name")):
            if props.get(src) is not None:
                params[dst] = param_value(dst, str(props[src]))
    elif name == "add_payment_info" and props.get("payment_method") is not None:
        params["payment_type"] = param_value("payment_type", str(props["payment_method"]))
    elif name == "search":
        query = props.get("query")
        if query is not None:
            params["search_term"] = param_value("search_term", str(query))
    elif name in ("view_promotion", "select_promotion"):
        for src, dst in (
            ("promotion_id", "promotion_id"),
            ("name", "promotion_name"),
            ("creative", "creative_name"),
            ("position", "creative_slot"),
        ):
            if props.get(src) is not None:
                params[dst] = param_value(dst, str(props[src]))
    elif name in ("sign_up", "login") and props.get("method") is not None:
        params["method"] = param_value("method", str(props["method"]))
    return {k: v for k, v in params.items() if v is not None}


def custom_params(props: Mapping[str, Any], room: int, taken: set[str]) -> dict[str, Any]:
    """Scalar properties as params, valid names, at most ``room`` of them."""
    out: dict[str, Any] = {}
    for key, value in props.items():
        if len(out) >= room:
            break
        name = ga4_name(str(key), reserved=RESERVED_PARAM_NAMES)
        if name in taken or name in out or name == "items":
            continue
        pv = param_value(name, value)
        if pv is not None:
            out[name] = pv
    return out


# ---------------------------------------------------------------------- destination


def _consent_state(prefs: Mapping[str, Any], categories: Sequence[str]) -> str | None:
    lowered = {str(k).lower(): v for k, v in prefs.items()}
    values = [lowered[c.lower()] for c in categories if c.lower() in lowered]
    if not values:
        return None
    return "GRANTED" if all(v is True for v in values) else "DENIED"


@register
class Ga4Destination(Destination[Ga4Settings]):
    name: ClassVar[str] = "ga4"
    integration_names: ClassVar[tuple[str, ...]] = (
        "Google Analytics 4",
        "Google Analytics 4 Cloud",
        "Google Analytics 4 Web",
        "GA4",
    )
    settings_cls: ClassVar[type[DestinationSettings]] = Ga4Settings

    def __init__(self, settings: Ga4Settings) -> None:
        super().__init__(settings)
        base = settings.endpoint.rstrip("/")
        query = (
            f"?measurement_id={quote(settings.measurement_id, safe='')}"
            f"&api_secret={quote(settings.api_secret.get_secret_value(), safe='')}"
        )
        self._collect_url = f"{base}/mp/collect{query}"
        self._debug_url = f"{base}/debug/mp/collect{query}"
        self._limits = SinkLimits(
            max_batch_events=MAX_EVENTS_PER_REQUEST,
            max_batch_bytes=MAX_BODY_BYTES - 2_000,
            max_event_bytes=MAX_BODY_BYTES - 2_000,
            max_requests_per_second=settings.max_requests_per_second,
            max_concurrency=settings.max_concurrency,
        )

    @property
    def limits(self) -> SinkLimits:
        return self._limits

    # -- map

    def map(self, enriched: Mapping[str, Any], *, now_s: float | None = None) -> MappedEvent | None:
        event = enriched["event"]
        etype = event["type"]
        if etype not in ("track", "page"):
            return None
        integrations = orjson.loads(event.get("integrations") or "{}")
        ga4_options = integrations.get(GA4_INTEGRATION) if isinstance(integrations, dict) else None
        ga4_options = ga4_options if isinstance(ga4_options, dict) else {}
        client_id = client_id_for(event, ga4_options)
        if client_id is None:
            return None
        now = time.time() if now_s is None else now_s
        ts_ms = to_ms(event["timestamp"])
        age_s = now - ts_ms / 1000
        if age_s > BACKDATE_LIMIT_S - self.settings.backdate_margin_s:
            raise Permanent(
                "GA4_TOO_OLD",
                f"event is {age_s / 3600:.1f} h old; GA4 keeps event times only within 72 h "
                "and would silently move or drop it",
            )
        props = orjson.loads(event.get("properties") or "{}")
        props = props if isinstance(props, dict) else {}
        context = context_to_json(event.get("context"))
        ga_event = self._event(etype, event, props, context, ga4_options)
        if ts_ms <= now * 1000:  # a future time (client clock) is left to GA: receipt time
            ga_event["timestamp_micros"] = ts_ms * 1000
        request_fields = self._request_fields(enriched, event, context, client_id)
        item = {**request_fields, "event": ga_event}
        encoded = orjson.dumps(item)
        return MappedEvent(
            message_id=event["messageId"],
            order_key=enriched["profileId"],
            item=item,
            size=len(encoded),
            encoded=encoded,
        )

    def _event(
        self,
        etype: str,
        event: Mapping[str, Any],
        props: dict[str, Any],
        context: Mapping[str, Any],
        ga4_options: Mapping[str, Any],
    ) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if etype == "page":
            name = "page_view"
            page = context.get("page") if isinstance(context.get("page"), dict) else {}
            assert isinstance(page, dict)
            url = props.get("url") or page.get("url")
            title = props.get("title") or page.get("title") or event.get("name")
            referrer = props.get("referrer") or page.get("referrer")
            for key, value in (
                ("page_location", url),
                ("page_title", title),
                ("page_referrer", referrer),
            ):
                if value is not None:
                    params[key] = param_value(key, str(value))
            consumed = {"url", "title", "referrer", "path", "search"}
            extra = {k: v for k, v in props.items() if k not in consumed}
        else:
            raw_name = str(event.get("event") or "")
            name = ECOMMERCE_EVENTS.get(raw_name) or ga4_name(
                raw_name, reserved=RESERVED_EVENT_NAMES
            )
            if raw_name in ECOMMERCE_EVENTS:
                params.update(ecommerce_params(name, props, self.settings.default_currency))
                extra = {}
            else:
                extra = props
        session_id = ga4_options.get("sessionId") or ga4_options.get("session_id")
        if isinstance(session_id, str | int) and not isinstance(session_id, bool):
            params["session_id"] = session_id
        if self.settings.engagement_time_msec is not None:
            params["engagement_time_msec"] = self.settings.engagement_time_msec
        room = MAX_PARAMS - len(params)
        if extra and room > 0:
            params.update(custom_params(extra, room, set(params)))
        return {"name": name, "params": params}

    def _request_fields(
        self,
        enriched: Mapping[str, Any],
        event: Mapping[str, Any],
        context: Mapping[str, Any],
        client_id: str,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {"client_id": client_id}
        user_id = event.get("userId")
        profile_id = enriched.get("profileId") or ""
        if not user_id and profile_id and not profile_id.startswith("anon:"):
            user_id = profile_id
        # An email used as the user id would be PII in GA: leave it out (client_id is hashed).
        if user_id and len(user_id) <= MAX_USER_ID and not EMAIL_RE.search(user_id):
            fields["user_id"] = user_id
        consent_obj = context.get("consent")
        prefs = consent_obj.get("categoryPreferences") if isinstance(consent_obj, dict) else None
        consent: dict[str, str] = {}
        if isinstance(prefs, dict):
            for key, categories in (
                ("ad_user_data", self.settings.ad_user_data_categories),
                ("ad_personalization", self.settings.ad_personalization_categories),
            ):
                state = _consent_state(prefs, categories)
                if state is not None:
                    consent[key] = state
        if consent:
            fields["consent"] = consent
        if self.settings.send_user_data and consent.get("ad_user_data") != "DENIED":
            traits: dict[str, Any] = {}
            ctx_traits = context.get("traits")
            if isinstance(ctx_traits, dict):
                traits.update(ctx_traits)
            profile = orjson.loads(enriched.get("profileTraits") or "{}")
            if isinstance(profile, dict):
                traits.update(profile)
            if event.get("type") == "identify":
                traits.update(orjson.loads(event.get("traits") or "{}"))
            data = user_data(traits)
            if data:
                fields["user_data"] = data
        return fields

    # -- requests

    def build_requests(self, batch: Sequence[MappedEvent]) -> list[HttpRequest]:
        groups: dict[bytes, list[MappedEvent]] = {}
        for mapped in batch:
            request_fields = {k: v for k, v in mapped.item.items() if k != "event"}
            groups.setdefault(orjson.dumps(request_fields, option=orjson.OPT_SORT_KEYS), []).append(
                mapped
            )
        requests: list[HttpRequest] = []
        for items in groups.values():
            head = {k: v for k, v in items[0].item.items() if k != "event"}
            chunk: list[MappedEvent] = []
            chunk_events: list[bytes] = []
            for mapped in items:
                encoded = orjson.dumps(mapped.item["event"])
                if chunk and (
                    len(chunk) >= MAX_EVENTS_PER_REQUEST
                    or len(self._body(head, [*chunk_events, encoded])) >= MAX_BODY_BYTES
                ):
                    requests.append(self._request(head, chunk, chunk_events))
                    chunk, chunk_events = [], []
                chunk.append(mapped)
                chunk_events.append(encoded)
            if chunk:
                requests.append(self._request(head, chunk, chunk_events))
        return requests

    @staticmethod
    def _body(head: Mapping[str, Any], events: Sequence[bytes]) -> bytes:
        prefix = orjson.dumps(head)[:-1]
        sep = b"," if len(prefix) > 1 else b""
        return prefix + sep + b'"events":[' + b",".join(events) + b"]}"

    def _request(
        self, head: Mapping[str, Any], items: list[MappedEvent], events: list[bytes]
    ) -> HttpRequest:
        return HttpRequest(
            method="POST",
            url=self._collect_url,
            headers={"Content-Type": "application/json"},
            body=self._body(head, events),
            items=list(items),
            secret_params=("api_secret",),
        )

    def classify(self, request: HttpRequest, response: HttpResponse) -> list[ItemOutcome]:
        """Any 2xx means GA4 received the request — the only thing it ever tells."""
        if 200 <= response.status < 300:
            return [ItemOutcome() for _ in request.items]
        if response.status in (404, 405):
            raise ConfigError(f"HTTP_{response.status}", "wrong GA4 endpoint (check the host)")
        error = status_error(response)
        assert error is not None
        raise error

    # -- validate mode

    def validation_request(self, request: HttpRequest) -> HttpRequest:
        """The same request for ``/debug/mp/collect`` with strict validation."""
        body = orjson.loads(request.body)
        body["validation_behavior"] = "ENFORCE_RECOMMENDATIONS"
        return HttpRequest(
            method="POST",
            url=self._debug_url,
            headers=dict(request.headers),
            body=orjson.dumps(body),
            items=list(request.items),
            secret_params=("api_secret",),
        )

    def classify_validation(
        self, request: HttpRequest, response: HttpResponse
    ) -> list[ItemOutcome]:
        """Per item: ``GA4_INVALID`` with GA's messages for the events they point at."""
        error = status_error(response)
        if error is not None:
            raise error
        try:
            messages = orjson.loads(response.body or b"{}").get("validationMessages", [])
        except (orjson.JSONDecodeError, AttributeError):
            raise Permanent(
                "GA4_BAD_VALIDATION_RESPONSE", "debug endpoint answered non-JSON"
            ) from None
        per_item: dict[int, list[str]] = {}
        shared: list[str] = []
        for msg in messages if isinstance(messages, list) else []:
            if not isinstance(msg, dict):
                continue
            path = str(msg.get("fieldPath", ""))
            text = f"{msg.get('validationCode', '?')} {path}: {msg.get('description', '')}"
            match = re.match(r"^events\[(\d+)\]", path)
            if match and int(match.group(1)) < len(request.items):
                per_item.setdefault(int(match.group(1)), []).append(text[:300])
            else:
                shared.append(text[:300])
        outcomes = []
        for i in range(len(request.items)):
            found = shared + per_item.get(i, [])
            outcomes.append(
                ItemOutcome(Permanent("GA4_INVALID", "; ".join(found)[:1000]) if found else None)
            )
        return outcomes

    async def preflight(
        self,
        request: HttpRequest,
        send: Callable[[HttpRequest], Awaitable[HttpResponse]],
    ) -> list[ItemOutcome]:
        """Validate-mode hook: per-item outcomes from the debug endpoint (all ok when off).

        The caller sends only the items that passed (``build_requests`` on them) and
        dead-letters the rest.
        """
        if not self.settings.validate_first:
            return [ItemOutcome() for _ in request.items]
        validation = self.validation_request(request)
        return self.classify_validation(validation, await send(validation))
