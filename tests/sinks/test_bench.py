"""The sinks' bench section: backlogs, the run of every destination, and its table.

The real-stack test runs :func:`sinks.bench.bench_destinations` on a tiny backlog
for every registered destination that has an emulator (event and ad-audience
ones alike) and checks what the bench would report: each delivered its whole
backlog, nothing was dead-lettered, the emulator saw no unhashed identifier, and
the table renders. Rates are printed, never asserted (shared 2-core machine).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import asdict
from typing import Any

import pytest

from sinks import registry
from sinks.audience_base import check_identifiers
from sinks.bench import (
    BENCH_AUDIENCES,
    REMOVE_SHARE,
    DeliveryRate,
    audience_plan,
    audience_updates,
    bench_destinations,
    bench_traits,
    burst_latencies,
    measure_backlog,
    produce_backlog,
    render_destinations_table,
)
from sinks.emulators import EMULATORS, start_all
from sinks.engine import emulator_env, load_destinations
from sinks.metrics import RunnerStats
from streams.audiences.identifiers import PLATFORMS, UnknownPlatformError
from streams.events import now_ms
from streams.serde import AvroSerde
from streams.settings import Settings
from streams.topics import TopicSpec, ensure_topics

# --------------------------------------------------------------------------- backlogs


def test_audience_plan_only_removes_current_members_and_mixes_both() -> None:
    plan = audience_plan(2000)
    members: set[int] = set()
    seen_add: set[int] = set()
    for profile, action in plan:
        if action == "ADD":
            assert profile not in seen_add, "a profile is added at most once"
            seen_add.add(profile)
            members.add(profile)
        else:
            assert profile in members, "a REMOVE takes out a current member"
            members.remove(profile)
    counts = Counter(action for _, action in plan)
    assert counts["ADD"] + counts["REMOVE"] == 2000
    # Roughly the configured share (the first update is always an ADD).
    assert 0.15 < counts["REMOVE"] / 2000 < 0.35
    assert REMOVE_SHARE == 0.25
    # Interleaved, not all ADDs first: a REMOVE comes before the last ADD.
    actions = [a for _, a in plan]
    assert actions.index("REMOVE") < len(actions) - 1 - actions[::-1].index("ADD")


@pytest.mark.parametrize("platform", PLATFORMS)
def test_audience_updates_pass_the_sinks_identifier_check(platform: str) -> None:
    """Every update the bench writes is sendable: hashed, known keys; REMOVEs repeat the ADD's."""
    updates = list(audience_updates(platform, "123", 400, received_at_ms=1_700_000_000_000))
    added: dict[str, dict[str, str]] = {}
    for u in updates:
        check_identifiers(platform, u["identifiers"])  # raises Permanent otherwise
        assert u["platform"] == platform and u["platformAudienceId"] == "123"
        assert u["triggerReceivedAt"] == 1_700_000_000_000
        if u["action"] == "ADD":
            assert u["membershipVersion"] == 1
            added[u["profileId"]] = u["identifiers"]
        else:
            assert u["membershipVersion"] == 2
            assert u["identifiers"] == added[u["profileId"]]
    assert len({u["updateId"] for u in updates}) == len(updates)
    assert {u["action"] for u in updates} == {"ADD", "REMOVE"}


def test_bench_traits_give_rich_identifiers_where_the_platform_takes_them() -> None:
    """Most Meta / Google rows carry more than an email (phone, name, address)."""
    meta = [u["identifiers"] for u in audience_updates("meta", "1", 200)]
    google = [u["identifiers"] for u in audience_updates("google_ads", "1", 200)]
    assert sum("PHONE" in ids for ids in meta) > len(meta) // 2
    assert sum("ZIP" in ids and "COUNTRY" in ids for ids in meta) > len(meta) // 2
    assert sum("addressInfo.postalCode" in ids for ids in google) > len(google) // 2
    assert all("EMAIL" in ids for ids in meta)
    traits = bench_traits(3)
    assert traits["email"].endswith("@gmail.com")


def test_audience_updates_refuse_an_unknown_platform() -> None:
    with pytest.raises(UnknownPlatformError):
        next(audience_updates("tiktok", "1", 1))


def test_every_audience_destination_has_a_bench_audience() -> None:
    audience = [n for n, cls in registry.load_all().items() if cls.source == "audience"]
    assert audience, "meta, google_ads and linkedin are registered"
    assert set(audience) <= set(BENCH_AUDIENCES)


def test_burst_latencies_take_the_wait_off_and_never_go_negative() -> None:
    stats = RunnerStats(latencies=deque([10.0, 10.5, 12.0, 9.0]))
    shifted = burst_latencies(stats, 10.0)
    assert sorted(shifted.latencies) == [0.0, 0.0, 0.5, 2.0]
    assert shifted.percentile(0.99) == 2.0
    assert burst_latencies(RunnerStats(), 3.0).percentile(0.5) is None


# --------------------------------------------------------------------------- table


def _row(name: str, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "destination": name,
        "source": "enriched",
        "produced": 1000,
        "events": 1000,
        "dead_lettered": 0,
        "skipped": 0,
        "complete": True,
        "seconds": 0.5,
        "events_per_s": 2000.0,
        "requests": 4,
        "retries": 0,
        "latency_p50_ms": 120.0,
        "latency_p99_ms": 480.5,
        "vendor_pii_violations": 0,
        "vendor_rejected_items": 0,
        "wall_s": 3.0,
        "note": None,
    }
    row.update(kw)
    return row


def test_table_shows_partial_runs_and_notes() -> None:
    results = {
        "budget_s": 120.0,
        "elapsed_s": 118.2,
        "setup_s": 20.1,
        "method": "m",
        "destinations": [
            _row("segment"),
            _row(
                "ga4",
                events=700,
                produced=2500,
                complete=False,
                note="cut at its time share (30 s): 700 of 2,500 finished",
            ),
            _row(
                "meta",
                source="audience",
                events=0,
                events_per_s=None,
                requests=0,
                latency_p50_ms=None,
                latency_p99_ms=None,
                note="failed: bad | token",
                vendor_pii_violations=2,
            ),
        ],
    }
    table = render_destinations_table(results)
    lines = table.splitlines()
    assert "budget 120 s, took 118 s, of which 20 s emulators and backlogs" in lines[0]
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    assert len(rows) == 4  # header + 3
    assert rows[1] == ("| segment | enriched | 1,000 | 1,000 | 2,000 | 4 | 0 | 120 | 480 |  |")
    assert "| ga4 | enriched | 2,500 | 700 |" in rows[2] and "cut at its time share" in rows[2]
    # A note cannot break the table; PII seen by the vendor is shown.
    assert rows[3].count("|") == rows[1].count("|")
    assert "failed: bad / token; 2 PII violations at the vendor" in rows[3]
    assert "| - | 0 | 0 | - | - |" in rows[3]


def test_table_of_a_failed_section() -> None:
    table = render_destinations_table({"budget_s": 60, "error": "RuntimeError: no emulator"})
    assert "Sinks: failed: RuntimeError: no emulator" in table


# --------------------------------------------------------------------------- real stack


def test_every_destination_delivers_its_backlog(settings: Settings) -> None:
    """Tiny backlogs through every registered destination with an emulator; nothing lost."""
    names = [n for n in registry.load_all() if n in EMULATORS]
    assert {"segment", "google_ads"} <= set(names)
    messages: list[str] = []
    results = bench_destinations(
        settings,
        events_per_destination=60,
        budget_s=600.0,  # generous: the run ends when every backlog is drained
        partitions=3,
        progress=messages.append,
    )
    print(render_destinations_table(results))
    assert "error" not in results, results.get("error")
    rows = {r["destination"]: r for r in results["destinations"]}
    assert set(rows) == set(registry.load_all())
    for name in names:
        r = rows[name]
        assert r["source"] == registry.get(name).source
        assert r["produced"] == 60, r
        assert r["complete"], r
        assert r["events"] == 60, r
        assert r["dead_lettered"] == 0, r
        assert r["skipped"] == 0, r
        assert r["vendor_pii_violations"] == 0, r
        assert r["vendor_rejected_items"] == 0, r
        assert r["requests"] >= 1 and r["events_per_s"] and r["events_per_s"] > 0, r
        assert r["latency_p50_ms"] is not None and r["latency_p99_ms"] >= r["latency_p50_ms"]
        assert r["note"] is None, r
    assert any(name in m for m in messages for name in names)
    assert results["note"].startswith(f"{len(names)} of {len(rows)} destinations measured")
    table = render_destinations_table(results)
    for name in names:
        assert f"| {name} | {rows[name]['source']} | 60 | 60 |" in table


async def test_a_run_that_cannot_finish_is_cut_and_says_so(settings: Settings, unique: str) -> None:
    """A vendor that is down for the whole share: reported as cut with what it finished (0)."""
    serde = AvroSerde.from_url(settings.schema_registry_url)
    topic = f"cdp.test.sinks.bench.{unique}"
    ensure_topics(settings, [TopicSpec(topic, 2, {})])
    stamp = now_ms()
    assert produce_backlog(settings, serde, topic, 40, received_at_ms=stamp) == 40
    with start_all(["segment"], mode="thread") as cluster:
        cluster.inject("segment", [{"kind": "outage", "duration_s": 600}])
        with pytest.MonkeyPatch.context() as mp:
            for key, value in emulator_env(cluster).items():
                mp.setenv(key, value)
            (config,) = load_destinations(["segment"])
        assert config.destination is not None
        rate = DeliveryRate("segment", "enriched", produced=40)
        await measure_backlog(config.destination, settings, serde, topic, rate, 10.0, stamp)
    assert not rate.complete
    assert rate.events == 0
    assert rate.note is not None and "time share" in rate.note, rate.note
    table = render_destinations_table(
        {"budget_s": 10, "elapsed_s": 10, "setup_s": 0, "destinations": [asdict(rate)]}
    )
    assert "| segment | enriched | 40 | 0 |" in table and "time share" in table
