"""How long to wait before the next attempt, and the destination-wide throttle gate.

Backoff is exponential with "equal jitter" (half fixed, half random): enough
spread that lanes retrying together do not hit the destination in lock-step,
while a retry never comes sooner than half the nominal delay. A vendor's
Retry-After is a floor, not a hint: we never retry before it, and while it runs
no request of the same destination goes out (the gate), like analytics-python
pausing its whole queue.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from sinks.base import DeliveryError, Throttled


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    #: First delay after a transient failure (5xx, timeout, reset).
    base_s: float = 0.5
    #: First delay after a 429 without Retry-After (Mixpanel: "start at 2 s").
    throttle_base_s: float = 2.0
    max_backoff_s: float = 60.0
    #: A request still failing after this long is given up (items dead-lettered as
    #: RETRIES_EXHAUSTED, replayable). 0 = never give up.
    max_elapsed_s: float = 4 * 3600.0

    def delay(self, attempt: int, error: DeliveryError) -> float:
        """Seconds before attempt ``attempt + 1`` (``attempt`` counts failures so far, from 1)."""
        if isinstance(error, Throttled) and error.retry_after_s is not None:
            floor = error.retry_after_s
            return floor + random.uniform(0.0, min(1.0, 0.1 * floor + 0.05))
        base = self.throttle_base_s if isinstance(error, Throttled) else self.base_s
        nominal = min(self.max_backoff_s, base * float(2 ** max(0, attempt - 1)))
        return nominal / 2 + random.uniform(0.0, nominal / 2)

    def exhausted(self, first_failure: float, now: float) -> bool:
        return self.max_elapsed_s > 0 and now - first_failure >= self.max_elapsed_s


class ThrottleGate:
    """Holds every request of one destination until a Retry-After has passed."""

    def __init__(self) -> None:
        self._until = 0.0

    def hold(self, seconds: float) -> None:
        self._until = max(self._until, time.monotonic() + seconds)

    @property
    def remaining(self) -> float:
        return max(0.0, self._until - time.monotonic())

    async def wait(self) -> None:
        # A later hold() may extend the wait while we sleep: check again after waking.
        left = self.remaining
        while left > 0:
            await asyncio.sleep(left)
            left = self.remaining
