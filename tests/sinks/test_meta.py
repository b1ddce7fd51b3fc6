"""Meta Custom Audiences: rows and requests, the Graph error table, counters, usersreplace,
the emulator's rules, and the sink on the real broker against the emulator."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import orjson
import pytest

from sinks.audience_base import FullSyncMember
from sinks.audience_sync import full_sync
from sinks.base import (
    ConfigError,
    HttpRequest,
    HttpResponse,
    Permanent,
    RequestTooLarge,
    Retryable,
    Throttled,
)
from sinks.emulators.meta import DEFAULT_TOKEN, MetaEmulator
from sinks.meta import (
    AUDIENCE_UNAVAILABLE,
    INVALID_ENTRY,
    SCHEMA_ORDER,
    MetaDestination,
    MetaSettings,
    appsecret_proof,
    regain_access_s,
)
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

AUDIENCE = "23850000000000001"


def _refused_row(user: str) -> dict[str, str]:
    """Hashed, but COUNTRY hashes "usa", not a 2-letter code: Meta counts the row invalid."""
    ids = member_identifiers("meta", user)
    ids["COUNTRY"] = sha256_hex("usa")
    return ids


CONTRACT_HOOKS = ContractHooks(
    audience_id=AUDIENCE,
    rejected_identifiers=_refused_row,
    request_limit=("max_rows_per_request", "max_rows"),
    throttle_states_wait=True,
)


def dest(**kw: Any) -> MetaDestination:
    values: dict[str, Any] = {"endpoint": "https://graph.example", "access_token": "tok-123"}
    values.update(kw)
    return MetaDestination(MetaSettings(**values))


def update(user: str, action: str = "ADD", audience: str = AUDIENCE, **ids: str) -> dict[str, Any]:
    identifiers = ids or member_identifiers("meta", user)
    return audience_update("meta", audience, f"p-{user}", identifiers, action=action)


def response(status: int, body: Any, headers: dict[str, str] | None = None) -> HttpResponse:
    return HttpResponse(status, headers or {}, orjson.dumps(body))


def requests_for(d: MetaDestination, *updates: dict[str, Any]) -> list[HttpRequest]:
    mapped = [d.map(u) for u in updates]
    return d.build_requests([m for m in mapped if m is not None])


# --------------------------------------------------------------------------- settings / rows


def test_settings_need_a_token_and_validate_version() -> None:
    with pytest.raises(ValueError, match="ACCESS_TOKEN"):
        MetaSettings(endpoint="https://x")
    with pytest.raises(ValueError):
        MetaSettings(endpoint="https://x", access_token="t", api_version="25")
    with pytest.raises(ValueError):
        MetaSettings(endpoint="https://x", access_token="t", max_rows_per_request=10_001)
    assert "s3cr3t" not in repr(MetaSettings(endpoint="https://x", access_token="s3cr3t"))


def test_multi_key_request_fixed_schema_blanks_and_method_per_action() -> None:
    d = dest()
    full = update("a")
    email_only = update("b", EMAIL=sha256_hex("b@example.com"))
    gone = update("c", action="REMOVE")
    reqs = requests_for(d, full, email_only, gone)
    assert [r.method for r in reqs] == ["POST", "DELETE"]
    add = orjson.loads(reqs[0].body)["payload"]
    schema = add["schema"]
    assert schema == [k for k in SCHEMA_ORDER if k in schema]  # one fixed order
    assert set(full["identifiers"]) == set(schema)
    assert len(add["data"]) == 2 and all(len(row) == len(schema) for row in add["data"])
    second = dict(zip(schema, add["data"][1], strict=True))
    assert second["EMAIL"] == sha256_hex("b@example.com")
    assert {v for k, v in second.items() if k != "EMAIL"} == {""}
    assert add["data_source"] == {"type": "UNKNOWN", "sub_type": "ANYTHING"}
    url = urlsplit(reqs[0].url)
    assert url.path == f"/v25.0/{AUDIENCE}/users"
    assert parse_qs(url.query) == {"access_token": ["tok-123"]}
    assert "access_token" in reqs[0].secret_params
    assert reqs[1].url.startswith(f"https://graph.example/v25.0/{AUDIENCE}/users?")


def test_appsecret_proof_is_hmac_sha256_of_the_token() -> None:
    expected = hmac.new(b"app-secret", b"tok-123", hashlib.sha256).hexdigest()
    assert appsecret_proof("tok-123", "app-secret") == expected
    req = requests_for(dest(app_secret="app-secret", api_version="v24.0"), update("a"))[0]
    query = parse_qs(urlsplit(req.url).query)
    assert query["appsecret_proof"] == [expected]
    assert "/v24.0/" in req.url and "appsecret_proof" in req.secret_params


def test_rows_are_cut_to_the_per_request_limit() -> None:
    d = dest(max_rows_per_request=3)
    reqs = requests_for(d, *(update(f"u{i}") for i in range(7)))
    assert [len(r.items) for r in reqs] == [3, 3, 1]
    assert d.limits.max_batch_events == 3


def test_other_platforms_skipped_and_unhashed_refused_before_any_request() -> None:
    d = dest()
    other = audience_update("linkedin", "1", "p", {"SHA256_EMAIL": sha256_hex("x@example.com")})
    assert d.map(other) is None
    with pytest.raises(Permanent) as err:
        d.map(update("x", EMAIL="jane@example.com"))
    assert err.value.reason == "UNHASHED_IDENTIFIER" and "jane" not in str(err.value)


# --------------------------------------------------------------------------- responses


def test_counters_ok_and_invalid_rows_named_by_samples() -> None:
    d = dest()
    req = requests_for(d, update("a"), _u("b"), update("c"))[0]
    ok = d.classify(
        req,
        response(
            200,
            {
                "audience_id": AUDIENCE,
                "num_received": 3,
                "num_invalid_entries": 0,
                "invalid_entry_samples": {},
            },
        ),
    )
    assert all(o.ok for o in ok)
    bad_value = sha256_hex("usa")
    outcomes = d.classify(
        req,
        response(
            200,
            {
                "num_received": 3,
                "num_invalid_entries": 1,
                "invalid_entry_samples": {bad_value: "invalid country"},
            },
        ),
    )
    assert [o.ok for o in outcomes] == [True, False, True]
    assert outcomes[1].error is not None and outcomes[1].error.reason == INVALID_ENTRY


def _u(user: str) -> dict[str, Any]:
    return update(user, **_refused_row(user))


def test_unidentifiable_invalid_rows_are_counted_not_guessed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = dest()
    req = requests_for(d, update("a"), update("b"))[0]
    with caplog.at_level("WARNING", logger="cdpflow"):
        outcomes = d.classify(req, response(200, {"num_received": 2, "num_invalid_entries": 1}))
    assert all(o.ok for o in outcomes)
    assert "1 not identifiable" in caplog.text
    assert sha256_hex("a") not in caplog.text


def test_received_count_mismatch_is_a_refusal_to_bisect() -> None:
    d = dest()
    req = requests_for(d, update("a"), update("b"))[0]
    with pytest.raises(Permanent) as err:
        d.classify(req, response(200, {"num_received": 1, "num_invalid_entries": 0}))
    assert err.value.reason == "RECEIVED_COUNT_MISMATCH"


def graph(code: int, subcode: int | None = None, **extra: Any) -> dict[str, Any]:
    error: dict[str, Any] = {"message": "m", "type": "OAuthException", "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    error.update(extra)
    return {"error": error}


BUC = {
    "X-Business-Use-Case-Usage": orjson.dumps(
        {
            "1": [
                {"type": "custom_audience", "call_count": 100, "estimated_time_to_regain_access": 3}
            ]
        }
    ).decode()
}


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind", "reason"),
    [
        (400, graph(80003, 2446079), BUC, Throttled, "GRAPH_80003_2446079"),
        (400, graph(17, 2446079), {}, Throttled, "GRAPH_17_2446079"),
        (400, graph(4), {}, Throttled, "GRAPH_4"),
        (400, graph(613, 1487742), {}, Throttled, "GRAPH_613_1487742"),
        (400, graph(341), {}, Throttled, "GRAPH_341"),
        (400, graph(368), {}, Throttled, "GRAPH_368"),
        (500, graph(1, 99), {}, Retryable, "GRAPH_1_99"),
        (503, graph(2), {}, Retryable, "GRAPH_2"),
        (400, graph(190, 460), {}, ConfigError, "GRAPH_190_460"),
        (403, graph(10), {}, ConfigError, "GRAPH_10"),
        (403, graph(200), {}, ConfigError, "GRAPH_200"),
        (403, graph(294), {}, ConfigError, "GRAPH_294"),
        (400, graph(2635), {}, ConfigError, "GRAPH_2635"),
        (400, graph(100), {}, Permanent, "GRAPH_100"),
        (400, graph(194), {}, Permanent, "GRAPH_194"),
        (400, graph(105), {}, RequestTooLarge, "GRAPH_105"),
        (400, graph(999, is_transient=True), {}, Retryable, "GRAPH_999"),
        (502, b"<html>bad gateway</html>", {}, Retryable, "HTTP_502"),
        (429, b"", {}, Throttled, "RATE_LIMITED"),
    ],
)
def test_graph_error_table(
    status: int, body: Any, headers: dict[str, str], kind: type[Exception], reason: str
) -> None:
    d = dest()
    req = requests_for(d, update("a"), update("b"))[0]
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    with pytest.raises(kind) as err:
        d.classify(req, HttpResponse(status, headers, raw))
    assert type(err.value) is kind
    assert err.value.reason == reason  # type: ignore[attr-defined]
    if headers:
        assert isinstance(err.value, Throttled) and err.value.retry_after_s == 180.0


@pytest.mark.parametrize("body", [graph(100, 33), graph(100, 1713230), graph(2650), graph(1487366)])
def test_audience_level_refusals_fail_every_row_without_bisecting(body: dict[str, Any]) -> None:
    d = dest()
    req = requests_for(d, update("a"), update("b"))[0]
    outcomes = d.classify(req, response(400, body))
    assert [o.error.reason if o.error else None for o in outcomes] == [AUDIENCE_UNAVAILABLE] * 2


def test_business_usage_header_parsing_and_cap() -> None:
    assert regain_access_s({}) is None
    assert regain_access_s({"x-business-use-case-usage": "not json"}) is None
    assert regain_access_s(BUC) == 180.0
    zero = {"X-Business-Use-Case-Usage": '{"1": [{"estimated_time_to_regain_access": 0}]}'}
    assert regain_access_s(zero) is None
    d = dest(max_throttle_wait_s=60)
    req = requests_for(d, update("a"))[0]
    with pytest.raises(Throttled) as err:
        d.classify(req, HttpResponse(400, BUC, orjson.dumps(graph(80003))))
    assert err.value.retry_after_s == 60


def test_full_sync_is_one_replace_session() -> None:
    d = dest(max_rows_per_request=2)
    members = [
        d.member_item(AUDIENCE, FullSyncMember(f"p{i}", member_identifiers("meta", f"m{i}")))
        for i in range(5)
    ]
    reqs = d.build_full_sync(AUDIENCE, members)
    bodies = [orjson.loads(r.body) for r in reqs]
    assert all(urlsplit(r.url).path.endswith(f"/{AUDIENCE}/usersreplace") for r in reqs)
    assert [b["session"]["batch_seq"] for b in bodies] == [1, 2, 3]
    assert [b["session"]["last_batch_flag"] for b in bodies] == [False, False, True]
    assert len({b["session"]["session_id"] for b in bodies}) == 1
    assert {b["session"]["estimated_num_total"] for b in bodies} == {5}
    # A refused replace batch is never bisected into plain adds.
    outcomes = d.classify(reqs[0], response(400, graph(100)))
    assert [o.ok for o in outcomes] == [False, False]
    assert d.build_full_sync(AUDIENCE, []) == []


# --------------------------------------------------------------------------- emulator


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any, **query: str
) -> tuple[int, Any, Any]:
    params = {"access_token": DEFAULT_TOKEN, **query}
    async with http.request(method, url, params=params, json=body) as resp:
        return resp.status, await resp.json(), resp.headers


def _payload(*rows: list[str], schema: list[str] | None = None) -> dict[str, Any]:
    return {"payload": {"schema": schema or ["EMAIL", "COUNTRY"], "data": list(rows)}}


async def test_emulator_membership_counters_and_pii() -> None:
    emu = MetaEmulator()
    e1, e2, gb = sha256_hex("a@example.com"), sha256_hex("b@example.com"), sha256_hex("gb")
    async with emu.serve() as url, aiohttp.ClientSession() as http:
        users = f"{url}/v25.0/{AUDIENCE}/users"
        status, body, _ = await _call(http, "POST", users, _payload([e1, gb], [e2, ""]))
        assert status == 200
        assert (body["num_received"], body["num_invalid_entries"]) == (2, 0)
        assert emu.members(AUDIENCE) == {(("COUNTRY", gb), ("EMAIL", e1)), (("EMAIL", e2),)}
        status, body, _ = await _call(http, "DELETE", users, _payload([e2, ""]))
        assert status == 200 and emu.members(AUDIENCE) == {(("COUNTRY", gb), ("EMAIL", e1))}
        # Raw PII and impossible values: counted invalid (named in samples), request still 200.
        raw = ["jane@example.com", gb]
        usa = [e2, sha256_hex("usa")]
        status, body, _ = await _call(http, "POST", users, _payload(raw, usa))
        assert status == 200 and body["num_invalid_entries"] == 2
        assert set(body["invalid_entry_samples"]) == {"jane@example.com", sha256_hex("usa")}
        assert [v["kind"] for v in emu.state.pii_violations] == ["not_hashed"]
        assert len(emu.members(AUDIENCE)) == 1


@pytest.mark.parametrize(
    ("body", "query", "code", "subcode"),
    [
        ({"payload": {"schema": ["EMAIL", "SSN"], "data": [["a", "b"]]}}, {}, 100, None),
        ({"payload": {"schema": ["EMAIL", "FN"], "data": [["a"]]}}, {}, 100, None),
        (
            {"payload": {"schema": ["EMAIL"], "data": [[f"{i:064x}"] for i in range(4)]}},
            {},
            100,
            None,
        ),
        (_payload([sha256_hex("a")]), {"access_token": "wrong"}, 190, None),
    ],
)
async def test_emulator_refuses_bad_requests(
    body: dict[str, Any], query: dict[str, str], code: int, subcode: int | None
) -> None:
    emu = MetaEmulator(max_rows=3)
    async with emu.serve() as url, aiohttp.ClientSession() as http:
        status, result, _ = await _call(
            http, "POST", f"{url}/v25.0/{AUDIENCE}/users", body, **query
        )
    assert status == 400 and result["error"]["code"] == code
    assert result["error"].get("error_subcode") == subcode


async def test_emulator_unknown_audience_proof_and_version() -> None:
    emu = MetaEmulator(audiences=[AUDIENCE], app_secret="s3", supported_versions=["v25.0"])
    row = _payload([sha256_hex("a@example.com"), ""])
    proof = appsecret_proof(DEFAULT_TOKEN, "s3")
    async with emu.serve() as url, aiohttp.ClientSession() as http:
        status, body, _ = await _call(
            http, "POST", f"{url}/v25.0/999/users", row, appsecret_proof=proof
        )
        assert (body["error"]["code"], body["error"]["error_subcode"]) == (100, 33)
        status, body, _ = await _call(http, "POST", f"{url}/v25.0/{AUDIENCE}/users", row)
        assert body["error"]["code"] == 100 and "appsecret_proof" in body["error"]["message"]
        status, body, _ = await _call(
            http, "POST", f"{url}/v19.0/{AUDIENCE}/users", row, appsecret_proof=proof
        )
        assert body["error"]["code"] == 2635
        status, body, _ = await _call(
            http, "POST", f"{url}/v25.0/{AUDIENCE}/users", row, appsecret_proof=proof
        )
        assert status == 200


async def test_emulator_replace_session_rules() -> None:
    emu = MetaEmulator()
    a, b, c = (sha256_hex(f"{x}@example.com") for x in "abc")
    async with emu.serve() as url, aiohttp.ClientSession() as http:
        users = f"{url}/v25.0/{AUDIENCE}/users"
        replace = f"{url}/v25.0/{AUDIENCE}/usersreplace"
        await _call(http, "POST", users, _payload([a, ""], [b, ""]))
        status, body, _ = await _call(http, "POST", replace, _payload([c, ""]))
        assert body["error"]["code"] == 100  # usersreplace needs a session
        s = {"session_id": 77, "batch_seq": 2, "last_batch_flag": False}
        status, body, _ = await _call(http, "POST", replace, {**_payload([c, ""]), "session": s})
        assert (body["error"]["code"], body["error"]["error_subcode"]) == (2650, 1870147)
        s = {"session_id": 78, "batch_seq": 1, "last_batch_flag": False}
        status, body, _ = await _call(http, "POST", replace, {**_payload([b, ""]), "session": s})
        assert status == 200 and body["session_id"] == "78"
        assert len(emu.members(AUDIENCE)) == 2  # nothing replaced before the last batch
        s = {"session_id": 78, "batch_seq": 2, "last_batch_flag": True}
        status, body, _ = await _call(http, "POST", replace, {**_payload([c, ""]), "session": s})
        assert emu.members(AUDIENCE) == {(("EMAIL", b),), (("EMAIL", c),)}
        s = {"session_id": 78, "batch_seq": 3, "last_batch_flag": True}
        status, body, _ = await _call(http, "POST", replace, {**_payload([a, ""]), "session": s})
        assert body["error"]["code"] == 100 and "ended" in body["error"]["message"]


async def test_emulator_throttle_is_graph_80003_with_usage_header() -> None:
    emu = MetaEmulator()
    emu.throttle_next(1, retry_after_s=120)
    async with emu.serve() as url, aiohttp.ClientSession() as http:
        status, body, headers = await _call(
            http, "POST", f"{url}/v25.0/{AUDIENCE}/users", _payload([sha256_hex("a"), ""])
        )
    assert status == 400 and body["error"]["code"] == 80003
    assert "Retry-After" not in headers
    assert regain_access_s(headers) == 120.0


async def test_destination_against_emulator_full_sync_replaces_membership() -> None:
    emu = MetaEmulator(max_rows=2)
    async with emu.serve() as url:
        d = dest(endpoint=url, access_token=DEFAULT_TOKEN, max_rows_per_request=2)
        old = [FullSyncMember(f"o{i}", member_identifiers("meta", f"old{i}")) for i in range(3)]
        new = [FullSyncMember(f"n{i}", member_identifiers("meta", f"new{i}")) for i in range(5)]
        engine = fast_engine("unused")
        first = await full_sync("meta", AUDIENCE, old, destination=d, engine=engine)
        assert first.ok and first.sent == 3 and len(emu.members(AUDIENCE)) == 3
        seen: list[int] = []
        result = await full_sync("meta", AUDIENCE, new, seen.append, destination=d, engine=engine)
        assert result.ok and (result.sent, result.requests) == (5, 3) and sum(seen) == 5
        rows = {tuple(sorted(d.row(m.identifiers).items())) for m in new}
        assert emu.members(AUDIENCE) == rows
        assert emu.state.pii_violations == []


# --------------------------------------------------------------------------- on the broker


async def test_sink_applies_adds_and_removes_in_order_and_dead_letters_bad_updates(
    settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    async with harness("meta", settings, serde, stack, partitions=1) as h:
        keep = [h.update(i) for i in range(4)]
        # Profile 9 joins, leaves, joins again: order within the batch must hold.
        flip = [h.update(9, action=a, version=v) for v, a in enumerate(["ADD", "REMOVE", "ADD"], 1)]
        # Profile 2 leaves.
        leave = h.update(2, action="REMOVE", version=2)
        unhashed = h.update(
            7, identifiers={**member_identifiers("meta", "x"), "EMAIL": "x@example.com"}
        )
        other = h.producer.send(
            audience_update("linkedin", "1", "p-x", {"SHA256_EMAIL": sha256_hex("x@example.com")})
        )
        h.producer.flush()
        async with h.run() as service:
            runner = service.runners["meta"]
            await wait_until(lambda: finished(runner) >= 10, 60, "10 updates finished")
        assert runner.stats.skipped == 1  # the LinkedIn update
        assert (runner.stats.delivered, runner.stats.dead_lettered) == (8, 1)
        dead = h.dlq.records({unhashed, other, *keep, *flip, leave}, expect=1)
        assert [(d["messageId"], d["reasonCode"]) for d in dead] == [
            (unhashed, "UNHASHED_IDENTIFIER")
        ]
        assert len(h.members()) == 4  # 0, 1, 3 and 9
        row9 = tuple(
            sorted(h.destination().row(member_identifiers("meta", f"member-{h.tag}-9")).items())
        )
        assert row9 in h.members()
