"""States and outcomes to message parts. Pure: no I/O, every Discord limit enforced here, in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass

import discord

from bot.cometapi import TaskState
from bot.images import ImageFile
from bot.tracking import EndReason, Outcome

__all__ = [
    "CONTENT_LIMIT",
    "EMBED_TOTAL_LIMIT",
    "MessageParts",
    "clip",
    "render_final",
    "render_progress",
    "safe_text",
]

CONTENT_LIMIT = 2000
TITLE_LIMIT = 256
DESCRIPTION_LIMIT = 4096
FIELD_LIMIT = 1024
FOOTER_LIMIT = 2048
EMBED_TOTAL_LIMIT = 6000

COLOUR_RUNNING = discord.Colour.blurple()
COLOUR_READY = discord.Colour.green()
COLOUR_FAILED = discord.Colour.red()
COLOUR_WARN = discord.Colour.orange()


@dataclass(frozen=True, slots=True)
class MessageParts:
    """What one message shows. ``image`` is attached and shown in the embed when set."""

    content: str | None = None
    embed: discord.Embed | None = None
    image: ImageFile | None = None
    filename: str | None = None
    show_cancel: bool = False

    def signature(self) -> tuple[object, ...]:
        """Equal signatures look the same to a person; used to skip edits that change nothing."""
        embed = self.embed.to_dict() if self.embed else None
        return (self.content, repr(embed), self.filename, self.show_cancel)


def clip(text: str, limit: int) -> str:
    """Cut to ``limit`` characters with an ellipsis, never splitting a surrogate pair or an escape."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    # A trailing lone backslash would escape the ellipsis and unbalance the markdown after it.
    while cut.endswith("\\"):
        cut = cut[:-1]
    return cut + "…"


def safe_text(text: str, limit: int) -> str:
    """Untrusted text (a prompt, an error body) made inert: markdown escaped, mentions broken, clipped."""
    text = discord.utils.escape_markdown(text, as_needed=False)
    text = discord.utils.escape_mentions(text)
    return clip(text, limit)


def _code(text: str, limit: int = 100) -> str:
    cleaned = text.replace("`", "'").replace("\n", " ")
    return f"`{clip(cleaned, limit)}`"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s"


def _size(num_bytes: int) -> str:
    if num_bytes >= 1024 * 1024:
        return f"{num_bytes / (1024 * 1024):.1f} MiB"
    return f"{num_bytes / 1024:.0f} KiB" if num_bytes >= 1024 else f"{num_bytes} bytes"


def _bar(progress: float, width: int = 12) -> str:
    filled = round(progress * width)
    return "█" * filled + "░" * (width - filled)


def _fit_embed(embed: discord.Embed) -> discord.Embed:
    """Trim the description until the whole embed is inside Discord's 6000-character total."""
    excess = len(embed) - EMBED_TOTAL_LIMIT
    if excess > 0 and embed.description:
        embed.description = clip(embed.description, max(1, len(embed.description) - excess))
    return embed


def _base_embed(title: str, colour: discord.Colour, task_id: str, description: str | None = None) -> discord.Embed:
    embed = discord.Embed(title=clip(title, TITLE_LIMIT), colour=colour,
                          description=clip(description, DESCRIPTION_LIMIT) if description else None)
    embed.add_field(name="Task", value=_code(task_id, 200), inline=True)
    return embed


def render_progress(state: TaskState | None, task_id: str, started_at: float) -> MessageParts:
    """The message while a task runs. ``started_at`` is wall-clock seconds; Discord ticks it client-side."""
    status = state.status if state else "Checking…"
    embed = _base_embed("Following your Flux task", COLOUR_RUNNING, task_id)
    embed.add_field(name="Status", value=_code(status), inline=True)
    if state is not None and state.progress is not None:
        percent = int(state.progress * 100)
        embed.add_field(name="Progress", value=f"{_bar(state.progress)} {percent}%", inline=False)
    embed.add_field(name="Started", value=f"<t:{int(started_at)}:R>", inline=True)
    embed.set_footer(text="The image will appear here as soon as it is ready.")
    return MessageParts(embed=_fit_embed(embed), show_cancel=True)


_FAILURE_TEXT: dict[EndReason, tuple[str, str]] = {
    EndReason.NOT_FOUND: (
        "Task not found",
        "CometAPI does not know this task id. Check that it was copied whole. Results also expire about "
        "10 minutes after they are ready, so an older task can no longer be fetched; generate it again.",
    ),
    EndReason.FAILED: ("The task failed", "The image could not be generated. Try again, perhaps with another prompt."),
    EndReason.MODERATED: (
        "The task was moderated",
        "The provider's safety filter blocked this task, so there is no image. Rephrase the prompt and try again.",
    ),
    EndReason.CANCELED: ("The task was canceled", "The task was canceled before it finished; there is no image."),
    EndReason.NO_IMAGE: (
        "Ready, but no image",
        "The task says it is ready but its answer holds no image link. Try again in a minute.",
    ),
    EndReason.AUTH: (
        "The bot's API key was refused",
        "CometAPI refused the bot's API key. This is not your fault: please tell the bot's admin.",
    ),
    EndReason.CREDITS: (
        "The bot is out of API credits",
        "The CometAPI account behind this bot has no credits left. Please tell the bot's admin.",
    ),
    EndReason.REJECTED: ("CometAPI rejected the request", "CometAPI would not answer for this task id."),
    EndReason.BAD_RESPONSE: (
        "CometAPI's answers could not be read",
        "CometAPI kept sending answers that are not a task status. Try again in a few minutes; if it goes on, "
        "tell the bot's admin.",
    ),
    EndReason.IMAGE_EXPIRED: (
        "The image link has expired",
        "The task finished, but its image link no longer works (links live about 10 minutes). "
        "Generate the image again.",
    ),
    EndReason.IMAGE_UNAVAILABLE: (
        "The image could not be downloaded",
        "The task finished, but downloading the image failed. Run the command again soon: the link lives "
        "about 10 minutes.",
    ),
    EndReason.IMAGE_FORBIDDEN: (
        "The image link was refused",
        "The image link points at an address the bot may not contact, so it was not downloaded.",
    ),
    EndReason.NOT_IMAGE: ("The result is not an image", "The task's result link did not hold a readable image."),
    EndReason.IMAGE_BOMB: (
        "The image is too large to open",
        "The result claims dimensions far beyond any generated image, so the bot refused to decode it.",
    ),
    EndReason.IMAGE_TOO_LARGE: ("The image is too large", "The image is larger than the bot will download."),
    EndReason.STOPPED: ("Stopped", "Following this task was cancelled; nothing more will be posted here."),
    EndReason.SHUTDOWN: (
        "The bot is restarting",
        "The bot was stopped before the task finished. Run the command again with the same id to get the result.",
    ),
    EndReason.INTERNAL: ("Something went wrong", "The bot hit an unexpected error while following this task."),
}


def _timeout_text(outcome: Outcome) -> str:
    last = outcome.state.status if outcome.state else "no answer yet"
    text = (f"Gave up after {_duration(outcome.elapsed)} without a result. Last status seen: {_code(last)}. "
            "The task may still finish: run the command again with the same id in a little while.")
    if outcome.detail:
        text += f"\nLast problem: {safe_text(outcome.detail, 300)}"
    return text


def render_final(
    outcome: Outcome,
    *,
    image: ImageFile | None = None,
    original_size: int | None = None,
    limit: int | None = None,
    stopped_by: str | None = None,
    reference: str | None = None,
    resume_note: bool = False,
) -> MessageParts:
    """The last message of a follow. ``image`` is the version that fits (may be re-encoded)."""
    task_id = outcome.task_id
    state = outcome.state
    if outcome.reason is EndReason.READY:
        return _render_ready(outcome, image, original_size, limit)

    if outcome.reason is EndReason.TIMEOUT:
        embed = _base_embed("Still not ready", COLOUR_WARN, task_id, _timeout_text(outcome))
    else:
        title, text = _FAILURE_TEXT[outcome.reason]
        if outcome.reason is EndReason.STOPPED and stopped_by:
            text = f"Cancelled by {safe_text(stopped_by, 100)}. Nothing more will be posted here."
        if outcome.reason is EndReason.SHUTDOWN and resume_note:
            text = "The bot is restarting. It will pick this task up again and post the image here when it is back."
        if outcome.reason in (EndReason.MODERATED, EndReason.FAILED, EndReason.CANCELED) and outcome.detail:
            label = "Reasons" if outcome.reason is EndReason.MODERATED else "Details"
            text += f"\n**{label}:** {safe_text(outcome.detail, 1000)}"
        elif outcome.reason in (EndReason.IMAGE_UNAVAILABLE, EndReason.REJECTED, EndReason.BAD_RESPONSE,
                                EndReason.NOT_IMAGE, EndReason.IMAGE_TOO_LARGE) and outcome.detail:
            text += f"\n**Details:** {safe_text(outcome.detail, 500)}"
        if outcome.reason is EndReason.INTERNAL and reference:
            text += f"\nReference: {_code(reference)}"
        colour = COLOUR_WARN if outcome.reason in (EndReason.STOPPED, EndReason.SHUTDOWN) else COLOUR_FAILED
        embed = _base_embed(title, colour, task_id, text)
    if state is not None:
        embed.add_field(name="Status", value=_code(state.status), inline=True)
    if state is not None and state.prompt:
        embed.add_field(name="Prompt", value=safe_text(state.prompt, FIELD_LIMIT), inline=False)
    return MessageParts(embed=_fit_embed(embed))


def _render_ready(outcome: Outcome, image: ImageFile | None, original_size: int | None,
                  limit: int | None) -> MessageParts:
    state = outcome.state
    prompt = state.prompt if state and state.prompt else None
    embed = discord.Embed(
        title="Your Flux image",
        colour=COLOUR_READY,
        description=safe_text(prompt, DESCRIPTION_LIMIT) if prompt else None,
    )
    embed.add_field(name="Task", value=_code(outcome.task_id, 200), inline=True)
    if state is not None and state.seed is not None:
        embed.add_field(name="Seed", value=_code(str(state.seed)), inline=True)
    if state is not None and state.duration is not None:
        embed.add_field(name="Generated in", value=_duration(state.duration), inline=True)
    footer = []
    if outcome.from_cache:
        footer.append("Served from the bot's cache")
    else:
        footer.append(f"Waited {_duration(outcome.elapsed)}")
    if image is not None:
        embed.add_field(name="Size", value=f"{image.width}×{image.height}, {_size(len(image.data))}", inline=True)
        if original_size is not None and original_size != len(image.data):
            footer.append(f"re-encoded from {_size(original_size)} to fit Discord's upload limit")
        filename = image.filename(f"flux-{outcome.task_id}")
        embed.set_image(url=f"attachment://{filename}")
        embed.set_footer(text=clip(" · ".join(footer), FOOTER_LIMIT))
        return MessageParts(embed=_fit_embed(embed), image=image, filename=filename)

    # It could not be made to fit: the link is the best we have, and it will not live long.
    url = state.image_url if state else None
    limit_text = f" ({_size(limit)})" if limit else ""
    explanation = (f"The image is too large for Discord's upload limit here{limit_text} even after "
                   "re-encoding, so here is the provider's link instead. It expires about 10 minutes after "
                   "the task finished: save the image now.")
    embed.add_field(name="Note", value=explanation, inline=False)
    if url:
        embed.url = url
    embed.set_footer(text=clip(" · ".join(footer), FOOTER_LIMIT))
    content = clip(url, CONTENT_LIMIT) if url else None
    return MessageParts(content=content, embed=_fit_embed(embed))
