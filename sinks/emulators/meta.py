"""Meta Custom Audiences emulator: ``/{version}/{audience_id}/users`` and ``usersreplace`` (§4).

What it enforces (destinations.md §4.8, plus Meta's ``/users`` reference page):

1. ``access_token`` must be one this instance knows (else 400, Graph code 190);
   with an ``app_secret`` configured, ``appsecret_proof`` must be its HMAC-SHA256
   of the token (else code 100). Unknown audience → code 100 subcode 33. A
   version outside ``supported_versions`` → code 2635 (deprecated version).
2. ``payload`` (JSON body, form field or query parameter; JSON object or JSON
   string): a multi-key ``schema`` of known keys, ``data`` rows whose length
   equals the schema's, at most ``max_rows`` (10,000) rows, not empty — else 400
   code 100 for the whole request (Meta's subcode for "too many rows" is
   unconfirmed; none is sent).
3. Hashed keys must be 64-char lowercase hex. Anything else is raw PII: it is
   recorded in ``state.pii_violations`` and counted in ``num_invalid_entries``
   (the request stays 200, as Meta's). Values Meta could never match are invalid
   too: a hash of the empty string, ``COUNTRY`` not the hash of a 2-letter code,
   ``GEN`` not of m/f, ``DOBM``/``DOBD``/``DOBY`` outside their ranges (checked
   against precomputed hashes of every valid value). ``invalid_entry_samples`` is
   a ``{value: reason}`` map (the reference's ``Map {string: string}``), at most
   ``max_samples`` entries.
4. Sessions: ``batch_seq`` starts at 1 (else code 2650 subcode 1870147, as seen in
   community code) and never goes back; the same ``batch_seq`` again is taken as
   a retry of that batch; after ``last_batch_flag`` the session is closed (more
   batches → code 100). ``usersreplace`` requires a session; the audience then
   holds exactly that session's valid rows once the last batch arrives.
5. Throttling (fault ``throttle``): Graph code 80003 with HTTP
   ``throttle_http_status`` (400; the live status is unconfirmed) and
   ``X-Business-Use-Case-Usage`` whose ``estimated_time_to_regain_access`` is the
   fault's ``retry_after_s`` in minutes. Meta sends whole minutes; a fraction is
   sent when the fault asks for less than a minute so tests need not wait one.
   No ``Retry-After`` header, as Meta sends none.

State: ``members(audience_id)`` is the current membership as a set of rows
(sorted ``(key, hash)`` pairs of the non-empty values); adds and removes apply
only valid rows. Each applied row is also recorded in ``state.accepted`` with the
key ``audience|action|row``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qs

import orjson
from aiohttp import web

from sinks.emulators.base import BodyError, Emulator, json_response, parse_json, read_body

DEFAULT_TOKEN = "emulator-meta-access-token"  # noqa: S105 - the emulator's fake credential
MAX_ROWS = 10_000
KNOWN_KEYS = frozenset(
    {"EXTERN_ID", "EMAIL", "PHONE", "GEN", "DOBY", "DOBM", "DOBD", "LN", "FN", "FI", "CT", "ST",
     "ZIP", "MADID", "COUNTRY", "LOOKALIKE_VALUE"}
)  # fmt: skip
#: Keys sent in clear (every other key must be a SHA-256 hash).
CLEAR_KEYS = frozenset({"MADID", "EXTERN_ID", "LOOKALIKE_VALUE"})
LEGACY_SCHEMAS = {"EMAIL_SHA256": "EMAIL", "PHONE_SHA256": "PHONE"}
HEX64 = re.compile(r"^[0-9a-f]{64}$")
VERSION_RE = re.compile(r"^v\d+\.\d+$")
AUDIENCE_ID_RE = re.compile(r"^\d{1,25}$")


def _h(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


EMPTY_HASH = _h("")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
#: Hashes of every value Meta accepts for the keys with a closed domain.
DOMAINS: dict[str, frozenset[str]] = {
    "COUNTRY": frozenset(_h(a + b) for a in _LETTERS for b in _LETTERS),
    "GEN": frozenset({_h("m"), _h("f")}),
    "DOBM": frozenset(_h(f"{m:02d}") for m in range(1, 13)),
    "DOBD": frozenset(_h(f"{d:02d}") for d in range(1, 32)),
    "DOBY": frozenset(_h(str(y)) for y in range(1900, time.gmtime().tm_year + 1)),
}

Row = tuple[tuple[str, str], ...]


@dataclass
class Session:
    audience_id: str
    replace: bool
    last_seq: int = 0
    closed: bool = False
    rows: set[Row] = field(default_factory=set)


class GraphError(Exception):
    def __init__(self, code: int, message: str, subcode: int | None = None, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.subcode, self.status = code, message, subcode, status


def graph_error_body(code: int, message: str, subcode: int | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {
        "message": message,
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": "AEmulatorTrace",
    }
    if subcode is not None:
        error["error_subcode"] = subcode
    if code in (1, 2):
        error["is_transient"] = True
    return {"error": error}


class MetaEmulator(Emulator):
    name: ClassVar[str] = "meta"

    def __init__(
        self,
        *,
        access_tokens: Iterable[str] = (DEFAULT_TOKEN,),
        app_secret: str | None = None,
        audiences: Iterable[str] | None = None,
        supported_versions: Iterable[str] | None = None,
        max_rows: int = MAX_ROWS,
        max_samples: int = 10,
        throttle_http_status: int = 400,
        business_id: str = "100000000000001",
    ) -> None:
        super().__init__()
        self.access_tokens = set(access_tokens)
        self.app_secret = app_secret
        #: None: any numeric audience id exists.
        self.audiences: set[str] | None = set(audiences) if audiences is not None else None
        self.supported_versions = set(supported_versions) if supported_versions else None
        self.max_rows = max_rows
        self.max_samples = max_samples
        self.throttle_http_status = throttle_http_status
        self.business_id = business_id
        self._members: dict[str, set[Row]] = {}
        self.sessions: dict[str, Session] = {}

    # ------------------------------------------------------------------ wiring

    def credentials(self) -> dict[str, str]:
        creds = {"access_token": next(iter(sorted(self.access_tokens)), "")}
        if self.app_secret:
            creds["app_secret"] = self.app_secret
        return creds

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/{version}/{audience_id}/users", self._h_users)
        router.add_delete("/{version}/{audience_id}/users", self._h_users)
        router.add_post("/{version}/{audience_id}/usersreplace", self._h_users)

    def reset(self) -> None:
        super().reset()
        self._members.clear()
        self.sessions.clear()

    def members(self, audience_id: str) -> set[Row]:
        """The audience's current membership (a copy)."""
        return set(self._members.get(audience_id, set()))

    def error_response(
        self, status: int, *, retry_after_s: float | None = None, body: Any = None
    ) -> web.Response:
        headers: dict[str, str] = {}
        if body is not None:
            return json_response(body, status)
        if status == 429:
            status = self.throttle_http_status
            body = graph_error_body(
                80003,
                "There have been too many calls to this ad-account. Wait a bit and try again.",
                2446079,
            )
            if retry_after_s is not None:
                minutes = retry_after_s / 60.0
                wait: float | int = int(minutes) if minutes.is_integer() else round(minutes, 4)
                headers["X-Business-Use-Case-Usage"] = orjson.dumps(
                    {
                        self.business_id: [
                            {
                                "type": "custom_audience",
                                "call_count": 100,
                                "total_cputime": 10,
                                "total_time": 10,
                                "estimated_time_to_regain_access": wait,
                            }
                        ]
                    }
                ).decode()
        elif status >= 500:
            body = graph_error_body(2, "Service temporarily unavailable")
        elif status in (401, 403):
            body = graph_error_body(190, "Invalid OAuth access token.")
        else:
            body = graph_error_body(100, "Invalid parameter")
        return json_response(body, status, headers)

    # ------------------------------------------------------------------ handler

    async def _h_users(self, request: web.Request) -> web.Response:
        path = request.path
        try:
            params = await _params(request)
            audience_id = request.match_info["audience_id"]
            self._check_access(request.match_info["version"], audience_id, params)
            payload = _payload(params)
            schema, data = self._check_payload(payload)
            session = self._session(path, audience_id, params)
        except GraphError as exc:
            self.state.reject_request(path, exc.status, f"GRAPH_{exc.code}", exc.message)
            return json_response(graph_error_body(exc.code, exc.message, exc.subcode), exc.status)
        action = "REMOVE" if request.method == "DELETE" else "ADD"
        replace = path.endswith("/usersreplace")
        invalid: dict[str, str] = {}
        invalid_count = 0
        valid: list[Row] = []
        for index, raw in enumerate(data):
            problem = self._check_row(path, index, schema, raw)
            if problem is not None:
                value, reason = problem
                invalid_count += 1
                self.state.reject_item(path, index, "INVALID_ENTRY", reason)
                if len(invalid) < self.max_samples:
                    invalid[value] = reason
                continue
            valid.append(tuple(sorted((k, v) for k, v in zip(schema, raw, strict=True) if v)))
        self._apply(path, audience_id, action, valid, session, replace)
        result: dict[str, Any] = {
            "audience_id": audience_id,
            "num_received": len(data),
            "num_invalid_entries": invalid_count,
            "invalid_entry_samples": invalid,
        }
        if session is not None:
            result["session_id"] = str(params.get("session", {}).get("session_id"))
        return json_response(result)

    def _check_access(self, version: str, audience_id: str, params: Mapping[str, Any]) -> None:
        token = params.get("access_token")
        if not isinstance(token, str) or token not in self.access_tokens:
            raise GraphError(190, "Invalid OAuth access token - Cannot parse access token")
        if self.app_secret is not None:
            expected = hmac.new(self.app_secret.encode(), token.encode(), hashlib.sha256)
            proof = params.get("appsecret_proof")
            if not isinstance(proof, str) or not hmac.compare_digest(proof, expected.hexdigest()):
                raise GraphError(100, "Invalid appsecret_proof provided in the API argument")
        if not VERSION_RE.match(version) or (
            self.supported_versions is not None and version not in self.supported_versions
        ):
            raise GraphError(
                2635, f"You are calling a deprecated version of the Ads API ({version[:20]})."
            )
        known = (
            AUDIENCE_ID_RE.match(audience_id) is not None
            if self.audiences is None
            else audience_id in self.audiences
        )
        if not known:
            raise GraphError(
                100,
                "Unsupported post request. Object does not exist, cannot be loaded due to "
                "missing permissions, or does not support this operation",
                33,
            )

    def _check_payload(self, payload: Any) -> tuple[list[str], list[list[Any]]]:
        if not isinstance(payload, dict):
            raise GraphError(100, "(#100) The parameter payload is required")
        schema = payload.get("schema")
        data = payload.get("data")
        single = False
        if isinstance(schema, str):
            single = True
            schema = [LEGACY_SCHEMAS.get(schema, schema)]
        if not isinstance(schema, list) or not schema:
            raise GraphError(100, "(#100) payload.schema must be a key or a list of keys")
        unknown = [k for k in schema if k not in KNOWN_KEYS]
        if unknown or len(set(schema)) != len(schema):
            raise GraphError(100, "(#100) Invalid schema: unknown or repeated keys")
        if not isinstance(data, list) or not data:
            raise GraphError(100, "(#100) payload.data must be a non-empty list")
        if len(data) > self.max_rows:
            raise GraphError(
                100, f"(#100) Too many users in one request: {len(data)} > {self.max_rows}"
            )
        rows: list[list[Any]] = []
        for row in data:
            if single:
                row = [row]
            if not isinstance(row, list) or len(row) != len(schema):
                raise GraphError(100, "(#100) Each data row must match the schema's length")
            rows.append(row)
        return schema, rows

    def _session(self, path: str, audience_id: str, params: Mapping[str, Any]) -> Session | None:
        raw = params.get("session")
        if isinstance(raw, str):
            try:
                raw = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise GraphError(100, "(#100) session must be a JSON object") from None
        replace = path.endswith("/usersreplace")
        if raw is None:
            if replace:
                raise GraphError(100, "(#100) The parameter session is required")
            return None
        if not isinstance(raw, dict):
            raise GraphError(100, "(#100) session must be a JSON object")
        session_id, seq = raw.get("session_id"), raw.get("batch_seq")
        if not isinstance(session_id, int | str) or not isinstance(seq, int) or seq < 1:
            raise GraphError(100, "(#100) session needs session_id and a 1-based batch_seq")
        key = str(session_id)
        session = self.sessions.get(key)
        if session is None:
            if seq != 1:
                raise GraphError(2650, "Failed to update the custom audience: first batch_seq "
                                 "was not detected", 1870147)  # fmt: skip
            session = Session(audience_id, replace)
            self.sessions[key] = session
        elif session.closed and seq > session.last_seq:
            raise GraphError(100, "(#100) The session has already ended")
        elif seq < session.last_seq or session.audience_id != audience_id:
            raise GraphError(100, "(#100) batch_seq must increase within a session")
        session.last_seq = seq
        if raw.get("last_batch_flag") is True:
            session.closed = True
        return session

    def _check_row(
        self, path: str, index: int, schema: list[str], row: list[Any]
    ) -> tuple[str, str] | None:
        """(value, reason) of the row's first invalid value, or None when it is usable."""
        if all(v in ("", None) for v in row):
            return "", "the row has no values"
        for key, value in zip(schema, row, strict=True):
            if value in ("", None) or key in CLEAR_KEYS:
                continue
            text = value if isinstance(value, str) else str(value)
            if not HEX64.match(text):
                self.state.record_pii(path, [(f"payload.data[{index}].{key}", "not_hashed")])
                return text, f"{key} is not a SHA-256 hash"
            if text == EMPTY_HASH:
                return text, f"{key} is the hash of an empty value"
            domain = DOMAINS.get(key)
            if domain is not None and text not in domain:
                return text, f"{key} is not the hash of a valid {key} value"
        return None

    def _apply(
        self,
        path: str,
        audience_id: str,
        action: str,
        rows: list[Row],
        session: Session | None,
        replace: bool,
    ) -> None:
        if replace and session is not None:
            session.rows.update(rows)
            for row in rows:
                self.state.accept(
                    {"audience": audience_id, "action": "REPLACE", "row": dict(row)},
                    path=path,
                    key=f"{audience_id}|REPLACE|{orjson.dumps(row).decode()}",
                )
            if session.closed:
                self._members[audience_id] = set(session.rows)
            return
        members = self._members.setdefault(audience_id, set())
        for row in rows:
            if action == "ADD":
                members.add(row)
            else:
                members.discard(row)
            self.state.accept(
                {"audience": audience_id, "action": action, "row": dict(row)},
                path=path,
                key=f"{audience_id}|{action}|{orjson.dumps(row).decode()}",
            )


async def _params(request: web.Request) -> dict[str, Any]:
    """Graph parameters from the query string, a form body or a JSON body (later wins)."""
    params: dict[str, Any] = {k: v for k, v in request.query.items()}
    try:
        body = await read_body(request)
    except BodyError as exc:
        raise GraphError(100, exc.message) from None
    if not body.strip():
        return params
    ctype = request.headers.get("Content-Type", "")
    if "application/x-www-form-urlencoded" in ctype:
        try:
            form = parse_qs(body.decode(), keep_blank_values=True)
        except UnicodeDecodeError:
            raise GraphError(100, "the body is not valid form data") from None
        params.update({k: v[-1] for k, v in form.items()})
        return params
    try:
        parsed = parse_json(body)
    except BodyError:
        raise GraphError(100, "the body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise GraphError(100, "the body must be a JSON object")
    params.update(parsed)
    return params


def _payload(params: Mapping[str, Any]) -> Any:
    payload = params.get("payload")
    if isinstance(payload, str):
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise GraphError(100, "(#100) payload must be JSON") from None
    return payload
