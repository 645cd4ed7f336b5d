"""The project throttle on an injected clock: ceiling, Retry-After, jittered backoff, reset."""

from __future__ import annotations

import asyncio
import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.throttle import Throttle, WaitTooLong


class FakeTime:
    """A clock that only moves when someone sleeps on it; records every sleep."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


class EdgeRandom(random.Random):
    """uniform() returns the upper (or lower) end of its range, to pin the jitter bounds."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


def make(time: FakeTime, rate: float = 10.0, **kwargs: object) -> Throttle:
    return Throttle(rate, clock=time.clock, sleep=time.sleep, **kwargs)  # type: ignore[arg-type]


def max_in_window(times: list[float], window: float) -> int:
    """The most grants in any half-open window [t, t + window)."""
    ordered = sorted(times)
    return max(
        sum(1 for other in ordered if start <= other < start + window - 1e-9) for start in ordered
    )


async def test_first_request_goes_at_once() -> None:
    """An idle throttle grants immediately and returns the grant time."""
    time = FakeTime()
    assert await make(time).acquire() == 1000.0
    assert time.sleeps == []


async def test_ceiling_spaces_concurrent_requests() -> None:
    """25 tasks asking at once are granted 0.1 s apart at 10/s: no 1 s window holds more than 10."""
    time = FakeTime()
    throttle = make(time, rate=10.0)
    grants = await asyncio.gather(*(throttle.acquire() for _ in range(25)))
    gaps = [b - a for a, b in itertools.pairwise(grants)]
    assert all(gap == pytest.approx(0.1) for gap in gaps)
    assert max_in_window(grants, 1.0) == 10
    assert grants[-1] - grants[0] == pytest.approx(2.4)


async def test_fractional_ceiling() -> None:
    """A ceiling below 1/s spaces requests by more than a second (0.5/s: 2 s apart)."""
    time = FakeTime()
    throttle = make(time, rate=0.5)
    grants = [await throttle.acquire() for _ in range(4)]
    assert grants == [1000.0, 1002.0, 1004.0, 1006.0]


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=0.2, max_value=50.0),
    arrivals=st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=40),
    window=st.floats(min_value=0.1, max_value=10.0),
)
def test_property_ceiling_never_exceeded(rate: float, arrivals: list[float], window: float) -> None:
    """For any arrival pattern, any window of length W holds at most ceil(W * rate) grants."""

    async def scenario() -> list[float]:
        time = FakeTime(0.0)
        throttle = make(time, rate=rate)
        grants: list[float] = []
        for arrival in sorted(arrivals):
            time.now = max(time.now, arrival)
            grants.append(await throttle.acquire())
        return grants

    grants = asyncio.run(scenario())
    assert max_in_window(grants, window) <= math.ceil(window * rate - 1e-9)


async def test_retry_after_pauses_every_caller() -> None:
    """After a 429 with Retry-After: 2, no grant comes before 2 s have passed, for any caller."""
    time = FakeTime()
    throttle = make(time)
    sent = await throttle.acquire()
    assert throttle.throttled(2.0, sent_at=sent) == 2.0
    grants = await asyncio.gather(*(throttle.acquire() for _ in range(5)))
    assert min(grants) == pytest.approx(1002.0)
    assert throttle.paused_until == pytest.approx(1002.0)


async def test_retry_after_is_capped() -> None:
    """A huge Retry-After is held to the backoff cap."""
    time = FakeTime()
    throttle = make(time, backoff_cap=300.0)
    assert throttle.throttled(86400.0) == 300.0
    assert await throttle.acquire() == pytest.approx(1300.0)


@pytest.mark.parametrize("retry_after", [None, float("nan"), float("inf"), -3.0])
async def test_unusable_retry_after_falls_back_to_backoff(retry_after: float | None) -> None:
    """A missing or nonsensical Retry-After gives the jittered backoff of the first 429 (1-2 s)."""
    time = FakeTime()
    pause = make(time, rng=random.Random(7)).throttled(retry_after)
    assert 1.0 <= pause <= 2.0


@pytest.mark.parametrize("high", [True, False])
def test_backoff_doubles_with_full_jitter_up_to_cap(high: bool) -> None:
    """Without Retry-After the n-th 429 in a row waits between 1 s and min(300, 2 * 2^(n-1)) s."""
    time = FakeTime()
    throttle = make(time, rng=EdgeRandom(high))
    pauses = []
    for _ in range(10):
        pauses.append(throttle.throttled(None))
        time.now += 1000  # each 429 its own episode
    if high:
        assert pauses == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    else:
        assert pauses == [1.0] * 10  # floor of base / 2: never a tight retry


def test_backoff_resets_after_success() -> None:
    """A success sets the exponent back to zero: the next 429 waits at most base (2 s)."""
    time = FakeTime()
    throttle = make(time, rng=EdgeRandom(high=True))
    for _ in range(4):
        throttle.throttled(None)
        time.now += 1000
    assert throttle.consecutive_throttles == 4
    throttle.succeeded(sent_at=time.now)
    assert throttle.consecutive_throttles == 0
    assert throttle.throttled(None) == 2.0


def test_stale_success_does_not_reset() -> None:
    """A 200 for a request granted before the latest 429 says nothing about now: no reset."""
    time = FakeTime()
    throttle = make(time, rng=EdgeRandom(high=True))
    early = time.now
    time.now += 0.5
    throttle.throttled(None)
    throttle.succeeded(sent_at=early)
    assert throttle.consecutive_throttles == 1


def test_requests_in_flight_at_a_429_are_one_episode() -> None:
    """20 answers of 429 for requests sent before the first came back raise the backoff once."""
    time = FakeTime()
    throttle = make(time, rng=EdgeRandom(high=True))
    sent = [time.now + i * 0.1 for i in range(20)]
    time.now += 2.0
    for at in sent:
        throttle.throttled(None, sent_at=at)
    assert throttle.consecutive_throttles == 1
    assert throttle.paused_until == pytest.approx(time.now + 2.0)
    later = time.now + 5.0
    time.now = later + 0.01
    assert throttle.throttled(None, sent_at=later) == 4.0


def test_long_run_of_429s_does_not_overflow() -> None:
    """Thousands of 429s in a row (hours of throttling) stay at the cap, no OverflowError."""
    time = FakeTime()
    throttle = make(time, rng=EdgeRandom(high=True))
    for _ in range(3000):
        pause = throttle.throttled(None)
        time.now += 1000
    assert pause == 300.0


async def test_max_wait_fails_fast_during_a_long_pause() -> None:
    """A caller that may wait 10 s is told at once (no sleep) when the pause lasts 60 s."""
    time = FakeTime()
    throttle = make(time)
    throttle.throttled(60.0)
    with pytest.raises(WaitTooLong) as caught:
        await throttle.acquire(max_wait=10.0)
    assert caught.value.wait == pytest.approx(60.0)
    assert "60.0s" in str(caught.value)
    assert caught.value.paused and "after HTTP 429" in str(caught.value)
    assert time.sleeps == []


async def test_max_wait_behind_the_rate_ceiling_says_so() -> None:
    """A caller that the ceiling alone would keep waiting too long is told it is the ceiling, not
    a 429 (no 429 came), with the settings that fix it."""
    time = FakeTime()
    throttle = make(time, rate=1.0)
    for _ in range(3):
        await throttle.acquire()  # 1 s apart; the next free slot is 1 s away
    time.sleeps.clear()
    with pytest.raises(WaitTooLong) as caught:
        await throttle.acquire(max_wait=0.5)
    assert not caught.value.paused
    message = str(caught.value)
    assert "429" not in message
    assert "rate ceiling (1/s)" in message and "max_requests_per_second" in message
    assert time.sleeps == []


async def test_max_wait_waits_out_a_short_pause() -> None:
    """A pause shorter than max_wait is waited out."""
    time = FakeTime()
    throttle = make(time)
    throttle.throttled(2.0)
    assert await throttle.acquire(max_wait=10.0) == pytest.approx(1002.0)


async def test_grants_are_in_arrival_order() -> None:
    """Waiters are served first come, first served."""
    time = FakeTime()
    throttle = make(time, rate=1.0)
    order: list[int] = []

    async def ask(number: int) -> None:
        await throttle.acquire()
        order.append(number)

    await asyncio.gather(*(ask(n) for n in range(6)))
    assert order == list(range(6))


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan"), float("inf")])
def test_rate_must_be_positive(rate: float) -> None:
    """A ceiling that cannot space requests is refused up front."""
    with pytest.raises(ValueError, match="positive"):
        Throttle(rate)
