"""Adobe Experience Platform streaming ingestion emulator (DCS inlet, destinations.md §2).

``POST /collection/batch/{inletId}`` answers **207 Multi-Status for every
processed batch** with positional ``responses[]``: ``{"xactionId"}`` for an
accepted message, ``{"statusCode": 400, "message": "inletId: [..] imsOrgId: [..]
<why>"}`` for a rejected one. A whole request over 1 MB is 413. Authenticated
inlets (``access_token`` set) answer 401 problem JSON without/with a wrong Bearer
token (``status`` is a *string* in that body, as documented).

What is checked where, as on the real service:

* envelope problems (no header/body, wrong or absent org, unknown dataset,
  dataset/schema mismatch, bad ``contentType``, unknown flow) fail the message
  in the 207 — the destination can see them;
* XDM record problems (``_id`` not a string, ``timestamp`` not a past RFC 3339
  date-time, malformed ``identityMap``, fields outside the configured schema)
  are *asynchronous* on the batch endpoint: the message gets its ``xactionId``
  and the failure only shows up later in the data lake. Here they land in
  ``state.dropped`` with reason ``async_validation``.
  ``strict_batch_validation=True`` reports them in the 207 instead.
* ``POST /collection/{inletId}?syncValidation=true`` validates synchronously and
  answers 400 with the ``_streamingValidation`` report (at most 5 violations).

Repeated ``_id`` values are accepted (DCS documents no rejection) but counted
per (``datasetId``, ``_id``) in ``state`` (``duplicates``).

PII hook: ``Email_LC_SHA256`` identities must be 64 lowercase hex, and with
``forbid_raw_email`` (default on: our pipeline promises never to send raw
email to Adobe) any email address anywhere in a message is recorded.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, ClassVar

import orjson
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

#: Fake credential of the emulator, never a real one.
DEFAULT_ACCESS_TOKEN = "emulator-ims-token"  # noqa: S105
MAX_REQUEST_BYTES = 1_000_000
MAX_RECORD_BYTES = 1_000_000
PROBLEM_AUTH = "https://ns.adobe.com/adobecloud/problem/data-collection-service-authorization"
PROBLEM_INLET = "http://ns.adobe.com/adobecloud/problem/data-collection-service/inlet"
CONTENT_TYPE_RE = re.compile(
    r"^application/vnd\.adobe\.xed(-full)?(-notext)?\+json;version=[\d.]+$"
)
AUTH_STATES = frozenset({"ambiguous", "authenticated", "loggedOut"})
STANDARD_NAMESPACES = frozenset(
    {"ECID", "AAID", "Email", "Phone", "Email_LC_SHA256", "Phone_SHA256", "CRMID", "GAID", "IDFA"}
)
#: Top-level fields of an XDM ExperienceEvent plus the common field groups we use;
#: tenant fields (``_<tenant>``) are always allowed.
DEFAULT_SCHEMA_FIELDS = frozenset(
    {
        "_id",
        "timestamp",
        "eventType",
        "identityMap",
        "web",
        "commerce",
        "productListItems",
        "environment",
        "device",
        "placeContext",
        "marketing",
        "channel",
        "application",
        "search",
        "endUserIDs",
        "dataSource",
        "producedBy",
        "_experience",
    }
)
RFC3339_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")


class AepEmulator(Emulator):
    name: ClassVar[str] = "aep"
    hash_rules: ClassVar[tuple[HashRule, ...]] = (
        HashRule("*identityMap.Email_LC_SHA256[*].id", SHA256_HEX_RE),
        HashRule("*identityMap.Phone_SHA256[*].id", SHA256_HEX_RE),
    )

    def __init__(
        self,
        *,
        inlet_id: str = "emulator-inlet-0001",
        org_id: str = "EMULATOR0000000000000000@AdobeOrg",
        datasets: Mapping[str, str] | None = None,
        access_token: str | None = DEFAULT_ACCESS_TOKEN,
        flow_id: str | None = "emulator-flow-0001",
        identity_namespaces: Iterable[str] = ("SegmentAnonymousId",),
        schema_fields: Iterable[str] | None = None,
        strict_batch_validation: bool = False,
        sync_validation_supported: bool = True,
        invalid_token_status: int = 401,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_record_bytes: int = MAX_RECORD_BYTES,
        forbid_raw_email: bool = True,
    ) -> None:
        super().__init__(forbid_raw_email=forbid_raw_email)
        self.inlet_id = inlet_id
        self.org_id = org_id
        self.datasets = dict(
            datasets
            if datasets is not None
            else {"emulator-dataset-0001": "https://ns.adobe.com/emulator/schemas/experienceevent"}
        )
        self.access_token = access_token
        self.flow_id = flow_id
        self.namespaces = STANDARD_NAMESPACES | frozenset(identity_namespaces)
        self.schema_fields = (
            frozenset(schema_fields) if schema_fields is not None else DEFAULT_SCHEMA_FIELDS
        )
        self.strict_batch_validation = strict_batch_validation
        self.sync_validation_supported = sync_validation_supported
        self.invalid_token_status = invalid_token_status
        self.max_request_bytes = max_request_bytes
        self.max_record_bytes = max_record_bytes
        self._xaction = 0

    def credentials(self) -> dict[str, str]:
        dataset_id, schema_id = next(iter(self.datasets.items()))
        creds = {
            "inlet_id": self.inlet_id,
            "org_id": self.org_id,
            "dataset_id": dataset_id,
            "schema_id": schema_id,
        }
        if self.flow_id:
            creds["flow_id"] = self.flow_id
        if self.access_token:
            creds["access_token"] = self.access_token
        return creds

    def sink_env(self, url: str) -> dict[str, str]:
        env = {"CDP_SINK_AEP_ENDPOINT": url}
        for key, value in self.credentials().items():
            env[f"CDP_SINK_AEP_{key.upper()}"] = value
        return env

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/collection/batch/{inlet}", self._h_batch)
        router.add_post("/collection/{inlet}", self._h_single)

    def error_response(
        self, status: int, *, retry_after_s: float | None = None, body: Any = None
    ) -> web.Response:
        if body is None:
            titles = {429: "Too Many Requests", 500: "Internal Server Error"}
            body = {
                "type": PROBLEM_INLET,
                "status": status,
                "title": titles.get(status, "Service Unavailable"),
                "report": {"message": f"HTTP {status}"},
            }
        return json_response(body, status, self.retry_headers(retry_after_s))

    # ------------------------------------------------------------------ common

    def _prefix(self) -> str:
        return f"inletId: [{self.inlet_id}] imsOrgId: [{self.org_id}]"

    def _problem(self, path: str, status: int, title: str, message: str) -> web.Response:
        self.state.reject_request(path, status, title, message)
        return json_response(
            {
                "type": PROBLEM_INLET,
                "status": status,
                "title": title,
                "report": {"message": f"{self._prefix()} {message}"},
            },
            status,
        )

    async def _precheck(self, request: web.Request) -> Any:
        """Inlet, auth, size and JSON checks shared by both endpoints; a Response on failure."""
        path = request.path
        if request.match_info["inlet"] != self.inlet_id:
            await request.read()
            return self._problem(path, 404, "Not Found", "inlet not found")
        if self.access_token is not None:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                await request.read()
                return self._unauthorised(path, 401, "Ims service token is empty")
            if token.strip() != self.access_token:
                await request.read()
                return self._unauthorised(
                    path, self.invalid_token_status, "Ims service token is invalid or expired"
                )
        try:
            body = await read_body(request)
        except BodyError as exc:
            return self._problem(path, 400, "Bad Request", exc.message)
        if len(body) > self.max_request_bytes:
            return self._problem(
                path, 413, "Payload Too Large", f"request exceeds {self.max_request_bytes} bytes"
            )
        try:
            payload = parse_json(body)
        except BodyError as exc:
            return self._problem(path, 400, "Invalid XDM Message Format", exc.message)
        query_flow = request.headers.get("x-adobe-flow-id") or request.query.get("x-adobe-flow-id")
        if query_flow is not None and self.flow_id is not None and query_flow != self.flow_id:
            return self._problem(path, 400, "Bad Request", "unknown flow id")
        return payload, query_flow

    def _unauthorised(self, path: str, status: int, message: str) -> web.Response:
        self.state.reject_request(path, status, "Authorization", message)
        return json_response(
            {
                "type": PROBLEM_AUTH,
                "status": str(status),
                "title": "Authorization",
                "report": {"message": message},
            },
            status,
        )

    def _envelope_error(self, message: Any, request_flow: str | None) -> str | None:
        """Why DCS refuses a message outright (reported in the 207), or None."""
        if not isinstance(message, dict):
            return "Message has unknown xdm format"
        header, body = message.get("header"), message.get("body")
        if not isinstance(header, dict) or not isinstance(body, dict):
            return "Message has unknown xdm format"
        org = header.get("imsOrgId")
        if org is not None and org != self.org_id:
            return "Message has an absent or wrong ims org in the header"
        schema_ref = header.get("schemaRef")
        if not isinstance(schema_ref, dict) or not isinstance(schema_ref.get("id"), str):
            return "Message has unknown xdm format"
        if not CONTENT_TYPE_RE.match(str(schema_ref.get("contentType", ""))):
            return "Message has unknown xdm format: unsupported schemaRef.contentType"
        meta = body.get("xdmMeta")
        meta_ref = meta.get("schemaRef") if isinstance(meta, dict) else None
        if not isinstance(meta_ref, dict) or meta_ref.get("id") != schema_ref["id"]:
            return "Message has unknown xdm format: xdmMeta.schemaRef does not match the header"
        dataset = header.get("datasetId")
        if dataset not in self.datasets:
            return f"Dataset [{dataset}] not found"
        if self.datasets[dataset] != schema_ref["id"]:
            return f"Dataset [{dataset}] schema does not match the message schema"
        if self.flow_id is not None and request_flow is None:
            flow = header.get("flowId")
            if flow != self.flow_id:
                return "Message has no or an unknown flow id"
        if not isinstance(body.get("xdmEntity"), dict):
            return "Payload body is missing xdmEntity"
        return None

    def _xdm_violations(self, entity: dict[str, Any]) -> list[dict[str, str]]:
        """Schema checks DCS runs (async on the batch path), shaped like its violation report."""
        out: list[dict[str, str]] = []

        def violation(pointer: str, keyword: str, message: str) -> None:
            out.append({"pointerToViolation": pointer, "keyword": keyword, "message": message})

        _id = entity.get("_id")
        if _id is None:
            violation("#", "required", "required key [_id] not found")
        elif not isinstance(_id, str):
            violation("#/_id", "type", f"expected type: String, found: {_json_type(_id)}")
        ts = entity.get("timestamp")
        if ts is None:
            violation("#", "required", "required key [timestamp] not found")
        elif not isinstance(ts, str) or not RFC3339_RE.match(ts):
            violation("#/timestamp", "format", f"[{str(ts)[:40]}] is not a valid date-time")
        else:
            parsed = datetime.fromisoformat(ts.replace("Z", "+00:00"))
            if parsed.timestamp() > time.time() + 60:
                violation("#/timestamp", "format", "timestamp must be in the past")
        event_type = entity.get("eventType")
        if event_type is not None and not isinstance(event_type, str):
            violation("#/eventType", "type", "expected type: String")
        identity_map = entity.get("identityMap")
        if identity_map is not None:
            out.extend(self._identity_violations(identity_map))
        for key in entity:
            if key not in self.schema_fields and not key.startswith("_"):
                violation("#", "additionalProperties", f"extraneous key [{key}] is not permitted")
        return out

    def _identity_violations(self, identity_map: Any) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        if not isinstance(identity_map, dict):
            return [
                {
                    "pointerToViolation": "#/identityMap",
                    "keyword": "type",
                    "message": "expected type: JSONObject",
                }
            ]
        primaries = 0
        for namespace, ids in identity_map.items():
            pointer = f"#/identityMap/{namespace}"
            if namespace not in self.namespaces:
                out.append(
                    {
                        "pointerToViolation": pointer,
                        "keyword": "identityNamespace",
                        "message": f"unknown identity namespace [{namespace}]",
                    }
                )
            if not isinstance(ids, list) or not ids:
                out.append(
                    {
                        "pointerToViolation": pointer,
                        "keyword": "type",
                        "message": "expected a non-empty array",
                    }
                )
                continue
            for i, ident in enumerate(ids):
                p = f"{pointer}/{i}"
                if not isinstance(ident, dict) or not isinstance(ident.get("id"), str):
                    out.append(
                        {
                            "pointerToViolation": f"{p}/id",
                            "keyword": "type",
                            "message": "expected type: String",
                        }
                    )
                    continue
                state = ident.get("authenticatedState", "ambiguous")
                if state not in AUTH_STATES:
                    out.append(
                        {
                            "pointerToViolation": f"{p}/authenticatedState",
                            "keyword": "enum",
                            "message": f"{state} is not a valid enum value",
                        }
                    )
                if ident.get("primary") is True:
                    primaries += 1
        if primaries > 1:
            out.append(
                {
                    "pointerToViolation": "#/identityMap",
                    "keyword": "primary",
                    "message": "at most one primary identity per record",
                }
            )
        return out

    def _next_xaction(self) -> str:
        self._xaction += 1
        return f"{int(time.time() * 1000)}:{self._xaction}:emulator"

    def _store(self, path: str, message: dict[str, Any]) -> str:
        header = message["header"]
        header.setdefault("imsOrgId", self.org_id)
        entity = message["body"]["xdmEntity"]
        key = f"{header.get('datasetId')}/{entity.get('_id')}"
        if self.state.accept(message, path=path, key=key):
            self.state.count("duplicate_ids")
        return self._next_xaction()

    # ------------------------------------------------------------------ handlers

    async def _h_batch(self, request: web.Request) -> web.Response:
        path = request.path
        pre = await self._precheck(request)
        if isinstance(pre, web.Response):
            return pre
        payload, request_flow = pre
        # syncValidation is not supported on the batch endpoint: ignored, as documented.
        messages = payload.get("messages") if isinstance(payload, dict) else None
        if not isinstance(messages, list) or not messages:
            return self._problem(path, 400, "Bad Request", 'body must be {"messages": [...]}')
        self.check_pii(path, messages)
        responses: list[dict[str, Any]] = []
        for index, message in enumerate(messages):
            error = self._envelope_error(message, request_flow)
            if error is None and _size(message) > self.max_record_bytes:
                error = f"Message exceeds the record size limit of {self.max_record_bytes} bytes"
            violations: list[dict[str, str]] = []
            if error is None:
                violations = self._xdm_violations(message["body"]["xdmEntity"])
                if violations and self.strict_batch_validation:
                    error = f"Message is invalid: {violations[0]['message']}"
            if error is not None:
                self.state.reject_item(path, index, "invalid_message", error)
                responses.append({"statusCode": 400, "message": f"{self._prefix()} {error}"})
                continue
            xaction = self._next_xaction()
            if violations:
                # Accepted at the edge, failed later in the data lake: invisible to the sender.
                self.state.drop(
                    path,
                    "async_validation",
                    violations[0]["message"],
                    item=message,
                    key=str(message["body"]["xdmEntity"].get("_id")),
                )
                responses.append({"xactionId": xaction})
                continue
            self._store(path, message)
            responses.append({"xactionId": xaction})
        return json_response(
            {
                "inletId": self.inlet_id,
                "batchId": self._next_xaction(),
                "receivedTimeMs": int(time.time() * 1000),
                "responses": responses,
            },
            207,
        )

    async def _h_single(self, request: web.Request) -> web.Response:
        path = request.path
        sync = (
            request.query.get("syncValidation") or request.query.get("synchronousValidation")
        ) == "true"
        if sync and not self.sync_validation_supported:
            await request.read()
            return self._problem(path, 501, "Not Implemented", "sync validation unsupported here")
        pre = await self._precheck(request)
        if isinstance(pre, web.Response):
            return pre
        message, request_flow = pre
        self.check_pii(path, message)
        error = self._envelope_error(message, request_flow)
        if error is None and _size(message) > self.max_record_bytes:
            error = f"Message exceeds the record size limit of {self.max_record_bytes} bytes"
        if error is not None:
            return self._problem(path, 400, "Invalid XDM Message Format", error)
        violations = self._xdm_violations(message["body"]["xdmEntity"])
        if violations and sync:
            shown = violations[:5]  # DCS stops after 5 violations
            self.state.reject_request(path, 400, "Invalid XDM Message Format", shown[0]["message"])
            return json_response(
                {
                    "type": PROBLEM_INLET,
                    "status": 400,
                    "title": "Invalid XDM Message Format",
                    "report": {
                        "message": f"{self._prefix()} Message is invalid",
                        "cause": {
                            "_streamingValidation": [
                                {
                                    "schemaLocation": "#",
                                    "pointerToViolation": "#",
                                    "message": f"{len(shown)} schema violations found",
                                    "causingExceptions": [
                                        {
                                            "schemaLocation": v["pointerToViolation"],
                                            **v,
                                            "causingExceptions": [],
                                        }
                                        for v in shown
                                    ],
                                }
                            ]
                        },
                    },
                },
                400,
            )
        if violations:
            xaction = self._next_xaction()
            self.state.drop(path, "async_validation", violations[0]["message"], item=message)
        else:
            xaction = self._store(path, message)
        answer: dict[str, Any] = {
            "inletId": self.inlet_id,
            "xactionId": xaction,
            "receivedTimeMs": int(time.time() * 1000),
        }
        answer["syncValidation"] = {"status": "pass"} if sync else {"skipped": True}
        return json_response(answer)


def _size(value: Any) -> int:
    return len(orjson.dumps(value))


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "Boolean"
    if isinstance(value, int):
        return "Long"
    if isinstance(value, float):
        return "Double"
    if isinstance(value, list):
        return "JSONArray"
    if isinstance(value, dict):
        return "JSONObject"
    return "String"
