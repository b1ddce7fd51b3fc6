"""Google Ads Customer Match destination: offline user data jobs over REST (destinations.md §5).

Sources followed (cited where each fact is used below):

* [EX] googleads/google-ads-python ``examples/remarketing/add_customer_match_user_list.py``
  (the v24 revision shipped in the 2026-08 release): one ``UserIdentifier`` per
  identifier, all of one person's identifiers in one ``UserData``; address only with
  first name, last name, country code and postal code; job-level consent in
  ``customer_match_user_list_metadata.consent``; ``enable_partial_failure``; the
  GAQL job-status query.
* [PB] the same library's generated v25 types: ``OfflineUserDataJobOperation``
  (oneof ``create`` / ``remove`` / ``remove_all``), ``AddOfflineUserDataJobOperationsRequest``
  (``enable_partial_failure``, ``enable_warnings``, ``validate_only``),
  ``OfflineUserDataJobErrorEnum`` (e.g. ``TOO_MANY_USER_IDENTIFIERS``: "100,000 per
  request and 20 per operation"; ``INVALID_SHA256_FORMAT`` = 25;
  ``CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS``), ``ErrorDetails.quota_error_details``
  / ``QuotaErrorDetails.retry_delay`` (a protobuf Duration: ``"30s"`` in JSON),
  ``DatabaseError.CONCURRENT_MODIFICATION``, ``RequestError.DEVELOPER_TOKEN_PARAMETER_MISSING``.
* [REST] developers.google.com/google-ads/api/rest/reference/rest/v18/
  customers.offlineUserDataJobs/addOperations: the JSON body (``operations``,
  ``enablePartialFailure``, ...) and ``partialFailureError`` (returned only when all
  errors are inside operations; anything else is an RPC-level error).
* [CM] developers.google.com/google-ads/api/docs/remarketing/audience-segments/
  customer-match/get-started: "far more efficient to create a single large job";
  consent on create jobs, "for remove requests, consent is not needed"; don't mix
  create and remove in one job (``CONFLICTING_OPERATION``, troubleshoot page).

One logical request (:class:`~sinks.base.HttpRequest`) is one job, so the class is
``multi_call``: :meth:`GoogleAdsDestination.send` creates the job, adds the
operations in calls of at most ``max_identifiers_per_call`` identifiers (Google
recommends ~10,000 per call; the hard limit is 100,000), then runs it. The
response it returns carries the per-item outcomes of every ``addOperations`` call
(``HttpResponse.extra``) for :meth:`classify`.

Retries and idempotency. The API has no idempotency key (§5.6), and a job cannot
be run twice. A retry (after a failed or unanswered ``:create``, ``:addOperations``
or ``:run``) therefore builds a **new** job from scratch. That is safe because
Customer Match lists are sets: if the old job never ran, it is as if it never
existed (a job left PENDING is never applied); if it *did* run (``:run`` took
effect but the answer was lost), the new job re-adds or re-removes the same
identifiers, which changes nothing. Order is kept because the engine sends a
profile's changes one at a time (same Kafka key, same lane) and only after the
previous job's ``:run`` was acknowledged.

Not done here: waiting for jobs to finish. Jobs "can take 6 hours or more" [EX];
a run that Google accepted is the commit point, like in the official example,
which only prints the status query. Job status is left to ``googleAds:search``.

Credentials. ``access_token`` is used as is; it expires after about an hour, so a
long-running sink should instead set ``refresh_token``, ``client_id`` and
``client_secret`` (an installed-app / web OAuth client): the destination then
fetches and refreshes access tokens itself from ``token_url`` (RFC 6749 §6 refresh
grant) and, on a 401 with a token older than a minute, refreshes once and retries.
Service-account (JWT) flows are out of scope.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from sinks.audience_base import Action, AudienceDestination, audience_item
from sinks.base import (
    MAX_RETRY_AFTER_S,
    ConfigError,
    DeliveryError,
    DestinationSettings,
    HttpRequest,
    HttpResponse,
    ItemOutcome,
    MappedEvent,
    Permanent,
    Retryable,
    SinkLimits,
    Throttled,
    not_configured,
    status_error,
)
from sinks.registry import register

if TYPE_CHECKING:
    import aiohttp

#: Latest API version in the official Python client as of its 2026-08 release
#: (it ships v21..v25); destinations.md says the docs now name v26. Versions sunset
#: roughly a year after release: set CDP_SINK_GOOGLE_ADS_API_VERSION to move on.
API_VERSION = "v25"
#: [PB] OfflineUserDataJobError.TOO_MANY_USER_IDENTIFIERS: per operation / per request.
MAX_IDENTIFIERS_PER_USER_DATA = 20
MAX_IDENTIFIERS_PER_REQUEST = 100_000
#: [CM] / destinations.md §5.4: recommended identifiers per addOperations call.
RECOMMENDED_IDENTIFIERS_PER_CALL = 10_000
#: People per job in streaming mode. One person has at most 3 identifiers here
#: (email, phone, address), so a full batch is 1..3 addOperations calls of <= 10k.
MAX_BATCH_EVENTS = 10_000

#: AudienceUpdate identifier keys (schemas/cdpflow.AudienceUpdate.avsc) -> UserIdentifier.
SINGLE_KEYS: tuple[tuple[str, str], ...] = (
    ("hashedEmail", "hashedEmail"),
    ("hashedPhoneNumber", "hashedPhoneNumber"),
)
ADDRESS_PREFIX = "addressInfo."
#: [EX] an address is only sent with all four of these.
ADDRESS_REQUIRED = ("hashedFirstName", "hashedLastName", "countryCode", "postalCode")

USER_LIST_RE = re.compile(r"^customers/(\d+)/userLists/(\d+)$")
DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")

#: Reason codes of our own (not Google's).
INVALID_USER_LIST = "INVALID_USER_LIST"
INCOMPLETE_IDENTIFIERS = "INCOMPLETE_IDENTIFIERS"
JOB_NOT_CREATED = "JOB_NOT_CREATED"
OAUTH_REFRESH_FAILED = "OAUTH_REFRESH_FAILED"
ACCESS_TOKEN_EXPIRED = "ACCESS_TOKEN_EXPIRED"  # noqa: S105 - a reason code

# --------------------------------------------------------------------------- error table
# Like rudder-transformer's per-vendor tables: GoogleAdsError codes (the value of
# ``errorCode.<kind>``) and google.rpc status names -> what the engine does.

#: The job's user list itself is unusable: every item of the job fails the same way,
#: so they are dead-lettered together instead of bisecting the batch (which would
#: create ~2n jobs to learn nothing new). Replay them once the list is fixed.
LIST_LEVEL_CODES = frozenset(
    {
        "INVALID_USER_LIST_ID",
        "INVALID_USER_LIST_TYPE",
        "INCOMPATIBLE_UPLOAD_KEY_TYPE",
        "REMOVE_NOT_SUPPORTED",
        "REMOVE_ALL_NOT_SUPPORTED",
        "USER_LIST_NOT_APPLICABLE",
        "OPERATIONS_FOR_CUSTOMER_MATCH_NOT_ALLOWED",
        "NOT_ON_ALLOWLIST_FOR_USER_ID",
    }
)
#: The account or credentials are wrong: stop the destination.
CONFIG_CODES = frozenset(
    {
        "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS",
        "DEVELOPER_TOKEN_PARAMETER_MISSING",
        "DEVELOPER_TOKEN_INVALID",
        "DEVELOPER_TOKEN_NOT_APPROVED",
        "DEVELOPER_TOKEN_PROHIBITED",
        "USER_PERMISSION_DENIED",
        "CUSTOMER_NOT_ENABLED",
        "INVALID_LOGIN_CUSTOMER_ID",
        "CLIENT_CUSTOMER_ID_INVALID",
        "CUSTOMER_NOT_FOUND",
    }
)
#: Transient whatever the HTTP status says.
RETRY_CODES = frozenset(
    {
        "CONCURRENT_MODIFICATION",  # DatabaseError; for this service **unconfirmed** (§5.5)
        "TRANSIENT_ERROR",  # InternalError
        "INTERNAL_ERROR",
        "DEADLINE_EXCEEDED",
        "JOB_ALREADY_STARTED",  # our job was run by an earlier attempt: a new job fixes it
    }
)
THROTTLE_CODES = frozenset({"RESOURCE_EXHAUSTED", "RESOURCE_TEMPORARILY_EXHAUSTED"})
RETRY_STATUSES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "ABORTED", "UNKNOWN"})
CONFIG_STATUSES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})


class GoogleAdsSettings(DestinationSettings):
    model_config = SettingsConfigDict(
        env_prefix="CDP_SINK_GOOGLE_ADS_", extra="forbid", case_sensitive=False
    )

    endpoint: str = Field(
        "https://googleads.googleapis.com",
        description="API host (or an emulator); /{api_version}/customers/... is appended.",
    )
    api_version: str = Field(API_VERSION, pattern=r"^v\d{2,}$")
    customer_id: str = Field(description="Customer owning the user lists (10 digits).")
    login_customer_id: str | None = Field(
        None, description="Manager account id when acting through a manager (10 digits)."
    )
    developer_token: SecretStr = Field(description="Google Ads API developer token.")
    access_token: SecretStr | None = Field(
        None, description="OAuth 2.0 access token (scope .../auth/adwords); expires in ~1 h."
    )
    refresh_token: SecretStr | None = Field(None, description="Refresh token: tokens renew.")
    client_id: str | None = None
    client_secret: SecretStr | None = None
    token_url: str = Field(
        "https://oauth2.googleapis.com/token", description="OAuth token endpoint for refresh."
    )
    max_identifiers_per_call: int = Field(
        RECOMMENDED_IDENTIFIERS_PER_CALL, ge=1, le=MAX_IDENTIFIERS_PER_REQUEST
    )
    max_batch_events: int = Field(MAX_BATCH_EVENTS, ge=1, le=MAX_IDENTIFIERS_PER_REQUEST)
    batch_wait_s: float = Field(
        1.0,
        gt=0,
        le=600,
        description="Collect changes this long before a job: Google prefers few large jobs.",
    )
    max_requests_per_second: float | None = Field(None, gt=0, description="Jobs per second.")
    max_concurrency: int = Field(2, ge=1, le=32, description="Jobs in flight at once.")

    @field_validator("customer_id", "login_customer_id", mode="before")
    @classmethod
    def _digits(cls, value: Any) -> Any:
        """``123-456-7890`` (as the UI shows it) becomes ``1234567890``; anything else fails."""
        if value is None:
            return None
        text = str(value).strip().replace("-", "")
        if not re.fullmatch(r"\d{10}", text):
            raise ValueError("a Google Ads customer id is 10 digits (hyphens allowed)")
        return text

    @model_validator(mode="after")
    def _credentials(self) -> GoogleAdsSettings:
        refresh = (self.refresh_token, self.client_id, self.client_secret)
        if any(v is not None for v in refresh) and not all(v is not None for v in refresh):
            raise ValueError("refresh_token, client_id and client_secret go together")
        if self.access_token is None and self.refresh_token is None:
            raise not_configured("set access_token, or refresh_token + client_id + client_secret")
        return self

    @property
    def can_refresh(self) -> bool:
        return self.refresh_token is not None


# --------------------------------------------------------------------------- mapping


def user_data(identifiers: Mapping[str, str]) -> dict[str, Any]:
    """One person's ``UserData``: one ``UserIdentifier`` per identifier, exactly one field each.

    [EX]: "you must set only ONE of hashed_email, hashed_phone_number, mobile_id,
    third_party_user_id, or address_info" per UserIdentifier; several identifiers of
    one person are several UserIdentifiers in one UserData. The address parts form
    ONE ``addressInfo`` identifier, sent only when all four parts are present (as in
    [EX]); an incomplete address is left out rather than sent unmatchable.
    Raises :class:`Permanent` when nothing matchable is left.
    """
    out: list[dict[str, Any]] = []
    for key, field in SINGLE_KEYS:
        value = identifiers.get(key)
        if value:
            out.append({field: value})
    address = {
        key[len(ADDRESS_PREFIX) :]: value
        for key, value in identifiers.items()
        if key.startswith(ADDRESS_PREFIX) and value
    }
    if address and all(address.get(k) for k in ADDRESS_REQUIRED):
        # countryCode is ISO-3166-1 alpha-2 and unhashed; postalCode unhashed (§5.3).
        address["countryCode"] = address["countryCode"].upper()
        out.append({"addressInfo": {k: address[k] for k in sorted(address)}})
    if not out:
        raise Permanent(
            INCOMPLETE_IDENTIFIERS,
            "no email, no phone and no complete address (first name, last name, country "
            "code, postal code): nothing Google can match",
        )
    if len(out) > MAX_IDENTIFIERS_PER_USER_DATA:  # cannot happen with 3 kinds; keep the rule
        raise Permanent("TOO_MANY_USER_IDENTIFIERS", "more than 20 identifiers for one person")
    return {"userIdentifiers": out}


def identifier_count(row: Mapping[str, Any]) -> int:
    return len(row.get("userIdentifiers") or ())


def chunk_by_identifiers(items: Sequence[MappedEvent], limit: int) -> list[list[MappedEvent]]:
    """Consecutive chunks of at most ``limit`` identifiers (a person is never split)."""
    chunks: list[list[MappedEvent]] = []
    current: list[MappedEvent] = []
    count = 0
    for item in items:
        n = identifier_count(audience_item(item).row)
        if current and count + n > limit:
            chunks.append(current)
            current, count = [], 0
        current.append(item)
        count += n
    if current:
        chunks.append(current)
    return chunks


# --------------------------------------------------------------------------- errors


def parse_duration(value: Any) -> float | None:
    """A protobuf Duration in JSON (``"30s"``, ``"1.5s"``) or a {seconds, nanos} object."""
    if isinstance(value, str):
        m = DURATION_RE.match(value)
        return float(m.group(1)) if m else None
    if isinstance(value, Mapping):
        try:
            return float(value.get("seconds", 0)) + float(value.get("nanos", 0)) / 1e9
        except (TypeError, ValueError):
            return None
    return None


def google_errors(status: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The ``GoogleAdsError`` entries of a google.rpc.Status (error or partialFailureError)."""
    out: list[Mapping[str, Any]] = []
    for detail in status.get("details") or ():
        if isinstance(detail, Mapping):
            out.extend(e for e in detail.get("errors") or () if isinstance(e, Mapping))
    return out


def error_code(error: Mapping[str, Any]) -> str:
    """``{"errorCode": {"offlineUserDataJobError": "INVALID_SHA256_FORMAT"}}`` -> the value."""
    code = error.get("errorCode")
    if isinstance(code, Mapping):
        for value in code.values():
            return str(value)
    return "UNKNOWN"


def operation_index(error: Mapping[str, Any]) -> int | None:
    """Index of the failed operation from ``location.fieldPathElements`` ([REST], §5.5)."""
    location = error.get("location")
    if not isinstance(location, Mapping):
        return None
    for element in location.get("fieldPathElements") or ():
        if isinstance(element, Mapping) and element.get("fieldName") == "operations":
            index = element.get("index")
            return int(index) if isinstance(index, int) else None
    return None


def retry_delay(errors: Sequence[Mapping[str, Any]]) -> float | None:
    """``details.quotaErrorDetails.retryDelay`` of the first quota error that names one [PB]."""
    for error in errors:
        details = error.get("details")
        if isinstance(details, Mapping):
            quota = details.get("quotaErrorDetails")
            if isinstance(quota, Mapping):
                seconds = parse_duration(quota.get("retryDelay"))
                if seconds is not None:
                    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)
    return None


def classify_error(http_status: int, body: bytes) -> DeliveryError:
    """The whole-request error a non-2xx Google Ads answer means (the table above)."""
    try:
        payload = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        payload = {}
    envelope = payload.get("error") if isinstance(payload, Mapping) else None
    envelope = envelope if isinstance(envelope, Mapping) else {}
    rpc_status = str(envelope.get("status") or "")
    errors = google_errors(envelope)
    codes = [error_code(e) for e in errors]
    message = str(envelope.get("message") or f"HTTP {http_status}")[:300]
    detail = f"{rpc_status or http_status}: {', '.join(codes) or message}"
    if http_status == 429 or rpc_status == "RESOURCE_EXHAUSTED" or THROTTLE_CODES & set(codes):
        reason = next((c for c in codes if c in THROTTLE_CODES), "RESOURCE_EXHAUSTED")
        return Throttled(reason, detail, retry_delay(errors))
    config = next((c for c in codes if c in CONFIG_CODES), None)
    if config is not None:
        return ConfigError(config, detail)
    if rpc_status in CONFIG_STATUSES or http_status in (401, 403):
        return ConfigError(
            rpc_status or ("UNAUTHENTICATED" if http_status == 401 else "FORBIDDEN"), detail
        )
    retry = next((c for c in codes if c in RETRY_CODES), None)
    if retry is not None:
        return Retryable(retry, detail)
    if rpc_status in RETRY_STATUSES or http_status >= 500:
        return Retryable(rpc_status or f"HTTP_{http_status}", detail)
    if codes:
        return Permanent(codes[0], detail)
    fallback = status_error(HttpResponse(http_status, {}, b""), detail)
    return fallback if fallback is not None else Permanent(f"HTTP_{http_status}", detail)


# --------------------------------------------------------------------------- destination


@register
class GoogleAdsDestination(AudienceDestination[GoogleAdsSettings]):
    """Customer Match user lists: one offline user data job per (list, action) group."""

    name: ClassVar[str] = "google_ads"
    settings_cls: ClassVar[type[DestinationSettings]] = GoogleAdsSettings
    multi_call: ClassVar[bool] = True

    def __init__(self, settings: GoogleAdsSettings) -> None:
        super().__init__(settings)
        self.customer_id = settings.customer_id
        self.base = (
            f"{settings.endpoint.rstrip('/')}/{settings.api_version}/customers/{self.customer_id}"
        )
        self._limits = SinkLimits(
            max_batch_events=settings.max_batch_events,
            # ~100 bytes per identifier in JSON; rows are small, the count limits first.
            max_batch_bytes=64 * 1024 * 1024,
            max_event_bytes=16 * 1024,
            max_requests_per_second=settings.max_requests_per_second,
            max_concurrency=settings.max_concurrency,
            max_batch_wait_s=settings.batch_wait_s,
        )
        self._token: str | None = (
            settings.access_token.get_secret_value() if settings.access_token else None
        )
        #: monotonic time the current token stops being usable (None: unknown / static)
        self._token_expires: float | None = None
        self._token_obtained = time.monotonic() if self._token else 0.0
        self._token_lock = asyncio.Lock()

    @property
    def limits(self) -> SinkLimits:
        return self._limits

    # -- mapping

    def row(self, identifiers: Mapping[str, str]) -> Any:
        return user_data(identifiers)

    def user_list(self, audience_id: str) -> str:
        """The user list resource name for ``platformAudienceId``; Permanent when foreign.

        Takes ``customers/{cid}/userLists/{id}`` (the documented form) or a bare list
        id, which is read as a list of the configured customer.
        """
        text = audience_id.strip()
        if text.isdigit():
            return f"customers/{self.customer_id}/userLists/{text}"
        m = USER_LIST_RE.match(text)
        if m is None:
            raise Permanent(
                INVALID_USER_LIST, "platformAudienceId is not customers/{cid}/userLists/{id}"
            )
        if m.group(1) != self.customer_id:
            raise Permanent(
                INVALID_USER_LIST,
                f"user list belongs to customer {m.group(1)}, the sink is set up for "
                f"{self.customer_id}",
            )
        return text

    def map(self, enriched: Mapping[str, Any]) -> MappedEvent | None:
        mapped = super().map(enriched)
        if mapped is not None:
            self.user_list(audience_item(mapped).audience_id)
        return mapped

    # -- requests

    def _request(
        self, audience_id: str, action: Action, items: list[MappedEvent], *, full: bool
    ) -> HttpRequest:
        user_list = self.user_list(audience_id)
        job = self.job_body(user_list, with_consent=action == "ADD")
        return HttpRequest(
            method="POST",
            url=f"{self.base}/offlineUserDataJobs:create",
            headers=self.static_headers(),
            body=orjson.dumps(job),
            items=items,
            secret_headers=("authorization", "developer-token"),
            context={"user_list": user_list, "action": action, "full_sync": full},
        )

    def build_group_requests(
        self, audience_id: str, action: Action, items: list[MappedEvent]
    ) -> list[HttpRequest]:
        """One job for the whole group ([CM]: few large jobs); send() cuts the calls."""
        return [self._request(audience_id, action, items, full=False)]

    def build_full_sync(
        self, audience_id: str, members: Sequence[MappedEvent]
    ) -> list[HttpRequest]:
        """ONE job: ``removeAll`` first, then creates for every member, then one run.

        Modelled as a single multi-call request (not one request per chunk) because
        the replace must be atomic from Google's point of view: ``removeAll`` and
        the creates only take effect together when the job runs, so the list is
        never seen empty or half-filled [CM]. Chunks of ``max_identifiers_per_call``
        identifiers go in consecutive addOperations calls of the same job; a retry
        rebuilds the whole job. Such a request is never bisected (a half would lose
        the removeAll); a refusal of the whole job fails every member with the reason.
        """
        return [self._request(audience_id, "ADD", list(members), full=True)]

    def job_body(self, user_list: str, *, with_consent: bool) -> dict[str, Any]:
        """``offlineUserDataJobs:create`` body (§5.2 step 1; consent per [CM] / [EX]).

        Consent is GRANTED for jobs that add: the audience agent only ever adds
        profiles that granted advertising consent. Removal jobs carry no consent
        ([CM]: "for remove requests, consent is not needed") — a withdrawal must
        never be uploaded with consent GRANTED.
        """
        metadata: dict[str, Any] = {"userList": user_list}
        if with_consent:
            metadata["consent"] = {"adUserData": "GRANTED", "adPersonalization": "GRANTED"}
        return {
            "job": {"type": "CUSTOMER_MATCH_USER_LIST", "customerMatchUserListMetadata": metadata}
        }

    @staticmethod
    def operations(action: Action, chunk: Sequence[MappedEvent], *, remove_all: bool) -> list[Any]:
        kind = "create" if action == "ADD" else "remove"
        ops: list[Any] = [{"removeAll": True}] if remove_all else []
        ops.extend({kind: audience_item(item).row} for item in chunk)
        return ops

    def static_headers(self) -> dict[str, str]:
        headers = {
            "developer-token": self.settings.developer_token.get_secret_value(),
            "Content-Type": "application/json",
        }
        if self.settings.login_customer_id:
            headers["login-customer-id"] = self.settings.login_customer_id
        return headers

    # -- sending

    async def send(self, session: aiohttp.ClientSession, request: HttpRequest) -> HttpResponse:
        """create -> addOperations (xN) -> run; the first failing call's answer, else a summary.

        The summary (status 200) carries ``extra["item_errors"]``: item index ->
        (code, message) from every call's ``partialFailureError``.
        """
        token_failure = await self._ensure_token(session)
        if token_failure is not None:
            return token_failure
        headers = {**request.headers, "Authorization": f"Bearer {self._token}"}
        action: Action = request.context["action"]
        full: bool = request.context["full_sync"]

        response = await self._post(session, request.url, headers, request.body, "create")
        if response.status != 200:
            return response
        job = _json(response.body).get("resourceName")
        if not isinstance(job, str) or not job:
            return HttpResponse(
                502, response.headers, b"", extra={"step": "create", "reason": JOB_NOT_CREATED}
            )
        job_url = f"{self.settings.endpoint.rstrip('/')}/{self.settings.api_version}/{job}"

        item_errors: dict[int, tuple[str, str]] = {}
        offset = 0
        chunks = chunk_by_identifiers(request.items, self.settings.max_identifiers_per_call)
        if full and not chunks:
            chunks = [[]]  # an empty audience: the job only clears the list
        for index, chunk in enumerate(chunks):
            lead = 1 if full and index == 0 else 0
            body = {
                "operations": self.operations(action, chunk, remove_all=lead == 1),
                "enablePartialFailure": True,
            }
            response = await self._post(
                session, f"{job_url}:addOperations", headers, orjson.dumps(body), "addOperations"
            )
            if response.status != 200:
                return response
            partial = _json(response.body).get("partialFailureError")
            if isinstance(partial, Mapping):
                for error in google_errors(partial):
                    op = operation_index(error)
                    code, text = error_code(error), str(error.get("message") or "")[:300]
                    if op is None or op < lead or op - lead >= len(chunk):
                        # removeAll refused, or an error we cannot pin on a person: the
                        # job must not run (a sync without its removeAll is no replace).
                        return HttpResponse(
                            200,
                            response.headers,
                            response.body,
                            extra={"step": "addOperations", "job_error": (code, text)},
                        )
                    item_errors[offset + op - lead] = (code, text)
            offset += len(chunk)

        if not full and len(item_errors) == len(request.items):
            # Nothing valid in the job: running it would be a no-op.
            return HttpResponse(200, {}, b"{}", extra={"step": "run", "item_errors": item_errors})
        response = await self._post(session, f"{job_url}:run", headers, b"{}", "run")
        if response.status != 200:
            return response
        response.extra.update({"job": job, "item_errors": item_errors})
        return response

    async def _post(
        self,
        session: aiohttp.ClientSession,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        step: str,
    ) -> HttpResponse:
        started = time.monotonic()
        async with session.post(url, data=body, headers=headers) as resp:
            data = await resp.read()
            return HttpResponse(
                resp.status, resp.headers, data, time.monotonic() - started, {"step": step}
            )

    async def _ensure_token(self, session: aiohttp.ClientSession) -> HttpResponse | None:
        """A usable access token in ``self._token``; a failed refresh's answer otherwise."""
        if not self.settings.can_refresh:
            return None
        async with self._token_lock:
            now = time.monotonic()
            if self._token is not None and (
                self._token_expires is None or now < self._token_expires
            ):
                return None
            s = self.settings
            assert s.refresh_token is not None and s.client_secret is not None
            form = {
                "grant_type": "refresh_token",
                "refresh_token": s.refresh_token.get_secret_value(),
                "client_id": s.client_id or "",
                "client_secret": s.client_secret.get_secret_value(),
            }
            async with session.post(s.token_url, data=form) as resp:
                data = await resp.read()
                if resp.status != 200:
                    return HttpResponse(
                        resp.status, resp.headers, b"", extra={"step": "token", "oauth": True}
                    )
            payload = _json(data)
            token = payload.get("access_token")
            if not isinstance(token, str) or not token:
                return HttpResponse(502, {}, b"", extra={"step": "token", "oauth": True})
            expires_in = payload.get("expires_in")
            ttl = float(expires_in) if isinstance(expires_in, (int, float)) else 3600.0
            self._token = token
            self._token_obtained = now
            self._token_expires = now + max(ttl - 60.0, ttl / 2)  # renew a minute early
            return None

    # -- outcomes

    def classify(self, request: HttpRequest, response: HttpResponse) -> list[ItemOutcome]:
        n = len(request.items)
        full: bool = bool(request.context.get("full_sync"))
        extra = response.extra
        try:
            if extra.get("oauth"):
                raise self._oauth_error(response.status)
            if response.status != 200:
                error = classify_error(response.status, response.body)
                if error.reason in (
                    "UNAUTHENTICATED",
                    "OAUTH_TOKEN_EXPIRED",
                    "OAUTH_TOKEN_INVALID",
                ):
                    error = self._maybe_expired(error)
                raise error
            job_error = extra.get("job_error")
            if job_error is not None:
                code, text = job_error
                raise self._job_level(code, text)
        except Permanent as exc:
            if full or exc.reason in LIST_LEVEL_CODES or exc.reason == INVALID_USER_LIST:
                # Same reason for everyone: dead-letter together, never bisect (see the
                # LIST_LEVEL_CODES note and build_full_sync).
                return [ItemOutcome(exc) for _ in range(n)]
            raise
        errors: Mapping[int, tuple[str, str]] = extra.get("item_errors") or {}
        return [
            ItemOutcome(Permanent(*errors[i])) if i in errors else ItemOutcome() for i in range(n)
        ]

    def _job_level(self, code: str, text: str) -> DeliveryError:
        if code in CONFIG_CODES:
            return ConfigError(code, text)
        if code in RETRY_CODES:
            return Retryable(code, text)
        return Permanent(code, text)

    def _oauth_error(self, status: int) -> DeliveryError:
        if status in (400, 401, 403):
            return ConfigError(OAUTH_REFRESH_FAILED, f"token endpoint answered HTTP {status}")
        return Retryable(OAUTH_REFRESH_FAILED, f"token endpoint answered HTTP {status}")

    def _maybe_expired(self, error: DeliveryError) -> DeliveryError:
        """With a refresh token, a 401 on a token older than a minute means "refresh and retry"."""
        if self.settings.can_refresh and time.monotonic() - self._token_obtained > 60.0:
            self._token_expires = 0.0  # the next send refreshes first
            return Retryable(ACCESS_TOKEN_EXPIRED, error.detail)
        return error


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
