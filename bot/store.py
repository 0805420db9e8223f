"""Everything fluxbot keeps on disk: finished results, follows to resume, autocomplete history, meta.

One SQLite file (``fluxbot.sqlite3``) in the data directory, reached through a single aiosqlite
connection, plus an ``images/`` directory of content-addressed image files beside it.

Invariants the code keeps, and :meth:`Store.open` restores after a crash:

* an image file is only ever visible under its final name once it is complete and fsynced
  (temp file in the same directory, fsync, ``os.replace``, fsync of the directory);
* a row is committed only after the file it names is durable, and a file is unlinked only
  after the commit that stopped referencing it, so a crash leaves at worst an orphan file
  (deleted at the next open), never a row pointing at a half-written image;
* every operation runs to completion under one lock even if its caller is cancelled, so no
  transaction is left open and no file operation races another.

Interaction tokens are secrets at rest: the directory is 0700, the database files 0600, and
``secure_delete`` zeroes a finished follow's bytes instead of leaving them in free pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import sqlite3
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import aiosqlite

from bot.cometapi import StatusKind, TaskState
from bot.secret import Secret

log = logging.getLogger(__name__)

__all__ = [
    "DB_FILENAME",
    "IMAGES_DIRNAME",
    "IMAGE_FORMATS",
    "MIGRATIONS",
    "CachedResult",
    "FollowRecord",
    "Migration",
    "Store",
    "StoreClosedError",
    "StoreError",
    "sniff_image_format",
]

_T = TypeVar("_T")

DB_FILENAME: Final = "fluxbot.sqlite3"
IMAGES_DIRNAME: Final = "images"

#: accepted formats and the extension their files get
IMAGE_FORMATS: Final[dict[str, str]] = {"png": "png", "jpeg": "jpg", "webp": "webp", "gif": "gif"}
_FORMAT_ALIASES: Final = {"jpg": "jpeg"}
_IMAGE_NAME = re.compile(r"[0-9a-f]{64}\.(?:png|jpg|webp|gif)")
_TMP_PREFIX: Final = ".tmp-"

HISTORY_PER_USER: Final = 100
_BUSY_TIMEOUT_MS: Final = 5000
# The WAL is reused after checkpoints; cap what stays on disk so old frames (tokens included) do not
# linger in a file that only ever grows.
_JOURNAL_SIZE_LIMIT: Final = 4 * 1024 * 1024
_EVICT_BATCH: Final = 64
_NOT_STORED: Final = frozenset({StatusKind.PENDING, StatusKind.NOT_FOUND})


class StoreError(Exception):
    """The store cannot be opened or used as asked (newer schema, bad migration list...)."""


class StoreClosedError(StoreError):
    """An operation was attempted after :meth:`Store.close`."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step. ``statements`` run in one transaction together with the version bump.

    ``foreign_keys`` is on while migrations run, so a step that rebuilds a table must copy the
    data before dropping anything that other rows reference.
    """

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        version=1,
        description="initial schema",
        statements=(
            # One row per distinct image file; results share it when the bytes are identical.
            """
            CREATE TABLE images (
                name   TEXT PRIMARY KEY,
                size   INTEGER NOT NULL CHECK (size > 0),
                format TEXT NOT NULL
            ) WITHOUT ROWID
            """,
            """
            CREATE TABLE results (
                task_id      TEXT PRIMARY KEY,
                kind         TEXT NOT NULL,
                state        TEXT NOT NULL,
                image_name   TEXT REFERENCES images (name),
                created_at   REAL NOT NULL,
                last_used_at REAL NOT NULL,
                CHECK ((kind = 'ready') = (image_name IS NOT NULL))
            )
            """,
            # Also the child index the foreign key check needs when an image row is deleted.
            "CREATE INDEX results_by_image ON results (image_name)",
            "CREATE INDEX results_by_created ON results (created_at)",
            "CREATE INDEX results_by_last_used ON results (last_used_at)",
            # AUTOINCREMENT so a finished follow's id is never handed out again: a late
            # set_follow_message for it must not land on somebody else's follow.
            """
            CREATE TABLE follows (
                follow_id      INTEGER PRIMARY KEY AUTOINCREMENT,
                task_id        TEXT NOT NULL,
                application_id INTEGER NOT NULL,
                interaction_id INTEGER NOT NULL,
                token          TEXT NOT NULL,
                channel_id     INTEGER NOT NULL,
                guild_id       INTEGER,
                user_id        INTEGER NOT NULL,
                private        INTEGER NOT NULL CHECK (private IN (0, 1)),
                created_at     REAL NOT NULL,
                deadline       REAL NOT NULL,
                message_id     INTEGER
            )
            """,
            # Recency is the rowid: INSERT OR REPLACE gives a re-used task a rowid above all others,
            # which orders correctly even when the wall clock stalls or steps back.
            """
            CREATE TABLE history (
                user_id INTEGER NOT NULL,
                task_id TEXT NOT NULL,
                used_at REAL NOT NULL,
                UNIQUE (user_id, task_id)
            )
            """,
            "CREATE INDEX history_by_user ON history (user_id)",
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class CachedResult:
    """A stored final state; ``image_path`` is set for READY results only."""

    task_id: str
    state: TaskState
    image_path: Path | None
    image_format: str | None  # "png", "jpeg", "webp", "gif"
    image_size: int  # bytes, 0 when no image
    created_at: float  # wall-clock seconds
    last_used_at: float


@dataclass(frozen=True, slots=True)
class FollowRecord:
    """An accepted follow, kept until finished so a restart can resume it. ``repr`` masks the token."""

    follow_id: int
    task_id: str
    application_id: int
    interaction_id: int
    token: Secret  # the interaction token
    channel_id: int
    guild_id: int | None
    user_id: int
    private: bool
    created_at: float  # wall clock, when the interaction was created
    deadline: float  # wall clock, when to give up polling
    message_id: int | None  # the original response's message id, once known


_FOLLOW_COLUMNS: Final = (
    "follow_id, task_id, application_id, interaction_id, token, channel_id, guild_id, user_id, "
    "private, created_at, deadline, message_id"
)


def sniff_image_format(data: bytes) -> str | None:
    """The format named by the file's magic bytes, or ``None`` when it is none we accept."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    return None


def _normalise_format(image_format: str | None, data: bytes) -> str:
    if image_format is None:
        sniffed = sniff_image_format(data)
        if sniffed is None:
            raise ValueError("image format not given and not recognisable from the bytes")
        return sniffed
    fmt = image_format.strip().lower()
    fmt = _FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unsupported image format {image_format!r}")
    return fmt


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def _fetch(db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    # execute_fetchall leaves no cursor behind, unlike execute().
    return list(await db.execute_fetchall(sql, params))


@contextlib.asynccontextmanager
async def _transaction(db: aiosqlite.Connection) -> AsyncIterator[None]:
    # IMMEDIATE takes the write lock up front, so a transaction never fails half-way on a lock upgrade.
    await _fetch(db, "BEGIN IMMEDIATE")
    try:
        yield
        await _fetch(db, "COMMIT")
    except BaseException:
        # A failed COMMIT may or may not have ended the transaction; ROLLBACK then has nothing to do.
        with contextlib.suppress(sqlite3.Error):
            await _fetch(db, "ROLLBACK")
        raise


# --- file-system helpers; all run in a worker thread ---------------------------------------------


def _chmod_if_exists(path: Path, mode: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.chmod(path, mode)


def _db_side_files(db_path: Path) -> tuple[Path, Path]:
    return db_path.with_name(db_path.name + "-wal"), db_path.with_name(db_path.name + "-shm")


def _prepare_dirs(data_dir: Path, images_dir: Path, db_path: Path) -> None:
    try:
        data_dir.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        mode = stat.S_IMODE(data_dir.stat().st_mode)
        if mode & 0o077:
            # Not ours to tighten (it may be shared on purpose); the database itself stays 0600.
            log.warning("data directory %s is accessible to other users (mode %o)", data_dir, mode)
    else:
        os.chmod(data_dir, 0o700)  # mkdir's mode is filtered by the umask
    try:
        images_dir.mkdir(mode=0o700)
    except FileExistsError:
        pass
    else:
        os.chmod(images_dir, 0o700)
    # Create the file ourselves so it is never readable by others, not even for a moment; SQLite
    # gives -wal and -shm the main file's mode when it creates them.
    fd = os.open(db_path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(db_path, 0o600)
    for side in _db_side_files(db_path):
        _chmod_if_exists(side, 0o600)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_image_file(images_dir: Path, name: str, data: bytes) -> bool:
    """Make ``images_dir/name`` hold ``data``; ``True`` when this call created the file."""
    final = images_dir / name
    try:
        if final.stat().st_size == len(data):
            return False  # content-addressed: same name and size is the same image
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=images_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename must be durable before a committed row may point at the name.
    _fsync_dir(images_dir)
    return True


def _unlink_files(images_dir: Path, names: Iterable[str]) -> None:
    for name in names:
        try:
            os.unlink(images_dir / name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            # Left behind it is only an orphan, removed at the next open.
            log.warning("could not delete image file %s: %s", name, exc)


def _read_verified(path: Path) -> bytes | None:
    """The file's bytes if it exists and still hashes to its name."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if hashlib.sha256(data).hexdigest() != path.name.partition(".")[0]:
        return None
    return data


def _scan_images(images_dir: Path) -> dict[str, int]:
    """Sizes of the image files present; temp files from an interrupted write are removed."""
    found: dict[str, int] = {}
    with os.scandir(images_dir) as entries:
        for entry in entries:
            if entry.name.startswith(_TMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                log.info("removed leftover temp file %s", entry.name)
            elif _IMAGE_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                found[entry.name] = entry.stat(follow_symlinks=False).st_size
    return found


# --- the store ------------------------------------------------------------------------------------


class Store:
    """The bot's persistent state. Create with :meth:`open`, end with :meth:`close`.

    All methods may be called concurrently; they run one at a time. A cancelled call still
    finishes in the background (its effect may or may not be visible afterwards, but it is
    never half applied).
    """

    def __init__(
        self,
        db: aiosqlite.Connection,
        data_dir: Path,
        *,
        cache_max_bytes: int,
        cache_ttl_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        """Use :meth:`open`; this only wires an already-prepared connection."""
        self._db: aiosqlite.Connection | None = db
        self._data_dir = data_dir
        self._db_path = data_dir / DB_FILENAME
        self._images_dir = data_dir / IMAGES_DIRNAME
        self._max_bytes = cache_max_bytes
        self._ttl = cache_ttl_seconds
        self._clock = clock
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        state = "open" if self._db is not None else "closed"
        return f"<Store {str(self._data_dir)!r} {state}>"

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def db_path(self) -> Path:
        return self._db_path

    @property
    def images_dir(self) -> Path:
        return self._images_dir

    # --- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        *,
        cache_max_bytes: int = 1024 * 1024 * 1024,
        cache_ttl_seconds: float = 30 * 86400,
        clock: Callable[[], float] = time.time,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> Store:
        """Open (creating if needed) the store in ``data_dir``, migrate it and repair it after a crash.

        Raises :class:`StoreError` when the database was written by a newer schema than
        ``migrations`` knows, or when ``migrations`` is not numbered 1, 2, 3...
        """
        if cache_max_bytes < 0:
            raise ValueError("cache_max_bytes must be >= 0")
        if cache_ttl_seconds <= 0:
            raise ValueError("cache_ttl_seconds must be > 0")
        _check_migrations(migrations)
        data_dir = Path(data_dir)
        db_path = data_dir / DB_FILENAME
        await asyncio.to_thread(_prepare_dirs, data_dir, data_dir / IMAGES_DIRNAME, db_path)

        # isolation_level=None: the sqlite3 module must not open transactions behind our back.
        db = await aiosqlite.connect(db_path, isolation_level=None)
        try:
            await _configure(db)
            version = await _migrate(db, migrations)
            store = cls(
                db, data_dir, cache_max_bytes=cache_max_bytes, cache_ttl_seconds=cache_ttl_seconds,
                clock=clock,
            )
            await store._repair()
            await store._run(store._evict_locked)
            for side in _db_side_files(db_path):
                await asyncio.to_thread(_chmod_if_exists, side, 0o600)
        except BaseException:
            await db.close()
            raise
        log.info("store opened at %s (schema version %d)", data_dir, version)
        return store

    async def close(self) -> None:
        """Wait for running operations, then close the database. Safe to call twice."""
        async with self._lock:
            db, self._db = self._db, None
            if db is None:
                return
            try:
                with contextlib.suppress(sqlite3.Error):
                    await _fetch(db, "PRAGMA optimize")
            finally:
                await db.close()
        log.info("store at %s closed", self._data_dir)

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def checkpoint(self) -> bool:
        """Copy the WAL into the main file and truncate it; ``False`` if a reader blocked that."""

        async def op(db: aiosqlite.Connection) -> bool:
            rows = await _fetch(db, "PRAGMA wal_checkpoint(TRUNCATE)")
            return not rows or rows[0][0] == 0

        return await self._run(op)

    async def schema_version(self) -> int:
        """The ``PRAGMA user_version`` of the open database."""

        async def op(db: aiosqlite.Connection) -> int:
            return int((await _fetch(db, "PRAGMA user_version"))[0][0])

        return await self._run(op)

    # --- serialisation -----------------------------------------------------------------------

    async def _run(self, op: Callable[[aiosqlite.Connection], Awaitable[_T]]) -> _T:
        if self._db is None:
            raise StoreClosedError("the store is closed")
        # The operation gets its own task so that cancelling the caller cannot interrupt it between
        # a file write and its row, or inside a transaction; the lock makes operations take turns.
        task = asyncio.ensure_future(self._locked(op))
        task.add_done_callback(_consume_exception)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                # Let the caller's cancellation wait for the work it started, once; a second cancel
                # abandons the wait but the task still finishes on its own under the lock.
                await asyncio.wait({task})
            raise

    async def _locked(self, op: Callable[[aiosqlite.Connection], Awaitable[_T]]) -> _T:
        async with self._lock:
            db = self._db
            if db is None:
                raise StoreClosedError("the store is closed")
            return await op(db)

    # --- repair at open ----------------------------------------------------------------------

    async def _repair(self) -> None:
        on_disk = await asyncio.to_thread(_scan_images, self._images_dir)
        db = self._db
        assert db is not None
        rows = await _fetch(db, "SELECT name, size FROM images")
        known = {str(name): int(size) for name, size in rows}
        broken = [name for name, size in known.items() if on_disk.get(name) != size]
        dropped = 0
        async with _transaction(db):
            for name in broken:
                dropped += len(await _fetch(db, "DELETE FROM results WHERE image_name = ? RETURNING 1", (name,)))
                await _fetch(db, "DELETE FROM images WHERE name = ?", (name,))
            # Rows a crash left without any result pointing at them.
            unreferenced = await _fetch(
                db,
                "DELETE FROM images WHERE NOT EXISTS (SELECT 1 FROM results WHERE image_name = images.name)"
                " RETURNING name",
            )
        gone = {str(name) for (name,) in unreferenced} | set(broken)
        orphans = [name for name in on_disk if name not in known or name in gone]
        await asyncio.to_thread(_unlink_files, self._images_dir, orphans)
        if broken:
            log.warning("dropped %d cached results whose image file was missing or truncated", dropped)
        if orphans:
            log.info("removed %d image files no result referenced", len(orphans))

    # --- results cache -----------------------------------------------------------------------

    async def put_result(
        self, state: TaskState, image_data: bytes | None = None, image_format: str | None = None
    ) -> bool:
        """Cache a final state; ``True`` if stored.

        PENDING and NOT_FOUND are never stored (``False``). READY needs ``image_data`` (the format
        is sniffed when ``image_format`` is ``None``); FAILED, MODERATED and CANCELED must come
        without it; anything else is a :class:`ValueError`. An image larger than the whole cache
        is not stored (``False``). Replaces an earlier result for the same task, and evicts when
        the cache is over its size cap.
        """
        if state.kind in _NOT_STORED:
            log.debug("not caching %s: state %s is not final", state.task_id, state.kind.value)
            return False
        if not state.task_id:
            raise ValueError("state has no task id")
        name: str | None = None
        fmt: str | None = None
        data = b""
        if state.kind is StatusKind.READY:
            if not image_data:
                # Caching "ready" without the image would hide the result from a later re-download.
                raise ValueError("a READY result needs its image bytes")
            data = bytes(image_data)
            fmt = _normalise_format(image_format, data)
            if len(data) > self._max_bytes:
                log.warning(
                    "not caching %s: image of %d bytes exceeds the cache cap of %d",
                    state.task_id, len(data), self._max_bytes,
                )
                return False
            digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
            name = f"{digest}.{IMAGE_FORMATS[fmt]}"
        elif image_data is not None:
            raise ValueError(f"a {state.kind.value} result has no image")
        state_json = json.dumps(state.to_json(), ensure_ascii=False, separators=(",", ":"))

        async def op(db: aiosqlite.Connection) -> bool:
            now = self._clock()
            if name is not None:
                await asyncio.to_thread(_write_image_file, self._images_dir, name, data)
            released: list[str] = []
            async with _transaction(db):
                if name is not None:
                    await _fetch(
                        db, "INSERT INTO images (name, size, format) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                        (name, len(data), fmt),
                    )
                old = await _fetch(db, "SELECT image_name FROM results WHERE task_id = ?", (state.task_id,))
                await _fetch(
                    db,
                    "INSERT INTO results (task_id, kind, state, image_name, created_at, last_used_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (task_id) DO UPDATE SET kind = excluded.kind, state = excluded.state,"
                    " image_name = excluded.image_name, created_at = excluded.created_at,"
                    " last_used_at = excluded.last_used_at",
                    (state.task_id, state.kind.value, state_json, name, now, now),
                )
                old_name = old[0][0] if old else None
                if old_name is not None and old_name != name and await _release_image(db, old_name):
                    released.append(old_name)
            # If the transaction failed, a freshly written file is an orphan until the next open:
            # harmless, and deleting it here could race nothing but gains nothing either.
            await asyncio.to_thread(_unlink_files, self._images_dir, released)
            if await _image_bytes(db) > self._max_bytes:
                await self._evict_locked(db)
            return True

        stored = await self._run(op)
        log.debug("cached %s (%s)", state.task_id, state.kind.value)
        return stored

    async def get_result(self, task_id: str) -> CachedResult | None:
        """The cached result, or ``None`` when absent or past the TTL (then it is deleted too).

        Marks the result as used now, which moves it to the back of the eviction queue.
        """

        async def op(db: aiosqlite.Connection) -> CachedResult | None:
            rows = await _fetch(
                db,
                "SELECT r.state, r.image_name, i.format, i.size, r.created_at"
                " FROM results AS r LEFT JOIN images AS i ON i.name = r.image_name WHERE r.task_id = ?",
                (task_id,),
            )
            if not rows:
                return None
            state_json, name, fmt, size, created_at = rows[0]
            now = self._clock()
            if created_at <= now - self._ttl:
                await self._remove_results(db, [task_id])
                return None
            try:
                state = TaskState.from_json(json.loads(state_json))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("dropping unreadable cached result %s: %s", task_id, exc)
                await self._remove_results(db, [task_id])
                return None
            await _fetch(db, "UPDATE results SET last_used_at = ? WHERE task_id = ?", (now, task_id))
            return CachedResult(
                task_id=task_id,
                state=state,
                image_path=None if name is None else self._images_dir / name,
                image_format=fmt,
                image_size=int(size or 0),
                created_at=float(created_at),
                last_used_at=now,
            )

        return await self._run(op)

    async def read_image(self, result: CachedResult) -> bytes | None:
        """The image bytes, or ``None`` if the file vanished or no longer matches its hash.

        In that case every result using the file is dropped, so the bot fetches it afresh.
        """
        if result.image_path is None:
            return None
        name = result.image_path.name
        if not _IMAGE_NAME.fullmatch(name):
            return None
        path = self._images_dir / name  # never trust a directory a caller could have built
        data = await asyncio.to_thread(_read_verified, path)
        if data is not None:
            return data

        async def op(db: aiosqlite.Connection) -> bytes | None:
            # Check again under the lock: a put_result may have rewritten the file meanwhile.
            fresh = await asyncio.to_thread(_read_verified, path)
            if fresh is not None:
                return fresh
            async with _transaction(db):
                dropped = await _fetch(db, "DELETE FROM results WHERE image_name = ? RETURNING 1", (name,))
                await _fetch(db, "DELETE FROM images WHERE name = ?", (name,))
            await asyncio.to_thread(_unlink_files, self._images_dir, [name])
            log.warning("image %s is missing or damaged; dropped %d cached results", name, len(dropped))
            return None

        return await self._run(op)

    async def evict(self) -> int:
        """Drop TTL-expired results, then least recently used images until under the size cap.

        Returns how many results were removed. Results without an image are only dropped by age:
        removing them frees no image bytes.
        """
        return await self._run(self._evict_locked)

    async def cache_size(self) -> int:
        """Total bytes of the cached image files (a file shared by several results counts once)."""
        return await self._run(_image_bytes)

    async def _evict_locked(self, db: aiosqlite.Connection) -> int:
        cutoff = self._clock() - self._ttl
        freed: list[str] = []
        async with _transaction(db):
            expired = await _fetch(db, "DELETE FROM results WHERE created_at <= ? RETURNING image_name", (cutoff,))
            removed = len(expired)
            for name in {n for (n,) in expired if n is not None}:
                if await _release_image(db, name):
                    freed.append(name)
            total = await _image_bytes(db)
            while total > self._max_bytes:
                batch = await _fetch(
                    db,
                    "SELECT task_id, image_name FROM results WHERE image_name IS NOT NULL"
                    " ORDER BY last_used_at, rowid LIMIT ?",
                    (_EVICT_BATCH,),
                )
                if not batch:
                    break
                for task_id, name in batch:
                    await _fetch(db, "DELETE FROM results WHERE task_id = ?", (task_id,))
                    removed += 1
                    size = await _release_image(db, name)
                    if size:
                        freed.append(name)
                        total -= size
                        if total <= self._max_bytes:
                            break
        # Files go only after the commit: a crash in between leaves orphans, never dangling rows.
        await asyncio.to_thread(_unlink_files, self._images_dir, freed)
        if removed:
            log.info("evicted %d cached results, %d image files", removed, len(freed))
        return removed

    async def _remove_results(self, db: aiosqlite.Connection, task_ids: Sequence[str]) -> None:
        freed: list[str] = []
        async with _transaction(db):
            names: set[str] = set()
            for task_id in task_ids:
                rows = await _fetch(db, "DELETE FROM results WHERE task_id = ? RETURNING image_name", (task_id,))
                names.update(n for (n,) in rows if n is not None)
            for name in names:
                if await _release_image(db, name):
                    freed.append(name)
        await asyncio.to_thread(_unlink_files, self._images_dir, freed)

    # --- autocomplete history ------------------------------------------------------------------

    async def remember_task(self, user_id: int, task_id: str) -> None:
        """Record that ``user_id`` used ``task_id`` now; keeps the user's newest 100."""

        async def op(db: aiosqlite.Connection) -> None:
            async with _transaction(db):
                await _fetch(
                    db, "INSERT OR REPLACE INTO history (user_id, task_id, used_at) VALUES (?, ?, ?)",
                    (user_id, task_id, self._clock()),
                )
                await _fetch(
                    db,
                    "DELETE FROM history WHERE user_id = ? AND rowid <= (SELECT rowid FROM history"
                    " WHERE user_id = ? ORDER BY rowid DESC LIMIT 1 OFFSET ?)",
                    (user_id, user_id, HISTORY_PER_USER),
                )

        await self._run(op)

    async def recent_tasks(self, user_id: int, prefix: str = "", limit: int = 25) -> list[str]:
        """The user's task ids, newest first, starting with ``prefix`` (ASCII case-insensitive)."""
        if limit <= 0:
            return []
        pattern = _escape_like(prefix) + "%"

        async def op(db: aiosqlite.Connection) -> list[str]:
            rows = await _fetch(
                db,
                "SELECT task_id FROM history WHERE user_id = ? AND task_id LIKE ? ESCAPE '\\'"
                " ORDER BY rowid DESC LIMIT ?",
                (user_id, pattern, min(limit, HISTORY_PER_USER)),
            )
            return [str(task_id) for (task_id,) in rows]

        return await self._run(op)

    # --- follows -------------------------------------------------------------------------------

    async def add_follow(
        self,
        *,
        task_id: str,
        application_id: int,
        interaction_id: int,
        token: Secret,
        channel_id: int,
        guild_id: int | None,
        user_id: int,
        private: bool,
        created_at: float,
        deadline: float,
    ) -> int:
        """Persist an accepted follow and return its id (never reused)."""
        if not isinstance(token, Secret):
            raise TypeError("token must be a Secret")
        params = (
            task_id, application_id, interaction_id, token.get(), channel_id, guild_id, user_id,
            int(bool(private)), created_at, deadline,
        )

        async def op(db: aiosqlite.Connection) -> int:
            # A single statement is its own transaction: one round trip to the worker thread.
            rows = await _fetch(
                db,
                "INSERT INTO follows (task_id, application_id, interaction_id, token, channel_id, guild_id,"
                " user_id, private, created_at, deadline) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " RETURNING follow_id",
                params,
            )
            return int(rows[0][0])

        follow_id = await self._run(op)
        log.debug("follow %d added for task %s", follow_id, task_id)
        return follow_id

    async def set_follow_message(self, follow_id: int, message_id: int) -> None:
        """Record the original response's message id; a no-op if the follow is already finished."""

        async def op(db: aiosqlite.Connection) -> int:
            rows = await _fetch(
                db, "UPDATE follows SET message_id = ? WHERE follow_id = ? RETURNING 1", (message_id, follow_id)
            )
            return len(rows)

        if not await self._run(op):
            log.debug("set_follow_message: follow %d is not open", follow_id)

    async def finish_follow(self, follow_id: int) -> None:
        """Delete the follow, token included (its bytes are zeroed, not just unlinked)."""

        async def op(db: aiosqlite.Connection) -> None:
            await _fetch(db, "DELETE FROM follows WHERE follow_id = ?", (follow_id,))

        await self._run(op)
        log.debug("follow %d finished", follow_id)

    async def open_follows(self) -> list[FollowRecord]:
        """All unfinished follows, oldest interaction first."""

        async def op(db: aiosqlite.Connection) -> list[FollowRecord]:
            rows = await _fetch(db, f"SELECT {_FOLLOW_COLUMNS} FROM follows ORDER BY created_at, follow_id")
            return [_follow_from_row(row) for row in rows]

        return await self._run(op)

    # --- meta ----------------------------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        """The value stored under ``key``, or ``None``."""

        async def op(db: aiosqlite.Connection) -> str | None:
            rows = await _fetch(db, "SELECT value FROM meta WHERE key = ?", (key,))
            return str(rows[0][0]) if rows else None

        return await self._run(op)

    async def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing any earlier value."""

        async def op(db: aiosqlite.Connection) -> None:
            await _fetch(
                db,
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

        await self._run(op)


def _follow_from_row(row: Sequence[Any]) -> FollowRecord:
    (follow_id, task_id, application_id, interaction_id, token, channel_id, guild_id, user_id,
     private, created_at, deadline, message_id) = row
    return FollowRecord(
        follow_id=int(follow_id),
        task_id=str(task_id),
        application_id=int(application_id),
        interaction_id=int(interaction_id),
        token=Secret(str(token)),
        channel_id=int(channel_id),
        guild_id=None if guild_id is None else int(guild_id),
        user_id=int(user_id),
        private=bool(private),
        created_at=float(created_at),
        deadline=float(deadline),
        message_id=None if message_id is None else int(message_id),
    )


async def _image_bytes(db: aiosqlite.Connection) -> int:
    return int((await _fetch(db, "SELECT COALESCE(SUM(size), 0) FROM images"))[0][0])


async def _release_image(db: aiosqlite.Connection, name: str) -> int:
    """Delete the image row if no result uses it any more; its size when deleted, else 0."""
    rows = await _fetch(
        db,
        "DELETE FROM images WHERE name = ? AND NOT EXISTS (SELECT 1 FROM results WHERE image_name = ?)"
        " RETURNING size",
        (name, name),
    )
    return int(rows[0][0]) if rows else 0


def _consume_exception(task: asyncio.Future[Any]) -> None:
    # An operation whose caller was cancelled has nobody to raise to; log instead of asyncio's
    # "exception was never retrieved".
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, StoreClosedError):
        log.debug("store operation failed: %r", exc)


def _check_migrations(migrations: Sequence[Migration]) -> None:
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise StoreError(
                f"migration #{expected} has version {migration.version}; versions must be 1, 2, 3..."
            )


async def _configure(db: aiosqlite.Connection) -> None:
    mode = (await _fetch(db, "PRAGMA journal_mode = WAL"))[0][0]
    if str(mode).lower() != "wal":
        raise StoreError(f"could not switch the database to WAL mode (got {mode!r})")
    # NORMAL in WAL mode: a power cut may lose the last commits, never corrupt; no fsync per commit.
    for pragma in (
        "PRAGMA synchronous = NORMAL",
        "PRAGMA foreign_keys = ON",
        f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS:d}",
        "PRAGMA secure_delete = ON",
        f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT:d}",
    ):
        await _fetch(db, pragma)


async def _migrate(db: aiosqlite.Connection, migrations: Sequence[Migration]) -> int:
    version = int((await _fetch(db, "PRAGMA user_version"))[0][0])
    if version > len(migrations):
        raise StoreError(
            f"the database has schema version {version} but this fluxbot knows only up to "
            f"{len(migrations)}; refusing to touch a newer database"
        )
    for migration in migrations[version:]:
        async with _transaction(db):
            for statement in migration.statements:
                await _fetch(db, statement)
            # PRAGMAs take no parameters; the version is a checked int. Inside the transaction, so
            # a failed step leaves the version where it was.
            await _fetch(db, f"PRAGMA user_version = {int(migration.version):d}")
        log.info("database migrated to version %d: %s", migration.version, migration.description)
        version = migration.version
    return version
