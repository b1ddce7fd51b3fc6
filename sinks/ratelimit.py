"""A token bucket per destination: requests per second with a small burst."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """``rate`` requests per second on average, at most ``burst`` at once.

    The default burst is a tenth of a second's worth, so no one-second window
    sees much more than ``rate`` requests (vendors count per second or minute).
    Waiters are served in arrival order (one lock), so a busy lane cannot starve
    another. ``rate=None`` means unlimited.
    """

    def __init__(self, rate: float | None, burst: float | None = None) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else (rate or 1.0) / 10)
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if self.rate is None:
            return
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self._tokens) / self.rate)
