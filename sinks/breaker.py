"""A circuit breaker per destination.

Closed: requests flow. After ``failure_threshold`` consecutive failed requests
(5xx, timeouts, connection errors — not 429s, which backoff and Retry-After handle) it
opens: nobody sends, and the engine pauses the destination's Kafka consumer so
no new events pile up behind a dead endpoint (the alternative, every lane
burning retries against it, only adds load to a struggling vendor). After the
cool-down one request is let through (half-open); success closes the circuit and
consumption resumes, failure re-opens it with a doubled cool-down (capped).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from enum import IntEnum


class BreakerState(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 5,
        cooldown_s: float = 5.0,
        max_cooldown_s: float = 60.0,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.failure_threshold = max(1, failure_threshold)
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max(cooldown_s, max_cooldown_s)
        self.on_change = on_change
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.opened = 0  # times opened, for logs and tests
        self._cooldown_s = cooldown_s
        self._open_until = 0.0
        self._probe_out = False
        self._changed: asyncio.Event | None = None

    # -- transitions

    def _set(self, state: BreakerState) -> None:
        if state == self.state:
            return
        self.state = state
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        if self.on_change is not None:
            self.on_change(state)

    def _open(self) -> None:
        self._open_until = time.monotonic() + self._cooldown_s
        self._probe_out = False
        self.opened += 1
        self._set(BreakerState.OPEN)

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self._probe_out = False
        self._cooldown_s = self.base_cooldown_s
        self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        if self.state == BreakerState.HALF_OPEN:
            self._cooldown_s = min(self.max_cooldown_s, self._cooldown_s * 2)
            self._open()
        elif (
            self.state == BreakerState.CLOSED
            and self.consecutive_failures >= self.failure_threshold
        ):
            self._open()

    def release_probe(self) -> None:
        """The probe ended without a verdict (cancelled): let another caller probe."""
        if self.state == BreakerState.HALF_OPEN and self._probe_out:
            self._probe_out = False
            if self._changed is not None:
                self._changed.set()
                self._changed = None

    @property
    def open_remaining(self) -> float:
        if self.state != BreakerState.OPEN:
            return 0.0
        return max(0.0, self._open_until - time.monotonic())

    # -- gate

    async def acquire(self) -> bool:
        """Wait until a request may go out; True when this caller is the half-open probe."""
        while True:
            if self.state == BreakerState.CLOSED:
                return False
            if self.state == BreakerState.OPEN:
                left = self._open_until - time.monotonic()
                if left > 0:
                    await self._wait_change(left)
                    continue
                self._probe_out = False
                self._set(BreakerState.HALF_OPEN)
            if not self._probe_out:
                self._probe_out = True
                return True
            await self._wait_change(None)

    async def _wait_change(self, at_most: float | None) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(at_most):
                await self._changed.wait()
