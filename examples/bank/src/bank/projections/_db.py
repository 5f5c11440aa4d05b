"""The SQLite database that holds the bank's read models, and ADR-26 projection OCC."""

from __future__ import annotations

import abc
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import ClassVar, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

import dogma

from . import _schema

__all__ = ["DEFAULT_PATH_VARIABLE", "ReadDB", "SQLiteProjection"]

T = TypeVar("T")

DEFAULT_PATH_VARIABLE = "BANK_READ_DB"
"""The environment variable naming the database file when none is given."""


class ReadDB:
    """A SQLite database file shared by the bank's projections and its readers.

    Nothing touches the file until it is first used; the schema of every
    bank read model (and of the projection checkpoints) is created then,
    idempotently. Every operation opens its own connection in a worker
    thread (``sqlite3`` blocks), and at most ``max_threads`` run at once.

    Args:
        path: The database file. ``None`` means the ``BANK_READ_DB``
            environment variable, or ``bank.sqlite3`` in the working
            directory, read when the database is first used.
        max_threads: How many worker threads may use the database at once.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, max_threads: int = 4):
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, got {max_threads}")
        self._path = None if path is None else Path(path)
        self._max_threads = max_threads
        self._schemas: list[str] = list(_schema.ALL)
        self._ready = False
        self._lock = threading.Lock()
        # A limiter belongs to one event loop: keep the current loop's only.
        self._limiters: dict[anyio.lowlevel.EventLoopToken, anyio.CapacityLimiter] = {}

    @property
    def path(self) -> Path:
        """The database file."""
        if self._path is None:
            return Path(os.environ.get(DEFAULT_PATH_VARIABLE, "bank.sqlite3"))
        return self._path

    def add_schema(self, ddl: str) -> None:
        """Add idempotent DDL (``CREATE … IF NOT EXISTS``) to run before first use."""
        with self._lock:
            if ddl not in self._schemas:
                self._schemas.append(ddl)
                self._ready = False

    def connect(self) -> sqlite3.Connection:
        """Open a connection (blocking) in autocommit mode, with the schema in place.

        The caller closes it. Prefer :meth:`run` from async code.
        """
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            self._ensure_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Call ``fn(connection)`` in a worker thread and return its result."""
        return await anyio.to_thread.run_sync(self._call, fn, limiter=self._limiter())

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self.connect()
        try:
            return fn(conn)
        finally:
            conn.close()

    def _limiter(self) -> anyio.CapacityLimiter:
        token = anyio.lowlevel.current_token()
        limiter = self._limiters.get(token)
        if limiter is None:
            self._limiters = {token: anyio.CapacityLimiter(self._max_threads)}
            limiter = self._limiters[token]
        return limiter

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            if self._ready:
                return
            # WAL lets readers (the demo, a UI) run while a projection writes.
            conn.execute("PRAGMA journal_mode=WAL")
            for ddl in self._schemas:
                conn.executescript(ddl)
            self._ready = True

    def __repr__(self) -> str:
        return f"ReadDB({str(self.path)!r})"


class SQLiteProjection(dogma.NoCompactBehavior, abc.ABC):
    """Base class of projections kept in a :class:`ReadDB`, with Dogma ADR-26 OCC.

    For each (projection, event stream) the database stores a checkpoint: the
    offset of the next event to apply. ``handle_event`` compares it with the
    engine's ``scope.checkpoint_offset`` in the same transaction that applies
    the event: if they agree it applies the event, stores ``offset + 1`` and
    returns it; otherwise it changes nothing and returns the stored
    checkpoint. A redelivered event therefore returns ``offset + 1`` without
    being applied twice.

    Subclasses set ``KEY`` (their identity key) and ``SCHEMA``, and implement
    :meth:`configure`, :meth:`apply` and :meth:`clear`.
    """

    KEY: ClassVar[str]
    SCHEMA: ClassVar[str]

    def __init__(self, db: ReadDB) -> None:
        self.db = db
        db.add_schema(self.SCHEMA)
        self._handler = uuid.UUID(self.KEY).bytes

    @abc.abstractmethod
    def configure(self, c: dogma.ProjectionConfigurer) -> None:
        """Declare the projection's identity and routes."""

    @abc.abstractmethod
    def apply(self, conn: sqlite3.Connection, event: dogma.Event, recorded_at: datetime) -> None:
        """Apply ``event`` to the read model, inside the caller's transaction."""

    @abc.abstractmethod
    def clear(self, conn: sqlite3.Connection) -> None:
        """Delete the read model's data, inside the caller's transaction."""

    async def handle_event(self, scope: dogma.ProjectionEventScope, event: dogma.Event) -> int:
        """Apply ``event`` if the checkpoints agree; return the resulting checkpoint."""
        stream = _stream_bytes(scope.stream_id)
        offset = scope.offset
        expected = scope.checkpoint_offset
        recorded_at = scope.recorded_at

        def handle(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if expected == 0:
                    cur = conn.execute(
                        "INSERT INTO projection_checkpoint (handler, stream, checkpoint_offset) "
                        "VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                        (self._handler, stream, offset + 1),
                    )
                else:
                    cur = conn.execute(
                        "UPDATE projection_checkpoint SET checkpoint_offset = ? "
                        "WHERE handler = ? AND stream = ? AND checkpoint_offset = ?",
                        (offset + 1, self._handler, stream, expected),
                    )
                if cur.rowcount != 1:
                    actual = self._checkpoint(conn, stream)
                    conn.execute("ROLLBACK")
                    return actual
                self.apply(conn, event, recorded_at)
                conn.execute("COMMIT")
                return offset + 1
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        return await self.db.run(handle)

    async def checkpoint_offset(self, stream_id: str) -> int:
        """The offset of the next event this projection expects from ``stream_id``."""
        stream = _stream_bytes(stream_id)
        return await self.db.run(lambda conn: self._checkpoint(conn, stream))

    async def reset(self, scope: dogma.ProjectionResetScope) -> None:
        """Delete the read model and this projection's checkpoints, atomically."""
        del scope

        def reset(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                self.clear(conn)
                conn.execute(
                    "DELETE FROM projection_checkpoint WHERE handler = ?", (self._handler,)
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        await self.db.run(reset)

    def _checkpoint(self, conn: sqlite3.Connection, stream: bytes) -> int:
        row = conn.execute(
            "SELECT checkpoint_offset FROM projection_checkpoint WHERE handler = ? AND stream = ?",
            (self._handler, stream),
        ).fetchone()
        return 0 if row is None else int(row[0])


def _stream_bytes(stream_id: str) -> bytes:
    try:
        return uuid.UUID(stream_id).bytes
    except ValueError:
        raise ValueError(f"stream ID {stream_id!r} is not a UUID") from None
