"""Shared fixtures: a real Kafka broker and schema registry for the whole session.

Order of preference: an explicit KAFKA_BOOTSTRAP_SERVERS + SCHEMA_REGISTRY_URL
(CI or a developer's running stack); else containers through testcontainers when
a Docker engine answers; else the project's own local stack (`cdpflow stack up`,
started here and stopped at the end). If none can be had, the session fails
loudly: integration tests never skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from confluent_kafka.admin import AdminClient

from streams.serde import AvroSerde
from streams.settings import Settings


@dataclass(frozen=True)
class StackEndpoints:
    bootstrap_servers: str
    registry_url: str


def _start_local_stack() -> tuple[StackEndpoints, object | None]:
    from streams.stack.manager import StackManager, StackSettings

    manager = StackManager(StackSettings())
    info = manager.up()
    return StackEndpoints(info.bootstrap_servers, info.registry_url), (
        manager if info.started else None
    )


def _docker_engine_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def _start_containers() -> tuple[StackEndpoints, list[object]]:
    """Kafka (KRaft) and Apicurio in containers, for machines with a Docker engine."""
    import time

    import httpx
    from testcontainers.core.container import DockerContainer
    from testcontainers.kafka import KafkaContainer

    kafka = KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft()
    kafka.start()
    registry = DockerContainer("apicurio/apicurio-registry:3.3.3").with_exposed_ports(8080)
    registry.start()
    url = (
        f"http://{registry.get_container_host_ip()}:{registry.get_exposed_port(8080)}"
        "/apis/ccompat/v7"
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/subjects", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Apicurio container at {url} did not answer in 120 s")
        time.sleep(1)
    return StackEndpoints(kafka.get_bootstrap_server(), url), [registry, kafka]


def _warm_up(endpoints: StackEndpoints, timeout: float = 120.0) -> None:
    """Create the pipeline topics and wait until the group coordinator takes commits.

    On a brand-new broker the first offset commit waits for __consumer_offsets to
    be created and loaded; tests that start consumer groups at a topic's end
    would otherwise race that on whichever test happens to run first.
    """
    import time

    from confluent_kafka import Consumer, KafkaException, TopicPartition

    from streams import topics
    from streams.topics import ensure_topics

    settings = Settings(kafka_bootstrap_servers=endpoints.bootstrap_servers)
    ensure_topics(settings)
    consumer = Consumer(
        {"bootstrap.servers": endpoints.bootstrap_servers, "group.id": "cdpflow-test-warmup"}
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                consumer.commit(
                    offsets=[TopicPartition(topics.EVENTS_RAW, 0, 0)], asynchronous=False
                )
                return
            except KafkaException as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"Kafka group coordinator not ready: {exc}") from exc
                time.sleep(1)
    finally:
        consumer.close()


@pytest.fixture(scope="session")
def stack() -> Iterator[StackEndpoints]:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    registry = os.environ.get("SCHEMA_REGISTRY_URL")
    started = None
    containers: list[object] = []
    if bootstrap and registry:
        endpoints = StackEndpoints(bootstrap, registry)
    else:
        if _docker_engine_available():
            endpoints, containers = _start_containers()
        else:
            endpoints, started = _start_local_stack()
        os.environ["KAFKA_BOOTSTRAP_SERVERS"] = endpoints.bootstrap_servers
        os.environ["SCHEMA_REGISTRY_URL"] = endpoints.registry_url
    # Fail loudly (never skip) when the broker does not answer.
    md = AdminClient({"bootstrap.servers": endpoints.bootstrap_servers}).list_topics(timeout=30)
    assert md.brokers, f"Kafka at {endpoints.bootstrap_servers} has no brokers"
    _warm_up(endpoints)
    yield endpoints
    if started is not None:
        started.down()  # type: ignore[attr-defined]
    for container in containers:
        container.stop()  # type: ignore[attr-defined]


@pytest.fixture
def settings(stack: StackEndpoints, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", stack.bootstrap_servers)
    monkeypatch.setenv("SCHEMA_REGISTRY_URL", stack.registry_url)
    return Settings(cdp_write_keys="test-write-key,second-key")  # type: ignore[arg-type]


@pytest.fixture
def serde(stack: StackEndpoints) -> AvroSerde:
    return AvroSerde.from_url(stack.registry_url)


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic names and group ids, so tests never share state."""
    return uuid.uuid4().hex[:10]
