"""Follows: one person's request to see one task through, from the deferred reply to the final message.

The :class:`FollowManager` records each follow before its first poll, runs it (subscription ->
rendered parts -> delivery), enforces the per-user and global limits, lets the person who asked
cancel it, resumes the recorded follows after a restart and, on shutdown, leaves each reply saying
that the bot will be back for it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import discord

from bot.delivery import TOKEN_LIFETIME, TOKEN_MARGIN, Delivered, Delivery, FollowTarget
from bot.images import ImageFile, fit_under_async, sniff
from bot.render import MessageParts, render_final, render_progress
from bot.store import CachedResult, FollowRecord, Store
from bot.tracking import EndReason, Outcome, Subscription, Tracker, reason_for

log = logging.getLogger(__name__)

__all__ = ["CancelResult", "FollowManager", "LimitReached"]

EDIT_INTERVAL = 1.0


class LimitReached(Exception):
    """Too many follows at once; ``str()`` is the message for the person."""


@dataclass(slots=True)
class _Running:
    follow_id: int
    task_id: str
    target: FollowTarget
    subscription: Subscription | None = None
    task: asyncio.Task[None] | None = None
    stopped_by: str | None = None


@dataclass(slots=True)
class CancelResult:
    ok: bool
    owner_id: int | None = None
    message: str = ""


@dataclass(slots=True)
class _Fits:
    """Re-encodings already made for this follow, by limit, so a 413 retry does not redo work."""

    original: ImageFile
    by_limit: dict[int, ImageFile | None] = field(default_factory=dict)

    async def under(self, limit: int) -> ImageFile | None:
        if limit not in self.by_limit:
            self.by_limit[limit] = await fit_under_async(self.original, limit)
        return self.by_limit[limit]


class FollowManager:
    def __init__(
        self,
        client: discord.Client,
        tracker: Tracker,
        store: Store,
        *,
        poll_timeout: float,
        max_active: int,
        max_active_per_user: int,
        wall_clock: Callable[[], float] = time.time,
        mono_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._tracker = tracker
        self._store = store
        self._poll_timeout = poll_timeout
        self._max_active = max_active
        self._max_per_user = max_active_per_user
        self._wall = wall_clock
        self._mono = mono_clock
        self._running: dict[int, _Running] = {}
        self._per_user: Counter[int] = Counter()
        self._closing = False
        self.delivered: Counter[str] = Counter()

    @property
    def active(self) -> int:
        return len(self._running)

    def check_limits(self, user_id: int) -> None:
        if self._closing:
            raise LimitReached("The bot is restarting; try again in a minute.")
        if self._per_user[user_id] >= self._max_per_user:
            raise LimitReached(
                f"You are already following {self._per_user[user_id]} tasks, the most one person may at once. "
                "Wait for one to finish, or cancel one."
            )
        if len(self._running) >= self._max_active:
            raise LimitReached("The bot is following as many tasks as it can right now; try again in a minute.")

    def deadline_for(self, created_at: float) -> float:
        """Wall-clock time to give up: the poll timeout, and always before the token's 15 minutes end."""
        return min(created_at + self._poll_timeout, created_at + TOKEN_LIFETIME - TOKEN_MARGIN - 30.0)

    async def start(self, task_id: str, target: FollowTarget) -> int:
        """Record a follow (before any poll, so a crash cannot lose it) and run it."""
        self.check_limits(target.user_id)
        deadline = self.deadline_for(target.created_at)
        follow_id = await self._store.add_follow(
            task_id=task_id, application_id=target.application_id, interaction_id=target.interaction_id,
            token=target.token, channel_id=target.channel_id, guild_id=target.guild_id,
            user_id=target.user_id, private=target.private, created_at=target.created_at, deadline=deadline,
        )
        await self._store.remember_task(target.user_id, task_id)
        self._launch(follow_id, task_id, target, deadline)
        return follow_id

    async def serve_cached(self, task_id: str, target: FollowTarget, cached: CachedResult) -> Delivered:
        """Answer from the cache: no API call, no follow record (the result is already final)."""
        await self._store.remember_task(target.user_id, task_id)
        outcome = await self._outcome_from_cache(task_id, cached)
        delivery = Delivery(self._client, target, follow_id=0, task_id=task_id, clock=self._wall)
        result = await self._deliver_final(delivery, outcome)
        self.delivered[result.value] += 1
        return result

    async def _outcome_from_cache(self, task_id: str, cached: CachedResult) -> Outcome:
        image = None
        if cached.image_path is not None:
            data = await self._store.read_image(cached)
            if data is not None:
                image = await asyncio.to_thread(sniff, data)
        reason = reason_for(cached.state.kind)
        if reason is EndReason.READY and image is None:
            reason = EndReason.IMAGE_EXPIRED
        detail = ", ".join(cached.state.moderation_reasons) or cached.state.details
        return Outcome(task_id=task_id, reason=reason, state=cached.state, image=image, detail=detail,
                       from_cache=True)

    def _launch(self, follow_id: int, task_id: str, target: FollowTarget, deadline: float, *,
                resumed: bool = False) -> None:
        running = _Running(follow_id, task_id, target)
        self._running[follow_id] = running
        self._per_user[target.user_id] += 1
        running.task = asyncio.get_running_loop().create_task(
            self._run(running, deadline, resumed=resumed), name=f"follow:{follow_id}:{task_id}"
        )

    def _forget(self, running: _Running) -> None:
        if self._running.pop(running.follow_id, None) is not None:
            self._per_user[running.target.user_id] -= 1
            if self._per_user[running.target.user_id] <= 0:
                del self._per_user[running.target.user_id]

    async def _run(self, running: _Running, deadline: float, *, resumed: bool = False) -> None:
        target = running.target
        delivery = Delivery(self._client, target, follow_id=running.follow_id, task_id=running.task_id,
                            clock=self._wall)
        tag = f"task {running.task_id} interaction {target.interaction_id}"
        final: asyncio.Future[None] | None = None
        try:
            outcome = await self._cached_outcome(running.task_id) if resumed else None
            if outcome is None:
                outcome = await self._follow(running, delivery, deadline)
            # Shielded: a shutdown arriving mid-upload must not cut the final message in half.
            final = asyncio.ensure_future(self._finish(running, delivery, outcome))
            await asyncio.shield(final)
        except asyncio.CancelledError:
            if final is not None:
                await asyncio.wait({final}, timeout=2.5)
                if not final.done():
                    final.cancel()
                raise
            if running.subscription is not None:
                running.subscription.close()
            if running.stopped_by is not None:
                outcome = Outcome(task_id=running.task_id, reason=EndReason.STOPPED,
                                  state=running.subscription.latest if running.subscription else None)
                final = asyncio.ensure_future(self._finish(running, delivery, outcome))
                await final
                return
            if self._closing:
                # The record stays in the store: the next start resumes it, so say so and go.
                await self._say_restarting(delivery, running)
            raise
        except Exception:
            reference = secrets.token_hex(4)
            log.exception("%s: follow failed (reference %s)", tag, reference)
            outcome = Outcome(task_id=running.task_id, reason=EndReason.INTERNAL)
            final = asyncio.ensure_future(self._finish(running, delivery, outcome, reference=reference))
            await final
        finally:
            if running.subscription is not None:
                running.subscription.close()
            self._forget(running)
            if final is not None and final.done() and not final.cancelled():
                try:
                    await self._store.finish_follow(running.follow_id)
                except Exception:
                    log.exception("%s: could not remove the finished follow", tag)

    async def _follow(self, running: _Running, delivery: Delivery, deadline: float) -> Outcome:
        """Poll (through the tracker) and show progress until the task ends; return how it ended."""
        target = running.target
        mono_deadline = self._mono() + max(0.0, deadline - self._wall())
        subscription = self._tracker.follow(running.task_id, deadline=mono_deadline)
        running.subscription = subscription
        last_signature: tuple[object, ...] | None = None
        last_edit = float("-inf")

        parts = render_progress(None, running.task_id, target.created_at)
        if await delivery.show(parts):
            last_signature, last_edit = parts.signature(), self._mono()
        async for update in subscription:
            if isinstance(update, Outcome):
                return update
            wait = last_edit + EDIT_INTERVAL - self._mono()
            if wait > 0:
                # Pace edits, but let a final outcome through at once.
                await subscription.wait_final(wait)
                if subscription.done:
                    continue
            parts = render_progress(subscription.latest, running.task_id, target.created_at)
            if parts.signature() != last_signature and await delivery.show(parts):
                last_signature, last_edit = parts.signature(), self._mono()
        # next() hands out exactly one Outcome before it returns None, so this is not reached.
        raise RuntimeError("subscription ended without an outcome")

    async def _cached_outcome(self, task_id: str) -> Outcome | None:
        """A resumed follow whose result the previous run already cached: no need to ask the API."""
        cached = await self._store.get_result(task_id)
        return None if cached is None else await self._outcome_from_cache(task_id, cached)

    async def _say_restarting(self, delivery: Delivery, running: _Running) -> None:
        outcome = Outcome(task_id=running.task_id, reason=EndReason.SHUTDOWN,
                          state=running.subscription.latest if running.subscription else None)
        try:
            async with asyncio.timeout(2.0):
                await delivery.show(render_final(outcome, resume_note=True))
        except TimeoutError:
            pass

    async def _finish(self, running: _Running, delivery: Delivery, outcome: Outcome,
                      reference: str | None = None) -> None:
        result = await self._deliver_final(delivery, outcome, stopped_by=running.stopped_by, reference=reference)
        self.delivered[result.value] += 1
        log.info("task %s interaction %s: ended %s, delivered %s after %.1f s",
                 running.task_id, running.target.interaction_id, outcome.reason.value, result.value,
                 outcome.elapsed)

    async def _deliver_final(self, delivery: Delivery, outcome: Outcome, *, stopped_by: str | None = None,
                             reference: str | None = None) -> Delivered:
        fits = _Fits(outcome.image) if outcome.image is not None else None

        async def build(limit: int) -> MessageParts:
            if fits is None:
                return render_final(outcome, stopped_by=stopped_by, reference=reference)
            image = await fits.under(limit)
            return render_final(outcome, image=image, original_size=len(fits.original.data), limit=limit)

        return await delivery.finish(build)

    def cancel(self, follow_id: int, user_id: int, user_name: str) -> CancelResult:
        running = self._running.get(follow_id)
        if running is None or running.task is None or running.task.done():
            return CancelResult(False, message="This follow has already ended.")
        if running.target.user_id != user_id:
            return CancelResult(False, owner_id=running.target.user_id)
        running.stopped_by = user_name
        running.task.cancel()
        return CancelResult(True, owner_id=user_id)

    async def resume_all(self) -> int:
        """Pick up the follows a previous run left open; each ends in its original reply or a fallback."""
        records = await self._store.open_follows()
        for record in records:
            self._resume(record)
        if records:
            log.info("resumed %d open follows", len(records))
        return len(records)

    def _resume(self, record: FollowRecord) -> None:
        target = FollowTarget(
            application_id=record.application_id, interaction_id=record.interaction_id, token=record.token,
            channel_id=record.channel_id, guild_id=record.guild_id, user_id=record.user_id,
            private=record.private, created_at=record.created_at,
        )
        # A follow whose deadline already passed still gets one poll: the task may well be done.
        deadline = max(record.deadline, self._wall() + 5.0)
        self._launch(record.follow_id, record.task_id, target, deadline, resumed=True)

    async def close(self, timeout: float = 3.0) -> None:
        """Stop every follow; each leaves its reply saying the bot will resume it."""
        self._closing = True
        tasks = [r.task for r in self._running.values() if r.task is not None and not r.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

