"""LinkedIn DMP segment users: headers, elements, per-element outcomes, 404/429 handling,
the emulator's rules, and the sink on the real broker against the emulator."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import orjson
import pytest

from sinks.audience_base import FullSyncMember
from sinks.audience_sync import full_sync
from sinks.base import ConfigError, HttpRequest, HttpResponse, Permanent, Retryable, Throttled
from sinks.emulators.linkedin import DEFAULT_TOKEN, EMPTY_SHA256, LinkedInEmulator
from sinks.linkedin import SEGMENT_NOT_FOUND, LinkedInDestination, LinkedInSettings
from streams.audiences.identifiers import sha256_hex
from streams.serde import AvroSerde
from streams.settings import Settings
from tests.conftest import StackEndpoints
from tests.sinks.contract import (
    ContractHooks,
    audience_update,
    fast_engine,
    finished,
    harness,
    member_identifiers,
    wait_until,
)

SEGMENT = "41000001"


def _refused(user: str) -> dict[str, str]:
    """The hash of an empty address: hex like any other, but LinkedIn refuses the element."""
    return {**member_identifiers("linkedin", user), "SHA256_EMAIL": EMPTY_SHA256}


CONTRACT_HOOKS = ContractHooks(
    audience_id=SEGMENT,
    rejected_identifiers=_refused,
    request_limit=("max_elements_per_request", "max_elements"),
    throttle_states_wait=False,  # LinkedIn sends no Retry-After
)


def dest(**kw: Any) -> LinkedInDestination:
    values: dict[str, Any] = {"endpoint": "https://api.example", "access_token": "li-tok"}
    values.update(kw)
    return LinkedInDestination(LinkedInSettings(**values))


def update(user: str, action: str = "ADD", **ids: str) -> dict[str, Any]:
    identifiers = ids or member_identifiers("linkedin", user)
    return audience_update("linkedin", SEGMENT, f"p-{user}", identifiers, action=action)


def requests_for(d: LinkedInDestination, *updates: dict[str, Any]) -> list[HttpRequest]:
    mapped = [d.map(u) for u in updates]
    return d.build_requests([m for m in mapped if m is not None])


def response(status: int, body: Any = None, headers: dict[str, str] | None = None) -> HttpResponse:
    return HttpResponse(status, headers or {}, orjson.dumps(body) if body is not None else b"")


def test_settings() -> None:
    with pytest.raises(ValueError, match="ACCESS_TOKEN"):
        LinkedInSettings(endpoint="https://x")
    with pytest.raises(ValueError):
        LinkedInSettings(endpoint="https://x", access_token="t", api_version="2026-04")
    with pytest.raises(ValueError):
        LinkedInSettings(endpoint="https://x", access_token="t", max_elements_per_request=5001)


def test_request_headers_and_hashed_only_elements() -> None:
    reqs = requests_for(dest(), update("a"), update("b"), update("c", action="REMOVE"))
    assert len(reqs) == 2
    req = reqs[0]
    assert (
        req.method == "POST" and req.url == f"https://api.example/rest/dmpSegments/{SEGMENT}/users"
    )
    assert req.headers["Authorization"] == "Bearer li-tok"
    assert req.headers["LinkedIn-Version"] == "202604"
    assert req.headers["X-Restli-Protocol-Version"] == "2.0.0"
    assert req.headers["X-RestLi-Method"] == "BATCH_CREATE"
    elements = orjson.loads(req.body)["elements"]
    assert [e["action"] for e in elements] == ["ADD", "ADD"]
    assert all(set(e) == {"action", "userIds"} for e in elements)  # no unhashed hints
    assert elements[0]["userIds"] == [
        {"idType": "SHA256_EMAIL", "idValue": member_identifiers("linkedin", "a")["SHA256_EMAIL"]}
    ]
    assert orjson.loads(reqs[1].body)["elements"][0]["action"] == "REMOVE"


def test_elements_cut_to_the_limit_and_version_configurable() -> None:
    d = dest(max_elements_per_request=2, api_version="202510")
    reqs = requests_for(d, *(update(f"u{i}") for i in range(5)))
    assert [len(r.items) for r in reqs] == [2, 2, 1]
    assert reqs[0].headers["LinkedIn-Version"] == "202510"


def test_unhashed_email_never_becomes_a_request() -> None:
    with pytest.raises(Permanent) as err:
        dest().map(update("x", SHA256_EMAIL="x@example.com"))
    assert err.value.reason == "UNHASHED_IDENTIFIER"


def test_positional_element_outcomes() -> None:
    d = dest()
    req = requests_for(d, update("a"), update("b"), update("c"))[0]
    body = {"elements": [{"status": 201}, {"status": 400, "message": "bad id"}, {"status": 200}]}
    outcomes = d.classify(req, response(200, body))
    assert [o.ok for o in outcomes] == [True, False, True]
    assert outcomes[1].error is not None and outcomes[1].error.reason == "ELEMENT_400"
    with pytest.raises(Permanent):
        d.classify(req, response(200, {"elements": [{"status": 201}]}))


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind", "retry_after"),
    [
        (429, None, {}, Throttled, None),
        (429, None, {"Retry-After": "7"}, Throttled, 7.0),
        (401, {"status": 401, "code": "UNAUTHORIZED"}, {}, ConfigError, None),
        (403, {"status": 403, "code": "ACCESS_DENIED"}, {}, ConfigError, None),
        (400, {"status": 400, "code": "VERSION_MISSING"}, {}, ConfigError, None),
        (426, {"status": 426, "code": "NONEXISTENT_VERSION"}, {}, ConfigError, None),
        (500, None, {}, Retryable, None),
        (503, None, {}, Retryable, None),
        (400, {"status": 400, "code": "BAD_REQUEST"}, {}, Permanent, None),
    ],
)
def test_whole_request_errors(
    status: int, body: Any, headers: dict[str, str], kind: type[Exception], retry_after: Any
) -> None:
    d = dest()
    req = requests_for(d, update("a"))[0]
    with pytest.raises(kind) as err:
        d.classify(req, response(status, body, headers))
    assert type(err.value) is kind
    if isinstance(err.value, Throttled):
        assert err.value.retry_after_s == retry_after


def test_404_is_retried_while_the_segment_may_be_new_then_dead_lettered() -> None:
    d = dest(segment_not_ready_grace_s=0.2)
    req = requests_for(d, update("a"), update("b"))[0]
    with pytest.raises(Retryable) as err:
        d.classify(req, response(404, {"status": 404}))
    assert err.value.reason == "SEGMENT_NOT_READY"
    time.sleep(0.25)
    outcomes = d.classify(req, response(404, {"status": 404}))
    assert [o.error.reason if o.error else None for o in outcomes] == [SEGMENT_NOT_FOUND] * 2
    # A success resets the clock for that segment.
    d.classify(req, response(200, {"elements": [{"status": 201}, {"status": 201}]}))
    with pytest.raises(Retryable):
        d.classify(req, response(404, {"status": 404}))


def test_full_sync_adds_everyone() -> None:
    d = dest(max_elements_per_request=2)
    members = [
        d.member_item(SEGMENT, FullSyncMember(f"p{i}", member_identifiers("linkedin", f"m{i}")))
        for i in range(3)
    ]
    reqs = d.build_full_sync(SEGMENT, members)
    assert [len(r.items) for r in reqs] == [2, 1]
    assert {e["action"] for r in reqs for e in orjson.loads(r.body)["elements"]} == {"ADD"}


# --------------------------------------------------------------------------- emulator

HEADERS = {
    "Authorization": f"Bearer {DEFAULT_TOKEN}",
    "LinkedIn-Version": "202604",
    "X-Restli-Protocol-Version": "2.0.0",
    "X-RestLi-Method": "BATCH_CREATE",
}


def el(action: str, value: str, id_type: str = "SHA256_EMAIL", **extra: Any) -> dict[str, Any]:
    return {"action": action, "userIds": [{"idType": id_type, "idValue": value}], **extra}


async def _post(
    http: aiohttp.ClientSession, url: str, elements: Any, **headers: str
) -> tuple[int, Any, Any]:
    hdrs = {k: v for k, v in {**HEADERS, **headers}.items() if v}
    async with http.post(url, json={"elements": elements}, headers=hdrs) as resp:
        return resp.status, await resp.json(), resp.headers


async def test_emulator_membership_element_statuses_and_pii() -> None:
    emu = LinkedInEmulator()
    a, b = sha256_hex("a@example.com"), sha256_hex("b@example.com")
    async with emu.serve() as url, aiohttp.ClientSession() as http:
        users = f"{url}/rest/dmpSegments/{SEGMENT}/users"
        status, body, _ = await _post(http, users, [el("ADD", a), el("ADD", b)])
        assert status == 200 and body == {"elements": [{"status": 201}, {"status": 201}]}
        status, body, _ = await _post(
            http,
            users,
            [
                el("REMOVE", b),
                el("ADD", "jane@example.com"),
                el("ADD", EMPTY_SHA256),
                el("ADD", a, firstName="Jane"),
                {"action": "UPSERT", "userIds": [{"idType": "SHA256_EMAIL", "idValue": a}]},
                {"action": "ADD", "userIds": []},
            ],
        )
        assert status == 200
        assert [e["status"] for e in body["elements"]] == [201, 400, 400, 201, 400, 400]
        assert emu.members(SEGMENT) == {(("SHA256_EMAIL", a),)}
        assert sorted(v["kind"] for v in emu.state.pii_violations) == [
            "not_hashed",
            "unhashed_hint",
        ]


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"Authorization": "Bearer nope"}, 401, "UNAUTHORIZED"),
        ({"LinkedIn-Version": ""}, 400, "VERSION_MISSING"),
        ({"LinkedIn-Version": "201901"}, 426, "NONEXISTENT_VERSION"),
        ({"X-Restli-Protocol-Version": ""}, 400, "BAD_REQUEST"),
        ({"X-RestLi-Method": "CREATE"}, 400, "BAD_REQUEST"),
    ],
)
async def test_emulator_header_rules(headers: dict[str, str], status: int, code: str) -> None:
    emu = LinkedInEmulator()
    async with emu.serve() as url, aiohttp.ClientSession() as http:
        got, body, _ = await _post(
            http, f"{url}/rest/dmpSegments/{SEGMENT}/users", [el("ADD", "0" * 64)], **headers
        )
    assert (got, body["code"]) == (status, code)


async def test_emulator_limits_segments_and_rate() -> None:
    emu = LinkedInEmulator(segments=[SEGMENT], max_elements=2, requests_per_minute=3)
    v = sha256_hex("a@example.com")
    async with emu.serve() as url, aiohttp.ClientSession() as http:
        users = f"{url}/rest/dmpSegments/{SEGMENT}/users"
        status, _, _ = await _post(http, users, [el("ADD", v)] * 3)
        assert status == 400
        status, _, _ = await _post(http, users, [])
        assert status == 400
        status, _, _ = await _post(http, f"{url}/rest/dmpSegments/999/users", [el("ADD", v)])
        assert status == 404
        status, _, headers = await _post(http, users, [el("ADD", v)])
        assert status == 429 and "Retry-After" not in headers
    emu = LinkedInEmulator(segments=[])
    emu.create_segment("55")
    async with emu.serve() as url, aiohttp.ClientSession() as http:
        status, _, _ = await _post(http, f"{url}/rest/dmpSegments/55/users", [el("ADD", v)])
        assert status == 404  # created less than 5 s ago


async def test_destination_retries_a_new_segment_until_ready() -> None:
    emu = LinkedInEmulator(segments=[], ready_after_s=0.5)
    emu.create_segment(SEGMENT)
    async with emu.serve() as url:
        d = dest(endpoint=url, access_token=DEFAULT_TOKEN)
        members = [
            FullSyncMember(f"p{i}", member_identifiers("linkedin", f"m{i}")) for i in range(3)
        ]
        result = await full_sync(
            "linkedin", SEGMENT, members, destination=d, engine=fast_engine("x")
        )
    assert result.ok and result.sent == 3
    assert len(emu.members(SEGMENT)) == 3
    assert any(r["status"] == 404 for r in emu.state.rejected_requests)


# --------------------------------------------------------------------------- on the broker


async def test_sink_on_the_broker_membership_order_and_rate_limit(
    settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    # A low per-minute budget: the emulator answers 429 (no Retry-After) and the
    # engine's throttle backoff must carry every update through.
    async with harness(
        "linkedin", settings, serde, stack, partitions=1, requests_per_minute=2, rate_window_s=2
    ) as h:
        first = [h.update(i) for i in range(3)]
        h.producer.flush()
        d = h.destination(max_elements_per_request=2)
        async with h.run(d) as service:
            runner = service.runners["linkedin"]
            await wait_until(lambda: finished(runner) >= 3, 60, "first updates")
            flip = [h.update(9, action=a, version=v) for v, a in enumerate(["ADD", "REMOVE"], 1)]
            leave = h.update(0, action="REMOVE", version=2)
            h.producer.flush()
            await wait_until(lambda: finished(runner) >= 6, 120, "all updates")
        assert (runner.stats.delivered, runner.stats.dead_lettered) == (6, 0)
        assert any(r["status"] == 429 for r in h.emulator.state.rejected_requests)
        assert runner.stats.retries >= 1
        assert len(h.members()) == 2  # 1 and 2
        assert h.dlq.records({*first, *flip, leave}, timeout=1.0) == []
