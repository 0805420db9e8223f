"""``python -m bot [run|sync]``: read the settings, set up logging and signals, run until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

import discord

from bot.config import ConfigError, Settings, load_settings, read_environment

log = logging.getLogger("bot")

MASK = "********"
# Interaction (and webhook) tokens in the URLs and gateway payloads discord.py logs at DEBUG. Discord's
# interaction tokens all start with base64("interaction:"), which also catches them in any other text.
_TOKEN_PATTERNS = (
    (re.compile(r"aW50ZXJhY3Rpb246[A-Za-z0-9_\-.]+"), MASK),
    (re.compile(r"(/(?:webhooks|interactions)/\d+/)[^/\s'\"?#]+"), rf"\g<1>{MASK}"),
    (re.compile(r"""(['"]token['"]\s*:\s*['"])[^'"]+"""), rf"\g<1>{MASK}"),
)

USAGE = "usage: python -m bot [run|sync]\n  run   run the bot (default)\n  sync  sync the slash commands now, then exit"


class RedactingFormatter(logging.Formatter):
    """Wraps the log formatter so no credential reaches the log, tracebacks included: the bot token
    and the API key by value, interaction tokens by shape (discord.py logs them at DEBUG)."""

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self._inner = inner
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        for pattern, replacement in _TOKEN_PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(self._inner.format(record))


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    discord.utils.setup_logging(handler=handler, level=logging.getLevelNamesMapping()[settings.log_level], root=True)
    handler.setFormatter(RedactingFormatter(handler.formatter or logging.Formatter(),
                                            (settings.discord_token.get(), settings.cometapi_key.get())))
    # aiosqlite logs every statement with its parameters at DEBUG: noise, and it holds stored data.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)


async def _run(settings: Settings, *, sync_only: bool) -> int:
    from bot.client import FluxBot

    bot = FluxBot(settings, force_sync=sync_only, sync_only=sync_only)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)

    async def runner() -> None:
        async with bot:
            await bot.login(settings.discord_token.get())
            if sync_only:
                return
            await bot.connect(reconnect=True)

    task = asyncio.create_task(runner(), name="bot")
    stopper = asyncio.create_task(stop.wait(), name="signal")
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stopper.done():
            log.info("stopping")
            try:
                async with asyncio.timeout(4.5):
                    await bot.close()
            except TimeoutError:
                log.warning("shutdown took too long; exiting anyway")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=0.5)
            return 0
        task.result()
        return 0
    except discord.LoginFailure:
        print("DISCORD_TOKEN: Discord refused the token; copy it again from the Developer Portal's Bot page "
              "(see .env.example)", file=sys.stderr)
        return 2
    except discord.PrivilegedIntentsRequired:
        print("the bot asked for a privileged intent it is not allowed", file=sys.stderr)
        return 2
    finally:
        stopper.cancel()
        if not bot.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(bot.close(), timeout=4.0)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "run"
    if command in ("-h", "--help", "help") or command not in ("run", "sync") or len(args) > 1:
        print(USAGE, file=sys.stderr if command not in ("-h", "--help", "help") else sys.stdout)
        return 0 if command in ("-h", "--help", "help") else 2
    try:
        settings = load_settings(read_environment(Path(".env")))
    except ConfigError as exc:
        print(f"fluxbot: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings)
    try:
        return asyncio.run(_run(settings, sync_only=command == "sync"))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
