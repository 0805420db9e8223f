"""When to ask again. Pure functions of the attempt number, so benchmarks can replay them on a virtual clock."""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["POLL_PRICE", "AdaptiveSchedule", "ErrorBackoff", "PollSchedule", "Schedule"]

POLL_PRICE = 0.2
"""Seconds of mean detection latency one more poll per task must save to be worth making.

At 0.2 s a finished task is seen about 1 s after it finishes on average (little next to a generation
that takes seconds), with about half the polls of a 1 s fixed interval; every follow shares one API
key and its rate limit, so a poll saved is capacity for someone else's follow. See BENCHMARKS.md.
"""


class Schedule(Protocol):
    def delay(self, attempt: int, elapsed: float, rng: random.Random | None = None) -> float:
        """Gap after poll ``attempt`` (0 = the first), which was sent ``elapsed`` s after the first poll."""
        ...

    def observe(self, ready_at: float, pending_at: float | None = None) -> None:
        """A task was seen Ready at ``ready_at`` s after its first poll, still running at ``pending_at``."""
        ...


@dataclass(frozen=True, slots=True)
class PollSchedule:
    """Gaps between polls of a task that is still running: short at first, growing to a ceiling.

    Most Flux tasks finish in seconds, so early polls are cheap wins; a task still running after
    half a minute is in the long tail, where a few seconds more of latency cost little and each
    poll saved is spread over many tasks. Jitter keeps many follows started together from
    polling in lock step.
    """

    initial: float = 1.0
    factor: float = 1.25
    ceiling: float = 5.0
    jitter: float = 0.1

    def base_delay(self, attempt: int) -> float:
        """Gap after poll number ``attempt`` (0 = the first poll), before jitter."""
        if attempt < 0:
            raise ValueError("attempt must be >= 0")
        # min() before the power would be wrong for factor < 1; guard the exponent from overflow instead.
        return min(self.ceiling, self.initial * self.factor ** min(attempt, 64))

    def delay(self, attempt: int, elapsed: float = 0.0, rng: random.Random | None = None) -> float:
        base = self.base_delay(attempt)
        if not self.jitter:
            return base
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.05, base * (1.0 + spread))

    def observe(self, ready_at: float, pending_at: float | None = None) -> None:
        """A fixed schedule learns nothing."""


@dataclass(frozen=True, slots=True)
class ErrorBackoff:
    """Gaps after consecutive failed requests (timeouts, 5xx, bad bodies): exponential, capped."""

    initial: float = 1.0
    factor: float = 2.0
    ceiling: float = 30.0
    jitter: float = 0.2

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        if failures < 1:
            raise ValueError("failures must be >= 1")
        base = min(self.ceiling, self.initial * self.factor ** min(failures - 1, 32))
        spread = (rng or random).uniform(-self.jitter, self.jitter) if self.jitter else 0.0
        return max(0.05, base * (1.0 + spread))


class AdaptiveSchedule:
    """Gaps placed from the readiness times of recent tasks, in the spirit of an optimal inspection schedule.

    For a known distribution F of readiness times and a price λ per poll (:data:`POLL_PRICE`), the gap from time t
    is chosen so that the latency it is expected to add, for a task still running at t, equals λ:

        ∫ₜ^{t+g} (F(u) − F(t)) du / (1 − F(t)) = λ

    which makes gaps ≈ √(2λ / hazard(t)): long while few tasks finish (just after the poll at t = 0, and in
    the long tail), short where many do. For the benchmark's distribution, a local search that moved each poll
    of that plan (done while writing this benchmark) lowered the cost by less than 1 %.

    F is estimated from the last ``window`` tasks. The bot cannot see when a task became Ready, only that it
    was still running at one poll and Ready at the next: :meth:`observe` takes both times, and each task's
    weight is spread evenly over that interval (an estimate that errs towards polling early, so it keeps
    looking where it has not looked yet). Until ``min_observations`` tasks have been seen it behaves as
    ``fallback``. :meth:`delay` takes the elapsed time since the first poll rather than trusting the attempt
    number, so slow requests and retries do not shift the plan. Pure: no clock, no I/O.
    """

    def __init__(
        self,
        *,
        price: float = POLL_PRICE,
        window: int = 1000,
        refit_every: int = 100,
        min_observations: int = 200,
        min_gap: float = 0.5,
        max_gap: float = 10.0,
        resolution: float = 0.1,
        horizon: float = 180.0,
        min_tail: int = 20,
        jitter: float | None = None,
        fallback: PollSchedule | None = None,
    ) -> None:
        if not 0 < min_gap <= max_gap:
            raise ValueError("need 0 < min_gap <= max_gap")
        self.price = price
        self.refit_every = refit_every
        self.min_observations = min_observations
        self.min_gap = min_gap
        self.max_gap = max_gap
        self.resolution = resolution
        self.horizon = horizon
        self.min_tail = min_tail
        self.fallback = fallback or PollSchedule()
        self.jitter = self.fallback.jitter if jitter is None else jitter
        self._observations: deque[tuple[float, float]] = deque(maxlen=window)
        self._since_fit = 0
        self._plan: list[float] | None = None

    @property
    def plan(self) -> tuple[float, ...] | None:
        """Current poll times (jitter-free), or None while the fallback is in use."""
        return tuple(self._plan) if self._plan is not None else None

    @property
    def observations(self) -> int:
        return len(self._observations)

    def observe(self, ready_at: float, pending_at: float | None = None) -> None:
        """A followed task was seen Ready at ``ready_at`` s after its first poll, still running at ``pending_at``.

        ``pending_at=None``: the first poll already saw it Ready. ``pending_at == ready_at``: the exact time.
        """
        if pending_at is None:
            self._observations.append((0.0, 0.0))
        else:
            if not 0 <= pending_at <= ready_at:
                raise ValueError("need 0 <= pending_at <= ready_at")
            self._observations.append((pending_at, ready_at))
        self._since_fit += 1
        if self._since_fit >= self.refit_every and len(self._observations) >= self.min_observations:
            self.refit()

    def refit(self) -> None:
        """Rebuild the plan from the observations now held."""
        self._since_fit = 0
        if not self._observations:
            self._plan = None
            return
        cdf = _EmpiricalCdf(self._observations, self.resolution, self.horizon)
        plan = [0.0]
        now, gap = 0.0, self.min_gap
        while now < self.horizon:
            below = cdf.value(now)
            if (1.0 - below) * cdf.count < self.min_tail:
                gap = min(self.max_gap, gap * 1.5)  # too few tasks ran this long to say more: back off
            else:
                gap = self._gap(cdf, now, below)
            now += gap
            plan.append(now)
        self._plan = plan

    def _gap(self, cdf: _EmpiricalCdf, now: float, below: float) -> float:
        start, running = cdf.integral(now), 1.0 - below

        def added_latency(gap: float) -> float:
            return (cdf.integral(now + gap) - start - gap * below) / running

        low, high = self.min_gap, self.max_gap
        if added_latency(high) <= self.price:
            return high
        if added_latency(low) >= self.price:
            return low
        for _ in range(24):
            middle = (low + high) / 2
            if added_latency(middle) < self.price:
                low = middle
            else:
                high = middle
        return (low + high) / 2

    def base_delay(self, attempt: int, elapsed: float) -> float:
        plan = self._plan
        if plan is None:
            return self.fallback.base_delay(attempt)
        index = bisect.bisect_right(plan, max(0.0, elapsed)) - 1
        if index >= len(plan) - 2:
            return plan[-1] - plan[-2]
        here = plan[index + 1] - plan[index]
        after = plan[index + 2] - plan[index + 1]
        # Off the plan (a slow request, a retry): blend the two nearest planned gaps, keeping the planned spacing.
        return here + (after - here) * (elapsed - plan[index]) / here

    def delay(self, attempt: int, elapsed: float, rng: random.Random | None = None) -> float:
        """Gap after poll ``attempt``, sent ``elapsed`` s after the first poll of the task."""
        base = self.base_delay(attempt, elapsed)
        if not self.jitter:
            return base
        return max(0.05, base * (1.0 + (rng or random).uniform(-self.jitter, self.jitter)))


class _EmpiricalCdf:
    """F on a grid, each observation's weight spread evenly over its interval; linear between grid points."""

    __slots__ = ("count", "integrals", "resolution", "values")

    def __init__(self, observations: Iterable[tuple[float, float]], resolution: float, horizon: float) -> None:
        cells = max(1, math.ceil(horizon / resolution))
        steps = [0.0] * (cells + 1)
        at_zero = 0
        count = 0
        for low, high in observations:
            count += 1
            if high <= 0:
                at_zero += 1
                continue
            first = min(int(low / resolution), cells - 1)
            end = min(max(math.ceil(high / resolution), first + 1), cells)
            share = 1.0 / (end - first)
            steps[first] += share
            steps[end] -= share
        self.count = count
        self.resolution = resolution
        values = [at_zero / count]
        density = 0.0
        for cell in range(cells):
            density += steps[cell]
            values.append(values[-1] + density / count)
        integrals = [0.0]
        for cell in range(cells):
            integrals.append(integrals[-1] + resolution * (values[cell] + values[cell + 1]) / 2)
        self.values = values
        self.integrals = integrals

    def value(self, at: float) -> float:
        position = at / self.resolution
        cell = int(position)
        if cell >= len(self.values) - 1:
            return 1.0
        return self.values[cell] + (self.values[cell + 1] - self.values[cell]) * (position - cell)

    def integral(self, at: float) -> float:
        """∫₀^at F(u) du."""
        cell = int(at / self.resolution)
        if cell >= len(self.values) - 1:
            return self.integrals[-1] + (at - (len(self.values) - 1) * self.resolution)
        offset = at - cell * self.resolution
        return self.integrals[cell] + offset * (self.values[cell] + self.value(at)) / 2
