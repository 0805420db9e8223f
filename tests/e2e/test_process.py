"""``python -m bot`` as a real process: hard kills, SIGTERM, start-up errors, command sync, secrets.

The bot runs as a child process (see ``tests/e2e/process.py``) against the fake Discord and the
fake CometAPI, which run in the test's event loop. It polls at its default pace (first poll at
once, then about 1 s, 1.25 s, ...), so the scripts here stay short.
"""

from __future__ import annotations

import logging
import re
import signal
import sqlite3
import stat
import sys
import time
from pathlib import Path

import pytest

from bot.__main__ import RedactingFormatter
from bot.store import DB_FILENAME, IMAGES_DIRNAME
from tests.e2e.conftest import FluxEnv
from tests.e2e.process import bot_process
from tests.fakes.comet import Answer, tiny_png
from tests.fakes.discord import DEFAULT_GUILD_ID, FakeInteraction, FakeMessage, FakeUser

pytestmark = pytest.mark.timeout(60)

# Generous bounds: a process start costs about a second, a follow's first poll is immediate and the
# next ones come about 1 s, 1.25 s, 1.6 s apart.
STATUS_TIMEOUT = 10.0
FINAL_TIMEOUT = 15.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# discord.utils.setup_logging's formats, with colour ("2026-01-02 03:04:05 INFO     logger message") and
# without ("[2026-01-02 03:04:05] [INFO    ] logger: message")
LOG_RECORD = re.compile(r"^\[?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\]? \[?(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")


def cwd_of(flux: FluxEnv) -> Path:
    """An empty working directory for the bot: no ``.env`` from anywhere can be read."""
    return flux.data_dir.parent / "cwd"


def status_of(message: FakeMessage) -> str | None:
    if not message.embeds:
        return None
    for item in message.embeds[0].get("fields") or []:
        if item.get("name") == "Status":
            return str(item.get("value"))
    return None


def embed_text(message: FakeMessage) -> str:
    if not message.embeds:
        return message.content
    embed = message.embeds[0]
    return f"{embed.get('title', '')}\n{embed.get('description', '')}"


def is_pending(message: FakeMessage) -> bool:
    return status_of(message) == "`Pending`" and bool(message.components)


def is_final_with_image(message: FakeMessage) -> bool:
    return bool(message.attachments) and not message.components and not message.loading


async def wait_final_image(flux: FluxEnv, interaction: FakeInteraction) -> FakeMessage:
    message = await flux.discord.wait_for_original(interaction, is_final_with_image, timeout=FINAL_TIMEOUT)
    return message.snapshot()


def image_for(index: int) -> bytes:
    return tiny_png(8 + index, 6 + index, (40 * index % 256, 200, 90))


def open_follow_count(data_dir: Path) -> int:
    with sqlite3.connect(f"file:{data_dir / DB_FILENAME}?mode=ro", uri=True) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM follows").fetchone()
    return int(count)


def files_holding(data_dir: Path, secret: str) -> list[Path]:
    """Files in the data directory (database, WAL, images) whose bytes contain ``secret``."""
    needle = secret.encode()
    return [p for p in sorted(data_dir.rglob("*")) if p.is_file() and needle in p.read_bytes()]


def edits_with_image(flux: FluxEnv, interaction: FakeInteraction, since: int) -> list[int]:
    """Sequence numbers of PATCH .../webhooks/{app}/{token}/messages/@original carrying a file."""
    return [
        r.seq for r in flux.discord.requests_to("webhook_edit_original")
        if r.seq > since and interaction.token in r.path and r.files and r.status == 200
    ]


def last_seq(flux: FluxEnv) -> int:
    return flux.discord.requests[-1].seq if flux.discord.requests else 0


# --------------------------------------------------------------------------- crash and restart


async def test_sigkill_with_follows_pending_then_restart_delivers_each_image_in_its_reply(flux: FluxEnv) -> None:
    tasks = [f"kill-task-{n}" for n in range(3)]
    users = [FakeUser(8101 + n, f"asker{n}") for n in range(3)]
    for task_id in tasks:
        flux.comet.script(task_id, Answer.pending(0.2))

    async with bot_process(flux.env, cwd=cwd_of(flux), fake=flux.discord) as first:
        await first.wait_connected(flux.discord)
        interactions = [await flux.command(t, user=u) for t, u in zip(tasks, users, strict=True)]
        replies = [
            (await flux.discord.wait_for_original(i, is_pending, timeout=STATUS_TIMEOUT)).id for i in interactions
        ]
        assert open_follow_count(flux.data_dir) == 3  # recorded before the first poll, so a crash keeps them
        assert await first.kill() == -signal.SIGKILL

    after_kill = last_seq(flux)
    polls_before = {t: flux.comet.polls[t] for t in tasks}
    images = {t: image_for(n) for n, t in enumerate(tasks)}
    for task_id, data in images.items():
        flux.comet.script(task_id, Answer.ready(flux.comet.add_image(f"{task_id}.png", data)))

    async with bot_process(flux.env, cwd=cwd_of(flux), fake=flux.discord) as second:
        # Nobody sends a command: the restarted bot picks the follows up from its data dir by itself.
        finals = [await wait_final_image(flux, i) for i in interactions]
        assert await second.stop() == 0

    for n, (task_id, interaction, final) in enumerate(zip(tasks, interactions, finals, strict=True)):
        assert final.id == replies[n], "the image must land in the original reply, not a new message"
        assert [a.data for a in final.attachments] == [images[task_id]]
        assert edits_with_image(flux, interaction, since=after_kill), "no PATCH @original with the image"
        assert flux.comet.polls[task_id] > polls_before[task_id]
        assert not flux.discord.followups(interaction)
    assert not flux.discord.requests_to("channel_message")
    assert not flux.discord.requests_to("create_dm")
    assert open_follow_count(flux.data_dir) == 0
    holders = [path.name for i in interactions for path in files_holding(flux.data_dir, i.token)]
    assert not holders, f"an interaction token outlived its follow in {holders}"


async def test_sigterm_says_restarting_exits_0_fast_and_the_next_start_finishes(flux: FluxEnv) -> None:
    tasks = ["term-task-a", "term-task-b"]
    users = [FakeUser(8201, "alice"), FakeUser(8202, "bob")]
    for task_id in tasks:
        flux.comet.script(task_id, Answer.pending(0.4))

    async with bot_process(flux.env, cwd=cwd_of(flux), fake=flux.discord) as first:
        await first.wait_connected(flux.discord)
        interactions = [await flux.command(t, user=u) for t, u in zip(tasks, users, strict=True)]
        for interaction in interactions:
            await flux.discord.wait_for_original(interaction, is_pending, timeout=STATUS_TIMEOUT)
        started = time.monotonic()
        first.send(signal.SIGTERM)
        code = await first.wait(timeout=8.0)
        took = time.monotonic() - started
    assert code == 0, first.describe()
    assert took < 5.0, f"SIGTERM took {took:.1f}s"

    for interaction in interactions:
        notice = flux.discord.original(interaction)
        assert notice is not None and not notice.components and not notice.loading
        text = embed_text(notice)
        assert "restarting" in text and "pick this task up again" in text, text
        assert not notice.attachments
    assert open_follow_count(flux.data_dir) == 2  # kept for the next start

    images = {t: image_for(n + 5) for n, t in enumerate(tasks)}
    for task_id, data in images.items():
        flux.comet.script(task_id, Answer.ready(flux.comet.add_image(f"{task_id}.png", data)))
    async with bot_process(flux.env, cwd=cwd_of(flux), fake=flux.discord) as second:
        finals = [await wait_final_image(flux, i) for i in interactions]
        assert await second.stop() == 0

    for task_id, final in zip(tasks, finals, strict=True):
        assert [a.data for a in final.attachments] == [images[task_id]]
    assert open_follow_count(flux.data_dir) == 0


# --------------------------------------------------------------------------- start-up errors


async def test_refused_token_exits_2_with_one_clear_line(flux: FluxEnv) -> None:
    # A missing DISCORD_TOKEN is covered by tests/test_config.py::test_cli_without_token_exits_2.
    wrong = "refused-token.not-the-fakes.0123456789"
    async with bot_process({**flux.env, "DISCORD_TOKEN": wrong}, cwd=cwd_of(flux), fake=flux.discord) as bot:
        code = await bot.wait(timeout=15.0)
    assert code == 2, bot.describe()
    assert [r.status for r in flux.discord.requests_to("get_me")] == [401]
    assert not flux.discord.identify_payloads  # it never went on to the gateway
    err = ANSI.sub("", bot.err)
    assert "Traceback" not in err
    # discord.py's own start-up log records may come first; the bot itself says exactly one thing.
    said = [line for line in err.splitlines() if line.strip() and not LOG_RECORD.match(line)]
    assert len(said) == 1, err
    assert "DISCORD_TOKEN" in said[0] and "refused" in said[0]
    levels = [m.group(1) for m in map(LOG_RECORD.match, err.splitlines()) if m]
    assert "ERROR" not in levels and "CRITICAL" not in levels, err
    assert wrong not in bot.output() and flux.comet.api_key not in bot.output()
    assert bot.out == ""


# --------------------------------------------------------------------------- command sync


async def test_commands_sync_on_first_start_only_on_demand_and_to_the_dev_guild(flux: FluxEnv) -> None:
    syncs = flux.discord.command_syncs
    cwd = cwd_of(flux)

    async with bot_process(flux.env, cwd=cwd, fake=flux.discord) as bot:
        await bot.wait_connected(flux.discord)
        assert await bot.stop() == 0
    assert [scope for scope, _ in syncs] == [None]
    assert [c["name"] for c in syncs[0][1]] == ["fluxresult"]
    assert [r.route for r in flux.discord.requests if r.method == "PUT"] == ["put_commands"]

    async with bot_process(flux.env, cwd=cwd, fake=flux.discord) as bot:
        await bot.wait_connected(flux.discord)
        assert await bot.stop() == 0
    assert len(syncs) == 1, "same command set, same scope: the second start must not sync"

    identified = len(flux.discord.identify_payloads)
    async with bot_process(flux.env, "sync", cwd=cwd, fake=flux.discord) as bot:
        assert await bot.wait(timeout=15.0) == 0, bot.describe()
    assert [scope for scope, _ in syncs] == [None, None]
    assert len(flux.discord.identify_payloads) == identified  # sync does not connect to the gateway

    guild_env = {**flux.env, "FLUXBOT_DEV_GUILD_ID": str(DEFAULT_GUILD_ID)}
    async with bot_process(guild_env, cwd=cwd, fake=flux.discord) as bot:
        await bot.wait_connected(flux.discord)
        assert await bot.stop() == 0
    assert [scope for scope, _ in syncs] == [None, None, DEFAULT_GUILD_ID]
    put = flux.discord.requests_to("put_guild_commands")
    assert len(put) == 1 and put[0].path == (
        f"/applications/{flux.discord.application_id}/guilds/{DEFAULT_GUILD_ID}/commands")
    assert [c["name"] for c in syncs[-1][1]] == ["fluxresult"]


# --------------------------------------------------------------------------- secrets


async def test_a_whole_run_prints_no_secret_and_keeps_the_data_dir_private(flux: FluxEnv) -> None:
    image = image_for(9)
    flux.comet.script("secret-task", Answer.pending(0.5), Answer.ready(flux.comet.add_image("s.png", image)))
    # At DEBUG discord.py logs request URLs and gateway payloads, where interaction tokens live.
    settings = {**flux.env, "FLUXBOT_LOG_LEVEL": "DEBUG"}
    async with bot_process(settings, cwd=cwd_of(flux), fake=flux.discord) as bot:
        await bot.wait_connected(flux.discord)
        interaction = await flux.command("secret-task", user=FakeUser(8301, "carol"))
        final = await wait_final_image(flux, interaction)
        assert await bot.stop() == 0

    assert [a.data for a in final.attachments] == [image]
    output = bot.output()
    # The capture did see the bot's log, requests and gateway events included, so absence means something.
    assert "stopping" in output and "INTERACTION_CREATE" in output and "/webhooks/" in output
    for name, secret in (("the bot token", flux.discord.token), ("the API key", flux.comet.api_key),
                         ("the interaction token", interaction.token)):
        assert secret not in output, f"{name} was printed"
    assert flux.comet.auth_seen and set(flux.comet.auth_seen) == {f"Bearer {flux.comet.api_key}"}

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(flux.data_dir) == 0o700
    assert mode(flux.data_dir / IMAGES_DIRNAME) == 0o700
    assert mode(flux.data_dir / DB_FILENAME) == 0o600
    for side in ("-wal", "-shm"):
        extra = flux.data_dir / (DB_FILENAME + side)
        if extra.exists():
            assert mode(extra) == 0o600, extra
    holders = [path.name for path in files_holding(flux.data_dir, interaction.token)]
    assert not holders, f"the interaction token outlived its follow in {holders}"


def test_log_redaction_covers_messages_and_tracebacks() -> None:
    token = "aW50ZXJhY3Rpb246" + "x" * 40
    formatter = RedactingFormatter(logging.Formatter("%(levelname)s %(message)s"), ("bot.tok", "api-key-1"))
    try:
        raise RuntimeError(f"PATCH https://discord.com/api/v10/webhooks/1/{token}/messages/@original failed")
    except RuntimeError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "sent %s with %s and %r", (
            "bot.tok", "api-key-1", {"token": "other-shape-token"}), sys.exc_info())
    text = formatter.format(record)
    for secret in ("bot.tok", "api-key-1", "other-shape-token", token, "x" * 40):
        assert secret not in text
    assert "/webhooks/1/********/messages/@original" in text and "Traceback" in text
