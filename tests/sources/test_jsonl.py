"""produce_file: good lines reach Kafka, bad lines are reported by number and never sent."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from sources.generator import bad_reason, generate_events
from sources.jsonl import produce_file
from sources.kafka_producer import ReliableProducer
from sources.publisher import EventPublisher
from streams import topics
from streams.serde import AvroSerde
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.conftest import StackEndpoints
from tests.sources import TopicTail


@pytest.fixture(scope="module")
def pipeline_topics(stack: StackEndpoints) -> None:
    ensure_topics(
        Settings(
            kafka_bootstrap_servers=stack.bootstrap_servers,
            schema_registry_url=stack.registry_url,
        )
    )


@pytest.fixture
def publisher(
    settings: Settings, serde: AvroSerde, pipeline_topics: None
) -> Iterator[EventPublisher]:
    pub = EventPublisher(settings, serde=serde, source_id="jsonl-test")
    yield pub
    pub.close()


@pytest.fixture
def raw(stack: StackEndpoints, pipeline_topics: None) -> Iterator[TopicTail]:
    tail = TopicTail(stack.bootstrap_servers, stack.registry_url, topics.EVENTS_RAW)
    yield tail
    tail.close()


def line(obj: object) -> bytes:
    return orjson.dumps(obj) + b"\n"


def test_good_lines_arrive_and_bad_lines_are_reported_by_number(
    tmp_path: Path, publisher: EventPublisher, raw: TopicTail, unique: str
) -> None:
    future = (datetime.now(UTC) + timedelta(days=400)).isoformat()
    good: list[dict[str, Any]] = [
        {
            "type": "track",
            "userId": f"u-{unique}",
            "event": "Signed Up",
            "messageId": f"g1-{unique}",
        },
        {
            "type": "identify",
            "anonymousId": f"a-{unique}",
            "userId": f"u-{unique}",
            "traits": {"plan": "pro"},
            "messageId": f"g2-{unique}",
        },
        {"type": "page", "anonymousId": f"a-{unique}", "name": "Home", "messageId": f"g3-{unique}"},
    ]
    bad_ids = {f"b{i}-{unique}" for i in range(1, 5)}
    content = b"".join(
        [
            line(good[0]),  # 1
            b"\n",  # 2 blank
            b"{not json\n",  # 3
            line([1, 2, 3]),  # 4
            line({"type": "track", "event": "Anon", "messageId": f"b1-{unique}"}),  # 5
            b"   \t \n",  # 6 blank (whitespace)
            line(good[1]),  # 7
            line({"type": "track", "userId": "u", "messageId": f"b2-{unique}"}),  # 8
            line(
                {
                    "type": "track",
                    "userId": "u",
                    "event": "E",
                    "timestamp": future,
                    "messageId": f"b3-{unique}",
                }
            ),  # 9
            b'"just a string"\n',  # 10
            b'{"type": "track", "userId": "\xff\xfe", "event": "E"}\n',  # 11 not UTF-8
            line({"type": "sell", "userId": "u", "messageId": f"b4-{unique}"}),  # 12
            line(good[2]).rstrip(b"\n"),  # 13, no trailing newline at EOF
        ]
    )
    path = tmp_path / "events.jsonl"
    path.write_bytes(content)

    report = produce_file(path, publisher)

    assert [(n, code) for n, code, _ in report.problems] == [
        (3, "INVALID_JSON"),
        (4, "SCHEMA_INVALID"),
        (5, "MISSING_IDENTITY"),
        (8, "MISSING_EVENT"),
        (9, "TIMESTAMP_IN_FUTURE"),
        (10, "SCHEMA_INVALID"),
        (11, "INVALID_JSON"),
        (12, "UNKNOWN_TYPE"),
    ]
    assert all(message for _, _, message in report.problems)
    assert (report.lines, report.blank, report.sent, report.delivered) == (13, 2, 3, 3)
    assert (report.rejected, report.failed, report.pending) == (8, 0, 0)
    assert not report.ok
    landed = raw.by_message_id()
    good_ids = {g["messageId"] for g in good}
    assert good_ids <= set(landed)
    assert not bad_ids & set(landed)
    assert all(landed[i].value["sourceId"] == "jsonl-test" for i in good_ids)


def test_generated_file_round_trip(
    tmp_path: Path, publisher: EventPublisher, raw: TopicTail
) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    events = list(generate_events(400, 20, seed=seed, bad_ratio=0.1))
    path = tmp_path / "generated.jsonl"
    with path.open("wb") as fh:
        for e in events:
            fh.write(line(e))
    report = produce_file(path, publisher)
    expected_bad = [(n, str(bad_reason(e))) for n, e in enumerate(events, 1) if bad_reason(e)]
    assert [(n, code) for n, code, _ in report.problems] == expected_bad
    good_ids = {e["messageId"] for e in events if bad_reason(e) is None}
    assert report.delivered == report.sent == len(good_ids)
    assert set(raw.by_message_id(good_ids)) == good_ids


def test_file_is_streamed_not_read_whole(
    tmp_path: Path, publisher: EventPublisher, raw: TopicTail, unique: str
) -> None:
    """The first line must reach Kafka while the writer still holds the rest of the file."""
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    first = {
        "type": "track",
        "userId": f"u-{unique}",
        "event": "First",
        "messageId": f"s1-{unique}",
    }
    last = {"type": "track", "userId": f"u-{unique}", "event": "Last", "messageId": f"s2-{unique}"}
    seen_before_eof: list[bool] = []

    def writer() -> None:
        with fifo.open("wb") as fh:
            fh.write(line(first))
            fh.flush()
            deadline = time.monotonic() + 30
            seen = False
            while time.monotonic() < deadline and not seen:
                seen = first["messageId"] in raw.by_message_id({first["messageId"]})
                time.sleep(0.2)
            seen_before_eof.append(seen)
            fh.write(line(last))

    thread = threading.Thread(target=writer)
    thread.start()
    report = produce_file(fifo, publisher)
    thread.join(60)
    assert seen_before_eof == [True]
    assert (report.sent, report.delivered, report.problems) == (2, 2, [])


def test_delivery_failures_are_reported_with_line_numbers(
    tmp_path: Path,
    stack: StackEndpoints,
    serde: AvroSerde,
    monkeypatch: pytest.MonkeyPatch,
    unique: str,
    pipeline_topics: None,
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    monkeypatch.setenv("SCHEMA_REGISTRY_URL", stack.registry_url)
    dead = Settings()
    producer = ReliableProducer(dead, **{"message.timeout.ms": 1500})
    try:
        pub = EventPublisher(dead, producer=producer, serde=serde)
        path = tmp_path / "doomed.jsonl"
        path.write_bytes(
            line({"type": "track", "userId": "u", "event": "A", "messageId": f"d1-{unique}"})
            + b"oops\n"
            + line({"type": "track", "userId": "u", "event": "B", "messageId": f"d2-{unique}"})
        )
        report = produce_file(path, pub, timeout=20)
        assert [(n, code) for n, code, _ in report.problems] == [
            (1, "DELIVERY_FAILED"),
            (2, "INVALID_JSON"),
            (3, "DELIVERY_FAILED"),
        ]
        assert (report.sent, report.delivered, report.failed, report.rejected) == (2, 0, 2, 1)
    finally:
        producer.close(timeout=0)
