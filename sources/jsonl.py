"""Backfills from Segment-spec JSON Lines files (exports, replays, hand-written fixtures).

A backfill is usually someone else's export, so bad lines are expected: they
are reported with their line numbers and reason codes and never sent, while
every good line goes through the same validation and producer as live traffic.
The file is streamed, so a multi-gigabyte export needs no more memory than the
records still in flight.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from os import PathLike
from typing import Final

import orjson

from sources.kafka_producer import DeliveryFailed, QueueFull
from sources.publisher import EventPublisher
from streams.events import EventRejected, Reason

__all__ = ["DELIVERY_FAILED", "QUEUE_FULL", "LineProblem", "ProduceReport", "produce_file"]

#: Code for a good line the broker did not take (after the producer's retries).
DELIVERY_FAILED: Final = "DELIVERY_FAILED"
#: Code for a good line dropped because a non-blocking publisher's queue was full.
QUEUE_FULL: Final = "QUEUE_FULL"

#: (line number, reason code, message)
LineProblem = tuple[int, str, str]


@dataclass(slots=True)
class ProduceReport:
    """What happened to each line. ``problems`` lists every line not delivered, in file order."""

    lines: int = 0
    blank: int = 0
    sent: int = 0
    delivered: int = 0
    failed: int = 0
    rejected: int = 0
    pending: int = 0
    problems: list[LineProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.pending == 0


class _Deliveries:
    """Broker outcomes per line, kept only while a line is in flight."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.outstanding = 0
        self.delivered = 0
        self.failures: list[LineProblem] = []

    def watch(self, fut: Future[str], line_no: int) -> None:
        with self.cond:
            self.outstanding += 1
        fut.add_done_callback(self._callback(line_no))

    def _callback(self, line_no: int) -> Callable[[Future[str]], None]:
        def done(f: Future[str]) -> None:
            exc = f.exception()
            with self.cond:
                self.outstanding -= 1
                if exc is None:
                    self.delivered += 1
                else:
                    self.failures.append((line_no, DELIVERY_FAILED, str(exc)))
                if self.outstanding == 0:
                    self.cond.notify_all()

        return done

    def wait(self, timeout: float | None) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.outstanding == 0, timeout)


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text


def produce_file(
    path: str | PathLike[str],
    publisher: EventPublisher,
    *,
    timeout: float | None = 120.0,
) -> ProduceReport:
    """Send every valid line of a JSON Lines file; report the others by line number.

    Waits for the broker's acknowledgement of every sent line (up to ``timeout``
    seconds after the last line; lines still in flight then count as ``pending``).
    """
    report = ProduceReport()
    deliveries = _Deliveries()
    problems = report.problems
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            report.lines += 1
            if not raw.strip():
                report.blank += 1
                continue
            try:
                message = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                report.rejected += 1
                problems.append((line_no, Reason.INVALID_JSON.value, _first_line(str(exc))))
                continue
            if not isinstance(message, dict):
                report.rejected += 1
                problems.append(
                    (
                        line_no,
                        Reason.SCHEMA_INVALID.value,
                        f"line is a JSON {type(message).__name__}, not an object",
                    )
                )
                continue
            try:
                fut = publisher.send(message)
            except EventRejected as exc:
                report.rejected += 1
                problems.append((line_no, exc.reason.value, exc.detail))
                continue
            except QueueFull as exc:
                report.failed += 1
                problems.append((line_no, QUEUE_FULL, str(exc)))
                continue
            except (
                DeliveryFailed
            ) as exc:  # refused synchronously, e.g. larger than the broker takes
                report.failed += 1
                problems.append((line_no, DELIVERY_FAILED, str(exc)))
                continue
            report.sent += 1
            deliveries.watch(fut, line_no)
    deliveries.wait(timeout)
    with deliveries.cond:
        report.delivered = deliveries.delivered
        report.failed += len(deliveries.failures)
        report.pending = deliveries.outstanding
        problems.extend(deliveries.failures)
    problems.sort(key=lambda p: p[0])
    return report
