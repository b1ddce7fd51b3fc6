"""LinkedIn DMP segment users emulator: ``POST /rest/dmpSegments/{id}/users`` (§6).

What it enforces (destinations.md §6.7):

1. ``Authorization: Bearer <token>`` with a known token (else 401);
   ``LinkedIn-Version`` present (else 400 ``VERSION_MISSING``), ``YYYYMM`` and in
   ``supported_versions`` (else 426 ``NONEXISTENT_VERSION``; both codes are
   unconfirmed); ``X-Restli-Protocol-Version: 2.0.0`` and ``X-RestLi-Method:
   BATCH_CREATE`` (else 400).
2. ``elements`` non-empty and at most ``max_elements`` (5,000, configurable) —
   else 400 for the request. Each element needs ``action`` ADD/REMOVE and at
   least one ``userIds`` entry of a known ``idType``; otherwise that element gets
   ``{"status": 400}`` while the request stays 200.
3. ``SHA256_EMAIL`` must be 64 lowercase hex, ``SHA512_EMAIL`` 128: anything else
   is raw PII — recorded in ``state.pii_violations`` and answered 400 for the
   element. The hash of an empty string is refused too (no address hashes to it;
   an emulator choice that gives tests a realistic per-element refusal).
   Unhashed match hints (``firstName``, ``lastName``, ``company``, ``title``) are
   recorded as PII violations: this pipeline promises never to send them.
4. Unknown segment → 404; a segment created less than ``ready_after_s`` (5 s) ago
   → 404 (retryable: LinkedIn asks to wait).
5. More than ``requests_per_minute`` (600) requests in a sliding minute for one
   token → 429 *without* ``Retry-After`` (LinkedIn publishes none). Injected
   ``throttle`` faults answer 429 without it as well.

State: ``members(segment_id)`` is the current membership as a set of rows (the
sorted ``(idType, idValue)`` pairs of an element); accepted elements are in
``state.accepted`` with key ``segment|action|row``.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, ClassVar

import orjson
from aiohttp import web

from sinks.emulators.base import BodyError, Emulator, json_response, parse_json, read_body

DEFAULT_TOKEN = "emulator-linkedin-access-token"  # noqa: S105 - the emulator's fake credential
MAX_ELEMENTS = 5000
HEX64 = re.compile(r"^[0-9a-f]{64}$")
HEX128 = re.compile(r"^[0-9a-f]{128}$")
GOOGLE_AID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
VERSION_RE = re.compile(r"^\d{6}$")
HINTS = ("firstName", "lastName", "title", "company")

Row = tuple[tuple[str, str], ...]


def _default_versions() -> set[str]:
    """Versions live for at least a year: the last 12 months up to next month."""
    now = time.gmtime()
    year, month = now.tm_year, now.tm_mon + 1
    out: set[str] = set()
    for _ in range(14):
        if month == 0:
            year, month = year - 1, 12
        out.add(f"{year}{month:02d}")
        month -= 1
    return out | {"202604"}


def li_error(status: int, code: str, message: str) -> dict[str, Any]:
    return {"status": status, "serviceErrorCode": 100, "code": code, "message": message}


class LinkedInEmulator(Emulator):
    name: ClassVar[str] = "linkedin"

    def __init__(
        self,
        *,
        access_tokens: Iterable[str] = (DEFAULT_TOKEN,),
        supported_versions: Iterable[str] | None = None,
        segments: Iterable[str] | None = None,
        max_elements: int = MAX_ELEMENTS,
        requests_per_minute: int = 600,
        ready_after_s: float = 5.0,
        rate_window_s: float = 60.0,
    ) -> None:
        super().__init__()
        self.access_tokens = set(access_tokens)
        self.supported_versions = (
            set(supported_versions) if supported_versions else _default_versions()
        )
        #: segment id -> monotonic creation time; None = any numeric id exists (and is ready).
        self.segments: dict[str, float] | None = (
            {s: float("-inf") for s in segments} if segments is not None else None
        )
        self.max_elements = max_elements
        self.requests_per_minute = requests_per_minute
        self.ready_after_s = ready_after_s
        #: The sliding window of the request budget (60 s; shorter in tests).
        self.rate_window_s = rate_window_s
        self._members: dict[str, set[Row]] = {}
        self._calls: dict[str, deque[float]] = {}

    def credentials(self) -> dict[str, str]:
        return {"access_token": next(iter(sorted(self.access_tokens)), "")}

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/rest/dmpSegments/{segment_id}/users", self._h_users)

    def reset(self) -> None:
        super().reset()
        self._members.clear()
        self._calls.clear()

    def create_segment(self, segment_id: str) -> None:
        """A segment created now: 404 for ``ready_after_s``, as LinkedIn's fresh segments."""
        if self.segments is None:
            self.segments = {}
        self.segments[segment_id] = time.monotonic()

    def members(self, segment_id: str) -> set[Row]:
        return set(self._members.get(segment_id, set()))

    def error_response(
        self, status: int, *, retry_after_s: float | None = None, body: Any = None
    ) -> web.Response:
        if body is None:
            code = {429: "TOO_MANY_REQUESTS", 401: "UNAUTHORIZED", 403: "ACCESS_DENIED"}.get(
                status, "SERVER_ERROR" if status >= 500 else "BAD_REQUEST"
            )
            body = li_error(status, code, f"injected {code.lower()}")
        # No Retry-After: LinkedIn documents no rate-limit headers.
        return json_response(body, status)

    def _fail(self, path: str, status: int, code: str, message: str) -> web.Response:
        self.state.reject_request(path, status, code, message)
        return json_response(li_error(status, code, message), status)

    async def _h_users(self, request: web.Request) -> web.Response:
        path = request.path
        headers = request.headers
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or token not in self.access_tokens:
            await request.read()
            return self._fail(path, 401, "UNAUTHORIZED", "Invalid access token")
        version = headers.get("LinkedIn-Version")
        if not version:
            await request.read()
            return self._fail(path, 400, "VERSION_MISSING", "A version must be present")
        if not VERSION_RE.match(version) or version not in self.supported_versions:
            await request.read()
            return self._fail(
                path, 426, "NONEXISTENT_VERSION", f"Requested version {version[:12]} is not active"
            )
        if headers.get("X-Restli-Protocol-Version") != "2.0.0":
            await request.read()
            return self._fail(path, 400, "BAD_REQUEST", "X-Restli-Protocol-Version must be 2.0.0")
        if headers.get("X-RestLi-Method", "").upper() != "BATCH_CREATE":
            await request.read()
            return self._fail(path, 400, "BAD_REQUEST", "X-RestLi-Method must be BATCH_CREATE")
        if self._over_rate(token):
            await request.read()
            self.state.reject_request(path, 429, "TOO_MANY_REQUESTS", "rate limit")
            return json_response(li_error(429, "TOO_MANY_REQUESTS", "Too many requests"), 429)
        segment = request.match_info["segment_id"]
        if not self._ready(segment):
            await request.read()
            return self._fail(path, 404, "NOT_FOUND", f"DMP segment {segment[:30]} not found")
        try:
            body = parse_json(await read_body(request))
        except BodyError as exc:
            return self._fail(path, 400, "BAD_REQUEST", exc.message)
        elements = body.get("elements") if isinstance(body, dict) else None
        if not isinstance(elements, list) or not elements:
            return self._fail(path, 400, "BAD_REQUEST", "elements must be a non-empty array")
        if len(elements) > self.max_elements:
            return self._fail(
                path, 400, "BAD_REQUEST", f"{len(elements)} elements; at most {self.max_elements}"
            )
        results: list[dict[str, Any]] = []
        members = self._members.setdefault(segment, set())
        for index, element in enumerate(elements):
            problem, row, action = self._check(path, index, element)
            if problem is not None:
                self.state.reject_item(path, index, "INVALID_ELEMENT", problem)
                results.append({"status": 400, "message": problem})
                continue
            if action == "ADD":
                members.add(row)
            else:
                members.discard(row)
            self.state.accept(
                {"segment": segment, "action": action, "row": [list(p) for p in row]},
                path=path,
                key=f"{segment}|{action}|{orjson.dumps(row).decode()}",
            )
            results.append({"status": 201})
        return json_response({"elements": results})

    def _over_rate(self, token: str) -> bool:
        now = time.monotonic()
        calls = self._calls.setdefault(token, deque())
        while calls and now - calls[0] >= self.rate_window_s:
            calls.popleft()
        if len(calls) >= self.requests_per_minute:
            return True
        calls.append(now)
        return False

    def _ready(self, segment: str) -> bool:
        if self.segments is None:
            return segment.isdigit()
        created = self.segments.get(segment)
        return created is not None and time.monotonic() - created >= self.ready_after_s

    def _check(self, path: str, index: int, element: Any) -> tuple[str | None, Row, str]:
        if not isinstance(element, dict):
            return "each element must be an object", (), ""
        hints = [h for h in HINTS if element.get(h)]
        if hints:
            self.state.record_pii(
                path, [(f"elements[{index}].{h}", "unhashed_hint") for h in hints]
            )
        action = element.get("action")
        if action not in ("ADD", "REMOVE"):
            return "action must be ADD or REMOVE", (), ""
        ids = element.get("userIds")
        if not isinstance(ids, list) or not ids:
            return "userIds must have at least one entry", (), str(action)
        pairs: list[tuple[str, str]] = []
        for uid in ids:
            id_type = uid.get("idType") if isinstance(uid, dict) else None
            value = uid.get("idValue") if isinstance(uid, dict) else None
            if not isinstance(value, str):
                return "idValue must be a string", (), str(action)
            if id_type == "SHA256_EMAIL":
                if not HEX64.match(value):
                    self.state.record_pii(path, [(f"elements[{index}].userIds", "not_hashed")])
                    return "SHA256_EMAIL must be 64 lowercase hex", (), str(action)
                if value == EMPTY_SHA256:
                    return "SHA256_EMAIL is the hash of an empty string", (), str(action)
            elif id_type == "SHA512_EMAIL":
                if not HEX128.match(value):
                    self.state.record_pii(path, [(f"elements[{index}].userIds", "not_hashed")])
                    return "SHA512_EMAIL must be 128 lowercase hex", (), str(action)
            elif id_type == "GOOGLE_AID":
                if not GOOGLE_AID.match(value.lower()):
                    return "GOOGLE_AID must be a UUID", (), str(action)
            else:
                return f"unknown idType {str(id_type)[:20]}", (), str(action)
            pairs.append((id_type, value))
        return None, tuple(sorted(pairs)), str(action)
