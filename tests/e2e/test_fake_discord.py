"""The fake Discord, proven against a real discord.py 2.7 client.

A small bot defined here logs in to the fake, receives slash commands and a button click, and answers
them; the tests read what reached "Discord" and what discord.py made of Discord's answers.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands

from tests.e2e.conftest import running_bot
from tests.fakes import openapi_check
from tests.fakes.discord import (
    CALLBACK_DEFER,
    CALLBACK_MESSAGE,
    CALLBACK_UPDATE,
    FLAG_EPHEMERAL,
    FakeDiscord,
    RecordedRequest,
    started_fake,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 16
STEP = 5.0  # bound for any single wait in these tests


@dataclass
class Outcome:
    command: str
    arg: str
    error: BaseException | None = None


class ProbeBot(commands.Bot):
    """Commands covering what fluxbot does: defer + edit with file and embed, ephemeral replies,
    buttons, autocomplete, DMs. Each command reports how it ended on ``outcomes``."""

    def __init__(self) -> None:
        super().__init__(command_prefix=commands.when_mentioned, intents=discord.Intents.default(), help_command=None)
        self.outcomes: asyncio.Queue[Outcome] = asyncio.Queue()
        self.release = asyncio.Event()
        self.clicks: list[str] = []
        self._add_commands()

    async def next_outcome(self) -> Outcome:
        async with asyncio.timeout(STEP):
            return await self.outcomes.get()

    def _add_commands(self) -> None:
        bot = self

        @app_commands.command(name="fluxresult", description="Show a Flux result")
        async def fluxresult(interaction: discord.Interaction, task_id: str) -> None:
            try:
                await interaction.response.defer(thinking=True)
                if task_id.startswith("hold"):
                    async with asyncio.timeout(STEP):
                        await bot.release.wait()
                embed = discord.Embed(title=f"Task {task_id}", description="ready")
                embed.set_image(url="attachment://result.png")
                await interaction.edit_original_response(
                    content=f"Result for {task_id}",
                    embed=embed,
                    attachments=[discord.File(io.BytesIO(PNG), filename="result.png")],
                )
            except discord.HTTPException as error:
                bot.outcomes.put_nowait(Outcome("fluxresult", task_id, error))
            else:
                bot.outcomes.put_nowait(Outcome("fluxresult", task_id))

        @fluxresult.autocomplete("task_id")
        async def task_ids(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
            return [app_commands.Choice(name=f"{current}-{n}", value=f"{current}-{n}") for n in range(3)]

        @app_commands.command(name="secret", description="Answer only to the caller")
        async def secret(interaction: discord.Interaction) -> None:
            await interaction.response.send_message("only you can see this", ephemeral=True)
            bot.outcomes.put_nowait(Outcome("secret", ""))

        @app_commands.command(name="buttons", description="A message with a Cancel button")
        async def buttons(interaction: discord.Interaction) -> None:
            await interaction.response.send_message("working…", view=CancelView(bot))
            bot.outcomes.put_nowait(Outcome("buttons", ""))

        @app_commands.command(name="later", description="Think, then answer with a follow-up")
        async def later(interaction: discord.Interaction) -> None:
            await interaction.response.defer(thinking=True)
            await interaction.followup.send("answered by follow-up", wait=True)
            bot.outcomes.put_nowait(Outcome("later", ""))

        @app_commands.command(name="dmme", description="Send the caller a DM")
        async def dmme(interaction: discord.Interaction) -> None:
            await interaction.user.send("hello in private")
            await interaction.response.send_message("check your DMs", ephemeral=True)
            bot.outcomes.put_nowait(Outcome("dmme", ""))

        self.tree.add_command(fluxresult)
        self.tree.add_command(secret)
        self.tree.add_command(buttons)
        self.tree.add_command(dmme)
        self.tree.add_command(later)


class CancelView(discord.ui.View):
    def __init__(self, bot: ProbeBot) -> None:
        super().__init__(timeout=30)
        self.bot = bot

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.danger, custom_id="flux:cancel")
    async def cancel(self, interaction: discord.Interaction, button: discord.ui.Button[CancelView]) -> None:
        self.bot.clicks.append(button.custom_id or "")
        await interaction.response.edit_message(content="cancelled", view=None)


@pytest.fixture
async def bot(fake_discord: FakeDiscord) -> ProbeBot:
    return ProbeBot()


def _is(route: str) -> Callable[[RecordedRequest], bool]:
    def predicate(request: RecordedRequest) -> bool:
        return request.route == route

    return predicate


async def test_login_and_identify(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    async with asyncio.timeout(15), running_bot(bot, fake_discord.token, fake_discord):
        assert bot.user is not None
        assert bot.user.id == fake_discord.bot_user.id
        assert bot.application_id == fake_discord.application_id
        identify = fake_discord.identify_payload
        assert identify is not None and identify["token"] == fake_discord.token
        me = fake_discord.requests_to("get_me")[0]
        assert me.headers["authorization"] == f"Bot {fake_discord.token}"
        assert fake_discord.requests_to("get_application")
        # discord.py asks for a compressed stream; plain text frames are what it still accepts.
        assert fake_discord.gateway_received[0]["op"] in (1, 2)
    assert fake_discord.unknown_requests == []


async def test_bad_token_fails_login(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    async with asyncio.timeout(15):
        with pytest.raises(discord.LoginFailure):
            async with running_bot(bot, "wrong-token", fake_discord):
                pass


async def test_defer_then_edit_with_file_and_embed(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    async with asyncio.timeout(15), running_bot(bot, fake_discord.token, fake_discord):
        inter = await fake_discord.send_interaction("fluxresult", {"task_id": "abc123"})
        outcome = await bot.next_outcome()
        assert outcome.error is None

        callback = fake_discord.requests_to("interaction_callback")[0]
        assert callback.body == {"type": CALLBACK_DEFER}
        assert callback.query.get("with_response") in ("1", "true")
        assert "authorization" not in callback.headers

        edit = fake_discord.requests_to("webhook_edit_original")[0]
        assert edit.multipart and edit.status == 200
        assert [f.data for f in edit.files] == [PNG]
        assert edit.files[0].filename == "result.png"
        assert edit.body["content"] == "Result for abc123"
        assert edit.body["embeds"][0]["image"]["url"] == "attachment://result.png"

        original = await fake_discord.wait_for_original(inter, lambda m: not m.loading, timeout=STEP)
        assert original.content == "Result for abc123"
        assert original.attachment("result.png").data == PNG
        assert original.attachment("result.png").content_type == "image/png"
        assert original.embeds[0]["title"] == "Task abc123"
        assert [m.loading for m in fake_discord.original_history(inter)] == [True, False]

        # The attachment URL the fake hands out serves the bytes, as Discord's CDN would.
        async with aiohttp.ClientSession() as session, session.get(original.attachments[0].url) as response:
            assert await response.read() == PNG


async def test_ephemeral_reply_has_flag_64(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    async with asyncio.timeout(15), running_bot(bot, fake_discord.token, fake_discord):
        inter = await fake_discord.send_interaction("secret", dm=True)
        assert (await bot.next_outcome()).error is None
        callback = await fake_discord.wait_for_request(_is("interaction_callback"), STEP)
        assert callback.body["type"] == CALLBACK_MESSAGE
        assert callback.body["data"]["flags"] & FLAG_EPHEMERAL
        original = fake_discord.original(inter)
        assert original is not None and original.ephemeral
        assert original.content == "only you can see this"


async def test_webhook_429_with_via_is_retried(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    injection = fake_discord.inject_rate_limit("PATCH", r"/messages/@original$", retry_after=0.1, via=True)
    async with asyncio.timeout(15), running_bot(bot, fake_discord.token, fake_discord):
        inter = await fake_discord.send_interaction("fluxresult", {"task_id": "rl"})
        assert (await bot.next_outcome()).error is None
        edits = fake_discord.requests_to("webhook_edit_original")
        assert [(e.status, e.injected) for e in edits] == [(429, True), (200, False)]
        assert edits[1].at - edits[0].at >= 0.09
        assert injection.hits == 1
        original = fake_discord.original(inter)
        assert original is not None and original.content == "Result for rl"


async def test_webhook_429_without_via_raises(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    fake_discord.inject_rate_limit("PATCH", r"/messages/@original$", retry_after=0.1, via=False)
    async with asyncio.timeout(15), running_bot(bot, fake_discord.token, fake_discord):
        await fake_discord.send_interaction("fluxresult", {"task_id": "ban"})
        outcome = await bot.next_outcome()
        assert isinstance(outcome.error, discord.HTTPException)
        assert outcome.error.status == 429
        assert len(fake_discord.requests_to("webhook_edit_original")) == 1


async def test_killed_token_edit_fails_with_50027(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    async with asyncio.timeout(15), running_bot(bot, fake_discord.token, fake_discord):
        inter = await fake_discord.send_interaction("fluxresult", {"task_id": "hold-1"})
        await fake_discord.wait_for_callback(inter, STEP)
        fake_discord.kill_token(inter)
        bot.release.set()
        outcome = await bot.next_outcome()
        assert isinstance(outcome.error, discord.HTTPException)
        assert (outcome.error.status, outcome.error.code) == (401, 50027)
        original = fake_discord.original(inter)
        assert original is not None and original.loading  # the edit never landed


async def test_late_callback_is_unknown_interaction(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    async with asyncio.timeout(15), running_bot(bot, fake_discord.token, fake_discord):
        inter = await fake_discord.send_interaction("fluxresult", {"task_id": "late"}, extra=None)
        fake_discord.make_late(inter)
        outcome = await bot.next_outcome()
        assert isinstance(outcome.error, discord.NotFound)
        assert outcome.error.code == 10062


async def test_button_click_reaches_view_and_updates_message(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    async with asyncio.timeout(15), running_bot(bot, fake_discord.token, fake_discord):
        inter = await fake_discord.send_interaction("buttons")
        assert (await bot.next_outcome()).error is None
        original = await fake_discord.wait_for_original(inter, timeout=STEP)
        button = original.components[0]["components"][0]
        assert button["custom_id"] == "flux:cancel"

        click = await fake_discord.send_component_interaction("flux:cancel", inter)
        await fake_discord.wait_for_callback(click, STEP)
        assert bot.clicks == ["flux:cancel"]
        assert click.callback_type == CALLBACK_UPDATE
        assert original.content == "cancelled"
        assert original.components == []


async def test_autocomplete_answer_is_recorded(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    async with asyncio.timeout(15), running_bot(bot, fake_discord.token, fake_discord):
        inter = await fake_discord.send_autocomplete("fluxresult", {"task_id": "ab"}, focused="task_id")
        answered = await fake_discord.wait_for_callback(inter, STEP)
        assert answered.autocomplete_choices == [{"name": f"ab-{n}", "value": f"ab-{n}"} for n in range(3)]


async def test_dm_send_creates_channel_and_message(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    async with asyncio.timeout(15), running_bot(bot, fake_discord.token, fake_discord):
        inter = await fake_discord.send_interaction("dmme")
        assert (await bot.next_outcome()).error is None
        # discord.py sends the snowflake as a JSON number; Discord takes both.
        assert int(fake_discord.requests_to("create_dm")[0].body["recipient_id"]) == inter.user_id
        [dm] = fake_discord.dm_messages(inter.user_id)
        assert dm.content == "hello in private"


async def test_tree_sync_is_recorded(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    async with asyncio.timeout(15), running_bot(bot, fake_discord.token, fake_discord):
        synced = await bot.tree.sync()
        names = ["buttons", "dmme", "fluxresult", "later", "secret"]
        assert sorted(c.name for c in synced) == names
        [(scope, body)] = fake_discord.command_syncs
        assert scope is None
        assert sorted(c["name"] for c in body) == names
        # Interactions now carry the registered command id, as Discord's do.
        inter = await fake_discord.send_interaction("secret")
        assert inter.payload["data"]["id"] == str(next(c.id for c in synced if c.name == "secret"))
        assert (await bot.next_outcome()).error is None


async def test_injected_5xx_is_retried_by_discordpy(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    async with asyncio.timeout(15), running_bot(bot, fake_discord.token, fake_discord):
        fake_discord.inject("PATCH", r"/messages/@original$", 500)
        inter = await fake_discord.send_interaction("fluxresult", {"task_id": "5xx"})
        assert (await bot.next_outcome()).error is None  # discord.py slept 1 s and retried
        assert [e.status for e in fake_discord.requests_to("webhook_edit_original")] == [500, 200]
        assert fake_discord.original(inter) is not None


async def test_upload_limit_answers_413(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    fake_discord.upload_limit = len(PNG) - 1
    async with asyncio.timeout(15), running_bot(bot, fake_discord.token, fake_discord):
        await fake_discord.send_interaction("fluxresult", {"task_id": "big"})
        outcome = await bot.next_outcome()
        assert isinstance(outcome.error, discord.HTTPException)
        assert (outcome.error.status, outcome.error.code) == (413, 40005)


async def test_discordpy_bodies_pass_the_schema(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    if openapi_check.get_spec() is None:
        pytest.skip("Discord OpenAPI spec not available")
    async with asyncio.timeout(15), running_bot(bot, fake_discord.token, fake_discord):
        await bot.tree.sync()
        inter = await fake_discord.send_interaction("fluxresult", {"task_id": "schema"})
        await bot.next_outcome()
        await fake_discord.send_interaction("buttons")
        await bot.next_outcome()
        await fake_discord.send_component_interaction("flux:cancel", inter)
    checked = [r for r in fake_discord.requests if r.body is not None]
    assert {r.route for r in checked} >= {"interaction_callback", "webhook_edit_original", "put_commands"}
    for request in checked:
        assert openapi_check.validate_request(request.method, request.path, request.body) == []
    # The fake's own answers match the response schemas discord.py was written against.
    original = fake_discord.original(inter)
    assert original is not None
    assert openapi_check.validate_component("MessageResponse", original.to_api()) == []
    callback = fake_discord.requests_to("interaction_callback")[0]
    assert openapi_check.validate_component("InteractionCallbackResponse", callback.response) == []


async def test_schema_check_catches_bad_bodies() -> None:
    if openapi_check.get_spec() is None:
        pytest.skip("Discord OpenAPI spec not available")
    errors = openapi_check.validate_request("PATCH", "/webhooks/1/tok/messages/@original", {"content": 5})
    assert errors and "$.content" in errors[0]
    errors = openapi_check.validate_request(
        "POST", "/interactions/1/tok/callback", {"type": 4, "data": {"content": "x" * 2001}}
    )
    assert errors and "$.data.content" in errors[0]
    assert openapi_check.validate_request("POST", "/interactions/1/tok/callback", {"type": 5}) == []
    assert openapi_check.validate_request("POST", "/channels/1/messages", {"content": "hi"}) == []


async def test_fake_rejects_invalid_body_like_discord() -> None:
    if openapi_check.get_spec() is None:
        pytest.skip("Discord OpenAPI spec not available")
    async with asyncio.timeout(10), started_fake() as fake:
        fake.add_channel(42)
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                f"{fake.rest_base}/channels/42/messages",
                json={"content": 123},
                headers={"Authorization": f"Bot {fake.token}"},
            )
            assert response.status == 400
            assert response.headers["Content-Type"] == "application/json"
            assert (await response.json())["code"] == 50035
            response = await session.get(f"{fake.rest_base}/nowhere")
            assert response.status == 404
            assert await response.json() == {"message": "404: Not Found", "code": 0}
        assert len(fake.schema_errors) == 1 and "$.content" in fake.schema_errors[0]
        assert [r.path for r in fake.unknown_requests] == ["/nowhere"]


async def test_followup_after_thinking_defer_replaces_loading_message(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    async with asyncio.timeout(15), running_bot(bot, fake_discord.token, fake_discord):
        inter = await fake_discord.send_interaction("later")
        assert (await bot.next_outcome()).error is None
        original = fake_discord.original(inter)
        assert original is not None and not original.loading
        assert original.content == "answered by follow-up"
        assert fake_discord.followups(inter) == []


async def test_gateway_drop_is_resumed(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    async with asyncio.timeout(15), running_bot(bot, fake_discord.token, fake_discord):
        ready = next(p for p in fake_discord.gateway_sent if p.get("t") == "READY")
        await fake_discord.disconnect_gateway()
        await fake_discord.wait_until_identified(STEP)
        [resume] = fake_discord.resume_payloads
        assert resume["session_id"] == ready["d"]["session_id"]
        assert len(fake_discord.identify_payloads) == 1
        await fake_discord.send_interaction("secret")
        assert (await bot.next_outcome()).error is None


async def test_expired_token_and_bounded_waits(fake_discord: FakeDiscord, bot: ProbeBot) -> None:
    async with asyncio.timeout(15), running_bot(bot, fake_discord.token, fake_discord):
        inter = await fake_discord.send_interaction("fluxresult", {"task_id": "hold-2"})
        await fake_discord.wait_for_callback(inter, STEP)
        fake_discord.token_lifetime = 0.0  # every token is now older than Discord's 15 minutes
        bot.release.set()
        outcome = await bot.next_outcome()
        assert isinstance(outcome.error, discord.HTTPException) and outcome.error.code == 50027
        with pytest.raises(TimeoutError, match="waiting for a matching request"):
            await fake_discord.wait_for_request(lambda r: r.route == "never", timeout=0.05)
