"""Analytics reads on the real broker and registry: collector -> worker -> DataFrame / files.

The enriched topic is shared with every other test (and developer), so checks
select this test's events by messageId; everything else about a range (its
bounds, its dtypes, what files hold) is checked on the whole frame.
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka.admin import AdminClient
from fastavro import parse_schema, schemaless_writer
from typer.testing import CliRunner

from sources.collector import create_app
from sources.generator import generate_events
from sources.kafka_producer import ReliableProducer
from streams import analytics, schemas, topics
from streams.analytics import (
    AnalyticsError,
    TopicScan,
    _assemble,
    _ColumnCompiler,
    _strip_plain_logical,
    iter_dataframes,
    read_topic,
)
from streams.analytics_cli import ExportFormat, export_topic, register
from streams.events import from_segment, now_ms
from streams.profiles.enrich import build_enriched
from streams.serde import HEADER, AvroSerde
from streams.settings import Settings
from streams.topics import TopicSpec, ensure_topics, subject_for
from streams.worker import worker_topic_specs
from tests.conftest import StackEndpoints
from tests.kafka_helpers import (
    TopicReader,
    WorkerProcess,
    end_offsets,
    start_group_at_end,
    worker_env,
)

KEY = "test-write-key"
Client = TestClient[web.Request, web.Application]
BIG = 2**70  # beyond 64 bits: must come back exact


def _basic() -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}


@pytest.fixture(scope="module")
def worker(
    stack: StackEndpoints, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("analytics-worker")
    group = f"cdpflow-test-analytics-{uuid.uuid4().hex[:8]}"
    ensure_topics(Settings(), worker_topic_specs(Settings(cdp_worker_id=group)))
    start_group_at_end(
        stack.bootstrap_servers, group, [topics.EVENTS_RAW, topics.RECOMMENDATIONS_UPDATES]
    )
    proc = WorkerProcess(
        worker_env(stack.bootstrap_servers, stack.registry_url, group, tmp / "data"), tmp / "w.log"
    ).start()
    try:
        proc.wait_ready(120)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(settings))) as c:
        yield c


def _events(tag: str, label: str) -> list[dict[str, Any]]:
    anon, user = f"a-{tag}-{label}", f"u-{tag}-{label}"
    ts = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
    return [
        {
            "type": "identify",
            "messageId": f"{label}-id-{tag}",
            "anonymousId": anon,
            "userId": user,
            "traits": {"plan": "pro", "email": f"{user}@example.com"},
            "timestamp": ts.isoformat(),
        },
        *(
            {
                "type": "track",
                "messageId": f"{label}-t{i}-{tag}",
                "anonymousId": anon,
                "event": "Product Viewed",
                "properties": {
                    "price": 9.99,
                    "qty": i,
                    "big": BIG,
                    "nested": {"a": [1, 2.5, None]},
                    "flag": True,
                },
                "context": {
                    "page": {"url": f"https://shop.example/p{i}?utm_source=news"},
                    "os": {"name": "iOS"},
                },
                "timestamp": (ts + timedelta(seconds=i)).isoformat(),
            }
            for i in range(4)
        ),
        {
            "type": "page",
            "messageId": f"{label}-p-{tag}",
            "userId": user,
            "name": "Checkout",
            "properties": {},
        },
    ]


async def _send(client: Client, batch: list[dict[str, Any]]) -> None:
    resp = await client.post("/v1/batch", json={"batch": batch}, headers=_basic())
    body = await resp.json()
    assert resp.status == 200, body
    assert body["accepted"] == len(batch), body


def _wait_enriched(stack: StackEndpoints, start: dict[int, int], ids: set[str]) -> None:
    reader = TopicReader(stack.bootstrap_servers, stack.registry_url, topics.EVENTS_ENRICHED, start)
    try:
        seen = reader.poll_until(lambda vs: ids <= {v["event"]["messageId"] for v in vs}, 120)
    finally:
        reader.close()
    assert ids <= {v["event"]["messageId"] for v in seen}, "events were not enriched in time"


@dataclass(frozen=True)
class Ranges:
    """Two batches sent through the collector: A before t1, B after."""

    tag: str
    t0: datetime
    t1: datetime
    first: set[str]
    second: set[str]


@pytest.fixture(scope="module")
async def ranges(worker: WorkerProcess, stack: StackEndpoints) -> Ranges:
    tag = uuid.uuid4().hex[:8]
    first, second = _events(tag, "A"), _events(tag, "B")
    first_ids = {e["messageId"] for e in first}
    second_ids = {e["messageId"] for e in second}
    settings = Settings(cdp_write_keys=KEY)  # type: ignore[arg-type]
    async with TestClient(TestServer(create_app(settings))) as client:
        t0 = datetime.now(UTC)
        start = end_offsets(stack.bootstrap_servers, topics.EVENTS_ENRICHED)
        await _send(client, first)
        _wait_enriched(stack, start, first_ids)
        t1 = datetime.now(UTC)
        time.sleep(0.05)  # B's records are written strictly after t1
        start = end_offsets(stack.bootstrap_servers, topics.EVENTS_ENRICHED)
        await _send(client, second)
        _wait_enriched(stack, start, second_ids)
    return Ranges(tag, t0, t1, first_ids, second_ids)


def test_time_range_comes_back_as_a_typed_frame(ranges: Ranges, settings: Settings) -> None:
    tag, t0, t1 = ranges.tag, ranges.t0, ranges.t1
    first_ids, second_ids = ranges.first, ranges.second
    frame = read_topic(topics.EVENTS_ENRICHED, since=t0, until=t1.isoformat(), settings=settings)
    ours = frame[frame["event.messageId"].isin(first_ids)]
    assert sorted(ours["event.messageId"]) == sorted(first_ids)  # each exactly once
    assert not frame["event.messageId"].isin(second_ids).any()
    ts = frame["kafka.timestamp"]
    assert ts.is_monotonic_increasing
    assert ts.min() >= pd.Timestamp(t0).floor("ms") and ts.max() < pd.Timestamp(t1)

    dtypes = frame.dtypes
    for column in (
        "event.timestamp",
        "event.receivedAt",
        "enrichment.processedAt",
        "kafka.timestamp",
        "recommendationsGeneratedAt",
    ):
        assert str(dtypes[column]) == "datetime64[ms, UTC]", column
    assert isinstance(dtypes["event.messageId"], pd.StringDtype)
    assert isinstance(dtypes["event.context.page.url"], pd.StringDtype)
    assert str(dtypes["stitched"]) == "boolean"
    assert str(dtypes["kafka.partition"]) == "Int32"
    assert str(dtypes["kafka.offset"]) == "Int64"
    for column in ("event.properties", "profileTraits", "recommendations"):
        assert dtypes[column] == np.dtype(object), column

    by_id = ours.set_index("event.messageId")
    track = by_id.loc[f"A-t2-{tag}"]
    assert track["event.properties"] == {
        "price": 9.99,
        "qty": 2,
        "big": BIG,
        "nested": {"a": [1, 2.5, None]},
        "flag": True,
    }
    assert isinstance(track["event.properties"]["qty"], int)
    assert track["event.context.page.url"] == "https://shop.example/p2?utm_source=news"
    assert track["event.context.extraJson"] == {"os": {"name": "iOS"}}
    assert track["campaign.source"] == "news"
    assert track["event.timestamp"] == pd.Timestamp("2026-01-02T03:04:07.678Z")
    assert track["profileId"] == f"u-{tag}-A"
    assert bool(track["stitched"]) is True
    assert track["profileTraits"] == {"plan": "pro", "email": f"u-{tag}-A@example.com"}
    assert pd.isna(by_id.loc[f"A-p-{tag}", "event.anonymousId"])
    assert track["kafka.key"] == f"u-{tag}-A"

    spread = read_topic(
        topics.EVENTS_ENRICHED, since=t0, until=t1, flatten=["properties"], settings=settings
    )
    spread = spread[spread["event.messageId"].isin(first_ids)].set_index("event.messageId")
    row = spread.loc[f"A-t3-{tag}"]
    assert row["event.properties.price"] == 9.99
    assert row["event.properties.qty"] == 3
    assert row["event.properties.nested.a"] == [1, 2.5, None]
    assert "event.properties" not in spread.columns
    assert "event.traits" in spread.columns  # only the named field is spread

    later = read_topic(topics.EVENTS_ENRICHED, since=t1, settings=settings)
    assert second_ids <= set(later["event.messageId"])
    assert not later["event.messageId"].isin(first_ids).any()


def test_chunks_have_bounded_size_and_stable_dtypes(ranges: Ranges, settings: Settings) -> None:
    t0, t1 = ranges.t0, ranges.t1
    whole = read_topic(topics.EVENTS_ENRICHED, since=t0, until=t1, settings=settings)
    chunks = list(
        iter_dataframes(topics.EVENTS_ENRICHED, since=t0, until=t1, chunk_size=4, settings=settings)
    )
    assert len(chunks) >= 2
    assert all(0 < len(c) <= 4 for c in chunks)
    for c in chunks:
        assert c.dtypes.equals(whole.dtypes)
    assert sorted(pd.concat(chunks)["event.messageId"]) == sorted(whole["event.messageId"])


@pytest.mark.parametrize("fmt", list(ExportFormat))
def test_export_round_trips(
    fmt: ExportFormat, ranges: Ranges, settings: Settings, tmp_path: Path
) -> None:
    t0, t1 = ranges.t0, ranges.t1
    frame = read_topic(topics.EVENTS_ENRICHED, since=t0, until=t1, settings=settings)
    out = tmp_path / f"export.{fmt}"
    scan = TopicScan(topics.EVENTS_ENRICHED, since=t0, until=t1, settings=settings)
    seen: list[int] = []
    result = export_topic(scan, out, fmt, chunk_size=3, progress=lambda n, b: seen.append(n))
    assert result.records == len(frame) <= sum(seen)  # progress counts every offset read
    assert not out.with_name(out.name + ".partial").exists()
    tag = ranges.tag
    if fmt is ExportFormat.parquet:
        back = pd.read_parquet(out)
        assert list(back.columns) == list(frame.columns)
        back = back.sort_values(["kafka.partition", "kafka.offset"], ignore_index=True)
        mine = frame.sort_values(["kafka.partition", "kafka.offset"], ignore_index=True)
        assert list(back["event.messageId"]) == list(mine["event.messageId"])
        pd.testing.assert_series_equal(back["event.timestamp"], mine["event.timestamp"])
        pd.testing.assert_series_equal(
            back["kafka.offset"], mine["kafka.offset"], check_dtype=False
        )
        for column in scan.schema.json_columns:  # JSON text in the file, same JSON
            parsed = [None if v is None else analytics.loads_json(v) for v in back[column]]
            assert parsed == list(mine[column]), column
        schema = pq.read_schema(out)
        assert schema.field("event.timestamp").type == pa.timestamp("ms", tz="UTC")
        assert schema.field("stitched").type == pa.bool_()
        assert pa.types.is_list(schema.field("recommendations").type)
        assert schema.field("event.properties").metadata[b"cdpflow.json"] == b"true"
        assert schema.metadata[b"cdpflow.topic"] == topics.EVENTS_ENRICHED.encode()
    elif fmt is ExportFormat.csv:
        back = pd.read_csv(out)
        assert list(back.columns) == list(frame.columns)
        assert sorted(back["event.messageId"]) == sorted(frame["event.messageId"])
        row = back[back["event.messageId"] == f"A-t1-{tag}"].iloc[0]
        assert analytics.loads_json(row["event.properties"])["big"] == BIG
    else:
        lines = [analytics.loads_json(line) for line in out.read_text().splitlines()]
        assert sorted(r["event"]["messageId"] for r in lines) == sorted(frame["event.messageId"])
        row = next(r for r in lines if r["event"]["messageId"] == f"A-t1-{tag}")
        assert row["event"]["properties"]["big"] == BIG
        assert row["event"]["context"]["page"]["url"].startswith("https://shop.example/p1")
        assert row["event"]["timestamp"] == "2026-01-02T03:04:06.678000Z"
        assert row["kafka"]["key"] == f"u-{tag}-A"


def test_last_records(settings: Settings) -> None:
    frame = read_topic(topics.EVENTS_ENRICHED, last=7, settings=settings)
    assert len(frame) == 7
    assert frame["kafka.timestamp"].is_monotonic_increasing


async def test_dead_letters_frame(client: Client, settings: Settings) -> None:
    """The collector's rejects reach the DLQ directly; their frame keeps the evidence."""
    tag = uuid.uuid4().hex[:8]
    since = datetime.now(UTC)
    bad = {"type": "track", "messageId": f"bad-{tag}", "userId": "x"}  # no event name
    resp = await client.post("/v1/batch", json={"batch": [bad]}, headers=_basic())
    assert (await resp.json())["rejected"] == 1
    frame = pd.DataFrame()
    for _ in range(20):
        frame = read_topic(topics.EVENTS_DLQ, since=since, settings=settings)
        if (frame["messageId"] == f"bad-{tag}").any():
            break
        time.sleep(0.5)
    row = frame[frame["messageId"] == f"bad-{tag}"].iloc[0]
    assert row["reasonCode"] == "MISSING_EVENT"
    assert row["stage"] == "collector"
    assert json.loads(row["originalBytes"])["messageId"] == f"bad-{tag}"
    assert str(frame.dtypes["failedAt"]) == "datetime64[ms, UTC]"
    assert str(frame.dtypes["sourcePartition"]) == "Int32"


# --------------------------------------------------------------------------- private topic


def _enriched_records(n: int, seed: int) -> list[dict[str, Any]]:
    out = []
    for i, msg in enumerate(generate_events(n, 20, seed=seed)):
        record = from_segment(msg, received_at_ms=now_ms())
        out.append(
            build_enriched(
                record,
                profile_id=record.get("userId") or f"anon:{record.get('anonymousId')}",
                stitched=i % 2 == 0,
                traits={"plan": "pro", "i": i} if i % 3 else None,
                recommendations=(
                    {
                        "products": [
                            {
                                "productId": f"p{i}",
                                "score": 0.5,
                                "rank": 1,
                                "reason": None,
                                "category": "c",
                            }
                        ],
                        "modelVersion": "m",
                        "generatedAt": 1_700_000_000_000 + i,
                    }
                    if i % 4 == 0
                    else None
                ),
                worker_id="w",
                pipeline_version="t",
                processed_at_ms=now_ms(),
                source_partition=i,
                source_offset=-(2**40) - i,
            )
        )
    return out


def _old_enriched_schema() -> dict[str, Any]:
    """EnrichedEvent as it was before ``stitched`` (added with a default)."""
    schema = json.loads(schemas.schema_text(schemas.ENRICHED_EVENT))
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "stitched"]
    return dict(schema)


@pytest.fixture(scope="module")
def private_topic(stack: StackEndpoints) -> str:
    """A topic of this module only, holding EnrichedEvents under two schema versions."""
    name = f"test.analytics.{uuid.uuid4().hex[:10]}"
    settings = Settings()
    ensure_topics(settings, [TopicSpec(name, 2, {})])
    return name


def _wire(schema_id: int, schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    buf.write(HEADER.pack(0, schema_id))
    schemaless_writer(buf, parse_schema(schema), record)
    return buf.getvalue()


def test_mixed_versions_garbage_and_a_fixed_snapshot(
    private_topic: str, serde: AvroSerde, settings: Settings
) -> None:
    old = _old_enriched_schema()
    registry = serde.registry
    old_id = registry.register(subject_for(private_topic), json.dumps(old))
    new_id = registry.register(
        subject_for(private_topic), schemas.schema_text(schemas.ENRICHED_EVENT)
    )
    assert old_id != new_id
    records = _enriched_records(12, seed=7)
    producer = ReliableProducer(settings)
    try:
        futures = []
        for i, rec in enumerate(records):
            if i % 3 == 1:
                old_rec = {k: v for k, v in rec.items() if k != "stitched"}
                value = _wire(old_id, old, old_rec)
            else:
                value = _wire(new_id, json.loads(schemas.schema_text(schemas.ENRICHED_EVENT)), rec)
            futures.append(producer.produce(private_topic, value, key="k"))  # one partition
        futures.append(producer.produce(private_topic, b"not avro", key="k"))
        futures.append(producer.produce(private_topic, struct.pack(">bI", 0, new_id) + b"\xff"))
        for f in futures:
            f.result(30)

        # Reads are snapshots: what is appended after the plan is not read.
        scan = TopicScan(private_topic, settings=settings, errors="skip")
        late = _wire(new_id, json.loads(schemas.schema_text(schemas.ENRICHED_EVENT)), records[0])
        producer.produce(private_topic, late, key="k").result(30)
    finally:
        producer.close()
    frame = pd.concat(list(scan.dataframes(chunk_size=5)), ignore_index=True)
    assert scan.skipped == 2
    assert list(frame["event.messageId"]) == [r["event"]["messageId"] for r in records]
    assert list(frame["stitched"]) == [False if i % 3 == 1 else i % 2 == 0 for i in range(12)]
    assert list(frame["enrichment.sourceOffset"]) == [-(2**40) - i for i in range(12)]
    assert frame["profileTraits"].iloc[1] == {"plan": "pro", "i": 1}

    with pytest.raises(AnalyticsError, match=r"NOT_WIRE_FORMAT|MALFORMED_AVRO"):
        read_topic(private_topic, settings=settings)
    assert len(read_topic(private_topic, settings=settings, errors="skip")) == 13  # + late

    groups = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    listed = groups.list_consumer_groups().result(timeout=30)
    names = [g.group_id for g in listed.valid]
    joined = [g for g in names if re.fullmatch(r"cdpflow-analytics-[0-9a-f]{32}", g)]
    assert not joined, f"analytics reads created consumer groups: {joined}"


def test_compiled_decoder_matches_fastavro() -> None:
    """The generated columnar decoder and fastavro agree on varied real-looking records."""
    import fastavro

    schema = _strip_plain_logical(json.loads(schemas.schema_text(schemas.ENRICHED_EVENT)))
    parsed = parse_schema(schema)
    records = _enriched_records(300, seed=11)
    records[5]["event"]["context"]["consent"] = {"categoryPreferences": {"Ads": True, "An": False}}
    records[6]["event"]["properties"] = json.dumps({"émoji": "✓ 🚀"}, ensure_ascii=False)
    values = []
    for rec in records:
        buf = io.BytesIO()
        buf.write(b"\0\0\0\0\1")
        fastavro.schemaless_writer(buf, parsed, rec)
        values.append(buf.getvalue())
    frame_schema = analytics.FrameSchema.from_avro(schema, "t")
    struct_type = pa.struct(list(frame_schema.nested)[:-1])
    compiled = _ColumnCompiler().compile(schema)
    fast = pa.StructArray.from_arrays(
        _assemble(struct_type, compiled.decode(values, 5), compiled), fields=list(struct_type)
    )
    reference = pa.array(
        [fastavro.schemaless_reader(io.BytesIO(v[5:]), parsed, None) for v in values],
        type=struct_type,
    )
    assert fast.equals(reference)
    with pytest.raises(ValueError, match="trailing"):
        compiled.decode([values[0] + b"\0"], 5)


def test_export_command(ranges: Ranges, tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    out = tmp_path / "range.parquet"
    args = ["export", topics.EVENTS_ENRICHED, "--out", str(out), "--chunk-size", "4"]
    args += ["--since", ranges.t0.isoformat(), "--until", ranges.t1.isoformat()]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "records/s" in result.output
    frame = pd.read_parquet(out)
    assert ranges.first <= set(frame["event.messageId"])
    assert not frame["event.messageId"].isin(ranges.second).any()

    bad = CliRunner().invoke(app, ["export", "no.such.topic", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1
    assert "does not exist" in bad.output


def test_cli_keeps_the_identity_prefix_of_the_pipeline() -> None:
    from streams import analytics_cli
    from streams.identity.agents import ANON_PREFIX

    assert analytics_cli.ANON_PREFIX == ANON_PREFIX
    assert analytics_cli.DEFAULT_CHUNK_SIZE == analytics.DEFAULT_CHUNK_SIZE
