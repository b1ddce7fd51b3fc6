"""Each emulator enforces its vendor's contract, and fault injection does what it says."""

from __future__ import annotations

import asyncio
import base64
import gzip
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp
import orjson
import pytest
from segment.analytics import Client

from sinks.emulators import (
    AepEmulator,
    Ga4Emulator,
    MixpanelEmulator,
    SegmentEmulator,
    start_all,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def post(
    http: aiohttp.ClientSession,
    url: str,
    payload: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    data = raw if raw is not None else orjson.dumps(payload)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    async with http.post(url, data=data, headers=hdrs) as resp:
        body = await resp.read()
        try:
            parsed: Any = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = body.decode()
        return resp.status, parsed, dict(resp.headers)


def track(message_id: str, **extra: Any) -> dict[str, Any]:
    return {"type": "track", "userId": "u1", "event": "Clicked", "messageId": message_id, **extra}


# ====================================================================== Segment


@pytest.fixture
async def segment() -> AsyncIterator[tuple[SegmentEmulator, str]]:
    emu = SegmentEmulator(write_keys=["wk-1"])
    async with emu.serve() as url:
        yield emu, url


async def test_segment_accepts_all_three_auth_schemes_with_exactly_200(
    segment: tuple[SegmentEmulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = segment
    status, body, _ = await post(
        http, f"{url}/v1/batch", {"batch": [track("a")], "writeKey": "wk-1"}
    )
    assert (status, body) == (200, {"success": True})
    status, _, _ = await post(
        http, f"{url}/v1/batch", {"batch": [track("b")]}, headers={"Authorization": basic("wk-1")}
    )
    assert status == 200
    status, _, _ = await post(
        http,
        f"{url}/v1/track",
        {"userId": "u", "event": "E", "messageId": "c", "writeKey": "wk-1"},
        headers={"Authorization": "Bearer some-oauth-token"},
    )
    assert status == 200
    assert [a["item"]["messageId"] for a in emu.state.accepted] == ["a", "b", "c"]
    assert emu.state.accepted[2]["item"]["type"] == "track"  # the path decides the type
    assert "writeKey" not in emu.state.accepted[2]["item"]


async def test_segment_unknown_write_key_is_200_and_dropped_unless_strict(
    segment: tuple[SegmentEmulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = segment
    status, body, _ = await post(
        http, f"{url}/v1/batch", {"batch": [track("x")], "writeKey": "nope"}
    )
    assert (status, body) == (200, {"success": True})
    assert emu.state.accepted == []
    assert [d["reason"] for d in emu.state.dropped] == ["invalid_write_key"]

    strict = SegmentEmulator(write_keys=["wk-1"], strict_auth=True)
    async with strict.serve() as strict_url:
        status, body, _ = await post(http, f"{strict_url}/v1/batch", {"batch": [track("x")]})
    assert status == 401 and body["code"] == "unauthorized" and "message" in body


async def test_segment_400s_carry_code_and_message(
    segment: tuple[SegmentEmulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = segment
    status, body, _ = await post(http, f"{url}/v1/batch", raw=b"{not json")
    assert status == 400 and set(body) == {"code", "message"} and body["code"] == "invalid_json"

    big_props = {"blob": "x" * 20_000}
    batch = [track(f"m{i}", properties=big_props) for i in range(30)]  # ~600 KB
    status, body, _ = await post(http, f"{url}/v1/batch", {"batch": batch, "writeKey": "wk-1"})
    assert status == 400 and body["code"] == "payload_too_large"

    one_big = [track("big", properties={"blob": "x" * 33_000})]
    status, body, _ = await post(http, f"{url}/v1/batch", {"batch": one_big, "writeKey": "wk-1"})
    assert status == 400 and body["code"] == "payload_too_large"

    status, body, _ = await post(
        http,
        f"{url}/v1/track",
        {**track("s", properties={"blob": "x" * 33_000}), "writeKey": "wk-1"},
    )
    assert status == 400 and body["code"] == "payload_too_large"
    assert emu.state.accepted == []
    assert len(emu.state.rejected_requests) == 4


async def test_segment_drops_invalid_and_duplicate_events_silently(
    segment: tuple[SegmentEmulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = segment
    batch = [
        track("ok-1"),
        {"type": "track", "event": "NoIds", "messageId": "no-ids"},
        {"type": "track", "userId": "u", "messageId": "no-event"},
        {"type": "group", "userId": "u", "messageId": "no-group"},
        {"type": "alias", "userId": "u", "messageId": "no-prev"},
        {"type": "bogus", "userId": "u", "messageId": "bad-type"},
        track("ok-1"),  # duplicate messageId
    ]
    status, body, _ = await post(http, f"{url}/v1/batch", {"batch": batch, "writeKey": "wk-1"})
    assert (status, body) == (200, {"success": True})
    # The same messageId in a later request (any write key) is a duplicate too: global dedupe.
    await post(http, f"{url}/v1/batch", {"batch": [track("ok-1")], "writeKey": "wk-1"})
    assert [a["item"]["messageId"] for a in emu.state.accepted] == ["ok-1"]
    assert [d["reason"] for d in emu.state.dropped] == [
        "no_user_anon_id",
        "missing_event",
        "missing_group_id",
        "missing_alias_ids",
        "invalid_type",
        "duplicate_message_id",
        "duplicate_message_id",
    ]
    too_many = [track(f"n{i}") for i in range(2501)]
    status, _, _ = await post(http, f"{url}/v1/batch", {"batch": too_many, "writeKey": "wk-1"})
    assert status == 200
    assert len(emu.state.accepted) == 1
    assert emu.state.snapshot(items=False)["droppedCount"] == 7 + 2501


async def test_segment_gzip_and_batch_context_merge(
    segment: tuple[SegmentEmulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = segment
    payload = {
        "batch": [track("g1", context={"ip": "1.2.3.4"})],
        "context": {"library": {"name": "x"}, "ip": "9.9.9.9"},
        "writeKey": "wk-1",
    }
    status, _, _ = await post(
        http,
        f"{url}/v1/batch",
        raw=gzip.compress(orjson.dumps(payload)),
        headers={"Content-Encoding": "gzip"},
    )
    assert status == 200
    item = emu.state.accepted[0]["item"]
    assert item["context"] == {"library": {"name": "x"}, "ip": "1.2.3.4"}


async def test_segment_official_sdk_is_accepted(segment: tuple[SegmentEmulator, str]) -> None:
    emu, url = segment

    def run_sdk() -> None:
        errors: list[Any] = []
        client = Client(
            "wk-1", host=url, sync_mode=True, on_error=lambda e, b: errors.append(e), max_retries=0
        )
        client.track(user_id="sdk-user", event="SDK Event", properties={"n": 1})
        client.identify(user_id="sdk-user", traits={"plan": "pro"})
        client.flush()
        assert errors == []

    await asyncio.to_thread(run_sdk)
    assert [a["item"]["type"] for a in emu.state.accepted] == ["track", "identify"]


# ====================================================================== Mixpanel


@pytest.fixture
async def mixpanel() -> AsyncIterator[tuple[MixpanelEmulator, str]]:
    emu = MixpanelEmulator(
        project_token="tok", project_id="42", service_accounts={"sa.user": "sa-secret"}
    )
    async with emu.serve() as url:
        yield emu, url


def mp_event(insert_id: str, **props: Any) -> dict[str, Any]:
    return {
        "event": "Order Completed",
        "properties": {
            "time": int(time.time()) - 60,
            "distinct_id": "u-1",
            "$insert_id": insert_id,
            **props,
        },
    }


async def test_mixpanel_import_auth(
    mixpanel: tuple[MixpanelEmulator, str], http: aiohttp.ClientSession
) -> None:
    _, url = mixpanel
    events = [mp_event("a-1")]
    status, body, _ = await post(http, f"{url}/import?strict=1", events)
    assert status == 401
    assert body == {"code": 401, "error": "Invalid credentials", "status": "Unauthorized"}
    status, _, _ = await post(
        http, f"{url}/import?strict=1&project_id=42", events,
        headers={"Authorization": basic("sa.user", "wrong")},
    )  # fmt: skip
    assert status == 401
    status, body, _ = await post(
        http,
        f"{url}/import?strict=1",
        events,
        headers={"Authorization": basic("sa.user", "sa-secret")},
    )
    assert status == 401 and "project_id" in body["error"]
    status, body, _ = await post(
        http, f"{url}/import?strict=1&project_id=42", events,
        headers={"Authorization": basic("sa.user", "sa-secret")},
    )  # fmt: skip
    assert (status, body) == (200, {"code": 200, "num_records_imported": 1, "status": "OK"})
    status, _, _ = await post(
        http, f"{url}/import?strict=1", [mp_event("a-2")], headers={"Authorization": basic("tok")}
    )
    assert status == 200


async def test_mixpanel_partial_success_lists_failed_records_and_imports_the_rest(
    mixpanel: tuple[MixpanelEmulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = mixpanel
    events = [
        mp_event("good-1"),
        mp_event("bad-time", time=1000),
        mp_event("bad-distinct", distinct_id="undefined"),
        mp_event("x" * 37),
        {"event": "No time", "properties": {"distinct_id": "u", "$insert_id": "nt-1"}},
        mp_event("good-2", time=int(time.time() * 1000)),  # milliseconds are fine too
    ]
    status, body, _ = await post(
        http, f"{url}/import?strict=1", events, headers={"Authorization": basic("tok")}
    )
    assert status == 400
    assert body["num_records_imported"] == 2
    assert body["error"] == "some data points in the request failed validation"
    failed = {r["index"]: r for r in body["failed_records"]}
    assert sorted(failed) == [1, 2, 3, 4]
    assert failed[1]["field"] == "properties.time"
    assert failed[2]["field"] == "properties.distinct_id"
    assert failed[3]["field"] == "properties.$insert_id"
    assert failed[1]["insert_id"] == failed[1]["$insert_id"] == "bad-time"
    assert sorted(a["item"]["properties"]["$insert_id"] for a in emu.state.accepted) == [
        "good-1",
        "good-2",
    ]


async def test_mixpanel_dedupes_on_event_distinct_time_insert_id(
    mixpanel: tuple[MixpanelEmulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = mixpanel
    t = int(time.time()) - 30
    first = mp_event("dup-1", time=t, amount=1)
    again = mp_event("dup-1", time=t * 1000, amount=2)  # same instant in ms: same key
    auth = {"Authorization": basic("tok")}
    await post(http, f"{url}/import", [first], headers=auth)
    await post(http, f"{url}/import", [again], headers=auth)
    assert emu.state.duplicates == 1
    assert [e["properties"]["amount"] for e in emu.state.unique_items()] == [2]  # last wins


async def test_mixpanel_limits_413_and_event_count_and_ndjson_gzip(
    http: aiohttp.ClientSession,
) -> None:
    emu = MixpanelEmulator(project_token="tok", max_body_bytes=2000)
    auth = {"Authorization": basic("tok")}
    async with emu.serve() as url:
        big = [mp_event(f"e{i}", blob="x" * 200) for i in range(20)]
        status, body, _ = await post(http, f"{url}/import", big, headers=auth)
        assert status == 413
        assert body == {
            "code": 413,
            "error": "request exceeds max limit of 2000 bytes",
            "status": "Request Entity Too Large",
        }
    emu = MixpanelEmulator(project_token="tok")
    async with emu.serve() as url:
        many = [mp_event(f"e{i}") for i in range(2001)]
        status, body, _ = await post(http, f"{url}/import", many, headers=auth)
        assert status == 400 and body["num_records_imported"] == 0
        ndjson = b"\n".join(orjson.dumps(mp_event(f"nd{i}")) for i in range(3))
        status, body, _ = await post(
            http,
            f"{url}/import",
            raw=gzip.compress(ndjson),
            headers={**auth, "Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"},
        )
        assert (status, body["num_records_imported"]) == (200, 3)


async def test_mixpanel_track_endpoint(
    mixpanel: tuple[MixpanelEmulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = mixpanel
    good = {"event": "E", "properties": {"token": "tok", "distinct_id": "u"}}
    old = {"event": "E", "properties": {"token": "tok", "distinct_id": "u", "time": 1_600_000_000}}
    bad = {"event": "E", "properties": {"token": "other", "distinct_id": "u"}}
    assert (await post(http, f"{url}/track", [good]))[1] == 1
    assert (await post(http, f"{url}/track", [old, bad]))[1] == 0
    assert len(emu.state.accepted) == 1
    assert sorted(d["reason"] for d in emu.state.dropped) == ["invalid_token", "properties.time"]


# ====================================================================== AEP

SCHEMA = "https://ns.adobe.com/acme/schemas/ee1"


@pytest.fixture
async def aep() -> AsyncIterator[tuple[AepEmulator, str]]:
    emu = AepEmulator(
        inlet_id="inlet-1",
        org_id="ORG1@AdobeOrg",
        datasets={"ds-1": SCHEMA, "ds-2": "https://ns.adobe.com/acme/schemas/other"},
        access_token="ims-token",
        flow_id="flow-1",
    )
    async with emu.serve() as url:
        yield emu, url


def xdm(_id: Any = "rec-1", dataset: str = "ds-1", **entity: Any) -> dict[str, Any]:
    ref = {"id": SCHEMA, "contentType": "application/vnd.adobe.xed-full+json;version=1"}
    return {
        "header": {"schemaRef": ref, "imsOrgId": "ORG1@AdobeOrg", "datasetId": dataset},
        "body": {
            "xdmMeta": {"schemaRef": ref},
            "xdmEntity": {
                "_id": _id,
                "timestamp": "2026-01-01T10:00:00.000Z",
                "eventType": "commerce.purchases",
                **entity,
            },
        },
    }


AEP_HEADERS = {"Authorization": "Bearer ims-token", "x-adobe-flow-id": "flow-1"}


async def test_aep_authenticated_inlet_answers_401_problem_json(
    aep: tuple[AepEmulator, str], http: aiohttp.ClientSession
) -> None:
    _, url = aep
    status, body, _ = await post(http, f"{url}/collection/batch/inlet-1", {"messages": [xdm()]})
    assert status == 401
    assert body["status"] == "401"  # a string, as Adobe documents
    assert body["title"] == "Authorization"
    assert body["type"].endswith("data-collection-service-authorization")
    assert "token is empty" in body["report"]["message"]
    status, _, _ = await post(
        http,
        f"{url}/collection/batch/inlet-1",
        {"messages": [xdm()]},
        headers={"Authorization": "Bearer expired"},
    )
    assert status == 401


async def test_aep_batch_207_has_positional_responses(
    aep: tuple[AepEmulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = aep
    no_body = xdm("r2")
    del no_body["body"]
    wrong_org = xdm("r3")
    wrong_org["header"]["imsOrgId"] = "OTHER@AdobeOrg"
    messages = [xdm("r1"), no_body, wrong_org, xdm("r4", dataset="missing"), xdm("r5", "ds-2")]
    status, body, _ = await post(
        http, f"{url}/collection/batch/inlet-1", {"messages": messages}, headers=AEP_HEADERS
    )
    assert status == 207
    assert body["inletId"] == "inlet-1" and "batchId" in body
    responses = body["responses"]
    assert len(responses) == 5
    assert set(responses[0]) == {"xactionId"}
    assert responses[1]["statusCode"] == 400 and "unknown xdm format" in responses[1]["message"]
    assert "absent or wrong ims org" in responses[2]["message"]
    assert responses[1]["message"].startswith("inletId: [inlet-1] imsOrgId: [ORG1@AdobeOrg]")
    assert "not found" in responses[3]["message"]
    assert "schema does not match" in responses[4]["message"]
    assert [a["item"]["body"]["xdmEntity"]["_id"] for a in emu.state.accepted] == ["r1"]
    assert [r["index"] for r in emu.state.rejected_items] == [1, 2, 3, 4]


async def test_aep_413_over_one_megabyte(
    aep: tuple[AepEmulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = aep
    messages = [xdm(f"r{i}", web={"webPageDetails": {"name": "x" * 100_000}}) for i in range(11)]
    status, body, _ = await post(
        http, f"{url}/collection/batch/inlet-1", {"messages": messages}, headers=AEP_HEADERS
    )
    assert status == 413 and body["status"] == 413
    assert emu.state.accepted == []


async def test_aep_flow_id_is_required_by_header_or_envelope(
    aep: tuple[AepEmulator, str], http: aiohttp.ClientSession
) -> None:
    _, url = aep
    with_flow = xdm("f2")
    with_flow["header"]["flowId"] = "flow-1"
    status, body, _ = await post(
        http,
        f"{url}/collection/batch/inlet-1",
        {"messages": [xdm("f1"), with_flow]},
        headers={"Authorization": "Bearer ims-token"},
    )
    assert status == 207
    assert "flow id" in body["responses"][0]["message"]
    assert "xactionId" in body["responses"][1]


async def test_aep_schema_violations_are_async_on_batch_and_sync_on_single(
    aep: tuple[AepEmulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = aep
    messages = [xdm(12345), xdm("r2", unknownField=1), xdm("r3")]
    status, body, _ = await post(
        http, f"{url}/collection/batch/inlet-1", {"messages": messages}, headers=AEP_HEADERS
    )
    # Accepted at the edge (xactionId for all three) ...
    assert status == 207 and all("xactionId" in r for r in body["responses"])
    # ... but two fail later in the data lake, which only the state shows.
    assert [d["reason"] for d in emu.state.dropped] == ["async_validation", "async_validation"]
    assert "expected type: String" in emu.state.dropped[0]["message"]
    assert "extraneous key [unknownField]" in emu.state.dropped[1]["message"]

    status, body, _ = await post(
        http, f"{url}/collection/inlet-1?syncValidation=true", xdm(12345), headers=AEP_HEADERS
    )
    assert status == 400
    assert body["title"] == "Invalid XDM Message Format"
    cause = body["report"]["cause"]["_streamingValidation"][0]["causingExceptions"][0]
    assert cause["keyword"] == "type" and cause["pointerToViolation"] == "#/_id"
    status, body, _ = await post(
        http, f"{url}/collection/inlet-1?syncValidation=true", xdm("ok"), headers=AEP_HEADERS
    )
    assert status == 200 and body["syncValidation"] == {"status": "pass"}

    strict = AepEmulator(
        inlet_id="i", org_id="ORG1@AdobeOrg", datasets={"ds-1": SCHEMA}, access_token=None,
        flow_id=None, strict_batch_validation=True,
    )  # fmt: skip
    async with strict.serve() as strict_url:
        status, body, _ = await post(
            http, f"{strict_url}/collection/batch/i", {"messages": [xdm(1), xdm("ok")]}
        )
    assert body["responses"][0]["statusCode"] == 400
    assert "xactionId" in body["responses"][1]


async def test_aep_reports_duplicate_ids_and_raw_pii(
    aep: tuple[AepEmulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = aep
    raw_email = xdm("p1", identityMap={"Email": [{"id": "jane@example.com", "primary": True}]})
    bad_hash = xdm("p2", identityMap={"Email_LC_SHA256": [{"id": "JANE@EXAMPLE.COM"}]})
    good = xdm("p3", identityMap={"Email_LC_SHA256": [{"id": "a" * 64}]})
    await post(
        http,
        f"{url}/collection/batch/inlet-1",
        {"messages": [raw_email, bad_hash, good, xdm("p3")]},
        headers=AEP_HEADERS,
    )
    assert emu.state.duplicates == 1  # p3 twice in ds-1
    kinds = sorted((v["field"].split(".")[-2], v["kind"]) for v in emu.state.pii_violations)
    assert ("Email[*]", "raw_email") in kinds
    assert ("Email_LC_SHA256[*]", "not_hashed") in kinds
    assert all("jane" not in str(v) for v in emu.state.pii_violations)  # never the value
    # The scan stays linear on long values (a naive email regex is quadratic here).
    started = time.monotonic()
    long_value = xdm("p4", web={"webPageDetails": {"name": "n" * 600_000 + "@"}})
    status, _, _ = await post(
        http, f"{url}/collection/batch/inlet-1", {"messages": [long_value]}, headers=AEP_HEADERS
    )
    assert status == 207 and time.monotonic() - started < 2


# ====================================================================== GA4


@pytest.fixture
async def ga4() -> AsyncIterator[tuple[Ga4Emulator, str]]:
    emu = Ga4Emulator(streams={"G-TEST": "secret-1"})
    async with emu.serve() as url:
        yield emu, url


def ga_body(*events: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"client_id": "123.456", "events": list(events), **top}


async def test_ga4_collect_answers_204_to_everything(
    ga4: tuple[Ga4Emulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = ga4
    collect = f"{url}/mp/collect?measurement_id=G-TEST&api_secret=secret-1"
    valid = ga_body({"name": "purchase", "params": {"transaction_id": "t1", "value": 3,
                                                     "currency": "EUR"}})  # fmt: skip
    cases = [
        (collect, orjson.dumps(valid)),
        (collect, b"{broken"),
        (f"{url}/mp/collect?measurement_id=G-TEST&api_secret=wrong", orjson.dumps(valid)),
        (collect, orjson.dumps(ga_body({"name": "_bad"}, {"name": "session_start"}))),
        (collect, orjson.dumps({"events": [{"name": "ok"}]})),
    ]
    for target, raw in cases:
        async with http.post(target, data=raw) as resp:
            assert resp.status == 204
            assert await resp.read() == b""
    assert len(emu.state.accepted) == 1
    assert [d["reason"] for d in emu.state.dropped] == [
        "invalid_json",
        "invalid_credentials",
        "NAME_RESERVED",  # "_bad": reserved prefix "_"
        "NAME_RESERVED",
        "VALUE_REQUIRED",
    ]


async def test_ga4_debug_endpoint_explains_with_validation_messages(
    ga4: tuple[Ga4Emulator, str], http: aiohttp.ClientSession
) -> None:
    _, url = ga4
    debug = f"{url}/debug/mp/collect"  # the debug server does not check the secret

    async def codes(body: dict[str, Any]) -> list[tuple[str, str]]:
        status, answer, _ = await post(http, debug, body)
        assert status == 200
        return [(m["fieldPath"], m["validationCode"]) for m in answer["validationMessages"]]

    assert (
        await codes(ga_body({"name": "page_view", "params": {"page_location": "https://x"}})) == []
    )
    assert await codes(ga_body({"name": "1bad"})) == [("events[0].name", "NAME_INVALID")]
    assert await codes(ga_body({"name": "x" * 41})) == [("events[0].name", "NAME_INVALID")]
    assert await codes(ga_body({"name": "first_visit"})) == [("events[0].name", "NAME_RESERVED")]
    assert await codes(ga_body({"name": "e", "params": {"ga_x": 1}})) == [
        ("events[0].params.ga_x", "NAME_RESERVED")
    ]
    assert await codes(ga_body({"name": "e", "params": {"p": "v" * 101}})) == [
        ("events[0].params.p", "VALUE_OUT_OF_BOUNDS")
    ]
    assert await codes(ga_body({"name": "e", "params": {f"p{i}": i for i in range(26)}})) == [
        ("events[0].params", "EXCEEDED_MAX_ENTITIES")
    ]
    assert await codes(ga_body(*[{"name": "e"}] * 26)) == [("events", "EXCEEDED_MAX_ENTITIES")]
    assert await codes({"events": [{"name": "e"}]}) == [("client_id", "VALUE_REQUIRED")]
    assert await codes(ga_body({"name": "e", "timestamp_micros": int(time.time() * 1000)})) == [
        ("events[0].timestamp_micros", "VALUE_INVALID")  # milliseconds, not micros
    ]
    old = int((time.time() - 73 * 3600) * 1_000_000)
    assert await codes(ga_body({"name": "e", "timestamp_micros": old})) == []  # RELAXED
    assert await codes(
        ga_body(
            {"name": "e", "timestamp_micros": old}, validation_behavior="ENFORCE_RECOMMENDATIONS"
        )
    ) == [("events[0].timestamp_micros", "VALUE_OUT_OF_BOUNDS")]
    assert await codes(
        ga_body({"name": "e"}, user_data={"sha256_email_address": ["raw@x.io"]})
    ) == [("user_data.sha256_email_address[0]", "VALUE_INVALID")]


async def test_ga4_old_timestamps_clamped_when_relaxed_rejected_when_enforced(
    ga4: tuple[Ga4Emulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = ga4
    collect = f"{url}/mp/collect?measurement_id=G-TEST&api_secret=secret-1"
    old = int((time.time() - 80 * 3600) * 1_000_000)
    await post(http, collect, ga_body({"name": "e", "timestamp_micros": old}))
    await post(
        http,
        collect,
        ga_body(
            {"name": "e", "timestamp_micros": old}, validation_behavior="ENFORCE_RECOMMENDATIONS"
        ),
    )
    assert len(emu.state.accepted) == 1
    assert emu.state.accepted[0]["item"]["timestamp_clamped"] is True
    assert [d["reason"] for d in emu.state.dropped] == ["VALUE_OUT_OF_BOUNDS"]


async def test_ga4_records_raw_pii(
    ga4: tuple[Ga4Emulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = ga4
    collect = f"{url}/mp/collect?measurement_id=G-TEST&api_secret=secret-1"
    body = ga_body(
        {"name": "e", "params": {"note": "mail jane@example.com"}},
        user_data={"sha256_email_address": ["not-a-hash"], "sha256_phone_number": ["b" * 64]},
    )
    await post(http, collect, body)
    assert sorted((v["field"], v["kind"]) for v in emu.state.pii_violations) == [
        ("events[*].params.note", "raw_email"),
        ("user_data.sha256_email_address[*]", "not_hashed"),
    ]


# ====================================================================== faults


async def test_fault_status_and_throttle_then_normal(
    segment: tuple[SegmentEmulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = segment
    emu.fail_next(2, status=503)
    emu.throttle_next(1, retry_after_s=7)
    body = {"batch": [track("f1")], "writeKey": "wk-1"}
    statuses = []
    for _ in range(4):
        status, answer, headers = await post(http, f"{url}/v1/batch", body)
        statuses.append(status)
        if status == 429:
            assert headers["Retry-After"] == "7"
            assert headers["X-RateLimit-Reset"] == "7"
            assert answer["code"] == "rate_limited"
    assert statuses == [503, 503, 429, 200]
    assert len(emu.state.accepted) == 1
    assert [f["kind"] for f in emu.state.faults_applied] == ["status", "status", "throttle"]


async def test_fault_outage_window(
    mixpanel: tuple[MixpanelEmulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = mixpanel
    emu.outage(0.3, status=503)
    auth = {"Authorization": basic("tok")}
    status, body, _ = await post(http, f"{url}/import", [mp_event("o1")], headers=auth)
    assert status == 503 and body["code"] == 503  # Mixpanel-shaped error body
    status, _, _ = await post(http, f"{url}/import", [mp_event("o1")], headers=auth)
    assert status == 503
    await asyncio.sleep(0.35)
    status, _, _ = await post(http, f"{url}/import", [mp_event("o1")], headers=auth)
    assert status == 200


async def test_fault_delay_timeout_and_dropped_connection(
    aep: tuple[AepEmulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = aep
    target = f"{url}/collection/batch/inlet-1"
    payload = orjson.dumps({"messages": [xdm("t1")]})
    emu.slow_next(1, delay_s=0.2)
    started = time.monotonic()
    async with http.post(target, data=payload, headers=AEP_HEADERS) as resp:
        assert resp.status == 207
    assert time.monotonic() - started >= 0.2

    emu.hang_next(1)
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(
            target, data=payload, headers=AEP_HEADERS, timeout=aiohttp.ClientTimeout(total=0.3)
        ):
            pass
    assert time.monotonic() - started < 2

    emu.drop_next(1)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with http.post(target, data=payload, headers=AEP_HEADERS):
            pass
    assert len(emu.state.accepted) == 1  # only the slow one got through

    # The ambiguous case: processed, then the connection dies. The retry is a duplicate.
    emu.drop_next(1, process=True)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with http.post(target, data=payload, headers=AEP_HEADERS):
            pass
    async with http.post(target, data=payload, headers=AEP_HEADERS) as resp:
        assert resp.status == 207
    assert len(emu.state.accepted) == 3 and emu.state.duplicates == 2
    assert [f["kind"] for f in emu.state.faults_applied] == ["delay", "timeout", "drop", "drop"]


async def test_http_control_plane(
    ga4: tuple[Ga4Emulator, str], http: aiohttp.ClientSession
) -> None:
    emu, url = ga4
    collect = f"{url}/mp/collect?measurement_id=G-TEST&api_secret=secret-1"
    plan = {
        "faults": [
            {"kind": "status", "status": 500, "count": 1, "path_prefix": "/mp/"},
            {"kind": "throttle", "retry_after_s": 2},
        ]
    }
    status, answer, _ = await post(http, f"{url}/__emulator/faults", plan)
    assert status == 200 and len(answer["pendingFaults"]) == 2
    status, _, _ = await post(http, f"{url}/__emulator/faults", {"faults": [{"kind": "nope"}]})
    assert status == 400
    assert (await post(http, collect, ga_body({"name": "e"})))[0] == 500
    status, _, headers = await post(http, collect, ga_body({"name": "e"}))
    assert status == 429 and headers["Retry-After"] == "2"
    assert (await post(http, collect, ga_body({"name": "e"})))[0] == 204
    async with http.get(f"{url}/__emulator/state?items=0") as resp:
        state = await resp.json()
    assert state["requests"] == 3 and state["acceptedCount"] == 1
    assert "accepted" not in state
    assert [f["kind"] for f in state["faultsApplied"]] == ["status", "throttle"]
    assert (await post(http, f"{url}/__emulator/reset", {}))[0] == 200
    assert emu.state.accepted == [] and emu.state.requests == 0


def test_start_all_in_a_thread_and_in_a_process() -> None:
    import json
    import urllib.request

    modes: tuple[Literal["thread", "process"], ...] = ("thread", "process")
    for mode in modes:
        with start_all(mode=mode) as cluster:
            assert {"segment", "mixpanel", "aep", "ga4"} <= set(cluster.urls)
            env = cluster.env()
            assert env["CDP_SINK_GA4_ENDPOINT"] == cluster.urls["ga4"]
            assert env["CDP_SINK_AEP_INLET_ID"] == cluster.credentials["aep"]["inlet_id"]
            key = cluster.credentials["segment"]["write_key"]
            cluster.inject("segment", [{"kind": "status", "status": 502}])
            req = urllib.request.Request(  # noqa: S310
                cluster.urls["segment"] + "/v1/track",
                data=json.dumps({"userId": "u", "event": "E", "writeKey": key}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as failed:
                urllib.request.urlopen(req, timeout=5)  # noqa: S310 - local emulator
            assert failed.value.code == 502
            with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
                assert resp.status == 200
            state = cluster.state("segment")
            assert state["acceptedCount"] == 1 and state["requests"] == 2
            cluster.reset()
            assert cluster.state("segment")["acceptedCount"] == 0
