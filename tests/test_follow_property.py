"""Property: whatever the API answers (and whatever Discord does to the edits), a follow ends, within
its deadline, in exactly one final message, and that message names the right ending.

Full pipeline per example (real bot and discord.py, fake Discord, fake CometAPI), so examples are few.
The answer model (`_expected`) and the answer makers are the tracker property test's, reused.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.render import _FAILURE_TEXT
from bot.tracking import EndReason
from tests.e2e.conftest import FluxEnv, assert_fake_clean
from tests.fakes.comet import FakeCometAPI
from tests.fakes.discord import FakeGuild, FakeInteraction, FakeMessage, FakeUser, started_fake
from tests.test_tracking import _NON_TERMINAL, _TERMINAL, PNG, _answer, _expected

ORIGINAL = r"/webhooks/\d+/[^/]+/messages/@original"
ASKER = FakeUser(5_150_000_001, "prop")
DISCORD_FAULTS = ["none", "edit-429", "edit-5xx", "token-dies"]


def expected_title(reason: EndReason) -> str:
    if reason is EndReason.READY:
        return "Your Flux image"
    if reason is EndReason.TIMEOUT:
        return "Still not ready"
    return _FAILURE_TEXT[reason][0]


def finals(env: FluxEnv, interaction: FakeInteraction) -> list[FakeMessage]:
    found = []
    original = env.discord.original(interaction)
    if original is not None and not original.loading and not original.components and original.embeds:
        found.append(original)
    found.extend(m for m in env.discord.channel_messages(interaction.channel_id)
                 if m.webhook_id is None and m.id != interaction.original_message_id)
    found.extend(env.discord.dm_messages(ASKER.id))
    return found


async def run_example(steps: list[str], discord_fault: str) -> None:
    reason = _expected(steps)
    poll_timeout = 1.0 if reason is EndReason.TIMEOUT else 4.0
    with tempfile.TemporaryDirectory() as tmp:
        async with started_fake(guilds=[FakeGuild()]) as discord, FakeCometAPI() as comet:
            comet.add_image("p.png", PNG)
            comet.script("prop", *(_answer(step, comet) for step in steps))
            env = FluxEnv(discord, comet, Path(tmp) / "data", {
                "DISCORD_TOKEN": discord.token, "COMETAPI_KEY": comet.api_key,
                "COMETAPI_BASE_URL": comet.base_url, "DISCORD_API_BASE_URL": discord.rest_base,
                "DISCORD_GATEWAY_URL": discord.gateway_url, "FLUXBOT_DATA_DIR": str(Path(tmp) / "data"),
                "FLUXBOT_POLL_TIMEOUT": str(poll_timeout),
            })
            if discord_fault == "edit-429":
                discord.inject_rate_limit("PATCH", ORIGINAL, retry_after=0.2, via=False)
            elif discord_fault == "edit-5xx":
                discord.inject("PATCH", ORIGINAL, 503)
            async with env.bot() as bot:
                started = time.monotonic()
                interaction = await env.command("prop", user=ASKER)
                if discord_fault == "token-dies":
                    await discord.wait_for_callback(interaction, timeout=5.0)
                    discord.kill_token(interaction)
                # Bound: the poll timeout, plus one honoured Retry-After or discord.py 5xx retry, plus slack.
                async with asyncio.timeout(poll_timeout + 5.0):
                    while sum(bot.follows.delivered.values()) < 1:  # noqa: ASYNC110
                        await asyncio.sleep(0.02)
                elapsed = time.monotonic() - started
                # Nothing more arrives after the final message.
                await asyncio.sleep(0.1)
                ended = finals(env, interaction)
                delivered = dict(bot.follows.delivered)
        assert_fake_clean(discord)
    assert elapsed <= poll_timeout + 3.0, elapsed
    assert len(ended) == 1, (steps, discord_fault, ended)
    assert delivered == {"channel" if discord_fault == "token-dies" else "edited": 1}, delivered
    title = ended[0].embeds[0]["title"]
    assert title == expected_title(reason), (steps, discord_fault, title)
    if reason is EndReason.READY:
        assert ended[0].attachments and ended[0].attachments[0].data == PNG


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_NON_TERMINAL) | st.sampled_from(_NON_TERMINAL + list(_TERMINAL)),
                min_size=1, max_size=6),
       st.sampled_from(DISCORD_FAULTS))
def test_every_answer_sequence_ends_in_exactly_one_true_final_message(steps: list[str], discord_fault: str) -> None:
    asyncio.run(run_example(steps, discord_fault))
