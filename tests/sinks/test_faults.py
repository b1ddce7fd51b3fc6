"""Faults, with the sinks as a real process (``sink run --all``) and the four emulators.

Each test ends with the promise a CDP makes: every event delivered exactly once
per dedupe key (a re-sent copy only ever under the same key), nothing in a DLQ
that the destination would have accepted, and the other destinations unaffected.
Events are produced straight to a private topic (the engine reads it through
``CDP_SINK_SOURCE_TOPIC``), so nothing else on the shared broker interferes.

``CDP_TEST_OUTAGE_S`` sets the outage length (default 60 s, as the issue asks).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from sinks.emulators import EmulatorCluster, start_all
from sinks.engine import emulator_env
from streams.serde import AvroSerde
from streams.settings import Settings
from tests.conftest import StackEndpoints
from tests.kafka_helpers import REPO
from tests.sinks.contract import (
    DlqTail,
    EnrichedProducer,
    SinkProcess,
    private_topic,
    segment_event,
    wait_until,
)

NAMES = ["aep", "ga4", "mixpanel", "segment"]
OUTAGE_S = float(os.environ.get("CDP_TEST_OUTAGE_S", "60"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmulatorCluster]:
    with start_all(mode="process") as c:
        yield c


@pytest.fixture
def emulators(cluster: EmulatorCluster) -> EmulatorCluster:
    cluster.reset()
    return cluster


def sink_env(stack: StackEndpoints, cluster: EmulatorCluster, topic: str) -> dict[str, str]:
    run = uuid.uuid4().hex[:8]
    return {
        "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers,
        "SCHEMA_REGISTRY_URL": stack.registry_url,
        "CDP_SINK_SOURCE_TOPIC": topic,
        "CDP_SINK_GROUP_PREFIX": f"cdpflow-faults-{run}-",
        "CDP_SINK_INSTANCE_ID": f"faults-{run}",
        "CDP_SINK_SESSION_TIMEOUT_S": "6",
        "CDP_SINK_COMMIT_INTERVAL_S": "0.5",
        "CDP_SINK_BREAKER_COOLDOWN_S": "1",
        "CDP_SINK_BREAKER_MAX_COOLDOWN_S": "4",
        "CDP_SINK_RETRY_BASE_S": "0.1",
        "CDP_SINK_RETRY_THROTTLE_BASE_S": "0.3",
        "CDP_SINK_RETRY_MAX_BACKOFF_S": "2",
        **emulator_env(cluster),
    }


def produce(settings: Settings, serde: AvroSerde, topic: str, tag: str, n: int) -> list[str]:
    producer = EnrichedProducer(settings, serde, topic)
    try:
        return [producer.send(segment_event(tag, i)) for i in range(n)]
    finally:
        producer.close()


def keys(state: dict[str, Any]) -> list[str]:
    """Dedupe key per accepted item (the item itself when the vendor has no key: GA4)."""
    return [
        a["key"]
        if a["key"] is not None
        else orjson.dumps(a["item"], option=orjson.OPT_SORT_KEYS).decode()
        for a in state["accepted"]
    ]


def unique_delivered(cluster: EmulatorCluster, name: str) -> int:
    """Distinct dedupe keys so far (cheap: counts only; keyless items count each copy)."""
    return int(cluster.state(name, items=False)["uniqueCount"])


async def wait_delivered(
    cluster: EmulatorCluster,
    names: list[str],
    n: int,
    sinks: SinkProcess,
    timeout: float,
    what: str,
) -> None:
    def done() -> bool:
        if not sinks.alive():
            raise AssertionError(f"sink process exited:\n{sinks.tail()}")
        return all(unique_delivered(cluster, name) >= n for name in names)

    await wait_until(done, timeout, what, interval=0.5)


def assert_exactly_once_per_key(cluster: EmulatorCluster, name: str, n: int) -> dict[str, Any]:
    state = cluster.state(name)
    got = keys(state)
    assert len(set(got)) == n, f"{name}: {len(set(got))} distinct keys for {n} events"
    assert len(got) >= n
    assert state["rejectedItemCount"] == 0, f"{name}: {state['rejectedItems'][:3]}"
    assert state["piiViolations"] == [], f"{name}: {state['piiViolations'][:3]}"
    return state


@pytest.fixture
def dlqs(stack: StackEndpoints, settings: Settings) -> Iterator[dict[str, DlqTail]]:
    tails = {n: DlqTail(stack, settings, n) for n in NAMES}
    yield tails
    for tail in tails.values():
        tail.close()


async def test_429_and_5xx_storm(
    stack: StackEndpoints,
    settings: Settings,
    serde: AvroSerde,
    emulators: EmulatorCluster,
    dlqs: dict[str, DlqTail],
    tmp_path: Path,
) -> None:
    topic = private_topic(settings, partitions=6)
    tag = uuid.uuid4().hex[:8]
    n = 3000
    # Every destination fails its first requests in its own way. The counts are what a
    # short storm looks like once the breaker opens: a probe per cool-down, not a flood.
    emulators.inject("segment", [{"kind": "throttle", "count": 12, "retry_after_s": 1}])
    emulators.inject(
        "mixpanel",
        [
            {"kind": "status", "status": 429, "count": 10},
            {"kind": "status", "status": 503, "count": 7},
        ],
    )
    emulators.inject("aep", [{"kind": "status", "status": 500, "count": 7}])
    emulators.inject(
        "ga4", [{"kind": "status", "status": 502, "count": 4}, {"kind": "drop", "count": 3}]
    )
    ids = produce(settings, serde, topic, tag, n)
    sinks = SinkProcess(sink_env(stack, emulators, topic), tmp_path / "sinks.log")
    try:
        await wait_delivered(emulators, NAMES, n, sinks, 120, "every event through the storm")
        health = sinks.health()
    finally:
        sinks.stop()
    for name in NAMES:
        state = assert_exactly_once_per_key(emulators, name, n)
        assert state["faultsApplied"], f"{name}: the storm never hit"
        assert dlqs[name].records(set(ids), timeout=1.0) == [], f"{name}: dead-lettered in a storm"
    assert health is not None
    assert all(health["destinations"][x]["retries"] > 0 for x in NAMES)


async def test_one_destination_down_does_not_hold_back_the_others(
    stack: StackEndpoints,
    settings: Settings,
    serde: AvroSerde,
    emulators: EmulatorCluster,
    dlqs: dict[str, DlqTail],
    tmp_path: Path,
) -> None:
    topic = private_topic(settings, partitions=6)
    tag = uuid.uuid4().hex[:8]
    n = 1500
    sinks = SinkProcess(sink_env(stack, emulators, topic), tmp_path / "sinks.log")
    try:
        await sinks.wait_assigned(NAMES)
        emulators.inject("mixpanel", [{"kind": "outage", "duration_s": OUTAGE_S, "status": 503}])
        down_since = time.monotonic()
        ids = produce(settings, serde, topic, tag, n)
        others = [x for x in NAMES if x != "mixpanel"]
        await wait_delivered(
            emulators,
            others,
            n,
            sinks,
            min(30.0, OUTAGE_S * 0.75),
            "the healthy destinations to deliver everything while Mixpanel is down",
        )
        healthy_after = time.monotonic() - down_since
        assert healthy_after < OUTAGE_S, "the others waited for the outage"
        mid = sinks.health()
        assert mid is not None
        assert mid["destinations"]["mixpanel"]["breaker"] in ("open", "half_open")
        assert mid["destinations"]["mixpanel"]["delivered"] == 0
        await wait_delivered(
            emulators, ["mixpanel"], n, sinks, OUTAGE_S + 60, "Mixpanel to catch up"
        )
        recovered_after = time.monotonic() - down_since
        metrics = sinks.metrics()
    finally:
        sinks.stop()
    assert recovered_after >= OUTAGE_S * 0.9
    for name in NAMES:
        assert_exactly_once_per_key(emulators, name, n)
        assert dlqs[name].records(set(ids), timeout=1.0) == [], f"{name}: dead-lettered"
    failed = len(emulators.state("mixpanel", items=False)["faultsApplied"])
    # The breaker paused consumption: a few probes per cool-down, not a retry storm.
    assert failed < 5 + OUTAGE_S, f"{failed} requests against a dead endpoint"
    assert 'cdpflow_sink_breaker_opened_total{destination="mixpanel"}' in metrics


async def test_sigkill_mid_delivery_loses_nothing_and_duplicates_only_by_key(
    stack: StackEndpoints,
    settings: Settings,
    serde: AvroSerde,
    emulators: EmulatorCluster,
    dlqs: dict[str, DlqTail],
    tmp_path: Path,
) -> None:
    topic = private_topic(settings, partitions=6)
    tag = uuid.uuid4().hex[:8]
    n = 8000
    ids = produce(settings, serde, topic, tag, n)
    # Slow answers keep requests in flight when the process dies; some are "processed
    # but never acknowledged" (the vendor took the data, we never heard): duplicates.
    for name in NAMES:
        emulators.inject(
            name,
            [
                {"kind": "delay", "count": 40, "delay_s": 0.3},
                {"kind": "drop", "count": 2, "process": True},
            ],
        )
    env = sink_env(stack, emulators, topic)
    first = SinkProcess(env, tmp_path / "sinks-1.log")
    try:
        await wait_delivered(emulators, ["segment"], n // 4, first, 60, "a quarter delivered")
    finally:
        first.kill()
    at_kill = {name: unique_delivered(emulators, name) for name in NAMES}
    assert at_kill["segment"] < n, "everything was delivered before the kill: no test"
    second = SinkProcess(env, tmp_path / "sinks-2.log")
    try:
        await wait_delivered(emulators, NAMES, n, second, 120, "all events after the restart")
    finally:
        second.stop()
    for name in NAMES:
        state = assert_exactly_once_per_key(emulators, name, n)
        if name == "segment":
            # Segment dedupes on messageId: re-sent copies were dropped as duplicates.
            dup = [d for d in state["dropped"] if d["reason"] == "duplicate_message_id"]
            assert all(d["key"] in set(ids) for d in dup)
        assert dlqs[name].records(set(ids), timeout=1.0) == [], f"{name}: dead-lettered"


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sinks.cli", *args],
        env={**os.environ, **env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


async def test_rejections_are_dead_lettered_readably_and_replayed_after_the_fix(
    stack: StackEndpoints,
    settings: Settings,
    serde: AvroSerde,
    emulators: EmulatorCluster,
    dlqs: dict[str, DlqTail],
    tmp_path: Path,
) -> None:
    topic = private_topic(settings, partitions=2)
    tag = uuid.uuid4().hex[:8]
    n = 12
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 2))
    # Segment refuses everything for now (a misconfigured source, say): every event ends
    # up alone in a refused request and is dead-lettered with the vendor's own words.
    refusal = {"code": "invalid_request", "message": "source is disabled"}
    emulators.inject(
        "segment", [{"kind": "status", "status": 400, "count": 10_000, "body": refusal}]
    )
    producer = EnrichedProducer(settings, serde, topic)
    ids = [producer.send(segment_event(tag, i)) for i in range(n)]
    big = segment_event(tag, 99)
    big["properties"]["blob"] = "x" * 40_000  # over Segment's 32 KB: never deliverable
    big_id = producer.send(big)
    producer.close()
    env = sink_env(stack, emulators, topic)
    sinks = SinkProcess(env, tmp_path / "sinks.log", names=["segment", "mixpanel"])
    try:
        dead = await asyncio.to_thread(
            dlqs["segment"].records, {*ids, big_id}, expect=n + 1, timeout=60
        )
        await wait_delivered(emulators, ["mixpanel"], n + 1, sinks, 30, "mixpanel")
    finally:
        sinks.stop()
    by_id = {d["messageId"]: d for d in dead}
    assert set(by_id) == {*ids, big_id}
    assert by_id[big_id]["reasonCode"] == "EVENT_TOO_LARGE"
    for mid in ids:
        d = by_id[mid]
        assert (d["reasonCode"], d["responseStatus"]) == ("HTTP_400", 400)
        assert "source is disabled" in d["message"]
        assert d["request"]["headers"]["Authorization"] == "<redacted>"
        assert d["sourceTopic"] == topic and d["originalBytes"]
    assert unique_delivered(emulators, "segment") == 0

    shown = cli(env, "dlq", "show", "segment", "--since", since)
    assert shown.returncode == 0, shown.stderr
    assert "HTTP_400" in shown.stdout and "EVENT_TOO_LARGE" in shown.stdout
    assert ids[0] in shown.stdout and "source is disabled" in shown.stdout

    emulators.clear_faults("segment")  # the cause is fixed
    replayed = cli(env, "dlq", "replay", "segment", "--since", since)
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr  # the big one still fails
    out = replayed.stdout
    assert f"delivered={n} still_failing=1 skipped=0 read={n + 1}" in out, out
    assert "EVENT_TOO_LARGE x1" in out, out
    state = assert_exactly_once_per_key(emulators, "segment", n)
    assert {a["item"]["messageId"] for a in state["accepted"]} == set(ids)
    again = dlqs["segment"].records({big_id}, expect=2, timeout=20)
    assert len(again) == 2 and again[1]["replayOf"] is not None
