"""AEP destination: XDM mapping, identities, limits, and the DCS contract via the emulator."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
import orjson
import pytest

from sinks import registry
from sinks.aep import AepDestination, AepSettings
from sinks.base import (
    ConfigError,
    HttpRequest,
    HttpResponse,
    Permanent,
    RequestTooLarge,
    Retryable,
    Throttled,
)
from sinks.emulators import AepEmulator
from tests.sinks.contract import ContractHooks, segment_event
from tests.sinks.emulators import (
    ECOMMERCE,
    TRAITS,
    enriched,
    now_ms,
    segment_message,
    send,
)

pytestmark = pytest.mark.timeout(60)


def _contract_rejected(tag: str, i: int) -> dict[str, Any]:
    """A record over the inlet's record-size guardrail (the emulator's is set to 400 KB
    below) but within ours: DCS refuses that one message in the 207."""
    msg = segment_event(tag, i)
    msg["properties"]["notes"] = "n" * 500_000
    return msg


#: For the shared contract (tests/sinks/contract.py): carry properties in the tenant
#: field so size-based tests have something to measure.
CONTRACT_HOOKS = ContractHooks(
    emulator_kwargs={"max_record_bytes": 400_000},
    settings={"tenant_id": "cdpflowtest"},
    rejected_item=_contract_rejected,
)

INLET, ORG, DATASET = "inlet-7", "ACME0001@AdobeOrg", "ds-events"
SCHEMA = "https://ns.adobe.com/acme/schemas/ee-cdp"


def settings(endpoint: str = "http://127.0.0.1:9", **overrides: Any) -> AepSettings:
    values: dict[str, Any] = {
        "endpoint": endpoint,
        "inlet_id": INLET,
        "org_id": ORG,
        "dataset_id": DATASET,
        "schema_id": SCHEMA,
        "flow_id": "flow-7",
        "access_token": "ims-secret-token",
        **overrides,
    }
    return AepSettings(**values)


def emulator(**overrides: Any) -> AepEmulator:
    values: dict[str, Any] = {
        "inlet_id": INLET,
        "org_id": ORG,
        "datasets": {DATASET: SCHEMA},
        "access_token": "ims-secret-token",
        "flow_id": "flow-7",
        **overrides,
    }
    return AepEmulator(**values)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def entity(dest: AepDestination, msg: dict[str, Any], **kw: Any) -> dict[str, Any]:
    mapped = dest.map(enriched(msg, **kw))
    assert mapped is not None
    xdm: dict[str, Any] = mapped.item["body"]["xdmEntity"]
    return xdm


def response(status: int, body: Any = None, headers: dict[str, str] | None = None) -> HttpResponse:
    raw = orjson.dumps(body) if body is not None else b""
    return HttpResponse(status, headers or {}, raw)


def request_for(n: int) -> HttpRequest:
    dest = AepDestination(settings())
    batch = [
        m
        for i in range(n)
        if (m := dest.map(enriched(segment_message(message_id=f"m-{i}")))) is not None
    ]
    return dest.build_requests(batch)[0]


# ---------------------------------------------------------------------- settings


def test_settings_from_env_keep_the_token_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        "ENDPOINT": "https://dcs.adobedc.net",
        "INLET_ID": INLET,
        "ORG_ID": ORG,
        "DATASET_ID": DATASET,
        "SCHEMA_ID": SCHEMA,
        "ACCESS_TOKEN": "ims-secret-token",
        "CRM_NAMESPACE": "CustomerId",
    }.items():
        monkeypatch.setenv(f"CDP_SINK_AEP_{key}", value)
    loaded = AepSettings()
    assert loaded.crm_namespace == "CustomerId"
    assert "ims-secret-token" not in repr(loaded)
    with pytest.raises(ValueError):
        AepSettings(**{**loaded.model_dump(), "org_id": "not-an-org"})
    assert registry.get("aep") is AepDestination


# ---------------------------------------------------------------------- mapping


@pytest.mark.parametrize(
    ("event", "event_type", "measure"),
    [
        ("Product Viewed", "commerce.productViews", "productViews"),
        ("Product Added", "commerce.productListAdds", "productListAdds"),
        ("Product Removed", "commerce.productListRemovals", "productListRemovals"),
        ("Cart Viewed", "commerce.productListViews", "productListViews"),
        ("Checkout Started", "commerce.checkouts", "checkouts"),
        ("Order Completed", "commerce.purchases", "purchases"),
    ],
)
def test_ecommerce_events_map_to_commerce_event_types(
    event: str, event_type: str, measure: str
) -> None:
    dest = AepDestination(settings())
    xdm = entity(dest, segment_message(event=event, message_id=f"id-{measure}"))
    assert xdm["_id"] == f"id-{measure}"
    assert xdm["eventType"] == event_type
    assert xdm["commerce"][measure] == {"value": 1}
    items = xdm["productListItems"]
    if event in ("Product Viewed", "Product Added", "Product Removed"):
        assert items == [
            {
                "SKU": "G-32",
                "name": "Monopoly: 3rd Edition",
                "quantity": 2,
                "priceTotal": 37.98,
                "currencyCode": "USD",
            }
        ]
    else:
        assert [i["SKU"] for i in items] == ["S-1", "S-2"]
        assert items[1]["priceTotal"] == 22.0


def test_order_completed_carries_the_order() -> None:
    dest = AepDestination(settings())
    xdm = entity(dest, segment_message(event="Order Completed"))
    assert xdm["commerce"]["order"] == {
        "currencyCode": "EUR",
        "purchaseID": "o-1",
        "priceTotal": 81.5,
    }


def test_page_other_track_identify_and_not_applicable_calls() -> None:
    dest = AepDestination(settings())
    page = entity(
        dest,
        segment_message(
            "page",
            event=None,
            name="Home",
            properties={
                "url": "https://shop.example/?u=jane%40example.com",
                "referrer": "https://r",
            },
        ),
    )
    assert page["eventType"] == "web.webpagedetails.pageViews"
    assert page["web"]["webPageDetails"]["pageViews"] == {"value": 1}
    assert page["web"]["webPageDetails"]["name"] == "Home"
    assert "jane" not in page["web"]["webPageDetails"]["URL"]  # email scrubbed from the URL
    assert page["web"]["webReferrer"] == {"URL": "https://r"}
    custom = entity(dest, segment_message(event="Video Played", properties={"length": 3}))
    assert custom["eventType"] == "cdpflow.track"
    assert "commerce" not in custom
    identify = entity(dest, segment_message("identify", event=None, traits=TRAITS))
    assert identify["eventType"] == "cdpflow.identify"
    assert dest.map(enriched(segment_message("group", event=None, groupId="g"))) is None
    alias = segment_message("alias", event=None, previousId="old", anonymous_id=None)
    assert dest.map(enriched(alias)) is None


def test_identity_map_has_crm_anonymous_and_hashed_email_never_raw() -> None:
    dest = AepDestination(settings())
    mapped = dest.map(enriched(segment_message(event="Order Completed"), traits=TRAITS))
    assert mapped is not None
    ids = mapped.item["body"]["xdmEntity"]["identityMap"]
    assert ids["CRMID"] == [
        {"id": "user-42", "authenticatedState": "authenticated", "primary": True}
    ]
    assert ids["SegmentAnonymousId"] == [
        {
            "id": "5b0f2d14-6c87-4bd8-9f40-9f3e2d1b7a11",
            "authenticatedState": "ambiguous",
            "primary": False,
        }
    ]
    expected = hashlib.sha256(b"jane.doe@gmail.com").hexdigest()
    assert ids["Email_LC_SHA256"] == [
        {"id": expected, "authenticatedState": "authenticated", "primary": False}
    ]
    assert "ECID" not in ids  # an anonymousId is not an ECID
    assert sum(1 for entries in ids.values() for e in entries if e["primary"]) == 1
    raw = orjson.dumps(mapped.item).lower()
    assert b"jane.doe@gmail.com" not in raw and b"@gmail" not in raw


def test_identity_choices_for_anonymous_stitched_and_ecid() -> None:
    dest = AepDestination(settings(crm_namespace="CustomerId", anonymous_namespace="AnonId"))
    anon = entity(dest, segment_message(user_id=None))["identityMap"]
    assert list(anon) == ["AnonId"] and anon["AnonId"][0]["primary"] is True
    stitched = entity(dest, segment_message(user_id=None), profile_id="user-9")["identityMap"]
    assert stitched["CustomerId"][0]["id"] == "user-9"
    ecid = "12345678901234567890123456789012345678"
    with_ecid = entity(
        dest,
        segment_message(
            user_id=None, integrations={"Adobe Analytics": {"marketingCloudVisitorId": ecid}}
        ),
    )["identityMap"]
    assert with_ecid["ECID"] == [{"id": ecid, "authenticatedState": "ambiguous", "primary": True}]
    assert with_ecid["AnonId"][0]["primary"] is False
    email_as_user = entity(dest, segment_message(user_id="Jane@Example.com"))["identityMap"]
    assert "CustomerId" not in email_as_user
    assert email_as_user["Email_LC_SHA256"][0]["id"] == (
        hashlib.sha256(b"jane@example.com").hexdigest()
    )


def test_timestamps_are_rfc3339_and_never_in_the_future() -> None:
    dest = AepDestination(settings())
    past = now_ms() - 3_600_000
    xdm = entity(dest, segment_message(timestamp_ms=past), decoded=True)
    assert xdm["timestamp"].endswith("Z") and len(xdm["timestamp"]) == 24
    future = entity(dest, segment_message(timestamp_ms=now_ms() + 3_600_000))
    parsed = datetime.fromisoformat(future["timestamp"].replace("Z", "+00:00"))
    assert parsed.timestamp() * 1000 <= now_ms() + 1000  # clamped: XDM wants past times


def test_envelope_and_headers() -> None:
    dest = AepDestination(settings(tenant_id="acme"))
    mapped = dest.map(enriched(segment_message()))
    assert mapped is not None
    header = mapped.item["header"]
    assert header["schemaRef"] == {
        "id": SCHEMA,
        "contentType": "application/vnd.adobe.xed-full+json;version=1",
    }
    assert header["imsOrgId"] == ORG and header["datasetId"] == DATASET
    assert header["flowId"] == "flow-7"
    assert mapped.item["body"]["xdmMeta"] == {"schemaRef": header["schemaRef"]}
    tenant = mapped.item["body"]["xdmEntity"]["_acme"]["cdpflow"]
    assert tenant["eventName"] == "Product Viewed" and tenant["eventType"] == "track"
    assert orjson.loads(tenant["properties"])["sku"] == "G-32"
    (request,) = dest.build_requests([mapped])
    assert request.url == f"http://127.0.0.1:9/collection/batch/{INLET}"
    assert request.headers["Authorization"] == "Bearer ims-secret-token"
    assert request.headers["x-adobe-flow-id"] == "flow-7"
    assert "authorization" in request.secret_headers
    assert orjson.loads(request.body) == {"messages": [mapped.item]}


def test_build_requests_stay_under_one_megabyte() -> None:
    dest = AepDestination(settings())
    big = {"products": [{"sku": f"s{i}", "name": "n" * 5000} for i in range(60)]}  # ~300 KB
    batch = []
    for i in range(7):
        m = dest.map(
            enriched(segment_message(event="Cart Viewed", properties=big, message_id=f"b{i}"))
        )
        assert m is not None
        batch.append(m)
    requests = dest.build_requests(batch)
    assert len(requests) > 1
    assert all(len(r.body) <= 1_000_000 for r in requests)
    assert [m.message_id for r in requests for m in r.items] == [f"b{i}" for i in range(7)]
    assert dest.limits.max_batch_bytes < 1_000_000


# ---------------------------------------------------------------------- classify


def test_classify_207_per_item() -> None:
    request = request_for(4)
    outcomes = AepDestination(settings()).classify(
        request,
        response(
            207,
            {
                "responses": [
                    {"xactionId": "1"},
                    {"statusCode": 400, "message": "inletId: [x] Message has unknown xdm format"},
                    {"xactionId": "3"},
                    {"statusCode": 503, "message": "busy"},
                ]
            },
        ),
    )
    assert [o.ok for o in outcomes] == [True, False, True, False]
    assert isinstance(outcomes[1].error, Permanent) and outcomes[1].error.reason == "AEP_400"
    assert isinstance(outcomes[3].error, Retryable)


def test_classify_whole_request_statuses() -> None:
    dest = AepDestination(settings())
    request = request_for(2)
    with pytest.raises(Throttled) as throttled:
        dest.classify(request, response(429, {"title": "Too Many"}, {"Retry-After": "12"}))
    assert throttled.value.retry_after_s == 12
    for status in (500, 503):
        with pytest.raises(Retryable):
            dest.classify(request, response(status))
    for status in (401, 403, 404):
        with pytest.raises(ConfigError):
            dest.classify(request, response(status, {"title": "Authorization"}))
    with pytest.raises(RequestTooLarge):
        dest.classify(request, response(413))
    with pytest.raises(Permanent):
        dest.classify(request, response(400, {"title": "Bad Request"}))
    all_busy = {"responses": [{"statusCode": 503}, {"statusCode": 503}]}
    with pytest.raises(Retryable):  # nothing taken: the whole request is safe to retry
        dest.classify(request, response(207, all_busy))
    with pytest.raises(Retryable):  # cannot tell which were taken
        dest.classify(request, response(207, {"responses": [{"xactionId": "1"}]}))


# ---------------------------------------------------------------------- against the emulator


async def test_requests_are_accepted_by_the_emulator(http: aiohttp.ClientSession) -> None:
    emu = emulator()
    async with emu.serve() as url:
        dest = AepDestination(settings(url))
        messages = [
            segment_message(event=name, message_id=f"ec-{i}") for i, name in enumerate(ECOMMERCE)
        ]
        messages.append(segment_message("page", event=None, name="Home", message_id="pg"))
        messages.append(segment_message("identify", event=None, traits=TRAITS, message_id="id"))
        messages.append(segment_message(event="Video Played", message_id="custom", user_id=None))
        batch = [m for msg in messages if (m := dest.map(enriched(msg, traits=TRAITS)))]
        (request,) = dest.build_requests(batch)
        outcomes = dest.classify(request, await send(http, request))
    assert all(o.ok for o in outcomes)
    assert len(emu.state.accepted) == len(messages)
    assert emu.state.dropped == []  # no asynchronous XDM failures either
    assert emu.state.pii_violations == []  # no raw email reached Adobe


async def test_partial_failure_classifies_per_item(http: aiohttp.ClientSession) -> None:
    emu = emulator()
    async with emu.serve() as url:
        dest = AepDestination(settings(url))
        batch = [
            m for i in range(3) if (m := dest.map(enriched(segment_message(message_id=f"p{i}"))))
        ]
        (request,) = dest.build_requests(batch)
        body = orjson.loads(request.body)
        body["messages"][1]["header"]["datasetId"] = "deleted-dataset"
        request.body = orjson.dumps(body)
        outcomes = dest.classify(request, await send(http, request))
    assert [o.ok for o in outcomes] == [True, False, True]
    assert isinstance(outcomes[1].error, Permanent)
    assert "deleted-dataset" in outcomes[1].error.detail
    assert [a["item"]["body"]["xdmEntity"]["_id"] for a in emu.state.accepted] == ["p0", "p2"]


async def test_auth_failures_are_config_errors(http: aiohttp.ClientSession) -> None:
    emu = emulator()
    async with emu.serve() as url:
        for token in (None, "expired-token"):
            dest = AepDestination(settings(url, access_token=token))
            mapped = dest.map(enriched(segment_message()))
            assert mapped is not None
            (request,) = dest.build_requests([mapped])
            with pytest.raises(ConfigError) as failed:
                dest.classify(request, await send(http, request))
            assert failed.value.reason == "AEP_UNAUTHORIZED"
    assert emu.state.accepted == []


async def test_oversized_request_is_request_too_large(http: aiohttp.ClientSession) -> None:
    emu = emulator(max_request_bytes=50_000)  # a stricter inlet than our 1 MB cut
    async with emu.serve() as url:
        dest = AepDestination(settings(url))
        big = {"products": [{"sku": f"s{i}", "name": "n" * 1000} for i in range(30)]}
        batch = [
            m
            for i in range(3)
            if (m := dest.map(enriched(segment_message(event="Cart Viewed", properties=big))))
        ]
        (request,) = dest.build_requests(batch)
        with pytest.raises(RequestTooLarge):
            dest.classify(request, await send(http, request))


async def test_throttling_and_outage_from_the_emulator(http: aiohttp.ClientSession) -> None:
    emu = emulator()
    async with emu.serve() as url:
        dest = AepDestination(settings(url))
        mapped = dest.map(enriched(segment_message()))
        assert mapped is not None
        (request,) = dest.build_requests([mapped])
        emu.throttle_next(1, retry_after_s=3)
        emu.fail_next(1, status=503)
        with pytest.raises(Throttled) as throttled:
            dest.classify(request, await send(http, request))
        assert throttled.value.retry_after_s == 3
        with pytest.raises(Retryable):
            dest.classify(request, await send(http, request))
        assert all(o.ok for o in dest.classify(request, await send(http, request)))
