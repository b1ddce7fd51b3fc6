"""The local stack end to end: real Kafka and a real registry, on ports of its own.

It runs in a temporary stack dir on unusual ports so it never touches a
developer's (or another test session's) stack on the default ports, but it
shares the repo's download cache so only the first run ever downloads.
Nothing here skips: a stack that cannot start is a failure.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from typer.testing import CliRunner

from streams.stack import StackPaths
from streams.stack.cli import stack_app
from streams.stack.manager import StackManager, StackSettings

REPO = Path(__file__).resolve().parents[2]
PORTS = {
    "kafka_port": 29192,
    "controller_port": 29193,
    "registry_port": 28181,
    "registry_mgmt_port": 29101,
}
SCHEMA = (
    '{"type":"record","name":"StackProbe","namespace":"cdpflow.test",'
    '"fields":[{"name":"id","type":"string"},{"name":"n","type":"int"}]}'
)


def _settings(stack_dir: Path) -> StackSettings:
    return StackSettings(
        dir=stack_dir,
        cache_dir=Path(os.environ.get("CDP_STACK_CACHE_DIR") or REPO / ".stack" / "cache"),
        **PORTS,  # type: ignore[arg-type]
    )


def _cli_env(settings: StackSettings) -> dict[str, str]:
    return {
        "CDP_STACK_DIR": str(settings.dir),
        "CDP_STACK_CACHE_DIR": str(settings.cache_dir),
        "CDP_STACK_KAFKA_PORT": str(settings.kafka_port),
        "CDP_STACK_CONTROLLER_PORT": str(settings.controller_port),
        "CDP_STACK_REGISTRY_PORT": str(settings.registry_port),
        "CDP_STACK_REGISTRY_MGMT_PORT": str(settings.registry_mgmt_port),
    }


def _our_pids(paths: StackPaths) -> list[int]:
    """Live processes whose command line carries this stack's ownership marker."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if paths.owner_marker.encode() in args:
            found.append(int(proc.name))
    return found


def _produce_and_consume(bootstrap: str, topic: str, value: bytes) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    producer.produce(topic, key=b"k", value=value)
    assert producer.flush(30) == 0, "message not delivered"
    assert _read_all(bootstrap, topic) == [value]


def _read_all(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"stack-test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while not values and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            values.append(msg.value())
        return values
    finally:
        consumer.close()


@pytest.mark.slow
def test_stack_lifecycle(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "stack")
    manager = StackManager(settings)
    runner = CliRunner()
    try:
        info = manager.up(force_local=True)
        assert info.started
        assert info.bootstrap_servers == "127.0.0.1:29192"
        assert info.registry_url == "http://127.0.0.1:28181/apis/ccompat/v7"
        assert len(_our_pids(manager.paths)) == 2

        # Kafka answers: a real round trip.
        topic = f"stack-probe-{uuid.uuid4().hex[:8]}"
        _produce_and_consume(info.bootstrap_servers, topic, b"hello")

        # The registry speaks the Confluent API the serializers use.
        client = SchemaRegistryClient({"url": info.registry_url})
        schema_id = client.register_schema(f"{topic}-value", Schema(SCHEMA, "AVRO"))
        assert schema_id >= 1
        # Deletes are enabled on the dev registry (tests clean up after themselves).
        client.register_schema(f"{topic}-scratch", Schema(SCHEMA, "AVRO"))
        assert client.delete_subject(f"{topic}-scratch") == [1]
        assert f"{topic}-scratch" not in client.get_subjects()

        # A second up is a no-op on the same addresses.
        again = manager.up(force_local=True)
        assert not again.started
        assert (again.bootstrap_servers, again.registry_url) == (
            info.bootstrap_servers,
            info.registry_url,
        )

        # `env` prints exactly the two exports (it is meant for eval).
        result = runner.invoke(stack_app, ["env"], env=_cli_env(settings))
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines() == [
            "export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:29192",
            "export SCHEMA_REGISTRY_URL=http://127.0.0.1:28181/apis/ccompat/v7",
        ]
        assert manager.env() == info.env()
        assert manager.status().running

        # Down stops both servers; the next up finds the data again.
        manager.down()
        assert _our_pids(manager.paths) == []
        assert not manager.status().running
        assert runner.invoke(stack_app, ["env"], env=_cli_env(settings)).exit_code == 1

        restarted = manager.up(force_local=True)
        assert restarted.started
        fresh_client = SchemaRegistryClient({"url": restarted.registry_url})  # no cached ids
        # Compare parsed: the registry may return the canonical (compacted) form.
        resolved = json.loads(fresh_client.get_schema(schema_id).schema_str)
        assert resolved["fields"] == json.loads(SCHEMA)["fields"]
        assert _read_all(restarted.bootstrap_servers, topic) == [b"hello"]
    finally:
        manager.down()
    assert _our_pids(manager.paths) == []
    assert not manager.paths.state_file.exists()


def test_up_defers_to_an_external_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka.example:9092")
    monkeypatch.setenv("SCHEMA_REGISTRY_URL", "http://registry.example:8081/apis/ccompat/v7")
    manager = StackManager(_settings(tmp_path / "stack"))
    info = manager.up()
    assert info.external and not info.started
    assert info.bootstrap_servers == "kafka.example:9092"
    assert not manager.paths.state_file.exists()
    assert _our_pids(manager.paths) == []


def test_unknown_stack_setting_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_STACK_KAFKA_PROT", "1234")
    # pydantic wraps the validator's UnknownSettingError (a ValueError).
    with pytest.raises(ValueError, match="CDP_STACK_KAFKA_PROT"):
        StackSettings()
