"""Reading topics back in tests, with Confluent's own deserializer (proves interop)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient, topic_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

REPO = Path(__file__).resolve().parent.parent


def confluent_deserializer(registry_url: str) -> AvroDeserializer:
    """Confluent's own AvroDeserializer with the topic-name strategy set explicitly.

    confluent-kafka >= 2.14 defaults to AssociatedNameStrategy, which first asks
    the registry's /associations endpoint; Apicurio does not have it and, on a
    fresh KafkaSQL registry, the request hangs instead of answering 404.
    """
    deserializer: AvroDeserializer = AvroDeserializer(
        SchemaRegistryClient({"url": registry_url, "timeout": 30}),
        conf={"subject.name.strategy": topic_subject_name_strategy},
    )
    return deserializer


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """High watermarks now: read from here to see only what a test produced."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4().hex}"})
    try:
        md = c.list_topics(topic, timeout=15)
        parts = md.topics[topic].partitions
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1] for p in parts}
    finally:
        c.close()


class TopicReader:
    """Consume a topic from given offsets and decode values with Confluent's AvroDeserializer."""

    def __init__(self, bootstrap: str, registry_url: str, topic: str, start: dict[int, int]):
        self.topic = topic
        self._deser = confluent_deserializer(registry_url)
        self._ctx = SerializationContext(topic, MessageField.VALUE)
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"reader-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        self._consumer.assign([TopicPartition(topic, p, o) for p, o in start.items()])
        self.records: list[tuple[bytes | None, dict[str, Any], int]] = []

    def poll_until(
        self, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 120.0
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self._consumer.consume(500, 0.5):
                if msg.error():
                    continue
                value = cast(dict[str, Any], self._deser(msg.value(), self._ctx))
                self.records.append((msg.key(), value, msg.partition() or 0))
            values = [r[1] for r in self.records]
            if done(values):
                return values
        return [r[1] for r in self.records]

    def close(self) -> None:
        self._consumer.close()


def message_ids(values: Iterable[dict[str, Any]], *, nested: bool = False) -> set[str]:
    return {(v["event"] if nested else v)["messageId"] for v in values}


class WorkerProcess:
    """A real `cdpflow worker` OS process, so tests can SIGKILL it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.worker"],
            env={**os.environ, **self.env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Faust logs 'Ready' once the worker joined the group and recovered its tables."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.tail()}")
            if b"[^Worker]: Ready" in self.log_path.read_bytes():
                return
            time.sleep(0.3)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        lines = self.log_path.read_bytes().decode(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if hasattr(self, "_log") and not self._log.closed:
            self._log.close()


def worker_env(
    bootstrap: str, registry: str, group: str, data_dir: Path, **extra: str
) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "SCHEMA_REGISTRY_URL": registry,
        "CDP_WORKER_ID": group,
        "CDP_WORKER_WEB_ENABLED": "false",
        "CDP_WORKER_DATA_DIR": str(data_dir),
        **extra,
    }


def start_group_at_end(bootstrap: str, group: str, topic_names: Iterable[str]) -> None:
    """Commit a new group's offsets at the current end of its input topics.

    Tests share the broker; a fresh worker group would otherwise first chew
    through every earlier test's events (correct, but slow).
    """
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        offsets = [
            TopicPartition(t, p, o)
            for t in topic_names
            for p, o in end_offsets(bootstrap, t).items()
        ]
        c.commit(offsets=offsets, asynchronous=False)
    finally:
        c.close()


def audience_worker_process(
    bootstrap: str, registry: str, config_path: Path, tmp: Path, *, tick_s: str = "0.5"
) -> WorkerProcess:
    """A worker (not yet started) running the audience agent with ``config_path``.

    Its group is new and starts at the current end of its input topics, so it
    processes only what the test sends, and its internal topics exist up front.
    """
    from streams import topics
    from streams.settings import Settings
    from streams.topics import ensure_topics
    from streams.worker import worker_topic_specs

    group = f"cdpflow-aud-{uuid.uuid4().hex[:8]}"
    ensure_topics(Settings(), worker_topic_specs(Settings(cdp_worker_id=group)))
    inputs = [topics.EVENTS_RAW, topics.RECOMMENDATIONS_UPDATES, topics.EVENTS_ENRICHED]
    deadline = time.monotonic() + 60
    while True:  # a topic created a moment ago may not have a leader yet
        try:
            start_group_at_end(bootstrap, group, inputs)
            break
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    env = worker_env(
        bootstrap,
        registry,
        group,
        tmp / "data",
        CDP_AUDIENCES_CONFIG=str(config_path),
        CDP_AUDIENCES_TICK_S=tick_s,
    )
    return WorkerProcess(env, tmp / "worker.log")
