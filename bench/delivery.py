"""Delivery: from the API's Ready answer to the final upload received by (fake) Discord, against a bare transfer.

The fakes (tests/fakes/discord.py and tests/fakes/comet.py) run in a child process with their own event
loop; the real bot runs in this process, so its time and memory are its own. Both clocks are
``time.monotonic`` (CLOCK_MONOTONIC, shared by the processes of one machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import multiprocessing
import multiprocessing.connection
import random
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import BenchResult, Table, Target

NAME = "delivery"
TITLE = "Delivery: Ready to final upload, against a bare download + upload"

READY_AFTER = 0.3
RATIO_TARGET = 1.2
MEMORY_TARGET = 2.5


# -- the fakes, in their own process -------------------------------------------------------------------


def _fakes_process(conn: multiprocessing.connection.Connection) -> None:
    asyncio.run(_serve_fakes(conn))


async def _serve_fakes(conn: multiprocessing.connection.Connection) -> None:
    from tests.fakes.comet import FakeCometAPI
    from tests.fakes.discord import FakeGuild, started_fake

    loop = asyncio.get_running_loop()
    async with started_fake(guilds=[FakeGuild()]) as discord, FakeCometAPI() as comet:
        conn.send({"token": discord.token, "rest": discord.rest_base, "gateway": discord.gateway_url,
                   "comet": comet.base_url, "key": comet.api_key, "application_id": discord.application_id})
        expected_since = 0
        while True:
            command, *args = await loop.run_in_executor(None, conn.recv)
            if command == "stop":
                conn.send(None)
                return
            try:
                if command == "identified":
                    await discord.wait_until_identified(timeout=30.0)
                    conn.send(True)
                elif command == "image":
                    name, data = args
                    conn.send(comet.add_image(name, data, content_type="image/png"))
                elif command == "follow":
                    task_id, image_name = args
                    comet.timed_task(task_id, ready_after=READY_AFTER, image_name=image_name)
                    since = discord.requests[-1].seq if discord.requests else 0
                    interaction = await discord.send_interaction("fluxresult", {"id": task_id})
                    token = interaction.token
                    record = await discord.wait_for_request(
                        _upload_to(token, ok_only=True), timeout=120.0, since=since)
                    received = time.monotonic()
                    conn.send({"ready": comet.poll_times[task_id][-1], "received": received,
                               "uploaded": record.files[0].size, "token": token})
                elif command == "expect":
                    expected_since = discord.requests[-1].seq if discord.requests else 0
                    conn.send(True)
                elif command == "collect":
                    (token,) = args
                    record = await discord.wait_for_request(
                        _upload_to(token, ok_only=False), timeout=120.0, since=expected_since)
                    conn.send({"received": time.monotonic(), "uploaded": record.files[0].size,
                               "status": record.status})
                else:
                    conn.send(RuntimeError(f"unknown command {command!r}"))
            except Exception as exc:  # sent back and raised in the benchmark process
                conn.send(RuntimeError(f"fake side failed on {command}: {exc!r}"))


def _upload_to(token: str, *, ok_only: bool) -> Callable[[Any], bool]:
    def matches(record: Any) -> bool:
        return bool(record.files) and token in record.path and (not ok_only or record.status == 200)

    return matches


class _Fakes:
    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_fakes_process, args=(child,), name="fake-discord-comet", daemon=True)
        self._process.start()
        self._lock = asyncio.Lock()
        self.info: dict[str, Any] = {}

    async def ask(self, *command: object, timeout: float = 120.0) -> Any:
        async with self._lock:
            loop = asyncio.get_running_loop()
            if command:
                self._conn.send(command)
            answer = await asyncio.wait_for(loop.run_in_executor(None, self._conn.recv), timeout=timeout)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def start(self) -> None:
        self.info = await self.ask(timeout=60.0)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ask("stop", timeout=10.0)
        self._process.join(timeout=5.0)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5.0)


# -- memory of this process ----------------------------------------------------------------------------


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass(slots=True)
class Memory:
    rss_extra: int  # VmHWM after the run - VmRSS before (peak resident growth; native buffers included)
    traced_extra: int  # tracemalloc peak - traced before (Python allocations only)


async def _measure_memory(action: Callable[[], Awaitable[object]]) -> Memory:
    import gc

    gc.collect()
    tracemalloc.start()
    try:
        traced_before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        hwm_ok = _reset_hwm()
        rss_before = _status_kib("VmRSS")
        await action()
        traced_peak = tracemalloc.get_traced_memory()[1]
        rss_peak = _status_kib("VmHWM") if hwm_ok else 0
    finally:
        tracemalloc.stop()
    return Memory(rss_extra=max(0, rss_peak - rss_before), traced_extra=max(0, traced_peak - traced_before))


# -- images --------------------------------------------------------------------------------------------


def noise_png(size: int, seed: int) -> bytes:
    """A valid RGB PNG of random pixels, about ``size`` bytes (noise does not compress)."""
    from PIL import Image

    side = max(16, int((size / 3) ** 0.5))
    pixels = random.Random(seed).randbytes(side * side * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


# -- the two paths -------------------------------------------------------------------------------------


async def _bot_delivery(fakes: _Fakes, image_name: str, counter: list[int]) -> dict[str, Any]:
    counter[0] += 1
    result: dict[str, Any] = await fakes.ask("follow", f"delivery-{counter[0]}", image_name)
    return result


async def _bare_transfer(fakes: _Fakes, session: Any, image_url: str, token: str) -> dict[str, Any]:
    import aiohttp

    rest = fakes.info["rest"]
    url = f"{rest}/webhooks/{fakes.info['application_id']}/{token}/messages/@original"
    await fakes.ask("expect")
    started = time.monotonic()
    async with session.get(image_url) as response:
        data = await response.read()
    form = aiohttp.FormData()
    form.add_field("payload_json", json.dumps({"attachments": [{"id": 0, "filename": "image.png"}]}),
                   content_type="application/json")
    form.add_field("files[0]", data, filename="image.png", content_type="image/png")
    async with session.patch(url, data=form) as response:
        await response.read()
        status = response.status
    del data, form
    collected: dict[str, Any] = await fakes.ask("collect", token)
    if status != 200 or collected["status"] != 200:
        raise RuntimeError(f"bare upload answered HTTP {status}")
    return {"ready": started, "received": collected["received"], "uploaded": collected["uploaded"]}


async def _fit_times(size: int, limit: int, runs: int) -> tuple[list[float], int, int]:
    from bot.images import fit_under, sniff

    source = sniff(noise_png(size, seed=99))
    times: list[float] = []
    out = 0
    for _ in range(runs):
        started = time.perf_counter()
        fitted = await asyncio.to_thread(fit_under, source, limit)
        times.append(time.perf_counter() - started)
        if fitted is None:
            raise RuntimeError("fit_under gave up on the benchmark image")
        out = len(fitted.data)
    return times, len(source.data), out


# -- the benchmark -------------------------------------------------------------------------------------


def _mib(value: float) -> str:
    return f"{value / 2**20:.2f}"


async def run(smoke: bool) -> BenchResult:
    import aiohttp

    from bot.client import FluxBot
    from bot.config import load_settings
    from bot.schedule import ErrorBackoff, PollSchedule

    class BenchBot(FluxBot):
        # As tests/e2e/conftest.py's FastFluxBot: the measurement starts at the Ready answer anyway.
        poll_schedule = PollSchedule(initial=0.05, factor=1.5, ceiling=0.2, jitter=0.1)
        error_backoff = ErrorBackoff(initial=0.05, factor=2.0, ceiling=0.4, jitter=0.1)

    sizes = [("1 MiB", 1 << 20), ("8 MiB", 8 << 20)]
    runs = 1 if smoke else 5
    fakes = _Fakes()
    await fakes.start()
    rows: list[list[str]] = []
    targets: list[Target] = []
    notes: list[str] = []
    counter = [0]
    try:
        with tempfile.TemporaryDirectory(prefix="fluxbot-delivery-") as data_dir:
            settings = load_settings({
                "DISCORD_TOKEN": fakes.info["token"], "COMETAPI_KEY": fakes.info["key"],
                "COMETAPI_BASE_URL": fakes.info["comet"], "DISCORD_API_BASE_URL": fakes.info["rest"],
                "DISCORD_GATEWAY_URL": fakes.info["gateway"], "FLUXBOT_DATA_DIR": data_dir,
                "FLUXBOT_POLL_TIMEOUT": "120", "FLUXBOT_LOG_LEVEL": "WARNING",
            })
            bot = BenchBot(settings)
            bot_task = asyncio.create_task(bot.start(settings.discord_token.get()))
            try:
                await fakes.ask("identified", timeout=40.0)
                async with aiohttp.ClientSession() as session:
                    # Warm-up: first upload through discord.py, first image through Pillow.
                    await fakes.ask("image", "warm.png", noise_png(64 * 1024, seed=0))
                    warm = await _bot_delivery(fakes, "warm.png", counter)
                    await _bare_transfer(fakes, session, f"{fakes.info['comet']}/images/warm.png", warm["token"])
                    for label, size in sizes:
                        data = noise_png(size, seed=size)
                        name = f"noise-{size}.png"
                        image_url = await fakes.ask("image", name, data)
                        bot_times: list[float] = []
                        bare_times: list[float] = []
                        token = ""
                        for _ in range(runs):
                            got = await _bot_delivery(fakes, name, counter)
                            if got["uploaded"] != len(data):
                                raise RuntimeError(f"the bot uploaded {got['uploaded']} bytes of {len(data)}")
                            bot_times.append(got["received"] - got["ready"])
                            token = got["token"]
                            bare = await _bare_transfer(fakes, session, image_url, token)
                            bare_times.append(bare["received"] - bare["ready"])
                        bot_memory = await _measure_memory(functools.partial(_bot_delivery, fakes, name, counter))
                        bare_memory = await _measure_memory(
                            functools.partial(_bare_transfer, fakes, session, image_url, token))
                        bot_median, bare_median = statistics.median(bot_times), statistics.median(bare_times)
                        ratio = bot_median / bare_median
                        for path, median, times, memory in (("bot", bot_median, bot_times, bot_memory),
                                                            ("bare", bare_median, bare_times, bare_memory)):
                            rows.append([label, _mib(len(data)), path, f"{median * 1e3:.0f}",
                                         f"{min(times) * 1e3:.0f}", f"{max(times) * 1e3:.0f}",
                                         _mib(memory.rss_extra), f"{memory.rss_extra / len(data):.2f}",
                                         _mib(memory.traced_extra), f"{memory.traced_extra / len(data):.2f}"])
                        targets.append(Target(
                            f"{label}: Ready to final upload within {RATIO_TARGET}x of the bare transfer",
                            ratio <= RATIO_TARGET,
                            f"median {bot_median * 1e3:.0f} ms vs {bare_median * 1e3:.0f} ms = {ratio:.2f}x"))
                        worst = max(bot_memory.rss_extra, bot_memory.traced_extra) / len(data)
                        targets.append(Target(
                            f"{label}: peak extra memory within {MEMORY_TARGET}x the image size",
                            worst <= MEMORY_TARGET,
                            f"{bot_memory.rss_extra / len(data):.2f}x peak RSS growth,"
                            f" {bot_memory.traced_extra / len(data):.2f}x Python heap (bare transfer:"
                            f" {bare_memory.rss_extra / len(data):.2f}x /"
                            f" {bare_memory.traced_extra / len(data):.2f}x)"))
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(15.0):
                        await bot.close()
                if not bot_task.done():
                    bot_task.cancel()
                with contextlib.suppress(BaseException):
                    await bot_task
    finally:
        await fakes.close()

    fit_size, fit_limit, fit_runs = ((2 << 20), (1 << 20), 1) if smoke else ((20 << 20), (10 << 20), 3)
    fit_times, fit_in, fit_out = await _fit_times(fit_size, fit_limit, fit_runs)
    fit_table = Table(
        caption=f"Re-encoding a random-noise PNG to fit {fit_limit >> 20} MiB with bot.images.fit_under"
        f" (median of {fit_runs}, in a worker thread as the bot does):",
        columns=["PNG (MiB)", "Limit (MiB)", "Result (MiB)", "Median (s)", "Min (s)", "Max (s)"],
        rows=[[_mib(fit_in), _mib(fit_limit), _mib(fit_out), f"{statistics.median(fit_times):.2f}",
               f"{min(fit_times):.2f}", f"{max(fit_times):.2f}"]],
    )
    notes.append(f"Re-encoding {_mib(fit_in)} MiB of PNG noise under {fit_limit >> 20} MiB takes"
                 f" {statistics.median(fit_times):.2f} s (median of {fit_runs}).")
    description = (
        "The real bot (FluxBot with the e2e tests' fast poll schedule, in this process) follows a task on the"
        " fake CometAPI that turns Ready after 0.3 s and names a random-noise PNG of the given size; the fakes"
        " run in a child process. Time = the fake API's answering the poll that said Ready → the fake"
        " Discord's receipt (body read, 200 sent) of the PATCH to the interaction's original message carrying"
        " the file: tracker, image download and Pillow check, caching in the Store, render and upload through"
        " discord.py. The bare transfer, in the same run and the same process: one aiohttp GET of the same"
        " image from the same fake and one multipart PATCH of the same bytes to the same fake route, timed from"
        " the GET to the fake's receipt. Median (min-max) of"
        f" {runs} runs each, interleaved, after one warm-up. Memory, from one more run of each: peak resident"
        " growth (VmHWM reset through /proc/self/clear_refs, minus VmRSS before) and the tracemalloc peak"
        " above the traced memory before (Python allocations only; Pillow's buffers are native), both per"
        " byte of image."
    )
    table = Table(
        columns=["Image", "Size (MiB)", "Path", "Median (ms)", "Min (ms)", "Max (ms)", "Peak RSS growth (MiB)",
                 "× size", "Peak Python heap (MiB)", "× size"],
        rows=rows,
    )
    return BenchResult(title=TITLE, description=description, table=table, targets=targets, notes=notes,
                       extra_tables=[fit_table])
