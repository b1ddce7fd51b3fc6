"""Mixpanel ingestion emulator: ``/import`` and ``/track`` (destinations.md §7).

``/import`` is the server-side path: HTTP Basic with a service account (and the
``project_id`` query parameter) or the project token as user name. With
``strict=1`` (the default here, as in the OpenAPI spec) each event is validated
and a batch with failures answers **400 with partial success**: the valid events
*are* imported and ``failed_records`` lists the others by index. That is the
contract a destination must get right — resend nothing that was imported.

Limits: 2,000 events per request (more → 400; Mixpanel documents no status for
it), 10 MB uncompressed body (current docs; the 413 example and OpenAPI still say
2 MB — pass ``max_body_bytes=2_097_152`` to model that), events < 1 MB, < 255
properties. Dedupe key (``event``, ``distinct_id``, ``time``, ``$insert_id``) with
the most recent copy winning, as in queries (``state.unique_items()``).

``failed_records`` entries carry both ``insert_id`` (current docs and OpenAPI)
and ``$insert_id`` (older prose example) so either reading works.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import parse_qs

import orjson
from aiohttp import web

from sinks.emulators.base import BodyError, Emulator, json_response, parse_json, read_body

# The id rules are a published fact of the API, stated once (sinks.mixpanel cites the source).
from sinks.mixpanel import FORBIDDEN_IDS, INSERT_ID_RE

#: Fake credential of the emulator, never a real one.
DEFAULT_PROJECT_TOKEN = "emulator-project-token"  # noqa: S105
MAX_EVENTS = 2000
MAX_EVENT_BYTES = 1024 * 1024
MAX_PROPERTIES = 255
MAX_STRING = 255
MIN_TIME_S = 31_536_000  # 1971-01-01T00:00:00Z
FUTURE_SLACK_S = 3600
TRACK_MAX_AGE_S = 5 * 24 * 3600


class MixpanelEmulator(Emulator):
    name: ClassVar[str] = "mixpanel"

    def __init__(
        self,
        *,
        project_token: str = DEFAULT_PROJECT_TOKEN,
        project_id: str = "1000001",
        service_accounts: Mapping[str, str] | None = None,
        max_body_bytes: int = 10 * 1024 * 1024,
        max_events: int = MAX_EVENTS,
        forbid_raw_email: bool = False,
    ) -> None:
        super().__init__(forbid_raw_email=forbid_raw_email)
        self.project_token = project_token
        self.project_id = project_id
        self.service_accounts = dict(
            service_accounts
            if service_accounts is not None
            else {"emulator-sa.mp-service-account": "emulator-sa-secret"}
        )
        self.max_body_bytes = max_body_bytes
        self.max_events = max_events

    def credentials(self) -> dict[str, str]:
        creds = {"project_token": self.project_token, "project_id": self.project_id}
        if self.service_accounts:
            user, secret = next(iter(self.service_accounts.items()))
            creds |= {"service_account_username": user, "service_account_secret": secret}
        return creds

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/import", self._h_import)
        router.add_post("/track", self._h_track)

    def error_response(
        self, status: int, *, retry_after_s: float | None = None, body: Any = None
    ) -> web.Response:
        if body is None:
            body = _error_body(status, _DEFAULT_ERRORS.get(status, f"HTTP {status}"))
        return json_response(body, status, self.retry_headers(retry_after_s))

    # ------------------------------------------------------------------ /import

    def _fail(self, path: str, status: int, message: str, **extra: Any) -> web.Response:
        self.state.reject_request(path, status, _STATUS_TEXT.get(status, str(status)), message)
        return json_response(_error_body(status, message) | extra, status)

    def _auth(self, request: web.Request) -> str | None:
        """None when authorised, else the 401 message."""
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic" or not value:
            return "Invalid credentials"
        try:
            user, _, secret = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return "Invalid credentials"
        if user == self.project_token and secret == "":
            project = request.query.get("project_id")
            return None if project in (None, self.project_id) else "Invalid credentials"
        if user in self.service_accounts and self.service_accounts[user] == secret:
            if "project_id" not in request.query:
                return "project_id is required when authenticating with a service account"
            if request.query["project_id"] != self.project_id:
                return "Invalid credentials"
            return None
        return "Invalid credentials"

    async def _h_import(self, request: web.Request) -> web.Response:
        path = request.path
        auth_error = self._auth(request)
        if auth_error is not None:
            await request.read()
            return self._fail(path, 401, auth_error)
        try:
            body = await read_body(request)
        except BodyError as exc:
            return self._fail(path, 400, exc.message, num_records_imported=0)
        if len(body) > self.max_body_bytes:
            return self._fail(
                path, 413, f"request exceeds max limit of {self.max_body_bytes} bytes"
            )
        try:
            events = _decode_events(body, request.headers.get("Content-Type", ""))
        except BodyError as exc:
            return self._fail(path, 400, exc.message, num_records_imported=0)
        if len(events) > self.max_events:
            return self._fail(
                path,
                400,
                f"batch contains {len(events)} events; the limit is {self.max_events}",
                num_records_imported=0,
            )
        self.check_pii(path, events)
        strict = request.query.get("strict", "1") != "0"
        now = time.time()
        failed: list[dict[str, Any]] = []
        imported = 0
        for index, event in enumerate(events):
            problem = _validate(event, now) if strict else _minimal(event)
            if problem is not None:
                field, message = problem
                insert_id = _insert_id(event)
                failed.append(
                    {
                        "index": index,
                        "insert_id": insert_id,
                        "$insert_id": insert_id,
                        "field": field,
                        "message": message,
                    }
                )
                self.state.reject_item(path, index, field, message, key=insert_id or None)
                continue
            stored = _stored_copy(event)
            self.state.accept(stored, path=path, key=_dedupe_key(stored))
            imported += 1
        if failed:
            return json_response(
                {
                    "code": 400,
                    "error": "some data points in the request failed validation",
                    "status": "Bad Request",
                    "num_records_imported": imported,
                    "failed_records": failed,
                },
                400,
            )
        return json_response({"code": 200, "num_records_imported": imported, "status": "OK"})

    # ------------------------------------------------------------------ /track

    async def _h_track(self, request: web.Request) -> web.Response:
        """``/track``: token per event, last 5 days only, ``1``/``0`` plain text."""
        path = request.path
        try:
            body = await read_body(request)
            ctype = request.headers.get("Content-Type", "")
            if "x-www-form-urlencoded" in ctype:
                data = parse_qs(body.decode()).get("data", [""])[0]
                try:
                    body = base64.b64decode(data, validate=True)
                except binascii.Error:
                    body = data.encode()
            events = _decode_events(body, ctype)
        except (BodyError, UnicodeDecodeError):
            self.state.reject_request(path, 200, "invalid_json", "body is not JSON")
            return self._track_answer(request, False, "data, missing or empty")
        if len(body) > self.max_body_bytes:
            return self._fail(
                path, 413, f"request exceeds max limit of {self.max_body_bytes} bytes"
            )
        self.check_pii(path, events)
        now = time.time()
        any_valid = False
        for index, event in enumerate(events):
            props = event.get("properties") if isinstance(event, dict) else None
            if not isinstance(props, dict) or props.get("token") != self.project_token:
                self.state.drop(path, "invalid_token", item=event)
                continue
            problem = _minimal(event)
            if problem is None and "time" in props:
                t = _seconds(props["time"])
                if t is None or t < now - TRACK_MAX_AGE_S:
                    problem = ("properties.time", "events older than 5 days are not accepted")
            if problem is not None:
                self.state.drop(path, problem[0], problem[1], item=event)
                continue
            stored = _stored_copy(event)
            stored["properties"].setdefault("time", int(now))
            stored["properties"].setdefault("$insert_id", f"gen-{index}-{now}")
            self.state.accept(stored, path=path, key=_dedupe_key(stored))
            any_valid = True
        return self._track_answer(request, any_valid, None if any_valid else "no valid events")

    @staticmethod
    def _track_answer(request: web.Request, ok: bool, error: str | None) -> web.Response:
        if request.query.get("verbose") == "1":
            return json_response({"status": 1 if ok else 0, "error": error})
        return web.Response(text="1" if ok else "0", content_type="text/plain")


# ---------------------------------------------------------------------- helpers

_STATUS_TEXT = {
    400: "Bad Request",
    401: "Unauthorized",
    413: "Request Entity Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
_DEFAULT_ERRORS = {
    429: "Project exceeded rate limits. Please retry the request with exponential backoff.",
    503: "service unavailable",
    502: "bad gateway",
}


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"code": status, "error": message, "status": _STATUS_TEXT.get(status, str(status))}


def _decode_events(body: bytes, content_type: str) -> list[Any]:
    text = body.strip()
    if not text:
        raise BodyError("invalid_json", "request body is empty")
    if "ndjson" in content_type or (text[:1] == b"{" and b"\n" in text):
        try:
            return [orjson.loads(line) for line in text.splitlines() if line.strip()]
        except orjson.JSONDecodeError as exc:
            raise BodyError("invalid_json", "invalid ndjson") from exc
    value = parse_json(text)
    if isinstance(value, dict):
        return [value]
    if not isinstance(value, list):
        raise BodyError("invalid_json", "body must be a JSON array of events")
    return value


def _insert_id(event: Any) -> str:
    if isinstance(event, dict) and isinstance(event.get("properties"), dict):
        value = event["properties"].get("$insert_id")
        return value if isinstance(value, str) else ""
    return ""


def _seconds(value: Any) -> float | None:
    """Mixpanel accepts seconds or milliseconds; tell them apart by magnitude."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value / 1000.0 if value > 100_000_000_000 else float(value)


def _minimal(event: Any) -> tuple[str, str] | None:
    if not isinstance(event, dict):
        return ("event", "each event must be a JSON object")
    if not isinstance(event.get("event"), str) or not event["event"]:
        return ("event", "'event' must be a non-empty string")
    if not isinstance(event.get("properties"), dict):
        return ("properties", "'properties' must be an object")
    return None


def _validate(event: Any, now: float) -> tuple[str, str] | None:
    """The ``strict=1`` per-event checks (§7.2/§7.3): first failure wins."""
    problem = _minimal(event)
    if problem is not None:
        return problem
    props: dict[str, Any] = event["properties"]
    if len(orjson.dumps(event)) >= MAX_EVENT_BYTES:
        return ("event", "event must be smaller than 1MB of uncompressed JSON")
    if "time" not in props:
        return ("properties.time", "'properties.time' is required")
    t = _seconds(props["time"])
    if t is None:
        return ("properties.time", "'properties.time' is invalid: must be seconds since epoch")
    if t < MIN_TIME_S:
        return ("properties.time", "'properties.time' is before 1971-01-01")
    if t > now + FUTURE_SLACK_S:
        return ("properties.time", "'properties.time' is more than 1 hour in the future")
    distinct = props.get("distinct_id")
    if not isinstance(distinct, str):
        return ("properties.distinct_id", "'properties.distinct_id' must be a string")
    if distinct.strip().lower() in FORBIDDEN_IDS:
        return ("properties.distinct_id", "'properties.distinct_id' is a forbidden value")
    insert_id = props.get("$insert_id")
    if not isinstance(insert_id, str) or not insert_id:
        return ("properties.$insert_id", "'properties.$insert_id' is required")
    if not INSERT_ID_RE.match(insert_id) or len(insert_id.encode()) > 36:
        return (
            "properties.$insert_id",
            "'properties.$insert_id' must be at most 36 bytes of [A-Za-z0-9-]",
        )
    if insert_id.lower() in FORBIDDEN_IDS:
        return ("properties.$insert_id", "'properties.$insert_id' is a forbidden value")
    if len(props) >= MAX_PROPERTIES:
        return ("properties", f"events must have fewer than {MAX_PROPERTIES} properties")
    for key, value in props.items():
        if isinstance(value, dict) and len(value) >= MAX_PROPERTIES:
            return (f"properties.{key}", "nested objects must have fewer than 255 keys")
        if isinstance(value, list) and len(value) >= MAX_PROPERTIES:
            return (f"properties.{key}", "arrays must have fewer than 255 elements")
    return None


def _stored_copy(event: dict[str, Any]) -> dict[str, Any]:
    """What Mixpanel keeps: string values truncated to 255 characters (not rejected)."""
    props = {
        k: (v[:MAX_STRING] if isinstance(v, str) and not k.startswith("$insert") else v)
        for k, v in event["properties"].items()
    }
    return {"event": event["event"], "properties": props}


def _dedupe_key(event: dict[str, Any]) -> str | None:
    props = event["properties"]
    insert_id = props.get("$insert_id")
    if not insert_id:
        return None  # generated ids are never deduplicated
    t = _seconds(props.get("time"))
    return orjson.dumps(
        [event["event"], props.get("distinct_id"), int(t * 1000) if t else None, insert_id]
    ).decode()
