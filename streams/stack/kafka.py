"""The single-node KRaft broker: its config files, storage format and command line.

One process is both controller and broker with static ``controller.quorum.voters``:
that config formats and starts the same way on Kafka 3.9 and 4.x, and needs no
``--standalone`` bootstrap dance. Every replication-related setting is 1, so
internal topics (offsets, transactions, share groups) can be created on one node.
"""

from __future__ import annotations

import base64
import logging
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from streams.stack import HOST, StackError, StackPaths, StackSettings

_META = "meta.properties"

#: Kafka's own launcher flags (kafka-run-class.sh): low-pause G1 for a dev broker.
_JVM_FLAGS = (
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)

_LOG4J2 = """\
# Written by streams/stack/kafka.py. The broker's stdout is redirected to logs/kafka.log.
status = warn
name = cdpflow-stack-kafka
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
logger.zk.name = org.apache.zookeeper
logger.zk.level = WARN
"""


def bootstrap_servers(settings: StackSettings) -> str:
    return f"{HOST}:{settings.kafka_port}"


def server_properties(settings: StackSettings, paths: StackPaths) -> str:
    port, cport = settings.kafka_port, settings.controller_port
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{HOST}:{cport}",
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{cport}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(paths.kafka_data),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "offsets.topic.replication.factor": "1",
        # One partition: the first consumer group join does not wait for 50.
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true",
        "log.retention.hours": "168",
        # A restarted node waits for its previous incarnation's session to
        # expire (DUPLICATE_BROKER_REGISTRATION) before it serves clients; the
        # default 9 s session made every restart ~9 s slower.
        "broker.session.timeout.ms": "3000",
        "broker.heartbeat.interval.ms": "500",
    }
    lines = ["# Written by streams/stack/kafka.py on every start; edits are overwritten."]
    lines += [f"{k}={v}" for k, v in props.items()]
    return "\n".join(lines) + "\n"


def write_config(settings: StackSettings, paths: StackPaths) -> tuple[Path, Path]:
    """(server.properties, log4j2.properties), rewritten each start so port changes apply."""
    paths.conf.mkdir(parents=True, exist_ok=True)
    server = paths.conf / "server.properties"
    log4j = paths.conf / "log4j2.properties"
    server.write_text(server_properties(settings, paths))
    log4j.write_text(_LOG4J2)
    return server, log4j


def new_cluster_id() -> str:
    """Same format as ``StorageTool random-uuid`` without paying for a JVM start.

    Kafka ids are url-safe base64 of 16 random bytes; ``Uuid.randomUuid`` also
    avoids a leading '-' so the id cannot be mistaken for a CLI flag.
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def read_cluster_id(paths: StackPaths) -> str | None:
    meta = paths.kafka_data / _META
    if not meta.is_file():
        return None
    for line in meta.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "cluster.id":
            return value.strip()
    return None


def format_storage(java: Path, lib: Path, server: Path, log4j: Path, paths: StackPaths) -> str:
    """Format the data dir once; later starts reuse it (and its topics) as-is."""
    existing = read_cluster_id(paths)
    if existing is not None:
        return existing
    paths.kafka_data.mkdir(parents=True, exist_ok=True)
    cluster_id = new_cluster_id()
    cmd = [
        str(java),
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp",
        str(lib / "*"),
        "kafka.tools.StorageTool",
        "format",
        "-t",
        cluster_id,
        "-c",
        str(server),
        "-g",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120, check=False
    )
    if proc.returncode != 0 or read_cluster_id(paths) is None:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise StackError(
            f"formatting Kafka storage in {paths.kafka_data} failed (exit {proc.returncode}); "
            f"run `cdpflow stack up --fresh` to start from an empty data dir.\n{tail}"
        )
    return read_cluster_id(paths) or cluster_id


def command(
    java: Path,
    lib: Path,
    server: Path,
    log4j: Path,
    settings: StackSettings,
    paths: StackPaths,
    jvm_flags: Sequence[str] = (),
) -> list[str]:
    return [
        str(java),
        paths.owner_marker,
        f"-Xmx{settings.kafka_heap}",
        *_JVM_FLAGS,
        *jvm_flags,
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp",
        str(lib / "*"),
        "kafka.Kafka",
        str(server),
    ]


_quiet = logging.getLogger("streams.stack.kafka.librdkafka")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


def _ignore(_: object) -> None:
    return None


def admin_client(bootstrap: str) -> AdminClient:
    """An admin client that stays silent while the broker is still starting.

    librdkafka otherwise prints "Connection refused" to stderr on every retry,
    which would bury the CLI's own progress lines.
    """
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 500,
        "logger": _quiet,
        "error_cb": _ignore,
    }
    return AdminClient(conf)


def is_answering(client: AdminClient, timeout_s: float = 2.0) -> bool:
    """True once the broker serves metadata, i.e. clients can really use it."""
    try:
        md = client.list_topics(timeout=timeout_s)
    except Exception:
        return False
    return bool(md.brokers)
