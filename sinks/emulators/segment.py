"""Segment HTTP Tracking API emulator (destinations.md §1).

Reproduces what makes Segment tricky to deliver to: success is *exactly* 200
(analytics-python 2.3.x treats any other 2xx as an error), the only 4xx are 400
for size and JSON problems (body ``{"code", "message"}`` as the SDKs expect),
and everything semantically wrong — no user/anonymous id, ``track`` without
``event``, duplicate ``messageId`` (global, 24 h), batches over 2,500 events,
unknown write keys — is answered 200 and silently dropped. The drops are kept in
the state (``GET /__emulator/state`` → ``dropped``), standing in for Segment's
debugger.

An unknown write key is answered 200 and dropped by default (reported for other
Segment SDKs, e.g. segmentio/analytics-go#165; Segment documents no status for
it). ``strict_auth=True`` answers 401 instead.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from collections.abc import Iterable
from typing import Any, ClassVar

import orjson
from aiohttp import web

from sinks.emulators.base import BodyError, Emulator, json_response, parse_json, read_body

CALL_TYPES = ("identify", "track", "page", "screen", "group", "alias")
MAX_SINGLE_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_EVENTS = 2500


class SegmentEmulator(Emulator):
    name: ClassVar[str] = "segment"

    def __init__(
        self,
        *,
        write_keys: Iterable[str] = ("emulator-write-key",),
        strict_auth: bool = False,
        oauth_tokens: Iterable[str] | None = None,
        forbid_raw_email: bool = False,
        dedupe_window_s: float = 24 * 3600.0,
    ) -> None:
        super().__init__(forbid_raw_email=forbid_raw_email, dedupe_window_s=dedupe_window_s)
        self.write_keys = frozenset(write_keys)
        self.strict_auth = strict_auth
        self.oauth_tokens = frozenset(oauth_tokens) if oauth_tokens is not None else None

    def credentials(self) -> dict[str, str]:
        return {"write_key": sorted(self.write_keys)[0]} if self.write_keys else {}

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/batch", self._h_batch)
        router.add_post("/v1/import", self._h_batch)
        for call in CALL_TYPES:
            router.add_post(f"/v1/{call}", self._h_single)

    def error_response(
        self, status: int, *, retry_after_s: float | None = None, body: Any = None
    ) -> web.Response:
        headers = self.retry_headers(retry_after_s)
        if status == 429 and retry_after_s is not None:
            headers["X-RateLimit-Reset"] = str(max(0, round(retry_after_s)))
        code = {429: "rate_limited", 401: "unauthorized"}.get(status, "server_error")
        payload = body if body is not None else {"code": code, "message": f"HTTP {status}"}
        return json_response(payload, status, headers)

    # ------------------------------------------------------------------ handlers

    def _error(self, path: str, status: int, code: str, message: str) -> web.Response:
        self.state.reject_request(path, status, code, message)
        return json_response({"code": code, "message": message}, status)

    async def _read(self, request: web.Request, limit: int) -> dict[str, Any] | web.Response:
        try:
            body = await read_body(request)
        except BodyError as exc:
            return self._error(request.path, 400, exc.reason, exc.message)
        if len(body) > limit:
            return self._error(
                request.path, 400, "payload_too_large", f"body exceeds {limit // 1024} KB"
            )
        try:
            payload = parse_json(body)
        except BodyError as exc:
            return self._error(request.path, 400, exc.reason, exc.message)
        if not isinstance(payload, dict):
            return self._error(request.path, 400, "invalid_request", "body must be a JSON object")
        return payload

    def _write_key(self, request: web.Request, payload: dict[str, Any]) -> str | None:
        """The key by any of the three schemes in §1.2; None when no scheme yields one."""
        auth = request.headers.get("Authorization", "")
        body_key = payload.get("writeKey") if isinstance(payload.get("writeKey"), str) else None
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "basic" and value:
            try:
                user = base64.b64decode(value.strip(), validate=True).decode().split(":", 1)[0]
            except (binascii.Error, UnicodeDecodeError):
                user = ""
            if user:
                return user
        if scheme.lower() == "bearer" and value:
            if self.oauth_tokens is not None and value.strip() not in self.oauth_tokens:
                return None
            return body_key
        return body_key

    def _authorised(
        self, request: web.Request, payload: dict[str, Any]
    ) -> tuple[bool, web.Response | None]:
        key = self._write_key(request, payload)
        if key is not None and key in self.write_keys:
            return True, None
        if self.strict_auth:
            return False, self._error(request.path, 401, "unauthorized", "invalid write key")
        return False, None

    async def _h_single(self, request: web.Request) -> web.Response:
        payload = await self._read(request, MAX_SINGLE_BYTES)
        if isinstance(payload, web.Response):
            return payload
        call = request.path.rsplit("/", 1)[-1]
        ok, refusal = self._authorised(request, payload)
        if refusal is not None:
            return refusal
        self.check_pii(request.path, payload)
        message = {k: v for k, v in payload.items() if k != "writeKey"}
        message.setdefault("type", call)
        if not ok:
            self.state.drop(request.path, "invalid_write_key", item=message)
        else:
            self._ingest(request.path, message, index=0)
        return json_response({"success": True})

    async def _h_batch(self, request: web.Request) -> web.Response:
        payload = await self._read(request, MAX_BATCH_BYTES)
        if isinstance(payload, web.Response):
            return payload
        batch = payload.get("batch")
        if not isinstance(batch, list):
            return self._error(request.path, 400, "invalid_request", "batch must be an array")
        for i, message in enumerate(batch):
            if len(orjson.dumps(message)) > MAX_EVENT_BYTES:
                return self._error(
                    request.path, 400, "payload_too_large", f"event {i} exceeds 32 KB"
                )
        ok, refusal = self._authorised(request, payload)
        if refusal is not None:
            return refusal
        self.check_pii(request.path, {k: v for k, v in payload.items() if k != "writeKey"})
        if not ok:
            for m in batch:
                self.state.drop(request.path, "invalid_write_key", item=m)
            return json_response({"success": True})
        if len(batch) > MAX_BATCH_EVENTS:
            for m in batch:
                self.state.drop(
                    request.path, "batch_too_large", f"{len(batch)} > {MAX_BATCH_EVENTS}", item=m
                )
            return json_response({"success": True})
        shared_context = payload.get("context") if isinstance(payload.get("context"), dict) else {}
        shared_integrations = (
            payload.get("integrations") if isinstance(payload.get("integrations"), dict) else {}
        )
        for i, message in enumerate(batch):
            if not isinstance(message, dict):
                self.state.drop(request.path, "invalid_message", "not an object", item=message)
                continue
            merged = dict(message)
            if shared_context:
                merged["context"] = {**shared_context, **(message.get("context") or {})}
            if shared_integrations:
                merged["integrations"] = {
                    **shared_integrations,
                    **(message.get("integrations") or {}),
                }
            if "sentAt" in payload and "sentAt" not in merged:
                merged["sentAt"] = payload["sentAt"]
            self._ingest(request.path, merged, index=i)
        return json_response({"success": True})

    def _ingest(self, path: str, message: dict[str, Any], *, index: int) -> None:
        """Apply Segment's silent-drop rules to one message, then keep it."""
        mtype = message.get("type")
        message_id = message.get("messageId")
        reason = _drop_reason(message)
        if reason is not None:
            self.state.drop(path, reason, item=message, key=str(message_id or ""))
            return
        if not message_id:
            message_id = str(uuid.uuid4())  # server-assigned: cannot be deduped on retry
            message["messageId"] = message_id
        if self.state.dedupe.seen(str(message_id), time.time()):
            self.state.count("duplicates_dropped")
            self.state.drop(path, "duplicate_message_id", item=message, key=str(message_id))
            return
        message.setdefault("receivedAt", _now_iso())
        self.state.accept(message, path=path, key=str(message_id), duplicate=False)
        self.state.count(f"type_{mtype}")


def _drop_reason(message: dict[str, Any]) -> str | None:
    mtype = message.get("type")
    if mtype not in CALL_TYPES:
        return "invalid_type"
    if mtype == "alias":
        if not message.get("previousId") or not message.get("userId"):
            return "missing_alias_ids"
        return None
    if not message.get("userId") and not message.get("anonymousId"):
        return "no_user_anon_id"
    if mtype == "track" and not message.get("event"):
        return "missing_event"
    if mtype == "group" and not message.get("groupId"):
        return "missing_group_id"
    return None


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
