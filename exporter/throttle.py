"""Keep one project's request rate under its ceiling and pause it when the API says 429.

The API gateway's limits are per account, so every task of a project shares one Throttle: a
429 on one task pauses them all, and the rate ceiling counts all their requests together.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class Throttle:
    """A token bucket for the request ceiling plus a shared pause after throttling answers."""

    def __init__(
        self,
        max_requests_per_second: float,
        *,
        backoff_base: float = 2.0,
        backoff_cap: float = 300.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._rate = max_requests_per_second
        self._burst = max(1.0, max_requests_per_second)
        self._tokens = self._burst
        self._refilled_at = clock()
        self._paused_until = 0.0
        self._consecutive_throttles = 0
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._lock = asyncio.Lock()

    @property
    def paused_until(self) -> float:
        """Clock time before which no request is sent."""
        return self._paused_until

    async def acquire(self) -> None:
        """Wait until a request may be sent: no pause in force and a token in the bucket."""
        # The lock makes waiters queue in order, so a burst after a pause is spread by the bucket.
        async with self._lock:
            while True:
                now = self._clock()
                if now < self._paused_until:
                    await self._sleep(self._paused_until - now)
                    continue
                self._tokens = min(
                    self._burst, self._tokens + (now - self._refilled_at) * self._rate
                )
                self._refilled_at = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await self._sleep((1.0 - self._tokens) / self._rate)

    def throttled(self, retry_after: float | None) -> float:
        """Record a 429 and pause the project; return the pause in seconds.

        ``Retry-After`` is honoured when given; otherwise exponential backoff with full jitter
        (a random wait up to base * 2^n, capped), so that many exporters do not retry in step.
        """
        self._consecutive_throttles += 1
        if retry_after is not None and retry_after >= 0:
            pause = min(retry_after, self._backoff_cap)
        else:
            ceiling = min(
                self._backoff_cap, self._backoff_base * 2 ** (self._consecutive_throttles - 1)
            )
            pause = max(self._backoff_base / 2, self._rng.uniform(0, ceiling))
        self._paused_until = max(self._paused_until, self._clock() + pause)
        return pause

    def succeeded(self) -> None:
        """Reset the backoff after a successful answer."""
        self._consecutive_throttles = 0
