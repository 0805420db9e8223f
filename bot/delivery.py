"""The only code that sends a follow's messages to Discord.

Edits go to the interaction's original reply through its webhook token, which works the same for a
reply made a second ago and for one resumed after a restart. Status edits are best effort; the final
edit is retried, shrunk on 413 and, if the token has died, delivered as a new channel message or a
direct message instead. A dead token is never used again: invalid requests count toward Discord's
limit for banning a bot.
"""

from __future__ import annotations

import asyncio
import enum
import io
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import discord
from discord.http import handle_message_parameters
from discord.webhook.async_ import async_context

from bot.render import MessageParts, clip
from bot.secret import Secret

log = logging.getLogger(__name__)

__all__ = ["CANCEL_PREFIX", "Delivered", "Delivery", "FollowTarget", "cancel_custom_id"]

CANCEL_PREFIX = "fluxbot:cancel:"
TOKEN_LIFETIME = 15 * 60.0
# Stop trusting a token this long before Discord kills it, so an edit never races the expiry.
TOKEN_MARGIN = 30.0
DM_LIMIT = 10 * 1024 * 1024
_DEAD_TOKEN = {(401, 50027), (404, 10015), (404, 10062)}


def cancel_custom_id(follow_id: int) -> str:
    return f"{CANCEL_PREFIX}{follow_id}"


class Delivered(enum.Enum):
    EDITED = "edited"
    CHANNEL = "channel"
    DM = "dm"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class FollowTarget:
    """Where a follow's messages go. Built from an interaction, or from a stored follow after a restart."""

    application_id: int
    interaction_id: int
    token: Secret
    channel_id: int
    guild_id: int | None
    user_id: int
    private: bool
    created_at: float  # wall clock, when Discord created the interaction
    filesize_limit: int = 10 * 1024 * 1024

    @property
    def token_expires_at(self) -> float:
        return self.created_at + TOKEN_LIFETIME


class _TokenDead(Exception):
    pass


class _TooLarge(Exception):
    pass


class _Retry(Exception):
    def __init__(self, after: float | None) -> None:
        super().__init__()
        self.after = after


def _classify(exc: Exception) -> Exception:
    """Map what discord.py or aiohttp raised onto what the delivery does next."""
    if isinstance(exc, discord.HTTPException):
        status, code = exc.status, exc.code
        if (status, code) in _DEAD_TOKEN or status == 401:
            return _TokenDead()
        if status == 413 or code == 40005:
            return _TooLarge()
        if status == 429:
            header = exc.response.headers.get("Retry-After") if exc.response is not None else None
            try:
                after = float(header) if header else None
            except ValueError:
                after = None
            return _Retry(after)
        if status >= 500:
            return _Retry(None)
        return exc
    if isinstance(exc, aiohttp.ClientError | OSError | TimeoutError):
        return _Retry(None)
    return exc


def _file(parts: MessageParts) -> discord.File | None:
    if parts.image is None or parts.filename is None:
        return None
    return discord.File(io.BytesIO(parts.image.data), filename=parts.filename)


def _cancel_view(follow_id: int) -> discord.ui.View:
    # Components only: the click is routed by the cog's DynamicItem on the custom_id, which
    # survives restarts, so this view is never registered with the client's view store.
    view = discord.ui.View(timeout=None)
    view.add_item(discord.ui.Button(label="Cancel", style=discord.ButtonStyle.secondary,
                                    custom_id=cancel_custom_id(follow_id)))
    return view


class Delivery:
    """Sends one follow's status edits and its final message."""

    def __init__(
        self,
        client: discord.Client,
        target: FollowTarget,
        *,
        follow_id: int,
        task_id: str,
        final_budget: float = 120.0,
        request_timeout: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self.target = target
        self._follow_id = follow_id
        self._task_id = task_id
        self._final_budget = final_budget
        self._request_timeout = request_timeout
        self._clock = clock
        self._hold_until = 0.0
        self.dead = False
        self.edits = 0
        self._mentions = discord.AllowedMentions.none()

    def _tag(self) -> str:
        return f"task {self._task_id} interaction {self.target.interaction_id}"

    @property
    def token_usable(self) -> bool:
        return not self.dead and self._clock() < self.target.token_expires_at - TOKEN_MARGIN

    async def _edit(self, parts: MessageParts) -> None:
        if not self.token_usable:
            raise _TokenDead()
        file = _file(parts)
        view = _cancel_view(self._follow_id) if parts.show_cancel else None
        with handle_message_parameters(
            content=parts.content,
            embed=parts.embed,
            attachments=[file] if file else [],
            view=view,
            allowed_mentions=self._mentions,
        ) as params:
            adapter = async_context.get()
            session = discord.Webhook.partial(
                self.target.application_id, self.target.token.get(), client=self._client
            ).session
            try:
                async with asyncio.timeout(self._request_timeout):
                    await adapter.edit_original_interaction_response(
                        self.target.application_id,
                        self.target.token.get(),
                        session=session,
                        proxy=self._client.http.proxy,
                        proxy_auth=self._client.http.proxy_auth,
                        payload=params.payload,
                        multipart=params.multipart,
                        files=params.files,
                    )
            except Exception as exc:
                mapped = _classify(exc)
                if mapped is exc:
                    raise
                if isinstance(mapped, _TokenDead):
                    self.dead = True
                raise mapped from exc
        self.edits += 1

    async def show(self, parts: MessageParts) -> bool:
        """A status edit. Dropped rather than retried: the next one carries the newer state anyway."""
        if not self.token_usable or self._clock() < self._hold_until:
            return False
        try:
            await self._edit(parts)
            return True
        except _TokenDead:
            log.info("%s: the interaction token is no longer valid; will deliver elsewhere", self._tag())
        except _Retry as exc:
            self._hold_until = self._clock() + (exc.after if exc.after is not None else 2.0)
            log.info("%s: status edit throttled by Discord; next in %.1f s", self._tag(),
                     self._hold_until - self._clock())
        except _TooLarge:
            log.warning("%s: status edit refused as too large", self._tag())
        except discord.HTTPException as exc:
            log.warning("%s: status edit failed: %s %s", self._tag(), exc.status, exc.code)
        return False

    async def finish(self, build: Callable[[int], Awaitable[MessageParts]]) -> Delivered:
        """The final message; ``build(limit)`` renders it with an image that fits ``limit`` bytes."""
        end = self._clock() + self._final_budget
        limit = self.target.filesize_limit
        parts = await build(limit)
        failures = 0
        while self.token_usable and self._clock() < end:
            try:
                await self._edit(parts)
                return Delivered.EDITED
            except _TokenDead:
                break
            except _TooLarge:
                if parts.image is None:
                    break
                # The limit Discord enforces is smaller than the one it advertised: aim well below.
                limit = min(limit, len(parts.image.data)) * 3 // 4
                log.info("%s: upload refused as too large; re-encoding under %d bytes", self._tag(), limit)
                parts = await build(limit)
            except _Retry as exc:
                failures += 1
                delay = exc.after if exc.after is not None else min(30.0, 2.0 ** failures)
                delay *= random.uniform(1.0, 1.2)
                if self._clock() + delay >= end:
                    break
                log.info("%s: final edit failed, retry %d in %.1f s", self._tag(), failures, delay)
                await asyncio.sleep(delay)
            except discord.HTTPException as exc:
                log.warning("%s: final edit failed for good: %s %s", self._tag(), exc.status, exc.code)
                break
        return await self._fallback(build, parts)

    async def _fallback(self, build: Callable[[int], Awaitable[MessageParts]], parts: MessageParts) -> Delivered:
        target = self.target
        note = (f"<@{target.user_id}> here is the result of your `/fluxresult` for "
                f"`{clip(self._task_id, 128)}` (the original reply could no longer be edited).")
        if not target.private and target.guild_id is not None:
            try:
                await self._send(self._client.get_partial_messageable(target.channel_id, guild_id=target.guild_id),
                                 parts, note, discord.AllowedMentions(users=[discord.Object(target.user_id)],
                                                                      everyone=False, roles=False))
                log.info("%s: delivered as a new message in channel %s", self._tag(), target.channel_id)
                return Delivered.CHANNEL
            except (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.info("%s: could not post in channel %s (%s); trying a DM", self._tag(), target.channel_id,
                         getattr(exc, "status", type(exc).__name__))
        try:
            if parts.image is not None and len(parts.image.data) > DM_LIMIT:
                parts = await build(DM_LIMIT)
            user = await self._client.fetch_user(target.user_id)
            dm = await user.create_dm()
            dm_note = (f"Here is the result of your `/fluxresult` for `{clip(self._task_id, 128)}` "
                       "(the original reply could no longer be edited).")
            await self._send(dm, parts, dm_note, discord.AllowedMentions.none())
            log.info("%s: delivered by direct message", self._tag())
            return Delivered.DM
        except (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.error("%s: could not deliver the result to user %s anywhere (%s)", self._tag(), target.user_id,
                      getattr(exc, "status", type(exc).__name__))
            return Delivered.LOST

    async def _send(self, channel: discord.abc.Messageable, parts: MessageParts, note: str,
                    mentions: discord.AllowedMentions) -> None:
        content = note if parts.content is None else clip(f"{note}\n{parts.content}", 2000)
        file = _file(parts)
        embeds = [parts.embed] if parts.embed is not None else []
        files = [file] if file is not None else []
        async with asyncio.timeout(self._request_timeout):
            await channel.send(content=content, embeds=embeds, files=files, allowed_mentions=mentions)
