"""The delivery engine on the real broker and registry, against the destination emulators.

Pure pieces (offset tracking, batching, breaker, token bucket, backoff, routing)
are tested directly; everything else runs :class:`sinks.engine.SinkService` on a
private topic with an emulator in the same loop.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from typing import Any

import aiohttp
import pytest
from confluent_kafka import Consumer, TopicPartition

from sinks.base import MappedEvent, Retryable, SinkLimits, Throttled, parse_retry_after
from sinks.batching import OffsetTracker, split_by_limits, take_batch
from sinks.breaker import BreakerState, CircuitBreaker
from sinks.engine import SinkEngineSettings, check_sink_env, load_destinations
from sinks.ratelimit import TokenBucket
from sinks.registry import load_all
from sinks.retry import RetryPolicy
from sinks.routing import (
    CONSENT_NOT_GRANTED,
    INTEGRATION_DISABLED,
    consent_granted,
    integration_enabled,
)
from streams.serde import AvroSerde
from streams.settings import Settings, UnknownSettingError
from tests.conftest import StackEndpoints

# The shared contract suite, parametrized over every registered destination, is
# collected here (once): see tests/sinks/contract.py.
from tests.sinks.contract import (  # noqa: F401
    finished,
    harness,
    segment_event,
    test_contract_no_secret_or_raw_email_in_dead_letters_or_logs,
    test_contract_oversize_event_and_split_by_bytes,
    test_contract_partial_failure_dead_letters_only_the_refused,
    test_contract_redelivery_is_harmless,
    test_contract_retry_after_is_honoured,
    test_contract_whole_request_refusal_is_bisected,
    wait_until,
)

# --------------------------------------------------------------------------- pure pieces


def test_offset_tracker_commits_only_contiguous_done_offsets() -> None:
    t = OffsetTracker()
    assert t.position() is None
    for offset in (10, 11, 12, 14):  # 13 is a gap (a transaction marker, say)
        t.add(offset)
    assert t.position() == 10
    t.done(12)
    t.done(14)
    assert t.position() == 10 and t.in_flight == 2
    t.done(10)
    assert t.position() == 11
    t.done(11)
    assert t.position() == 15 and t.in_flight == 0


def _item(size: int) -> MappedEvent:
    return MappedEvent("m", "k", {}, size)


def test_batches_are_cut_by_count_and_bytes() -> None:
    limits = SinkLimits(max_batch_events=3, max_batch_bytes=100, max_event_bytes=100)
    buf = deque(_item(10) for _ in range(7))
    assert len(take_batch(buf, limits)) == 3 and len(buf) == 4
    big = deque([_item(60), _item(60), _item(10)])
    assert [len(b) for b in split_by_limits(list(big), limits)] == [1, 2]
    # A single item over the byte limit still goes alone (the size check is per event).
    assert [len(b) for b in split_by_limits([_item(150), _item(1)], limits)] == [1, 1]


async def test_breaker_opens_probes_and_closes() -> None:
    changes: list[BreakerState] = []
    b = CircuitBreaker(
        failure_threshold=3, cooldown_s=0.2, max_cooldown_s=1, on_change=changes.append
    )
    for _ in range(3):
        assert await b.acquire() is False
        b.record_failure()
    assert b.state == BreakerState.OPEN
    started = time.monotonic()
    assert await b.acquire() is True  # the probe, after the cool-down
    assert time.monotonic() - started >= 0.15
    waiter = asyncio.create_task(b.acquire())  # everyone else waits for the verdict
    await asyncio.sleep(0.05)
    assert not waiter.done()
    b.record_failure()  # probe failed: open again, longer
    assert b.state == BreakerState.OPEN
    assert await waiter is True  # the next probe
    b.record_success()
    assert changes[-1] == BreakerState.CLOSED
    assert changes == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


async def test_token_bucket_rate() -> None:
    bucket = TokenBucket(20, burst=1)
    started = time.monotonic()
    for _ in range(11):
        await bucket.acquire()
    assert time.monotonic() - started >= 0.45


def test_backoff_honours_retry_after_and_grows() -> None:
    policy = RetryPolicy(base_s=1, throttle_base_s=2, max_backoff_s=8)
    assert policy.delay(1, Throttled("x", retry_after_s=5)) >= 5
    first = [policy.delay(1, Retryable("x")) for _ in range(50)]
    assert all(0.5 <= d <= 1 for d in first)
    assert all(4 <= policy.delay(10, Retryable("x")) <= 8 for _ in range(50))
    assert all(1 <= policy.delay(1, Throttled("x")) <= 2 for _ in range(50))
    assert parse_retry_after({"retry-after": "3"}) == 3
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0
    assert parse_retry_after({"Retry-After": "99999"}) == 300
    assert parse_retry_after({}) is None


def test_integrations_and_consent_rules() -> None:
    names = ("Mixpanel",)
    assert integration_enabled(None, names) and integration_enabled("{}", names)
    assert not integration_enabled('{"All": false}', names)
    assert integration_enabled('{"All": false, "Mixpanel": true}', names)
    assert integration_enabled('{"All": false, "Mixpanel": {"apiKey": "x"}}', names)
    assert not integration_enabled('{"Mixpanel": false}', names)
    assert not integration_enabled('{"mixpanel": false}', names)
    assert integration_enabled('{"Segment": false}', names)
    ctx = {"consent": {"categoryPreferences": {"Advertising": True, "Analytics": False}}}
    assert consent_granted(ctx, [])
    assert consent_granted(ctx, ["advertising"])
    assert not consent_granted(ctx, ["Advertising", "Analytics"])
    assert not consent_granted({}, ["Advertising"])


def test_unknown_sink_settings_are_rejected() -> None:
    classes = load_all()
    check_sink_env(classes, {"CDP_SINK_SEGMENT_WRITE_KEY": "k", "CDP_SINK_METRICS_PORT": "1"})
    with pytest.raises(UnknownSettingError, match="CDP_SINK_SEGMENT_WRITEKEY"):
        check_sink_env(classes, {"CDP_SINK_SEGMENT_WRITEKEY": "k"})
    with pytest.raises(UnknownSettingError, match="CDP_SINK_NOPE_ENDPOINT"):
        check_sink_env(classes, {"CDP_SINK_NOPE_ENDPOINT": "x"})
    with pytest.raises(UnknownSettingError, match="CDP_SINK_METRICS_PROT"):
        check_sink_env(classes, {"CDP_SINK_METRICS_PROT": "1"})


def test_unconfigured_destinations_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in __import__("os").environ if k.startswith("CDP_SINK_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("CDP_SINK_SEGMENT_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("CDP_SINK_SEGMENT_WRITE_KEY", "k")
    monkeypatch.setenv("CDP_SINK_MIXPANEL_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("CDP_SINK_MIXPANEL_PROJECT_TOKEN", "t")
    monkeypatch.setenv("CDP_SINK_MIXPANEL_ENABLED", "false")
    configs = {c.name: c for c in load_destinations()}
    assert configs["segment"].destination is not None
    assert configs["mixpanel"].problem == "disabled (CDP_SINK_MIXPANEL_ENABLED=false)"
    assert not configs["mixpanel"].invalid


# --------------------------------------------------------------------------- integration


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=15)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def end(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4().hex}"})
    try:
        return {
            p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1]
            for p in range(partitions)
        }
    finally:
        c.close()


async def test_routing_consent_and_garbage_are_committed_not_sent(
    settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    async with harness("segment", settings, serde, stack, partitions=2) as h:
        no_consent = segment_event(h.tag, 1)
        no_consent["context"].pop("consent")
        sent = {
            h.producer.send(segment_event(h.tag, 0)),
            h.producer.send(segment_event(h.tag, 3, integrations={"All": False, "Segment": True})),
        }
        skipped = {
            h.producer.send(no_consent),
            h.producer.send(segment_event(h.tag, 2, integrations={"All": False})),
            h.producer.send(segment_event(h.tag, 4, integrations={"Segment": False})),
        }
        h.producer.send_bytes(b"definitely not avro", "garbage")
        h.producer.flush()
        dest = h.destination(consent_categories=["Advertising"])
        async with h.run(dest) as service:
            runner = service.runners["segment"]
            await wait_until(lambda: finished(runner) >= 6, 30, "six records finished")
            group = runner.group
        assert runner.stats.delivered == 2 and runner.stats.skipped == 3
        assert runner.stats.dead_lettered == 1
        got = {a["item"]["messageId"] for a in h.emulator.state.accepted}
        assert got == sent and not (got & skipped)
        samples = service.metrics.registry
        for reason, n in ((CONSENT_NOT_GRANTED, 1), (INTEGRATION_DISABLED, 2)):
            value = samples.get_sample_value(
                "cdpflow_sink_events_total",
                {"destination": "segment", "outcome": "skipped", "reason": reason},
            )
            assert value == n, reason
        # Everything, skipped and dead-lettered included, is committed.
        assert committed(stack.bootstrap_servers, group, h.topic, 2) == end(
            stack.bootstrap_servers, h.topic, 2
        )


async def test_commit_never_passes_an_event_in_flight(
    settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    async with harness("segment", settings, serde, stack, partitions=1) as h:
        h.emulator.slow_next(1, delay_s=3.0)
        user = f"user-{h.tag}"
        first = h.producer.send(segment_event(h.tag, 0, user=user))
        h.producer.flush()
        async with h.run(max_batch_wait_s=0.05) as service:
            runner = service.runners["segment"]
            await wait_until(lambda: h.emulator.state.requests >= 1, 20, "the slow request")
            for i in range(1, 5):
                h.producer.send(segment_event(h.tag, i, user=user))
            h.producer.flush()
            await asyncio.sleep(1.5)  # several commit intervals while the first is in flight
            during = committed(stack.bootstrap_servers, runner.group, h.topic, 1)
            await wait_until(lambda: runner.stats.delivered >= 5, 30, "all five delivered")
            await asyncio.sleep(0.5)
            after = committed(stack.bootstrap_servers, runner.group, h.topic, 1)
        assert during[0] < 1, f"committed {during[0]} while offset 0 was in flight"
        assert after[0] == 5
        # Per-user order held: the later events waited for the slow first batch.
        order = [a["item"]["messageId"] for a in h.emulator.state.accepted]
        assert order[0] == first and order == sorted(order)


async def test_per_user_order_holds_through_retries(
    settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    async with harness("mixpanel", settings, serde, stack, partitions=3) as h:
        h.emulator.fail_next(6, status=503)
        users = [f"user-{h.tag}-{u}" for u in range(4)]
        per_user: dict[str, list[str]] = {u: [] for u in users}
        for i in range(120):
            user = users[i % 4]
            per_user[user].append(h.producer.send(segment_event(h.tag, i, user=user)))
        h.producer.flush()
        async with h.run(max_batch_wait_s=0.01) as service:
            runner = service.runners["mixpanel"]
            await wait_until(lambda: runner.stats.delivered >= 120, 60, "all delivered")
        assert runner.stats.retries >= 6 and runner.stats.dead_lettered == 0
        arrived: dict[str, list[str]] = {u: [] for u in users}
        for a in h.emulator.state.accepted:
            props = a["item"]["properties"]
            arrived[props["distinct_id"]].append(props["$insert_id"])
        for user in users:
            firsts = list(dict.fromkeys(arrived[user]))  # first arrival of each event
            assert firsts == per_user[user], f"{user}: out of order"


async def test_breaker_pauses_consumption_during_an_outage(
    settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    async with harness("segment", settings, serde, stack, partitions=2) as h:
        async with h.run(breaker_cooldown_s=1.0, breaker_max_cooldown_s=2.0) as service:
            runner = service.runners["segment"]
            await wait_until(lambda: bool(runner.assigned), 30, "assignment")
            h.emulator.outage(4.0)
            ids = [h.producer.send(segment_event(h.tag, i)) for i in range(50)]
            h.producer.flush()
            await wait_until(
                lambda: runner.breaker.state != BreakerState.CLOSED, 20, "the breaker to open"
            )
            await asyncio.sleep(0.5)
            assert all(lane.paused for lane in runner.lanes.values()), "consumer not paused"
            await wait_until(lambda: runner.stats.delivered >= 50, 60, "delivery after outage")
        assert runner.stats.dead_lettered == 0
        assert len({a["item"]["messageId"] for a in h.emulator.state.accepted}) == 50
        # Not burning retries: about one probe per cool-down while the outage lasted.
        failed = len(h.emulator.state.faults_applied)
        assert failed <= 5 + 2 * 6, f"{failed} requests against a dead endpoint"
        opened = service.metrics.registry.get_sample_value(
            "cdpflow_sink_breaker_opened_total", {"destination": "segment"}
        )
        assert opened is not None and opened >= 1
        assert h.dlq.records(set(ids), timeout=1.0) == []


async def test_rate_limit_and_metrics_endpoint(
    settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    async with harness("segment", settings, serde, stack, partitions=1) as h:
        dest = h.destination(max_requests_per_second=10, max_batch_events=1)
        ids = [h.producer.send(segment_event(h.tag, i, user=f"u-{h.tag}")) for i in range(16)]
        h.producer.flush()
        async with h.run(dest, metrics_port=0) as service:
            runner = service.runners["segment"]
            await wait_until(lambda: runner.stats.delivered >= 1, 30, "first delivery")
            started = time.monotonic()
            await wait_until(lambda: runner.stats.delivered >= 16, 30, "all delivered")
            elapsed = time.monotonic() - started
            assert service.metrics_url is not None
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{service.metrics_url}/metrics") as resp:
                    text = await resp.text()
                async with session.get(f"{service.metrics_url}/health") as resp:
                    health: dict[str, Any] = await resp.json()
        assert elapsed >= 1.2, f"15 requests at 10/s took only {elapsed:.2f}s"
        for name in (
            'cdpflow_sink_events_total{destination="segment",outcome="delivered",reason=""} 16.0',
            'cdpflow_sink_requests_total{destination="segment",status="200"} 16.0',
            "cdpflow_sink_request_seconds_bucket",
            "cdpflow_sink_end_to_end_seconds_bucket",
            'cdpflow_sink_breaker_state{destination="segment"} 0.0',
        ):
            assert name in text, name
        seg = health["destinations"]["segment"]
        assert seg["state"] == "running" and seg["delivered"] == 16 and seg["assigned"] == [0]
        assert seg["latencyP50S"] is not None
        assert len(ids) == 16


async def test_scale_out_splits_partitions_without_losing_events(
    settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    async with harness("segment", settings, serde, stack, partitions=4) as h:
        engine: dict[str, Any] = {"group_prefix": f"cdpflow-test-scale-{h.tag}-"}
        ids = [h.producer.send(segment_event(h.tag, i)) for i in range(200)]
        h.producer.flush()
        async with h.run(**engine) as first:
            a = first.runners["segment"]
            await wait_until(lambda: a.stats.delivered >= 50, 30, "first sink delivering")
            async with h.run(**engine) as second:
                b = second.runners["segment"]
                more = [h.producer.send(segment_event(h.tag, 200 + i)) for i in range(200)]
                h.producer.flush()
                await wait_until(
                    lambda: bool(b.assigned) and bool(a.assigned), 60, "partitions to be shared"
                )
                assert set(a.assigned).isdisjoint(b.assigned)
                await wait_until(
                    lambda: len({x["item"]["messageId"] for x in h.emulator.state.accepted}) >= 400,
                    60,
                    "all 400 delivered",
                )
        got = {x["item"]["messageId"] for x in h.emulator.state.accepted}
        assert got == set(ids) | set(more)
        assert a.stats.dead_lettered == b.stats.dead_lettered == 0


def test_engine_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_SINK_GROUP_PREFIX", "team-a-sink-")
    monkeypatch.setenv("CDP_SINK_RETRY_MAX_ELAPSED_S", "0")
    engine = SinkEngineSettings()
    assert engine.group_prefix == "team-a-sink-"
    assert engine.retry_policy().exhausted(0, 10**9) is False
