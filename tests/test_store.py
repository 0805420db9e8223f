"""Store tests against real SQLite files under tmp_path; no mocks."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import stat
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.cometapi import StatusKind, TaskState
from bot.secret import Secret
from bot.store import (
    DB_FILENAME,
    HISTORY_PER_USER,
    MIGRATIONS,
    CachedResult,
    FollowRecord,
    Migration,
    Store,
    StoreClosedError,
    StoreError,
)

pytestmark = pytest.mark.timeout(30)

T0 = 1_700_000_000.0
DAY = 86400.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def store(data_dir: Path, clock: FakeClock) -> AsyncIterator[Store]:
    s = await Store.open(data_dir, clock=clock)
    yield s
    await s.close()


def png(size: int = 1000, tag: str = "") -> bytes:
    head = b"\x89PNG\r\n\x1a\n" + tag.encode()
    return head + bytes((i * 7 + len(tag)) % 251 for i in range(size - len(head)))


def ready(task_id: str) -> TaskState:
    return TaskState(
        task_id=task_id, kind=StatusKind.READY, status="Ready", progress=1.0, prompt="a cat in a hat",
        seed=42, duration=3.5, image_urls=("https://cdn.example/a.png",),
    )


def failed(task_id: str, kind: StatusKind = StatusKind.FAILED) -> TaskState:
    return TaskState(task_id=task_id, kind=kind, status="Error", details="boom", moderation_reasons=("x",))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def image_files(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "images").iterdir()}


async def add_follow(store: Store, *, task_id: str = "task-1", token: str = "tok", created_at: float = T0,
                     user_id: int = 7, guild_id: int | None = 3) -> int:
    return await store.add_follow(
        task_id=task_id, application_id=11, interaction_id=22, token=Secret(token), channel_id=33,
        guild_id=guild_id, user_id=user_id, private=True, created_at=created_at, deadline=created_at + 600,
    )


# --- results -----------------------------------------------------------------------------------------


async def test_ready_result_round_trip(store: Store, data_dir: Path, clock: FakeClock) -> None:
    data = png(5000)
    assert await store.put_result(ready("t1"), data, "png")
    clock.advance(10)
    got = await store.get_result("t1")
    assert got is not None
    assert got.state == ready("t1")
    assert got.image_format == "png"
    assert got.image_size == len(data)
    assert got.created_at == T0
    assert got.last_used_at == T0 + 10
    assert got.image_path == data_dir / "images" / f"{hashlib.sha256(data).hexdigest()}.png"
    assert await store.read_image(got) == data
    assert await store.cache_size() == len(data)


@pytest.mark.parametrize("kind", [StatusKind.FAILED, StatusKind.MODERATED, StatusKind.CANCELED])
async def test_final_result_without_image_round_trip(store: Store, kind: StatusKind) -> None:
    assert await store.put_result(failed("t2", kind))
    got = await store.get_result("t2")
    assert got is not None
    assert got.state == failed("t2", kind)
    assert (got.image_path, got.image_format, got.image_size) == (None, None, 0)
    assert await store.read_image(got) is None
    assert await store.cache_size() == 0


@pytest.mark.parametrize("kind", [StatusKind.PENDING, StatusKind.NOT_FOUND])
async def test_non_final_states_are_never_stored(store: Store, kind: StatusKind) -> None:
    state = TaskState(task_id="t3", kind=kind, status="Pending")
    assert await store.put_result(state) is False
    assert await store.put_result(state, png(), "png") is False
    assert await store.get_result("t3") is None


async def test_invalid_put_arguments(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.put_result(ready("t"))
    with pytest.raises(ValueError):
        await store.put_result(ready("t"), b"", "png")
    with pytest.raises(ValueError):
        await store.put_result(failed("t"), png(), "png")
    with pytest.raises(ValueError):
        await store.put_result(ready("t"), png(), "bmp")
    with pytest.raises(ValueError):
        await store.put_result(ready("t"), b"not an image at all")  # nothing to sniff
    assert await store.get_result("t") is None


async def test_format_is_sniffed_or_normalised(store: Store) -> None:
    jpeg = b"\xff\xd8\xff\xe0" + b"j" * 100
    assert await store.put_result(ready("j1"), jpeg)
    assert await store.put_result(ready("j2"), jpeg + b"2", "JPG")
    for task_id in ("j1", "j2"):
        got = await store.get_result(task_id)
        assert got is not None and got.image_format == "jpeg"
        assert got.image_path is not None and got.image_path.suffix == ".jpg"


async def test_ttl_expiry(data_dir: Path, clock: FakeClock) -> None:
    store = await Store.open(data_dir, clock=clock, cache_ttl_seconds=DAY)
    try:
        await store.put_result(ready("old"), png(), "png")
        clock.advance(DAY - 1)
        assert await store.get_result("old") is not None  # a touch does not extend the TTL
        clock.advance(2)
        assert await store.get_result("old") is None
        assert image_files(data_dir) == set()
        assert await store.cache_size() == 0
    finally:
        await store.close()


async def test_evict_drops_expired_rows_with_and_without_images(data_dir: Path, clock: FakeClock) -> None:
    store = await Store.open(data_dir, clock=clock, cache_ttl_seconds=DAY)
    try:
        await store.put_result(ready("a"), png(tag="a"), "png")
        await store.put_result(failed("b"))
        clock.advance(DAY / 2)
        await store.put_result(ready("c"), png(tag="c"), "png")
        clock.advance(DAY / 2 + 1)
        assert await store.evict() == 2
        assert await store.get_result("a") is None
        assert await store.get_result("b") is None
        assert await store.get_result("c") is not None
        assert len(image_files(data_dir)) == 1
    finally:
        await store.close()


async def test_lru_eviction_by_size_respects_touches(data_dir: Path, clock: FakeClock) -> None:
    store = await Store.open(data_dir, clock=clock, cache_max_bytes=3000)
    try:
        images = {name: png(1000, name) for name in "abcd"}
        for name in "abc":
            await store.put_result(ready(name), images[name], "png")
            clock.advance(1)
        await store.put_result(failed("no-image"))  # holds no bytes, never evicted for size
        assert await store.get_result("a") is not None  # now b is the least recently used
        clock.advance(1)
        await store.put_result(ready("d"), images["d"], "png")

        assert await store.get_result("b") is None
        for name in "acd":
            assert await store.get_result(name) is not None
        assert await store.get_result("no-image") is not None
        assert await store.cache_size() == 3000
        expected = {f"{hashlib.sha256(images[n]).hexdigest()}.png" for n in "acd"}
        assert image_files(data_dir) == expected  # b's file went with its row
    finally:
        await store.close()


async def test_shared_file_kept_while_referenced(data_dir: Path, clock: FakeClock) -> None:
    store = await Store.open(data_dir, clock=clock, cache_max_bytes=2500)
    try:
        same = png(1000, "same")
        await store.put_result(ready("x"), same, "png")
        clock.advance(1)
        await store.put_result(ready("y"), same, "png")
        x, y = await store.get_result("x"), await store.get_result("y")
        assert x is not None and y is not None and x.image_path == y.image_path
        assert await store.cache_size() == 1000  # one file, counted once
        assert len(image_files(data_dir)) == 1

        clock.advance(1)
        await store.get_result("y")  # x stays least recently used
        clock.advance(1)
        # 1000 + 2000 > 2500: x goes first but frees nothing while y still uses the file.
        await store.put_result(ready("z"), png(2000, "z"), "png")
        assert await store.get_result("x") is None
        assert await store.get_result("y") is None
        assert await store.get_result("z") is not None
        assert await store.cache_size() == 2000
        assert len(image_files(data_dir)) == 1
    finally:
        await store.close()


async def test_replacing_a_result_releases_its_old_file(store: Store, data_dir: Path) -> None:
    await store.put_result(ready("t"), png(tag="first"), "png")
    await store.put_result(ready("u"), png(tag="shared"), "png")
    await store.put_result(ready("t"), png(tag="shared"), "png")
    assert len(image_files(data_dir)) == 1
    await store.put_result(failed("t"))
    await store.put_result(failed("u"))
    assert image_files(data_dir) == set()
    assert await store.cache_size() == 0


async def test_image_larger_than_the_cache_is_not_stored(data_dir: Path, clock: FakeClock) -> None:
    store = await Store.open(data_dir, clock=clock, cache_max_bytes=500)
    try:
        assert await store.put_result(ready("big"), png(1000), "png") is False
        assert await store.get_result("big") is None
        assert image_files(data_dir) == set()
    finally:
        await store.close()


async def test_open_cleans_temp_files_orphans_and_rows_missing_files(data_dir: Path, clock: FakeClock) -> None:
    store = await Store.open(data_dir, clock=clock)
    await store.put_result(ready("kept"), png(tag="kept"), "png")
    await store.put_result(ready("lost"), png(tag="lost"), "png")
    await store.put_result(ready("cut"), png(tag="cut"), "png")
    lost, cut = await store.get_result("lost"), await store.get_result("cut")
    await store.close()
    assert lost is not None and lost.image_path is not None and cut is not None and cut.image_path is not None

    images = data_dir / "images"
    (images / ".tmp-abc123").write_bytes(b"half an ima")  # a crash mid-write
    orphan = png(tag="orphan")
    (images / f"{hashlib.sha256(orphan).hexdigest()}.png").write_bytes(orphan)  # row never committed
    (images / "notes.txt").write_text("not ours to judge")
    lost.image_path.unlink()
    cut.image_path.write_bytes(cut.image_path.read_bytes()[:100])  # truncated

    store = await Store.open(data_dir, clock=clock)
    try:
        kept = await store.get_result("kept")
        assert kept is not None and kept.image_path is not None
        assert image_files(data_dir) == {kept.image_path.name, "notes.txt"}
        assert await store.get_result("lost") is None
        assert await store.get_result("cut") is None
        assert await store.cache_size() == kept.image_size
    finally:
        await store.close()


async def test_vanished_or_damaged_file_at_runtime_drops_the_row(store: Store) -> None:
    await store.put_result(ready("v"), png(tag="v"), "png")
    await store.put_result(ready("w"), png(tag="w"), "png")
    v, w = await store.get_result("v"), await store.get_result("w")
    assert v is not None and v.image_path is not None and w is not None and w.image_path is not None
    v.image_path.unlink()
    w.image_path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert await store.read_image(v) is None
    assert await store.read_image(w) is None
    assert await store.get_result("v") is None
    assert await store.get_result("w") is None
    assert await store.cache_size() == 0


async def test_read_image_ignores_paths_outside_the_store(store: Store, tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("x")
    forged = CachedResult("t", ready("t"), outside, "png", 1, T0, T0)
    assert await store.read_image(forged) is None
    assert outside.exists()


async def test_put_after_file_loss_rewrites_the_file(store: Store) -> None:
    data = png(tag="heal")
    await store.put_result(ready("h1"), data, "png")
    got = await store.get_result("h1")
    assert got is not None and got.image_path is not None
    got.image_path.unlink()
    await store.put_result(ready("h2"), data, "png")
    assert await store.read_image(got) == data


# --- follows -----------------------------------------------------------------------------------------


async def test_follow_lifecycle(store: Store) -> None:
    late = await add_follow(store, task_id="late", token="tok-late", created_at=T0 + 5, guild_id=None)
    early = await add_follow(store, task_id="early", token="tok-early", created_at=T0)
    follows = await store.open_follows()
    assert [f.follow_id for f in follows] == [early, late]
    first = follows[0]
    assert first == FollowRecord(
        follow_id=early, task_id="early", application_id=11, interaction_id=22, token=Secret("tok-early"),
        channel_id=33, guild_id=3, user_id=7, private=True, created_at=T0, deadline=T0 + 600, message_id=None,
    )
    assert follows[1].guild_id is None

    await store.set_follow_message(late, 999)
    assert [f.message_id for f in await store.open_follows()] == [None, 999]

    await store.finish_follow(early)
    assert [f.follow_id for f in await store.open_follows()] == [late]
    await store.set_follow_message(early, 5)  # finished: silently nothing
    await store.finish_follow(early)
    assert [f.follow_id for f in await store.open_follows()] == [late]

    await store.finish_follow(late)
    again = await add_follow(store)
    assert again > late  # ids are never reused


async def test_finished_token_is_gone_from_the_database_files(store: Store) -> None:
    token = "TOKEN-" + os.urandom(16).hex()
    follow_id = await add_follow(store, token=token)
    await add_follow(store, token="another-token")  # the page stays in use, so zeroing must be per row
    assert await store.checkpoint()
    db_path = store.db_path
    wal = db_path.with_name(db_path.name + "-wal")
    assert token.encode() in db_path.read_bytes()  # proves the byte search can see the token

    await store.finish_follow(follow_id)
    assert await store.checkpoint()
    assert token.encode() not in db_path.read_bytes()
    assert not wal.exists() or token.encode() not in wal.read_bytes()
    assert [f.token.get() for f in await store.open_follows()] == ["another-token"]


async def test_follow_repr_masks_the_token(store: Store) -> None:
    await add_follow(store, token="very-secret-token")
    (record,) = await store.open_follows()
    assert record.token.get() == "very-secret-token"
    for text in (repr(record), str(record), f"{record}", repr(store)):
        assert "very-secret-token" not in text


async def test_add_follow_requires_a_secret(store: Store) -> None:
    with pytest.raises(TypeError):
        await store.add_follow(
            task_id="t", application_id=1, interaction_id=2, token="plain", channel_id=3,  # type: ignore[arg-type]
            guild_id=None, user_id=4, private=False, created_at=T0, deadline=T0,
        )


async def test_concurrent_operations_are_serialised(store: Store) -> None:
    ids = await asyncio.wait_for(
        asyncio.gather(*(add_follow(store, task_id=f"t{i}", created_at=T0 + i) for i in range(200))), 10
    )
    assert len(set(ids)) == 200
    await asyncio.wait_for(asyncio.gather(*(store.finish_follow(i) for i in ids[::2])), 10)
    assert [f.task_id for f in await store.open_follows()] == [f"t{i}" for i in range(1, 200, 2)]


async def test_cancelled_callers_leave_the_store_consistent(store: Store) -> None:
    for steps in range(12):
        task = asyncio.create_task(store.put_result(ready(f"c{steps}"), png(tag=str(steps)), "png"))
        other = asyncio.create_task(add_follow(store, task_id=f"c{steps}"))
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        other.cancel()
        await asyncio.wait({task, other}, timeout=5)
        assert task.done() and other.done()
    # Every operation ran whole or not at all, and the connection is not stuck in a transaction.
    await store.set_meta("still", "works")
    assert await store.get_meta("still") == "works"
    for steps in range(12):
        got = await store.get_result(f"c{steps}")
        if got is not None:
            assert await store.read_image(got) == png(tag=str(steps))


async def test_closed_store_refuses_work(data_dir: Path) -> None:
    store = await Store.open(data_dir)
    await store.close()
    await store.close()
    with pytest.raises(StoreClosedError):
        await store.get_meta("k")


# --- files, modes, migrations -------------------------------------------------------------------------


async def test_file_modes(data_dir: Path) -> None:
    old = os.umask(0o022)
    try:
        store = await Store.open(data_dir)
    finally:
        os.umask(old)
    try:
        await store.set_meta("k", "v")
        await add_follow(store)
        assert mode_of(data_dir) == 0o700
        assert mode_of(data_dir / "images") == 0o700
        db_path = data_dir / DB_FILENAME
        assert mode_of(db_path) == 0o600
        for suffix in ("-wal", "-shm"):
            assert mode_of(db_path.with_name(db_path.name + suffix)) == 0o600
    finally:
        await store.close()


def _loose_database(data_dir: Path) -> Path:
    data_dir.mkdir(mode=0o700)
    db_path = data_dir / DB_FILENAME
    db_path.touch()
    os.chmod(db_path, 0o644)
    return db_path


async def test_existing_database_file_is_tightened(data_dir: Path) -> None:
    db_path = _loose_database(data_dir)
    store = await Store.open(data_dir)
    await store.close()
    assert mode_of(db_path) == 0o600


def _shared_dir(data_dir: Path) -> None:
    data_dir.mkdir()
    os.chmod(data_dir, 0o755)


async def test_existing_loose_data_dir_is_reported_not_changed(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _shared_dir(data_dir)
    async with await Store.open(data_dir) as store:
        await store.set_meta("k", "v")
    assert mode_of(data_dir) == 0o755
    assert mode_of(data_dir / DB_FILENAME) == 0o600
    assert "accessible to other users" in caplog.text


async def test_pragmas(store: Store) -> None:
    with sqlite3.connect(store.db_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert await store.schema_version() == len(MIGRATIONS)


def _steps(db_path: Path) -> list[int]:
    raw = sqlite3.connect(db_path)
    try:
        return [n for (n,) in raw.execute("SELECT n FROM steps ORDER BY rowid")]
    finally:
        raw.close()


async def test_migrations_run_in_order_once_and_persist(data_dir: Path) -> None:
    base = await Store.open(data_dir)
    await base.set_meta("before", "migration")
    await base.close()

    extra = (
        *MIGRATIONS,
        Migration(2, "steps table", ("CREATE TABLE steps (n INTEGER NOT NULL)", "INSERT INTO steps VALUES (2)")),
        Migration(3, "third", ("INSERT INTO steps VALUES (3)",)),
    )
    store = await Store.open(data_dir, migrations=extra)
    assert await store.schema_version() == 3
    assert await store.get_meta("before") == "migration"
    await store.close()
    assert _steps(data_dir / DB_FILENAME) == [2, 3]

    store = await Store.open(data_dir, migrations=extra)  # nothing left to run
    assert await store.schema_version() == 3
    await store.close()
    assert _steps(data_dir / DB_FILENAME) == [2, 3]

    broken = (*extra, Migration(4, "broken", ("INSERT INTO steps VALUES (4)", "THIS IS NOT SQL")))
    with pytest.raises(sqlite3.OperationalError):
        await Store.open(data_dir, migrations=broken)
    assert _steps(data_dir / DB_FILENAME) == [2, 3]  # the failed step left nothing behind

    with pytest.raises(StoreError, match="newer"):
        await Store.open(data_dir)  # only knows version 1
    store = await Store.open(data_dir, migrations=extra)
    assert await store.schema_version() == 3
    await store.close()


async def test_misnumbered_migrations_are_refused(data_dir: Path) -> None:
    with pytest.raises(StoreError):
        await Store.open(data_dir, migrations=(*MIGRATIONS, Migration(3, "gap", ())))


# --- history -----------------------------------------------------------------------------------------


async def test_recent_tasks_order_prefix_and_users(store: Store, clock: FakeClock) -> None:
    for task_id in ("abc-1", "ABD-2", "xyz-3", "abc-4"):
        await store.remember_task(1, task_id)
        clock.advance(1)
    await store.remember_task(2, "abc-other-user")
    assert await store.recent_tasks(1) == ["abc-4", "xyz-3", "ABD-2", "abc-1"]
    assert await store.recent_tasks(1, "ab") == ["abc-4", "ABD-2", "abc-1"]
    assert await store.recent_tasks(1, "AbC") == ["abc-4", "abc-1"]
    assert await store.recent_tasks(1, limit=2) == ["abc-4", "xyz-3"]
    assert await store.recent_tasks(1, limit=0) == []
    await store.remember_task(1, "abc-1")  # used again: back to the front, not duplicated
    assert await store.recent_tasks(1) == ["abc-1", "abc-4", "xyz-3", "ABD-2"]
    assert await store.recent_tasks(2) == ["abc-other-user"]
    assert await store.recent_tasks(3) == []


async def test_recent_tasks_order_does_not_depend_on_the_clock(store: Store) -> None:
    for task_id in ("one", "two", "three"):
        await store.remember_task(1, task_id)  # the fake clock stands still
    await store.remember_task(1, "one")
    assert await store.recent_tasks(1) == ["one", "three", "two"]


async def test_like_wildcards_are_escaped(store: Store) -> None:
    for task_id in ("abc", "a_%x", "a_b", "a\\b", "a%b"):
        await store.remember_task(1, task_id)
    assert await store.recent_tasks(1, "a_%") == ["a_%x"]
    assert await store.recent_tasks(1, "a_") == ["a_b", "a_%x"]
    assert await store.recent_tasks(1, "a%") == ["a%b"]
    assert await store.recent_tasks(1, "a\\") == ["a\\b"]
    assert await store.recent_tasks(1, "%") == []
    assert await store.recent_tasks(1, "_") == []


async def test_history_is_capped_per_user(store: Store, clock: FakeClock) -> None:
    for i in range(HISTORY_PER_USER + 5):
        await store.remember_task(1, f"task-{i:03d}")
        clock.advance(1)
    await store.remember_task(2, "keep-me")
    got = await store.recent_tasks(1, limit=1000)
    assert got == [f"task-{i:03d}" for i in range(HISTORY_PER_USER + 4, 4, -1)]
    assert await store.recent_tasks(2) == ["keep-me"]


_ALPHABET = "aAbB_%\\x"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ids=st.lists(st.text(_ALPHABET, min_size=1, max_size=5), min_size=1, max_size=8, unique=True),
    prefix=st.text(_ALPHABET, max_size=3),
)
def test_prefix_filter_matches_startswith(ids: list[str], prefix: str) -> None:
    async def scenario(directory: Path) -> list[str]:
        store = await Store.open(directory)
        try:
            for task_id in ids:
                await store.remember_task(1, task_id)
            return await store.recent_tasks(1, prefix, limit=100)
        finally:
            await store.close()

    with tempfile.TemporaryDirectory() as tmp:
        got = asyncio.run(asyncio.wait_for(scenario(Path(tmp) / "d"), 10))
    expected = [t for t in reversed(ids) if t.lower().startswith(prefix.lower())]
    assert got == expected


# --- meta and reopening ------------------------------------------------------------------------------


async def test_meta(store: Store) -> None:
    assert await store.get_meta("commands") is None
    await store.set_meta("commands", "hash-1")
    await store.set_meta("commands", "hash-2")
    await store.set_meta("other", "")
    assert await store.get_meta("commands") == "hash-2"
    assert await store.get_meta("other") == ""


async def test_reopen_keeps_everything(data_dir: Path, clock: FakeClock) -> None:
    data = png(tag="persist")
    store = await Store.open(data_dir, clock=clock)
    await store.put_result(ready("r"), data, "png")
    await store.put_result(failed("f"))
    follow_id = await add_follow(store, token="persisted-token")
    await store.set_follow_message(follow_id, 1234)
    await store.remember_task(1, "r")
    await store.set_meta("k", "v")
    await store.close()

    clock.advance(60)
    store = await Store.open(data_dir, clock=clock)
    try:
        got = await store.get_result("r")
        assert got is not None and await store.read_image(got) == data
        assert got.created_at == T0 and got.last_used_at == T0 + 60
        f = await store.get_result("f")
        assert f is not None and f.state == failed("f")
        (follow,) = await store.open_follows()
        assert (follow.follow_id, follow.token, follow.message_id) == (follow_id, Secret("persisted-token"), 1234)
        assert await store.recent_tasks(1) == ["r"]
        assert await store.get_meta("k") == "v"
        assert await store.cache_size() == len(data)
    finally:
        await store.close()
