"""Meta (Facebook) Custom Audiences destination (destinations.md §4).

Adds go out as ``POST /{version}/{audience_id}/users``, removals as ``DELETE`` on
the same path, both with a multi-key ``payload``: one ``schema`` (the
identifier keys present in that request, in the fixed order of :data:`SCHEMA_ORDER`)
and one ``data`` row per person with ``""`` for keys the person lacks, as Meta's
reference page asks ("In case a key is unknown, it should be left blank").
Every value is already normalised and SHA-256 hashed by the audience agent;
:class:`~sinks.audience_base.AudienceDestination` refuses anything else before a
request is built.

Transport choices (sources: Meta's custom-audience ``/users`` reference page as
mirrored in public docs, Oct 2025; facebook-python-business-sdk ``api.py``):

* ``payload`` travels in a JSON body for POST *and* DELETE. The SDK puts DELETE
  parameters in the query string, but RudderStack found ~65 KB the practical
  limit there, and a 10,000-row payload is megabytes. Graph takes JSON bodies;
  a JSON body on DELETE is **unconfirmed** against the live API (the emulator
  accepts body, form and query).
* ``access_token`` (and ``appsecret_proof`` = hex HMAC-SHA256 of the token keyed
  with the app secret, when ``CDP_SINK_META_APP_SECRET`` is set) go in the query
  string, as the SDK sends them; both are listed in ``secret_params`` so a dead
  letter's URL is redacted. The newer ``appsecret_time`` variant is not used
  (unconfirmed).

Response handling:

* 200 carries counters: ``num_received`` must equal the rows sent (otherwise the
  request is treated as refused and bisected — re-sending rows is harmless,
  membership is a set); ``num_invalid_entries > 0`` means Meta could not use some
  rows but took the rest. ``invalid_entry_samples`` (a ``{value: reason}`` map in
  the reference's return type) names *some* of them: rows holding a named value
  are dead-lettered as ``INVALID_ENTRY``; invalid rows Meta did not name cannot
  be told apart, so they count as delivered and only their number is logged
  (never values) and exported as a metric-friendly warning.
* Errors are classified by Graph ``error.code`` (table :data:`THROTTLE_CODES` …),
  following destinations.md §4.6 and rudder-transformer's
  ``facebookUtils/networkHandler.js`` mapping. Throttling waits for
  ``X-Business-Use-Case-Usage`` → ``estimated_time_to_regain_access`` (minutes)
  when present, else the engine's throttle backoff. Meta sends no Retry-After.
* Audience-level refusals (audience deleted / not shared / upload blocked) fail
  every row of the request at once instead of bisecting a refusal no row can
  fix.

Full re-sync: a ``usersreplace`` session (``session_id`` random int64 per sync,
``batch_seq`` from 1, ``last_batch_flag`` on the final request,
``estimated_num_total``). The endpoint and session fields are in Meta's
reference (``/{custom_audience_id}/usersreplace`` page, Oct 2025); the session
timeout (commonly cited 90 min) is **unconfirmed**. An empty membership cannot be
expressed as a replace (a batch needs rows), so it builds no request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urlencode

import orjson
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from sinks.audience_base import Action, AudienceDestination, audience_item
from sinks.base import (
    ConfigError,
    DeliveryError,
    DestinationSettings,
    HttpRequest,
    HttpResponse,
    ItemOutcome,
    MappedEvent,
    Permanent,
    RequestTooLarge,
    Retryable,
    SinkLimits,
    Throttled,
    not_configured,
    status_error,
)
from sinks.registry import register
from streams.audiences.identifiers import META_KEYS

log = logging.getLogger("cdpflow.sink.meta")

#: Rows per request (reference page: "only a maximum of 10000 at a time").
MAX_ROWS = 10_000
#: The multi-key schema order used for every request (a request carries only the
#: keys present in its rows, in this order).
SCHEMA_ORDER: tuple[str, ...] = META_KEYS
#: Graph's current version when written (reference pages show v25.0); versions
#: are sunset on a schedule, hence configurable.
DEFAULT_VERSION = "v25.0"
#: One hashed row of 12 keys is about 12 * 67 bytes; a row beyond this is not a person.
MAX_ROW_BYTES = 4096

# Graph error codes (§4.6; rudder-transformer networkHandler.js for 2650/1487xxx).
#: Rate limits: back off, wait estimated_time_to_regain_access when given.
THROTTLE_CODES = frozenset({4, 17, 32, 341, 613, 80003})
#: "Temporarily blocked for policy reasons": try again later, slowly.
BLOCKED_CODES = frozenset({368})
#: Unknown / transient / service unavailable.
TRANSIENT_CODES = frozenset({1, 2})
#: Token, permission, app, version: fix the settings, never retry.
CONFIG_CODES = frozenset({10, 102, 190, 294, 2635}) | frozenset(range(200, 300))
#: The audience itself refuses edits: every row fails, bisecting cannot help.
AUDIENCE_CODES = frozenset({2650, 1487301, 1487366})
#: Subcodes of code 100 that concern the audience, not the rows (33: object missing
#: or no permission; 1713230: upload blocked by an integrity restriction).
AUDIENCE_SUBCODES = frozenset({33, 1713230, 1487301, 1487366})
TOO_MANY_PARAMETERS = 105

INVALID_ENTRY = "INVALID_ENTRY"
AUDIENCE_UNAVAILABLE = "AUDIENCE_UNAVAILABLE"
RECEIVED_MISMATCH = "RECEIVED_COUNT_MISMATCH"


class MetaSettings(DestinationSettings):
    model_config = SettingsConfigDict(
        env_prefix="CDP_SINK_META_", extra="forbid", case_sensitive=False
    )

    endpoint: str = Field(
        "https://graph.facebook.com", description="Graph API base URL, or an emulator."
    )
    access_token: SecretStr | None = Field(
        None, description="System-user token with ads_management (Custom Audience terms accepted)."
    )
    app_secret: SecretStr | None = Field(
        None, description="When set, every call carries appsecret_proof (HMAC-SHA256 of the token)."
    )
    api_version: str = Field(DEFAULT_VERSION, pattern=r"^v\d+\.\d+$")
    max_rows_per_request: int = Field(MAX_ROWS, ge=1, le=MAX_ROWS)
    data_source_type: str = Field("UNKNOWN", description="payload.data_source.type")
    data_source_sub_type: str = Field("ANYTHING", description="payload.data_source.sub_type")
    max_throttle_wait_s: float = Field(
        3600.0,
        gt=0,
        description="Cap on the wait taken from estimated_time_to_regain_access (minutes).",
    )
    max_requests_per_second: float | None = Field(5.0, gt=0)
    max_concurrency: int = Field(4, ge=1, le=64)
    max_batch_wait_s: float = Field(0.5, gt=0, le=60)

    @model_validator(mode="after")
    def _credentials(self) -> MetaSettings:
        if self.access_token is None or not self.access_token.get_secret_value():
            raise not_configured("set CDP_SINK_META_ACCESS_TOKEN")
        return self


def appsecret_proof(token: str, app_secret: str) -> str:
    """Graph's ``appsecret_proof``: hex HMAC-SHA256 of the access token keyed by the app secret."""
    return hmac.new(app_secret.encode(), token.encode(), hashlib.sha256).hexdigest()


def regain_access_s(headers: Mapping[str, str]) -> float | None:
    """Seconds until Meta lifts a throttle, from ``X-Business-Use-Case-Usage``.

    The header is ``{"<business id>": [{"type": ..., "estimated_time_to_regain_access":
    <minutes>, ...}, ...]}``; the longest wait named wins. None when absent, zero
    or unreadable (the engine's throttle backoff applies then).
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    raw = lowered.get("x-business-use-case-usage")
    if not raw:
        return None
    try:
        usage = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    minutes: list[float] = []
    if isinstance(usage, dict):
        for entries in usage.values():
            for entry in entries if isinstance(entries, list) else [entries]:
                if isinstance(entry, dict):
                    value = entry.get("estimated_time_to_regain_access")
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        minutes.append(float(value))
    wait = max(minutes, default=0.0)
    return wait * 60.0 if wait > 0 else None


def graph_error(body: bytes) -> dict[str, Any] | None:
    """The ``error`` object of a Graph error body, or None."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        error: dict[str, Any] = parsed["error"]
        return error
    return None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


@register
class MetaDestination(AudienceDestination[MetaSettings]):
    """Meta Custom Audiences: multi-key hashed rows, POST add / DELETE remove, usersreplace."""

    name: ClassVar[str] = "meta"
    settings_cls: ClassVar[type[DestinationSettings]] = MetaSettings

    def __init__(self, settings: MetaSettings) -> None:
        super().__init__(settings)
        s = settings
        self._base = s.endpoint.rstrip("/") + "/" + s.api_version
        token = s.access_token.get_secret_value() if s.access_token else ""
        params = {"access_token": token}
        if s.app_secret is not None:
            params["appsecret_proof"] = appsecret_proof(token, s.app_secret.get_secret_value())
        self._query = urlencode(params)
        self._data_source = {"type": s.data_source_type, "sub_type": s.data_source_sub_type}
        self._limits = SinkLimits(
            max_batch_events=s.max_rows_per_request,
            # A full request of 12-key rows is ~9 MB; rows are small and bounded.
            max_batch_bytes=s.max_rows_per_request * (MAX_ROW_BYTES + 1),
            max_event_bytes=MAX_ROW_BYTES,
            max_requests_per_second=s.max_requests_per_second,
            max_concurrency=s.max_concurrency,
            max_batch_wait_s=s.max_batch_wait_s,
        )

    @property
    def limits(self) -> SinkLimits:
        return self._limits

    # ------------------------------------------------------------------ rows

    def row(self, identifiers: Mapping[str, str]) -> dict[str, str]:
        """``{key: hash}`` in schema order; the request builder lays rows out by its schema."""
        return {k: identifiers[k] for k in SCHEMA_ORDER if identifiers.get(k)}

    def _payload(self, items: Sequence[MappedEvent]) -> dict[str, Any]:
        rows = [audience_item(m).row for m in items]
        present = {k for r in rows for k in r}
        schema = [k for k in SCHEMA_ORDER if k in present]
        return {
            "schema": schema,
            "data": [[r.get(k, "") for k in schema] for r in rows],
            "is_raw": True,
            "data_source": self._data_source,
        }

    def _request(
        self,
        method: str,
        audience_id: str,
        edge: str,
        items: list[MappedEvent],
        session: dict[str, Any] | None = None,
    ) -> HttpRequest:
        body: dict[str, Any] = {"payload": self._payload(items)}
        if session is not None:
            body["session"] = session
        return HttpRequest(
            method=method,
            url=f"{self._base}/{audience_id}/{edge}?{self._query}",
            headers={"Content-Type": "application/json"},
            body=orjson.dumps(body),
            items=items,
            secret_params=("access_token", "appsecret_proof"),
            context={"audience_id": audience_id, "replace": edge == "usersreplace"},
        )

    def _chunks(self, items: Sequence[MappedEvent]) -> list[list[MappedEvent]]:
        size = self.settings.max_rows_per_request
        return [list(items[i : i + size]) for i in range(0, len(items), size)]

    def build_group_requests(
        self, audience_id: str, action: Action, items: list[MappedEvent]
    ) -> list[HttpRequest]:
        method = "POST" if action == "ADD" else "DELETE"
        return [self._request(method, audience_id, "users", chunk) for chunk in self._chunks(items)]

    def build_full_sync(
        self, audience_id: str, members: Sequence[MappedEvent]
    ) -> list[HttpRequest]:
        """One ``usersreplace`` session: after its last batch the audience holds exactly these.

        The session id is random per sync (Meta: "unique in the same ad account");
        a retried batch re-sends the same body, so the same ``batch_seq``.
        """
        chunks = self._chunks(members)
        session_id = secrets.randbits(62) or 1
        return [
            self._request(
                "POST",
                audience_id,
                "usersreplace",
                chunk,
                {
                    "session_id": session_id,
                    "batch_seq": seq,
                    "last_batch_flag": seq == len(chunks),
                    "estimated_num_total": len(members),
                },
            )
            for seq, chunk in enumerate(chunks, start=1)
        ]

    # ------------------------------------------------------------------ responses

    def classify(self, request: HttpRequest, response: HttpResponse) -> list[ItemOutcome]:
        n = len(request.items)
        error = graph_error(response.body)
        if error is not None or not 200 <= response.status < 300:
            refusal = self._error(response, error)
            if isinstance(refusal, Permanent) and (
                refusal.reason == AUDIENCE_UNAVAILABLE or request.context.get("replace")
            ):
                # Every row fails the same way; a replace session must not be
                # bisected into plain adds either.
                return [ItemOutcome(refusal) for _ in range(n)]
            raise refusal
        try:
            result = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            raise Retryable("BAD_RESPONSE", "200 without a JSON body") from None
        if not isinstance(result, dict):
            raise Retryable("BAD_RESPONSE", "200 without a JSON object")
        received = _int(result.get("num_received"))
        if received is not None and received != n:
            mismatch = Permanent(RECEIVED_MISMATCH, f"Meta received {received} of {n} rows")
            if request.context.get("replace"):
                return [ItemOutcome(mismatch) for _ in range(n)]
            raise mismatch
        invalid = _int(result.get("num_invalid_entries")) or 0
        outcomes = [ItemOutcome() for _ in range(n)]
        if invalid <= 0:
            return outcomes
        samples = result.get("invalid_entry_samples")
        named = dict(samples) if isinstance(samples, dict) else {}
        identified = 0
        if named:
            for index, mapped in enumerate(request.items):
                values = audience_item(mapped).row.values()
                reasons = [str(named[v]) for v in values if v in named]
                if reasons:
                    outcomes[index] = ItemOutcome(
                        Permanent(
                            INVALID_ENTRY, f"Meta counted the row invalid: {reasons[0][:200]}"
                        )
                    )
                    identified += 1
        if identified < invalid:
            # Meta names only samples; the other invalid rows cannot be told apart.
            log.warning(
                "meta: audience %s: %d of %d rows counted invalid, %d not identifiable "
                "(counted as delivered)",
                request.context.get("audience_id", "?"),
                invalid,
                n,
                invalid - identified,
            )
        return outcomes

    def _error(self, response: HttpResponse, error: dict[str, Any] | None) -> DeliveryError:
        """The whole-request error for a Graph error body (or a bare HTTP status)."""
        if error is None:
            fallback = status_error(response)
            if fallback is not None:
                return fallback
            return Retryable("BAD_RESPONSE", f"HTTP {response.status} without a Graph result")
        code = _int(error.get("code"))
        subcode = _int(error.get("error_subcode"))
        reason = f"GRAPH_{code}" + (f"_{subcode}" if subcode else "")
        # Graph's message only (never error_user_msg, which may quote values).
        detail = str(error.get("message") or "")[:300]
        if code in THROTTLE_CODES:
            wait = regain_access_s(response.headers)
            if wait is not None:
                wait = min(wait, self.settings.max_throttle_wait_s)
            return Throttled(reason, detail, wait)
        if code in BLOCKED_CODES:
            return Throttled(reason, detail, None)
        if code in CONFIG_CODES:
            return ConfigError(reason, detail)
        if code in AUDIENCE_CODES or (code == 100 and subcode in AUDIENCE_SUBCODES):
            return Permanent(AUDIENCE_UNAVAILABLE, f"{reason}: {detail}")
        if code in TRANSIENT_CODES or error.get("is_transient") is True:
            return Retryable(reason, detail)
        if code == TOO_MANY_PARAMETERS:
            return RequestTooLarge(reason, detail)
        if response.status >= 500 and code is None:
            return Retryable(reason, detail)
        # 100 (invalid parameter), 194, and unknown codes: refused as a whole -> bisect.
        return Permanent(reason, detail)
