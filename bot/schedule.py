"""When to ask again. Pure functions of the attempt number, so benchmarks can replay them on a virtual clock."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["ErrorBackoff", "PollSchedule"]


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

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        base = self.base_delay(attempt)
        if not self.jitter:
            return base
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.05, base * (1.0 + spread))


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
