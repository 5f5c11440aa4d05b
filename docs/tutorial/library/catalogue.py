"""The loans projection: a read model of every loan, in PostgreSQL, and queries."""

from __future__ import annotations

# --8<-- [start:schema]
import threading
from collections.abc import Callable
from typing import TypeVar

import anyio.to_thread
import attrs
import psycopg  # pip install "psycopg[binary]"

import dogma

from .messages import BookBorrowed, BookReturned, LoanOverdue

T = TypeVar("T")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS loans (
        book_id TEXT NOT NULL,
        loan    INTEGER NOT NULL,
        member  TEXT NOT NULL,
        due_at  TEXT NOT NULL,
        status  TEXT NOT NULL,  -- 'out', 'returned' or 'overdue'
        PRIMARY KEY (book_id, loan)
    )""",
    # ADR-26: the offset of the next event to apply, per event stream.
    """CREATE TABLE IF NOT EXISTS checkpoints (
        stream_id   TEXT PRIMARY KEY,
        next_offset BIGINT NOT NULL
    )""",
]
# --8<-- [end:schema]


# --8<-- [start:database]
class Database:
    """The read model's PostgreSQL database, at a ``postgresql://`` URL.

    psycopg's blocking API works under asyncio and trio alike, so every call
    runs in a worker thread, on a connection of its own, in one transaction
    that commits if the function returns.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._created = False
        self._creating = threading.Lock()  # concurrent CREATE TABLEs can clash

    async def run(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Call ``fn(connection)`` in a worker thread and return its result."""
        return await anyio.to_thread.run_sync(self.call, fn)

    def call(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Call ``fn(connection)`` here, in one transaction, with the schema in place."""
        with psycopg.connect(self.url) as conn:  # commits on success, else rolls back
            with self._creating:
                if not self._created:
                    for statement in SCHEMA:
                        conn.execute(statement)
                    conn.commit()
                    self._created = True
            return fn(conn)


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
        def checkpoint(conn: psycopg.Connection) -> int:
            row = conn.execute(
                "SELECT next_offset FROM checkpoints WHERE stream_id = %s", (stream_id,)
            ).fetchone()
            return 0 if row is None else int(row[0])

        return await self.db.run(checkpoint)

    async def handle_event(self, scope: dogma.ProjectionEventScope, event: dogma.Event) -> int:
        stream_id, offset, expected = scope.stream_id, scope.offset, scope.checkpoint_offset

        def handle(conn: psycopg.Connection) -> int:
            # One transaction (Database.call): the checkpoint and the row commit together.
            conn.execute(
                "INSERT INTO checkpoints VALUES (%s, 0) ON CONFLICT (stream_id) DO NOTHING",
                (stream_id,),
            )
            # Lock the stream's checkpoint row: a concurrent delivery of the
            # same event waits here, then finds the checkpoint moved.
            row = conn.execute(
                "SELECT next_offset FROM checkpoints WHERE stream_id = %s FOR UPDATE",
                (stream_id,),
            ).fetchone()
            assert row is not None
            if int(row[0]) != expected:
                return int(row[0])  # not where the engine thinks: it resumes from here
            _apply(conn, event)
            conn.execute(
                "UPDATE checkpoints SET next_offset = %s WHERE stream_id = %s",
                (offset + 1, stream_id),
            )
            return offset + 1

        return await self.db.run(handle)

    async def reset(self, scope: dogma.ProjectionResetScope) -> None:
        # Forget everything, checkpoints included: the engine replays all events.
        await self.db.run(forget)


def forget(conn: psycopg.Connection) -> None:
    """Empty the read model, checkpoints included."""
    conn.execute("DELETE FROM loans")
    conn.execute("DELETE FROM checkpoints")


def _apply(conn: psycopg.Connection, event: dogma.Event) -> None:
    match event:
        case BookBorrowed(book_id=book_id, member=member, loan=loan, due_at=due_at):
            conn.execute(
                "INSERT INTO loans VALUES (%s, %s, %s, %s, 'out')",
                (book_id, loan, member, due_at.isoformat()),
            )
        case BookReturned(book_id=book_id, loan=loan):
            conn.execute(
                "UPDATE loans SET status = 'returned' WHERE book_id = %s AND loan = %s",
                (book_id, loan),
            )
        case LoanOverdue(book_id=book_id, loan=loan):
            conn.execute(
                "UPDATE loans SET status = 'overdue' WHERE book_id = %s AND loan = %s",
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
