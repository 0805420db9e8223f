"""/fluxresult: glue between a person's interaction and a follow. Thin on purpose."""

from __future__ import annotations

import logging
import re
import secrets
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.cometapi import InvalidTaskId, validate_task_id
from bot.delivery import CANCEL_PREFIX, FollowTarget
from bot.follows import LimitReached
from bot.secret import Secret

if TYPE_CHECKING:
    from bot.client import FluxBot

log = logging.getLogger(__name__)


class CancelButton(discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
                   template=re.escape(CANCEL_PREFIX) + r"(?P<follow_id>[0-9]+)"):
    """The Cancel button on a running follow. Dynamic, so it still works after a restart."""

    def __init__(self, follow_id: int) -> None:
        super().__init__(discord.ui.Button(label="Cancel", style=discord.ButtonStyle.secondary,
                                           custom_id=f"{CANCEL_PREFIX}{follow_id}"))
        self.follow_id = follow_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: re.Match[str]
    ) -> CancelButton:
        return cls(int(match["follow_id"]))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        bot: FluxBot = interaction.client
        result = bot.follows.cancel(self.follow_id, interaction.user.id, interaction.user.display_name)
        if result.ok:
            # The follow itself edits the reply to say it was cancelled; just acknowledge the click.
            await interaction.response.defer()
        elif result.owner_id is not None:
            await interaction.response.send_message(
                f"Only <@{result.owner_id}> can cancel this.", ephemeral=True,
                allowed_mentions=discord.AllowedMentions.none(),
            )
        else:
            await interaction.response.send_message(result.message, ephemeral=True)


class Flux(commands.Cog):
    def __init__(self, bot: FluxBot) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(CancelButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(CancelButton)

    @app_commands.command(name="fluxresult")
    async def fluxresult(self, interaction: discord.Interaction[FluxBot], id: str, private: bool = False) -> None:
        """Follow a Flux image task and post the image here when it is ready.

        Parameters
        ----------
        id:
            The task id CometAPI returned when the image was requested.
        private:
            Show the reply to you alone (default: everyone in the channel sees it).
        """
        task_id = validate_task_id(id)
        follows = self.bot.follows
        # Only in-memory checks before the defer: Discord gives 3 s, and a busy database must not eat them.
        follows.check_limits(interaction.user.id)
        await interaction.response.defer(ephemeral=private, thinking=True)
        target = FollowTarget(
            application_id=interaction.application_id,
            interaction_id=interaction.id,
            token=Secret(interaction.token),
            channel_id=interaction.channel_id or 0,
            guild_id=interaction.guild_id,
            user_id=interaction.user.id,
            private=private,
            created_at=interaction.created_at.timestamp(),
            filesize_limit=interaction.filesize_limit,
        )
        cached = await self.bot.store.get_result(task_id)
        if cached is not None:
            log.info("task %s interaction %s: answered from the cache", task_id, interaction.id)
            await follows.serve_cached(task_id, target, cached)
            return
        await follows.start(task_id, target)

    @fluxresult.autocomplete("id")
    async def _id_autocomplete(self, interaction: discord.Interaction[FluxBot],
                               current: str) -> list[app_commands.Choice[str]]:
        recent = await self.bot.store.recent_tasks(interaction.user.id, current.strip(), limit=25)
        return [app_commands.Choice(name=task_id[:100], value=task_id) for task_id in recent]

    async def cog_app_command_error(self, interaction: discord.Interaction[Any],
                                    error: app_commands.AppCommandError) -> None:
        cause = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        if isinstance(cause, InvalidTaskId | LimitReached):
            message = str(cause)
        else:
            reference = secrets.token_hex(4)
            name = interaction.command.name if interaction.command else "?"
            log.error("command %s failed (reference %s)", name, reference, exc_info=cause)
            message = (f"Something went wrong on the bot's side. If it happens again, give the admin this "
                       f"reference: `{reference}`.")
        try:
            if interaction.response.is_done():
                await interaction.edit_original_response(content=message, embed=None, attachments=[], view=None)
            else:
                await interaction.response.send_message(message, ephemeral=True)
        except discord.HTTPException as exc:
            log.warning("could not tell interaction %s about its error: %s", interaction.id, exc.status)


async def setup(bot: FluxBot) -> None:
    await bot.add_cog(Flux(bot))
