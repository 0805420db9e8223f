"""Scale of one process: thousands of concurrent follows against a fast local fake API.

Three processes per size: the fake CometAPI (its own process and event loop, so its CPU is not billed to the
bot), and, one after the other, a fresh *measured* process for the bare aiohttp floor and one for the bot's
core. Both poll the same fake with the same :class:`~bot.schedule.PollSchedule`; each task id is Ready a
random 5-30 s (smoke: 0.2-0.5 s) after its first poll, the two runs use separate ids with the same readiness
times.

* bot: one :class:`~bot.tracking.Tracker` (real :class:`~bot.cometapi.CometAPIClient`, real
  :class:`~bot.images.ImageFetcher`, :class:`~bot.store.Store` as the result sink, an ``AsyncLimiter`` raised
  to 1,000,000 requests/s) over one aiohttp session configured as ``FluxBot.setup_hook`` does
  (``GuardedResolver``, connection limit 200); one subscriber per task that reads every update, as
  ``FollowManager`` does, until the Outcome with the downloaded image. No Discord side (see the delivery
  benchmark).
* bare: per task id a plain loop: ``session.get`` + ``json.loads``, sleep the same schedule, and on Ready one
  GET of the image, over a session with the same connection limit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.report import BenchResult, Table, Target

NAME = "scale"
TITLE = "Scale of one process: concurrent follows against a local fake API"

API_KEY = "bench-key"
CONNECTION_LIMIT = 200  # as FluxBot.setup_hook
LAG_TICK = 0.010
LAG_TARGET = 0.100
MEMORY_TARGET = 400 * 1024 * 1024
CPU_RATIO_TARGET = 1.5


@dataclass(frozen=True, slots=True)
class Plan:
    count: int
    ready_min: float
    ready_max: float
    seed: int

    def ready_times(self) -> list[float]:
        rng = random.Random(self.seed)
        return [rng.uniform(self.ready_min, self.ready_max) for _ in range(self.count)]

    def ids(self, prefix: str) -> list[str]:
        return [f"{prefix}-{self.count}-{index:05d}" for index in range(self.count)]


@dataclass(slots=True)
class Measured:
    mode: str
    count: int
    delivered: int
    failed: dict[str, int]
    wall: float  # start of the first follow until the last outcome
    polls: int
    image_gets: int
    cpu: float  # user + system seconds of the measured process during the run
    lag_p50: float
    lag_p99: float
    lag_max: float
    rss_before: int  # bytes, after imports and set-up, before the first follow
    rss_peak: int  # ru_maxrss of the measured process

    @property
    def cpu_per_poll(self) -> float:
        return self.cpu / max(1, self.polls)


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the fake API, in its own process ----------------------------------------------------------------


def _fake_process(conn: multiprocessing.connection.Connection, plans: list[Plan]) -> None:
    _raise_fd_limit()
    asyncio.run(_serve_fake(conn, plans))


async def _serve_fake(conn: multiprocessing.connection.Connection, plans: list[Plan]) -> None:
    from tests.fakes.comet import FakeCometAPI

    loop = asyncio.get_running_loop()
    async with FakeCometAPI(api_key=API_KEY) as fake:
        for plan in plans:
            times = plan.ready_times()
            for prefix in ("bot", "bare"):
                for task_id, ready in zip(plan.ids(prefix), times, strict=True):
                    fake.timed_task(task_id, ready_after=ready)
        # poll_times keeps a timestamp per request: not needed here, and it grows with every poll.
        fake.poll_times.default_factory = _NullList
        conn.send(fake.base_url)
        await loop.run_in_executor(None, conn.recv)  # "stop"
        conn.send(fake.total_requests)


class _NullList(list[float]):
    def append(self, _value: float) -> None:
        return None


# -- the measured process ------------------------------------------------------------------------------


def _measure(mode: str, base_url: str, plan: Plan) -> dict[str, object]:
    _raise_fd_limit()
    return asdict(asyncio.run(_measure_async(mode, base_url, plan)))


async def _ticker(lags: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(LAG_TICK)
        lags.append(max(0.0, loop.time() - before - LAG_TICK))


async def _measure_async(mode: str, base_url: str, plan: Plan) -> Measured:
    import aiohttp

    from bot.images import GuardedResolver

    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(trusted_hosts={"127.0.0.1"}, allow_private=False),
        limit=CONNECTION_LIMIT, ttl_dns_cache=300,
    )
    async with aiohttp.ClientSession(connector=connector, headers={"User-Agent": "fluxbot"}) as session:
        if mode == "bot":
            return await _run_bot(session, base_url, plan)
        return await _run_bare(session, base_url, plan)


async def _run_bot(session: object, base_url: str, plan: Plan) -> Measured:
    import aiohttp
    from aiolimiter import AsyncLimiter

    from bot.cometapi import CometAPIClient
    from bot.images import ImageFetcher
    from bot.schedule import PollSchedule
    from bot.secret import Secret
    from bot.store import Store
    from bot.tracking import EndReason, Outcome, Tracker

    assert isinstance(session, aiohttp.ClientSession)
    with tempfile.TemporaryDirectory(prefix="fluxbot-scale-") as data_dir:
        store = await Store.open(Path(data_dir), cache_max_bytes=1024 * 1024 * 1024, cache_ttl_seconds=86400.0)
        api = CometAPIClient(session, base_url, Secret(API_KEY))
        images = ImageFetcher(session, trusted_hosts={"127.0.0.1"})
        fetches = 0
        real_fetch = images.fetch

        async def counted_fetch(url: str) -> object:
            nonlocal fetches
            fetches += 1
            return await real_fetch(url)

        images.fetch = counted_fetch  # type: ignore[assignment, method-assign]
        tracker = Tracker(api, images, sink=store, limiter=AsyncLimiter(1_000_000, 1.0), schedule=PollSchedule())
        failed: dict[str, int] = {}
        delivered = 0
        last = 0.0

        async def follow(task_id: str) -> None:
            nonlocal delivered, last
            subscription = tracker.follow(task_id, deadline=time.monotonic() + 600.0)
            async for update in subscription:
                if isinstance(update, Outcome):
                    if update.reason is EndReason.READY and update.image is not None:
                        delivered += 1
                    else:
                        failed[update.reason.value] = failed.get(update.reason.value, 0) + 1
                    last = time.monotonic()

        measured = await _phase("bot", plan, follow, lambda: api.stats.requests, lambda: fetches,
                                lambda: (delivered, failed, last))
        await tracker.close()
        await store.close()
        return measured


async def _run_bare(session: object, base_url: str, plan: Plan) -> Measured:
    import aiohttp

    from bot.schedule import PollSchedule

    assert isinstance(session, aiohttp.ClientSession)
    schedule = PollSchedule()
    rng = random.Random()
    url = base_url + "/flux/v1/get_result"
    headers = {"Authorization": f"Bearer {API_KEY}", "Accept": "application/json"}
    polls = fetches = delivered = 0
    failed: dict[str, int] = {}
    last = 0.0

    async def follow(task_id: str) -> None:
        nonlocal polls, fetches, delivered, last
        attempt = 0
        first = time.monotonic()
        while True:
            polls += 1
            async with session.get(url, params={"id": task_id}, headers=headers) as response:
                body = json.loads(await response.read())
            if body.get("status") == "Ready":
                fetches += 1
                async with session.get(body["result"]["sample"]) as image:
                    data = await image.read()
                if data:
                    delivered += 1
                else:
                    failed["empty"] = failed.get("empty", 0) + 1
                last = time.monotonic()
                return
            await asyncio.sleep(schedule.delay(attempt, time.monotonic() - first, rng=rng))
            attempt += 1

    return await _phase("bare", plan, follow, lambda: polls, lambda: fetches, lambda: (delivered, failed, last))


async def _phase(
    mode: str,
    plan: Plan,
    follow_fn: Callable[[str], Coroutine[Any, Any, None]],
    polls_fn: Callable[[], int],
    fetches_fn: Callable[[], int],
    state_fn: Callable[[], tuple[int, dict[str, int], float]],
) -> Measured:

    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticker(lags, stop))
    await asyncio.sleep(0.2)
    lags.clear()
    rss_before = _rss()
    cpu_before = _cpu()
    started = time.monotonic()
    tasks = [asyncio.create_task(follow_fn(task_id)) for task_id in plan.ids(mode)]
    done, pending = await asyncio.wait(tasks, timeout=plan.ready_max * 3 + 60.0)
    for task in pending:
        task.cancel()
    cpu = _cpu() - cpu_before
    stop.set()
    await ticker
    delivered, failed, last = state_fn()
    errors = sum(1 for task in done if not task.cancelled() and task.exception() is not None)
    if errors:
        failed["exception"] = errors
    if pending:
        failed["unfinished"] = len(pending)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return Measured(
        mode=mode, count=plan.count, delivered=delivered, failed=failed, wall=max(0.0, last - started),
        polls=polls_fn(), image_gets=fetches_fn(), cpu=cpu, lag_p50=_percentile(lags, 0.5),
        lag_p99=_percentile(lags, 0.99), lag_max=max(lags, default=0.0), rss_before=rss_before, rss_peak=peak,
    )


# -- orchestration -------------------------------------------------------------------------------------


async def _in_fresh_process(mode: str, base_url: str, plan: Plan) -> Measured:
    context = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        raw = await loop.run_in_executor(pool, _measure, mode, base_url, plan)
    return Measured(**raw)  # type: ignore[arg-type]


def _mib(value: float) -> str:
    return f"{value / 2**20:.0f}"


def _row(m: Measured) -> list[str]:
    failed = ", ".join(f"{k} {v}" for k, v in sorted(m.failed.items())) or "0"
    return [
        f"{m.count:,}", m.mode, f"{m.delivered:,}", failed, f"{m.wall:.1f}", f"{m.polls:,}",
        f"{m.polls / max(1, m.count):.1f}", f"{m.cpu:.1f}", f"{m.cpu_per_poll * 1e6:.0f}",
        f"{m.lag_p50 * 1e3:.1f}", f"{m.lag_p99 * 1e3:.1f}", f"{m.lag_max * 1e3:.0f}",
        _mib(m.rss_before), _mib(m.rss_peak),
    ]


async def run(smoke: bool) -> BenchResult:
    smoke_plans = [Plan(50, 0.2, 0.5, seed=1)]
    plans = smoke_plans if smoke else [Plan(1_000, 5.0, 30.0, seed=1), Plan(10_000, 5.0, 30.0, seed=2)]
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    fake = context.Process(target=_fake_process, args=(child, plans), name="fake-cometapi", daemon=True)
    fake.start()
    loop = asyncio.get_running_loop()
    results: list[tuple[Measured, Measured]] = []
    fake_requests = 0
    try:
        base_url = await asyncio.wait_for(loop.run_in_executor(None, parent.recv), timeout=60.0)
        for plan in plans:
            bare = await _in_fresh_process("bare", base_url, plan)
            bot = await _in_fresh_process("bot", base_url, plan)
            results.append((bot, bare))
        parent.send("stop")
        fake_requests = await asyncio.wait_for(loop.run_in_executor(None, parent.recv), timeout=30.0)
    finally:
        fake.join(timeout=10.0)
        if fake.is_alive():
            fake.terminate()
            fake.join(timeout=5.0)

    rows: list[list[str]] = []
    for bot, bare in results:
        rows += [_row(bot), _row(bare)]
    table = Table(
        columns=["Follows", "Loop", "Delivered", "Failed", "All done (s)", "Polls", "Polls/task", "CPU (s)",
                 "CPU/poll (µs)", "Lag p50 (ms)", "Lag p99 (ms)", "Lag max (ms)", "RSS before (MiB)",
                 "RSS peak (MiB)"],
        rows=rows,
    )
    first = plans[0]
    description = (
        f"Each size: that many follows started at once; the fake CometAPI (tests/fakes/comet.py, its own process"
        f" on 127.0.0.1) answers Pending with progress until a task's readiness time after its first poll, drawn"
        f" uniformly from {first.ready_min:g}-{first.ready_max:g} s (seeded; the same times for both loops),"
        " then Ready with a 4×4 PNG. **bot** = the bot's core in a fresh process: one Tracker with the real"
        " CometAPIClient, ImageFetcher, Store (SQLite sink) and an AsyncLimiter raised to 1,000,000 requests/s,"
        f" over one aiohttp session built as FluxBot.setup_hook builds it (GuardedResolver, {CONNECTION_LIMIT}"
        " connections); one subscriber per follow reading every update until the Outcome with the image, as"
        " FollowManager does (Discord is left out: see the delivery benchmark). **bare** = the floor in another"
        " fresh process: per id a plain aiohttp GET + json.loads loop on the same PollSchedule, then one GET of"
        " the image, same connection limit. All done = first follow started to last outcome. CPU = user +"
        " system time of the measured process during the run (getrusage), per poll = divided by the API polls"
        " (the image GETs are included in the CPU, one per task in both loops). Lag = overshoot of a 10 ms"
        " asyncio.sleep ticker. RSS peak = ru_maxrss of the measured process (interpreter and imports"
        " included); RSS before = resident size after imports and set-up, before the first follow."
        " The open-file limit is raised to the hard limit in every process."
    )
    targets: list[Target] = []
    notes: list[str] = [f"The fake API served {fake_requests:,} requests in total."]
    bot_big, bare_big = results[-1]
    ratio = bot_big.cpu_per_poll / max(1e-9, bare_big.cpu_per_poll)
    all_ok = bot_big.delivered == bot_big.count
    targets.append(Target(f"{bot_big.count:,} concurrent follows in one process", all_ok,
                          f"{bot_big.delivered:,}/{bot_big.count:,} delivered, last after {bot_big.wall:.1f} s"
                          f" (bare loop: {bare_big.wall:.1f} s)"))
    targets.append(Target("event-loop lag p99 under 100 ms", bot_big.lag_p99 < LAG_TARGET,
                          f"p99 {bot_big.lag_p99 * 1e3:.1f} ms, p50 {bot_big.lag_p50 * 1e3:.1f} ms at"
                          f" {bot_big.count:,} follows (bare: p99 {bare_big.lag_p99 * 1e3:.1f} ms)"))
    targets.append(Target("peak memory under 400 MB", bot_big.rss_peak < MEMORY_TARGET,
                          f"peak RSS {bot_big.rss_peak / 1e6:.0f} MB at {bot_big.count:,} follows"
                          f" ({(bot_big.rss_peak - bot_big.rss_before) / 1e6:.0f} MB above the"
                          f" {bot_big.rss_before / 1e6:.0f} MB before the first follow)"))
    targets.append(Target("CPU per poll within 1.5x of the bare loop", ratio <= CPU_RATIO_TARGET,
                          f"{bot_big.cpu_per_poll * 1e6:.0f} µs vs {bare_big.cpu_per_poll * 1e6:.0f} µs"
                          f" = {ratio:.2f}x at {bot_big.count:,} follows"))
    for bot, bare in results[:-1]:
        notes.append(f"At {bot.count:,} follows: CPU per poll {bot.cpu_per_poll / max(1e-9, bare.cpu_per_poll):.2f}x"
                     f" the bare loop, lag p99 {bot.lag_p99 * 1e3:.1f} ms, peak RSS {bot.rss_peak / 1e6:.0f} MB.")
    return BenchResult(title=TITLE, description=description, table=table, targets=targets, notes=notes)
