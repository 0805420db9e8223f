"""Fixtures for end-to-end tests: a fake Discord and a way to run any ``commands.Bot`` against it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from discord.ext import commands
from PIL import Image

from bot.client import FluxBot
from bot.config import Settings, load_settings
from bot.schedule import ErrorBackoff, PollSchedule
from tests.fakes.comet import FakeCometAPI
from tests.fakes.discord import FakeDiscord, FakeGuild, FakeInteraction, FakeMessage, started_fake

log = logging.getLogger(__name__)

BotT = TypeVar("BotT", bound=commands.Bot)

READY_TIMEOUT = 15.0
CLOSE_TIMEOUT = 10.0


@contextlib.asynccontextmanager
async def running_bot(
    bot: BotT,
    token: str,
    fake: FakeDiscord,
    *,
    ready_timeout: float = READY_TIMEOUT,
    close_timeout: float = CLOSE_TIMEOUT,
) -> AsyncIterator[BotT]:
    """Run ``bot.start(token)`` in a task until it can handle interactions; close it on exit.

    "Ready enough" is discord.py's ``connect`` event, dispatched while it parses READY: from then on
    ``bot.user`` and ``application_id`` are set and INTERACTION_CREATE is handled. ``on_ready`` would
    cost another ``guild_ready_timeout`` (2 s) for nothing, since interactions do not wait for it.
    """
    connected = asyncio.Event()

    async def _on_connect() -> None:
        connected.set()

    bot.add_listener(_on_connect, "on_connect")
    task = asyncio.create_task(bot.start(token), name=f"running_bot:{type(bot).__name__}")
    waiter = asyncio.create_task(connected.wait(), name="running_bot:connected")
    try:
        done, _ = await asyncio.wait({task, waiter}, timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            # Login failed or the bot stopped on its own: that is the error worth reporting.
            task.result()
            raise RuntimeError("the bot stopped before it connected to the fake gateway")
        if waiter not in done:
            raise TimeoutError(
                f"the bot did not connect within {ready_timeout}s; fake saw: "
                + ", ".join(str(r) for r in fake.requests[-10:])
            )
        await fake.wait_until_identified(timeout=ready_timeout)
        yield bot
    finally:
        waiter.cancel()
        bot.remove_listener(_on_connect, "on_connect")
        crash = await _stop_bot(bot, task, close_timeout)
    # Reached only when neither start-up nor the test body raised: a bot that died mid-test must not
    # pass silently just because the test stopped waiting for it.
    if crash is not None:
        raise RuntimeError("the bot's task crashed while the test ran") from crash


async def _stop_bot(bot: commands.Bot, task: asyncio.Task[None], close_timeout: float) -> BaseException | None:
    """Close ``bot`` and end its task, each step bounded; returns the task's exception, if any."""
    try:
        async with asyncio.timeout(close_timeout):
            await bot.close()
    except TimeoutError:
        log.warning("bot.close() took longer than %.1fs; cancelling its task", close_timeout)
    if not task.done():
        # After close() the connect loop ends by itself; give it the same bound, then cancel.
        await asyncio.wait({task}, timeout=close_timeout)
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=close_timeout)
    if task.done() and not task.cancelled():
        return task.exception()
    return None


def assert_fake_clean(fake: FakeDiscord) -> None:
    """No request body broke Discord's schemas and the fake itself hit no bug."""
    assert not fake.internal_errors, "the fake Discord itself failed:\n" + "\n".join(fake.internal_errors)
    assert not fake.schema_errors, "requests that break Discord's OpenAPI schemas:\n" + "\n".join(fake.schema_errors)


@pytest.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    """A started fake Discord (one guild with one text channel) that discord.py points at; after the
    test it is closed and must have seen no request body that breaks Discord's schemas."""
    async with started_fake(guilds=[FakeGuild()]) as fake:
        yield fake
    assert_fake_clean(fake)


@pytest.fixture
def bot_runner() -> Callable[..., Any]:
    """``running_bot`` as a fixture, for tests that prefer not to import from conftest."""
    return running_bot


# -- the real fluxbot against both fakes ---------------------------------------------------------


def png_bytes(width: int = 64, height: int = 48, *, noise: bool = False) -> bytes:
    """A real PNG: solid (compresses to almost nothing) or noise (about 3 bytes a pixel, for size limits)."""
    if noise:
        image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    else:
        image = Image.new("RGB", (width, height), (10, 120, 200))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


FAST_SCHEDULE = PollSchedule(initial=0.05, factor=1.5, ceiling=0.2, jitter=0.1)
FAST_BACKOFF = ErrorBackoff(initial=0.05, factor=2.0, ceiling=0.4, jitter=0.1)


class FastFluxBot(FluxBot):
    """The real bot, polling every few tens of milliseconds so a test does not wait for seconds."""

    poll_schedule = FAST_SCHEDULE
    error_backoff = FAST_BACKOFF


@dataclass
class FluxEnv:
    discord: FakeDiscord
    comet: FakeCometAPI
    data_dir: Path
    env: dict[str, str]

    def settings(self, **overrides: str) -> Settings:
        return load_settings({**self.env, **overrides})

    @contextlib.asynccontextmanager
    async def bot(self, bot_class: type[FluxBot] = FastFluxBot, **overrides: str) -> AsyncIterator[FluxBot]:
        bot = bot_class(self.settings(**overrides))
        async with running_bot(bot, self.discord.token, self.discord) as running:
            yield running

    async def command(self, task_id: str, *, private: bool | None = None, **kw: Any) -> FakeInteraction:
        options: dict[str, Any] = {"id": task_id}
        if private is not None:
            options["private"] = private
        return await self.discord.send_interaction("fluxresult", options, **kw)

    async def final(self, interaction: FakeInteraction, timeout: float = 10.0) -> FakeMessage:
        """The original reply once it shows a final state: no Cancel button left and not loading."""

        def is_final(message: FakeMessage) -> bool:
            return not message.loading and not message.components and bool(message.embeds or message.content)

        message = await self.discord.wait_for_original(interaction, is_final, timeout=timeout)
        # A snapshot: the live message would show whatever the bot writes after this point.
        return message.snapshot()


@pytest.fixture
async def fake_comet() -> AsyncIterator[FakeCometAPI]:
    async with FakeCometAPI() as comet:
        yield comet


@pytest.fixture
async def flux(fake_discord: FakeDiscord, fake_comet: FakeCometAPI, tmp_path: Path) -> FluxEnv:
    env = {
        "DISCORD_TOKEN": fake_discord.token,
        "COMETAPI_KEY": fake_comet.api_key,
        "COMETAPI_BASE_URL": fake_comet.base_url,
        "DISCORD_API_BASE_URL": fake_discord.rest_base,
        "DISCORD_GATEWAY_URL": fake_discord.gateway_url,
        "FLUXBOT_DATA_DIR": str(tmp_path / "data"),
        "FLUXBOT_POLL_TIMEOUT": "30",
    }
    return FluxEnv(fake_discord, fake_comet, tmp_path / "data", env)
