"""Poll loops: one per task id, however many people follow it.

A :class:`Tracker` owns one :class:`_Watch` per task id. The watch polls the API on the
:class:`~bot.schedule.PollSchedule`, publishes each new :class:`~bot.cometapi.TaskState` to its
subscribers (latest state wins: a slow subscriber skips states, never falls behind), downloads the
image once when the task is ready and ends every subscription with exactly one :class:`Outcome`.
No Discord types here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from bot.cometapi import (
    AuthError,
    BadResponse,
    CometAPIError,
    PaymentRequired,
    RateLimited,
    RequestRejected,
    StatusKind,
    TaskState,
)
from bot.images import (
    ForbiddenAddress,
    ImageBomb,
    ImageError,
    ImageExpired,
    ImageFile,
    ImageTooLarge,
    ImageUnavailable,
    NotAnImage,
)
from bot.schedule import AdaptiveSchedule, ErrorBackoff, Schedule

log = logging.getLogger(__name__)

__all__ = ["EndReason", "Outcome", "Subscription", "Tracker", "Update", "reason_for"]


class EndReason(enum.Enum):
    READY = "ready"
    NOT_FOUND = "not_found"
    FAILED = "failed"
    MODERATED = "moderated"
    CANCELED = "canceled"  # the provider canceled the task
    NO_IMAGE = "no_image"  # ready, but the answer named no image
    TIMEOUT = "timeout"
    AUTH = "auth"
    CREDITS = "credits"
    REJECTED = "rejected"
    BAD_RESPONSE = "bad_response"
    IMAGE_EXPIRED = "image_expired"
    IMAGE_UNAVAILABLE = "image_unavailable"
    IMAGE_FORBIDDEN = "image_forbidden"
    NOT_IMAGE = "not_image"
    IMAGE_BOMB = "image_bomb"
    IMAGE_TOO_LARGE = "image_too_large"
    STOPPED = "stopped"  # the person cancelled the follow
    SHUTDOWN = "shutdown"
    INTERNAL = "internal"


_STATUS_REASONS = {
    StatusKind.READY: EndReason.READY,
    StatusKind.NOT_FOUND: EndReason.NOT_FOUND,
    StatusKind.FAILED: EndReason.FAILED,
    StatusKind.MODERATED: EndReason.MODERATED,
    StatusKind.CANCELED: EndReason.CANCELED,
}

_IMAGE_REASONS: list[tuple[type[ImageError], EndReason]] = [
    (ImageExpired, EndReason.IMAGE_EXPIRED),
    (ForbiddenAddress, EndReason.IMAGE_FORBIDDEN),
    (ImageBomb, EndReason.IMAGE_BOMB),
    (NotAnImage, EndReason.NOT_IMAGE),
    (ImageTooLarge, EndReason.IMAGE_TOO_LARGE),
    (ImageUnavailable, EndReason.IMAGE_UNAVAILABLE),
]


def reason_for(kind: StatusKind) -> EndReason:
    """How a follow ends when the task reached ``kind`` (PENDING never ends one; treated as FAILED)."""
    return _STATUS_REASONS.get(kind, EndReason.FAILED)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a follow ended: the one final thing its subscriber shows."""

    task_id: str
    reason: EndReason
    state: TaskState | None = None
    image: ImageFile | None = None
    detail: str | None = None
    elapsed: float = 0.0
    polls: int = 0
    from_cache: bool = False


Update = TaskState | Outcome


class ResultSource(Protocol):
    async def get_result(self, task_id: str) -> TaskState: ...


class ImageSource(Protocol):
    async def fetch(self, url: str) -> ImageFile: ...


class ResultSink(Protocol):
    async def put_result(
        self, state: TaskState, image_data: bytes | None = None, image_format: str | None = None
    ) -> bool: ...


class _Abandoned(Exception):
    """Every follower left while the loop waited: no request is worth sending."""


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds, without the extra task ``asyncio.wait_for`` makes."""
    if event.is_set():
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


class _Watch:
    __slots__ = (
        "changed",
        "deadline",
        "final",
        "first_sent_at",
        "last_error",
        "pending_at",
        "polls",
        "sent_at",
        "started",
        "state",
        "subscribers",
        "task",
        "task_id",
        "version",
        "wake",
    )

    def __init__(self, task_id: str, deadline: float, started: float) -> None:
        self.task_id = task_id
        self.deadline = deadline
        self.started = started
        self.state: TaskState | None = None
        self.final: Outcome | None = None
        self.version = 0
        self.polls = 0
        self.last_error: str | None = None
        # Send times (tracker clock) of the first and the latest poll, and of the last one that saw the
        # task still running: what the adaptive schedule learns readiness times from.
        self.first_sent_at: float | None = None
        self.sent_at = 0.0
        self.pending_at: float | None = None
        self.subscribers: set[Subscription] = set()
        self.changed = asyncio.Event()
        # Set when the poll loop should stop sleeping early: the last subscriber left.
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def since_first(self) -> float:
        return 0.0 if self.first_sent_at is None else self.sent_at - self.first_sent_at

    def _notify(self) -> None:
        self.version += 1
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    def publish(self, state: TaskState) -> None:
        if self.final is not None:
            return
        if self.state is not None and self.state == state:
            return
        self.state = state
        self._notify()

    def finish(self, outcome: Outcome) -> None:
        if self.final is None:
            self.final = outcome
            self._notify()


class Subscription:
    """One follower's view of a task: the newest state when it asks, then exactly one Outcome."""

    def __init__(self, watch: _Watch, deadline: float, clock: Callable[[], float]) -> None:
        self._watch = watch
        self.deadline = deadline
        self._clock = clock
        self.started = clock()
        self._seen = 0
        self._outcome: Outcome | None = None
        self._closed = False

    @property
    def task_id(self) -> str:
        return self._watch.task_id

    @property
    def latest(self) -> TaskState | None:
        return self._watch.state

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    @property
    def done(self) -> bool:
        """True once the next :meth:`next` call would hand out the outcome (or already has)."""
        return self._outcome is not None or self._watch.final is not None or self._clock() >= self.deadline

    def _personal(self, outcome: Outcome) -> Outcome:
        return dataclasses.replace(outcome, elapsed=max(0.0, self._clock() - self.started))

    def _take(self) -> Update | None:
        if self._outcome is not None:
            return None
        watch = self._watch
        if watch.final is not None:
            self._outcome = self._personal(watch.final)
            self.close()
            return self._outcome
        if watch.version > self._seen and watch.state is not None:
            self._seen = watch.version
            return watch.state
        if self._clock() >= self.deadline:
            detail = watch.last_error
            self._outcome = Outcome(
                task_id=watch.task_id, reason=EndReason.TIMEOUT, state=watch.state, detail=detail,
                elapsed=max(0.0, self._clock() - self.started), polls=watch.polls,
            )
            self.close()
            return self._outcome
        return None

    async def next(self) -> Update | None:
        """The next update, or ``None`` once the outcome has been handed out."""
        while True:
            if self._outcome is not None:
                return None
            update = self._take()
            if update is not None:
                return update
            changed = self._watch.changed
            remaining = self.deadline - self._clock()
            await _wait(changed, max(0.0, remaining) + 0.001)

    async def wait_final(self, timeout: float) -> None:
        """Return after ``timeout`` seconds, or sooner if the task ended; used to pace message edits."""
        end = self._clock() + timeout
        while self._watch.final is None:
            remaining = min(end, self.deadline) - self._clock()
            if remaining <= 0:
                return
            await _wait(self._watch.changed, remaining)

    def stop(self, reason: EndReason = EndReason.STOPPED, detail: str | None = None) -> Outcome:
        """End this subscription from the follower's side; other followers go on."""
        if self._outcome is None:
            self._outcome = Outcome(
                task_id=self._watch.task_id, reason=reason, state=self._watch.state, detail=detail,
                elapsed=max(0.0, self._clock() - self.started), polls=self._watch.polls,
            )
        self.close()
        return self._outcome

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._watch.subscribers.discard(self)
        if not self._watch.subscribers:
            self._watch.wake.set()

    async def __aiter__(self) -> AsyncIterator[Update]:
        while (update := await self.next()) is not None:
            yield update


class Tracker:
    """Owns the poll loops. One per process, owned by the bot, closed on shutdown."""

    def __init__(
        self,
        api: ResultSource,
        images: ImageSource,
        *,
        sink: ResultSink | None = None,
        limiter: AbstractAsyncContextManager[object] | None = None,
        schedule: Schedule | None = None,
        backoff: ErrorBackoff | None = None,
        max_bad_bodies: int = 4,
        image_attempts: int = 3,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._api = api
        self._images = images
        self._sink = sink
        self._limiter = limiter
        self.schedule: Schedule = schedule or AdaptiveSchedule()
        self._backoff = backoff or ErrorBackoff()
        self._max_bad = max_bad_bodies
        self._image_attempts = image_attempts
        self._clock = clock
        self._rng = rng or random.Random()
        self._watches: dict[str, _Watch] = {}
        # A 429's Retry-After applies to the key, not to one task: every loop honours it.
        self._paused_until = 0.0
        self._closed = False

    @property
    def active(self) -> int:
        return len(self._watches)

    def watching(self, task_id: str) -> bool:
        return task_id in self._watches

    def follow(self, task_id: str, *, deadline: float) -> Subscription:
        """Subscribe to ``task_id`` until ``deadline`` (on this tracker's clock)."""
        if self._closed:
            raise RuntimeError("tracker is closed")
        watch = self._watches.get(task_id)
        # A watch that has its outcome but is still caching it hands that outcome to late joiners too.
        if watch is None:
            watch = _Watch(task_id, deadline, self._clock())
            self._watches[task_id] = watch
            watch.task = asyncio.get_running_loop().create_task(self._run(watch), name=f"poll:{task_id}")
        else:
            watch.deadline = max(watch.deadline, deadline)
            watch.wake.clear()
        subscription = Subscription(watch, deadline, self._clock)
        watch.subscribers.add(subscription)
        return subscription

    async def close(self, timeout: float = 3.0) -> None:
        """Stop every loop; their subscribers get a SHUTDOWN outcome."""
        self._closed = True
        watches = list(self._watches.values())
        tasks = [w.task for w in watches if w.task is not None and not w.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        # A loop cancelled before its first step never ran its own clean-up: end those watches here.
        for watch in watches:
            watch.finish(self._outcome(watch, EndReason.SHUTDOWN))
            if self._watches.get(watch.task_id) is watch:
                del self._watches[watch.task_id]

    async def _sleep(self, watch: _Watch, seconds: float) -> None:
        if seconds <= 0:
            return
        await _wait(watch.wake, seconds)

    def _outcome(self, watch: _Watch, reason: EndReason, *, state: TaskState | None = None,
                 image: ImageFile | None = None, detail: str | None = None) -> Outcome:
        return Outcome(
            task_id=watch.task_id, reason=reason, state=state or watch.state, image=image, detail=detail,
            elapsed=self._clock() - watch.started, polls=watch.polls,
        )

    async def _run(self, watch: _Watch) -> None:
        try:
            await self._poll(watch)
        except asyncio.CancelledError:
            watch.finish(self._outcome(watch, EndReason.SHUTDOWN))
            raise
        except Exception:
            log.exception("poll loop for task %s failed", watch.task_id)
            watch.finish(self._outcome(watch, EndReason.INTERNAL))
        finally:
            if watch.final is None:
                # Every subscriber left: nobody will read this, but a late joiner must not reuse the watch.
                watch.finish(self._outcome(watch, EndReason.STOPPED))
            if self._watches.get(watch.task_id) is watch:
                del self._watches[watch.task_id]

    async def _request(self, watch: _Watch) -> TaskState:
        pause = self._paused_until - self._clock()
        if pause > 0:
            await self._sleep(watch, min(pause, watch.deadline - self._clock()))
            if not watch.subscribers:
                raise _Abandoned()
        if self._limiter is None:
            self._mark_sent(watch)
            return await self._api.get_result(watch.task_id)
        remaining = watch.deadline - self._clock()
        async with asyncio.timeout(max(remaining, 0.0)), self._limiter:
            self._mark_sent(watch)
            return await self._api.get_result(watch.task_id)

    def _mark_sent(self, watch: _Watch) -> None:
        watch.polls += 1
        watch.sent_at = self._clock()
        if watch.first_sent_at is None:
            watch.first_sent_at = watch.sent_at

    async def _poll(self, watch: _Watch) -> None:
        attempt = failures = bad = 0
        while watch.subscribers:
            if self._clock() >= watch.deadline:
                watch.finish(self._outcome(watch, EndReason.TIMEOUT, detail=watch.last_error))
                return
            try:
                state = await self._request(watch)
            except _Abandoned:
                return
            except TimeoutError:
                continue  # the limiter's wait ran into the deadline; the check above ends the loop
            except AuthError as exc:
                log.error("task %s: the API refused COMETAPI_KEY: %s", watch.task_id, exc)
                watch.finish(self._outcome(watch, EndReason.AUTH, detail=str(exc)))
                return
            except PaymentRequired as exc:
                log.error("task %s: the API account is out of credits: %s", watch.task_id, exc)
                watch.finish(self._outcome(watch, EndReason.CREDITS, detail=str(exc)))
                return
            except RequestRejected as exc:
                log.warning("task %s: request rejected: %s", watch.task_id, exc)
                watch.finish(self._outcome(watch, EndReason.REJECTED, detail=str(exc)))
                return
            except BadResponse as exc:
                bad += 1
                watch.last_error = str(exc)
                log.warning("task %s: unusable answer %d/%d: %s", watch.task_id, bad, self._max_bad, exc)
                if bad >= self._max_bad:
                    watch.finish(self._outcome(watch, EndReason.BAD_RESPONSE, detail=str(exc)))
                    return
                delay = self._backoff.delay(bad, self._rng)
            except RateLimited as exc:
                failures += 1
                watch.last_error = str(exc)
                delay = self._backoff.delay(failures, self._rng)
                if exc.retry_after is not None:
                    # Honour the server's word, but never as a busy loop: "Retry-After: 0" over and over
                    # would otherwise turn into hundreds of requests a second.
                    delay = max(exc.retry_after, min(delay, 1.0))
                self._paused_until = max(self._paused_until, self._clock() + delay)
                log.info("task %s: rate limited, waiting %.1f s", watch.task_id, delay)
            except CometAPIError as exc:
                failures += 1
                watch.last_error = str(exc)
                delay = self._backoff.delay(failures, self._rng)
                log.info("task %s: %s; retrying in %.1f s", watch.task_id, exc, delay)
            else:
                failures = bad = 0
                watch.last_error = None
                watch.publish(state)
                if state.kind.is_final:
                    if state.kind is StatusKind.READY and watch.first_sent_at is not None:
                        pending = None if watch.pending_at is None else watch.pending_at - watch.first_sent_at
                        self.schedule.observe(watch.since_first(), pending)
                    await self._conclude(watch, state)
                    return
                watch.pending_at = watch.sent_at
                delay = self.schedule.delay(attempt, watch.since_first(), self._rng)
                attempt += 1
            await self._sleep(watch, min(delay, watch.deadline - self._clock()))

    async def _conclude(self, watch: _Watch, state: TaskState) -> None:
        if state.kind is StatusKind.READY:
            await self._deliver_image(watch, state)
            return
        reason = _STATUS_REASONS[state.kind]
        detail = state.details
        if state.moderation_reasons:
            detail = ", ".join(state.moderation_reasons)
        watch.finish(self._outcome(watch, reason, state=state, detail=detail))
        if reason is not EndReason.NOT_FOUND:
            await self._remember(state)

    async def _deliver_image(self, watch: _Watch, state: TaskState) -> None:
        url = state.image_url
        if url is None:
            watch.finish(self._outcome(watch, EndReason.NO_IMAGE, state=state))
            return
        for attempt in range(1, self._image_attempts + 1):
            try:
                image = await self._images.fetch(url)
            except ImageUnavailable as exc:
                # The link lives ~10 minutes: a passing network fault is worth a quick second try.
                if attempt == self._image_attempts or self._clock() >= watch.deadline:
                    watch.finish(self._outcome(watch, EndReason.IMAGE_UNAVAILABLE, state=state, detail=str(exc)))
                    return
                log.info("task %s: image download failed (%s), try %d", watch.task_id, exc, attempt)
                await asyncio.sleep(self._backoff.delay(attempt, self._rng))
            except ImageError as exc:
                reason = next(r for cls, r in _IMAGE_REASONS if isinstance(exc, cls))
                log.warning("task %s: image refused: %s", watch.task_id, exc)
                watch.finish(self._outcome(watch, reason, state=state, detail=str(exc)))
                return
            else:
                # Subscribers first: caching writes the file to disk, which the upload need not wait for.
                watch.finish(self._outcome(watch, EndReason.READY, state=state, image=image))
                await self._remember(state, image)
                return

    async def _remember(self, state: TaskState, image: ImageFile | None = None) -> None:
        if self._sink is None:
            return
        try:
            await self._sink.put_result(state, image.data if image else None, image.format if image else None)
        except Exception:
            # A full disk must not cost the person their image: deliver anyway, tell the admin.
            log.exception("task %s: could not cache the result", state.task_id)
