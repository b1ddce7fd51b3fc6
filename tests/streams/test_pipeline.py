"""The Faust topology on the real broker and registry: enrichment, stitching and the DLQ."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer

from streams import schemas, topics
from streams.events import Reason, from_segment, now_ms
from streams.partitioning import KeyPartitioner
from streams.serde import HEADER, MAGIC_BYTE, AvroSerde
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
from tests.streams.pipeline_helpers import (
    RawProducer,
    RawTopicReader,
    avro_with_bad_body,
    other_schema_bytes,
    rogue_record,
    unknown_schema_id_bytes,
)


@pytest.fixture(scope="module")
def worker(
    stack: StackEndpoints, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("worker")
    group = f"cdpflow-test-{uuid.uuid4().hex[:8]}"
    ensure_topics(Settings(), worker_topic_specs(Settings(cdp_worker_id=group)))
    start_group_at_end(
        stack.bootstrap_servers, group, [topics.EVENTS_RAW, topics.RECOMMENDATIONS_UPDATES]
    )
    proc = WorkerProcess(
        worker_env(stack.bootstrap_servers, stack.registry_url, group, tmp / "data"), tmp / "w.log"
    ).start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


IPHONE_UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
)


def _reader(stack: StackEndpoints, topic: str) -> TopicReader:
    return TopicReader(
        stack.bootstrap_servers,
        stack.registry_url,
        topic,
        end_offsets(stack.bootstrap_servers, topic),
    )


def test_events_are_enriched_stitched_and_joined(
    worker: WorkerProcess, stack: StackEndpoints, settings: Settings, serde: AvroSerde
) -> None:
    tag = uuid.uuid4().hex[:8]
    enriched = _reader(stack, topics.EVENTS_ENRICHED)
    profile_hop = RawTopicReader(
        stack.bootstrap_servers,
        topics.internal_topic(worker.env["CDP_WORKER_ID"], topics.INTERNAL_PROFILE_SUFFIX),
    )
    out = RawProducer(settings, serde)
    users = [(f"anon-{tag}-{i}", f"user-{tag}-{i}") for i in range(5)]
    for _, user in users:
        out.recommendations(user, [(f"sku-{tag}-1", 0.9), (f"sku-{tag}-2", 0.5)])
    out.flush()
    # Recommendations and events reach a profile through different topics, so the join
    # sees an update only if it is ahead of the events in the profile's partition.
    user_ids = {user.encode() for _, user in users}
    profile_hop.poll_until(lambda rs: user_ids <= {key for key, _, _ in rs}, timeout=120)
    profile_hop.close()
    sent: dict[str, str] = {}
    for anon, user in users:
        sent[
            out.segment(
                {
                    "type": "identify",
                    "anonymousId": anon,
                    "userId": user,
                    "traits": {
                        "email": f"{user}@example.com",
                        "plan": "pro",
                        "nested": {"a": [1, 2.5]},
                    },
                }
            )
        ] = user
    out.flush()
    # The links are in place; anonymous-only events now stitch to the user.
    for anon, user in users:
        sent[
            out.segment(
                {
                    "type": "track",
                    "anonymousId": anon,
                    "event": "Product Viewed",
                    "properties": {"product_id": "p1", "price": 9.99, "tags": ["a", None, True]},
                    "context": {
                        "userAgent": IPHONE_UA,
                        "page": {"url": "https://shop.example/p1?utm_source=news&utm_campaign=bf"},
                    },
                }
            )
        ] = user
        sent[out.segment({"type": "page", "userId": user, "name": "Checkout"})] = user
    sent[out.segment({"type": "page", "anonymousId": f"lonely-{tag}", "name": "Home"})] = (
        f"anon:lonely-{tag}"
    )
    out.close()

    values = enriched.poll_until(
        lambda vs: set(sent) <= {v["event"]["messageId"] for v in vs}, timeout=120
    )
    enriched.close()
    by_id = {v["event"]["messageId"]: v for v in values if v["event"]["messageId"] in sent}
    assert set(by_id) == set(sent), f"missing {set(sent) - set(by_id)}"
    for mid, profile in sent.items():
        assert by_id[mid]["profileId"] == profile
    tracks = [v for v in by_id.values() if v["event"]["type"] == "track"]
    assert len(tracks) == 5
    for v in tracks:
        assert v["stitched"] is True
        assert json.loads(v["event"]["properties"]) == {
            "product_id": "p1",
            "price": 9.99,
            "tags": ["a", None, True],
        }
        traits = json.loads(v["profileTraits"])
        assert traits["plan"] == "pro" and traits["nested"] == {"a": [1, 2.5]}
        assert [r["productId"] for r in v["recommendations"]] == [f"sku-{tag}-1", f"sku-{tag}-2"]
        assert v["recommendationsModelVersion"] == "test-model-1"
        assert v["userAgent"]["osFamily"] == "iOS"
        assert v["campaign"]["source"] == "news" and v["campaign"]["name"] == "bf"


def test_bad_input_goes_to_dlq_with_distinct_reasons(
    worker: WorkerProcess, stack: StackEndpoints, settings: Settings, serde: AvroSerde
) -> None:
    tag = uuid.uuid4().hex[:8]
    dlq = _reader(stack, topics.EVENTS_DLQ)
    enriched = _reader(stack, topics.EVENTS_ENRICHED)
    out = RawProducer(settings, serde)
    good: list[str] = []
    good.append(out.segment({"type": "track", "userId": f"u-{tag}", "event": "Before"}))
    garbage = f"garbage-{tag}".encode()
    out.raw_bytes(garbage)
    valid_bytes = out.encode(rogue_record(messageId=f"tmp-{tag}", userId="x"))
    out.raw_bytes(unknown_schema_id_bytes(valid_bytes))
    out.raw_bytes(other_schema_bytes(serde))
    out.raw_bytes(avro_with_bad_body(serde))
    rule_breakers = {
        f"noid-{tag}": (
            rogue_record(messageId=f"noid-{tag}", userId=None),
            Reason.MISSING_IDENTITY,
        ),
        f"noevent-{tag}": (
            rogue_record(messageId=f"noevent-{tag}", event=None),
            Reason.MISSING_EVENT,
        ),
        f"future-{tag}": (
            rogue_record(messageId=f"future-{tag}", timestamp=now_ms() + 10 * 86_400_000),
            Reason.TIMESTAMP_IN_FUTURE,
        ),
        f"badjson-{tag}": (
            rogue_record(messageId=f"badjson-{tag}", properties="{not json"),
            Reason.INVALID_JSON,
        ),
        f"deep-{tag}": (
            rogue_record(messageId=f"deep-{tag}", properties=json.dumps(_deep(40))),
            Reason.NESTING_TOO_DEEP,
        ),
    }
    for record, _ in rule_breakers.values():
        out.record(record)
    good.append(out.segment({"type": "track", "userId": f"u-{tag}", "event": "After"}))
    out.close()

    def complete(vs: list[dict[str, Any]]) -> bool:
        ids = {v.get("messageId") for v in vs}
        return set(rule_breakers) <= ids and sum(1 for v in vs if v.get("messageId") is None) >= 4

    dead = dlq.poll_until(complete, timeout=120)
    dlq.close()
    by_id = {v["messageId"]: v for v in dead if v.get("messageId") in rule_breakers}
    for mid, (_, reason) in rule_breakers.items():
        assert by_id[mid]["reasonCode"] == reason, by_id[mid]
        assert by_id[mid]["stage"] == "validate"
        assert by_id[mid]["sourceTopic"] == topics.EVENTS_RAW
        assert by_id[mid]["sourceOffset"] is not None
    anonymous = [v for v in dead if v.get("messageId") is None]
    reasons = {v["reasonCode"] for v in anonymous}
    assert {
        Reason.NOT_WIRE_FORMAT,
        Reason.UNKNOWN_SCHEMA_ID,
        Reason.SCHEMA_MISMATCH,
        Reason.MALFORMED_AVRO,
    } <= reasons
    assert any(v["originalBytes"] == garbage for v in anonymous)
    values = enriched.poll_until(
        lambda vs: set(good) <= {v["event"]["messageId"] for v in vs}, timeout=60
    )
    enriched.close()
    assert set(good) <= {v["event"]["messageId"] for v in values}


def test_events_written_with_an_older_schema_are_enriched_in_full(
    worker: WorkerProcess, stack: StackEndpoints, settings: Settings, serde: AvroSerde
) -> None:
    """A producer on an older CustomerEvent version: its bytes cannot be embedded in the
    EnrichedEvent as they are, so the profile stage decodes and encodes in full."""
    tag = uuid.uuid4().hex[:8]
    current = schemas.schema_dict(schemas.CUSTOMER_EVENT)
    older = {**current, "fields": [f for f in current["fields"] if f["name"] != "sourceId"]}
    older_id = serde.registry.register(
        topics.subject_for(topics.EVENTS_RAW), json.dumps(older, separators=(",", ":"))
    )
    assert older_id != serde.schema_id(topics.EVENTS_RAW)
    record = from_segment(
        {
            "type": "identify",
            "userId": f"old-{tag}",
            "traits": {"plan": "legacy", "n": 10**20},
            "context": {"userAgent": IPHONE_UA, "campaign": {"name": "c1"}},
        },
        received_at_ms=now_ms(),
        source_id="legacy-producer",
    )
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(older), record)
    enriched = _reader(stack, topics.EVENTS_ENRICHED)
    out = RawProducer(settings, serde)
    out.pending.append(
        out.producer.produce(
            topics.EVENTS_RAW, HEADER.pack(MAGIC_BYTE, older_id) + buf.getvalue(), key=f"old-{tag}"
        )
    )
    out.close()
    mid = record["messageId"]
    values = enriched.poll_until(lambda vs: mid in {v["event"]["messageId"] for v in vs}, 120)
    enriched.close()
    (value,) = [v for v in values if v["event"]["messageId"] == mid]
    assert value["event"]["sourceId"] is None  # the older schema has no sourceId
    assert value["event"]["traits"] == record["traits"]
    assert json.loads(value["profileTraits"]) == {"plan": "legacy", "n": 10**20}
    assert value["userAgent"]["osFamily"] == "iOS" and value["campaign"]["name"] == "c1"
    assert (value["profileId"], value["stitched"]) == (f"old-{tag}", False)


def _key_outside(partition_of: KeyPartitioner, partition: int, prefix: str) -> str:
    """A key the default partitioner places outside ``partition``."""
    for i in range(1000):
        key = f"{prefix}-{i}"
        if partition_of(key.encode()) != partition:
            return key
    raise AssertionError("no key outside the partition (single-partition topics?)")


def test_alias_and_miskeyed_events_stitch_through_the_identity_hop(
    worker: WorkerProcess, stack: StackEndpoints, settings: Settings, serde: AvroSerde
) -> None:
    """Events keyed by their identity key are stitched in the ingest pass; an alias (link
    under previousId) and events a third party keyed differently take the identity hop,
    and their links serve later events whichever path those take."""
    tag = uuid.uuid4().hex[:8]
    partition_of = KeyPartitioner(settings.cdp_topic_partitions)
    hop_topic = topics.internal_topic(worker.env["CDP_WORKER_ID"], topics.INTERNAL_IDENTITY_SUFFIX)
    hop = RawTopicReader(stack.bootstrap_servers, hop_topic)
    enriched = _reader(stack, topics.EVENTS_ENRICHED)
    out = RawProducer(settings, serde)
    alias_user = f"alias-user-{tag}"
    previous = _key_outside(partition_of, partition_of(alias_user.encode()), f"old-anon-{tag}")
    anon_m, user_m = f"mk-anon-{tag}", f"mk-user-{tag}"
    third_party_key = _key_outside(partition_of, partition_of(anon_m.encode()), f"crm-{tag}")
    anon_l, user_l = f"lo-anon-{tag}", f"lo-user-{tag}"
    alias_id = out.segment({"type": "alias", "previousId": previous, "userId": alias_user})
    identify_m = out.segment(
        {"type": "identify", "anonymousId": anon_m, "userId": user_m, "traits": {"src": "crm"}},
        key=third_party_key,
    )
    identify_l = out.segment({"type": "identify", "anonymousId": anon_l, "userId": user_l})
    first = {alias_id: alias_user, identify_m: user_m, identify_l: user_l}
    out.flush()
    enriched.poll_until(lambda vs: set(first) <= {v["event"]["messageId"] for v in vs}, 120)
    track_m = out.segment(
        {"type": "track", "anonymousId": anon_m, "event": "Via CRM"}, key=third_party_key
    )
    second = {
        out.segment({"type": "track", "anonymousId": previous, "event": "Back"}): alias_user,
        out.segment({"type": "track", "anonymousId": anon_m, "event": "Back"}): user_m,
        track_m: user_m,
        out.segment({"type": "track", "anonymousId": anon_l, "event": "Back"}): user_l,
    }
    out.close()
    values = enriched.poll_until(
        lambda vs: set(second) <= {v["event"]["messageId"] for v in vs}, timeout=120
    )
    enriched.close()
    by_id = {v["event"]["messageId"]: v for v in values}
    for mid, user in first.items():
        assert (by_id[mid]["profileId"], by_id[mid]["stitched"]) == (user, False)
    for mid, user in second.items():
        assert (by_id[mid]["profileId"], by_id[mid]["stitched"]) == (user, True), by_id[mid]
    assert by_id[track_m]["profileTraits"] == '{"src":"crm"}'
    # Exactly the records whose identity key hashes elsewhere crossed the identity topic.
    crossed = {
        serde.decode(value, reader=schemas.CUSTOMER_EVENT)[1]["messageId"]
        for _, value, _ in hop.read_to_end()
    }
    hop.close()
    assert crossed & (set(first) | set(second)) == {alias_id, identify_m, track_m}


def _deep(n: int) -> dict[str, Any]:
    node: dict[str, Any] = {"leaf": 1}
    for _ in range(n):
        node = {"n": node}
    return node
