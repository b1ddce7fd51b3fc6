"""GA4 destination: recommended-event mapping, naming rules, the 72 h window, hashing,
one user per request, validate mode — and acceptance by the Measurement Protocol emulator."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sinks import registry
from sinks.base import (
    ConfigError,
    HttpRequest,
    HttpResponse,
    MappedEvent,
    Permanent,
    Retryable,
    Throttled,
)
from sinks.emulators import Ga4Emulator
from sinks.engine import SinkEngineSettings, check_sink_env, make_session, standalone_deliverer
from sinks.ga4 import (
    CLIENT_ID_RE,
    NAME_RE,
    RESERVED_EVENT_NAMES,
    RESERVED_PREFIXES,
    Ga4Destination,
    Ga4Settings,
    ga4_name,
)
from streams.settings import UnknownSettingError
from tests.sinks.emulators import (
    ECOMMERCE,
    TRAITS,
    enriched,
    now_ms,
    segment_message,
    send,
)

pytestmark = pytest.mark.timeout(60)

MID, SECRET = "G-CDPTEST1", "mp-secret-value"


def dest(endpoint: str = "http://127.0.0.1:9", **overrides: Any) -> Ga4Destination:
    values: dict[str, Any] = {
        "endpoint": endpoint,
        "api_secret": SECRET,
        "measurement_id": MID,
        **overrides,
    }
    return Ga4Destination(Ga4Settings(**values))


def mapped(d: Ga4Destination, msg: dict[str, Any], **kw: Any) -> MappedEvent:
    m = d.map(enriched(msg, **kw))
    assert m is not None
    return m


def ga_event(d: Ga4Destination, msg: dict[str, Any], **kw: Any) -> dict[str, Any]:
    event: dict[str, Any] = mapped(d, msg, **kw).item["event"]
    return event


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


# ---------------------------------------------------------------------- settings


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_SINK_GA4_ENDPOINT", "https://region1.google-analytics.com")
    monkeypatch.setenv("CDP_SINK_GA4_API_SECRET", SECRET)
    monkeypatch.setenv("CDP_SINK_GA4_MEASUREMENT_ID", MID)
    monkeypatch.setenv("CDP_SINK_GA4_VALIDATE", "true")
    monkeypatch.setenv("CDP_SINK_GA4_AD_USER_DATA_CATEGORIES", "Advertising,Marketing")
    loaded = Ga4Settings()
    assert loaded.validate_first is True
    assert loaded.ad_user_data_categories == ["Advertising", "Marketing"]
    assert SECRET not in repr(loaded)
    by_keyword: dict[str, Any] = {"validate": True}
    assert Ga4Settings(
        endpoint="x", api_secret="s", measurement_id="G-1", **by_keyword
    ).validate_first
    assert registry.get("ga4") is Ga4Destination


# ---------------------------------------------------------------------- mapping


def test_product_events_map_to_recommended_events_with_items() -> None:
    d = dest()
    for segment_name, ga_name in (
        ("Product Viewed", "view_item"),
        ("Product Added", "add_to_cart"),
        ("Product Removed", "remove_from_cart"),
    ):
        event = ga_event(d, segment_message(event=segment_name))
        assert event["name"] == ga_name
        params = event["params"]
        assert params["currency"] == "USD"
        assert params["value"] == pytest.approx(37.98)
        assert params["items"] == [
            {
                "item_id": "507f1f77bcf86cd799439011",
                "item_name": "Monopoly: 3rd Edition",
                "item_brand": "Hasbro",
                "item_category": "Games",
                "item_variant": "200 pieces",
                "price": 18.99,
                "quantity": 2,
                "index": 3,
            }
        ]


def test_cart_checkout_purchase_and_search() -> None:
    d = dest()
    cart = ga_event(d, segment_message(event="Cart Viewed"))
    assert cart["name"] == "view_cart"
    assert [i["item_id"] for i in cart["params"]["items"]] == ["p1", "p2"]
    assert cart["params"]["value"] == pytest.approx(72.0)  # sum of price * quantity
    checkout = ga_event(d, segment_message(event="Checkout Started"))
    assert checkout["name"] == "begin_checkout"
    assert checkout["params"]["currency"] == "EUR" and checkout["params"]["coupon"] == "SPRING"
    purchase = ga_event(d, segment_message(event="Order Completed"))
    assert purchase["name"] == "purchase"
    p = purchase["params"]
    assert (p["transaction_id"], p["value"], p["currency"]) == ("o-1", 81.5, "EUR")
    assert (p["tax"], p["shipping"], p["coupon"], p["affiliation"]) == (5.0, 4.5, "SPRING", "Web")
    assert len(p["items"]) == 2
    search = ga_event(d, segment_message(event="Products Searched"))
    assert search["name"] == "search" and search["params"]["search_term"] == "blue hotpants"


def test_page_view_and_not_applicable_calls() -> None:
    d = dest()
    page = ga_event(
        d,
        segment_message(
            "page",
            event=None,
            name="Home",
            context={"page": {"url": "https://shop.example/", "referrer": "https://ref.example/"}},
            properties={"section": "landing"},
        ),
    )
    assert page["name"] == "page_view"
    assert page["params"]["page_location"] == "https://shop.example/"
    assert page["params"]["page_referrer"] == "https://ref.example/"
    assert page["params"]["page_title"] == "Home"
    assert page["params"]["section"] == "landing"
    for kind, extra in (
        ("identify", {"traits": {"plan": "pro"}}),
        ("screen", {"name": "Main"}),
        ("group", {"groupId": "g"}),
    ):
        assert d.map(enriched(segment_message(kind, event=None, **extra))) is None


def test_custom_events_get_valid_names_and_params() -> None:
    d = dest()
    props: dict[str, Any] = {f"Prop {i}": i for i in range(40)}
    props["contact"] = "write to jane.doe@example.com please"
    props["long"] = "x" * 500
    props["nested"] = {"a": 1}
    event = ga_event(d, segment_message(event="Video Played", properties=props))
    assert event["name"] == "video_played"
    params = event["params"]
    assert len(params) <= 25
    assert all(NAME_RE.match(k) and not k.startswith(RESERVED_PREFIXES) for k in params)
    assert params["engagement_time_msec"] == 1
    assert all(len(v) <= 100 for v in params.values() if isinstance(v, str))
    assert "nested" not in params
    assert ga_event(d, segment_message(event="Error"))["name"] == "cdp_error"
    assert ga_event(d, segment_message(event="first_visit"))["name"] == "cdp_first_visit"
    assert ga_event(d, segment_message(event="42 Things"))["name"] == "e_42_things"
    assert ga_event(d, segment_message(event="addToWishlistClicked"))["name"] == (
        "add_to_wishlist_clicked"
    )
    assert len(ga_event(d, segment_message(event="A" * 80 + " very long"))["name"]) == 40


def test_no_email_in_any_value() -> None:
    d = dest()
    m = mapped(
        d,
        segment_message(
            event="Contact Requested",
            properties={"from": "Jane <jane.doe@example.com>", "url": "https://x/?e=jane%40x.io"},
        ),
        traits=TRAITS,
    )
    raw = orjson.dumps(m.item).lower()
    assert b"@" not in raw and b"%40" not in raw


@given(st.text(min_size=0, max_size=120))
@settings(max_examples=300, deadline=None)
def test_ga4_name_is_always_valid(raw: str) -> None:
    name = ga4_name(raw, reserved=RESERVED_EVENT_NAMES)
    assert NAME_RE.match(name)
    assert name not in RESERVED_EVENT_NAMES
    assert not name.startswith(RESERVED_PREFIXES)


# ---------------------------------------------------------------------- identity


def test_client_id_choices() -> None:
    d = dest()
    ga_cookie = mapped(d, segment_message(anonymous_id="1234567890.1700000000"))
    assert ga_cookie.item["client_id"] == "1234567890.1700000000"
    a = mapped(d, segment_message(anonymous_id="anon-uuid-1"))
    b = mapped(d, segment_message(anonymous_id="anon-uuid-1", user_id=None))
    assert CLIENT_ID_RE.match(a.item["client_id"])
    assert a.item["client_id"] == b.item["client_id"]  # stable per device
    server_1 = mapped(d, segment_message(anonymous_id=None, user_id="srv-user"))
    server_2 = mapped(d, segment_message(anonymous_id=None, user_id="srv-user"))
    assert server_1.item["client_id"] == server_2.item["client_id"]
    assert server_1.item["client_id"] != a.item["client_id"]
    assert server_1.item["user_id"] == "srv-user"
    explicit = mapped(
        d,
        segment_message(
            integrations={"Google Analytics 4": {"clientId": "111.222", "sessionId": "1700000000"}}
        ),
    )
    assert explicit.item["client_id"] == "111.222"
    assert explicit.item["event"]["params"]["session_id"] == "1700000000"
    anon = mapped(d, segment_message(user_id=None))
    assert "user_id" not in anon.item
    stitched = mapped(d, segment_message(user_id=None), profile_id="user-7")
    assert stitched.item["user_id"] == "user-7"
    email_as_user = mapped(d, segment_message(user_id="jane@example.com"))
    assert "user_id" not in email_as_user.item and b"@" not in orjson.dumps(email_as_user.item)


def test_user_data_is_normalised_and_hashed() -> None:
    d = dest()
    m = mapped(d, segment_message(), traits=TRAITS)
    data = m.item["user_data"]
    assert data["sha256_email_address"] == [hashlib.sha256(b"janedoe@gmail.com").hexdigest()]
    assert data["sha256_phone_number"] == [hashlib.sha256(b"+15550109999").hexdigest()]
    address = data["address"][0]
    assert address["sha256_first_name"] == hashlib.sha256(b"jane").hexdigest()
    assert (address["city"], address["country"], address["postal_code"]) == (
        "berlin",
        "DE",
        "10115",
    )
    assert (
        "user_data" not in mapped(dest(send_user_data=False), segment_message(), traits=TRAITS).item
    )


def test_consent_from_category_preferences() -> None:
    d = dest()
    ctx = {"consent": {"categoryPreferences": {"Advertising": False, "Analytics": True}}}
    denied = mapped(d, segment_message(context=ctx), traits=TRAITS)
    assert denied.item["consent"] == {"ad_user_data": "DENIED", "ad_personalization": "DENIED"}
    assert "user_data" not in denied.item  # no hashed PII to Google without ad_user_data consent
    ctx = {"consent": {"categoryPreferences": {"Advertising": True}}}
    granted = mapped(d, segment_message(context=ctx), traits=TRAITS)
    assert granted.item["consent"] == {"ad_user_data": "GRANTED", "ad_personalization": "GRANTED"}
    assert "user_data" in granted.item
    assert "consent" not in mapped(d, segment_message(context={})).item


# ---------------------------------------------------------------------- time window


def test_events_older_than_the_window_are_permanent() -> None:
    d = dest(backdate_margin_s=900)
    with pytest.raises(Permanent) as too_old:
        d.map(enriched(segment_message(timestamp_ms=now_ms() - 72 * 3600 * 1000)))
    assert too_old.value.reason == "GA4_TOO_OLD"
    with pytest.raises(Permanent):  # inside 72 h but within the safety margin
        d.map(enriched(segment_message(timestamp_ms=now_ms() - (72 * 3600 - 600) * 1000)))
    ts = now_ms() - 70 * 3600 * 1000
    event = ga_event(d, segment_message(timestamp_ms=ts), decoded=True)
    assert event["timestamp_micros"] == ts * 1000
    future = ga_event(d, segment_message(timestamp_ms=now_ms() + 600_000))
    assert "timestamp_micros" not in future  # a client clock ahead: GA uses receipt time


# ---------------------------------------------------------------------- requests


def test_one_user_per_request_and_at_most_25_events() -> None:
    d = dest()
    batch = [
        mapped(d, segment_message(message_id=f"a{i}", anonymous_id="dev-a")) for i in range(30)
    ]
    batch += [
        mapped(d, segment_message(message_id=f"b{i}", anonymous_id="dev-b")) for i in range(3)
    ]
    batch.insert(5, mapped(d, segment_message(message_id="c0", anonymous_id="dev-c")))
    requests = d.build_requests(batch)
    assert [len(r.items) for r in requests] == [25, 5, 1, 3]
    for request in requests:
        body = orjson.loads(request.body)
        assert len(body["events"]) == len(request.items) <= 25
        assert {m.item["client_id"] for m in request.items} == {body["client_id"]}
        assert len(request.body) < 130_000
        assert "api_secret" in request.secret_params
        assert request.url.startswith("http://127.0.0.1:9/mp/collect?measurement_id=G-CDPTEST1")
        assert "validation_behavior" not in body
    assert [m.message_id for m in requests[0].items] == [f"a{i}" for i in range(25)]


def test_classify() -> None:
    d = dest()
    request = d.build_requests([mapped(d, segment_message())])[0]
    assert all(o.ok for o in d.classify(request, HttpResponse(204, {}, b"")))
    with pytest.raises(Retryable):
        d.classify(request, HttpResponse(500, {}, b""))
    with pytest.raises(Throttled) as throttled:
        d.classify(request, HttpResponse(429, {"Retry-After": "4"}, b""))
    assert throttled.value.retry_after_s == 4
    with pytest.raises(ConfigError):
        d.classify(request, HttpResponse(404, {}, b""))


# ---------------------------------------------------------------------- against the emulator


def all_kinds(d: Ga4Destination) -> list[MappedEvent]:
    messages = [
        segment_message(event=name, message_id=f"ec-{i}") for i, name in enumerate(ECOMMERCE)
    ]
    messages += [
        segment_message("page", event=None, name="Home", message_id="pg"),
        segment_message(event="Video Played", properties={"percent": 50}, message_id="vp"),
        segment_message(event="Error", message_id="err"),
        segment_message(event="Order Completed", user_id=None, anonymous_id="x", message_id="anon"),
    ]
    return [mapped(d, msg, traits=TRAITS) for msg in messages]


async def test_requests_are_accepted_by_the_emulator(http: aiohttp.ClientSession) -> None:
    emu = Ga4Emulator(streams={MID: SECRET})
    async with emu.serve() as url:
        d = dest(url)
        batch = all_kinds(d)
        requests = d.build_requests(batch)
        for request in requests:
            response = await send(http, request)
            assert response.status == 204
            assert all(o.ok for o in d.classify(request, response))
            # The strict validator finds nothing to complain about either.
            check = d.validation_request(request)
            assert all(o.ok for o in d.classify_validation(check, await send(http, check)))
    assert len(emu.state.accepted) == len(batch)
    assert emu.state.dropped == []
    assert emu.state.pii_violations == []  # no raw email, user_data properly hashed
    names = [a["item"]["event"]["name"] for a in emu.state.accepted]
    expected = {"view_item", "add_to_cart", "remove_from_cart", "view_cart", "begin_checkout"}
    expected |= {"purchase", "search", "page_view", "video_played", "cdp_error"}
    assert expected <= set(names)
    assert not any(a["item"]["event"].get("ignored_params") for a in emu.state.accepted)


async def test_wrong_secret_is_invisible_except_in_emulator_state(
    http: aiohttp.ClientSession,
) -> None:
    emu = Ga4Emulator(streams={MID: "the-real-secret"})
    async with emu.serve() as url:
        d = dest(url)
        (request,) = d.build_requests([mapped(d, segment_message())])
        response = await send(http, request)
        assert all(o.ok for o in d.classify(request, response))  # GA says 2xx regardless
    assert [x["reason"] for x in emu.state.dropped] == ["invalid_credentials"]


async def test_validate_mode_catches_invalid_events(http: aiohttp.ClientSession) -> None:
    emu = Ga4Emulator(streams={MID: SECRET})
    async with emu.serve() as url:
        d = dest(url, validate=True)
        batch = [
            mapped(d, segment_message(message_id=f"v{i}", anonymous_id="dev")) for i in range(3)
        ]
        # Items that slipped past the mapper (e.g. a hand-built replay): a bad name, a huge value.
        batch[1].item["event"]["name"] = "_bad name"
        batch[2].item["event"]["params"]["note"] = "y" * 150
        (request,) = d.build_requests(batch)
        calls: list[HttpRequest] = []

        async def transport(r: HttpRequest) -> HttpResponse:
            calls.append(r)
            return await send(http, r)

        outcomes = await d.preflight(request, transport)
        assert [o.ok for o in outcomes] == [True, False, False]
        assert outcomes[1].error is not None and outcomes[1].error.reason == "GA4_INVALID"
        assert "NAME_" in outcomes[1].error.detail
        assert outcomes[2].error is not None and "VALUE_OUT_OF_BOUNDS" in outcomes[2].error.detail
        assert len(calls) == 1 and "/debug/mp/collect" in calls[0].url
        assert orjson.loads(calls[0].body)["validation_behavior"] == "ENFORCE_RECOMMENDATIONS"
        assert emu.state.accepted == []  # the debug endpoint never records

        off = dest(url)
        assert all(o.ok for o in await off.preflight(request, transport))
        assert len(calls) == 1  # validate off: no extra request


async def test_engine_runs_validate_mode_before_sending(http: aiohttp.ClientSession) -> None:
    """With CDP_SINK_GA4_VALIDATE the engine dead-letters what the debug endpoint flags
    and sends only the rest, once: one debug round trip, then one real request."""
    emu = Ga4Emulator(streams={MID: SECRET})
    async with emu.serve() as url:
        d = dest(url, validate=True)
        batch = [
            mapped(d, segment_message(message_id=f"e{i}", anonymous_id="dev")) for i in range(3)
        ]
        batch[1].item["event"]["name"] = "_bad name"
        async with make_session(d) as session:
            deliverer = standalone_deliverer(d, session, SinkEngineSettings())
            failures = await deliverer.deliver(batch)
    assert [(f.item.message_id, f.error.reason) for f in failures] == [("e1", "GA4_INVALID")]
    assert "NAME_" in failures[0].error.detail
    assert sorted(a["item"]["event"]["name"] for a in emu.state.accepted) == [
        batch[0].item["event"]["name"],
        batch[2].item["event"]["name"],
    ]


async def test_engine_sends_unchecked_when_validate_is_off(http: aiohttp.ClientSession) -> None:
    emu = Ga4Emulator(streams={MID: SECRET})
    async with emu.serve() as url:
        d = dest(url)
        batch = [mapped(d, segment_message(message_id="only", anonymous_id="dev"))]
        batch[0].item["event"]["name"] = "_bad name"
        async with make_session(d) as session:
            failures = await standalone_deliverer(d, session, SinkEngineSettings()).deliver(batch)
    # GA4 answers 2xx to invalid hits and drops them: exactly why validate mode exists.
    assert failures == []
    assert emu.state.accepted == []
    assert [x["reason"] for x in emu.state.dropped] != []


def test_validate_env_name_passes_the_unknown_key_check() -> None:
    classes = registry.load_all()
    check_sink_env(classes, {"CDP_SINK_GA4_VALIDATE": "true"})
    with pytest.raises(UnknownSettingError):
        check_sink_env(classes, {"CDP_SINK_GA4_VALIDAT": "true"})
