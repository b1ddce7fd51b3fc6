"""Cutting batches within a destination's limits, and tracking which offsets are done.

Offsets complete out of order (a skipped event is done at once, a dead letter
when the DLQ acknowledged it, a delivered event when the destination did), but
the committed position may only move past an offset once every earlier one is
done: that is what makes a crash at any moment lose nothing.
"""

from __future__ import annotations

from collections import deque

from sinks.base import MappedEvent, SinkLimits


class OffsetTracker:
    """Contiguous done offsets of one partition; ``position`` is what to commit."""

    __slots__ = ("_done", "_next", "_pending")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self._done: set[int] = set()
        self._next: int | None = None

    def add(self, offset: int) -> None:
        """Offsets are added in the order the partition delivers them (increasing)."""
        self._pending.append(offset)
        self._next = offset + 1

    def done(self, offset: int) -> None:
        if self._pending and offset == self._pending[0]:
            self._pending.popleft()
            while self._pending and self._pending[0] in self._done:
                self._done.discard(self._pending.popleft())
        else:
            self._done.add(offset)

    @property
    def in_flight(self) -> int:
        return len(self._pending) - len(self._done)

    def position(self) -> int | None:
        """The next offset to consume after a restart, or None before anything was seen."""
        if self._pending:
            return self._pending[0]
        return self._next


def take_batch(buffer: deque[MappedEvent], limits: SinkLimits) -> list[MappedEvent]:
    """Pop the longest prefix of ``buffer`` within the count and byte limits (at least one)."""
    batch: list[MappedEvent] = []
    used = 0
    max_events = limits.max_batch_events
    max_bytes = limits.max_batch_bytes
    while buffer and len(batch) < max_events:
        cost = buffer[0].size + 1
        if batch and used + cost > max_bytes:
            break
        batch.append(buffer.popleft())
        used += cost
    return batch


def split_by_limits(items: list[MappedEvent], limits: SinkLimits) -> list[list[MappedEvent]]:
    """Cut a list of items into batches within the limits, keeping the order."""
    buffer = deque(items)
    out: list[list[MappedEvent]] = []
    while buffer:
        out.append(take_batch(buffer, limits))
    return out
