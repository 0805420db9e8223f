"""Soak: 1,000 follows with faults mixed in, through one bot process, bounded in time.

Afterwards nothing is left behind: no asyncio task, no socket, no temp file, and memory (Python
allocated blocks, and RSS with a generous bound) is back near where it started. Run with ``pytest -s`` to see
the figures.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _pytest.logging import LogCaptureHandler

from tests.e2e.conftest import FluxEnv
from tests.fakes.comet import Answer, FakeCometAPI
from tests.fakes.discord import FakeInteraction, FakeMessage, FakeUser

FOLLOWS = int(os.environ.get("FLUXBOT_SOAK_FOLLOWS", "1000"))
USERS = 250
IN_FLIGHT = 60  # unacknowledged interactions at once: Discord wants the defer within 3 s
BUDGET = 90.0  # the whole soak, generous for 2 slow cores; it usually takes far less
BLOCK_SLACK = 20_000
RSS_SLACK = 150 * 1024 * 1024
ORIGINAL = r"/webhooks/\d+/[^/]+/messages/@original"


@dataclass(frozen=True)
class Kind:
    name: str
    weight: int
    answers: Callable[[FakeCometAPI], tuple[Answer, ...]]
    title: str


KINDS = [
    Kind("ready", 40, lambda f: (Answer.pending(0.3), Answer.pending(0.6), Answer.ready(f.image_url("default.png"))),
         "Your Flux image"),
    Kind("not-found", 10, lambda f: (Answer.status("Task not found"),), "Task not found"),
    Kind("moderated", 10, lambda f: (Answer.pending(), Answer.status("Content Moderated",
                                                                     details={"Moderation Reasons": ["x"]})),
         "The task was moderated"),
    Kind("failed", 5, lambda f: (Answer.status("Error", error="boom"),), "The task failed"),
    Kind("5xx", 10, lambda f: (Answer.error(502, "bad gateway"), Answer.error(503, "busy"),
                               Answer.ready(f.image_url("default.png"))), "Your Flux image"),
    Kind("429", 5, lambda f: (Answer.rate_limited("0"), Answer.ready(f.image_url("default.png"))),
         "Your Flux image"),
    Kind("malformed", 10, lambda f: (Answer.raw(b"<html/>"), Answer.ready(f.image_url("default.png"))),
         "Your Flux image"),
    Kind("malformed-forever", 5, lambda f: (Answer.raw(b"<html/>"),), "CometAPI's answers could not be read"),
    # Its token is killed once the command is acknowledged: the result goes to the channel.
    Kind("token-dies", 4, lambda f: (*[Answer.pending(0.5)] * 12, Answer.ready(f.image_url("default.png"))),
         "Your Flux image"),
    Kind("image-gone", 5, lambda f: (Answer.ready(f.image_url("gone.png")),), "The image link has expired"),
]


class _CountingHandler(logging.Handler):
    """Formats every record, as a real handler would, and keeps only counts and error lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.levels: Counter[str] = Counter()
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        self.levels[record.levelname] += 1
        if record.levelno >= logging.ERROR:
            self.errors.append(text[:500])


def _quiet_pytest_capture(replacement: logging.Handler) -> Callable[[], None]:
    """Stop pytest's capture handlers from keeping the soak's log records; returns the undo.

    pytest keeps every LogRecord for the report, and a record keeps its arguments alive: exceptions,
    their tracebacks, the frames and everything those frames reference. The soak would measure
    pytest instead of the bot.
    """
    root = logging.getLogger()
    captured = [(h, h.level) for h in root.handlers if isinstance(h, LogCaptureHandler)]
    for handler, _ in captured:
        handler.setLevel(logging.CRITICAL + 1)
    previous = root.level
    root.setLevel(logging.INFO)
    root.addHandler(replacement)

    def undo() -> None:
        root.removeHandler(replacement)
        root.setLevel(previous)
        for handler, level in captured:
            handler.setLevel(level)

    return undo


def socket_count() -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def temp_files(data_dir: Path) -> list[Path]:
    return [p for p in data_dir.rglob("*") if p.name.startswith(".tmp")]


def other_tasks(baseline: set[asyncio.Task[object]]) -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t not in baseline and t is not asyncio.current_task()
            and not t.done()}


async def settle(predicate: Callable[[], bool], timeout: float) -> bool:
    """Give closed connections and their handler tasks a bounded moment to go away."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return True


def final_where(flux: FluxEnv, interaction: FakeInteraction, channel_posts: dict[int, list[FakeMessage]]
                ) -> list[tuple[str, FakeMessage]]:
    found: list[tuple[str, FakeMessage]] = []
    original = flux.discord.original(interaction)
    if original is not None and not original.loading and not original.components and original.embeds:
        found.append(("original", original))
    found.extend(("channel", m) for m in channel_posts.get(interaction.user_id, [])
                 if f"`{interaction_task(interaction)}`" in m.content)
    return found


def kill_acknowledged(flux: FluxEnv, pending: list[FakeInteraction]) -> list[FakeInteraction]:
    """Kill the tokens of these interactions once the bot has deferred; return the ones still waiting."""
    for interaction in pending:
        if interaction.acknowledged:
            flux.discord.kill_token(interaction)
    return [i for i in pending if not i.acknowledged]


def interaction_task(interaction: FakeInteraction) -> str:
    return str(interaction.payload["data"]["options"][0]["value"])


def make_plan(flux: FluxEnv, prefix: str, count: int, rng: random.Random) -> dict[str, Kind]:
    plan: dict[str, Kind] = {}
    for n in range(count):
        kind = rng.choices(KINDS, weights=[k.weight for k in KINDS])[0]
        task_id = f"{prefix}-{n}-{kind.name}"
        plan[task_id] = kind
        flux.comet.script(task_id, *kind.answers(flux.comet))
    return plan


@dataclass
class Round:
    interactions: dict[str, FakeInteraction]
    delivered: Counter[str]
    elapsed: float
    discord_faults: int
    peak_rss: int
    peak_blocks: int


async def soak_round(flux: FluxEnv, plan: dict[str, Kind], users: list[FakeUser]) -> Round:
    """One bot process runs every follow of ``plan``; returns once all delivered and the bot is closed."""
    interactions: dict[str, FakeInteraction] = {}
    to_kill: list[FakeInteraction] = []
    discord_faults = 0
    started = time.monotonic()
    async with flux.bot(FLUXBOT_MAX_ACTIVE="2000", FLUXBOT_MAX_ACTIVE_PER_USER="50", FLUXBOT_API_RPS="5000",
                        FLUXBOT_POLL_TIMEOUT="30") as bot:
        async with asyncio.timeout(BUDGET):
            for n, task_id in enumerate(plan):
                if n % 50 == 25:
                    # A 429 without Via on whichever edit comes next: a status edit is dropped, a final one retried.
                    flux.discord.inject_rate_limit("PATCH", ORIGINAL, retry_after=0.2, via=False)
                    discord_faults += 1
                if n % 100 == 60:
                    flux.discord.inject("PATCH", ORIGINAL, 413)
                    discord_faults += 1
                while sum(1 for i in interactions.values() if not i.acknowledged) >= IN_FLIGHT:
                    to_kill = kill_acknowledged(flux, to_kill)
                    await asyncio.sleep(0.01)
                interactions[task_id] = await flux.command(task_id, user=users[n % len(users)])
                if plan[task_id].name == "token-dies":
                    to_kill.append(interactions[task_id])
                    discord_faults += 1
            while sum(bot.follows.delivered.values()) < len(plan):
                to_kill = kill_acknowledged(flux, to_kill)
                await asyncio.sleep(0.05)
        delivered = Counter(bot.follows.delivered)
        elapsed = time.monotonic() - started
        peak_rss, peak_blocks = rss_bytes(), sys.getallocatedblocks()
    return Round(interactions, delivered, elapsed, discord_faults, peak_rss, peak_blocks)


def forget_records(flux: FluxEnv) -> None:
    """Drop what the fakes recorded (the test's memory, not the bot's)."""
    discord = flux.discord
    for kept in (discord.requests, discord.gateway_sent, discord.gateway_received, discord.injections,
                 discord.identify_payloads, discord.resume_payloads, discord.command_syncs):
        kept.clear()
    discord.messages.clear()
    discord.interactions.clear()
    flux.comet.poll_times.clear()


async def test_soak_thousand_follows_leave_nothing_behind(flux: FluxEnv) -> None:
    rng = random.Random(20240611)
    flux.comet.add_image("gone.png", b"", status=410)
    users = [FakeUser(8_000_000 + n, f"s{n}") for n in range(USERS)]
    counter = _CountingHandler()
    quiet = _quiet_pytest_capture(counter)
    try:
        # A first, small run warms up what is cached once per process (schemas, regexes, mimetypes...).
        warm = await soak_round(flux, make_plan(flux, "warm", 60, rng), users)
        assert sum(warm.delivered.values()) == 60
        forget_records(flux)
        del warm
        plan = make_plan(flux, "soak", FOLLOWS, rng)
        killed = {t for t in plan if plan[t].name == "token-dies"}
        gc.collect()
        baseline_tasks = set(asyncio.all_tasks())
        baseline_sockets = socket_count()
        baseline_rss = rss_bytes()
        baseline_blocks = sys.getallocatedblocks()
        debug = bool(os.environ.get("FLUXBOT_SOAK_DEBUG"))
        before_types = Counter(type(o).__name__ for o in gc.get_objects()) if debug else Counter()

        soak = await soak_round(flux, plan, users)

        # The bot is closed here: give closed connections and their handler tasks a bounded moment.
        await settle(lambda: not other_tasks(baseline_tasks), 5.0)
        await settle(lambda: socket_count() <= baseline_sockets, 5.0)
        statuses = Counter(r.status for r in flux.discord.requests)
        api_requests = flux.comet.total_requests

        # Every interaction: exactly one final message, and it says what its script says.
        moved_by_413 = 0
        channel_posts: dict[int, list[FakeMessage]] = {}
        for message in flux.discord.messages.values():
            if message.webhook_id is None and message.content.startswith("<@"):
                user_id = int(message.content[2:message.content.index(">")])
                channel_posts.setdefault(user_id, []).append(message)
        for task_id, interaction in soak.interactions.items():
            finals = final_where(flux, interaction, channel_posts)
            assert len(finals) == 1, (task_id, finals)
            where, message = finals[0]
            met_413 = any(r.status == 413 for r in flux.discord.requests if interaction.token in r.path)
            # A 413 on an edit without an image leaves nothing to shrink: the result goes to the channel.
            allowed = ("channel",) if task_id in killed else ("original", "channel") if met_413 else ("original",)
            assert where in allowed, (task_id, finals)
            moved_by_413 += where == "channel" and task_id not in killed
            assert message.embeds[0]["title"] == plan[task_id].title, (task_id, message.embeds[0])
            if plan[task_id].title == "Your Flux image":
                # With the image attached, or, when a 413 met an image that cannot shrink, the link explained.
                assert message.attachments or "too large for Discord's upload limit" in str(message.embeds[0]), \
                    task_id
        assert soak.delivered == Counter({"edited": FOLLOWS - len(killed) - moved_by_413,
                                          "channel": len(killed) + moved_by_413})
        assert soak.elapsed < BUDGET

        # Nothing left behind.
        assert not other_tasks(baseline_tasks), other_tasks(baseline_tasks)
        assert socket_count() <= baseline_sockets
        assert temp_files(flux.data_dir) == []
        forget_records(flux)
        soak.interactions.clear()
        channel_posts.clear()
        gc.collect()
        if debug:
            print("grown:", (Counter(type(o).__name__ for o in gc.get_objects()) - before_types).most_common(25))
        end_blocks = sys.getallocatedblocks()
        end_rss = rss_bytes()
    finally:
        quiet()
    print(f"\nsoak: {FOLLOWS} follows by {USERS} users in {soak.elapsed:.1f} s ({FOLLOWS / soak.elapsed:.0f}/s); "
          f"kinds {dict(Counter(k.name for k in plan.values()))}; "
          f"discord faults injected {soak.discord_faults} (tokens killed {len(killed)}); "
          f"delivered {dict(soak.delivered)}; discord answers {dict(statuses)}; api requests {api_requests}; "
          f"python blocks {baseline_blocks} -> peak {soak.peak_blocks} -> after {end_blocks}; "
          f"RSS {baseline_rss / 2**20:.0f} -> peak {soak.peak_rss / 2**20:.0f} -> after {end_rss / 2**20:.0f} MiB; "
          f"log records {dict(counter.levels)}")
    assert counter.levels["ERROR"] == 0, counter.errors[:5]
    # The slack covers interpreter caches a larger run still warms up; a leak of even one small object
    # per follow would show as tens of thousands of blocks.
    assert end_blocks - baseline_blocks < BLOCK_SLACK, (baseline_blocks, soak.peak_blocks, end_blocks)
    assert end_rss - baseline_rss < RSS_SLACK, (baseline_rss, soak.peak_rss, end_rss)
