"""End to end on the real stack: HTTP collector -> worker -> sinks -> destination emulators.

Every piece is a real process (collector, Faust worker, ``sink run --all``, the
emulators), wired only through Kafka, the registry and HTTP. Events are sent the
way a website would (``/v1/batch`` with a write key); each destination must end
up with exactly the events its routing, consent and mapping say it should get,
mapped the way its module documents. Other tests and suites share the broker, so
everything here is tagged and the new consumer groups start at the topics' ends.
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from sinks.emulators import EmulatorCluster, start_all
from sinks.engine import emulator_env, load_destinations
from sinks.mixpanel import insert_id_for
from sinks.routing import skip_reason
from streams import topics
from streams.settings import Settings
from streams.topics import ensure_topics
from streams.worker import worker_topic_specs
from tests.conftest import StackEndpoints
from tests.kafka_helpers import (
    TopicReader,
    WorkerProcess,
    end_offsets,
    start_group_at_end,
    worker_env,
)
from tests.sinks.contract import (
    ALL_CONSENT,
    Process,
    SinkProcess,
    free_port,
    start_groups_at_end,
    wait_until,
)

WRITE_KEY = "e2e-write-key"
DESTINATIONS = ["aep", "ga4", "mixpanel", "segment"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmulatorCluster]:
    with start_all(mode="process") as c:
        yield c


@pytest.fixture(scope="module")
def pipeline(
    stack: StackEndpoints, cluster: EmulatorCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Worker, collector and sinks as processes, each consumer group starting at the end."""
    tmp = tmp_path_factory.mktemp("e2e")
    run = uuid.uuid4().hex[:8]
    group = f"cdpflow-e2e-{run}"
    base = Settings(kafka_bootstrap_servers=stack.bootstrap_servers)
    ensure_topics(base, worker_topic_specs(Settings(cdp_worker_id=group)))
    start_group_at_end(
        stack.bootstrap_servers, group, [topics.EVENTS_RAW, topics.RECOMMENDATIONS_UPDATES]
    )
    worker = WorkerProcess(
        worker_env(stack.bootstrap_servers, stack.registry_url, group, tmp / "data"),
        tmp / "worker.log",
    ).start()
    port = free_port()
    collector = Process(
        ["-m", "streams.cli", "collector"],
        {
            "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers,
            "SCHEMA_REGISTRY_URL": stack.registry_url,
            "CDP_WRITE_KEYS": WRITE_KEY,
            "CDP_COLLECTOR_PORT": str(port),
        },
        tmp / "collector.log",
    )
    prefix = f"cdpflow-e2e-sink-{run}-"
    sink_env = {
        "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers,
        "SCHEMA_REGISTRY_URL": stack.registry_url,
        "CDP_SINK_GROUP_PREFIX": prefix,
        "CDP_SINK_SESSION_TIMEOUT_S": "6",
        **emulator_env(cluster),
    }
    start_groups_at_end(
        stack.bootstrap_servers, [prefix + n for n in DESTINATIONS], topics.EVENTS_ENRICHED
    )
    sinks = SinkProcess(sink_env, tmp / "sinks.log")
    try:
        worker.wait_ready()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert collector.alive(), collector.tail()
            assert time.monotonic() < deadline, "collector not ready"
            time.sleep(0.3)
        asyncio.run(sinks.wait_assigned(DESTINATIONS))
        yield {"url": url, "sinks": sinks, "sink_env": sink_env, "worker": worker}
    finally:
        sinks.stop()
        collector.stop()
        worker.stop()


def journey(tag: str, i: int) -> list[dict[str, Any]]:
    """A shopper's visit: anonymous browsing, sign-in, an order, then the rest of the spec."""
    anon, user = f"anon-{tag}-{i}", f"user-{tag}-{i}"
    consent = ALL_CONSENT
    if i % 5 == 0:  # said no to advertising
        consent = {
            "categoryPreferences": {**ALL_CONSENT["categoryPreferences"], "Advertising": False}
        }
    ctx = {
        "ip": "203.0.113.9",
        "locale": "de-DE",
        "userAgent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
        "page": {"url": f"https://shop.example/p/1?utm_source=mail&utm_campaign=e2e&t={tag}"},
        "consent": consent,
    }
    integrations = {"Mixpanel": False} if i % 6 == 1 else {}
    mid = iter(range(100))

    def m(**fields: Any) -> dict[str, Any]:
        return {"messageId": f"{tag}-{i:03d}-{next(mid)}", "context": ctx, **fields}

    return [
        m(type="page", anonymousId=anon, name="Product", properties={"sku": "sku-1"}),
        m(
            type="track",
            anonymousId=anon,
            event="Product Viewed",
            properties={"product_id": "sku-1", "price": 19.99, "currency": "EUR"},
        ),
        m(
            type="identify",
            anonymousId=anon,
            userId=user,
            traits={"email": f"{user}@example.com", "firstName": "Ann", "plan": "gold"},
        ),
        m(
            type="track",
            anonymousId=anon,
            userId=user,
            event="Order Completed",
            integrations=integrations,
            properties={
                "order_id": f"o-{tag}-{i}",
                "revenue": 19.99,
                "currency": "EUR",
                "products": [{"product_id": "sku-1", "price": 19.99, "quantity": 1}],
            },
        ),
        m(type="track", anonymousId=anon, event="Product Viewed", properties={"sku": "sku-2"}),
        m(type="screen", userId=user, name="Order Confirmation"),
        m(type="group", userId=user, groupId=f"org-{tag}", traits={"name": "Acme"}),
        m(type="alias", userId=user, previousId=f"legacy-{tag}-{i}"),
    ]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _state(cluster: EmulatorCluster, name: str) -> dict[str, Any]:
    return cluster.state(name)


def _leaves(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, str):
        yield value


def identifying_values(items_by_user: dict[str, list[Any]]) -> set[str]:
    """String values that occur in one shopper's mapped items only (ids, hashed ids...).

    Not every vendor item carries our tag (GA4's client_id is a hash of the
    anonymousId), so an emulator item counts as ours when it holds the tag or one
    of these values. The broker is shared: other tests' events may pass through
    our worker and sinks too.
    """
    owners: dict[str, set[str]] = {}
    for user, items in items_by_user.items():
        for item in items:
            for leaf in _leaves(item):
                owners.setdefault(leaf, set()).add(user)
    return {leaf for leaf, users in owners.items() if len(users) == 1 and len(leaf) >= 8}


def _ours(
    items: list[dict[str, Any]], tag: str, values: frozenset[str] | set[str] = frozenset()
) -> list[Any]:
    return [
        a
        for a in items
        if tag in orjson.dumps(a.get("item")).decode()
        or any(leaf in values for leaf in _leaves(a.get("item")))
    ]


def _tagged(items: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    return _ours(items, tag)


async def test_events_flow_from_the_collector_to_every_destination(
    stack: StackEndpoints, cluster: EmulatorCluster, pipeline: dict[str, Any]
) -> None:
    tag = uuid.uuid4().hex[:8]
    users = 30
    enriched_reader = TopicReader(
        stack.bootstrap_servers,
        stack.registry_url,
        topics.EVENTS_ENRICHED,
        end_offsets(stack.bootstrap_servers, topics.EVENTS_ENRICHED),
    )
    sent: dict[str, dict[str, Any]] = {}
    auth = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
    async with httpx.AsyncClient(base_url=pipeline["url"], headers=auth, timeout=30) as client:
        for i in range(users):  # paced like live traffic, so latency is not a backlog's
            batch = journey(tag, i)
            sent.update({m["messageId"]: m for m in batch})
            resp = await client.post("/v1/batch", json={"batch": batch})
            assert resp.status_code == 200, resp.text
            assert resp.json()["accepted"] == len(batch)
            await asyncio.sleep(0.05)
    sent_at = time.time()

    # What the worker produced: the input each destination's expectations derive from.
    def all_enriched(values: list[dict[str, Any]]) -> bool:
        return set(sent) <= {v["event"]["messageId"] for v in values}

    values = await asyncio.to_thread(enriched_reader.poll_until, all_enriched, 120)
    enriched_reader.close()
    enriched = {v["event"]["messageId"]: v for v in values if v["event"]["messageId"] in sent}
    assert set(enriched) == set(sent)

    # The destinations as the sink process configured them, to derive expectations.
    with pytest.MonkeyPatch.context() as mp:
        for key, value in pipeline["sink_env"].items():
            mp.setenv(key, value)
        dests = {c.name: c.destination for c in load_destinations(DESTINATIONS)}
    expected: dict[str, set[str]] = {}
    fingerprints: dict[str, set[str]] = {}
    for name, dest in dests.items():
        assert dest is not None, name
        ids = set()
        by_user: dict[str, list[Any]] = {}
        for mid, record in enriched.items():
            if skip_reason(record, dest.integration_names, dest.settings.consent_categories):
                continue
            mapped = dest.map(record)
            if mapped is not None:
                ids.add(mid)
                by_user.setdefault(mid.split("-")[1], []).append(mapped.item)
        expected[name] = ids
        fingerprints[name] = identifying_values(by_user)
    assert len(expected["segment"]) == len(sent)  # Segment takes every call type
    assert len(expected["mixpanel"]) < len(sent)  # no alias/group, and some opted out

    def delivered(name: str) -> int:
        state = _state(cluster, name)
        return len(_ours(state["accepted"], tag, fingerprints[name]))

    try:
        await wait_until(
            lambda: all(delivered(n) >= len(expected[n]) for n in DESTINATIONS),
            90,
            "every destination to receive its events",
        )
    except AssertionError:
        counts = {n: (delivered(n), len(expected[n])) for n in DESTINATIONS}
        raise AssertionError(
            f"(received, expected) per destination: {counts}\n{pipeline['sinks'].tail()}"
        ) from None
    await asyncio.sleep(1.0)  # nothing more may arrive (no duplicates without faults)
    states = {n: _state(cluster, n) for n in DESTINATIONS}
    for name in DESTINATIONS:
        ours = _ours(states[name]["accepted"], tag, fingerprints[name])
        assert len(ours) == len(expected[name]), f"{name}: {len(ours)} != {len(expected[name])}"
        dropped = _ours(states[name]["dropped"], tag, fingerprints[name])
        assert dropped == [], f"{name} silently dropped events: {dropped[:2]}"
        assert states[name]["piiViolations"] == [], f"{name}: PII where it must not be"
        assert states[name]["rejectedItemCount"] == 0 and states[name]["rejectedRequestCount"] == 0

    # Segment: the original messages, as sent.
    seg = {a["item"]["messageId"]: a for a in _tagged(states["segment"]["accepted"], tag)}
    assert set(seg) == set(sent)
    for mid, msg in sent.items():
        item = seg[mid]["item"]
        for key in ("type", "userId", "anonymousId", "event", "name", "groupId", "previousId"):
            assert item.get(key) == msg.get(key), (mid, key)
        assert orjson.dumps(item.get("properties", {})) == orjson.dumps(msg.get("properties", {}))
        assert item["context"]["page"] == msg["context"]["page"]

    # Mixpanel: event names, ids per Simplified ID Merge, stitched anonymous events.
    mixpanel = {
        a["item"]["properties"]["$insert_id"]: a
        for a in _tagged(states["mixpanel"]["accepted"], tag)
    }
    assert set(mixpanel) == {insert_id_for(mid) for mid in expected["mixpanel"]}
    for mid in expected["mixpanel"]:
        msg, props = sent[mid], mixpanel[insert_id_for(mid)]["item"]["properties"]
        name = mixpanel[insert_id_for(mid)]["item"]["event"]
        want = {"page": "Loaded a Page", "screen": "Loaded a Screen", "identify": "$identify"}
        assert name == want.get(msg["type"], msg.get("event"))
        if msg.get("userId"):
            assert props["distinct_id"] == msg["userId"]
        elif enriched[mid]["stitched"]:  # after identify: the worker knows the user
            assert props["$user_id"] == enriched[mid]["profileId"]
        else:
            assert props["distinct_id"] == f"$device:{msg['anonymousId']}"
        assert props["$browser"] == "Chrome" and props["utm_campaign"] == "e2e"
    # Opted out of Mixpanel by the integrations object:
    assert not any(
        sent[m]["type"] == "track"
        and m.split("-")[1] in {f"{i:03d}" for i in range(1, users, 6)}
        and sent[m].get("event") == "Order Completed"
        for m in expected["mixpanel"]
    )

    # Latency: from the collector receiving each event to the vendor accepting it.
    report = {}
    for name, by_id in (("segment", seg), ("mixpanel", mixpanel)):
        lat = []
        for mid, record in enriched.items():
            key = mid if name == "segment" else insert_id_for(mid)
            if key in by_id:
                received = record["event"]["receivedAt"].timestamp()
                lat.append(by_id[key]["at"] - received)
        report[name] = (statistics.median(lat), _percentile(lat, 0.99))
    health = pipeline["sinks"].health()
    assert health is not None
    for name in DESTINATIONS:
        h = health["destinations"][name]
        assert h["state"] == "running" and h["deadLettered"] == 0, (name, h)
    print(
        "\nend-to-end latency (collector receivedAt -> emulator accepted), seconds: "
        + ", ".join(f"{n} p50={p50:.3f} p99={p99:.3f}" for n, (p50, p99) in report.items())
        + "; sink-measured p50/p99: "
        + ", ".join(
            f"{n} {health['destinations'][n]['latencyP50S']:.3f}/"
            f"{health['destinations'][n]['latencyP99S']:.3f}"
            for n in DESTINATIONS
        )
        + f"; all delivered {time.time() - sent_at:.1f}s after the last send"
    )
    assert report["segment"][0] < 5.0, "median end-to-end latency above 5 s on an idle stack"
