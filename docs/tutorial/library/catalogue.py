"""The loans projection: a SQLite read model of every loan, and queries over it."""

from __future__ import annotations

# --8<-- [start:schema]
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import anyio.to_thread
import attrs

import dogma

from .messages import BookBorrowed, BookReturned, LoanOverdue

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS loans (
    book_id TEXT NOT NULL,
    loan    INTEGER NOT NULL,
    member  TEXT NOT NULL,
    due_at  TEXT NOT NULL,
    status  TEXT NOT NULL,  -- 'out', 'returned' or 'overdue'
    PRIMARY KEY (book_id, loan)
);
-- ADR-26: the offset of the next event to apply, per event stream.
CREATE TABLE IF NOT EXISTS checkpoints (
    stream_id   TEXT PRIMARY KEY,
    next_offset INTEGER NOT NULL
);
"""
# --8<-- [end:schema]


# --8<-- [start:database]
class Database:
    """The read model's SQLite file. Each call opens a connection in a worker thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Call ``fn(connection)`` in a worker thread (sqlite3 blocks) and return its result."""
        return await anyio.to_thread.run_sync(self.call, fn)

    def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Call ``fn(connection)`` here, with the schema in place."""
        # Autocommit mode: each function below says where its transaction starts.
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            conn.executescript(SCHEMA)
            return fn(conn)
        finally:
            conn.close()


# --8<-- [end:database]


# --8<-- [start:handler]
class LoansProjection(dogma.NoCompactBehavior):
    """Keeps the ``loans`` table, applying each event exactly once (Dogma ADR-26)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def configure(self, c: dogma.ProjectionConfigurer) -> None:
        c.identity("loans", "7a2ab1bc-6be7-45c3-826b-d076793fb7a7")
        c.routes(
            dogma.handles_event(BookBorrowed),
            dogma.handles_event(BookReturned),
            dogma.handles_event(LoanOverdue),
        )

    async def checkpoint_offset(self, stream_id: str) -> int:
        # Where to resume this stream: the engine asks once per stream it delivers.
        return await self.db.run(lambda conn: _checkpoint(conn, stream_id))

    async def handle_event(self, scope: dogma.ProjectionEventScope, event: dogma.Event) -> int:
        stream_id, offset, expected = scope.stream_id, scope.offset, scope.checkpoint_offset

        def handle(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")  # one transaction: the row and the checkpoint
            try:
                actual = _checkpoint(conn, stream_id)
                if actual != expected:
                    conn.execute("ROLLBACK")
                    return actual  # not where the engine thinks: it resumes from ours
                _apply(conn, event)
                conn.execute(
                    "INSERT INTO checkpoints (stream_id, next_offset) VALUES (?, ?) "
                    "ON CONFLICT (stream_id) DO UPDATE SET next_offset = excluded.next_offset",
                    (stream_id, offset + 1),
                )
                conn.execute("COMMIT")
                return offset + 1
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        return await self.db.run(handle)

    async def reset(self, scope: dogma.ProjectionResetScope) -> None:
        # Forget everything, checkpoints included: the engine replays all events.
        def reset(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM loans")
            conn.execute("DELETE FROM checkpoints")
            conn.execute("COMMIT")

        await self.db.run(reset)


def _checkpoint(conn: sqlite3.Connection, stream_id: str) -> int:
    row = conn.execute(
        "SELECT next_offset FROM checkpoints WHERE stream_id = ?", (stream_id,)
    ).fetchone()
    return 0 if row is None else int(row[0])


def _apply(conn: sqlite3.Connection, event: dogma.Event) -> None:
    match event:
        case BookBorrowed(book_id=book_id, member=member, loan=loan, due_at=due_at):
            conn.execute(
                "INSERT INTO loans (book_id, loan, member, due_at, status) "
                "VALUES (?, ?, ?, ?, 'out')",
                (book_id, loan, member, due_at.isoformat()),
            )
        case BookReturned(book_id=book_id, loan=loan):
            conn.execute(
                "UPDATE loans SET status = 'returned' WHERE book_id = ? AND loan = ?",
                (book_id, loan),
            )
        case LoanOverdue(book_id=book_id, loan=loan):
            conn.execute(
                "UPDATE loans SET status = 'overdue' WHERE book_id = ? AND loan = ?",
                (book_id, loan),
            )
        case _:
            raise dogma.UnexpectedMessage(event)


# --8<-- [end:handler]


# --8<-- [start:queries]
@attrs.frozen
class LoanRow:
    """One row of the read model."""

    book_id: str
    loan: int
    member: str
    due_at: str
    status: str


def loans(db: Database) -> list[LoanRow]:
    """Every loan, oldest first (blocking: call it from a script or a thread)."""
    rows = db.call(
        lambda conn: conn.execute(
            "SELECT book_id, loan, member, due_at, status FROM loans ORDER BY due_at, book_id"
        ).fetchall()
    )
    return [LoanRow(*row) for row in rows]


# --8<-- [end:queries]
