"""The bot: owns the one HTTP session, the store, the tracker and the follows; loads the cogs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any

import aiohttp
import discord
import yarl
from aiolimiter import AsyncLimiter
from discord.ext import commands

from bot.cometapi import CometAPIClient
from bot.config import Settings
from bot.follows import FollowManager
from bot.images import GuardedResolver, ImageFetcher
from bot.schedule import AdaptiveSchedule, ErrorBackoff, Schedule
from bot.store import Store
from bot.tracking import Tracker

log = logging.getLogger(__name__)

__all__ = ["EXTENSIONS", "FluxBot", "point_discord_at"]

EXTENSIONS = ("cogs.flux",)


def point_discord_at(settings: Settings) -> None:
    """discord.py reads these class attributes when it builds each request and when it connects."""
    discord.http.Route.BASE = settings.discord_api_base_url
    if settings.discord_gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


class FluxBot(commands.Bot):
    #: class attributes so a deployment (or a test) can subclass with another pace; None: a fresh
    #: AdaptiveSchedule per bot, which starts at 1 s growing to 5 s and then learns from the tasks it sees
    poll_schedule: Schedule | None = None
    error_backoff = ErrorBackoff()

    session: aiohttp.ClientSession
    store: Store
    api: CometAPIClient
    images: ImageFetcher
    tracker: Tracker
    follows: FollowManager

    def __init__(self, settings: Settings, *, force_sync: bool = False, sync_only: bool = False) -> None:
        point_discord_at(settings)
        # The bot never joins voice: the warnings about missing voice libraries are noise in its log.
        discord.VoiceClient.warn_nacl = False
        discord.VoiceClient.warn_dave = False
        super().__init__(
            command_prefix=commands.when_mentioned,
            help_command=None,
            # Slash commands and buttons arrive whatever the intents; asking for none keeps the gateway quiet.
            intents=discord.Intents.none(),
            # Nothing the bot says may ping anyone unless a message says so itself.
            allowed_mentions=discord.AllowedMentions.none(),
        )
        self.settings = settings
        self._force_sync = force_sync
        self._sync_only = sync_only
        self._resume_task: asyncio.Task[int] | None = None
        self._closing = False
        self.synced: bool | None = None

    async def setup_hook(self) -> None:
        settings = self.settings
        trusted = {settings.cometapi_host}
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(trusted_hosts=trusted, allow_private=settings.allow_private_network),
            limit=200,
            ttl_dns_cache=300,
        )
        self.session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": "fluxbot"})
        self.store = await Store.open(
            settings.data_dir,
            cache_max_bytes=settings.cache_max_mb * 1024 * 1024,
            cache_ttl_seconds=settings.cache_ttl_days * 86400,
        )
        self.api = CometAPIClient(self.session, settings.cometapi_base_url, settings.cometapi_key,
                                  timeout=settings.api_timeout)
        self.images = ImageFetcher(
            self.session,
            max_bytes=int(settings.max_image_mb * 1024 * 1024),
            allow_private=settings.allow_private_network,
            trusted_hosts=trusted,
        )
        self.tracker = Tracker(self.api, self.images, sink=self.store,
                               limiter=AsyncLimiter(settings.api_rps, 1.0),
                               schedule=self.poll_schedule or AdaptiveSchedule(), backoff=self.error_backoff)
        self.follows = FollowManager(
            self, self.tracker, self.store,
            poll_timeout=settings.poll_timeout,
            max_active=settings.max_active,
            max_active_per_user=settings.max_active_per_user,
        )
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        self.synced = await self.sync_commands(force=self._force_sync)
        if not self._sync_only:
            self._resume_task = asyncio.create_task(self.follows.resume_all(), name="resume-follows")

    def command_signature(self) -> str:
        guild = discord.Object(self.settings.dev_guild_id) if self.settings.dev_guild_id else None
        commands_json: list[Any] = [c.to_dict(self.tree) for c in self.tree.get_commands(guild=guild)]
        scope = f"guild:{guild.id}" if guild else "global"
        blob = json.dumps({"scope": scope, "commands": commands_json}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    async def sync_commands(self, *, force: bool = False) -> bool:
        """Sync only when the command set changed since the last sync: Discord rate-limits syncs hard."""
        guild = discord.Object(self.settings.dev_guild_id) if self.settings.dev_guild_id else None
        if guild is not None:
            self.tree.copy_global_to(guild=guild)
        signature = self.command_signature()
        if not force and await self.store.get_meta("command_signature") == signature:
            log.info("commands unchanged since the last sync; not syncing")
            return False
        synced = await self.tree.sync(guild=guild)
        await self.store.set_meta("command_signature", signature)
        log.info("synced %d commands %s", len(synced), f"to guild {guild.id}" if guild else "globally")
        return True

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        # Order matters: follows first (they still edit through discord.py's session), then the
        # tracker, then discord.py, then what discord.py no longer needs.
        if self._resume_task is not None and not self._resume_task.done():
            self._resume_task.cancel()
        if hasattr(self, "follows"):
            await self.follows.close(timeout=3.0)
        if hasattr(self, "tracker"):
            await self.tracker.close(timeout=1.0)
        await super().close()
        if hasattr(self, "session"):
            await self.session.close()
        if hasattr(self, "store"):
            await self.store.close()
