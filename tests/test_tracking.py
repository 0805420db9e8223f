"""bot/tracking.py: the real Tracker, CometAPIClient and ImageFetcher against FakeCometAPI."""

from __future__ import annotations

import asyncio
import io
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bot.cometapi import CometAPIClient, StatusKind, TaskState
from bot.images import ImageFetcher
from bot.schedule import ErrorBackoff, PollSchedule
from bot.secret import Secret
from bot.tracking import EndReason, Outcome, Subscription, Tracker
from tests.fakes.comet import Answer, FakeCometAPI

KEY = "test-key"
FAST = PollSchedule(initial=0.01, factor=1.5, ceiling=0.05, jitter=0.0)
FAST_ERRORS = ErrorBackoff(initial=0.01, factor=2.0, ceiling=0.05, jitter=0.1)


def make_png(width: int = 8, height: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (220, 40, 40)).save(buf, "PNG")
    return buf.getvalue()


PNG = make_png()


def _poll_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("poll:") and not t.done()]


async def drain(sub: Subscription, timeout: float = 5.0) -> tuple[list[TaskState], Outcome]:
    """Every update up to the outcome; checks there is exactly one outcome and nothing after it."""
    states: list[TaskState] = []
    outcomes: list[Outcome] = []
    async with asyncio.timeout(timeout):
        while (update := await sub.next()) is not None:
            if isinstance(update, Outcome):
                outcomes.append(update)
            else:
                assert not outcomes, "a state after the outcome"
                states.append(update)
        assert await sub.next() is None
    assert len(outcomes) == 1
    assert sub.outcome == outcomes[0]
    assert sub.done
    return states, outcomes[0]


async def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    # Watches counters owned by others (the fake, the tracker): there is no event to wait on.
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


@dataclass
class Env:
    fake: FakeCometAPI
    session: aiohttp.ClientSession
    api: CometAPIClient
    images: ImageFetcher
    trackers: list[Tracker] = field(default_factory=list)

    def tracker(self, **kwargs: object) -> Tracker:
        options: dict[str, object] = {"schedule": FAST, "backoff": FAST_ERRORS, "rng": random.Random(7)}
        options.update(kwargs)
        tracker = Tracker(self.api, self.images, **options)  # type: ignore[arg-type]
        self.trackers.append(tracker)
        return tracker


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with FakeCometAPI(api_key=KEY) as fake, aiohttp.ClientSession() as session:
        api = CometAPIClient(session, fake.base_url, Secret(KEY), timeout=1.0)
        images = ImageFetcher(session, allow_private=True, timeout=2.0)
        environment = Env(fake, session, api, images)
        yield environment
        for tracker in environment.trackers:
            await tracker.close()
        assert not _poll_tasks()


def deadline(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


# --------------------------------------------------------------------------- the happy path


async def test_pending_then_ready(env: Env) -> None:
    url = env.fake.add_image("kite.png", PNG)
    env.fake.script("t1", Answer.pending(0.1), Answer.pending(0.2), Answer.pending(0.3),
                    Answer.ready(url, prompt="kite", seed=5))
    tracker = env.tracker()
    sub = tracker.follow("t1", deadline=deadline())
    assert tracker.watching("t1") and tracker.active == 1
    states, outcome = await drain(sub)
    pending = [s.progress for s in states if s.kind is StatusKind.PENDING]
    assert pending == [pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.3)]
    assert outcome.reason is EndReason.READY
    assert outcome.image is not None
    assert outcome.image.data == PNG
    assert (outcome.image.format, outcome.image.width, outcome.image.height) == ("png", 8, 6)
    assert outcome.state is not None and outcome.state.kind is StatusKind.READY
    assert (outcome.state.prompt, outcome.state.seed) == ("kite", 5)
    assert outcome.polls == 4 == env.fake.polls["t1"]
    assert env.fake.image_hits["kite.png"] == 1
    assert env.fake.image_auth_seen == []  # the key never goes to the image host
    assert env.fake.auth_seen and set(env.fake.auth_seen) == {f"Bearer {KEY}"}
    await wait_until(lambda: tracker.active == 0)


async def test_async_iteration(env: Env) -> None:
    env.fake.script("it", Answer.pending(0.5), Answer.ready(env.fake.add_image("i.png", PNG)))
    sub = env.tracker().follow("it", deadline=deadline())
    updates = []
    async with asyncio.timeout(5):
        async for update in sub:
            updates.append(update)
    assert isinstance(updates[-1], Outcome) and updates[-1].reason is EndReason.READY
    assert all(isinstance(u, TaskState) for u in updates[:-1])


async def test_timed_task_reaches_ready(env: Env) -> None:
    env.fake.timed_task("timed", ready_after=0.15)
    states, outcome = await drain(env.tracker().follow("timed", deadline=deadline()))
    assert outcome.reason is EndReason.READY
    assert outcome.image is not None and outcome.image.format == "png"
    progress = [s.progress for s in states if s.kind is StatusKind.PENDING and s.progress is not None]
    assert progress == sorted(progress) and progress


# --------------------------------------------------------------------------- terminal answers


@pytest.mark.parametrize(
    ("answer", "reason", "detail"),
    [
        (Answer.status("Error", error="GPU fell over"), EndReason.FAILED, "GPU fell over"),
        (Answer.status("failed", error="CUDA OOM", output=None), EndReason.FAILED, "CUDA OOM"),
        (Answer.status("Content Moderated", details={"Moderation Reasons": ["Derivative Works", "Public Figure"]}),
         EndReason.MODERATED, "Derivative Works, Public Figure"),
        (Answer.status("Request Moderated", details={"Moderation Reasons": ["NSFW"]}), EndReason.MODERATED, "NSFW"),
        (Answer.status("Task not found"), EndReason.NOT_FOUND, None),
        (Answer.status("canceled"), EndReason.CANCELED, None),
        (Answer.status("Ready", result={"prompt": "no sample"}), EndReason.NO_IMAGE, None),
        (Answer.error(402, "no credits left"), EndReason.CREDITS, "no credits left"),
        (Answer.error(200, "insufficient quota", code="insufficient_user_quota"), EndReason.CREDITS, "quota"),
        (Answer.error(400, "malformed id"), EndReason.REJECTED, "malformed id"),
        (Answer.error(403, "forbidden"), EndReason.AUTH, "403"),
    ],
)
async def test_terminal_answers(env: Env, answer: Answer, reason: EndReason, detail: str | None) -> None:
    env.fake.script("t", Answer.pending(0.5), answer)
    _, outcome = await drain(env.tracker().follow("t", deadline=deadline()))
    assert outcome.reason is reason
    if detail is None:
        assert outcome.detail is None
    else:
        assert outcome.detail is not None and detail in outcome.detail
    assert env.fake.polls["t"] == 2
    assert outcome.polls == 2


async def test_moderation_reasons_on_state(env: Env) -> None:
    env.fake.script("m", Answer.status("Content Moderated", details={"Moderation Reasons": ["Public Figure"]}))
    _, outcome = await drain(env.tracker().follow("m", deadline=deadline()))
    assert outcome.state is not None
    assert outcome.state.moderation_reasons == ("Public Figure",)


async def test_auth_error_stops_after_one_poll(env: Env) -> None:
    wrong = CometAPIClient(env.session, env.fake.base_url, Secret("sk-wrong"), timeout=1.0)
    env.fake.script("a", Answer.pending())
    tracker = Tracker(wrong, env.images, schedule=FAST, backoff=FAST_ERRORS)
    env.trackers.append(tracker)
    _, outcome = await drain(tracker.follow("a", deadline=deadline()))
    assert outcome.reason is EndReason.AUTH
    assert outcome.detail is not None and "sk-wrong" not in outcome.detail
    await asyncio.sleep(0.1)
    assert env.fake.polls["a"] == 1


# --------------------------------------------------------------------------- errors on the way


async def test_rate_limit_retry_after_is_honoured_by_every_loop(env: Env) -> None:
    tracker = env.tracker()
    env.fake.script("other", Answer.pending(0.5))
    other = tracker.follow("other", deadline=deadline())
    await wait_until(lambda: env.fake.polls["other"] >= 3)

    env.fake.script("limited", Answer.rate_limited("0.4"), Answer.pending(0.9),
                    Answer.ready(env.fake.add_image("r.png", PNG)))
    _, outcome = await drain(tracker.follow("limited", deadline=deadline()))
    assert outcome.reason is EndReason.READY

    hit, retry = env.fake.poll_times["limited"][:2]
    assert retry - hit >= 0.39
    # The other task's loop paused too: none of its polls fell inside the window (a request that
    # was already on its way when the 429 arrived may land in the first few milliseconds).
    window = [t for t in env.fake.poll_times["other"] if hit + 0.05 < t < hit + 0.38]
    assert window == []
    await wait_until(lambda: any(t > hit + 0.4 for t in env.fake.poll_times["other"]))
    other.stop()


async def test_retry_after_zero_does_not_spin(env: Env) -> None:
    # A relay answering "429, Retry-After: 0" over and over must not turn the loop into a busy one.
    # BUG: the tracker sleeps exactly retry_after (0) and asks again at once, hundreds of times a second.
    env.fake.script("spin", Answer.rate_limited("0"))
    _, outcome = await drain(env.tracker().follow("spin", deadline=deadline(0.5)))
    assert outcome.reason is EndReason.TIMEOUT
    assert env.fake.polls["spin"] <= 25


async def test_long_retry_after_ends_at_the_deadline(env: Env) -> None:
    env.fake.script("long", Answer.rate_limited("3600"))
    started = time.monotonic()
    _, outcome = await drain(env.tracker().follow("long", deadline=deadline(0.3)))
    assert outcome.reason is EndReason.TIMEOUT
    assert time.monotonic() - started < 2.0
    assert outcome.detail is not None and "rate limit" in outcome.detail
    assert env.fake.polls["long"] == 1


async def test_server_errors_then_ready(env: Env) -> None:
    env.fake.script("t", Answer.error(500, "oops"), Answer.raw(b"<html>502</html>", status=502),
                    Answer.error(503, "busy"), Answer.reset(), Answer.pending(0.5),
                    Answer.ready(env.fake.add_image("s.png", PNG)))
    _, outcome = await drain(env.tracker().follow("t", deadline=deadline()))
    assert outcome.reason is EndReason.READY
    assert outcome.image is not None and outcome.image.data == PNG


_MALFORMED = [
    Answer.raw(b"<html>maintenance</html>"),
    Answer.raw(b'{"status": "Pen', content_type="application/json"),
    Answer.json({"id": "t", "result": None}),
    Answer.error(200, "upstream exploded"),
]


async def test_four_malformed_in_a_row_is_bad_response(env: Env) -> None:
    env.fake.script("t", *_MALFORMED, Answer.pending())
    _, outcome = await drain(env.tracker().follow("t", deadline=deadline()))
    assert outcome.reason is EndReason.BAD_RESPONSE
    assert outcome.detail is not None and "upstream exploded" in outcome.detail
    assert env.fake.polls["t"] == 4


async def test_three_malformed_then_ready(env: Env) -> None:
    env.fake.script("t", *_MALFORMED[:3], Answer.ready(env.fake.add_image("m.png", PNG)))
    _, outcome = await drain(env.tracker().follow("t", deadline=deadline()))
    assert outcome.reason is EndReason.READY
    assert env.fake.polls["t"] == 4


async def test_malformed_count_resets_after_a_good_answer(env: Env) -> None:
    env.fake.script("t", *_MALFORMED[:3], Answer.pending(0.5), *_MALFORMED[:3],
                    Answer.ready(env.fake.add_image("m2.png", PNG)))
    _, outcome = await drain(env.tracker().follow("t", deadline=deadline()))
    assert outcome.reason is EndReason.READY


async def test_deadline_is_timeout_with_last_status(env: Env) -> None:
    env.fake.script("slow", Answer.pending(0.2, status="Request Accepted"))
    started = time.monotonic()
    _, outcome = await drain(env.tracker().follow("slow", deadline=deadline(0.3)))
    assert outcome.reason is EndReason.TIMEOUT
    assert outcome.state is not None and outcome.state.status == "Request Accepted"
    assert 0.25 <= time.monotonic() - started < 2.0
    assert outcome.polls >= 2


async def test_deadline_during_server_errors_names_the_error(env: Env) -> None:
    env.fake.script("down", Answer.error(503, "busy"))
    _, outcome = await drain(env.tracker().follow("down", deadline=deadline(0.3)))
    assert outcome.reason is EndReason.TIMEOUT
    assert outcome.detail is not None and "503" in outcome.detail


async def test_stalled_api_ends_at_the_deadline(env: Env) -> None:
    env.fake.script("stall", Answer.stall(10.0))
    started = time.monotonic()
    _, outcome = await drain(env.tracker().follow("stall", deadline=deadline(0.3)))
    assert outcome.reason is EndReason.TIMEOUT
    assert time.monotonic() - started < 2.0


# --------------------------------------------------------------------------- the image


@pytest.mark.parametrize(
    ("make", "reason", "hits"),
    [
        (lambda fake: fake.image_url("never-added.png"), EndReason.IMAGE_EXPIRED, 1),
        (lambda fake: fake.add_image("gone.png", b"", status=410), EndReason.IMAGE_EXPIRED, 1),
        (lambda fake: fake.add_image("page.png", b"<html>hi</html>", content_type="text/html"),
         EndReason.NOT_IMAGE, 1),
        (lambda fake: fake.add_image("err.png", b"", status=500), EndReason.IMAGE_UNAVAILABLE, 3),
    ],
)
async def test_image_failures(env: Env, make: Callable[[FakeCometAPI], str], reason: EndReason,
                              hits: int) -> None:
    url = make(env.fake)
    env.fake.script("t", Answer.ready(url))
    _, outcome = await drain(env.tracker(image_attempts=3).follow("t", deadline=deadline()))
    assert outcome.reason is reason
    assert outcome.detail
    assert outcome.state is not None and outcome.state.image_url == url
    name = url.rsplit("/", 1)[1]
    assert env.fake.image_hits[name] == hits


@dataclass
class MemorySink:
    saved: list[tuple[TaskState, bytes | None, str | None]] = field(default_factory=list)
    fail: bool = False

    async def put_result(self, state: TaskState, image_data: bytes | None = None,
                         image_format: str | None = None) -> bool:
        if self.fail:
            raise OSError("disk full")
        self.saved.append((state, image_data, image_format))
        return True


async def test_results_are_remembered(env: Env) -> None:
    sink = MemorySink()
    tracker = env.tracker(sink=sink)
    env.fake.script("ok", Answer.ready(env.fake.add_image("ok.png", PNG)))
    env.fake.script("mod", Answer.status("Content Moderated"))
    env.fake.script("gone", Answer.status("Task not found"))
    for task_id in ("ok", "mod", "gone"):
        await drain(tracker.follow(task_id, deadline=deadline()))
    assert [(s.task_id, data, fmt) for s, data, fmt in sink.saved] == [("ok", PNG, "png"), ("mod", None, None)]


async def test_failing_sink_still_delivers(env: Env) -> None:
    tracker = env.tracker(sink=MemorySink(fail=True))
    env.fake.script("ok", Answer.ready(env.fake.add_image("ok.png", PNG)))
    _, outcome = await drain(tracker.follow("ok", deadline=deadline()))
    assert outcome.reason is EndReason.READY and outcome.image is not None


# --------------------------------------------------------------------------- sharing


_SHARED_SCRIPT = (Answer.pending(0.1), Answer.pending(0.4), Answer.pending(0.8))


async def test_many_subscribers_share_one_loop(env: Env) -> None:
    tracker = env.tracker()
    env.fake.script("solo", *_SHARED_SCRIPT, Answer.ready(env.fake.add_image("solo.png", PNG)))
    _, alone = await drain(tracker.follow("solo", deadline=deadline()))
    assert alone.reason is EndReason.READY

    env.fake.script("shared", *_SHARED_SCRIPT, Answer.ready(env.fake.add_image("shared.png", PNG)))
    subs = [tracker.follow("shared", deadline=deadline()) for _ in range(5)]
    assert tracker.active == 1
    results = await asyncio.gather(*(drain(s) for s in subs))
    assert env.fake.polls["shared"] == env.fake.polls["solo"] == 4
    assert env.fake.image_hits["shared.png"] == 1
    for _, outcome in results:
        assert outcome.reason is EndReason.READY
        assert outcome.image is not None and outcome.image.data == PNG


async def test_one_subscriber_stopping_leaves_the_others(env: Env) -> None:
    env.fake.script("t", *_SHARED_SCRIPT, Answer.ready(env.fake.add_image("x.png", PNG)))
    tracker = env.tracker()
    leaver, stayer = tracker.follow("t", deadline=deadline()), tracker.follow("t", deadline=deadline())
    async with asyncio.timeout(3):
        first = await leaver.next()
    assert isinstance(first, TaskState)
    stopped = leaver.stop()
    assert stopped.reason is EndReason.STOPPED
    assert leaver.stop() is stopped  # idempotent
    assert await leaver.next() is None
    _, outcome = await drain(stayer)
    assert outcome.reason is EndReason.READY
    assert leaver.outcome is stopped


async def test_everyone_leaving_stops_the_loop(env: Env) -> None:
    env.fake.script("t", Answer.pending(0.5))
    tracker = env.tracker()
    subs = [tracker.follow("t", deadline=deadline()) for _ in range(3)]
    await wait_until(lambda: env.fake.polls["t"] >= 2)
    for sub in subs:
        sub.stop()
    await wait_until(lambda: not tracker.watching("t"))
    assert tracker.active == 0
    polls = env.fake.polls["t"]
    await asyncio.sleep(0.2)
    assert env.fake.polls["t"] == polls
    assert not _poll_tasks()


async def test_late_joiner_after_the_end_starts_afresh(env: Env) -> None:
    env.fake.script("t", Answer.status("Task not found"))
    tracker = env.tracker()
    _, first = await drain(tracker.follow("t", deadline=deadline()))
    _, second = await drain(tracker.follow("t", deadline=deadline()))
    assert first.reason is second.reason is EndReason.NOT_FOUND
    assert env.fake.polls["t"] == 2


async def test_close_ends_subscribers_with_shutdown(env: Env) -> None:
    env.fake.script("a", Answer.pending(0.5))
    env.fake.script("b", Answer.stall(10.0))
    tracker = env.tracker()
    subs = [tracker.follow("a", deadline=deadline()), tracker.follow("a", deadline=deadline()),
            tracker.follow("b", deadline=deadline())]
    await wait_until(lambda: env.fake.polls["a"] >= 2 and env.fake.polls["b"] >= 1)
    async with asyncio.timeout(4):
        await tracker.close()
    assert not _poll_tasks()
    assert tracker.active == 0
    for sub in subs:
        _, outcome = await drain(sub, timeout=1.0)
        assert outcome.reason is EndReason.SHUTDOWN
    with pytest.raises(RuntimeError):
        tracker.follow("c", deadline=deadline())


async def test_close_right_after_follow(env: Env) -> None:
    # BUG: a poll task cancelled before its first step never enters _run's try block, so no outcome
    # is published: the subscriber waits for its whole deadline and gets TIMEOUT, and the watch
    # stays in the tracker.
    env.fake.script("t", Answer.pending())
    tracker = env.tracker()
    sub = tracker.follow("t", deadline=deadline(3.0))
    await tracker.close()
    assert tracker.active == 0
    _, outcome = await drain(sub, timeout=1.0)
    assert outcome.reason is EndReason.SHUTDOWN


async def test_wait_final_returns_early_when_done(env: Env) -> None:
    env.fake.script("t", Answer.pending(0.5), Answer.status("Error", error="x"))
    sub = env.tracker().follow("t", deadline=deadline())
    started = time.monotonic()
    async with asyncio.timeout(3):
        await sub.wait_final(2.0)
    assert time.monotonic() - started < 1.0
    assert sub.done
    _, outcome = await drain(sub)
    assert outcome.reason is EndReason.FAILED


# --------------------------------------------------------------------------- property: always one ending

# No "reset" here: aiohttp silently retries a GET once when a reused keep-alive connection drops, so
# one poll may consume one or two scripted answers (test_server_errors_then_ready covers resets).
_NON_TERMINAL = ["pending", "5xx", "429", "html", "truncated", "no_status"]
_MALFORMED_STEPS = {"html", "truncated", "no_status"}
_TERMINAL: dict[str, EndReason] = {
    "ready": EndReason.READY,
    "error": EndReason.FAILED,
    "moderated": EndReason.MODERATED,
    "not_found": EndReason.NOT_FOUND,
    "auth": EndReason.AUTH,
    "credits": EndReason.CREDITS,
    "expired": EndReason.IMAGE_EXPIRED,
}


def _answer(step: str, fake: FakeCometAPI) -> Answer:
    makers: dict[str, Callable[[], Answer]] = {
        "pending": lambda: Answer.pending(0.5),
        "5xx": lambda: Answer.error(502, "bad gateway"),
        "429": lambda: Answer.rate_limited("0.02"),
        "html": lambda: Answer.raw(b"<html></html>"),
        "truncated": lambda: Answer.raw(b'{"status"', content_type="application/json"),
        "no_status": lambda: Answer.json({"id": "x"}),
        "ready": lambda: Answer.ready(fake.image_url("p.png")),
        "error": lambda: Answer.status("Error", error="boom"),
        "moderated": lambda: Answer.status("Content Moderated", details={"Moderation Reasons": ["r"]}),
        "not_found": lambda: Answer.status("Task not found"),
        "auth": lambda: Answer.error(401, "Invalid token"),
        "credits": lambda: Answer.error(402, "no credits"),
        "expired": lambda: Answer.ready(fake.image_url("expired.png")),
    }
    return makers[step]()


def _expected(steps: list[str]) -> EndReason:
    """What the tracker must end with, the last step repeating forever."""
    bad = 0

    def forever() -> Iterator[str]:
        yield from steps
        while True:
            yield steps[-1]

    for index, step in enumerate(forever()):
        if index >= len(steps) and step not in _MALFORMED_STEPS:
            return EndReason.TIMEOUT
        if step in _TERMINAL:
            return _TERMINAL[step]
        if step in _MALFORMED_STEPS:
            bad += 1
            if bad >= 4:
                return EndReason.BAD_RESPONSE
        elif step == "pending":
            bad = 0
    raise AssertionError("unreachable")


async def _run_steps(steps: list[str]) -> None:
    expected = _expected(steps)
    budget = 0.2 if expected is EndReason.TIMEOUT else 3.0
    async with FakeCometAPI(api_key=KEY) as fake, aiohttp.ClientSession() as session:
        fake.add_image("p.png", PNG)
        fake.script("prop", *(_answer(step, fake) for step in steps))
        api = CometAPIClient(session, fake.base_url, Secret(KEY), timeout=1.0)
        tracker = Tracker(api, ImageFetcher(session, allow_private=True, timeout=2.0), schedule=FAST,
                          backoff=FAST_ERRORS, rng=random.Random(0))
        try:
            started = time.monotonic()
            sub = tracker.follow("prop", deadline=started + budget)
            _, outcome = await drain(sub, timeout=budget + 1.0)
            assert time.monotonic() - started <= budget + 0.75
            assert outcome.reason is expected, (steps, outcome)
            assert await sub.next() is None
            if expected is not EndReason.TIMEOUT:
                assert outcome.polls == fake.polls["prop"]
            await wait_until(lambda: tracker.active == 0, timeout=1.0)
        finally:
            await tracker.close()
        assert not _poll_tasks()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_NON_TERMINAL) | st.sampled_from(_NON_TERMINAL + list(_TERMINAL)),
                min_size=1, max_size=7))
def test_every_sequence_ends_with_exactly_one_outcome(steps: list[str]) -> None:
    asyncio.run(_run_steps(steps))


def test_expected_model() -> None:
    assert _expected(["pending"]) is EndReason.TIMEOUT
    assert _expected(["html"]) is EndReason.BAD_RESPONSE
    assert _expected(["html", "html", "pending", "html"]) is EndReason.BAD_RESPONSE
    assert _expected(["html", "5xx", "html", "html", "ready"]) is EndReason.READY
    assert _expected(["html", "5xx", "html", "429", "html", "html"]) is EndReason.BAD_RESPONSE
    assert _expected(["5xx", "auth", "ready"]) is EndReason.AUTH


async def test_leaving_during_a_rate_limit_pause_polls_no_more(env: Env) -> None:
    # "quiet" waits out the pause another task's 429 set; when its last follower leaves meanwhile,
    # the loop must end without one more request.
    tracker = env.tracker()
    env.fake.script("quiet", Answer.pending(0.5))
    quiet = tracker.follow("quiet", deadline=deadline())
    await wait_until(lambda: env.fake.polls["quiet"] >= 2)
    env.fake.script("noisy", Answer.rate_limited("1.0"))
    noisy = tracker.follow("noisy", deadline=deadline())
    await wait_until(lambda: env.fake.polls["noisy"] == 1)
    await asyncio.sleep(0.1)  # "quiet" is now inside the pause
    polls = env.fake.polls["quiet"]
    quiet.stop()
    await wait_until(lambda: not tracker.watching("quiet"))
    noisy.stop()
    await wait_until(lambda: tracker.active == 0)
    assert env.fake.polls["quiet"] == polls
