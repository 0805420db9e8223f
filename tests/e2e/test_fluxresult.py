"""/fluxresult end to end: the real bot and discord.py against a fake Discord and a fake CometAPI."""

from __future__ import annotations

import io
import itertools

from PIL import Image

from bot.delivery import CANCEL_PREFIX
from tests.e2e.conftest import FluxEnv, png_bytes
from tests.fakes.comet import Answer
from tests.fakes.discord import FakeMessage, FakeUser

EPHEMERAL = 64


def embed_of(message: FakeMessage) -> dict[str, object]:
    assert message.embeds, f"no embed on message {message.id}: {message.content!r}"
    return message.embeds[0]


def field_values(message: FakeMessage) -> dict[str, str]:
    fields = embed_of(message).get("fields") or []
    assert isinstance(fields, list)
    return {f["name"]: f["value"] for f in fields}


async def test_ready_task_ends_with_the_served_image_attached(flux: FluxEnv) -> None:
    image = png_bytes()
    url = flux.comet.add_image("kite.png", image)
    # About 1.5 s of Pending at the fast test pace: long enough for a paced status edit.
    flux.comet.script(
        "task-1",
        *[Answer.pending(n / 10) for n in range(10)],
        Answer.ready(url, prompt="a red kite @everyone", seed=4041919005, duration=7.2),
    )
    async with flux.bot():
        interaction = await flux.command("task-1")
        final = await flux.final(interaction)

    assert interaction.callback_type == 5 and not (interaction.callback_body.get("data") or {}).get("flags")
    assert final.attachments[0].data == image
    assert final.attachments[0].filename == "flux-task-1.png"
    embed = embed_of(final)
    assert embed["image"] == {"url": "attachment://flux-task-1.png"} or embed["image"]["url"].endswith(  # type: ignore[index]
        "flux-task-1.png")
    assert "@everyone" not in str(embed["description"])  # escaped, so it cannot ping
    assert field_values(final)["Seed"] == "`4041919005`"
    history = flux.discord.original_history(interaction)
    statuses = [field_values(m).get("Status") for m in history if m.embeds]
    assert "`Pending`" in statuses, statuses
    # Status edits are paced to about one a second; the final one is not held back.
    status_edits = [r.at for r in flux.discord.requests_to("webhook_edit_original") if not r.files]
    gaps = [b - a for a, b in itertools.pairwise(status_edits)]
    assert gaps and min(gaps) >= 0.9, gaps
    # Every message the bot wrote tells Discord to parse no mentions.
    edits = flux.discord.requests_to("webhook_edit_original")
    assert edits and all(r.body.get("allowed_mentions") == {"parse": []} for r in edits)
    assert flux.comet.polls["task-1"] == 11
    assert flux.comet.image_hits["kite.png"] == 1
    assert flux.comet.image_auth_seen == []
    assert not flux.discord.unknown_requests


async def test_private_request_is_ephemeral(flux: FluxEnv) -> None:
    flux.comet.script("task-p", Answer.ready(flux.comet.add_image("p.png", png_bytes())))
    async with flux.bot():
        interaction = await flux.command("task-p", private=True)
        final = await flux.final(interaction)
    assert interaction.callback_body["data"]["flags"] & EPHEMERAL
    assert final.ephemeral and final.attachments


async def test_invalid_id_gets_an_ephemeral_explanation_and_no_api_call(flux: FluxEnv) -> None:
    async with flux.bot():
        interaction = await flux.command("  not a valid id!  ")
        await flux.discord.wait_for_callback(interaction)
    assert interaction.callback_type == 4
    data = interaction.callback_body["data"]
    assert data["flags"] & EPHEMERAL
    assert "' '" in data["content"] and "'!'" in data["content"]
    assert flux.comet.total_requests == 0


async def test_task_not_found_says_so(flux: FluxEnv) -> None:
    async with flux.bot():
        interaction = await flux.command("expired-task")
        final = await flux.final(interaction)
    embed = embed_of(final)
    assert embed["title"] == "Task not found"
    assert "10 minutes" in str(embed["description"])
    assert not final.attachments


async def test_moderated_task_gives_the_reasons(flux: FluxEnv) -> None:
    flux.comet.script(
        "mod-1",
        Answer.pending(),
        Answer.status("Content Moderated", details={"Moderation Reasons": ["Derivative Works"]}),
    )
    async with flux.bot():
        interaction = await flux.command("mod-1")
        final = await flux.final(interaction)
    embed = embed_of(final)
    assert embed["title"] == "The task was moderated"
    assert "Derivative Works" in str(embed["description"])


async def test_cached_result_answers_without_polling_even_after_expiry(flux: FluxEnv) -> None:
    image = png_bytes()
    flux.comet.script("cache-1", Answer.ready(flux.comet.add_image("c.png", image)))
    async with flux.bot():
        first = await flux.final(await flux.command("cache-1"))
        assert first.attachments[0].data == image
        polls = flux.comet.polls["cache-1"]
        # The provider forgets the task; the bot must not.
        flux.comet.script("cache-1", Answer.status("Task not found"))
        second = await flux.final(await flux.command("cache-1"))
    assert second.attachments[0].data == image
    assert flux.comet.polls["cache-1"] == polls
    assert "cache" in str(embed_of(second).get("footer"))


async def test_cache_survives_a_restart(flux: FluxEnv) -> None:
    image = png_bytes()
    flux.comet.script("persist-1", Answer.ready(flux.comet.add_image("pp.png", image)))
    async with flux.bot():
        await flux.final(await flux.command("persist-1"))
    flux.comet.script("persist-1", Answer.status("Task not found"))
    async with flux.bot():
        again = await flux.final(await flux.command("persist-1"))
    assert again.attachments[0].data == image
    assert flux.comet.polls["persist-1"] == 1


async def test_only_the_asker_can_cancel(flux: FluxEnv) -> None:
    flux.comet.script("slow-1", Answer.pending(0.1))
    asker, other = FakeUser(5001, "asker"), FakeUser(5002, "other")
    async with flux.bot():
        interaction = await flux.command("slow-1", user=asker)
        running = await flux.discord.wait_for_original(interaction, lambda m: bool(m.components))
        button = running.components[0]["components"][0]
        assert button["custom_id"].startswith(CANCEL_PREFIX)

        click = await flux.discord.send_component_interaction(button["custom_id"], interaction, user=other)
        await flux.discord.wait_for_callback(click)
        assert click.callback_type == 4
        assert click.callback_body["data"]["flags"] & EPHEMERAL
        assert "Only <@5001> can cancel" in click.callback_body["data"]["content"]

        click = await flux.discord.send_component_interaction(button["custom_id"], interaction, user=asker)
        final = await flux.final(interaction)
        polls = flux.comet.polls["slow-1"]
    assert "Cancelled by" in str(embed_of(final)["description"])
    assert flux.comet.polls["slow-1"] == polls  # polling stopped with the follow


async def test_autocomplete_offers_the_askers_recent_ids(flux: FluxEnv) -> None:
    user = FakeUser(6001, "someone")
    async with flux.bot():
        for task_id in ("alpha-1", "alpha-2", "beta-1"):
            await flux.final(await flux.command(task_id, user=user))
        ask = await flux.discord.send_autocomplete("fluxresult", {"id": "al"}, focused="id", user=user)
        answered = await flux.discord.wait_for_callback(ask)
        stranger = await flux.discord.send_autocomplete("fluxresult", {"id": ""}, focused="id", user=7001)
        answered_stranger = await flux.discord.wait_for_callback(stranger)
    assert [c["value"] for c in answered.autocomplete_choices or []] == ["alpha-2", "alpha-1"]
    assert answered_stranger.autocomplete_choices == []


async def test_image_larger_than_the_upload_limit_is_reencoded_to_fit(flux: FluxEnv) -> None:
    big = png_bytes(900, 700, noise=True)
    limit = 300 * 1024
    assert len(big) > limit
    flux.comet.script("big-1", Answer.ready(flux.comet.add_image("big.png", big)))
    async with flux.bot():
        interaction = await flux.command("big-1", attachment_size_limit=limit)
        final = await flux.final(interaction, timeout=30)
    attachment = final.attachments[0]
    assert attachment.size <= limit
    with Image.open(io.BytesIO(attachment.data)) as decoded:
        assert abs(decoded.width / decoded.height - 900 / 700) < 0.02
    assert "re-encoded" in str(embed_of(final).get("footer"))


async def test_followers_of_one_task_share_one_poll_loop(flux: FluxEnv) -> None:
    pending = [Answer.pending(p / 10) for p in range(8)]
    flux.comet.script("solo", *pending, Answer.ready(flux.comet.add_image("solo.png", png_bytes())))
    flux.comet.script("shared", *pending, Answer.ready(flux.comet.add_image("shared.png", png_bytes())))
    async with flux.bot():
        await flux.final(await flux.command("solo"))
        interactions = [await flux.command("shared", user=FakeUser(8000 + n, f"u{n}")) for n in range(3)]
        finals = [await flux.final(i) for i in interactions]
    assert all(f.attachments for f in finals)
    assert flux.comet.polls["shared"] == flux.comet.polls["solo"]
    assert flux.comet.image_hits["shared.png"] == 1


async def test_per_user_limit_refuses_before_any_api_call(flux: FluxEnv) -> None:
    flux.comet.script("busy-1", Answer.pending())
    user = FakeUser(9001, "eager")
    async with flux.bot(FLUXBOT_MAX_ACTIVE_PER_USER="1"):
        first = await flux.command("busy-1", user=user)
        await flux.discord.wait_for_original(first, lambda m: bool(m.components))
        second = await flux.command("busy-2", user=user)
        await flux.discord.wait_for_callback(second)
    assert second.callback_type == 4
    assert second.callback_body["data"]["flags"] & EPHEMERAL
    assert "already following 1" in second.callback_body["data"]["content"]
    assert flux.comet.polls["busy-2"] == 0


async def test_timeout_reports_the_last_status(flux: FluxEnv) -> None:
    flux.comet.script("stuck-1", Answer.pending(status="Queued"))
    async with flux.bot(FLUXBOT_POLL_TIMEOUT="1"):
        final = await flux.final(await flux.command("stuck-1"), timeout=15)
    embed = embed_of(final)
    assert embed["title"] == "Still not ready"
    assert "`Queued`" in str(embed["description"])
