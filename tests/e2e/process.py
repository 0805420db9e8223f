"""Run ``python -m bot`` as a real child process against the fakes, every wait bounded.

The child gets a clean environment: the settings the test passes, none of the developer's
``DISCORD_*``/``COMETAPI_*``/``FLUXBOT_*`` variables, and a working directory of its own (an empty
temporary directory), so neither a developer's environment nor a ``.env`` in the repository can
leak into the run. ``PYTHONPATH`` points at the repository so ``-m bot`` finds this checkout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from tests.fakes.discord import FakeDiscord

__all__ = ["REPO_ROOT", "BotProcess", "bot_process", "child_environment"]

REPO_ROOT = Path(__file__).resolve().parents[2]
_SETTING_PREFIXES = ("DISCORD_", "COMETAPI_", "FLUXBOT_")
#: variables of the test's own interpreter that would change how the child runs or what it prints
_DROPPED = {"PYTHONWARNINGS", "PYTHONSTARTUP", "PYTHONHOME", "PYTHONINSPECT", "PYTHONDEVMODE"}

START_TIMEOUT = 20.0
EXIT_TIMEOUT = 10.0


def child_environment(settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any bot setting, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SETTING_PREFIXES) and k not in _DROPPED}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(settings)
    return env


class BotProcess:
    """One running ``python -m bot``; its stdout and stderr are drained all the time."""

    def __init__(self, proc: asyncio.subprocess.Process, identified_before: int) -> None:
        self.proc = proc
        self.stdout = bytearray()
        self.stderr = bytearray()
        self._identified_before = identified_before
        self._readers = [
            asyncio.create_task(self._drain(proc.stdout, self.stdout), name=f"bot[{proc.pid}]:stdout"),
            asyncio.create_task(self._drain(proc.stderr, self.stderr), name=f"bot[{proc.pid}]:stderr"),
        ]

    @staticmethod
    async def _drain(stream: asyncio.StreamReader | None, into: bytearray) -> None:
        if stream is None:
            return
        while chunk := await stream.read(65536):
            into += chunk

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    def output(self) -> str:
        """Everything the process wrote so far, stdout first."""
        return self.out + self.err

    def describe(self) -> str:
        tail = "\n".join(self.output().splitlines()[-40:])
        return f"bot pid {self.proc.pid}, exit {self.returncode}; last output:\n{tail}"

    async def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        """The exit status once the process ended (within ``timeout``) and its pipes are drained."""
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"the bot did not exit within {timeout}s; {self.describe()}") from None
        await asyncio.wait(self._readers, timeout=5.0)
        return code

    def send(self, signum: signal.Signals) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signum)

    async def stop(self, timeout: float = EXIT_TIMEOUT) -> int:
        """SIGTERM, then wait for the exit status."""
        self.send(signal.SIGTERM)
        return await self.wait(timeout)

    async def kill(self) -> int:
        """SIGKILL, then wait for the exit status."""
        self.send(signal.SIGKILL)
        return await self.wait(EXIT_TIMEOUT)

    async def wait_connected(self, fake: FakeDiscord, timeout: float = START_TIMEOUT) -> None:
        """Until this process has identified on the fake's gateway and got READY (so it handles
        interactions); fails at once, with the output, if the process ends first."""

        def identified() -> bool:
            return len(fake.identify_payloads) > self._identified_before

        async def connected() -> None:
            await fake.wait_for(identified, timeout, "the bot process to IDENTIFY")
            await fake.wait_until_identified(timeout)

        waiter = asyncio.create_task(connected(), name="bot-process:connected")
        exited = asyncio.create_task(self.proc.wait(), name="bot-process:exited")
        try:
            await asyncio.wait({waiter, exited}, timeout=timeout + 1.0, return_when=asyncio.FIRST_COMPLETED)
            if waiter.done() and waiter.exception() is None:
                return
            if exited.done():
                await asyncio.wait(self._readers, timeout=5.0)
                raise AssertionError(f"the bot exited before it connected; {self.describe()}")
            raise AssertionError(f"the bot did not connect within {timeout}s; {self.describe()}") from (
                waiter.exception() if waiter.done() else None)
        finally:
            for task in (waiter, exited):
                task.cancel()
            await asyncio.wait({waiter, exited}, timeout=1.0)

    async def close(self) -> None:
        """Make sure nothing outlives the test: kill if still running, reap, stop the readers."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), EXIT_TIMEOUT)
        await asyncio.wait(self._readers, timeout=2.0)
        for reader in self._readers:
            reader.cancel()


@contextlib.asynccontextmanager
async def bot_process(
    settings: Mapping[str, str], *args: str, cwd: Path, fake: FakeDiscord | None = None,
) -> AsyncIterator[BotProcess]:
    """``python -m bot *args`` in ``cwd`` with ``settings`` as its whole configuration; killed on exit
    if still running. Pass ``fake`` so :meth:`BotProcess.wait_connected` counts only this process's
    IDENTIFY."""
    await asyncio.to_thread(cwd.mkdir, parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *args,
        cwd=cwd,
        env=child_environment(settings),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # Its own session: a Ctrl-C meant for pytest must not reach the bot, which the test stops itself.
        start_new_session=True,
    )
    running = BotProcess(proc, len(fake.identify_payloads) if fake is not None else 0)
    failed = True
    try:
        yield running
        failed = False
    finally:
        await running.close()
        if failed:
            # Shown by pytest with the failure: what the bot said is usually the explanation.
            sys.stderr.write(f"\n--- {running.describe()}\n")
