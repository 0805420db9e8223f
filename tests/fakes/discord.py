"""A local fake of Discord's REST API and gateway, good enough for an unmodified discord.py 2.7 bot.

One aiohttp application on 127.0.0.1 (ephemeral port) serves REST under ``/api/v10`` and the gateway
websocket at ``/gateway``. Tests drive it from the Discord side (``send_interaction``,
``send_component_interaction``, ``send_autocomplete``), inject faults (``inject``, ``kill_token``,
``upload_limit``) and read back what the bot did (``requests``, ``original``, ``channel_messages``).

Behaviour mirrors the parts of real Discord a bot can observe (see
``../shared/notes/discordpy-under-test.md`` beside the repository): exact ``application/json`` content type, 401/50027
for dead webhook tokens, 404/10062 for late interaction callbacks, 40060 for double
acknowledgement, and that a follow-up sent after a "thinking" defer replaces the loading message.
Every JSON body received is checked against Discord's OpenAPI spec (``openapi_check``); failures are
kept in ``schema_errors`` and answered 400/50035 like Discord would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import mimetypes
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import aiohttp
import discord.gateway
import discord.http
import yarl
from aiohttp import web

from tests.fakes import openapi_check

T = TypeVar("T")

API_PREFIX = "/api/v10"
DISCORD_EPOCH_MS = 1_420_070_400_000

DEFAULT_TOKEN = "fake-bot-token.fluxbot.tests"
DEFAULT_APPLICATION_ID = 1_300_000_000_000_000_001
DEFAULT_GUILD_ID = 1_300_000_000_000_000_100
DEFAULT_CHANNEL_ID = 1_300_000_000_000_000_200
DEFAULT_USER_ID = 1_300_000_000_000_000_300
DEFAULT_ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024
# View/Send/Embed/Attach/Read history/Use application commands: what a bot needs to answer in a channel.
DEFAULT_APP_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 14) | (1 << 15) | (1 << 16) | (1 << 31)
DEFAULT_MEMBER_PERMISSIONS = DEFAULT_APP_PERMISSIONS

FLAG_SUPPRESS_EMBEDS = 1 << 2
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_SUPPRESS_NOTIFICATIONS = 1 << 12
FLAG_COMPONENTS_V2 = 1 << 15
_CREATE_FLAGS = FLAG_SUPPRESS_EMBEDS | FLAG_EPHEMERAL | FLAG_SUPPRESS_NOTIFICATIONS | FLAG_COMPONENTS_V2
_EDIT_FLAGS = FLAG_SUPPRESS_EMBEDS | FLAG_COMPONENTS_V2

# Interaction types and callback types, as numbers on the wire.
INTERACTION_APPLICATION_COMMAND = 2
INTERACTION_COMPONENT = 3
INTERACTION_AUTOCOMPLETE = 4
CALLBACK_MESSAGE = 4
CALLBACK_DEFER = 5
CALLBACK_DEFER_UPDATE = 6
CALLBACK_UPDATE = 7
CALLBACK_AUTOCOMPLETE = 8
CALLBACK_MODAL = 9

MESSAGE_TYPE_DEFAULT = 0
MESSAGE_TYPE_CHAT_INPUT_COMMAND = 20

CHANNEL_GUILD_TEXT = 0
CHANNEL_DM = 1


def error_body(message: str, code: int) -> dict[str, Any]:
    return {"message": message, "code": code}


def rate_limit_body(retry_after: float = 0.2, *, global_: bool = False) -> dict[str, Any]:
    return {"message": "You are being rate limited.", "retry_after": retry_after, "global": global_}


NOT_FOUND = error_body("404: Not Found", 0)
UNAUTHORIZED = error_body("401: Unauthorized", 0)
UNKNOWN_CHANNEL = error_body("Unknown Channel", 10003)
UNKNOWN_MESSAGE = error_body("Unknown Message", 10008)
UNKNOWN_WEBHOOK = error_body("Unknown Webhook", 10015)
UNKNOWN_INTERACTION = error_body("Unknown interaction", 10062)
ENTITY_TOO_LARGE = error_body("Request entity too large", 40005)
ALREADY_ACKNOWLEDGED = error_body("Interaction has already been acknowledged.", 40060)
MISSING_PERMISSIONS = error_body("Missing Permissions", 50013)
INVALID_WEBHOOK_TOKEN = error_body("Invalid Webhook Token", 50027)
SERVER_ERROR = error_body("500: Internal Server Error", 0)

_DEFAULT_FAULT_BODIES: dict[int, Any] = {
    401: UNAUTHORIZED,
    403: MISSING_PERMISSIONS,
    404: NOT_FOUND,
    413: ENTITY_TOO_LARGE,
    429: rate_limit_body(),
    500: SERVER_ERROR,
    502: "<html><body>502 Bad Gateway</body></html>",
    503: "upstream connect error or disconnect/reset before headers. reset reason: overflow",
    504: "<html><body>504 Gateway Time-out</body></html>",
}

_LONG_SEGMENT = re.compile(r"[^/]{40,}")
_FILE_FIELD = re.compile(r"files\[(\d+)\]|file(\d*)")


def _option_type(value: object) -> int:
    """Discord's option type for a Python value (bool before int: bool is an int subclass)."""
    if isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return 4
    if isinstance(value, float):
        return 10
    return 3


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _json_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    # discord.py parses a body as JSON only when Content-Type is exactly "application/json";
    # web.json_response would add "; charset=utf-8" and every response would come back as a str.
    response = web.Response(status=status, body=json.dumps(body).encode(), headers=dict(headers or {}))
    response.headers["Content-Type"] = "application/json"
    return response


# --------------------------------------------------------------------------------------------------
# Value types
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeUser:
    id: int
    username: str = "tester"
    global_name: str | None = None
    bot: bool = False

    def to_api(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "username": self.username,
            "discriminator": "0",
            "global_name": self.global_name,
            "avatar": None,
            "public_flags": 0,
            "flags": 0,
            "primary_guild": None,
        }
        if self.bot:
            data["bot"] = True
        return data


@dataclass(frozen=True)
class FakeChannel:
    id: int
    name: str = "general"
    type: int = CHANNEL_GUILD_TEXT


@dataclass(frozen=True)
class FakeGuild:
    """A guild announced after READY with GUILD_CREATE, so its channels are in the bot's cache."""

    id: int = DEFAULT_GUILD_ID
    name: str = "Fake Guild"
    channels: tuple[FakeChannel, ...] = (FakeChannel(DEFAULT_CHANNEL_ID),)
    owner_id: int = DEFAULT_USER_ID


@dataclass(frozen=True)
class UploadedFile:
    """One file part of a multipart request."""

    field: str
    filename: str
    content_type: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class RecordedRequest:
    """One REST request as the fake saw it and answered it. ``headers`` keys are lower-case;
    ``body`` is the parsed JSON body, or the parsed ``payload_json`` part of a multipart body."""

    seq: int
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any = None
    files: list[UploadedFile] = field(default_factory=list)
    multipart: bool = False
    route: str = "unknown"
    status: int = 0
    response: Any = None
    injected: bool = False
    schema_errors: list[str] = field(default_factory=list)
    at: float = field(default_factory=time.monotonic)

    def __str__(self) -> str:
        # Interaction tokens are ~150 characters; a prefix is enough to tell them apart in a report.
        path = _LONG_SEGMENT.sub(lambda m: m.group(0)[:12] + "…", self.path)
        return f"#{self.seq} {self.method} {path} -> {self.status} [{self.route}]"


@dataclass
class FakeAttachment:
    id: int
    filename: str
    content_type: str
    data: bytes
    url: str
    description: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    def to_api(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "filename": self.filename,
            "size": self.size,
            "url": self.url,
            "proxy_url": self.url,
            "content_type": self.content_type,
        }
        if self.description is not None:
            data["description"] = self.description
        return data


@dataclass
class FakeMessage:
    """A message as the fake stores it. ``history`` holds a snapshot after every write (creation
    included), oldest first; the live object always shows the latest state."""

    id: int
    channel_id: int
    author: dict[str, Any]
    type: int = MESSAGE_TYPE_DEFAULT
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[FakeAttachment] = field(default_factory=list)
    flags: int = 0
    guild_id: int | None = None
    webhook_id: int | None = None
    application_id: int | None = None
    interaction_token: str | None = None
    timestamp: str = field(default_factory=_now_iso)
    edited_timestamp: str | None = None
    deleted: bool = False
    history: list[FakeMessage] = field(default_factory=list, repr=False)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & FLAG_EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & FLAG_LOADING)

    def attachment(self, filename: str) -> FakeAttachment:
        for attachment in self.attachments:
            if attachment.filename == filename:
                return attachment
        raise KeyError(f"no attachment {filename!r} on message {self.id}: {self.attachments!r}")

    def snapshot(self) -> FakeMessage:
        return FakeMessage(
            id=self.id,
            channel_id=self.channel_id,
            author=self.author,
            type=self.type,
            content=self.content,
            embeds=json.loads(json.dumps(self.embeds)),
            components=json.loads(json.dumps(self.components)),
            attachments=list(self.attachments),
            flags=self.flags,
            guild_id=self.guild_id,
            webhook_id=self.webhook_id,
            application_id=self.application_id,
            interaction_token=self.interaction_token,
            timestamp=self.timestamp,
            edited_timestamp=self.edited_timestamp,
            deleted=self.deleted,
        )

    def to_api(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "type": self.type,
            "channel_id": str(self.channel_id),
            "content": self.content,
            "author": self.author,
            "attachments": [a.to_api() for a in self.attachments],
            "embeds": self.embeds,
            "components": self.components,
            "flags": self.flags,
            "timestamp": self.timestamp,
            "edited_timestamp": self.edited_timestamp,
            "mentions": [],
            "mention_roles": [],
            "mention_everyone": False,
            "pinned": False,
            "tts": False,
        }
        if self.guild_id is not None:
            data["guild_id"] = str(self.guild_id)
        if self.webhook_id is not None:
            data["webhook_id"] = str(self.webhook_id)
        if self.application_id is not None:
            data["application_id"] = str(self.application_id)
        return data


@dataclass
class FakeInteraction:
    """An interaction the fake sent, and what the bot has done with it so far."""

    id: int
    token: str
    application_id: int
    type: int
    channel_id: int
    user_id: int
    guild_id: int | None
    payload: dict[str, Any]
    created_at: float = field(default_factory=time.monotonic)
    callback_type: int | None = None
    callback_body: Any = None
    callback_at: float | None = None
    original_message_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)
    component_message_id: int | None = None
    killed: bool = False
    kill_status: int = 401
    force_late: bool = False

    @property
    def acknowledged(self) -> bool:
        return self.callback_type is not None

    @property
    def autocomplete_choices(self) -> list[dict[str, Any]] | None:
        if self.callback_type != CALLBACK_AUTOCOMPLETE or not isinstance(self.callback_body, dict):
            return None
        data = self.callback_body.get("data") or {}
        choices = data.get("choices")
        return list(choices) if isinstance(choices, list) else None


@dataclass
class Injection:
    """A queued fault: the next ``times`` requests matching ``method`` and ``pattern`` (``re.search``
    on the path relative to ``/api/v10``, e.g. ``/webhooks/\\d+/[^/]+/messages/@original``) get this
    answer instead of the normal one. ``status=None`` only delays, then answers normally."""

    method: str | None
    pattern: re.Pattern[str]
    status: int | None
    body: Any
    headers: dict[str, str]
    times: int | None
    delay: float = 0.0
    hits: int = 0

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, method: str, path: str) -> bool:
        if self.exhausted:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self.pattern.search(path) is not None


@dataclass
class _Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    def to_response(self) -> web.StreamResponse:
        if self.status == 204 or self.body is None:
            return web.Response(status=self.status, headers=self.headers)
        if isinstance(self.body, bytes):
            return web.Response(status=self.status, body=self.body, headers=self.headers)
        if isinstance(self.body, str):
            return web.Response(status=self.status, text=self.body, content_type="text/html", headers=self.headers)
        return _json_response(self.status, self.body, self.headers)


class _BadRequest(Exception):
    def __init__(self, reply: _Reply) -> None:
        super().__init__(reply.body)
        self.reply = reply


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise _BadRequest(_Reply(400, error_body("The request body contains invalid JSON.", 50109))) from None


def _invalid_form(message: str) -> _BadRequest:
    return _BadRequest(
        _Reply(
            400,
            {
                "message": "Invalid Form Body",
                "code": 50035,
                "errors": {"_errors": [{"code": "BASE_TYPE_INVALID", "message": message}]},
            },
        )
    )


@dataclass(eq=False)  # identity semantics: connections live in a set
class _GatewayConnection:
    ws: web.WebSocketResponse
    query: dict[str, str]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    seq: int = 0
    ready: bool = False
    session_id: str = ""


_Handler = Callable[[RecordedRequest, "re.Match[str]"], Awaitable[_Reply]]


class RestoreDiscordPy:
    """Undoes :func:`point_discordpy_at`; call it, or use it as a context manager."""

    def __init__(self, base: str, gateway: yarl.URL) -> None:
        self._base = base
        self._gateway = gateway

    def __call__(self) -> None:
        discord.http.Route.BASE = self._base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = self._gateway

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self()


def point_discordpy_at(fake: FakeDiscord) -> RestoreDiscordPy:
    """Point discord.py's REST base and default gateway at ``fake``; returns the undo."""
    restore = RestoreDiscordPy(discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    discord.http.Route.BASE = fake.rest_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
    return restore


# --------------------------------------------------------------------------------------------------
# The fake
# --------------------------------------------------------------------------------------------------


class FakeDiscord:
    """Fake Discord REST + gateway on 127.0.0.1. See the module docstring."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        application_id: int = DEFAULT_APPLICATION_ID,
        bot_user_id: int | None = None,
        bot_username: str = "fluxbot",
        guilds: Sequence[FakeGuild] = (),
        callback_deadline: float = 3.0,
        token_lifetime: float = 15 * 60.0,
        upload_limit: int | None = None,
        heartbeat_interval_ms: int = 41_250,
        validate_schemas: bool = True,
        reject_invalid_bodies: bool = True,
    ) -> None:
        self.token = token
        self.application_id = application_id
        self.bot_user = FakeUser(bot_user_id or application_id, bot_username, bot=True)
        self.guilds: list[FakeGuild] = list(guilds)
        # A first interaction response later than this (seconds after creation) gets 404/10062.
        self.callback_deadline = callback_deadline
        # Webhook routes of an interaction token answer 401/50027 after this (Discord: 15 min).
        self.token_lifetime = token_lifetime
        # Per-file cap for every upload; interaction webhooks are also capped at the interaction's
        # attachment_size_limit, as Discord does.
        self.upload_limit = upload_limit
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.validate_schemas = validate_schemas
        self.reject_invalid_bodies = reject_invalid_bodies

        self.requests: list[RecordedRequest] = []
        self.schema_errors: list[str] = []
        self.internal_errors: list[str] = []
        self.injections: list[Injection] = []
        self.interactions: dict[str, FakeInteraction] = {}
        self.messages: dict[int, FakeMessage] = {}
        self.dm_channels: dict[int, int] = {}
        self.commands: dict[int | None, list[dict[str, Any]]] = {}
        self.command_syncs: list[tuple[int | None, Any]] = []
        self.identify_payloads: list[dict[str, Any]] = []
        self.resume_payloads: list[dict[str, Any]] = []
        self.gateway_received: list[dict[str, Any]] = []
        self.gateway_sent: list[dict[str, Any]] = []

        self._users: dict[int, FakeUser] = {}
        self._extra_channels: dict[int, int | None] = {}
        self._snowflake_counter = itertools.count(1)
        self._request_seq = itertools.count(1)
        self._changed = asyncio.Condition()
        self._connections: set[_GatewayConnection] = set()
        self._current: _GatewayConnection | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._routes: list[tuple[str, re.Pattern[str], str, _Handler]] = []
        self._build_routes()

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("FakeDiscord already started")
        # Uploads in tests go past aiohttp's 1 MiB default (10 MiB attachments, oversize probes).
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway_handler)
        app.router.add_get("/attachments/{channel_id}/{attachment_id}/{filename}", self._attachment_handler)
        app.router.add_route("*", API_PREFIX + "/{tail:.*}", self._rest_handler)
        runner = web.AppRunner(app, shutdown_timeout=2.0, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(runner.addresses[0][1])
        self._runner = runner

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for conn in list(self._connections):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await conn.ws.close(code=1001, message=b"fake discord closing")
        self._current = None
        async with asyncio.timeout(10.0):
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeDiscord not started")
        return self._port

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def rest_base(self) -> str:
        return f"{self.http_base}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # ---------------------------------------------------------------- ids and lookups

    def snowflake(self) -> int:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return (ms << 22) | (next(self._snowflake_counter) & 0x3FFFFF)

    def user(self, user_id: int) -> FakeUser:
        return self._users.get(user_id) or FakeUser(user_id, f"user{user_id % 100_000}")

    def add_user(self, user: FakeUser) -> None:
        self._users[user.id] = user

    def interaction(self, ref: FakeInteraction | str) -> FakeInteraction:
        token = ref.token if isinstance(ref, FakeInteraction) else ref
        return self.interactions[token]

    def original(self, ref: FakeInteraction | str) -> FakeMessage | None:
        """The live original response of an interaction (None before the first response)."""
        inter = self.interaction(ref)
        if inter.original_message_id is None:
            return None
        return self.messages.get(inter.original_message_id)

    def original_history(self, ref: FakeInteraction | str) -> list[FakeMessage]:
        message = self.original(ref)
        return list(message.history) if message is not None else []

    def followups(self, ref: FakeInteraction | str) -> list[FakeMessage]:
        return [self.messages[i] for i in self.interaction(ref).followup_ids]

    def channel_messages(self, channel_id: int) -> list[FakeMessage]:
        """Messages created in a channel (interaction responses included), oldest first."""
        return [m for m in self.messages.values() if m.channel_id == channel_id and not m.deleted]

    def dm_messages(self, user_id: int) -> list[FakeMessage]:
        channel_id = self.dm_channels.get(user_id)
        return [] if channel_id is None else self.channel_messages(channel_id)

    def dm_channel_id(self, user_id: int) -> int:
        """The DM channel with ``user_id``, created on first use (stable, like Discord's)."""
        channel_id = self.dm_channels.get(user_id)
        if channel_id is None:
            channel_id = self.dm_channels[user_id] = self.snowflake()
        return channel_id

    def add_channel(self, channel_id: int, guild_id: int | None = None) -> None:
        """Make a channel known, so ``POST /channels/{id}/messages`` is accepted there."""
        self._extra_channels[channel_id] = guild_id

    def _channel_guild(self, channel_id: int) -> tuple[bool, int | None]:
        for guild in self.guilds:
            if any(c.id == channel_id for c in guild.channels):
                return True, guild.id
        if channel_id in self.dm_channels.values():
            return True, None
        if channel_id in self._extra_channels:
            return True, self._extra_channels[channel_id]
        return False, None

    @property
    def identify_payload(self) -> dict[str, Any] | None:
        return self.identify_payloads[-1] if self.identify_payloads else None

    @property
    def unknown_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.route == "unknown"]

    def requests_to(self, route: str) -> list[RecordedRequest]:
        """Requests whose matched route name is ``route`` (e.g. "webhook_edit_original")."""
        return [r for r in self.requests if r.route == route]

    @property
    def request_count(self) -> int:
        return len(self.requests)

    # ---------------------------------------------------------------- fault injection

    def inject(
        self,
        method: str | None,
        path_regex: str,
        status: int | None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        times: int | None = 1,
        delay: float = 0.0,
    ) -> Injection:
        """Answer the next ``times`` matching requests (``None``: all) with ``status``/``body``.
        ``body=None`` picks Discord's usual body for that status. Injected answers leave the model
        untouched, as a failed request does at Discord."""
        if status is not None and body is None:
            body = _DEFAULT_FAULT_BODIES.get(status, error_body(f"{status}: Error", 0))
        injection = Injection(
            method=method,
            pattern=re.compile(path_regex),
            status=status,
            body=body,
            headers=dict(headers or {}),
            times=times,
            delay=delay,
        )
        self.injections.append(injection)
        return injection

    def inject_rate_limit(
        self,
        method: str | None,
        path_regex: str,
        *,
        retry_after: float = 0.2,
        via: bool = True,
        global_: bool = False,
        times: int | None = 1,
    ) -> Injection:
        """A 429 as Discord sends it. discord.py honours a webhook-route 429 only when ``Via`` is
        present; without it the 429 is taken for a Cloudflare ban and raised at once."""
        headers = {
            "Retry-After": str(max(1, round(retry_after))),
            "X-RateLimit-Scope": "global" if global_ else "user",
        }
        if global_:
            headers["X-RateLimit-Global"] = "true"
        if via:
            headers["Via"] = "1.1 google"
        return self.inject(method, path_regex, 429, rate_limit_body(retry_after, global_=global_), headers, times)

    def clear_injections(self) -> None:
        self.injections.clear()

    def kill_token(self, ref: FakeInteraction | str, *, status: Literal[401, 404] = 401) -> None:
        """Make an interaction token dead: webhook routes answer 401/50027 (or 404/10015) and the
        callback 404/10062."""
        inter = self.interaction(ref)
        inter.killed = True
        inter.kill_status = status

    def make_late(self, ref: FakeInteraction | str) -> None:
        """Make the first response to this interaction arrive "too late" (404/10062)."""
        self.interaction(ref).force_late = True

    # ---------------------------------------------------------------- waiting

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, probe: Callable[[], T | None], timeout: float, what: str = "condition") -> T:
        """Wait (bounded) until ``probe()`` returns something other than None/False; returns it."""
        result: list[T] = []

        def check() -> bool:
            value = probe()
            if value is None or value is False:
                return False
            result.append(value)
            return True

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(check)
        except TimeoutError:
            recent = "\n  ".join(str(r) for r in self.requests[-15:]) or "(none)"
            raise TimeoutError(
                f"fake discord: timed out after {timeout}s waiting for {what}; last requests:\n  {recent}"
            ) from None
        return result[0]

    async def wait_for_request(
        self, predicate: Callable[[RecordedRequest], bool], timeout: float = 5.0, *, since: int = 0
    ) -> RecordedRequest:
        """First recorded request with ``seq > since`` matching ``predicate`` (already answered)."""

        def probe() -> RecordedRequest | None:
            return next((r for r in self.requests if r.seq > since and predicate(r)), None)

        return await self.wait_for(probe, timeout, "a matching request")

    async def wait_for_original(
        self,
        ref: FakeInteraction | str,
        predicate: Callable[[FakeMessage], bool] | None = None,
        timeout: float = 5.0,
    ) -> FakeMessage:
        """The interaction's original response once it exists and satisfies ``predicate``."""

        def probe() -> FakeMessage | None:
            message = self.original(ref)
            if message is None or (predicate is not None and not predicate(message)):
                return None
            return message

        return await self.wait_for(probe, timeout, "the original response")

    async def wait_for_callback(self, ref: FakeInteraction | str, timeout: float = 5.0) -> FakeInteraction:
        inter = self.interaction(ref)
        return await self.wait_for(lambda: inter if inter.acknowledged else None, timeout, "the callback")

    async def wait_until_identified(self, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until a gateway connection has IDENTIFYed (or RESUMEd) and was sent READY."""

        def probe() -> dict[str, Any] | None:
            if self._current is None or not self._current.ready:
                return None
            return self.identify_payload or {}

        return await self.wait_for(probe, timeout, "IDENTIFY")

    # ---------------------------------------------------------------- gateway

    async def _gateway_handler(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=None, max_msg_size=16 * 1024 * 1024)
        await ws.prepare(request)
        conn = _GatewayConnection(ws=ws, query=dict(request.query))
        self._connections.add(conn)
        try:
            await self._ws_send(conn, {"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    await self._on_gateway_message(conn, json.loads(msg.data))
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    break
        finally:
            self._connections.discard(conn)
            if self._current is conn:
                self._current = None
            await self._notify()
        return ws

    async def _ws_send(self, conn: _GatewayConnection, payload: dict[str, Any]) -> None:
        # Events from tests and gateway replies may interleave; frames must not.
        async with conn.lock:
            if payload.get("op") == 0:
                conn.seq += 1
                payload = {**payload, "s": conn.seq}
            self.gateway_sent.append(payload)
            await conn.ws.send_str(json.dumps(payload))

    async def _dispatch(self, conn: _GatewayConnection, event: str, data: Any) -> None:
        await self._ws_send(conn, {"op": 0, "t": event, "d": data})

    async def _on_gateway_message(self, conn: _GatewayConnection, payload: dict[str, Any]) -> None:
        self.gateway_received.append(payload)
        op = payload.get("op")
        data = payload.get("d")
        if op == 1:
            await self._ws_send(conn, {"op": 11})
        elif op == 2:
            await self._on_identify(conn, data if isinstance(data, dict) else {})
        elif op == 6:
            self.resume_payloads.append(data if isinstance(data, dict) else {})
            conn.session_id = str((data or {}).get("session_id") or secrets.token_hex(16))
            conn.seq = int((data or {}).get("seq") or 0)
            await self._dispatch(conn, "RESUMED", {})
            conn.ready = True
            self._current = conn
            await self._notify()
        elif op == 8:
            # Member chunking (only with the members intent): answer "no more members".
            guild_id = (data or {}).get("guild_id")
            await self._dispatch(
                conn,
                "GUILD_MEMBERS_CHUNK",
                {
                    "guild_id": str(guild_id),
                    "members": [],
                    "chunk_index": 0,
                    "chunk_count": 1,
                    "nonce": (data or {}).get("nonce"),
                },
            )

    async def _on_identify(self, conn: _GatewayConnection, data: dict[str, Any]) -> None:
        self.identify_payloads.append(data)
        if data.get("token") != self.token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            await self._notify()
            return
        conn.session_id = secrets.token_hex(16)
        ready: dict[str, Any] = {
            "v": 10,
            "user": {**self.bot_user.to_api(), "verified": True, "mfa_enabled": False},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in self.guilds],
            "session_id": conn.session_id,
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "geo_ordered_rtc_regions": [],
        }
        if "shard" in data:
            ready["shard"] = data["shard"]
        await self._dispatch(conn, "READY", ready)
        for guild in self.guilds:
            await self._dispatch(conn, "GUILD_CREATE", self._guild_payload(guild))
        conn.ready = True
        self._current = conn
        await self._notify()

    def _guild_payload(self, guild: FakeGuild) -> dict[str, Any]:
        joined = _now_iso()
        return {
            "id": str(guild.id),
            "name": guild.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(guild.owner_id),
            "features": [],
            "roles": [
                {
                    "id": str(guild.id),
                    "name": "@everyone",
                    "permissions": str(DEFAULT_APP_PERMISSIONS),
                    "position": 0,
                    "color": 0,
                    "hoist": False,
                    "managed": False,
                    "mentionable": False,
                    "flags": 0,
                }
            ],
            "emojis": [],
            "stickers": [],
            "members": [
                {
                    "user": self.bot_user.to_api(),
                    "roles": [],
                    "joined_at": joined,
                    "deaf": False,
                    "mute": False,
                    "flags": 0,
                    "pending": False,
                }
            ],
            "member_count": 1,
            "channels": [
                {
                    "id": str(c.id),
                    "type": c.type,
                    "name": c.name,
                    "guild_id": str(guild.id),
                    "position": index,
                    "permission_overwrites": [],
                    "nsfw": False,
                    "parent_id": None,
                    "topic": None,
                    "rate_limit_per_user": 0,
                    "last_message_id": None,
                    "flags": 0,
                }
                for index, c in enumerate(guild.channels)
            ],
            "threads": [],
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "large": False,
            "unavailable": False,
            "joined_at": joined,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": "en-US",
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "afk_channel_id": None,
            "afk_timeout": 300,
            "vanity_url_code": None,
            "application_id": None,
            "max_members": 500_000,
        }

    def _require_connection(self) -> _GatewayConnection:
        conn = self._current
        if conn is None or not conn.ready or conn.ws.closed:
            raise RuntimeError("no identified gateway connection; await wait_until_identified() first")
        return conn

    async def send_dispatch(self, event: str, data: Any) -> None:
        """Send a raw gateway DISPATCH (``op 0``) to the identified connection."""
        await self._dispatch(self._require_connection(), event, data)

    async def disconnect_gateway(self, code: int = 4000) -> None:
        """Drop the gateway connection as Discord does on trouble; discord.py reconnects and RESUMEs."""
        conn = self._require_connection()
        self._current = None
        async with asyncio.timeout(5.0):
            await conn.ws.close(code=code, message=b"fake discord: dropped")

    # ---------------------------------------------------------------- sending interactions

    def _resolve_user(self, user: FakeUser | int | None) -> FakeUser:
        if isinstance(user, FakeUser):
            self.add_user(user)
            return user
        return self.user(DEFAULT_USER_ID if user is None else user)

    def _context(
        self,
        user: FakeUser,
        *,
        dm: bool,
        guild_id: int | None,
        channel_id: int | None,
        app_permissions: int,
        member_permissions: int,
    ) -> tuple[dict[str, Any], int, int | None]:
        if dm:
            channel_id = channel_id or self.dm_channel_id(user.id)
            channel: dict[str, Any] = {
                "id": str(channel_id),
                "type": CHANNEL_DM,
                "last_message_id": None,
                "flags": 0,
                "recipients": [user.to_api()],
            }
            fields: dict[str, Any] = {
                "user": user.to_api(),
                "context": 1,
                # A guild-installed app used in its bot DM: Discord says "guild install, guild 0".
                "authorizing_integration_owners": {"0": "0"},
                "app_permissions": str(app_permissions),
            }
            resolved_guild: int | None = None
        else:
            default_guild = self.guilds[0] if self.guilds else FakeGuild()
            resolved_guild = guild_id or default_guild.id
            if channel_id is None:
                guild = next((g for g in self.guilds if g.id == resolved_guild), default_guild)
                channel_id = guild.channels[0].id if guild.channels else DEFAULT_CHANNEL_ID
            known, _ = self._channel_guild(channel_id)
            if not known:
                self.add_channel(channel_id, resolved_guild)
            channel = {
                "id": str(channel_id),
                "type": CHANNEL_GUILD_TEXT,
                "name": "general",
                "guild_id": str(resolved_guild),
                "position": 0,
                "permission_overwrites": [],
                "nsfw": False,
                "parent_id": None,
                "topic": None,
                "rate_limit_per_user": 0,
                "last_message_id": None,
                "flags": 0,
                "permissions": str(app_permissions),
            }
            fields = {
                "guild_id": str(resolved_guild),
                "guild": {"id": str(resolved_guild), "locale": "en-US", "features": []},
                "guild_locale": "en-US",
                "member": {
                    "user": user.to_api(),
                    "roles": [],
                    "joined_at": _now_iso(),
                    "deaf": False,
                    "mute": False,
                    "flags": 0,
                    "pending": False,
                    "nick": None,
                    "avatar": None,
                    "premium_since": None,
                    "communication_disabled_until": None,
                    "permissions": str(member_permissions),
                },
                "context": 0,
                "authorizing_integration_owners": {"0": str(resolved_guild)},
                "app_permissions": str(app_permissions),
            }
        fields["channel"] = channel
        fields["channel_id"] = str(channel_id)
        return fields, channel_id, resolved_guild

    def _default_guild_id(self) -> int:
        return self.guilds[0].id if self.guilds else DEFAULT_GUILD_ID

    def _command_id(self, name: str, guild_id: int | None) -> tuple[int, int | None]:
        """The registered id of a command (guild commands first), else a fresh one."""
        for scope in ((guild_id,) if guild_id is not None else ()) + (None,):
            for command in self.commands.get(scope, []):
                if command.get("name") == name:
                    return int(command["id"]), scope
        return self.snowflake(), None

    @staticmethod
    def _options(options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
        if options is None:
            return []
        if isinstance(options, Mapping):
            return [{"name": name, "type": _option_type(value), "value": value} for name, value in options.items()]
        return [dict(o) for o in options]

    async def _send_interaction_payload(
        self,
        *,
        interaction_type: int,
        data: dict[str, Any],
        user: FakeUser | int | None,
        dm: bool,
        guild_id: int | None,
        channel_id: int | None,
        attachment_size_limit: int,
        app_permissions: int,
        member_permissions: int,
        locale: str,
        extra: Mapping[str, Any] | None,
        message: FakeMessage | None = None,
    ) -> FakeInteraction:
        conn = self._require_connection()
        who = self._resolve_user(user)
        fields, resolved_channel, resolved_guild = self._context(
            who,
            dm=dm,
            guild_id=guild_id,
            channel_id=channel_id,
            app_permissions=app_permissions,
            member_permissions=member_permissions,
        )
        interaction_id = self.snowflake()
        token = "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(96)
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": interaction_type,
            "token": token,
            "version": 1,
            "attachment_size_limit": attachment_size_limit,
            "locale": locale,
            "entitlements": [],
            "entitlement_sku_ids": [],
            "data": data,
            **fields,
        }
        if message is not None:
            payload["message"] = message.to_api()
        if extra:
            payload.update(extra)
        inter = FakeInteraction(
            id=interaction_id,
            token=token,
            application_id=self.application_id,
            type=interaction_type,
            channel_id=resolved_channel,
            user_id=who.id,
            guild_id=resolved_guild,
            payload=payload,
            component_message_id=message.id if message is not None else None,
        )
        self.interactions[token] = inter
        await self._dispatch(conn, "INTERACTION_CREATE", payload)
        return inter

    async def send_interaction(
        self,
        name: str = "fluxresult",
        options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        *,
        user: FakeUser | int | None = None,
        dm: bool = False,
        guild_id: int | None = None,
        channel_id: int | None = None,
        attachment_size_limit: int = DEFAULT_ATTACHMENT_SIZE_LIMIT,
        app_permissions: int = DEFAULT_APP_PERMISSIONS,
        member_permissions: int = DEFAULT_MEMBER_PERMISSIONS,
        locale: str = "en-US",
        extra: Mapping[str, Any] | None = None,
    ) -> FakeInteraction:
        """Send INTERACTION_CREATE for slash command ``name``. ``options`` is ``{"task_id": "x"}``
        (types inferred) or a list of raw option objects. In a guild channel by default (the first
        configured guild, else DEFAULT_GUILD_ID/DEFAULT_CHANNEL_ID), or in the user's DM with
        ``dm=True``. ``extra`` is merged into the payload last (to test odd payloads)."""
        command_id, command_guild = self._command_id(name, None if dm else guild_id or self._default_guild_id())
        data: dict[str, Any] = {"id": str(command_id), "name": name, "type": 1, "options": self._options(options)}
        if command_guild is not None:
            data["guild_id"] = str(command_guild)
        return await self._send_interaction_payload(
            interaction_type=INTERACTION_APPLICATION_COMMAND,
            data=data,
            user=user,
            dm=dm,
            guild_id=guild_id,
            channel_id=channel_id,
            attachment_size_limit=attachment_size_limit,
            app_permissions=app_permissions,
            member_permissions=member_permissions,
            locale=locale,
            extra=extra,
        )

    async def send_autocomplete(
        self,
        name: str = "fluxresult",
        options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        *,
        focused: str,
        user: FakeUser | int | None = None,
        dm: bool = False,
        guild_id: int | None = None,
        channel_id: int | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> FakeInteraction:
        """Send an autocomplete interaction (type 4); option ``focused`` carries ``focused: true``.
        Read the answer with ``(await fake.wait_for_callback(i)).autocomplete_choices``."""
        opts = self._options(options)
        if not any(o.get("name") == focused for o in opts):
            opts.append({"name": focused, "type": 3, "value": ""})
        for option in opts:
            if option.get("name") == focused:
                option["focused"] = True
        command_id, command_guild = self._command_id(name, None if dm else guild_id or self._default_guild_id())
        data: dict[str, Any] = {"id": str(command_id), "name": name, "type": 1, "options": opts}
        if command_guild is not None:
            data["guild_id"] = str(command_guild)
        return await self._send_interaction_payload(
            interaction_type=INTERACTION_AUTOCOMPLETE,
            data=data,
            user=user,
            dm=dm,
            guild_id=guild_id,
            channel_id=channel_id,
            attachment_size_limit=DEFAULT_ATTACHMENT_SIZE_LIMIT,
            app_permissions=DEFAULT_APP_PERMISSIONS,
            member_permissions=DEFAULT_MEMBER_PERMISSIONS,
            locale="en-US",
            extra=extra,
        )

    async def send_component_interaction(
        self,
        custom_id: str,
        message: FakeMessage | FakeInteraction | int,
        *,
        user: FakeUser | int | None = None,
        component_type: int = 2,
        values: Sequence[str] | None = None,
        dm: bool | None = None,
        guild_id: int | None = None,
        attachment_size_limit: int = DEFAULT_ATTACHMENT_SIZE_LIMIT,
        extra: Mapping[str, Any] | None = None,
    ) -> FakeInteraction:
        """Click component ``custom_id`` (a button by default) on ``message``: a stored message, the
        original response of an interaction (clicked by that interaction's user unless ``user`` is
        given), or a message id (unknown ids get an empty message)."""
        target: FakeMessage | None
        if isinstance(message, FakeInteraction):
            target = self.original(message)
            if target is None:
                raise ValueError("that interaction has no original response to click on")
            # The person who ran the command is the one who usually clicks its buttons.
            user = message.user_id if user is None else user
        elif isinstance(message, FakeMessage):
            target = message
        else:
            target = self.messages.get(message)
            if target is None:
                channel = self.guilds[0].channels[0].id if self.guilds else DEFAULT_CHANNEL_ID
                target = self._new_message(
                    channel_id=channel, guild_id=self._channel_guild(channel)[1], message_id=message
                )
        in_dm = dm if dm is not None else target.guild_id is None and target.channel_id in self.dm_channels.values()
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component_type}
        if values is not None:
            data["values"] = list(values)
        return await self._send_interaction_payload(
            interaction_type=INTERACTION_COMPONENT,
            data=data,
            user=user,
            dm=in_dm,
            guild_id=guild_id or target.guild_id,
            channel_id=target.channel_id,
            attachment_size_limit=attachment_size_limit,
            app_permissions=DEFAULT_APP_PERMISSIONS,
            member_permissions=DEFAULT_MEMBER_PERMISSIONS,
            locale="en-US",
            extra=extra,
            message=target,
        )

    # ---------------------------------------------------------------- REST plumbing

    def _build_routes(self) -> None:
        snow = r"(\d+)"
        tok = r"([^/]+)"
        table: list[tuple[str, str, str, _Handler]] = [
            ("GET", r"/users/@me", "get_me", self._get_me),
            ("GET", r"/oauth2/applications/@me", "get_application", self._get_application),
            ("GET", r"/applications/@me", "get_application", self._get_application),
            ("GET", r"/gateway(?:/bot)?", "get_gateway", self._get_gateway),
            ("POST", r"/users/@me/channels", "create_dm", self._create_dm),
            ("GET", rf"/users/{snow}", "get_user", self._get_user),
            ("GET", rf"/channels/{snow}", "get_channel", self._get_channel),
            ("POST", rf"/channels/{snow}/messages", "channel_message", self._post_channel_message),
            ("GET", rf"/channels/{snow}/messages/{snow}", "get_channel_message", self._get_channel_message),
            ("PATCH", rf"/channels/{snow}/messages/{snow}", "edit_channel_message", self._edit_channel_message),
            ("DELETE", rf"/channels/{snow}/messages/{snow}", "delete_channel_message", self._delete_channel_message),
            ("POST", rf"/interactions/{snow}/{tok}/callback", "interaction_callback", self._callback),
            ("GET", rf"/webhooks/{snow}/{tok}/messages/@original", "webhook_get_original", self._webhook_get),
            ("PATCH", rf"/webhooks/{snow}/{tok}/messages/@original", "webhook_edit_original", self._webhook_edit),
            ("DELETE", rf"/webhooks/{snow}/{tok}/messages/@original", "webhook_delete_original", self._webhook_delete),
            ("GET", rf"/webhooks/{snow}/{tok}/messages/{snow}", "webhook_get_message", self._webhook_get),
            ("PATCH", rf"/webhooks/{snow}/{tok}/messages/{snow}", "webhook_edit_message", self._webhook_edit),
            ("DELETE", rf"/webhooks/{snow}/{tok}/messages/{snow}", "webhook_delete_message", self._webhook_delete),
            ("POST", rf"/webhooks/{snow}/{tok}", "webhook_followup", self._webhook_followup),
            ("GET", rf"/applications/{snow}/commands", "get_commands", self._get_commands),
            ("PUT", rf"/applications/{snow}/commands", "put_commands", self._put_commands),
            ("GET", rf"/applications/{snow}/guilds/{snow}/commands", "get_guild_commands", self._get_commands),
            ("PUT", rf"/applications/{snow}/guilds/{snow}/commands", "put_guild_commands", self._put_commands),
        ]
        self._routes = [(m, re.compile(p), name, h) for m, p, name, h in table]

    async def _read_body(self, request: web.Request, record: RecordedRequest) -> None:
        content_type = request.content_type
        if content_type.startswith("multipart/"):
            record.multipart = True
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, aiohttp.BodyPartReader):
                    continue
                name = part.name or ""
                if part.filename is None and name == "payload_json":
                    record.body = _parse_json(await part.text())
                elif part.filename is not None:
                    record.files.append(
                        UploadedFile(
                            field=name,
                            filename=part.filename,
                            content_type=part.headers.get(aiohttp.hdrs.CONTENT_TYPE, "application/octet-stream"),
                            data=bytes(await part.read(decode=False)),
                        )
                    )
                else:
                    # Plain form fields are how Discord accepts "content" without payload_json.
                    if not isinstance(record.body, dict):
                        record.body = {}
                    record.body[name] = await part.text()
        elif request.can_read_body:
            raw = await request.read()
            if raw and content_type == "application/json":
                record.body = _parse_json(raw.decode("utf-8", "replace"))
            elif raw:
                record.body = raw.decode("utf-8", "replace")

    async def _rest_handler(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        record = RecordedRequest(
            seq=next(self._request_seq),
            method=request.method,
            path=path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
        )
        try:
            await self._read_body(request, record)
            reply = await self._answer(record)
        except _BadRequest as bad:
            reply = bad.reply
        except Exception as error:
            # A bug in the fake must fail the test that met it, not pass as a retried Discord 500.
            self.internal_errors.append(f"{record}: {error!r}")
            reply = _Reply(500, error_body(f"fake discord bug: {error!r}", 0))
        record.status = reply.status
        record.response = reply.body
        self.requests.append(record)
        await self._notify()
        return reply.to_response()

    async def _answer(self, record: RecordedRequest) -> _Reply:
        handler: _Handler | None = None
        match: re.Match[str] | None = None
        for method, pattern, name, candidate in self._routes:
            found = pattern.fullmatch(record.path)
            if found is not None and method == record.method:
                record.route, handler, match = name, candidate, found
                break

        if self.validate_schemas and record.body is not None and record.method in ("POST", "PUT", "PATCH"):
            record.schema_errors = openapi_check.validate_request(record.method, record.path, record.body)
            self.schema_errors.extend(record.schema_errors)

        for injection in self.injections:
            if injection.matches(record.method, record.path):
                injection.hits += 1
                if injection.delay > 0:
                    await asyncio.sleep(injection.delay)
                if injection.status is not None:
                    record.injected = True
                    return _Reply(injection.status, injection.body, dict(injection.headers))
                break

        if handler is None or match is None:
            return _Reply(404, NOT_FOUND)
        if record.schema_errors and self.reject_invalid_bodies:
            raise _invalid_form("; ".join(record.schema_errors))
        is_webhook = record.path.startswith(("/webhooks/", "/interactions/"))
        if not is_webhook and record.headers.get("authorization") != f"Bot {self.token}":
            return _Reply(401, UNAUTHORIZED)
        return await handler(record, match)

    def _check_uploads(self, record: RecordedRequest, interaction: FakeInteraction | None) -> None:
        limits = [self.upload_limit] if self.upload_limit is not None else []
        if interaction is not None:
            limits.append(int(interaction.payload.get("attachment_size_limit") or DEFAULT_ATTACHMENT_SIZE_LIMIT))
        if not limits:
            return
        limit = min(limits)
        if any(f.size > limit for f in record.files):
            raise _BadRequest(_Reply(413, ENTITY_TOO_LARGE))
        if len(record.files) > 10:
            raise _invalid_form("Must be 10 or fewer in length.")

    # ---------------------------------------------------------------- message model

    def _new_message(
        self,
        *,
        channel_id: int,
        guild_id: int | None,
        message_id: int | None = None,
        type: int = MESSAGE_TYPE_DEFAULT,
        interaction: FakeInteraction | None = None,
    ) -> FakeMessage:
        message = FakeMessage(
            id=message_id or self.snowflake(),
            channel_id=channel_id,
            author=self.bot_user.to_api(),
            type=type,
            guild_id=guild_id,
            webhook_id=self.application_id if interaction is not None else None,
            application_id=self.application_id if interaction is not None else None,
            interaction_token=interaction.token if interaction is not None else None,
        )
        self.messages[message.id] = message
        return message

    def _apply_write(
        self,
        message: FakeMessage,
        payload: Mapping[str, Any],
        files: Sequence[UploadedFile],
        *,
        creating: bool,
    ) -> None:
        if "content" in payload:
            message.content = payload["content"] or ""
        if "embeds" in payload:
            message.embeds = list(payload["embeds"] or [])
        elif "embed" in payload:
            message.embeds = [payload["embed"]] if payload["embed"] else []
        if "components" in payload:
            message.components = list(payload["components"] or [])
        flags = payload.get("flags")
        if isinstance(flags, int):
            allowed = _CREATE_FLAGS if creating else _EDIT_FLAGS
            message.flags = (message.flags & ~allowed) | (flags & allowed)
        if not creating:
            message.flags &= ~FLAG_LOADING
            message.edited_timestamp = _now_iso()

        by_index: dict[int, UploadedFile] = {}
        for position, upload in enumerate(files):
            found = _FILE_FIELD.fullmatch(upload.field)
            index = position
            if found is not None and found.group(1) is not None:
                index = int(found.group(1))
            by_index[index] = upload
        referenced: set[int] = set()
        listed = payload.get("attachments")
        if isinstance(listed, list):
            existing = {a.id: a for a in message.attachments}
            new_list: list[FakeAttachment] = []
            for item in listed:
                raw_id = str(item.get("id", "")) if isinstance(item, dict) else ""
                ref = int(raw_id) if raw_id.isdigit() else -1
                if ref in by_index:
                    referenced.add(ref)
                    new_list.append(self._attachment(message, by_index[ref], item))
                elif ref in existing:
                    new_list.append(existing[ref])
                else:
                    raise _invalid_form(f"attachments: unknown attachment id {item!r}")
            message.attachments = new_list
        elif creating:
            message.attachments = []
        for index in sorted(by_index):
            if index not in referenced:
                message.attachments.append(self._attachment(message, by_index[index], {}))
        message.history.append(message.snapshot())

    def _attachment(self, message: FakeMessage, upload: UploadedFile, item: Mapping[str, Any]) -> FakeAttachment:
        filename = str(item.get("filename") or upload.filename)
        content_type = upload.content_type
        if content_type in ("", "application/octet-stream"):
            # Discord ignores the part's type and sniffs by name; discord.py always sends octet-stream.
            content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        attachment_id = self.snowflake()
        return FakeAttachment(
            id=attachment_id,
            filename=filename,
            content_type=content_type,
            data=upload.data,
            url=f"{self.http_base}/attachments/{message.channel_id}/{attachment_id}/{filename}",
            description=item.get("description"),
        )

    async def _attachment_handler(self, request: web.Request) -> web.StreamResponse:
        attachment_id = int(request.match_info["attachment_id"])
        for message in self.messages.values():
            for attachment in message.attachments:
                if attachment.id == attachment_id:
                    return web.Response(body=attachment.data, content_type=attachment.content_type)
        return web.Response(status=404, text="not found")

    # ---------------------------------------------------------------- REST handlers: identity

    async def _get_me(self, record: RecordedRequest, match: re.Match[str]) -> _Reply:
        return _Reply(
            200, {**self.bot_user.to_api(), "verified": True, "mfa_enabled": False, "locale": "en-US", "email": None}
        )

    async def _get_application(self, record: RecordedRequest, match: re.Match[str]) -> _Reply:
        return _Reply(
            200,
            {
                "id": str(self.application_id),
                "name": self.bot_user.username,
                "description": "",
                "icon": None,
                "bot_public": False,
                "bot_require_code_grant": False,
                "owner": FakeUser(DEFAULT_USER_ID, "owner").to_api(),
                "verify_key": "0" * 64,
                "flags": 0,
                "team": None,
                "bot": self.bot_user.to_api(),
                "summary": "",
            },
        )

    async def _get_gateway(self, record: RecordedRequest, match: re.Match[str]) -> _Reply:
        url = f"ws://127.0.0.1:{self.port}/gateway"
        return _Reply(
            200,
            {
                "url": url,
                "shards": 1,
                "session_start_limit": {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1},
            },
        )

    async def _get_user(self, record: RecordedRequest, match: re.Match[str]) -> _Reply:
        return _Reply(200, self.user(int(match.group(1))).to_api())

    async def _create_dm(self, record: RecordedRequest, match: re.Match[str]) -> _Reply:
        body = record.body if isinstance(record.body, dict) else {}
        recipient = body.get("recipient_id")
        if recipient is None or not str(recipient).isdigit():
            raise _invalid_form("recipient_id is required")
        user_id = int(recipient)
        return _Reply(200, self._dm_channel_payload(user_id))

    def _dm_channel_payload(self, user_id: int) -> dict[str, Any]:
        return {
            "id": str(self.dm_channel_id(user_id)),
            "type": CHANNEL_DM,
            "last_message_id": None,
            "flags": 0,
            "recipients": [self.user(user_id).to_api()],
        }

    async def _get_channel(self, record: RecordedRequest, match: re.Match[str]) -> _Reply:
        channel_id = int(match.group(1))
        for user_id, dm_id in self.dm_channels.items():
            if dm_id == channel_id:
                return _Reply(200, self._dm_channel_payload(user_id))
        known, guild_id = self._channel_guild(channel_id)
        if not known:
            return _Reply(404, UNKNOWN_CHANNEL)
        return _Reply(
            200,
            {
                "id": str(channel_id),
                "type": CHANNEL_GUILD_TEXT,
                "name": "general",
                "guild_id": str(guild_id),
                "position": 0,
                "permission_overwrites": [],
                "nsfw": False,
                "parent_id": None,
                "topic": None,
                "rate_limit_per_user": 0,
                "last_message_id": None,
                "flags": 0,
            },
        )

    # ---------------------------------------------------------------- REST handlers: channels

    async def _post_channel_message(self, record: RecordedRequest, match: re.Match[str]) -> _Reply:
        channel_id = int(match.group(1))
        known, guild_id = self._channel_guild(channel_id)
        if not known:
            return _Reply(404, UNKNOWN_CHANNEL)
        self._check_uploads(record, None)
        payload = record.body if isinstance(record.body, dict) else {}
        if (
            not any(payload.get(k) for k in ("content", "embeds", "components", "sticker_ids", "poll"))
            and not record.files
        ):
            return _Reply(400, error_body("Cannot send an empty message", 50006))
        message = self._new_message(channel_id=channel_id, guild_id=guild_id)
        self._apply_write(message, payload, record.files, creating=True)
        return _Reply(200, message.to_api())

    def _channel_message(self, match: re.Match[str]) -> FakeMessage | None:
        channel_id, message_id = int(match.group(1)), int(match.group(2))
        message = self.messages.get(message_id)
        if message is None or message.channel_id != channel_id or message.deleted:
            return None
        return message

    async def _get_channel_message(self, record: RecordedRequest, match: re.Match[str]) -> _Reply:
        message = self._channel_message(match)
        return _Reply(200, message.to_api()) if message else _Reply(404, UNKNOWN_MESSAGE)

    async def _edit_channel_message(self, record: RecordedRequest, match: re.Match[str]) -> _Reply:
        message = self._channel_message(match)
        if message is None:
            return _Reply(404, UNKNOWN_MESSAGE)
        self._check_uploads(record, None)
        self._apply_write(message, record.body if isinstance(record.body, dict) else {}, record.files, creating=False)
        return _Reply(200, message.to_api())

    async def _delete_channel_message(self, record: RecordedRequest, match: re.Match[str]) -> _Reply:
        message = self._channel_message(match)
        if message is None:
            return _Reply(404, UNKNOWN_MESSAGE)
        message.deleted = True
        return _Reply(204)

    # ---------------------------------------------------------------- REST handlers: interactions

    def _token_dead(self, inter: FakeInteraction) -> bool:
        return inter.killed or time.monotonic() - inter.created_at > self.token_lifetime

    async def _callback(self, record: RecordedRequest, match: re.Match[str]) -> _Reply:
        inter = self.interactions.get(match.group(2))
        if inter is None or inter.id != int(match.group(1)):
            return _Reply(404, UNKNOWN_INTERACTION)
        late = time.monotonic() - inter.created_at > self.callback_deadline
        if self._token_dead(inter) or inter.force_late or (late and not inter.acknowledged):
            return _Reply(404, UNKNOWN_INTERACTION)
        if inter.acknowledged:
            return _Reply(400, ALREADY_ACKNOWLEDGED)
        body = record.body if isinstance(record.body, dict) else {}
        kind = body.get("type")
        data = body.get("data") or {}
        if not isinstance(kind, int) or not isinstance(data, dict):
            raise _invalid_form("type is required")
        self._check_uploads(record, inter)

        message: FakeMessage | None = None
        if kind in (CALLBACK_MESSAGE, CALLBACK_DEFER):
            message = self._new_message(
                channel_id=inter.channel_id,
                guild_id=inter.guild_id,
                type=MESSAGE_TYPE_CHAT_INPUT_COMMAND,
                interaction=inter,
            )
            if kind == CALLBACK_MESSAGE:
                self._apply_write(message, data, record.files, creating=True)
            else:
                message.flags = FLAG_LOADING | (int(data.get("flags") or 0) & FLAG_EPHEMERAL)
                message.history.append(message.snapshot())
            inter.original_message_id = message.id
        elif kind in (CALLBACK_DEFER_UPDATE, CALLBACK_UPDATE):
            if inter.type != INTERACTION_COMPONENT or inter.component_message_id is None:
                return _Reply(400, error_body("Interaction response type is invalid for this interaction", 50035))
            message = self.messages[inter.component_message_id]
            if kind == CALLBACK_UPDATE:
                self._apply_write(message, data, record.files, creating=False)
            inter.original_message_id = message.id
        elif kind == CALLBACK_AUTOCOMPLETE:
            if inter.type != INTERACTION_AUTOCOMPLETE:
                return _Reply(400, error_body("Interaction response type is invalid for this interaction", 50035))
        elif kind != CALLBACK_MODAL:
            raise _invalid_form(f"unsupported interaction callback type {kind}")
        inter.callback_type = kind
        inter.callback_body = body
        inter.callback_at = time.monotonic()

        if record.query.get("with_response", "").lower() not in ("1", "true"):
            return _Reply(204)
        answer: dict[str, Any] = {"interaction": {"id": str(inter.id), "type": inter.type}}
        if message is not None:
            answer["interaction"].update(
                {
                    "response_message_id": str(message.id),
                    "response_message_loading": kind == CALLBACK_DEFER,
                    "response_message_ephemeral": message.ephemeral,
                }
            )
            if kind in (CALLBACK_MESSAGE, CALLBACK_UPDATE):
                answer["resource"] = {"type": kind, "message": message.to_api()}
        return _Reply(200, answer)

    def _webhook_interaction(self, match: re.Match[str]) -> FakeInteraction:
        if int(match.group(1)) != self.application_id:
            raise _BadRequest(_Reply(404, UNKNOWN_WEBHOOK))
        inter = self.interactions.get(match.group(2))
        if inter is None:
            raise _BadRequest(_Reply(401, INVALID_WEBHOOK_TOKEN))
        if self._token_dead(inter):
            if inter.kill_status == 404:
                raise _BadRequest(_Reply(404, UNKNOWN_WEBHOOK))
            raise _BadRequest(_Reply(401, INVALID_WEBHOOK_TOKEN))
        return inter

    def _webhook_message(self, inter: FakeInteraction, match: re.Match[str]) -> FakeMessage:
        if match.re.pattern.endswith("@original"):
            message_id = inter.original_message_id
        else:
            message_id = int(match.group(3))
            if message_id != inter.original_message_id and message_id not in inter.followup_ids:
                message_id = None
        message = self.messages.get(message_id) if message_id is not None else None
        if message is None or message.deleted:
            raise _BadRequest(_Reply(404, UNKNOWN_MESSAGE))
        return message

    async def _webhook_get(self, record: RecordedRequest, match: re.Match[str]) -> _Reply:
        inter = self._webhook_interaction(match)
        return _Reply(200, self._webhook_message(inter, match).to_api())

    async def _webhook_edit(self, record: RecordedRequest, match: re.Match[str]) -> _Reply:
        inter = self._webhook_interaction(match)
        message = self._webhook_message(inter, match)
        self._check_uploads(record, inter)
        self._apply_write(message, record.body if isinstance(record.body, dict) else {}, record.files, creating=False)
        return _Reply(200, message.to_api())

    async def _webhook_delete(self, record: RecordedRequest, match: re.Match[str]) -> _Reply:
        inter = self._webhook_interaction(match)
        message = self._webhook_message(inter, match)
        message.deleted = True
        message.history.append(message.snapshot())
        return _Reply(204)

    async def _webhook_followup(self, record: RecordedRequest, match: re.Match[str]) -> _Reply:
        inter = self._webhook_interaction(match)
        if not inter.acknowledged:
            return _Reply(404, UNKNOWN_WEBHOOK)
        self._check_uploads(record, inter)
        payload = record.body if isinstance(record.body, dict) else {}
        original = self.original(inter)
        if original is not None and original.loading and inter.callback_type == CALLBACK_DEFER:
            # Discord turns the first follow-up after a "thinking" defer into the original response.
            self._apply_write(original, payload, record.files, creating=False)
            message = original
        else:
            message = self._new_message(
                channel_id=inter.channel_id,
                guild_id=inter.guild_id,
                type=MESSAGE_TYPE_CHAT_INPUT_COMMAND,
                interaction=inter,
            )
            self._apply_write(message, payload, record.files, creating=True)
            inter.followup_ids.append(message.id)
        if record.query.get("wait", "").lower() not in ("1", "true"):
            return _Reply(204)
        return _Reply(200, message.to_api())

    # ---------------------------------------------------------------- REST handlers: commands

    def _command_scope(self, match: re.Match[str]) -> int | None:
        if int(match.group(1)) != self.application_id:
            raise _BadRequest(_Reply(403, error_body("Missing Access", 50001)))
        return int(match.group(2)) if match.lastindex and match.lastindex >= 2 else None

    async def _get_commands(self, record: RecordedRequest, match: re.Match[str]) -> _Reply:
        return _Reply(200, self.commands.get(self._command_scope(match), []))

    async def _put_commands(self, record: RecordedRequest, match: re.Match[str]) -> _Reply:
        scope = self._command_scope(match)
        body = record.body if isinstance(record.body, list) else []
        previous = {c["name"]: c for c in self.commands.get(scope, [])}
        stored: list[dict[str, Any]] = []
        for command in body:
            if not isinstance(command, dict) or not command.get("name"):
                raise _invalid_form("command name is required")
            old = previous.get(command["name"])
            entry: dict[str, Any] = {
                "type": 1,
                "description": "",
                "options": [],
                "default_member_permissions": None,
                "nsfw": False,
                "integration_types": [0],
                "contexts": None,
                **command,
                "id": old["id"] if old else str(self.snowflake()),
                "application_id": str(self.application_id),
                "version": str(self.snowflake()),
            }
            if scope is not None:
                entry["guild_id"] = str(scope)
            stored.append(entry)
        self.commands[scope] = stored
        self.command_syncs.append((scope, body))
        return _Reply(200, stored)


@contextlib.asynccontextmanager
async def started_fake(**kwargs: Any) -> AsyncIterator[FakeDiscord]:
    """A started FakeDiscord with discord.py pointed at it, undone and closed on exit."""
    fake = FakeDiscord(**kwargs)
    await fake.start()
    try:
        with point_discordpy_at(fake):
            yield fake
    finally:
        await fake.close()
