"""Never lose a result: the whole pipeline, once per fault, ends with one true final message.

Each row of ``FAULTS`` arranges one fault on the fake CometAPI (its answers, its image host) or on the
fake Discord (injected answers, dead tokens, upload limits), runs ``/fluxresult`` through the real bot
and discord.py, waits (bounded) until the follow has delivered, and then checks:

* exactly one final message exists for the person, in the place the fault leaves open (the original
  reply, a channel message mentioning only the asker, a DM, or, when nothing works, an error log line);
* that message says what really happened (the row's ``check``), which includes the visible effect of
  the specific handling, so the row fails if that handling is removed.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from bot.client import FluxBot
from tests.e2e.conftest import FastFluxBot, FluxEnv, png_bytes
from tests.fakes.comet import Answer
from tests.fakes.discord import FakeInteraction, FakeMessage, FakeUser, RecordedRequest

EPHEMERAL = 64
ASKER = FakeUser(4_242_000_001, "asker")
STEP = 20.0  # bound for any single wait in this module

Where = Literal["original", "channel", "dm", "lost"]
WHERE: dict[str, Where] = {"edited": "original", "channel": "channel", "dm": "dm", "lost": "lost"}


# --------------------------------------------------------------------------- helpers


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels over a tiny body: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


IMAGE = png_bytes()
BIG = png_bytes(320, 240, noise=True)
INJ = png_bytes(160, 120, noise=True)


def embed_of(message: FakeMessage) -> dict[str, Any]:
    assert message.embeds, f"no embed on message {message.id}: {message.content!r}"
    return message.embeds[0]


def title(message: FakeMessage) -> str:
    return str(embed_of(message).get("title"))


def text_of(message: FakeMessage) -> str:
    """Everything a person reads in the message."""
    embed = embed_of(message)
    fields = " ".join(f"{f['name']}: {f['value']}" for f in embed.get("fields") or [])
    footer = (embed.get("footer") or {}).get("text", "")
    return f"{message.content} {embed.get('title')} {embed.get('description')} {fields} {footer}"


def is_final(message: FakeMessage) -> bool:
    return not message.loading and not message.components and bool(message.embeds or message.content)


def status_is(status: str) -> Callable[[FakeMessage], bool]:
    def check(message: FakeMessage) -> bool:
        fields = (message.embeds[0].get("fields") or []) if message.embeds else []
        return bool(message.components) and any(f["name"] == "Status" and f["value"] == f"`{status}`"
                                                 for f in fields)

    return check


def token_requests(flux: FluxEnv, interaction: FakeInteraction) -> list[RecordedRequest]:
    return [r for r in flux.discord.requests if interaction.token in r.path]


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` (state owned by the bot: no event to wait on), at most ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}") from None


@dataclass
class Run:
    flux: FluxEnv
    bot: FluxBot
    task_id: str
    interaction: FakeInteraction
    where: Where
    message: FakeMessage | None
    elapsed: float
    logs: list[logging.LogRecord]


Arrange = Callable[[FluxEnv, str], None]
During = Callable[[FluxEnv, FakeInteraction, str], Awaitable[None]]
Check = Callable[[Run], None]


@dataclass(frozen=True)
class Fault:
    id: str
    arrange: Arrange
    check: Check
    where: Where = "original"
    settings: Mapping[str, str] = field(default_factory=dict)
    command: Mapping[str, Any] = field(default_factory=dict)
    during: During | None = None
    #: seconds the whole follow may take, from the command to its one final message
    within: float = 10.0


def finals_for(flux: FluxEnv, interaction: FakeInteraction) -> list[tuple[Where, FakeMessage]]:
    """Every final message the person could see for this interaction."""
    found: list[tuple[Where, FakeMessage]] = []
    original = flux.discord.original(interaction)
    if original is not None and is_final(original):
        found.append(("original", original))
    for message in flux.discord.channel_messages(interaction.channel_id):
        if message.webhook_id is None and message.id != interaction.original_message_id:
            found.append(("channel", message))
    found.extend(("dm", message) for message in flux.discord.dm_messages(interaction.user_id))
    return found


async def run_fault(flux: FluxEnv, fault: Fault, caplog: pytest.LogCaptureFixture) -> Run:
    task_id = f"fault-{fault.id}"
    fault.arrange(flux, task_id)
    caplog.set_level(logging.INFO)
    async with flux.bot(FastFluxBot, **fault.settings) as bot:
        started = time.monotonic()
        interaction = await flux.command(task_id, user=ASKER, **fault.command)
        if fault.during is not None:
            await fault.during(flux, interaction, task_id)
        await until(lambda: sum(bot.follows.delivered.values()) >= 1, fault.within, "the follow to deliver")
        elapsed = time.monotonic() - started
        await until(lambda: bot.follows.active == 0, STEP, "the follow to end")
        delivered = [k for k, v in bot.follows.delivered.items() if v]
    assert delivered in (["edited"], ["channel"], ["dm"], ["lost"]), bot.follows.delivered
    where = WHERE[delivered[0]]
    finals = finals_for(flux, interaction)
    if where == "lost":
        assert finals == [], finals
        message = None
    else:
        assert len(finals) == 1, f"expected exactly one final message, got {finals}"
        assert finals[0][0] == where
        message = finals[0][1].snapshot()
    run = Run(flux, bot, task_id, interaction, where, message, elapsed, list(caplog.records))
    assert where == fault.where, f"delivered to {where}, expected {fault.where}"
    assert elapsed <= fault.within
    return run


# --------------------------------------------------------------------------- arrangements


def script(*answers: Callable[[FluxEnv], Answer]) -> Arrange:
    def arrange(flux: FluxEnv, task_id: str) -> None:
        flux.comet.script(task_id, *(make(flux) for make in answers))

    return arrange


def fixed(answer: Answer) -> Callable[[FluxEnv], Answer]:
    return lambda _flux: answer


def ready_with(name: str, data: bytes = IMAGE, **image: Any) -> Callable[[FluxEnv], Answer]:
    def make(flux: FluxEnv) -> Answer:
        return Answer.ready(flux.comet.add_image(name, data, **image), prompt="a red kite")

    return make


def ready_at(url: Callable[[FluxEnv], str]) -> Callable[[FluxEnv], Answer]:
    return lambda flux: Answer.ready(url(flux))


def then(*steps: Arrange) -> Arrange:
    def arrange(flux: FluxEnv, task_id: str) -> None:
        for step in steps:
            step(flux, task_id)

    return arrange


def inject(method: str, path: str, status: int, *, times: int | None = 1, body: Any = None) -> Arrange:
    def arrange(flux: FluxEnv, _task: str) -> None:
        flux.discord.inject(method, path, status, body=body, times=times)

    return arrange


def rate_limit_now(retry_after: float, *, via: bool) -> Callable[[FluxEnv, FakeInteraction], None]:
    def fault(flux: FluxEnv, _interaction: FakeInteraction) -> None:
        flux.discord.inject_rate_limit("PATCH", ORIGINAL, retry_after=retry_after, via=via)

    return fault


def entity_too_large_now(flux: FluxEnv, _interaction: FakeInteraction) -> None:
    flux.discord.inject("PATCH", ORIGINAL, 413)


def server_error_now(flux: FluxEnv, _interaction: FakeInteraction) -> None:
    flux.discord.inject("PATCH", ORIGINAL, 500)


def upload_limit(limit: int) -> Arrange:
    def arrange(flux: FluxEnv, _task: str) -> None:
        flux.discord.upload_limit = limit

    return arrange


ORIGINAL = r"/webhooks/\d+/[^/]+/messages/@original"
CHANNEL_POST = r"/channels/\d+/messages"


async def _pending_shown(flux: FluxEnv, interaction: FakeInteraction) -> None:
    # The second status edit: from here the next state arrives inside the 1 s edit pacing window, so
    # the next PATCH on the token is the final one.
    await flux.discord.wait_for_original(interaction, status_is("Pending"), timeout=STEP)


def during_pending(fault: Callable[[FluxEnv, FakeInteraction], None], ready_name: str,
                   data: bytes = IMAGE) -> During:
    """Wait until the reply shows Pending, apply ``fault``, then let the task become ready."""

    async def during(flux: FluxEnv, interaction: FakeInteraction, task_id: str) -> None:
        await _pending_shown(flux, interaction)
        fault(flux, interaction)
        flux.comet.script(task_id, Answer.ready(flux.comet.add_image(ready_name, data), prompt="a red kite"))

    return during


PENDING = script(fixed(Answer.pending(0.5)))
#: progress that keeps changing, so the follow keeps editing its status about once a second
MOVING = script(*(fixed(Answer.pending(n / 100)) for n in range(1, 99)))


async def kill_during_status_edits(flux: FluxEnv, interaction: FakeInteraction, task_id: str) -> None:
    """Kill the token while status edits go on; the task only ends after the next edit was due."""
    await _pending_shown(flux, interaction)
    flux.discord.kill_token(interaction)
    await flux.discord.wait_for_request(lambda r: interaction.token in r.path and r.status == 401, timeout=STEP)
    await asyncio.sleep(1.5)  # more than the 1 s edit pacing: a careless follow would edit again here
    flux.comet.script(task_id, Answer.ready(flux.comet.add_image("deadstatus.png", IMAGE), prompt="a red kite"))


# --------------------------------------------------------------------------- checks


def has_image(data: bytes | None = IMAGE) -> Check:
    def check(run: Run) -> None:
        assert run.message is not None
        assert title(run.message) == "Your Flux image"
        assert len(run.message.attachments) == 1
        if data is not None:
            assert run.message.attachments[0].data == data

    return check


def titled(expected: str, *needles: str) -> Check:
    def check(run: Run) -> None:
        assert run.message is not None
        assert title(run.message) == expected, text_of(run.message)
        assert not run.message.attachments
        for needle in needles:
            assert needle in text_of(run.message), (needle, text_of(run.message))

    return check


def both(*checks: Check) -> Check:
    def check(run: Run) -> None:
        for one in checks:
            one(run)

    return check


def polls(expected: int) -> Check:
    def check(run: Run) -> None:
        assert run.flux.comet.polls[run.task_id] == expected

    return check


def poll_gap_at_least(seconds: float) -> Check:
    def check(run: Run) -> None:
        times = run.flux.comet.poll_times[run.task_id]
        assert len(times) >= 2 and times[1] - times[0] >= seconds, times

    return check


def image_hits(name: str, expected: int) -> Check:
    def check(run: Run) -> None:
        assert run.flux.comet.image_hits[name] == expected

    return check


def final_edit_after_injected(status: int, *, min_gap: float = 0.0) -> Check:
    """The final upload met an injected ``status`` and then landed (no earlier than ``min_gap`` later)."""

    def check(run: Run) -> None:
        edits = [r for r in token_requests(run.flux, run.interaction) if r.route == "webhook_edit_original"]
        hit = [r for r in edits if r.injected and r.status == status and r.files]
        assert hit, [str(r) for r in edits]
        landed = [r for r in edits if r.status == 200 and r.files and r.seq > hit[0].seq]
        assert landed, [str(r) for r in edits]
        assert landed[0].at - hit[0].at >= min_gap, (landed[0].at - hit[0].at)

    return check


def status_edit_met(status: int) -> Check:
    def check(run: Run) -> None:
        edits = [r for r in token_requests(run.flux, run.interaction) if r.route == "webhook_edit_original"]
        assert any(r.injected and r.status == status and not r.files for r in edits), [str(r) for r in edits]

    return check


def mentions_only_the_asker(run: Run) -> None:
    posts = [r for r in run.flux.discord.requests_to("channel_message") if r.status == 200]
    assert len(posts) == 1
    mentions = posts[0].body.get("allowed_mentions")
    assert mentions is not None and [int(u) for u in mentions.get("users", [])] == [ASKER.id], mentions
    assert not mentions.get("parse"), mentions
    assert run.message is not None and f"<@{ASKER.id}>" in run.message.content


def dead_token_never_reused(run: Run) -> None:
    used = token_requests(run.flux, run.interaction)
    dead = [i for i, r in enumerate(used) if r.status in (401, 404) and not r.injected]
    assert dead, [str(r) for r in used]
    assert dead[0] == len(used) - 1, "the token was used after it died: " + ", ".join(str(r) for r in used)


def logged_lost(run: Run) -> None:
    lines = [r.getMessage() for r in run.logs if r.levelno >= logging.ERROR and r.name == "bot.delivery"]
    assert any(run.task_id in line and str(run.interaction.id) in line and "could not deliver" in line
               for line in lines), lines


# --------------------------------------------------------------------------- the table

FORBIDDEN_URL = "http://169.254.169.254/latest/meta-data/flux.png"
TIMEOUT = {"FLUXBOT_POLL_TIMEOUT": "1"}

API_FAULTS = [
    Fault("api-429-retry-after",
          script(fixed(Answer.rate_limited("1")), ready_with("rl.png")),
          both(has_image(), polls(2), poll_gap_at_least(0.9))),
    Fault("api-429-until-deadline", script(fixed(Answer.rate_limited("1"))),
          titled("Still not ready", "rate limiting"), settings=TIMEOUT),
    Fault("api-5xx-burst",
          script(fixed(Answer.error(500, "boom")), fixed(Answer.error(502, "bad gateway")),
                 fixed(Answer.raw(b"<html>503</html>", status=503)), fixed(Answer.error(504, "timeout")),
                 ready_with("burst.png")),
          both(has_image(), polls(5))),
    Fault("api-5xx-until-deadline", script(fixed(Answer.error(503, "overloaded"))),
          titled("Still not ready", "503"), settings=TIMEOUT),
    Fault("api-timeout-then-ready", script(fixed(Answer.stall(5.0)), ready_with("slow.png")),
          both(has_image(), polls(2)), settings={"FLUXBOT_API_TIMEOUT": "0.3"}),
    Fault("api-stalls-past-deadline", script(fixed(Answer.stall(30.0))),
          titled("Still not ready", "did not answer in time"),
          settings={**TIMEOUT, "FLUXBOT_API_TIMEOUT": "0.3"}, within=4.0),
    Fault("api-connection-reset",
          script(fixed(Answer.reset()), fixed(Answer.reset()), fixed(Answer.reset()), ready_with("reset.png")),
          has_image()),
    Fault("api-malformed-then-ready",
          script(fixed(Answer.raw(b"<html>maintenance</html>")),
                 fixed(Answer.raw(b'{"status": "Rea', content_type="application/json")),
                 fixed(Answer.json({"id": "x", "result": None})), ready_with("mal.png")),
          both(has_image(), polls(4))),
    Fault("api-malformed-forever", script(fixed(Answer.raw(b"<html>maintenance</html>"))),
          titled("CometAPI's answers could not be read", "not JSON")),
    Fault("api-key-refused", script(fixed(Answer.error(401, "Invalid token"))),
          both(titled("The bot's API key was refused", "admin"), polls(1))),
    Fault("api-out-of-credits", script(fixed(Answer.error(402, "insufficient quota"))),
          titled("The bot is out of API credits")),
    Fault("api-request-rejected", script(fixed(Answer.error(400, "bad id", "invalid_request_error"))),
          titled("CometAPI rejected the request", "bad id")),
]

TERMINAL_FAULTS = [
    Fault("status-ready", script(fixed(Answer.pending(0.2)), ready_with("ok.png")), has_image()),
    Fault("status-succeeded",
          script(lambda f: Answer.status("Succeeded", output=[f.comet.add_image("rep.png", IMAGE)])),
          has_image()),
    Fault("status-task-not-found", script(fixed(Answer.status("Task not found"))),
          titled("Task not found", "10 minutes")),
    Fault("status-error", script(fixed(Answer.status("Error", error="GPU fell over"))),
          titled("The task failed", "GPU fell over")),
    Fault("status-failed", script(fixed(Answer.status("Failed", error="out of memory"))),
          titled("The task failed", "out of memory")),
    Fault("status-content-moderated",
          script(fixed(Answer.status("Content Moderated", details={"Moderation Reasons": ["Derivative Works"]}))),
          titled("The task was moderated", "Derivative Works")),
    Fault("status-request-moderated",
          script(fixed(Answer.status("Request Moderated", details={"Moderation Reasons": ["Public Figure"]}))),
          titled("The task was moderated", "Public Figure")),
    Fault("status-canceled", script(fixed(Answer.status("Canceled"))), titled("The task was canceled")),
    Fault("status-ready-without-image", script(fixed(Answer.status("Ready", result={"prompt": "x"}))),
          titled("Ready, but no image")),
]

IMAGE_FAULTS = [
    Fault("image-404", script(ready_at(lambda f: f.comet.image_url("never-added.png"))),
          both(titled("The image link has expired"), image_hits("never-added.png", 1))),
    Fault("image-wrong-content-type",
          script(ready_with("page.png", b"<html><body>Access denied</body></html>", content_type="text/html")),
          titled("The result is not an image")),
    Fault("image-png-served-as-octet-stream",
          script(ready_with("octet.png", content_type="application/octet-stream")), has_image()),
    Fault("image-truncated-connection",
          script(ready_with("cut.png", lie_length=len(IMAGE) + 4096)),
          both(titled("The image could not be downloaded"), image_hits("cut.png", 3))),
    Fault("image-truncated-file", script(ready_with("half.png", IMAGE[: len(IMAGE) // 2])),
          titled("The result is not an image")),
    Fault("image-oversize", script(ready_with("huge.png", png_bytes(200, 200, noise=True))),
          titled("The image is too large", "larger than"), settings={"FLUXBOT_MAX_IMAGE_MB": "0.01"}),
    Fault("image-oversize-chunked", script(ready_with("huge2.png", png_bytes(200, 200, noise=True), chunked=True)),
          titled("The image is too large"), settings={"FLUXBOT_MAX_IMAGE_MB": "0.01"}),
    Fault("image-bomb", script(ready_with("bomb.png", png_claiming(100_000, 100_000))),
          titled("The image is too large to open")),
    Fault("image-redirect-loop", script(ready_with("loop.png", b"", redirect_to="loop.png")),
          titled("The image could not be downloaded", "loop")),
    Fault("image-redirect-to-forbidden-host", script(ready_with("evil.png", b"", redirect_to=FORBIDDEN_URL)),
          titled("The image link was refused")),
]

DISCORD_FAULTS = [
    Fault("discord-429-status-edit-no-via",
          then(inject("PATCH", ORIGINAL, 429,
                      body={"message": "You are being rate limited.", "retry_after": 0.3, "global": False}),
               script(fixed(Answer.pending(0.3)), fixed(Answer.pending(0.6)), ready_with("s429.png"))),
          both(has_image(), status_edit_met(429))),
    Fault("discord-429-final-upload-no-via", PENDING,
          both(has_image(), final_edit_after_injected(429, min_gap=0.9)),
          during=during_pending(rate_limit_now(1.0, via=False), "u429.png")),
    Fault("discord-429-final-upload-with-via", PENDING,
          both(has_image(), final_edit_after_injected(429)),
          during=during_pending(rate_limit_now(0.2, via=True), "v429.png")),
    Fault("discord-5xx-status-edit",
          then(inject("PATCH", ORIGINAL, 502),
               script(fixed(Answer.pending(0.3)), fixed(Answer.pending(0.6)), ready_with("s5xx.png"))),
          both(has_image(), status_edit_met(502))),
    Fault("discord-5xx-final-upload", PENDING,
          both(has_image(), final_edit_after_injected(500)),
          during=during_pending(server_error_now, "u5xx.png")),
    Fault("discord-413-reencodes-smaller",
          then(upload_limit(120 * 1024), script(ready_with("big.png", BIG))),
          both(has_image(None),
               lambda run: _reencoded_under(run, 120 * 1024, len(BIG))),
          within=20.0),
    Fault("discord-413-falls-back-to-link",
          then(upload_limit(600), script(ready_with("nofit.png", png_bytes(320, 240, noise=True)))),
          lambda run: _link_instead(run), within=20.0),
    Fault("discord-40005-injected-reencodes", PENDING,
          both(has_image(None), final_edit_after_injected(413),
               lambda run: _reencoded_under(run, len(INJ) * 3 // 4, len(INJ))),
          during=during_pending(entity_too_large_now, "inj413.png", INJ)),
    Fault("discord-token-dies-mid-follow-401", PENDING,
          both(has_image(), mentions_only_the_asker, dead_token_never_reused), where="channel",
          during=during_pending(lambda f, i: f.discord.kill_token(i, status=401), "dead401.png")),
    Fault("discord-token-dies-mid-follow-404", PENDING,
          both(has_image(), mentions_only_the_asker, dead_token_never_reused), where="channel",
          during=during_pending(lambda f, i: f.discord.kill_token(i, status=404), "dead404.png")),
    Fault("discord-token-dies-during-status-edits", MOVING,
          both(has_image(), mentions_only_the_asker, dead_token_never_reused), where="channel",
          during=kill_during_status_edits),
    Fault("discord-token-dies-private-goes-to-dm", PENDING,
          both(has_image(), dead_token_never_reused,
               lambda run: _no_channel_post(run)), where="dm", command={"private": True},
          during=during_pending(lambda f, i: f.discord.kill_token(i), "deadp.png")),
    Fault("discord-token-dies-no-permission-goes-to-dm",
          then(PENDING, inject("POST", CHANNEL_POST, 403, times=1)),
          both(has_image(), dead_token_never_reused, lambda run: _channel_refused(run)), where="dm",
          during=during_pending(lambda f, i: f.discord.kill_token(i), "dead403.png")),
    Fault("discord-token-dies-nowhere-to-deliver-logs",
          then(PENDING, inject("POST", CHANNEL_POST, 403, times=None)),
          both(dead_token_never_reused, logged_lost), where="lost",
          during=during_pending(lambda f, i: f.discord.kill_token(i), "lost.png")),
]


def _reencoded_under(run: Run, limit: int, original: int) -> None:
    assert run.message is not None
    attachment = run.message.attachments[0]
    assert attachment.size <= limit < original
    assert "re-encoded" in text_of(run.message)
    refused = [r for r in token_requests(run.flux, run.interaction) if r.status == 413 and r.files]
    assert refused and all(r.files[0].size > limit for r in refused if not r.injected)


def _link_instead(run: Run) -> None:
    assert run.message is not None
    assert not run.message.attachments
    url = run.flux.comet.image_url("nofit.png")
    assert run.message.content == url
    assert embed_of(run.message).get("url") == url
    assert "too large for Discord's upload limit" in text_of(run.message)
    assert any(r.status == 413 for r in token_requests(run.flux, run.interaction))


def _no_channel_post(run: Run) -> None:
    assert run.flux.discord.requests_to("channel_message") == [] or all(
        int(r.path.split("/")[2]) == run.flux.discord.dm_channels[ASKER.id]
        for r in run.flux.discord.requests_to("channel_message"))


def _channel_refused(run: Run) -> None:
    posts = run.flux.discord.requests_to("channel_message")
    assert posts[0].status == 403 and int(posts[0].path.split("/")[2]) == run.interaction.channel_id


FAULTS = API_FAULTS + TERMINAL_FAULTS + IMAGE_FAULTS + DISCORD_FAULTS


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
async def test_fault_ends_in_one_true_final_message(flux: FluxEnv, fault: Fault,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    run = await run_fault(flux, fault, caplog)
    fault.check(run)


def test_fault_ids_are_unique() -> None:
    assert len({f.id for f in FAULTS}) == len(FAULTS)


# --------------------------------------------------------------------------- limits, rate, logs


async def test_global_limit_refuses_before_any_api_call(flux: FluxEnv) -> None:
    flux.comet.script("g-1", Answer.pending())
    async with flux.bot(FLUXBOT_MAX_ACTIVE="1"):
        first = await flux.command("g-1", user=FakeUser(7101, "a"))
        await flux.discord.wait_for_original(first, lambda m: bool(m.components), timeout=STEP)
        second = await flux.command("g-2", user=FakeUser(7102, "b"))
        await flux.discord.wait_for_callback(second, timeout=STEP)
    assert second.callback_type == 4
    assert second.callback_body["data"]["flags"] & EPHEMERAL
    assert "as many tasks as it can" in second.callback_body["data"]["content"]
    assert flux.comet.polls["g-2"] == 0


async def test_api_rps_is_shared_by_all_follows(flux: FluxEnv) -> None:
    rps = 5.0
    users = [FakeUser(7200 + n, f"r{n}") for n in range(4)]
    for n in range(len(users)):
        flux.comet.script(f"rps-{n}", Answer.pending(0.1))
    async with flux.bot(FLUXBOT_API_RPS=str(rps)) as bot:
        started = time.monotonic()
        for n, user in enumerate(users):
            await flux.command(f"rps-{n}", user=user)
        await until(lambda: bot.follows.active == len(users), STEP, "every follow to start")
        await asyncio.sleep(2.0)
        window = time.monotonic() - started
        total = sum(flux.comet.polls[f"rps-{n}"] for n in range(len(users)))
    # Unlimited, four loops at the fast test pace would poll ~15 times a second each.
    assert total <= rps * window + rps + 1, (total, window)
    assert all(flux.comet.polls[f"rps-{n}"] >= 1 for n in range(len(users)))


async def test_no_secret_in_any_log_and_every_follow_line_names_task_and_interaction(
        flux: FluxEnv, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="bot")
    caplog.set_level(logging.DEBUG, logger="cogs")
    caplog.set_level(logging.INFO)
    flux.comet.script("log-ok", Answer.rate_limited("0"), Answer.error(502, "x"), Answer.ready(
        flux.comet.add_image("log.png", IMAGE)))
    flux.comet.script("log-dead", Answer.pending(0.5))
    flux.comet.script("log-evil", Answer.ready(FORBIDDEN_URL))
    flux.comet.script("log-mal", Answer.raw(b"<html/>"))
    interactions: list[FakeInteraction] = []
    async with flux.bot() as bot:
        for n, task_id in enumerate(("log-ok", "log-dead", "log-evil", "log-mal")):
            interactions.append(await flux.command(task_id, user=FakeUser(7300 + n, f"l{n}")))
        await flux.discord.wait_for_original(interactions[1], status_is("Pending"), timeout=STEP)
        flux.discord.kill_token(interactions[1])
        flux.discord.inject("POST", CHANNEL_POST, 403, times=None)
        flux.comet.script("log-dead", Answer.ready(flux.comet.add_image("log2.png", IMAGE)))
        await until(lambda: sum(bot.follows.delivered.values()) >= 4, STEP, "every follow to deliver")
    secrets = [flux.discord.token, flux.comet.api_key, *(i.token for i in interactions)]
    formatter = logging.Formatter()
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage()
        if record.exc_info:
            text += formatter.formatException(record.exc_info)
        for secret in secrets:
            assert secret not in text, f"{record.name}: a secret in {text[:200]!r}"
    by_task = {i.id: task for i, task in zip(interactions, ("log-ok", "log-dead", "log-evil", "log-mal"),
                                            strict=True)}
    follow_lines = [r.getMessage() for r in caplog.records if r.name in ("bot.follows", "bot.delivery")]
    assert follow_lines
    for line in follow_lines:
        assert any(f"task {task}" in line and f"interaction {iid}" in line for iid, task in by_task.items()), line
