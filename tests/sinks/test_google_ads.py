"""Google Ads Customer Match: mapping, job bodies, the error table, the emulator, the engine.

Three layers, as for every destination: pure unit tests of the vendor contract
(destinations.md §5), the destination's ``send`` against the emulator in the same
event loop, and the engine on the real broker and registry with AudienceUpdate
records produced to a private topic.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from pydantic import ValidationError

from sinks.audience_base import FullSyncMember
from sinks.audience_sync import full_sync
from sinks.base import (
    ConfigError,
    HttpRequest,
    HttpResponse,
    MappedEvent,
    Permanent,
    Retryable,
    Throttled,
)
from sinks.emulators import start_all
from sinks.emulators.google_ads import GoogleAdsEmulator, row_of
from sinks.engine import SinkEngineSettings, emulator_env, load_destinations, make_session
from sinks.google_ads import (
    ACCESS_TOKEN_EXPIRED,
    INCOMPLETE_IDENTIFIERS,
    INVALID_USER_LIST,
    GoogleAdsDestination,
    GoogleAdsSettings,
    chunk_by_identifiers,
    classify_error,
    user_data,
)
from sources.kafka_producer import ReliableProducer
from streams import topics
from streams.audiences.identifiers import identifiers_for, sha256_hex
from streams.serde import AvroSerde
from streams.settings import Settings
from streams.topics import TopicSpec, ensure_topics
from tests.conftest import StackEndpoints
from tests.sinks.contract import ContractHooks, DlqTail, fast_engine, running, wait_until

CID = "1234567890"
LIST = f"customers/{CID}/userLists/1001"
OTHER_LIST = f"customers/{CID}/userLists/1002"


#: Per-destination knobs for the shared contract suite (tests/sinks/contract.py).
def _refused_identifiers(user: str) -> dict[str, str]:
    """Hashed like the agent hashes them, but a country Google refuses per row."""
    ids = dict(identifiers_for("google_ads", {"email": f"{user}@example.com"}))
    ids.update(
        {
            "addressInfo.hashedFirstName": sha256_hex("jane"),
            "addressInfo.hashedLastName": sha256_hex("doe"),
            "addressInfo.countryCode": "XX",
            "addressInfo.postalCode": "94045",
        }
    )
    return ids


CONTRACT_HOOKS = ContractHooks(
    emulator_kwargs={"run_delay_s": 0.0},
    settings={"batch_wait_s": 0.2},
    audience_id=LIST,
    rejected_identifiers=_refused_identifiers,
    request_limit=("max_batch_events", "max_operations_per_request"),
)


# --------------------------------------------------------------------------- helpers


def person(i: int, **traits: Any) -> dict[str, str]:
    """Identifiers the audience agent would emit for a realistic profile."""
    base: dict[str, Any] = {
        "email": f" Person.{i}@Example.COM ",
        "phone": f"+1 (800) 555-{i:04d}",
        "firstName": "Alex",
        "lastName": f"Quinn{i}",
        "address": {"country": "us", "postalCode": "94045"},
    }
    base.update(traits)
    return identifiers_for("google_ads", base)


def update(
    i: int,
    action: str = "ADD",
    *,
    audience_id: str = LIST,
    identifiers: Mapping[str, str] | None = None,
    platform: str = "google_ads",
    version: int = 1,
) -> dict[str, Any]:
    now = int(time.time() * 1000)
    return {
        "updateId": uuid.uuid4().hex,
        "audience": "cart-abandoners",
        "audienceVersion": "v1",
        "platform": platform,
        "platformAudienceId": audience_id,
        "profileId": f"profile-{i}",
        "action": action,
        "reason": "RULE_MATCHED" if action == "ADD" else "RULE_UNMATCHED",
        "identifiers": dict(identifiers if identifiers is not None else person(i)),
        "membershipVersion": version,
        "occurredAt": now,
        "triggerMessageId": None,
        "triggerReceivedAt": now,
        "emittedAt": now,
    }


def settings_for(url: str = "http://emulator.invalid", **overrides: Any) -> GoogleAdsSettings:
    values: dict[str, Any] = {
        "endpoint": url,
        "customer_id": CID,
        "developer_token": "emulator-developer-token",
        "access_token": "emulator-access-token",
    }
    values.update(overrides)
    return GoogleAdsSettings(**values)


def destination(url: str = "http://emulator.invalid", **overrides: Any) -> GoogleAdsDestination:
    return GoogleAdsDestination(settings_for(url, **overrides))


def mapped(dest: GoogleAdsDestination, *updates: dict[str, Any]) -> list[MappedEvent]:
    out = []
    for u in updates:
        m = dest.map(u)
        assert m is not None
        out.append(m)
    return out


def body_of(request: HttpRequest) -> Any:
    return orjson.loads(request.body)


def google_error(status: int, rpc: str, errors: list[dict[str, Any]] | None = None) -> bytes:
    error: dict[str, Any] = {"code": status, "message": "m", "status": rpc}
    if errors is not None:
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.ads.googleads.v25.errors.GoogleAdsFailure",
                "errors": errors,
            }
        ]
    return orjson.dumps({"error": error})


@asynccontextmanager
async def served(**kwargs: Any) -> AsyncIterator[tuple[GoogleAdsEmulator, str]]:
    allow_pii = kwargs.pop("_allow_pii", False)
    emu = GoogleAdsEmulator(**{"run_delay_s": 0.0, **kwargs})
    async with emu.serve() as url:
        yield emu, url
        assert allow_pii or emu.state.pii_violations == [], emu.state.pii_violations


async def deliver(
    dest: GoogleAdsDestination, request: HttpRequest
) -> tuple[HttpResponse, list[Any]]:
    """send + classify, as the engine's Deliverer does for one attempt."""
    async with make_session(dest) as session:
        response = await dest.send(session, request)
    return response, dest.classify(request, response)


# --------------------------------------------------------------------------- mapping


def test_user_data_has_one_field_per_identifier_and_one_address() -> None:
    ids = person(7)
    row = user_data(ids)
    idents = row["userIdentifiers"]
    assert [next(iter(i)) for i in idents] == ["hashedEmail", "hashedPhoneNumber", "addressInfo"]
    assert all(len(i) == 1 for i in idents), "a UserIdentifier sets exactly one field"
    assert idents[0]["hashedEmail"] == sha256_hex("person.7@example.com")
    # Google hashes E.164 *with* the plus sign (§8.4).
    assert idents[1]["hashedPhoneNumber"] == sha256_hex("+18005550007")
    assert idents[2]["addressInfo"] == {
        "countryCode": "US",
        "hashedFirstName": sha256_hex("alex"),
        "hashedLastName": sha256_hex("quinn7"),
        "postalCode": "94045",
    }


def test_incomplete_address_is_left_out_and_nothing_matchable_is_refused() -> None:
    ids = {"hashedEmail": sha256_hex("a@b.co"), "addressInfo.countryCode": "US"}
    assert user_data(ids) == {"userIdentifiers": [{"hashedEmail": sha256_hex("a@b.co")}]}
    with pytest.raises(Permanent) as exc:
        user_data({"addressInfo.countryCode": "US", "addressInfo.postalCode": "94045"})
    assert exc.value.reason == INCOMPLETE_IDENTIFIERS


def test_map_takes_only_google_updates_and_checks_the_user_list() -> None:
    dest = destination()
    assert dest.map(update(1, platform="meta")) is None
    m = dest.map(update(1))
    assert m is not None and m.message_id and m.order_key == "profile-1"
    # A bare list id is read as a list of the configured customer.
    bare = dest.map(update(2, audience_id="1001"))
    assert bare is not None
    with pytest.raises(Permanent) as exc:
        dest.map(update(3, audience_id="customers/9999999999/userLists/1001"))
    assert exc.value.reason == INVALID_USER_LIST
    with pytest.raises(Permanent) as exc:
        dest.map(update(3, audience_id="userLists/1001"))
    assert exc.value.reason == INVALID_USER_LIST


def test_map_refuses_raw_pii_before_any_request() -> None:
    dest = destination()
    with pytest.raises(Permanent) as exc:
        dest.map(update(1, identifiers={"hashedEmail": "jane@example.com"}))
    assert exc.value.reason == "UNHASHED_IDENTIFIER"
    assert "jane" not in str(exc.value)


def test_settings_validate_ids_and_credentials() -> None:
    s = settings_for(customer_id="123-456-7890", login_customer_id="987-654-3210")
    assert (s.customer_id, s.login_customer_id) == ("1234567890", "9876543210")
    with pytest.raises(ValidationError):
        settings_for(customer_id="12345")
    with pytest.raises(ValidationError):
        settings_for(customer_id="customers/1234567890")
    with pytest.raises(ValidationError) as exc:
        settings_for(access_token=None)
    assert exc.value.errors()[0]["type"] == "not_configured"
    with pytest.raises(ValidationError):
        settings_for(refresh_token="r")  # without client id and secret
    assert "dev-token-value" not in repr(settings_for(developer_token="dev-token-value"))


# --------------------------------------------------------------------------- request bodies


def test_add_job_carries_consent_and_remove_job_does_not() -> None:
    dest = destination()
    batch = mapped(dest, update(1), update(2, "REMOVE"), update(3))
    requests = dest.build_requests(batch)
    assert [r.context["action"] for r in requests] == ["ADD", "REMOVE"]
    assert [len(r.items) for r in requests] == [2, 1]
    add, remove = (body_of(r)["job"] for r in requests)
    assert add == {
        "type": "CUSTOMER_MATCH_USER_LIST",
        "customerMatchUserListMetadata": {
            "userList": LIST,
            "consent": {"adUserData": "GRANTED", "adPersonalization": "GRANTED"},
        },
    }
    assert remove["customerMatchUserListMetadata"] == {"userList": LIST}
    assert requests[0].url.endswith(f"/v25/customers/{CID}/offlineUserDataJobs:create")
    headers = requests[0].headers
    assert headers["developer-token"] == "emulator-developer-token"
    assert "developer-token" in requests[0].secret_headers
    assert "login-customer-id" not in headers
    ops = dest.operations("REMOVE", batch[1:2], remove_all=False)
    assert list(ops[0]) == ["remove"]
    full_ops = dest.operations("ADD", batch[:1], remove_all=True)
    assert full_ops[0] == {"removeAll": True} and list(full_ops[1]) == ["create"]


def test_a_profile_changing_twice_gets_jobs_in_order() -> None:
    dest = destination()
    batch = mapped(dest, update(1), update(1, "REMOVE", version=2), update(1, version=3))
    requests = dest.build_requests(batch)
    assert [r.context["action"] for r in requests] == ["ADD", "REMOVE", "ADD"]


def test_chunks_respect_the_identifier_limit_without_splitting_a_person() -> None:
    dest = destination()
    batch = mapped(dest, *(update(i) for i in range(10)))  # 3 identifiers each
    chunks = chunk_by_identifiers(batch, 7)
    assert [len(c) for c in chunks] == [2, 2, 2, 2, 2]
    assert sum(len(c) for c in chunks) == 10
    assert [len(c) for c in chunk_by_identifiers(batch, 10_000)] == [10]
    limits = dest.limits
    # ~10k identifiers per call recommended, <= 100k per request (§5.4).
    assert limits.max_batch_events * 3 <= 100_000


# --------------------------------------------------------------------------- error table

QUOTA = {
    "errorCode": {"quotaError": "RESOURCE_EXHAUSTED"},
    "details": {"quotaErrorDetails": {"rateScope": "DEVELOPER", "retryDelay": "30s"}},
}


@pytest.mark.parametrize(
    ("status", "body", "kind", "reason"),
    [
        (429, google_error(429, "RESOURCE_EXHAUSTED", [QUOTA]), Throttled, "RESOURCE_EXHAUSTED"),
        (429, google_error(429, "RESOURCE_EXHAUSTED"), Throttled, "RESOURCE_EXHAUSTED"),
        (
            400,
            google_error(
                400,
                "INVALID_ARGUMENT",
                [{"errorCode": {"quotaError": "RESOURCE_TEMPORARILY_EXHAUSTED"}}],
            ),
            Throttled,
            "RESOURCE_TEMPORARILY_EXHAUSTED",
        ),
        (500, google_error(500, "INTERNAL"), Retryable, "INTERNAL"),
        (503, google_error(503, "UNAVAILABLE"), Retryable, "UNAVAILABLE"),
        (504, google_error(504, "DEADLINE_EXCEEDED"), Retryable, "DEADLINE_EXCEEDED"),
        (502, b"<html>bad gateway</html>", Retryable, "HTTP_502"),
        (
            409,
            google_error(
                409, "ABORTED", [{"errorCode": {"databaseError": "CONCURRENT_MODIFICATION"}}]
            ),
            Retryable,
            "CONCURRENT_MODIFICATION",
        ),
        (
            401,
            google_error(
                401,
                "UNAUTHENTICATED",
                [{"errorCode": {"authenticationError": "OAUTH_TOKEN_INVALID"}}],
            ),
            ConfigError,
            "UNAUTHENTICATED",
        ),
        (
            401,
            google_error(
                401,
                "UNAUTHENTICATED",
                [{"errorCode": {"requestError": "DEVELOPER_TOKEN_PARAMETER_MISSING"}}],
            ),
            ConfigError,
            "DEVELOPER_TOKEN_PARAMETER_MISSING",
        ),
        (403, google_error(403, "PERMISSION_DENIED"), ConfigError, "PERMISSION_DENIED"),
        (
            400,
            google_error(
                400,
                "INVALID_ARGUMENT",
                [
                    {
                        "errorCode": {
                            "offlineUserDataJobError": "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS"
                        }
                    }
                ],
            ),
            ConfigError,
            "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS",
        ),
        (
            400,
            google_error(
                400,
                "INVALID_ARGUMENT",
                [{"errorCode": {"offlineUserDataJobError": "TOO_MANY_USER_IDENTIFIERS"}}],
            ),
            Permanent,
            "TOO_MANY_USER_IDENTIFIERS",
        ),
        (400, google_error(400, "INVALID_ARGUMENT"), Permanent, "HTTP_400"),
    ],
)
def test_error_table(status: int, body: bytes, kind: type[Exception], reason: str) -> None:
    error = classify_error(status, body)
    assert type(error) is kind
    assert error.reason == reason


def test_retry_delay_comes_from_quota_error_details() -> None:
    error = classify_error(429, google_error(429, "RESOURCE_EXHAUSTED", [QUOTA]))
    assert isinstance(error, Throttled) and error.retry_after_s == 30.0
    fractional = dict(QUOTA, details={"quotaErrorDetails": {"retryDelay": "1.500s"}})
    error = classify_error(429, google_error(429, "RESOURCE_EXHAUSTED", [fractional]))
    assert isinstance(error, Throttled) and error.retry_after_s == 1.5


def test_list_level_errors_fail_every_item_without_bisecting() -> None:
    dest = destination()
    request = dest.build_requests(mapped(dest, update(1), update(2)))[0]
    body = google_error(
        400,
        "INVALID_ARGUMENT",
        [{"errorCode": {"offlineUserDataJobError": "INVALID_USER_LIST_ID"}}],
    )
    outcomes = dest.classify(request, HttpResponse(400, {}, body))
    assert [o.error.reason for o in outcomes if o.error] == ["INVALID_USER_LIST_ID"] * 2
    # Anything else refused as a whole is raised: the engine bisects.
    with pytest.raises(Permanent):
        dest.classify(request, HttpResponse(400, {}, google_error(400, "INVALID_ARGUMENT")))


def test_a_full_sync_is_never_bisected() -> None:
    dest = destination()
    members = [dest.member_item(LIST, FullSyncMember(f"p{i}", person(i))) for i in range(3)]
    (request,) = dest.build_full_sync(LIST, members)
    outcomes = dest.classify(request, HttpResponse(400, {}, google_error(400, "INVALID_ARGUMENT")))
    assert all(o.error is not None and o.error.reason == "HTTP_400" for o in outcomes)


# --------------------------------------------------------------------------- against the emulator


async def test_job_flow_adds_then_removes_members() -> None:
    async with served() as (emu, url):
        dest = destination(url)
        adds = mapped(dest, *(update(i) for i in range(5)))
        (request,) = dest.build_requests(adds)
        response, outcomes = await deliver(dest, request)
        assert response.status == 200 and all(o.ok for o in outcomes)
        assert emu.calls == {"create": 1, "addOperations": 1, "run": 1}
        await emu.settle()
        expected = {row_of(user_data(person(i))) for i in range(5)}
        assert emu.members(LIST) == expected
        assert emu.member_values(LIST) == {sha256_hex(f"person.{i}@example.com") for i in range(5)}

        removes = mapped(dest, *(update(i, "REMOVE", version=2) for i in (1, 3)))
        (request,) = dest.build_requests(removes)
        _, outcomes = await deliver(dest, request)
        assert all(o.ok for o in outcomes)
        await emu.settle()
        assert emu.members(LIST) == expected - {row_of(user_data(person(i))) for i in (1, 3)}
        assert emu.unconsented_adds == 0
        assert [j.status for j in emu.jobs.values()] == ["SUCCESS", "SUCCESS"]
        assert [j.consent_granted for j in emu.jobs.values()] == [True, False]
        assert emu.state.rejected_items == [] and emu.state.rejected_requests == []


async def test_job_status_is_searchable() -> None:
    async with served(run_delay_s=30.0) as (emu, url):
        dest = destination(url)
        (request,) = dest.build_requests(mapped(dest, update(1)))
        response, _ = await deliver(dest, request)
        job = response.extra["job"]
        headers = {**dest.static_headers(), "Authorization": "Bearer emulator-access-token"}
        where = f"offline_user_data_job.resource_name = '{job}'"
        query = "SELECT offline_user_data_job.status FROM offline_user_data_job WHERE " + where  # noqa: S608
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{url}/v25/customers/{CID}/googleAds:search",
                json={"query": query},
                headers=headers,
            ) as resp,
        ):
            found = await resp.json()
        assert [r["offlineUserDataJob"]["status"] for r in found["results"]] == ["RUNNING"]
        assert emu.members(LIST) == set(), "membership changes only when the job has run"


async def test_partial_failure_refuses_only_the_bad_people() -> None:
    async with served() as (emu, url):
        dest = destination(url)
        bad_country = person(2)
        bad_country["addressInfo.countryCode"] = "XX"
        batch = mapped(dest, update(0), update(1), update(2, identifiers=bad_country), update(3))
        # A malformed hash that slipped past map() (the base class normally stops it).
        batch[1].item = type(batch[1].item)(
            LIST, "ADD", "profile-1", {}, {"userIdentifiers": [{"hashedEmail": "ABC"}]}
        )
        (request,) = dest.build_requests(batch)
        _, outcomes = await deliver(dest, request)
        reasons = [o.error.reason if o.error else None for o in outcomes]
        assert reasons == [None, "INVALID_SHA256_FORMAT", "INVALID_COUNTRY_CODE", None]
        await emu.settle()
        assert emu.members(LIST) == {row_of(user_data(person(i))) for i in (0, 3)}
        assert [r["reason"] for r in emu.state.rejected_items] == [
            "INVALID_SHA256_FORMAT",
            "INVALID_COUNTRY_CODE",
        ]
        assert [v["kind"] for v in emu.state.pii_violations] == ["not_hashed"]
        emu.state.pii_violations.clear()


async def test_chunks_go_to_one_job_with_global_failure_indices() -> None:
    async with served() as (emu, url):
        dest = destination(url, max_identifiers_per_call=6)  # 2 people per call
        ids = [person(i) for i in range(5)]
        ids[3]["addressInfo.countryCode"] = "ZZ"
        (request,) = dest.build_requests(
            mapped(dest, *(update(i, identifiers=ids[i]) for i in range(5)))
        )
        _, outcomes = await deliver(dest, request)
        assert [i for i, o in enumerate(outcomes) if not o.ok] == [3]
        assert emu.calls == {"create": 1, "addOperations": 3, "run": 1}
        await emu.settle()
        assert len(emu.members(LIST)) == 4


async def test_full_sync_replaces_the_list_with_remove_all_first() -> None:
    async with served() as (emu, url):
        dest = destination(url, max_identifiers_per_call=4)
        (request,) = dest.build_requests(mapped(dest, *(update(i) for i in range(100, 104))))
        await deliver(dest, request)
        await emu.settle()
        assert len(emu.members(LIST)) == 4
        emu.calls.clear()

        members = [FullSyncMember(f"p{i}", person(i)) for i in range(5)]
        result = await full_sync(
            "google_ads", LIST, members, destination=dest, engine=SinkEngineSettings()
        )
        assert result.ok and (result.sent, result.requests) == (5, 1)
        # removeAll + 1 person, then 1 person per call (3 identifiers each, 4 per call).
        assert emu.calls == {"create": 1, "addOperations": 5, "run": 1}
        await emu.settle()
        assert emu.members(LIST) == {row_of(user_data(person(i))) for i in range(5)}
        ops = [a["item"]["op"] for a in emu.state.accepted if a["path"] == "jobs/5002"]
        assert ops == ["removeAll"] + ["create"] * 5

        # An empty audience: the job only clears the list.
        result = await full_sync("google_ads", LIST, [], destination=dest)
        assert result.ok
        await emu.settle()
        assert emu.members(LIST) == set()


async def test_full_sync_stops_when_remove_all_is_refused() -> None:
    async with served(remove_all_unsupported=["1001"]) as (emu, url):
        dest = destination(url)
        members = [FullSyncMember(f"p{i}", person(i)) for i in range(2)]
        result = await full_sync("google_ads", LIST, members, destination=dest)
        assert result.refused == {"REMOVE_ALL_NOT_SUPPORTED": 2}
        assert emu.calls.get("run", 0) == 0, "a sync without its removeAll must not run"


async def test_conflicting_operations_are_never_produced() -> None:
    async with served() as (emu, url):
        dest = destination(url)
        batch = mapped(
            dest,
            update(1),
            update(2, "REMOVE"),
            update(3),
            update(1, "REMOVE", version=2),
            update(4, audience_id=OTHER_LIST),
        )
        requests = dest.build_requests(batch)
        for request in requests:
            _, outcomes = await deliver(dest, request)
            assert all(o.ok for o in outcomes)
        await emu.settle()
        kinds = [(j.user_list, j.kind) for j in emu.jobs.values()]
        assert kinds == [(LIST, "create"), (LIST, "remove"), (OTHER_LIST, "create")]
        assert len(requests) == 3
        assert emu.state.rejected_items == [] and emu.state.rejected_requests == []
        assert emu.members(LIST) == {row_of(user_data(person(3)))}
        assert emu.members(OTHER_LIST) == {row_of(user_data(person(4)))}


async def test_a_retry_after_a_failed_run_uses_a_new_job() -> None:
    async with served() as (emu, url):
        emu.fail_next(
            1, status=503, path_prefix=f"/v25/customers/{CID}/offlineUserDataJobs/5001:run"
        )
        dest = destination(url)
        (request,) = dest.build_requests(mapped(dest, update(1), update(2)))
        with pytest.raises(Retryable):
            await deliver(dest, request)
        _, outcomes = await deliver(dest, request)  # what the engine does next
        assert all(o.ok for o in outcomes)
        await emu.settle()
        assert emu.jobs[5001].status == "PENDING", "the failed job never ran"
        assert emu.jobs[5002].status == "SUCCESS"
        assert len(emu.members(LIST)) == 2


async def test_quota_answers_throttle_with_the_retry_delay() -> None:
    async with served() as (emu, url):
        dest = destination(url)
        emu.quota_next(1, retry_delay_s=7)
        (request,) = dest.build_requests(mapped(dest, update(1)))
        with pytest.raises(Throttled) as exc:
            await deliver(dest, request)
        assert exc.value.retry_after_s == 7.0
        emu.quota_mode = True
        with pytest.raises(Throttled) as exc:
            await deliver(dest, request)
        assert exc.value.retry_after_s == 30.0


async def test_credentials_are_checked() -> None:
    async with served() as (_, url):
        (request,) = destination(url).build_requests(mapped(destination(url), update(1)))
        for overrides, reason in (
            ({"access_token": "wrong"}, "UNAUTHENTICATED"),
            ({"developer_token": "wrong-dev-token"}, "DEVELOPER_TOKEN_INVALID"),
            ({"login_customer_id": "1111111111"}, "INVALID_LOGIN_CUSTOMER_ID"),
        ):
            dest = destination(url, **overrides)
            req = dest.build_requests(mapped(dest, update(1)))[0]
            with pytest.raises(ConfigError) as exc:
                await deliver(dest, req)
            assert exc.value.reason == reason
        async with aiohttp.ClientSession() as session:
            for headers in ({}, {"Authorization": "Bearer emulator-access-token"}):
                async with session.post(request.url, data=request.body, headers=headers) as resp:
                    assert resp.status == 401
        dest = destination(url, login_customer_id="9876543210")
        req = dest.build_requests(mapped(dest, update(1)))[0]
        assert all(o.ok for o in (await deliver(dest, req))[1])


async def test_access_tokens_are_refreshed() -> None:
    async with served() as (emu, url):
        creds = emu.refresh_credentials(url)
        dest = GoogleAdsDestination(GoogleAdsSettings.model_validate({"endpoint": url, **creds}))
        (request,) = dest.build_requests(mapped(dest, update(1)))
        assert all(o.ok for o in (await deliver(dest, request))[1])
        assert emu.state.counters["tokens_issued"] == 1
        emu.expire_tokens()
        dest._token_obtained -= 120  # the token is two minutes old
        with pytest.raises(Retryable) as expired:
            await deliver(dest, request)
        assert expired.value.reason == ACCESS_TOKEN_EXPIRED
        assert all(o.ok for o in (await deliver(dest, request))[1])
        assert emu.state.counters["tokens_issued"] == 2
        # A 401 right after a refresh is not an expiry: the setup is wrong.
        emu.expire_tokens()
        dest._token_obtained = time.monotonic()
        with pytest.raises(ConfigError):
            await deliver(dest, request)
        bad = GoogleAdsDestination(
            GoogleAdsSettings.model_validate({"endpoint": url, **creds, "client_secret": "wrong"})
        )
        with pytest.raises(ConfigError) as exc:
            await deliver(bad, request)
        assert exc.value.reason == "OAUTH_REFRESH_FAILED"


def test_emulator_env_configures_the_destination(monkeypatch: pytest.MonkeyPatch) -> None:
    with start_all(["google_ads"]) as cluster:
        env = emulator_env(cluster)
        assert env["CDP_SINK_GOOGLE_ADS_ENDPOINT"] == cluster.urls["google_ads"]
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        (config,) = load_destinations(["google_ads"])
        assert config.destination is not None, config.problem
        assert config.destination.settings.customer_id == CID


# --------------------------------------------------------------------------- emulator rules


async def _call(
    session: aiohttp.ClientSession, url: str, body: Any, **headers: str
) -> tuple[int, Any]:
    base = {
        "Authorization": "Bearer emulator-access-token",
        "developer-token": "emulator-developer-token",
    }
    async with session.post(url, json=body, headers={**base, **headers}) as resp:
        return resp.status, await resp.json()


def _codes(payload: Mapping[str, Any]) -> list[str]:
    status = payload.get("error") or payload.get("partialFailureError") or {}
    return [
        next(iter(e["errorCode"].values()))
        for d in status.get("details", [])
        for e in d.get("errors", [])
    ]


async def test_emulator_enforces_the_job_rules() -> None:
    async with served(_allow_pii=True) as (emu, url):
        root = f"{url}/v25/customers/{CID}/offlineUserDataJobs"
        job_body = {
            "job": {
                "type": "CUSTOMER_MATCH_USER_LIST",
                "customerMatchUserListMetadata": {"userList": LIST},
            }
        }
        email = {"hashedEmail": sha256_hex("a@example.com")}
        async with aiohttp.ClientSession() as s:
            status, payload = await _call(
                s,
                f"{root}:create",
                {
                    "job": {
                        "type": "CUSTOMER_MATCH_USER_LIST",
                        "customerMatchUserListMetadata": {
                            "userList": f"customers/{CID}/userLists/9"
                        },
                    }
                },
            )
            assert (status, _codes(payload)) == (400, ["INVALID_USER_LIST_ID"])
            denied = {
                "job": {
                    **job_body["job"],
                    "customerMatchUserListMetadata": {
                        "userList": LIST,
                        "consent": {"adUserData": "DENIED"},
                    },
                }
            }
            status, payload = await _call(s, f"{root}:create", denied)
            assert _codes(payload) == ["CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS"]

            _, created = await _call(s, f"{root}:create", job_body)
            job = f"{url}/v25/{created['resourceName']}"
            ops = [
                {"create": {"userIdentifiers": [email]}},
                {"removeAll": True},
                {"remove": {"userIdentifiers": [email]}},
                {"create": {"userIdentifiers": [email] * 21}},
                {"create": {"userIdentifiers": [{"hashedEmail": "a@example.com"}]}},
                {"create": {"userIdentifiers": [{"addressInfo": {"countryCode": "XX"}}]}},
                {"create": {"userIdentifiers": []}},
                {"create": {"userIdentifiers": [{"thirdPartyUserId": "jane@example.com"}]}},
            ]
            status, payload = await _call(
                s, f"{job}:addOperations", {"operations": ops, "enablePartialFailure": True}
            )
            assert status == 200
            assert _codes(payload) == [
                "INVALID_OPERATION_ORDER",
                "CONFLICTING_OPERATION",
                "TOO_MANY_USER_IDENTIFIERS",
                "INVALID_SHA256_FORMAT",
                "INVALID_COUNTRY_CODE",
                "MISSING_USER_IDENTIFIER",
            ]
            indices = [
                e["location"]["fieldPathElements"][0]["index"]
                for e in payload["partialFailureError"]["details"][0]["errors"]
            ]
            assert indices == [1, 2, 3, 4, 5, 6]
            assert sorted(v["kind"] for v in emu.state.pii_violations) == [
                "not_hashed",
                "raw_email",
            ]
            # Without partial failure, one bad operation refuses the whole call.
            status, payload = await _call(
                s,
                f"{job}:addOperations",
                {
                    "operations": [
                        {"create": {"userIdentifiers": [email]}},
                        {"remove": {"userIdentifiers": [email]}},
                    ]
                },
            )
            assert (status, _codes(payload)) == (400, ["CONFLICTING_OPERATION"])
            # A UserIdentifier is a oneof.
            status, payload = await _call(
                s,
                f"{job}:addOperations",
                {
                    "operations": [
                        {
                            "create": {
                                "userIdentifiers": [
                                    {**email, "hashedPhoneNumber": email["hashedEmail"]}
                                ]
                            }
                        }
                    ]
                },
            )
            assert status == 400 and payload["error"]["status"] == "INVALID_ARGUMENT"
            status, payload = await _call(
                s,
                f"{job}:addOperations",
                {
                    "operations": [{"create": {"userIdentifiers": [email]}}] * 5,
                    "enablePartialFailure": True,
                },
            )
            many = [{"create": {"userIdentifiers": [email] * 20}}] * 5001
            status, payload = await _call(s, f"{job}:addOperations", {"operations": many})
            assert (status, _codes(payload)) == (400, ["TOO_MANY_USER_IDENTIFIERS"])
            status, _ = await _call(s, f"{job}:run", {})
            assert status == 200
            status, payload = await _call(
                s,
                f"{job}:addOperations",
                {"operations": [{"create": {"userIdentifiers": [email]}}]},
            )
            assert (status, _codes(payload)) == (400, ["JOB_ALREADY_STARTED"])
            await emu.settle()
            # 1 + 5 creates of the same person: a set holds them once. The raw email as
            # a thirdPartyUserId is valid to Google (recorded above as a PII violation).
            assert emu.members(LIST) == {
                row_of({"userIdentifiers": [email]}),
                frozenset({("thirdPartyUserId", "jane@example.com")}),  # Google takes it
            }
            status, payload = await _call(s, f"{root}:create", job_body, **{"developer-token": ""})
            assert (status, _codes(payload)) == (401, ["DEVELOPER_TOKEN_PARAMETER_MISSING"])
            status, payload = await _call(
                s, f"{url}/v25/customers/1111111111/offlineUserDataJobs:create", job_body
            )
            assert (status, _codes(payload)) == (403, ["USER_PERMISSION_DENIED"])


async def test_emulator_applies_jobs_of_a_list_in_run_order() -> None:
    async with served(run_delay_s=0.05) as (emu, url):
        dest = destination(url)
        for batch in (
            [update(1)],
            [update(1, "REMOVE", version=2)],
            [update(1, version=3)],
            [update(1, "REMOVE", version=4)],
        ):
            (request,) = dest.build_requests(mapped(dest, *batch))
            await deliver(dest, request)
        await emu.settle()
        assert emu.members(LIST) == set()
        assert [a["item"]["op"] for a in emu.state.accepted] == [
            "create",
            "remove",
            "create",
            "remove",
        ]


# --------------------------------------------------------------------------- engine, real stack


class AudienceProducer:
    """AudienceUpdate records (Confluent wire format) to a private topic, key = profileId."""

    def __init__(self, settings: Settings, serde: AvroSerde, topic: str) -> None:
        self.topic = topic
        self.encode = serde.encoder(topics.AUDIENCES_UPDATES)
        self.producer = ReliableProducer(settings)
        self.pending: list[Any] = []

    def send(self, record: dict[str, Any]) -> str:
        self.pending.append(
            self.producer.produce(self.topic, self.encode(record), key=record["profileId"])
        )
        return str(record["updateId"])

    def close(self) -> None:
        for fut in self.pending:
            fut.result(30)
        self.producer.close()


def audience_topic(settings: Settings, partitions: int = 3) -> str:
    name = f"cdp.test.gads.{uuid.uuid4().hex[:10]}"
    ensure_topics(settings, [TopicSpec(name, partitions, {})])
    return name


def engine_for(topic: str, **overrides: Any) -> SinkEngineSettings:
    return fast_engine("unused", audience_topic=topic, **overrides)


async def test_engine_delivers_audience_updates_to_the_emulator(
    settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    topic = audience_topic(settings)
    producer = AudienceProducer(settings, serde, topic)
    dlq = DlqTail(stack, settings, "google_ads")
    async with served(_allow_pii=False) as (emu, url):
        # A 429 with quotaErrorDetails.retryDelay (and no Retry-After header) first.
        emu.quota_next(1, retry_delay_s=2)
        n = 60
        for i in range(n):
            producer.send(update(i, audience_id=LIST if i % 2 else OTHER_LIST))
        removed = {i for i in range(0, n, 5)}
        for i in sorted(removed):
            producer.send(update(i, "REMOVE", audience_id=LIST if i % 2 else OTHER_LIST, version=2))
        bad_country = person(500)
        bad_country["addressInfo.countryCode"] = "XX"
        refused = producer.send(update(500, audience_id=LIST, identifiers=bad_country))
        unhashed = producer.send(update(501, identifiers={"hashedEmail": "raw@example.com"}))
        foreign = producer.send(update(502, audience_id="customers/5555555555/userLists/1"))
        producer.send(update(503, platform="meta"))  # skipped: another platform's
        producer.close()
        total = n + len(removed) + 4

        dest = destination(url, batch_wait_s=0.2)
        async with running([dest], settings, serde, engine_for(topic)) as service:
            runner = service.runners["google_ads"]
            await wait_until(
                lambda: (
                    runner.stats.delivered + runner.stats.dead_lettered + runner.stats.skipped
                    >= total
                ),
                90,
                f"{total} updates finished",
            )
        await emu.settle()
        stats = runner.stats
        assert (stats.delivered, stats.dead_lettered, stats.skipped) == (total - 4, 3, 1)
        for audience, parity in ((LIST, 1), (OTHER_LIST, 0)):
            expected = {
                row_of(user_data(person(i)))
                for i in range(n)
                if i % 2 == parity and i not in removed
            }
            assert emu.members(audience) == expected
        dead = dlq.records({refused, unhashed, foreign}, expect=3, timeout=30)
        assert sorted(d["reasonCode"] for d in dead) == [
            "INVALID_COUNTRY_CODE",
            INVALID_USER_LIST,
            "UNHASHED_IDENTIFIER",
        ]
        assert (
            "raw@example.com"
            not in orjson.dumps(
                [{k: v for k, v in d.items() if k != "originalBytes"} for d in dead], default=str
            ).decode()
        )
        state = emu.state
        assert len(state.faults_applied) == 1 and stats.retries >= 1
        assert emu.unconsented_adds == 0
        assert state.pii_violations == []
        assert not any(r["reason"] == "CONFLICTING_OPERATION" for r in state.rejected_items)
    dlq.close()


async def test_engine_waits_for_the_retry_delay(
    settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    """One lane, one list: the 429's retryDelay (body only, no header) holds the retry."""
    topic = audience_topic(settings, partitions=1)
    producer = AudienceProducer(settings, serde, topic)
    async with served() as (emu, url):
        emu.quota_next(1, retry_delay_s=2)
        for i in range(3):
            producer.send(update(i))
        producer.close()
        async with running(
            [destination(url, batch_wait_s=0.2)], settings, serde, engine_for(topic)
        ) as service:
            runner = service.runners["google_ads"]
            await wait_until(lambda: runner.stats.delivered >= 3, 60, "3 updates delivered")
        await emu.settle()
        state = emu.state
        assert len(state.faults_applied) == 1
        throttled_at = state.faults_applied[0]["at"]
        first_accepted = min(a["at"] for a in state.accepted)
        assert first_accepted - throttled_at >= 1.95, "retried before retryDelay had passed"
        assert runner.stats.retries >= 1 and runner.stats.dead_lettered == 0
        assert emu.members(LIST) == {row_of(user_data(person(i))) for i in range(3)}
