"""The adaptive poll schedule: falls back until it has seen enough tasks, then plans from what it saw."""

from __future__ import annotations

import asyncio
import itertools
import random

import aiohttp

from bot.cometapi import CometAPIClient
from bot.images import ImageFetcher
from bot.schedule import AdaptiveSchedule, PollSchedule
from bot.secret import Secret
from bot.tracking import EndReason, Outcome, Tracker
from tests.fakes.comet import Answer, FakeCometAPI, tiny_png


def test_falls_back_until_enough_tasks_were_seen() -> None:
    fallback = PollSchedule(initial=1.0, factor=1.25, ceiling=5.0, jitter=0.0)
    schedule = AdaptiveSchedule(fallback=fallback, min_observations=50, refit_every=10, jitter=0.0)
    assert [schedule.delay(n, 0.0) for n in range(3)] == [fallback.base_delay(n) for n in range(3)]
    for _ in range(49):
        schedule.observe(10.0, 9.0)
    assert schedule.plan is None


def test_plans_densely_where_tasks_become_ready() -> None:
    schedule = AdaptiveSchedule(min_observations=100, refit_every=100, jitter=0.0)
    rng = random.Random(1)
    for _ in range(1000):
        ready = rng.uniform(9.0, 11.0)
        schedule.observe(ready, ready - 0.05)
    plan = schedule.plan
    assert plan is not None and plan[0] == 0.0
    gaps_near_ready = [b - a for a, b in itertools.pairwise(plan) if 8.0 <= a <= 11.0]
    first_gap = plan[1] - plan[0]
    # Nothing finishes in the first seconds: poll rarely there, often around 10 s.
    assert first_gap > max(gaps_near_ready)
    assert all(schedule.delay(n, plan[n]) > 0 for n in range(len(plan) - 1))


def test_delay_follows_elapsed_time_not_attempts() -> None:
    schedule = AdaptiveSchedule(min_observations=10, refit_every=10, jitter=0.0)
    for _ in range(10):
        schedule.observe(20.0, 19.0)
    assert schedule.plan is not None
    # A retry that made attempt numbers drift must not move the plan.
    assert schedule.delay(1, 5.0) == schedule.delay(7, 5.0)


class _Recorder(PollSchedule):
    seen: list[tuple[float, float | None]]

    def observe(self, ready_at: float, pending_at: float | None = None) -> None:
        self.seen.append((ready_at, pending_at))


async def test_tracker_teaches_the_schedule_ready_times() -> None:
    recorder = _Recorder(initial=0.05, factor=1.0, ceiling=0.05, jitter=0.0)
    object.__setattr__(recorder, "seen", [])
    async with FakeCometAPI() as comet:
        url = comet.add_image("x.png", tiny_png())
        comet.script("t-ready", Answer.pending(), Answer.pending(), Answer.ready(url))
        comet.script("t-failed", Answer.pending(), Answer.status("Error"))
        async with aiohttp.ClientSession() as session:
            api = CometAPIClient(session, comet.base_url, Secret("test-key"))
            tracker = Tracker(api, ImageFetcher(session, allow_private=True), schedule=recorder)
            loop = asyncio.get_running_loop()
            outcomes: list[Outcome] = []
            for task_id in ("t-ready", "t-failed"):
                subscription = tracker.follow(task_id, deadline=loop.time() + 10)
                async with asyncio.timeout(10):
                    async for update in subscription:
                        if isinstance(update, Outcome):
                            outcomes.append(update)
            await tracker.close()
    assert [o.reason for o in outcomes] == [EndReason.READY, EndReason.FAILED]
    # Only the Ready task teaches: seen ready at the third poll, still pending at the second.
    assert len(recorder.seen) == 1
    ready_at, pending_at = recorder.seen[0]
    assert pending_at is not None and 0.0 < pending_at < ready_at < 2.0
