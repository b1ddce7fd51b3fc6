"""A confluent-kafka producer that reports every delivery, for sync and asyncio callers.

librdkafka acknowledges asynchronously through ``poll()``; a background thread
polls so callers get a future per message and can answer an HTTP client, or
commit a checkpoint, only once the broker has the record (acks=all).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from streams.settings import Settings


class DeliveryFailed(Exception):
    """The broker did not take the record (after librdkafka's own retries)."""

    def __init__(self, error: KafkaError | str) -> None:
        super().__init__(str(error))
        self.error = error
        self.retriable = bool(isinstance(error, KafkaError) and error.retriable())


class QueueFull(Exception):
    """The local send queue is full and the caller asked not to block."""


Headers = list[tuple[str, str | bytes | None]]


class ReliableProducer:
    """Idempotent, acks=all producer with per-message delivery futures."""

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        self._producer = Producer(settings.reliable_producer_config(**overrides))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name="kafka-poll", daemon=True)
        self._thread.start()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    def produce(
        self,
        topic: str,
        value: bytes,
        key: str | bytes | None = None,
        headers: Headers | None = None,
        *,
        block: bool = True,
        timeout: float | None = 30.0,
    ) -> Future[Message]:
        """Queue one record; the future resolves when the broker acknowledged it.

        With ``block`` a full local queue waits (up to ``timeout``) instead of
        dropping; without it, QueueFull is raised at once.
        """
        fut: Future[Message] = Future()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                fut.set_exception(DeliveryFailed(err))
            else:
                fut.set_result(msg)

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=on_delivery
                )
                return fut
            except BufferError:
                if not block:
                    raise QueueFull("local producer queue is full") from None
                if deadline is not None and time.monotonic() > deadline:
                    raise QueueFull(f"local producer queue still full after {timeout} s") from None
                time.sleep(0.01)
            except KafkaException as exc:
                raise DeliveryFailed(exc.args[0] if exc.args else str(exc)) from exc

    async def produce_async(
        self,
        topic: str,
        value: bytes,
        key: str | bytes | None = None,
        headers: Headers | None = None,
    ) -> Message:
        return await asyncio.wrap_future(self.produce(topic, value, key, headers, block=False))

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for outstanding deliveries; return how many are still undelivered."""
        return int(self._producer.flush(timeout))

    def __len__(self) -> int:
        return len(self._producer)

    def close(self, timeout: float = 30.0) -> int:
        remaining = self.flush(timeout)
        self._stop.set()
        self._thread.join(timeout=5)
        return remaining

    def __enter__(self) -> ReliableProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


OutRecord = tuple[str, bytes | None, bytes | str | None, Headers | None]


class BatchSender:
    """Produce a batch through librdkafka and await the broker's acks for all of it at once.

    Stream agents use it instead of Faust's per-message send path (which costs
    far more per record than librdkafka). One asyncio wake-up per batch, not per
    record; records the broker refused after librdkafka's own retries are
    produced again with backoff, so a broker outage stalls the batch (and its
    offset commit) instead of losing it.
    """

    def __init__(self, producer: ReliableProducer, max_backoff: float = 30.0) -> None:
        self._producer = producer._producer
        self._max_backoff = max_backoff

    async def send(self, records: list[OutRecord]) -> None:
        backoff = 0.5
        while records:
            records = await self._send_once(records)
            if records:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)

    async def _send_once(self, records: list[OutRecord]) -> list[OutRecord]:
        delivery = _BatchDelivery(asyncio.get_running_loop())
        on_delivery = delivery.on_delivery
        produce = self._producer.produce
        for index, (topic, value, key, headers) in enumerate(records):
            while True:
                try:
                    # The index identifies a refused record: delivery reports carry no headers.
                    produce(
                        topic, value, key, headers=headers, on_delivery=partial(on_delivery, index)
                    )
                    break
                except BufferError:
                    await asyncio.sleep(0.01)  # local queue full: let the poll thread drain it
        delivery.expect(len(records))
        await delivery.future
        return [records[i] for i in sorted(delivery.failed)]


class _BatchDelivery:
    """Delivery accounting for one batch: a counter and one wake-up, no lock.

    Only librdkafka's poll thread runs ``on_delivery`` (so only it writes
    ``delivered`` and ``failed``); the event loop sets ``expected`` once every
    record is queued. Each side writes its own field and then compares both, so
    whichever of them sees the batch complete last resolves the future (both
    may: resolving is idempotent).
    """

    __slots__ = ("delivered", "expected", "failed", "future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.failed: list[int] = []
        self.delivered = 0
        self.expected = -1  # unknown until every record is queued

    def on_delivery(self, index: int, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:  # produced again by BatchSender.send, with backoff
            self.failed.append(index)
        self.delivered += 1
        if self.delivered == self.expected:
            self.loop.call_soon_threadsafe(self._finish)

    def expect(self, count: int) -> None:
        self.expected = count
        if self.delivered == count:
            self._finish()

    def _finish(self) -> None:
        if not self.future.done():
            self.future.set_result(None)
