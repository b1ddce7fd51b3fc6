"""GA4 Measurement Protocol emulator (destinations.md §3).

``POST /mp/collect`` answers **204 to every request it receives** — malformed
JSON, invalid names, a wrong ``api_secret`` — exactly like Google, so a
destination can never learn anything from the status. What GA would have done
with each event is recorded instead: valid events in ``state.accepted``, events
GA would discard in ``state.dropped`` with the validation messages.

``POST /debug/mp/collect`` answers 200 ``{"validationMessages": [...]}`` with
Google's ``fieldPath`` / ``description`` / ``validationCode`` (empty = valid),
never records events and, like Google's, does not check ``api_secret`` or
``measurement_id``.

Rules (Measurement Protocol reference and "sending events", checked 2026-11):
≤ 25 events, params and user properties; names ``^[A-Za-z][A-Za-z0-9_]{0,39}$``;
reserved event names, param names/prefixes (``_``, ``firebase_``, ``ga_``,
``google_``, ``gtag.``) and user-property names/prefixes; param values ≤ 100
characters (``page_title`` 300, ``page_referrer`` 420, ``page_location`` 1,000);
user property names ≤ 24 / values ≤ 36; ≤ 10 custom params per item; body
< 130 kB; ``client_id`` "two positive numbers joined by a period" (checked unless
``strict_client_id=False``); ``timestamp_micros`` that looks like ms/s is
invalid. Events older than 72 hours: ``validation_behavior`` ``RELAXED``
(default) accepts them with the timestamp moved to 72 h ago;
``ENFORCE_RECOMMENDATIONS`` rejects them. Under ``RELAXED`` params over limits
are ignored; under ``ENFORCE_RECOMMENDATIONS`` they reject the event.

PII hook: ``user_data.sha256_*`` values must be 64 lowercase hex and no email
address may appear anywhere (Google forbids PII in Analytics).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from aiohttp import web

from sinks.emulators.base import (
    SHA256_HEX_RE,
    BodyError,
    Emulator,
    HashRule,
    json_response,
    parse_json,
    read_body,
)

MAX_BODY_BYTES = 130 * 1024
MAX_EVENTS = 25
MAX_PARAMS = 25
MAX_USER_PROPERTIES = 25
MAX_ITEM_CUSTOM_PARAMS = 10
MAX_PARAM_VALUE = 100
LONG_PARAM_VALUES = {"page_title": 300, "page_referrer": 420, "page_location": 1000}
MAX_USER_PROPERTY_NAME = 24
MAX_USER_PROPERTY_VALUE = 36
MAX_USER_ID = 256  # unconfirmed (destinations.md §3.2)
BACKDATE_LIMIT_US = 72 * 3600 * 1_000_000
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,39}$")
CLIENT_ID_RE = re.compile(r"^\d+\.\d+$")
APP_INSTANCE_RE = re.compile(r"^[0-9a-fA-F]{32}$")

RESERVED_EVENTS = frozenset(
    {
        "ad_activeview", "ad_click", "ad_exposure", "ad_query", "ad_reward",
        "adunit_exposure", "app_clear_data", "app_exception", "app_install",
        "app_remove", "app_store_refund", "app_update", "app_upgrade",
        "dynamic_link_app_open", "dynamic_link_app_update", "dynamic_link_first_open",
        "error", "firebase_campaign", "firebase_in_app_message_action",
        "firebase_in_app_message_dismiss", "firebase_in_app_message_impression",
        "first_open", "first_visit", "notification_dismiss", "notification_foreground",
        "notification_open", "notification_receive", "notification_send", "os_update",
        "session_start", "user_engagement",
    }
)  # fmt: skip
APP_ONLY_EVENTS = frozenset({"ad_impression", "in_app_purchase", "screen_view"})
RESERVED_PARAMS = frozenset({"firebase_conversion"})
RESERVED_PREFIXES = ("_", "firebase_", "ga_", "google_", "gtag.")
RESERVED_USER_PROPERTIES = frozenset(
    {"first_open_time", "first_visit_time", "last_deep_link_referrer", "user_id",
     "first_open_after_install"}
)  # fmt: skip
STANDARD_ITEM_PARAMS = frozenset(
    {
        "item_id", "item_name", "affiliation", "coupon", "currency", "discount", "index",
        "item_brand", "item_category", "item_category2", "item_category3", "item_category4",
        "item_category5", "item_list_id", "item_list_name", "item_variant", "location_id",
        "price", "quantity", "creative_name", "creative_slot", "promotion_id", "promotion_name",
    }
)  # fmt: skip
TOP_LEVEL_KEYS = frozenset(
    {
        "client_id", "app_instance_id", "user_id", "timestamp_micros", "user_properties",
        "user_data", "consent", "non_personalized_ads", "user_location", "ip_override",
        "device", "user_agent", "validation_behavior", "events",
    }
)  # fmt: skip
CONSENT_VALUES = frozenset({"GRANTED", "DENIED"})


def message(field_path: str, code: str, description: str) -> dict[str, str]:
    return {"fieldPath": field_path, "description": description, "validationCode": code}


class Ga4Emulator(Emulator):
    name: ClassVar[str] = "ga4"
    hash_rules: ClassVar[tuple[HashRule, ...]] = (
        HashRule("user_data.sha256_email_address[*]", SHA256_HEX_RE),
        HashRule("user_data.sha256_phone_number[*]", SHA256_HEX_RE),
        HashRule("user_data.address[*].sha256_*", SHA256_HEX_RE),
    )

    def __init__(
        self,
        *,
        streams: Mapping[str, str] | None = None,
        firebase_apps: Mapping[str, str] | None = None,
        strict_client_id: bool = True,
        forbid_raw_email: bool = True,
    ) -> None:
        """``streams`` maps measurement id → api secret (``firebase_apps``: app id → secret)."""
        super().__init__(forbid_raw_email=forbid_raw_email)
        self.streams = dict(
            streams if streams is not None else {"G-EMULATOR01": "emulator-api-secret"}
        )
        self.firebase_apps = dict(firebase_apps or {})
        self.strict_client_id = strict_client_id

    def credentials(self) -> dict[str, str]:
        measurement_id, secret = next(iter(self.streams.items()))
        return {"measurement_id": measurement_id, "api_secret": secret}

    def sink_env(self, url: str) -> dict[str, str]:
        env = {"CDP_SINK_GA4_ENDPOINT": url}
        for key, value in self.credentials().items():
            env[f"CDP_SINK_GA4_{key.upper()}"] = value
        return env

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/mp/collect", self._h_collect)
        router.add_post("/debug/mp/collect", self._h_debug)

    def error_response(
        self, status: int, *, retry_after_s: float | None = None, body: Any = None
    ) -> web.Response:
        # Google answers transport-level failures with an empty (HTML at most) body.
        return web.Response(status=status, headers=self.retry_headers(retry_after_s), body=b"")

    # ------------------------------------------------------------------ handlers

    async def _h_collect(self, request: web.Request) -> web.Response:
        path = request.path
        try:
            body = await read_body(request)
        except BodyError as exc:
            self.state.drop(path, "invalid_body", exc.message)
            return web.Response(status=204)
        if len(body) >= MAX_BODY_BYTES:
            self.state.drop(path, "body_too_large", f"{len(body)} bytes >= 130 kB")
            return web.Response(status=204)
        try:
            payload = parse_json(body)
        except BodyError as exc:
            self.state.drop(path, "invalid_json", exc.message)
            return web.Response(status=204)
        self.check_pii(path, payload)
        secret = request.query.get("api_secret")
        stream = request.query.get("measurement_id")
        app = request.query.get("firebase_app_id")
        known = self.streams if stream is not None else self.firebase_apps
        stream_id = stream if stream is not None else app
        if stream_id is None or known.get(stream_id) != secret or secret is None:
            self.state.drop(
                path, "invalid_credentials", "unknown stream or api_secret", item=payload
            )
            return web.Response(status=204)
        self._collect(path, payload, app_stream=stream is None)
        return web.Response(status=204)

    async def _h_debug(self, request: web.Request) -> web.Response:
        try:
            body = await read_body(request)
            if len(body) >= MAX_BODY_BYTES:
                msgs = [message("", "VALUE_OUT_OF_BOUNDS", "POST body must be under 130 kB")]
                return json_response({"validationMessages": msgs})
            payload = parse_json(body)
        except BodyError as exc:
            return json_response(
                {"validationMessages": [message("", "VALUE_INVALID", exc.message)]}
            )
        self.state.count("debug_requests")
        app_stream = "measurement_id" not in request.query and "firebase_app_id" in request.query
        request_msgs, event_msgs, _ = self.validate(payload, app_stream=app_stream)
        msgs = request_msgs + [m for ms in event_msgs.values() for m in ms]
        if msgs:
            self.state.count("debug_invalid")
        return json_response({"validationMessages": msgs})

    # ------------------------------------------------------------------ validation

    def _collect(self, path: str, payload: Any, *, app_stream: bool) -> None:
        request_msgs, event_msgs, clamped = self.validate(payload, app_stream=app_stream)
        if request_msgs:
            self.state.drop(
                path,
                request_msgs[0]["validationCode"],
                request_msgs[0]["description"],
                item=payload,
            )
            return
        enforce = payload.get("validation_behavior") == "ENFORCE_RECOMMENDATIONS"
        base = {k: v for k, v in payload.items() if k != "events"}
        for index, event in enumerate(payload["events"]):
            msgs = event_msgs.get(index, [])
            fatal = [m for m in msgs if _is_fatal(index, m, enforce)]
            if fatal:
                self.state.drop(
                    path,
                    fatal[0]["validationCode"],
                    fatal[0]["description"],
                    item={**base, "event": event},
                )
                continue
            record = {**base, "event": _without_ignored(event, msgs, enforce)}
            if index in clamped:
                record["timestamp_clamped"] = True
                self.state.count("timestamps_clamped")
            self.state.accept(record, path=path)

    def validate(
        self, payload: Any, *, app_stream: bool = False
    ) -> tuple[list[dict[str, str]], dict[int, list[dict[str, str]]], set[int]]:
        """(request-level messages, per-event messages, indices of too-old events)."""
        if not isinstance(payload, dict):
            return (
                [message("", "VALUE_INVALID", "The request body must be a JSON object.")],
                {},
                set(),
            )
        enforce = payload.get("validation_behavior") == "ENFORCE_RECOMMENDATIONS"
        req: list[dict[str, str]] = []
        for key in payload:
            if key not in TOP_LEVEL_KEYS:
                req.append(message(key, "VALUE_INVALID", f"Unknown field [{key}]."))
        behaviour = payload.get("validation_behavior")
        if behaviour is not None and behaviour not in ("RELAXED", "ENFORCE_RECOMMENDATIONS"):
            req.append(
                message(
                    "validation_behavior",
                    "VALUE_INVALID",
                    "validation_behavior must be RELAXED or ENFORCE_RECOMMENDATIONS.",
                )
            )
        req.extend(self._identity_messages(payload, app_stream))
        now_us = int(time.time() * 1_000_000)
        req.extend(
            _timestamp_messages(
                "timestamp_micros", payload.get("timestamp_micros"), now_us, enforce
            )
        )
        req.extend(_user_property_messages(payload.get("user_properties")))
        req.extend(_user_data_messages(payload.get("user_data")))
        req.extend(_consent_messages(payload.get("consent")))
        events = payload.get("events")
        per_event: dict[int, list[dict[str, str]]] = {}
        clamped: set[int] = set()
        if not isinstance(events, list) or not events:
            req.append(message("events", "VALUE_REQUIRED", "At least one event is required."))
            return req, per_event, clamped
        if len(events) > MAX_EVENTS:
            req.append(
                message(
                    "events",
                    "EXCEEDED_MAX_ENTITIES",
                    f"A request can have at most {MAX_EVENTS} events.",
                )
            )
        request_ts = payload.get("timestamp_micros")
        for i, event in enumerate(events):
            msgs = _event_messages(i, event, app_stream)
            ts = event.get("timestamp_micros") if isinstance(event, dict) else None
            ts = ts if ts is not None else request_ts
            ts_msgs = _timestamp_messages(
                f"events[{i}].timestamp_micros",
                event.get("timestamp_micros") if isinstance(event, dict) else None,
                now_us,
                enforce,
            )
            msgs.extend(ts_msgs)
            if isinstance(ts, int) and ts >= 10**15 and now_us - ts > BACKDATE_LIMIT_US:
                clamped.add(i)
            if msgs:
                per_event[i] = msgs
        return req, per_event, clamped

    def _identity_messages(self, payload: dict[str, Any], app_stream: bool) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        key = "app_instance_id" if app_stream else "client_id"
        value = payload.get(key)
        if value is None or value == "":
            out.append(message(key, "VALUE_REQUIRED", f"{key} is required."))
        elif not isinstance(value, str):
            out.append(message(key, "VALUE_INVALID", f"{key} must be a string."))
        elif app_stream and not APP_INSTANCE_RE.match(value):
            out.append(message(key, "VALUE_INVALID", "app_instance_id must be 32 hex characters."))
        elif not app_stream and self.strict_client_id and not CLIENT_ID_RE.match(value):
            out.append(
                message(
                    key,
                    "VALUE_INVALID",
                    "client_id must be two positive numbers joined by a period.",
                )
            )
        user_id = payload.get("user_id")
        if user_id is not None:
            if not isinstance(user_id, str):
                out.append(message("user_id", "VALUE_INVALID", "user_id must be a string."))
            elif len(user_id) > MAX_USER_ID:
                out.append(message("user_id", "VALUE_OUT_OF_BOUNDS", "user_id is too long."))
        return out


def _is_fatal(index: int, msg: dict[str, str], enforce: bool) -> bool:
    """Whether GA discards the whole event (rather than some of its parameters)."""
    path = msg["fieldPath"]
    if path in (f"events[{index}]", f"events[{index}].name"):
        return True
    if path == f"events[{index}].params" and msg["validationCode"] == "VALUE_INVALID":
        return True
    # ENFORCE_RECOMMENDATIONS rejects events outside the 72 h window; RELAXED clamps them.
    return enforce and path == f"events[{index}].timestamp_micros"


#: RELAXED ignores parameters over limits but keeps badly named / typed ones.
_RELAXED_IGNORED = frozenset({"VALUE_OUT_OF_BOUNDS", "EXCEEDED_MAX_ENTITIES"})
_ENFORCE_IGNORED = _RELAXED_IGNORED | {"VALUE_INVALID", "NAME_INVALID", "NAME_RESERVED"}


def _name_problem(name: Any, kind: str, *, reserved: frozenset[str]) -> tuple[str, str] | None:
    if not isinstance(name, str) or not name:
        return "VALUE_REQUIRED", f"{kind} name is required."
    if name in reserved or name.startswith(RESERVED_PREFIXES):
        return "NAME_RESERVED", f"{kind} name [{name[:60]}] is reserved."
    if not NAME_RE.match(name):
        return (
            "NAME_INVALID",
            f"{kind} name [{name[:60]}] is invalid. Names must start with an alphabetic "
            "character, contain only letters, digits and underscores, and be at most 40 "
            "characters.",
        )
    return None


def _event_messages(i: int, event: Any, app_stream: bool) -> list[dict[str, str]]:
    fp = f"events[{i}]"
    if not isinstance(event, dict):
        return [message(fp, "VALUE_INVALID", f"Event at index: [{i}] must be an object.")]
    out: list[dict[str, str]] = []
    reserved = RESERVED_EVENTS if app_stream else RESERVED_EVENTS | APP_ONLY_EVENTS
    problem = _name_problem(event.get("name"), "Event", reserved=reserved)
    if problem:
        out.append(message(f"{fp}.name", problem[0], f"Event at index: [{i}]: {problem[1]}"))
    params = event.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return [*out, message(f"{fp}.params", "VALUE_INVALID", "params must be an object.")]
    if len(params) > MAX_PARAMS:
        out.append(
            message(
                f"{fp}.params",
                "EXCEEDED_MAX_ENTITIES",
                f"Event at index: [{i}] has more than {MAX_PARAMS} parameters.",
            )
        )
    for key, value in params.items():
        pp = f"{fp}.params.{key}"
        problem = _name_problem(key, "Parameter", reserved=RESERVED_PARAMS)
        if problem:
            out.append(message(pp, problem[0], problem[1]))
            continue
        if key == "items":
            out.extend(_items_messages(pp, value))
            continue
        out.extend(_value_messages(pp, key, value))
    name = event.get("name")
    if name == "purchase" and not params.get("transaction_id"):
        out.append(
            message(
                f"{fp}.params.transaction_id", "VALUE_REQUIRED", "purchase requires transaction_id."
            )
        )
    if "value" in params and not params.get("currency"):
        out.append(
            message(
                f"{fp}.params.currency", "VALUE_REQUIRED", "currency is required when value is set."
            )
        )
    return out


def _value_messages(pp: str, key: str, value: Any) -> list[dict[str, str]]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int | float):
        return []
    if isinstance(value, str):
        limit = LONG_PARAM_VALUES.get(key, MAX_PARAM_VALUE)
        if len(value) > limit:
            return [
                message(
                    pp, "VALUE_OUT_OF_BOUNDS", f"Parameter value is longer than {limit} characters."
                )
            ]
        return []
    return [message(pp, "VALUE_INVALID", "Parameter values must be strings or numbers.")]


def _items_messages(pp: str, items: Any) -> list[dict[str, str]]:
    if not isinstance(items, list):
        return [message(pp, "VALUE_INVALID", "items must be an array.")]
    out: list[dict[str, str]] = []
    for j, item in enumerate(items):
        ip = f"{pp}[{j}]"
        if not isinstance(item, dict):
            out.append(message(ip, "VALUE_INVALID", "Each item must be an object."))
            continue
        if not item.get("item_id") and not item.get("item_name"):
            out.append(message(ip, "VALUE_REQUIRED", "One of item_id or item_name is required."))
        custom = [k for k in item if k not in STANDARD_ITEM_PARAMS]
        if len(custom) > MAX_ITEM_CUSTOM_PARAMS:
            out.append(
                message(
                    ip,
                    "EXCEEDED_MAX_ENTITIES",
                    f"An item can have at most {MAX_ITEM_CUSTOM_PARAMS} custom params.",
                )
            )
        for key, value in item.items():
            problem = _name_problem(key, "Item parameter", reserved=RESERVED_PARAMS)
            if problem:
                out.append(message(f"{ip}.{key}", problem[0], problem[1]))
            else:
                out.extend(_value_messages(f"{ip}.{key}", key, value))
    return out


def _timestamp_messages(fp: str, value: Any, now_us: int, enforce: bool) -> list[dict[str, str]]:
    if value is None:
        return []
    if isinstance(value, bool) or not isinstance(value, int):
        return [message(fp, "VALUE_INVALID", "timestamp_micros must be an integer.")]
    if value < 10**15:
        return [
            message(
                fp,
                "VALUE_INVALID",
                "timestamp_micros must be microseconds since the epoch (16 digits).",
            )
        ]
    if enforce and now_us - value > BACKDATE_LIMIT_US:
        return [message(fp, "VALUE_OUT_OF_BOUNDS", "Timestamp is more than 72 hours in the past.")]
    if enforce and value - now_us > 60_000_000:
        return [message(fp, "VALUE_OUT_OF_BOUNDS", "Timestamp is in the future.")]
    return []


def _user_property_messages(props: Any) -> list[dict[str, str]]:
    if props is None:
        return []
    if not isinstance(props, dict):
        return [message("user_properties", "VALUE_INVALID", "user_properties must be an object.")]
    out: list[dict[str, str]] = []
    if len(props) > MAX_USER_PROPERTIES:
        out.append(
            message(
                "user_properties",
                "EXCEEDED_MAX_ENTITIES",
                f"At most {MAX_USER_PROPERTIES} user properties.",
            )
        )
    for name, prop in props.items():
        fp = f"user_properties.{name}"
        problem = _name_problem(name, "User property", reserved=RESERVED_USER_PROPERTIES)
        if problem is None and len(name) > MAX_USER_PROPERTY_NAME:
            problem = ("NAME_INVALID", "User property names are at most 24 characters.")
        if problem:
            out.append(message(fp, problem[0], problem[1]))
            continue
        if not isinstance(prop, dict) or "value" not in prop:
            out.append(message(fp, "VALUE_INVALID", 'User properties are {"value": ...}.'))
            continue
        value = prop["value"]
        if isinstance(value, str) and len(value) > MAX_USER_PROPERTY_VALUE:
            out.append(
                message(
                    fp, "VALUE_OUT_OF_BOUNDS", "User property values are at most 36 characters."
                )
            )
    return out


def _user_data_messages(user_data: Any) -> list[dict[str, str]]:
    if user_data is None:
        return []
    if not isinstance(user_data, dict):
        return [message("user_data", "VALUE_INVALID", "user_data must be an object.")]
    out: list[dict[str, str]] = []
    for key in ("sha256_email_address", "sha256_phone_number"):
        values = user_data.get(key)
        if values is None:
            continue
        values = values if isinstance(values, list) else [values]
        for j, v in enumerate(values):
            if not isinstance(v, str) or not SHA256_HEX_RE.match(v):
                out.append(
                    message(
                        f"user_data.{key}[{j}]",
                        "VALUE_INVALID",
                        "Expected a hex-encoded SHA-256 hash.",
                    )
                )
    return out


def _consent_messages(consent: Any) -> list[dict[str, str]]:
    if consent is None:
        return []
    if not isinstance(consent, dict):
        return [message("consent", "VALUE_INVALID", "consent must be an object.")]
    out = []
    for key, value in consent.items():
        if key not in ("ad_user_data", "ad_personalization"):
            out.append(message(f"consent.{key}", "VALUE_INVALID", f"Unknown consent [{key}]."))
        elif value not in CONSENT_VALUES:
            out.append(message(f"consent.{key}", "VALUE_INVALID", "Use GRANTED or DENIED."))
    return out


def _without_ignored(
    event: dict[str, Any], msgs: list[dict[str, str]], enforce: bool
) -> dict[str, Any]:
    """The event as GA keeps it: offending parameters removed, at most 25 parameters."""
    codes = _ENFORCE_IGNORED if enforce else _RELAXED_IGNORED
    bad = {
        m["fieldPath"].split(".params.", 1)[1].split(".", 1)[0].split("[", 1)[0]
        for m in msgs
        if ".params." in m["fieldPath"] and m["validationCode"] in codes
    }
    params = {k: v for k, v in (event.get("params") or {}).items() if k not in bad}
    if len(params) > MAX_PARAMS:
        bad |= set(list(params)[MAX_PARAMS:])
        params = dict(list(params.items())[:MAX_PARAMS])
    if not bad:
        return event
    return {**event, "params": params, "ignored_params": sorted(bad)}
