"""bot/schedule.py: poll gaps and error backoff are bounded, growing, positive and reproducible."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.schedule import ErrorBackoff, PollSchedule

_FLOOR = 0.05  # neither schedule ever answers less than this once jitter is on


def test_poll_schedule_defaults_grow_to_the_ceiling() -> None:
    schedule = PollSchedule()
    bases = [schedule.base_delay(n) for n in range(40)]
    assert bases[0] == schedule.initial == 1.0
    assert bases[1] == pytest.approx(1.25)
    assert bases == sorted(bases)
    assert bases[-1] == schedule.ceiling == 5.0
    first_at_ceiling = bases.index(schedule.ceiling)
    assert 5 <= first_at_ceiling <= 10  # a few quick polls, then the long tail
    assert all(b == schedule.ceiling for b in bases[first_at_ceiling:])


def test_poll_schedule_huge_attempt_does_not_overflow() -> None:
    assert PollSchedule().base_delay(10**9) == 5.0
    assert PollSchedule(factor=3.0).delay(10**6, rng=random.Random(1)) <= 5.0 * 1.1


def test_poll_schedule_rejects_negative_attempts() -> None:
    with pytest.raises(ValueError):
        PollSchedule().base_delay(-1)
    with pytest.raises(ValueError):
        PollSchedule().delay(-1)


def test_poll_schedule_without_jitter_is_exact() -> None:
    schedule = PollSchedule(initial=0.5, factor=2.0, ceiling=3.0, jitter=0.0)
    assert [schedule.delay(n) for n in range(4)] == [0.5, 1.0, 2.0, 3.0]


def test_poll_jitter_spreads_the_loops() -> None:
    schedule = PollSchedule()
    rng = random.Random(3)
    delays = {schedule.delay(0, rng=rng) for _ in range(200)}
    assert len(delays) > 100  # not in lock step
    assert min(delays) < 0.95 and max(delays) > 1.05


@given(
    initial=st.floats(0.01, 10.0),
    factor=st.floats(1.0, 4.0),
    ceiling=st.floats(0.01, 60.0),
    jitter=st.floats(0.0, 0.9),
    attempt=st.integers(0, 10_000),
    seed=st.integers(0, 2**32),
)
def test_poll_delay_bounds(initial: float, factor: float, ceiling: float, jitter: float, attempt: int,
                           seed: int) -> None:
    schedule = PollSchedule(initial=initial, factor=factor, ceiling=ceiling, jitter=jitter)
    base = schedule.base_delay(attempt)
    assert 0 < base <= ceiling
    assert base <= schedule.base_delay(attempt + 1)  # never shrinks
    delay = schedule.delay(attempt, rng=random.Random(seed))
    assert delay > 0
    if jitter:
        assert max(_FLOOR, base * (1 - jitter)) - 1e-9 <= delay <= max(_FLOOR, base * (1 + jitter)) + 1e-9
    else:
        assert delay == base


def test_poll_seeded_rng_is_reproducible() -> None:
    schedule = PollSchedule()
    first = [schedule.delay(n, rng=random.Random(99)) for n in range(30)]
    second = [schedule.delay(n, rng=random.Random(99)) for n in range(30)]
    assert first == second
    rng_a, rng_b = random.Random(5), random.Random(5)
    assert [schedule.delay(n, rng=rng_a) for n in range(30)] == [schedule.delay(n, rng=rng_b) for n in range(30)]
    assert [schedule.delay(n, rng=random.Random(6)) for n in range(30)] != first


def test_poll_schedule_is_immutable() -> None:
    schedule = PollSchedule()
    with pytest.raises(AttributeError):
        schedule.initial = 2.0  # type: ignore[misc]


def test_error_backoff_defaults_double_to_the_ceiling() -> None:
    backoff = ErrorBackoff(jitter=0.0)
    assert [backoff.delay(n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff.delay(10**9) == 30.0


def test_error_backoff_rejects_zero_failures() -> None:
    with pytest.raises(ValueError):
        ErrorBackoff().delay(0)
    with pytest.raises(ValueError):
        ErrorBackoff().delay(-3, random.Random(1))


@given(
    initial=st.floats(0.001, 10.0),
    factor=st.floats(1.0, 4.0),
    ceiling=st.floats(0.001, 120.0),
    jitter=st.floats(0.0, 0.9),
    failures=st.integers(1, 10_000),
    seed=st.integers(0, 2**32),
)
def test_error_backoff_bounds(initial: float, factor: float, ceiling: float, jitter: float, failures: int,
                              seed: int) -> None:
    backoff = ErrorBackoff(initial=initial, factor=factor, ceiling=ceiling, jitter=jitter)
    base = min(ceiling, initial * factor ** min(failures - 1, 32))
    delay = backoff.delay(failures, random.Random(seed))
    assert delay >= _FLOOR
    assert delay <= max(_FLOOR, base * (1 + jitter)) + 1e-9
    assert delay >= max(_FLOOR, base * (1 - jitter)) - 1e-9
    assert delay <= max(_FLOOR, ceiling * (1 + jitter)) + 1e-9


def test_error_backoff_grows() -> None:
    backoff = ErrorBackoff(jitter=0.0)
    delays = [backoff.delay(n) for n in range(1, 20)]
    assert delays == sorted(delays)
    assert delays[0] < delays[-1]


def test_error_backoff_seeded_rng_is_reproducible() -> None:
    backoff = ErrorBackoff()
    first = [backoff.delay(n, random.Random(11)) for n in range(1, 20)]
    assert first == [backoff.delay(n, random.Random(11)) for n in range(1, 20)]
    assert len(set(first)) > 5


def test_error_backoff_jitter_stays_within_twenty_percent() -> None:
    backoff = ErrorBackoff()
    rng = random.Random(0)
    for failures in range(1, 10):
        base = min(30.0, 2.0 ** (failures - 1))
        for _ in range(50):
            assert 0.8 * base - 1e-9 <= backoff.delay(failures, rng) <= 1.2 * base + 1e-9
