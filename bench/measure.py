"""What the benchmark reads: process CPU and memory from /proc, topic offsets, output records.

Method (also in the report):

* **Throughput** — the output topic is created with
  ``message.timestamp.type=LogAppendTime``, so every output record carries the
  broker's append time whatever the framework's producer stamped. Events/s is
  ``(outputs - 1) / (last append time - first append time)``: from the first
  processed event leaving the pipeline to the last one, pipeline fill excluded.
  Every event fed is waited for, so each one has crossed every hop.
* **CPU s / 10k events** — utime + stime of the framework's processes from
  ``/proc/<pid>/stat``, sampled just before the corpus is fed and again once
  the last output arrived, divided by the events processed.
* **Peak RSS** — ``VmHWM`` from ``/proc/<pid>/status`` at the end of the scenario.
* **Latency** — input produce-call wall-clock time (recorded per messageId by the
  paced producer) to the output record's broker append time; the messageId is
  read from the head of the Avro body without decoding the rest.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from streams.serde import HEADER

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads), 0.0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    """The process's high-water resident set (VmHWM), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def total_cpu(pids: Iterable[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


class ManagedProcess:
    """A child process of the benchmark, its log in a file; stopped only by its own pid."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited early; log tail:\n{self.tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# ------------------------------------------------------------------------- kafka


class Offsets:
    """High watermarks of a topic, through one long-lived consumer (cheap to poll)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self._consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": f"bench-probe-{uuid.uuid4().hex}"}
        )
        md = self._consumer.list_topics(topic, timeout=30)
        self.partitions = sorted(md.topics[topic].partitions)

    def ends(self) -> dict[int, int]:
        return {
            p: self._consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)[1]
            for p in self.partitions
        }

    def close(self) -> None:
        self._consumer.close()


def total(offsets: dict[int, int]) -> int:
    return sum(offsets.values())


def commit_at_end(bootstrap: str, group: str, topic_ends: dict[str, dict[int, int]]) -> None:
    """Start a new group at the current end of its input topics (earlier runs' data skipped)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        c.commit(
            offsets=[
                TopicPartition(t, p, o) for t, ends in topic_ends.items() for p, o in ends.items()
            ],
            asynchronous=False,
        )
    finally:
        c.close()


def group_assigned(
    admin: AdminClient, group: str, topic: str, partitions: int, members: int
) -> bool:
    """True when ``group`` is stable with ``members`` members owning all of ``topic``."""
    try:
        desc = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
    except Exception:
        return False
    if str(getattr(desc.state, "name", desc.state)).upper() != "STABLE":
        return False
    if len(desc.members) != members:
        return False
    owned = {
        tp.partition
        for m in desc.members
        if m.assignment is not None
        for tp in m.assignment.topic_partitions
        if tp.topic == topic
    }
    return len(owned) == partitions


def peek_message_id(value: bytes) -> str:
    """The messageId of an EnrichedEvent: its first field is the CustomerEvent, whose
    first two fields are ``type`` and ``messageId`` (Avro strings: zig-zag length + UTF-8)."""
    pos = HEADER.size
    for index in range(2):
        shift = result = 0
        while True:
            byte = value[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        length = (result >> 1) ^ -(result & 1)
        if index == 1:
            return value[pos : pos + length].decode()
        pos += length
    raise AssertionError("unreachable")


@dataclass
class OutputRecord:
    partition: int
    timestamp_ms: int
    message_id: str | None


def read_range(
    bootstrap: str,
    topic: str,
    start: dict[int, int],
    end: dict[int, int],
    *,
    message_ids: bool = False,
    timeout: float = 120.0,
) -> list[OutputRecord]:
    """Every record of ``topic`` in [start, end) per partition: append time (+ messageId)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "fetch.max.bytes": 64 * 1024 * 1024,
        }
    )
    todo = {p: end[p] for p in end if end[p] > start.get(p, 0)}
    c.assign([TopicPartition(topic, p, start.get(p, 0)) for p in todo])
    out: list[OutputRecord] = []
    deadline = time.monotonic() + timeout
    try:
        while todo and time.monotonic() < deadline:
            for msg in c.consume(5000, 0.5):
                if msg.error():
                    continue
                p, offset = msg.partition() or 0, msg.offset() or 0
                if p not in todo or offset >= todo[p]:
                    continue
                value = msg.value()
                mid = peek_message_id(value) if message_ids and value else None
                out.append(OutputRecord(p, msg.timestamp()[1], mid))
                if offset + 1 >= todo[p]:
                    del todo[p]
    finally:
        c.close()
    if todo:
        raise RuntimeError(f"could not read {topic} up to {end} within {timeout} s")
    return out


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def wait_for(
    predicate_total: int,
    offsets: Offsets,
    *,
    timeout: float,
    check: Iterable[ManagedProcess] = (),
    interval: float = 0.25,
) -> tuple[float, dict[int, int]]:
    """Poll until the topic's total end offset reaches ``predicate_total``.

    Returns (monotonic time reached, end offsets). Fails early if a process died.
    """
    deadline = time.monotonic() + timeout
    procs = list(check)
    while True:
        ends = offsets.ends()
        if total(ends) >= predicate_total:
            return time.monotonic(), ends
        for proc in procs:
            proc.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{offsets.topic} reached {total(ends)} records, waited for {predicate_total}"
            )
        time.sleep(interval)
