"""Keep one project's request rate under its ceiling and pause it when the API says 429.

The API gateway's limits are per account, so every task of a project shares one Throttle: a
429 on one task pauses them all, and the rate ceiling counts all their requests together.

The ceiling is strict: consecutive requests are at least ``1 / max_requests_per_second`` apart,
so any window of length W holds at most ``ceil(W * max_requests_per_second)`` requests (a token
bucket with a burst allowance would let a 1 s window see nearly twice the ceiling).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# 2 ** 63 times any base is far beyond every cap; a longer run of 429s must not overflow a float.
_MAX_EXPONENT = 63


class WaitTooLong(Exception):
    """``acquire`` would have to wait longer than the caller allows.

    Either a pause after a 429 is in force, or the rate ceiling has queued more requests than
    fit in the caller's wait (concurrency too high for ``max_requests_per_second``).
    """

    def __init__(self, wait: float, *, paused: bool, max_requests_per_second: float) -> None:
        if paused:
            why = f"the project is paused for another {wait:.1f}s after HTTP 429"
        else:
            why = (
                f"the request rate ceiling ({max_requests_per_second:g}/s) has no free slot for "
                f"another {wait:.1f}s; raise polling.max_requests_per_second or lower "
                "polling.concurrency"
            )
        super().__init__(why)
        self.wait = wait
        self.paused = paused


class Throttle:
    """Strict request spacing for the ceiling plus a shared pause after throttling answers."""

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
        if not (max_requests_per_second > 0 and math.isfinite(max_requests_per_second)):
            raise ValueError("max_requests_per_second must be a positive number")
        self._spacing = 1.0 / max_requests_per_second
        self._next_slot = -math.inf  # clock time from which the next request may go
        self._paused_until = -math.inf
        self._episode_started = -math.inf  # when the 429 that last raised the backoff came in
        self._consecutive_throttles = 0
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._lock = asyncio.Lock()

    @property
    def paused_until(self) -> float:
        """Clock time before which no request is sent (-inf when no pause was ever set)."""
        return self._paused_until

    @property
    def consecutive_throttles(self) -> int:
        """429 episodes since the last success; the backoff exponent."""
        return self._consecutive_throttles

    def carry_over(self, previous: Throttle) -> None:
        """Keep the pause and backoff of the throttle this one replaces (a reload): a new config
        must not lift a pause that the API asked for, nor restart its backoff."""
        self._paused_until = max(self._paused_until, previous._paused_until)
        self._next_slot = max(self._next_slot, previous._next_slot)
        self._episode_started = previous._episode_started
        self._consecutive_throttles = previous._consecutive_throttles

    async def acquire(self, max_wait: float | None = None) -> float:
        """Wait until a request may be sent; return the clock time of the grant.

        Raises WaitTooLong, without waiting, when the request could not go within ``max_wait``
        seconds of the call (time spent queueing behind other callers counts).
        """
        called = self._clock()
        # The lock makes waiters queue in order, so a burst after a pause is spread out.
        async with self._lock:
            while True:
                now = self._clock()
                ready = max(self._paused_until, self._next_slot)
                if now >= ready:
                    self._next_slot = now + self._spacing
                    return now
                if max_wait is not None and ready - called > max_wait:
                    raise WaitTooLong(
                        ready - now,
                        paused=self._paused_until >= self._next_slot,
                        max_requests_per_second=1.0 / self._spacing,
                    )
                await self._sleep(ready - now)

    def throttled(self, retry_after: float | None, *, sent_at: float | None = None) -> float:
        """Record a 429 and pause the project; return the pause in seconds.

        ``Retry-After`` is honoured when given (up to the cap); otherwise exponential backoff
        with full jitter: a random wait between ``base / 2`` and ``min(cap, base * 2^(n-1))`` for
        the n-th 429 in a row, so that many exporters do not retry in step. A 429 for a request
        granted (``sent_at``) before the previous 429 came in is part of the same episode and
        does not raise the exponent again: 20 requests in flight are one throttling event.
        """
        now = self._clock()
        if sent_at is None or sent_at >= self._episode_started:
            self._consecutive_throttles = min(self._consecutive_throttles + 1, _MAX_EXPONENT)
            self._episode_started = now
        if retry_after is not None and math.isfinite(retry_after) and retry_after >= 0:
            pause = min(retry_after, self._backoff_cap)
        else:
            ceiling = min(
                self._backoff_cap, self._backoff_base * 2 ** (self._consecutive_throttles - 1)
            )
            pause = max(self._backoff_base / 2, self._rng.uniform(0, ceiling))
        self._paused_until = max(self._paused_until, now + pause)
        return pause

    def succeeded(self, *, sent_at: float | None = None) -> None:
        """Reset the backoff after a successful answer.

        A success for a request granted before the latest 429 says nothing about the limit now,
        so it does not reset the backoff.
        """
        if sent_at is not None and sent_at < self._episode_started:
            return
        self._consecutive_throttles = 0
