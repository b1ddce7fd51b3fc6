"""Smoke test of the benchmark's pieces on a few hundred events (no timing assertions).

The bare loop (scenario b) must produce exactly what cdpflow's worker would:
one EnrichedEvent per valid input (read back with Confluent's own deserializer),
identities stitched, traits merged, recommendations joined, user agents parsed,
and dead letters with reason codes. The bench's restatements of Faust-module
functions must agree with the originals, and the report must render.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from bench import report, work
from bench.bare_loop import BareLoop, LoopTopics
from bench.corpus import Corpus, build_corpus, produce_all, release
from bench.measure import peek_message_id, percentile
from streams import schemas
from streams.events import EventRejected, from_segment, identity_key, now_ms
from streams.identity.agents import resolve_profile as faust_resolve_profile
from streams.identity.agents import resolve_record
from streams.ingest.agents import identity_routing_key, routing_headers
from streams.pipeline import PIPELINE_VERSION
from streams.profiles.enrich import parse_user_agent
from streams.recommendations.agents import check_recommendation
from streams.serde import AvroSerde
from streams.settings import Settings
from streams.topics import TopicSpec, ensure_topics
from tests.conftest import StackEndpoints
from tests.kafka_helpers import TopicReader

EVENTS = 300
USERS = 15


def _records(serde: AvroSerde, corpus: Corpus) -> list[dict[str, Any]]:
    return [serde.decode(value, reader=schemas.CUSTOMER_EVENT)[1] for _, value in corpus.events]


def _expected_profiles(records: list[dict[str, Any]]) -> dict[str, tuple[str, bool]]:
    """messageId -> (profile id, stitched), replaying the corpus in order with plain dicts."""
    links: dict[str, str] = {}
    expected = {}
    for r in records:
        user, anon = r.get("userId"), r.get("anonymousId")
        if r["type"] == "alias":
            links[r["previousId"]] = user
            expected[r["messageId"]] = (user, False)
        elif user:
            if anon:
                links[anon] = user
            expected[r["messageId"]] = (user, False)
        elif anon in links:
            expected[r["messageId"]] = (links[anon], True)
        else:
            expected[r["messageId"]] = (f"anon:{anon}", False)
    return expected


def test_work_matches_the_worker_functions(serde: AvroSerde) -> None:
    corpus = build_corpus(serde, EVENTS, USERS, seed=7, recommendations=False)
    faust_links: dict[str, str] = {}
    ingest_links: dict[str, str] = {}
    bench_links: dict[str, str] = {}
    for record in _records(serde, corpus):
        assert work.identity_routing_key(record) == identity_routing_key(record)
        headers = {k: v for k, v in routing_headers(record, 0, 0) if isinstance(v, bytes)}
        ours = work.resolve_profile(record, bench_links.get, bench_links.__setitem__)
        assert ours == faust_resolve_profile(headers, faust_links)
        assert ours == resolve_record(record, ingest_links)
    assert bench_links == faust_links == ingest_links and faust_links
    assert work.PIPELINE_VERSION == PIPELINE_VERSION
    good = {"customerId": "u", "products": [{"productId": "p", "score": 0.5}]}
    for bad in (
        {"customerId": "", "products": []},
        {"customerId": "u", "products": [{"productId": "p", "score": 1.0}] * 2},
        {"customerId": "u", "products": [{"productId": "p", "score": float("nan")}]},
    ):
        with pytest.raises(EventRejected) as original:
            check_recommendation(bad)
        with pytest.raises(EventRejected) as ours:
            work.check_recommendation(bad)
        assert ours.value.reason == original.value.reason
    check_recommendation(good)
    work.check_recommendation(good)


def test_bare_loop_enriches_like_the_worker(
    stack: StackEndpoints, settings: Settings, serde: AvroSerde, unique: str, tmp_path: Path
) -> None:
    names = LoopTopics(
        raw=f"bench-smoke-{unique}.raw",
        recommendations=f"bench-smoke-{unique}.recs",
        enriched=f"bench-smoke-{unique}.enriched",
        dlq=f"bench-smoke-{unique}.dlq",
    )
    ensure_topics(
        settings,
        [
            TopicSpec(names.raw, 3, {}),
            TopicSpec(names.recommendations, 3, {}),
            TopicSpec(names.enriched, 3, {"message.timestamp.type": "LogAppendTime"}),
            TopicSpec(names.dlq, 1, {}),
        ],
    )
    corpus = build_corpus(serde, EVENTS, USERS, seed=11)
    # The generator's devices carry the userId once identified, so add a device that
    # browses anonymously again after identifying: its events must be stitched.
    encode = serde.encoder("cdp.events.raw")
    for msg in (
        {"type": "identify", "anonymousId": f"dev-{unique}", "userId": f"u-{unique}"},
        {"type": "track", "anonymousId": f"dev-{unique}", "event": "Product Viewed"},
        {"type": "page", "anonymousId": f"dev-{unique}", "name": "Home"},
    ):
        extra = from_segment(msg, received_at_ms=now_ms())
        corpus.events.append((identity_key(extra).encode(), encode(extra)))
        corpus.message_ids.append(extra["messageId"])
    records = _records(serde, corpus)
    total = len(records)
    assert total == EVENTS + 3 and corpus.recommendations

    loop = BareLoop(settings, f"bench-smoke-{unique}", loop_topics=names, serde=serde)
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop.is_set,), daemon=True)
    thread.start()
    enriched = TopicReader(
        stack.bootstrap_servers, stack.registry_url, names.enriched, dict.fromkeys(range(3), 0)
    )
    dlq = TopicReader(stack.bootstrap_servers, stack.registry_url, names.dlq, {0: 0})
    try:
        # Recommendations first, and wait until the loop holds them, so the join is deterministic.
        release(
            settings,
            Corpus(recommendations=corpus.recommendations),
            recs_topic=names.recommendations,
        )
        deadline = time.monotonic() + 60
        while len(loop.recommendations) < len(corpus.recommendations):
            assert time.monotonic() < deadline, "recommendations were not consumed"
            time.sleep(0.1)
        release(settings, Corpus(events=corpus.events), raw_topic=names.raw)
        # Two inputs the loop must dead-letter: not Avro at all, and an event without identity.
        rogue = from_segment(
            {"type": "track", "userId": "x", "event": "e"}, received_at_ms=now_ms()
        )
        rogue["userId"] = None
        producer = Producer(settings.reliable_producer_config())
        produce_all(
            producer,
            names.raw,
            [(b"rogue", b"not avro"), (b"rogue", serde.encode("cdp.events.raw", rogue))],
        )
        assert producer.flush(30) == 0
        outputs = enriched.poll_until(lambda vs: len(vs) >= total, timeout=120)
        letters = dlq.poll_until(lambda vs: len(vs) >= 2, timeout=60)
    finally:
        stop.set()
        thread.join(60)
        loop.close()
        enriched.close()
        dlq.close()

    assert sorted(v["event"]["messageId"] for v in outputs) == sorted(corpus.message_ids)
    assert sorted(v["reasonCode"] for v in letters) == ["MISSING_IDENTITY", "NOT_WIRE_FORMAT"]
    assert loop.processed == total and loop.dead_letters == 2

    expected = _expected_profiles(records)
    recs = {
        key.decode(): serde.decode(value, reader=schemas.RECOMMENDATION_UPDATE)[1]
        for key, value in corpus.recommendations
    }
    assert sum(stitched for _, stitched in expected.values()) == 2
    joined = browsers = 0
    for out in outputs:
        event = out["event"]
        assert (out["profileId"], out["stitched"]) == expected[event["messageId"]]
        assert out["enrichment"]["workerId"].startswith("bench-bare@")
        assert out["enrichment"]["sourceOffset"] is not None
        if event["context"] and event["context"]["userAgent"]:
            assert out["userAgent"] == parse_user_agent(event["context"]["userAgent"])
            browsers += bool(out["userAgent"]["browserFamily"])
        if event["type"] == "identify" and event["traits"] not in (None, "{}"):
            own = orjson.loads(event["traits"])
            snapshot = orjson.loads(out["profileTraits"])
            assert {k: snapshot[k] for k in own} == own
        rec = recs.get(out["profileId"])
        if rec is not None:
            joined += 1
            assert [p["productId"] for p in out["recommendations"]] == [
                p["productId"] for p in rec["products"]
            ]
            assert out["recommendationsModelVersion"] == rec["modelVersion"]
        else:
            assert out["recommendations"] == []
    assert joined > 0 and browsers > 0


def test_peek_message_id_and_rendering(serde: AvroSerde, tmp_path: Path) -> None:
    record = from_segment(
        {"type": "track", "userId": "u1", "event": "Order Completed", "messageId": "m-é-1"},
        received_at_ms=now_ms(),
    )
    enriched = work.enrich(
        record,
        profile_id="u1",
        stitched=False,
        traits=None,
        recommendations=None,
        worker_id="w",
        processed_at_ms=now_ms(),
        source_partition=0,
        source_offset=1,
    )
    assert peek_message_id(serde.encode("cdp.events.enriched", enriched)) == "m-é-1"
    assert identity_key(record) == "u1"
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0

    results: dict[str, Any] = {
        "config": {"events": 300, "users": 15, "seed": 11, "partitions": 3},
        "latency_rate": 500.0,
        "scenarios": {
            name: {
                "processes": 1,
                "outputs": 300,
                "events_per_s": rate,
                "cpu_s_per_10k": 3.0,
                "broker_cpu_s_per_10k": 1.0,
                "peak_rss_mib": 100.0,
                "latency_p50_ms": 10.0,
                "latency_p99_ms": p99,
            }
            for name, rate, p99 in (("b", 1000.0, 5.0), ("a", 900.0, 40.0), ("c", 600.0, 70.0))
        },
        "machine": {"cores": 2, "load_before": [1.0, 1.0, 1.0], "load_after": [1.5, 1.0, 1.0]},
        "versions": {"Python": "3.11"},
    }
    results["scenarios"]["d"] = {"error": "RuntimeError: worker exited"}
    text = report.render_markdown(results)
    assert "| (a) cdpflow worker, 1 process | 1 | 300 | 900 |" in text
    assert "above the throughput of" not in text  # 500 ev/s offered, (c) does 600
    assert "failed: RuntimeError: worker exited" in text
    assert "a/b = 0.90" in text and "a/c = 1.50" in text and "d/a = -" in text
    targets = report.targets(results)
    assert targets["(a) >= 1.2x (c) throughput"]["status"] == "met"
    assert targets["(a) >= 0.8x (b) throughput"]["status"] == "met"
    assert targets["(a) p99 < 50 ms at the fixed rate"]["status"] == "met"
    path = tmp_path / "results.json"
    report.write_json(results, path)
    doc = json.loads(path.read_text())
    assert doc["ratios"] == {"a/b": 0.9, "a/c": 1.5, "d/a": None}
    assert doc["scenarios"]["a"]["events_per_s"] == 900.0
