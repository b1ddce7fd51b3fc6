"""Google Ads API emulator: Customer Match through OfflineUserDataJobService (destinations.md §5).

REST routes (``{v}`` is any ``v<N>``, ``{cid}`` the configured customer):

``POST /{v}/customers/{cid}/offlineUserDataJobs:create``          -> ``{"resourceName"}``
``POST /{v}/customers/{cid}/offlineUserDataJobs/{id}:addOperations`` -> ``{}`` or
``{"partialFailureError"}``
``POST /{v}/customers/{cid}/offlineUserDataJobs/{id}:run``          -> a long-running Operation
``POST /{v}/customers/{cid}/googleAds:search``                      -> job status (minimal GAQL)
``POST /token``                                                     OAuth refresh grant stand-in

Rules enforced (§5.7): known user lists only (``INVALID_USER_LIST_ID``), operations
only on PENDING jobs (``JOB_ALREADY_STARTED``), create and remove never in one job
(``CONFLICTING_OPERATION``), ``removeAll`` only as the job's first operation
(``INVALID_OPERATION_ORDER``), <= 20 identifiers per UserData and <= 100,000 per
request (``TOO_MANY_USER_IDENTIFIERS``), SHA-256 hex for hashed fields
(``INVALID_SHA256_FORMAT``, per operation under partial failure, and recorded as a
PII violation), ISO country codes (``INVALID_COUNTRY_CODE``), exactly one field per
UserIdentifier (a oneof: a second field is a JSON parse error for the whole request),
401 without ``Authorization`` or ``developer-token``, 403 for another customer or an
unknown ``login-customer-id``, consent DENIED -> ``CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS``,
quota mode -> 429 ``RESOURCE_EXHAUSTED`` with ``quotaErrorDetails.retryDelay`` (no
Retry-After header: Google has none, §8.2). Without partial failure a request with
any bad operation is refused whole and nothing of it is kept.

Jobs go PENDING -> RUNNING (on ``:run``) -> SUCCESS after ``run_delay_s``; the
operations are applied to the list's membership only then, and jobs of one list
apply in the order they were run (an assumption: Google documents no ordering).
A job that is never run never changes anything — which is what makes a client's
"retry with a new job" safe.

Membership is a set of rows per list; a row is one person's identifiers (a
``frozenset`` of ``(kind, value)`` pairs, addressInfo as one value). ``remove``
drops every row sharing an identifier with it (Google matches per identifier);
``removeAll`` clears the list. ``state.accepted`` records applied operations;
``unconsented_adds`` counts creates in jobs without GRANTED consent.

Unconfirmed parts modelled with a sensible default: the status and code for a
missing ``developer-token`` (401, ``RequestError.DEVELOPER_TOKEN_PARAMETER_MISSING``),
the ordering of jobs on one list, what happens to a never-run job (kept PENDING).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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

#: Fake credentials of the emulator, never real ones.
DEFAULT_CUSTOMER_ID = "1234567890"
DEFAULT_DEVELOPER_TOKEN = "emulator-developer-token"  # noqa: S105
DEFAULT_ACCESS_TOKEN = "emulator-access-token"  # noqa: S105
DEFAULT_CLIENT_ID = "emulator-client.apps.example"
DEFAULT_CLIENT_SECRET = "emulator-client-secret"  # noqa: S105
DEFAULT_REFRESH_TOKEN = "emulator-refresh-token"  # noqa: S105
API_PREFIX = "google.ads.googleads"
MAX_IDENTIFIERS_PER_USER_DATA = 20
MAX_IDENTIFIERS_PER_REQUEST = 100_000
HASHED_FIELDS = ("hashedEmail", "hashedPhoneNumber")
HASHED_ADDRESS_FIELDS = ("hashedFirstName", "hashedLastName", "hashedStreetAddress")
ADDRESS_FIELDS = frozenset({*HASHED_ADDRESS_FIELDS, "city", "state", "countryCode", "postalCode"})
IDENTIFIER_FIELDS = frozenset(
    {"hashedEmail", "hashedPhoneNumber", "mobileId", "thirdPartyUserId", "addressInfo"}
)
#: ISO 3166-1 alpha-2 (officially assigned codes).
ISO_COUNTRIES = frozenset(
    """AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO
    BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK
    DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR
    GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM
    KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP
    MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL
    PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST
    SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG
    VI VN VU WF WS YE YT ZA ZM ZW""".split()  # noqa: SIM905 - a table, not a list literal
)
RPC_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
JOB_RESOURCE_RE = re.compile(r"offline_user_data_job\.resource_name\s*=\s*'([^']+)'")

Row = frozenset[tuple[str, str]]


def _hash_rules() -> tuple[HashRule, ...]:
    rules = []
    for op in ("create", "remove"):
        base = f"operations[*].{op}.userIdentifiers[*]"
        rules += [HashRule(f"{base}.{f}") for f in HASHED_FIELDS]
        rules += [HashRule(f"{base}.addressInfo.{f}") for f in HASHED_ADDRESS_FIELDS]
    return tuple(rules)


@dataclass
class Job:
    id: int
    user_list: str
    consent: Mapping[str, Any]
    status: str = "PENDING"
    #: "create" / "remove" once the first such operation was added
    kind: str | None = None
    #: applied operations in order: ("removeAll", None) / ("create"|"remove", UserData)
    ops: list[tuple[str, Any]] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    failure_reason: str | None = None

    @property
    def consent_granted(self) -> bool:
        return (
            self.consent.get("adUserData") == "GRANTED"
            and self.consent.get("adPersonalization") == "GRANTED"
        )


class OperationError(Exception):
    def __init__(self, kind: str, code: str, message: str, path: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.message = message
        self.path = tuple(path)


def row_of(user_data: Mapping[str, Any]) -> Row:
    """A person as the emulator stores them: their identifiers as (kind, value) pairs."""
    pairs: set[tuple[str, str]] = set()
    for ident in user_data.get("userIdentifiers") or ():
        for kind, value in ident.items():
            if kind == "userIdentifierSource":
                continue
            if kind == "addressInfo" and isinstance(value, Mapping):
                text = "|".join(f"{k}={value[k]}" for k in sorted(value))
                pairs.add(("addressInfo", text))
            else:
                pairs.add((kind, str(value)))
    return frozenset(pairs)


class GoogleAdsEmulator(Emulator):
    name: ClassVar[str] = "google_ads"
    hash_rules: ClassVar[tuple[HashRule, ...]] = _hash_rules()

    def __init__(
        self,
        *,
        customer_id: str = DEFAULT_CUSTOMER_ID,
        user_lists: Iterable[str | int] = ("1001", "1002", "1003"),
        developer_token: str = DEFAULT_DEVELOPER_TOKEN,
        access_token: str = DEFAULT_ACCESS_TOKEN,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        refresh_token: str = DEFAULT_REFRESH_TOKEN,
        token_ttl_s: int = 3600,
        manager_ids: Iterable[str] = ("9876543210",),
        run_delay_s: float = 0.05,
        terms_accepted: bool = True,
        quota_mode: bool = False,
        quota_retry_delay_s: float = 30.0,
        remove_all_unsupported: Iterable[str | int] = (),
        max_operations_per_request: int | None = None,
    ) -> None:
        # Hashed fields must be SHA-256 hex (hash_rules); anywhere else a raw email
        # (in postalCode, thirdPartyUserId, ...) is recorded as a violation too.
        super().__init__(forbid_raw_email=True)
        self.customer_id = customer_id
        self.developer_token = developer_token
        self.access_token = access_token
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_token = refresh_token
        self.token_ttl_s = token_ttl_s
        self.manager_ids = set(manager_ids)
        self.run_delay_s = run_delay_s
        self.terms_accepted = terms_accepted
        self.quota_mode = quota_mode
        self.quota_retry_delay_s = quota_retry_delay_s
        self.user_lists: set[str] = {self.list_name(u) for u in user_lists}
        self.remove_all_unsupported = {self.list_name(u) for u in remove_all_unsupported}
        #: A test knob, not a Google rule (Google limits identifiers, not operations):
        #: lets a test make the per-request limit small and check the client's split.
        self.max_operations_per_request = max_operations_per_request
        self._ids = itertools.count(5001)
        self._reset_vendor_state()

    def _reset_vendor_state(self) -> None:
        self.jobs: dict[int, Job] = {}
        self.membership: dict[str, set[Row]] = {u: set() for u in self.user_lists}
        self.issued_tokens: set[str] = set()
        self.unconsented_adds = 0
        self.calls: dict[str, int] = {}
        #: the previous job's application task per list: jobs apply in run order
        self._last_apply: dict[str, asyncio.Task[None]] = {}

    def reset(self) -> None:
        super().reset()
        self._reset_vendor_state()

    async def _h_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return json_response({"reset": True})

    def list_name(self, user_list: str | int) -> str:
        text = str(user_list)
        return (
            text
            if text.startswith("customers/")
            else f"customers/{self.customer_id}/userLists/{text}"
        )

    # ------------------------------------------------------------------ test API

    def members(self, audience_id: str | int) -> set[Row]:
        """Current membership of a user list (resource name or bare id)."""
        return set(self.membership.get(self.list_name(audience_id), set()))

    def member_values(self, audience_id: str | int, kind: str = "hashedEmail") -> set[str]:
        return {v for row in self.members(audience_id) for k, v in row if k == kind}

    def add_user_list(self, user_list: str | int) -> str:
        name = self.list_name(user_list)
        self.user_lists.add(name)
        self.membership.setdefault(name, set())
        return name

    def quota_next(self, count: int = 1, retry_delay_s: float = 1.0) -> None:
        """The next ``count`` API calls answer 429 RESOURCE_EXHAUSTED with this retryDelay."""
        self.throttle_next(count, retry_after_s=retry_delay_s)

    async def settle(self) -> None:
        """Wait until every job that was run has been applied (for tests)."""
        tasks = list(self._last_apply.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def credentials(self) -> dict[str, str]:
        return {
            "customer_id": self.customer_id,
            "developer_token": self.developer_token,
            "access_token": self.access_token,
        }

    def refresh_credentials(self, url: str) -> dict[str, str]:
        """Settings for the refresh-token flow against this emulator's ``/token``."""
        return {
            "customer_id": self.customer_id,
            "developer_token": self.developer_token,
            "refresh_token": self.refresh_token,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "token_url": f"{url}/token",
        }

    # ------------------------------------------------------------------ routes

    def add_routes(self, router: web.UrlDispatcher) -> None:
        base = r"/{version:v\d+}/customers/{cid:\d+}"
        router.add_post(f"{base}/offlineUserDataJobs:create", self._h_create)
        router.add_post(rf"{base}/offlineUserDataJobs/{{job:\d+}}:addOperations", self._h_add)
        router.add_post(rf"{base}/offlineUserDataJobs/{{job:\d+}}:run", self._h_run)
        router.add_post(f"{base}/googleAds:search", self._h_search)
        router.add_post("/token", self._h_token)

    def error_response(
        self, status: int, *, retry_after_s: float | None = None, body: Any = None
    ) -> web.Response:
        """Google-shaped errors for injected faults; a 429 names its delay in the body only."""
        if body is None:
            errors: list[dict[str, Any]] = []
            if status == 429:
                err: dict[str, Any] = {
                    "errorCode": {"quotaError": "RESOURCE_EXHAUSTED"},
                    "message": "Too many requests. Retry in the time given in retryDelay.",
                }
                if retry_after_s is not None:
                    err["details"] = {
                        "quotaErrorDetails": {
                            "rateScope": "DEVELOPER",
                            "rateName": "Number of operations for basic access",
                            "retryDelay": _duration(retry_after_s),
                        }
                    }
                errors.append(err)
            elif status >= 500:
                errors.append(
                    {"errorCode": {"internalError": "TRANSIENT_ERROR"}, "message": "injected"}
                )
            body = self._envelope(status, errors, "injected fault")
        return json_response(body, status)

    def _envelope(self, status: int, errors: list[dict[str, Any]], message: str) -> dict[str, Any]:
        error: dict[str, Any] = {
            "code": status,
            "message": message,
            "status": RPC_STATUS.get(status, "UNKNOWN"),
        }
        if errors:
            error["details"] = [self._failure(errors)]
        return {"error": error}

    @staticmethod
    def _failure(errors: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "@type": f"type.googleapis.com/{API_PREFIX}.v25.errors.GoogleAdsFailure",
            "errors": errors,
            "requestId": f"emu-{time.monotonic_ns():x}",
        }

    def _fail(self, path: str, status: int, kind: str, code: str, message: str) -> web.Response:
        self.state.reject_request(path, status, code, message)
        errors = [{"errorCode": {kind: code}, "message": message}] if kind else []
        return json_response(self._envelope(status, errors, message), status)

    def _call(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.state.count(name)

    def _check_access(self, request: web.Request) -> web.Response | None:
        """Auth, developer token, customer and manager checks; quota mode."""
        path = request.path
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return self._fail(
                path,
                401,
                "authenticationError",
                "OAUTH_TOKEN_HEADER_INVALID",
                "Request is missing required authentication credential.",
            )
        if token != self.access_token and token not in self.issued_tokens:
            return self._fail(
                path,
                401,
                "authenticationError",
                "OAUTH_TOKEN_INVALID",
                "Request had invalid authentication credentials.",
            )
        dev = request.headers.get("developer-token")
        if not dev:
            return self._fail(
                path,
                401,
                "requestError",
                "DEVELOPER_TOKEN_PARAMETER_MISSING",
                "The developer token is not set in the request headers.",
            )
        if dev != self.developer_token:
            return self._fail(
                path,
                401,
                "authenticationError",
                "DEVELOPER_TOKEN_INVALID",
                "The developer token is not valid.",
            )
        if request.match_info.get("cid") != self.customer_id:
            return self._fail(
                path,
                403,
                "authorizationError",
                "USER_PERMISSION_DENIED",
                "The caller does not have permission on this customer.",
            )
        login = request.headers.get("login-customer-id")
        if login is not None and login not in self.manager_ids | {self.customer_id}:
            return self._fail(
                path,
                403,
                "headerError",
                "INVALID_LOGIN_CUSTOMER_ID",
                "login-customer-id is not a manager of this customer.",
            )
        if self.quota_mode:
            self.state.reject_request(path, 429, "RESOURCE_EXHAUSTED", "quota mode")
            return self.error_response(429, retry_after_s=self.quota_retry_delay_s)
        return None

    async def _body(self, request: web.Request) -> Any:
        try:
            payload = parse_json(await read_body(request))
        except BodyError as exc:
            raise web.HTTPBadRequest(text=exc.message) from exc
        return payload

    def _job_of(self, request: web.Request) -> Job | None:
        return self.jobs.get(int(request.match_info["job"]))

    # ------------------------------------------------------------------ create

    async def _h_create(self, request: web.Request) -> web.Response:
        path = request.path
        self._call("create")
        denied = self._check_access(request)
        if denied is not None:
            return denied
        body = await self._body(request)
        job = body.get("job") if isinstance(body, dict) else None
        if not isinstance(job, dict) or not job.get("type"):
            return self._fail(path, 400, "fieldError", "REQUIRED", "job.type is required")
        if job["type"] != "CUSTOMER_MATCH_USER_LIST":
            return self._fail(
                path,
                400,
                "offlineUserDataJobError",
                "INVALID_USER_LIST_TYPE",
                f"the emulator only models CUSTOMER_MATCH_USER_LIST jobs, got {job['type']}",
            )
        metadata = job.get("customerMatchUserListMetadata")
        user_list = metadata.get("userList") if isinstance(metadata, dict) else None
        if not isinstance(user_list, str) or user_list not in self.user_lists:
            return self._fail(
                path,
                400,
                "offlineUserDataJobError",
                "INVALID_USER_LIST_ID",
                "customerMatchUserListMetadata.userList is not a user list of this customer",
            )
        assert isinstance(metadata, dict)
        consent = metadata.get("consent") or {}
        if not isinstance(consent, dict):
            return self._fail(path, 400, "fieldError", "INVALID_VALUE", "consent is an object")
        # [CM]: DENIED consent on the job, or terms not accepted, is refused.
        if not self.terms_accepted or "DENIED" in consent.values():
            return self._fail(
                path,
                400,
                "offlineUserDataJobError",
                "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS",
                "The customer has not accepted the customer data terms.",
            )
        if body.get("validateOnly"):
            return json_response({})
        job_id = next(self._ids)
        self.jobs[job_id] = Job(job_id, user_list, dict(consent))
        return json_response(
            {"resourceName": f"customers/{self.customer_id}/offlineUserDataJobs/{job_id}"}
        )

    # ------------------------------------------------------------------ addOperations

    async def _h_add(self, request: web.Request) -> web.Response:
        path = request.path
        self._call("addOperations")
        denied = self._check_access(request)
        if denied is not None:
            return denied
        body = await self._body(request)
        job = self._job_of(request)
        if job is None:
            return self._fail(path, 404, "", "NOT_FOUND", "Requested entity was not found.")
        if not isinstance(body, dict) or not isinstance(body.get("operations"), list):
            return self._fail(path, 400, "fieldError", "REQUIRED", "operations is required")
        operations: list[Any] = body["operations"]
        if not operations:
            return self._fail(path, 400, "fieldError", "REQUIRED", "operations is empty")
        self.check_pii(path, body)
        if job.status != "PENDING":
            return self._fail(
                path,
                400,
                "offlineUserDataJobError",
                "JOB_ALREADY_STARTED",
                "Once the upload job is started, new operations cannot be added.",
            )
        # A UserIdentifier is a oneof: two fields in one is a JSON parse error (whole call).
        total = 0
        for i, op in enumerate(operations):
            kind, data = _user_data(op)
            idents = data.get("userIdentifiers") if data is not None else None
            if not isinstance(idents, list):
                continue
            total += len(idents)
            for ident in idents:
                if isinstance(ident, dict) and len(set(ident) & IDENTIFIER_FIELDS) > 1:
                    return self._fail(
                        path,
                        400,
                        "",
                        "INVALID_ARGUMENT",
                        f"Invalid JSON payload received. operations[{i}].{kind}: "
                        "oneof field 'identifier' is already set.",
                    )
        limit = self.max_operations_per_request
        if limit is not None and len(operations) > limit:
            return self._fail(
                path,
                400,
                "requestError",
                "TOO_MANY_OPERATIONS",
                f"{len(operations)} operations in one request; this emulator allows {limit}",
            )
        if total > MAX_IDENTIFIERS_PER_REQUEST:
            return self._fail(
                path,
                400,
                "offlineUserDataJobError",
                "TOO_MANY_USER_IDENTIFIERS",
                f"{total} user identifiers in one request; the limit is 100,000",
            )
        partial = bool(body.get("enablePartialFailure"))
        validate_only = bool(body.get("validateOnly"))
        kind_so_far = job.kind
        has_ops = bool(job.ops)
        accepted: list[tuple[str, Any]] = []
        failures: list[dict[str, Any]] = []
        for i, op in enumerate(operations):
            try:
                parsed = self._operation(op, job, kind_so_far, has_ops or bool(accepted) or i > 0)
            except OperationError as exc:
                failures.append(
                    {
                        "errorCode": {exc.kind: exc.code},
                        "message": exc.message,
                        "location": {
                            "fieldPathElements": [
                                {"fieldName": "operations", "index": i},
                                *(
                                    {"fieldName": p} if isinstance(p, str) else {"index": p}
                                    for p in exc.path
                                ),
                            ]
                        },
                    }
                )
                self.state.reject_item(path, i, exc.code, exc.message)
                continue
            if parsed[0] != "removeAll" and kind_so_far is None:
                kind_so_far = parsed[0]
            accepted.append(parsed)
        if failures and not partial:
            self.state.reject_request(path, 400, failures[0]["errorCode"], "operations refused")
            return json_response(
                self._envelope(400, failures, "Request contains an invalid argument."), 400
            )
        if not validate_only:
            job.ops.extend(accepted)
            job.kind = kind_so_far
            self.state.count("operations_added", len(accepted))
        if failures:
            return json_response(
                {
                    "partialFailureError": {
                        "code": 3,
                        "message": "Multiple errors in 'details'. First error: "
                        + failures[0]["message"],
                        "details": [self._failure(failures)],
                    }
                }
            )
        return json_response({})

    def _operation(
        self, op: Any, job: Job, kind_so_far: str | None, not_first: bool
    ) -> tuple[str, Any]:
        if not isinstance(op, dict):
            raise OperationError("fieldError", "REQUIRED", "operation must be an object")
        present = [k for k in ("create", "remove", "removeAll") if k in op]
        if len(present) != 1:
            raise OperationError(
                "fieldError", "REQUIRED", "exactly one of create, remove, removeAll is required"
            )
        kind = present[0]
        if kind == "removeAll":
            if op["removeAll"] is not True:
                raise OperationError("fieldError", "INVALID_VALUE", "removeAll must be true")
            if job.user_list in self.remove_all_unsupported:
                raise OperationError(
                    "offlineUserDataJobError",
                    "REMOVE_ALL_NOT_SUPPORTED",
                    "Remove-all is not supported for this list.",
                    ("removeAll",),
                )
            if not_first:
                raise OperationError(
                    "offlineUserDataJobError",
                    "INVALID_OPERATION_ORDER",
                    "When a remove-all operation is provided, it has to be the first operation.",
                    ("removeAll",),
                )
            return ("removeAll", None)
        if kind_so_far is not None and kind_so_far != kind:
            raise OperationError(
                "offlineUserDataJobError",
                "CONFLICTING_OPERATION",
                "Mixing creation and removal of offline data in the same job is not allowed.",
                (kind,),
            )
        data = op[kind]
        if not isinstance(data, dict):
            raise OperationError("fieldError", "REQUIRED", f"{kind} must be a UserData", (kind,))
        idents = data.get("userIdentifiers")
        if not isinstance(idents, list) or not idents:
            raise OperationError(
                "offlineUserDataJobError",
                "MISSING_USER_IDENTIFIER",
                "The user identifier is missing valid data.",
                (kind,),
            )
        if len(idents) > MAX_IDENTIFIERS_PER_USER_DATA:
            raise OperationError(
                "offlineUserDataJobError",
                "TOO_MANY_USER_IDENTIFIERS",
                "Maximum number of user identifiers per operation is 20.",
                (kind,),
            )
        for j, ident in enumerate(idents):
            self._identifier(ident, (kind, "userIdentifiers", j))
        return (kind, data)

    def _identifier(self, ident: Any, where: tuple[Any, ...]) -> None:
        if not isinstance(ident, dict):
            raise OperationError("fieldError", "REQUIRED", "identifier must be an object", where)
        fields = [k for k in ident if k in IDENTIFIER_FIELDS]
        unknown = [k for k in ident if k not in IDENTIFIER_FIELDS and k != "userIdentifierSource"]
        if unknown or not fields:
            raise OperationError(
                "offlineUserDataJobError",
                "MISSING_USER_IDENTIFIER",
                "The user identifier is missing valid data.",
                where,
            )
        field_name = fields[0]
        value = ident[field_name]
        if field_name in HASHED_FIELDS:
            self._sha256(value, (*where, field_name))
        elif field_name == "addressInfo":
            if not isinstance(value, dict) or set(value) - ADDRESS_FIELDS:
                raise OperationError(
                    "fieldError", "INVALID_VALUE", "unknown addressInfo field", (*where, field_name)
                )
            for part in HASHED_ADDRESS_FIELDS:
                if part in value:
                    self._sha256(value[part], (*where, field_name, part))
            country = value.get("countryCode")
            if country is not None and (
                not isinstance(country, str) or country.upper() not in ISO_COUNTRIES
            ):
                raise OperationError(
                    "offlineUserDataJobError",
                    "INVALID_COUNTRY_CODE",
                    "The country code is invalid.",
                    (*where, field_name, "countryCode"),
                )
        elif not isinstance(value, str) or not value:
            raise OperationError(
                "offlineUserDataJobError",
                "MISSING_USER_IDENTIFIER",
                "The user identifier is missing valid data.",
                where,
            )

    @staticmethod
    def _sha256(value: Any, where: tuple[Any, ...]) -> None:
        if not isinstance(value, str) or not SHA256_HEX_RE.match(value):
            raise OperationError(
                "offlineUserDataJobError",
                "INVALID_SHA256_FORMAT",
                "The SHA256 encoded value is malformed.",
                where,
            )

    # ------------------------------------------------------------------ run / apply

    async def _h_run(self, request: web.Request) -> web.Response:
        path = request.path
        self._call("run")
        denied = self._check_access(request)
        if denied is not None:
            return denied
        await request.read()
        job = self._job_of(request)
        if job is None:
            return self._fail(path, 404, "", "NOT_FOUND", "Requested entity was not found.")
        if job.status != "PENDING":
            return self._fail(
                path,
                400,
                "offlineUserDataJobError",
                "JOB_ALREADY_STARTED",
                "The job was already run.",
            )
        job.status = "RUNNING"
        previous = self._last_apply.get(job.user_list)
        self._last_apply[job.user_list] = asyncio.get_running_loop().create_task(
            self._apply_later(job, previous)
        )
        op_name = f"customers/{self.customer_id}/operations/{job.id}"
        return json_response(
            {
                "name": op_name,
                "metadata": {
                    "@type": f"type.googleapis.com/{API_PREFIX}.v25.resources."
                    "OfflineUserDataJobMetadata",
                    "matchRateRange": "MATCH_RANGE_UNSPECIFIED",
                },
                "done": False,
            }
        )

    async def _apply_later(self, job: Job, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        await asyncio.sleep(self.run_delay_s)
        self.apply(job)

    def apply(self, job: Job) -> None:
        """Run a job's operations against its list (PENDING/RUNNING -> SUCCESS)."""
        members = self.membership.setdefault(job.user_list, set())
        path = f"jobs/{job.id}"
        for kind, data in job.ops:
            if kind == "removeAll":
                members.clear()
                self.state.accept({"userList": job.user_list, "op": "removeAll"}, path=path)
                continue
            row = row_of(data)
            if kind == "create":
                if not job.consent_granted:
                    self.unconsented_adds += 1
                    self.state.count("unconsented_adds")
                members.add(row)
            else:
                members.difference_update([m for m in members if m & row])
            key = f"{job.user_list}|{kind}|{sorted(row)}"
            self.state.accept(
                {"userList": job.user_list, "op": kind, "userData": data}, path=path, key=key
            )
        job.status = "SUCCESS"
        self.state.count("jobs_succeeded")

    # ------------------------------------------------------------------ search / token

    async def _h_search(self, request: web.Request) -> web.Response:
        self._call("search")
        denied = self._check_access(request)
        if denied is not None:
            return denied
        body = await self._body(request)
        query = str(body.get("query") or "") if isinstance(body, dict) else ""
        if "offline_user_data_job" not in query:
            return self._fail(
                request.path,
                400,
                "queryError",
                "PROHIBITED_RESOURCE_TYPE_IN_FROM_CLAUSE",
                "the emulator answers queries on offline_user_data_job only",
            )
        wanted = JOB_RESOURCE_RE.search(query)
        results = []
        for job in self.jobs.values():
            name = f"customers/{self.customer_id}/offlineUserDataJobs/{job.id}"
            if wanted is not None and wanted.group(1) != name:
                continue
            row: dict[str, Any] = {
                "resourceName": name,
                "id": str(job.id),
                "status": job.status,
                "type": "CUSTOMER_MATCH_USER_LIST",
                "customerMatchUserListMetadata": {"userList": job.user_list},
            }
            if job.failure_reason:
                row["failureReason"] = job.failure_reason
            results.append({"offlineUserDataJob": row})
        return json_response({"results": results, "fieldMask": "offlineUserDataJob.status"})

    async def _h_token(self, request: web.Request) -> web.Response:
        """OAuth 2.0 refresh grant (RFC 6749 §6) as Google's token endpoint answers it."""
        form = await request.post()
        if (
            form.get("grant_type") != "refresh_token"
            or form.get("client_id") != self.client_id
            or form.get("client_secret") != self.client_secret
            or form.get("refresh_token") != self.refresh_token
        ):
            self.state.reject_request(request.path, 400, "invalid_grant", "refresh refused")
            return json_response(
                {"error": "invalid_grant", "error_description": "Bad Request"}, 400
            )
        token = f"ya29.emulator-{len(self.issued_tokens) + 1}-{time.monotonic_ns():x}"
        self.issued_tokens.add(token)
        self.state.count("tokens_issued")
        return json_response(
            {
                "access_token": token,
                "expires_in": self.token_ttl_s,
                "token_type": "Bearer",
                "scope": "https://www.googleapis.com/auth/adwords",
            }
        )

    def expire_tokens(self) -> None:
        """Invalidate every refreshed token (a 401 follows until the client refreshes)."""
        self.issued_tokens.clear()


def _user_data(op: Any) -> tuple[str, dict[str, Any] | None]:
    """(``create``/``remove``, its UserData) of an operation; (``""``, None) for others."""
    if isinstance(op, dict):
        for kind in ("create", "remove"):
            data = op.get(kind)
            if isinstance(data, dict):
                return kind, data
    return "", None


def _duration(seconds: float) -> str:
    """A protobuf Duration as JSON: ``"30s"``, ``"1.500s"``."""
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{seconds:.3f}s"
