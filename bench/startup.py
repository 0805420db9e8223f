"""Start-up: ``python -m bot`` until the fake Discord saw IDENTIFY and sent READY, and the import time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import BenchResult, Table

NAME = "startup"
TITLE = "Start-up: python -m bot to ready, and import time"

REPOSITORY = Path(__file__).resolve().parent.parent
IMPORTS = "import bot.client, cogs.flux"


async def _one_start(env: dict[str, str], fake: object) -> float:
    from tests.fakes.discord import FakeDiscord

    assert isinstance(fake, FakeDiscord)
    seen = len(fake.identify_payloads)
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", cwd=REPOSITORY, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        await fake.wait_for(lambda: len(fake.identify_payloads) > seen and fake._current is not None
                            and fake._current.ready, timeout=60.0, what="IDENTIFY from python -m bot")
        elapsed = time.monotonic() - started
    except TimeoutError:
        process.kill()
        _, err = await process.communicate()
        raise RuntimeError("python -m bot did not identify:\n" + err.decode(errors="replace")[-2000:]) from None
    process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(15.0):
            await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
    # The next run must not see this connection as the current one.
    with contextlib.suppress(TimeoutError):
        await fake.wait_for(lambda: fake._current is None, timeout=5.0, what="the old gateway connection to close")
    return elapsed


async def _timed_python(code: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=REPOSITORY, env=env,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if await process.wait() != 0:
        raise RuntimeError(f"python -c {code!r} failed")
    return time.perf_counter() - started


async def _importtime(env: dict[str, str]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """From ``python -X importtime``: (package, cumulative µs) for each top-level package at its outermost
    import, and (module, self µs) for the modules that cost most by themselves."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-X", "importtime", "-c", IMPORTS,
                                                   cwd=REPOSITORY, env=env, stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.PIPE)
    _, err = await process.communicate()
    outermost: dict[str, tuple[int, int]] = {}  # root -> (indent, cumulative)
    selves: list[tuple[str, int]] = []
    pattern = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")
    for line in err.decode(errors="replace").splitlines():
        match = pattern.match(line)
        if match is None:
            continue
        own, cumulative, indent, module = int(match.group(1)), int(match.group(2)), len(match.group(3)), match.group(4)
        selves.append((module, own))
        root = module.split(".")[0]
        known = outermost.get(root)
        if known is None or indent < known[0] or (indent == known[0] and cumulative > known[1]):
            outermost[root] = (indent, cumulative)
    packages = sorted(((root, value[1]) for root, value in outermost.items()), key=lambda item: item[1],
                      reverse=True)
    return packages, sorted(selves, key=lambda item: item[1], reverse=True)


async def run(smoke: bool) -> BenchResult:
    from tests.fakes.comet import FakeCometAPI
    from tests.fakes.discord import FakeGuild, started_fake

    runs = 1 if smoke else 5
    base_env = {key: value for key, value in os.environ.items() if not key.startswith(("DISCORD_", "COMETAPI_",
                                                                                       "FLUXBOT_"))}
    base_env["PYTHONDONTWRITEBYTECODE"] = base_env.get("PYTHONDONTWRITEBYTECODE", "")
    if not base_env["PYTHONDONTWRITEBYTECODE"]:
        del base_env["PYTHONDONTWRITEBYTECODE"]
    with tempfile.TemporaryDirectory(prefix="fluxbot-startup-") as temp:
        async with started_fake(guilds=[FakeGuild()]) as fake, FakeCometAPI() as comet:
            env = {
                **base_env,
                "DISCORD_TOKEN": fake.token, "COMETAPI_KEY": comet.api_key, "COMETAPI_BASE_URL": comet.base_url,
                "DISCORD_API_BASE_URL": fake.rest_base, "DISCORD_GATEWAY_URL": fake.gateway_url,
                "FLUXBOT_DATA_DIR": str(Path(temp) / "data"), "FLUXBOT_LOG_LEVEL": "WARNING",
            }
            first = await _one_start(env, fake)  # new data dir: creates the store and syncs the commands
            starts = [await _one_start(env, fake) for _ in range(runs)]
            syncs = len(fake.command_syncs)
    bare_python = [await _timed_python("pass", base_env) for _ in range(runs)]
    with_imports = [await _timed_python(IMPORTS, base_env) for _ in range(runs)]
    packages, selves = await _importtime(base_env)

    median_start = statistics.median(starts)
    median_import = statistics.median(with_imports) - statistics.median(bare_python)
    rows = [
        ["python -m bot → READY (existing data dir)", f"{median_start:.2f}", f"{min(starts):.2f}",
         f"{max(starts):.2f}", str(runs)],
        ["python -m bot → READY (first start: new store, command sync)", f"{first:.2f}", f"{first:.2f}",
         f"{first:.2f}", "1"],
        [f"python -c '{IMPORTS}'", f"{statistics.median(with_imports):.2f}", f"{min(with_imports):.2f}",
         f"{max(with_imports):.2f}", str(runs)],
        ["python -c pass (interpreter alone)", f"{statistics.median(bare_python):.2f}", f"{min(bare_python):.2f}",
         f"{max(bare_python):.2f}", str(runs)],
    ]
    table = Table(columns=["Measured", "Median (s)", "Min (s)", "Max (s)", "Runs"], rows=rows)
    total_us = next((us for name, us in packages if name == "bot"), 0) or 1
    extra = Table(
        caption=f"Where the import time goes (python -X importtime -c '{IMPORTS}', one run): each top-level"
        " package at its outermost import (cumulative, so packages overlap: discord includes part of aiohttp)"
        " and, below, the modules that cost most by themselves (self time). Share = of bot.client's total.",
        columns=["Package or module", "Import (ms)", "Share"],
        rows=[[name, f"{us / 1000:.0f}", f"{us / total_us:.0%}"] for name, us in packages[:8]]
        + [[f"{name} (self)", f"{us / 1000:.0f}", f"{us / total_us:.0%}"] for name, us in selves[:5]],
    )
    description = (
        "`python -m bot` started as a subprocess (this interpreter, repository as working directory) with its"
        " environment pointing at a fake Discord (tests/fakes/discord.py, in the benchmark process) and a fake"
        " CometAPI; the time runs from the spawn until the fake gateway has received IDENTIFY and sent READY."
        f" Each start is stopped with SIGTERM before the next. Median of {runs} starts sharing one data"
        " directory (commands already synced), after a first start on an empty one, shown separately."
        f" Import time: wall time of `python -c '{IMPORTS}'` minus that of `python -c pass`, medians of {runs}."
    )
    notes = [
        f"Importing the bot's modules costs {median_import:.2f} s of the {median_start:.2f} s start"
        " (median against median); the rest is the store, the login over REST and the gateway handshake.",
        f"The fake saw {syncs} command sync(s) over all starts (expected 1: only the first start syncs).",
    ]
    return BenchResult(title=TITLE, description=description, table=table, notes=notes, extra_tables=[extra])
