"""The loans projection: a read model of every loan, in SQLite or PostgreSQL, and queries."""

from __future__ import annotations

# --8<-- [start:schema]
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
import attrs

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
    """The read model's database: a SQLite file, or PostgreSQL given a ``postgresql://`` URL.

    Both drivers block, so every call runs in a worker thread, on a connection
    of its own, in one transaction that commits if the function returns.
    """

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        self.postgres = self.location.startswith(("postgresql://", "postgres://"))
        self._created = False
        self._creating = threading.Lock()  # concurrent CREATE TABLEs can clash

    async def run(self, fn: Callable[[Any], T]) -> T:
        """Call ``fn(connection)`` in a worker thread and return its result."""
        return await anyio.to_thread.run_sync(self.call, fn)

    def call(self, fn: Callable[[Any], T]) -> T:
        """Call ``fn(connection)`` here, in one transaction, with the schema in place."""
        if self.postgres:
            import psycopg  # pip install "psycopg[binary]"

            conn: Any = psycopg.connect(self.location)
        else:
            conn = sqlite3.connect(self.location, timeout=30)
        try:
            with self._creating:
                if not self._created:
                    for statement in SCHEMA:
                        conn.execute(statement)
                    conn.commit()
                    self._created = True
            result = fn(conn)
            conn.commit()
            return result
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()

    def sql(self, query: str) -> str:
        """*query* with ``?`` placeholders, in this driver's style."""
        return query.replace("?", "%s") if self.postgres else query


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
        return await self.db.run(lambda conn: self._checkpoint(conn, stream_id))

    async def handle_event(self, scope: dogma.ProjectionEventScope, event: dogma.Event) -> int:
        stream_id, offset, expected = scope.stream_id, scope.offset, scope.checkpoint_offset
        sql = self.db.sql

        def handle(conn: Any) -> int:
            # One transaction (Database.call): the checkpoint and the row commit together.
            conn.execute(
                sql("INSERT INTO checkpoints VALUES (?, 0) ON CONFLICT (stream_id) DO NOTHING"),
                (stream_id,),
            )
            # Move the checkpoint only from where the engine thinks it is. The
            # UPDATE locks the row, so a concurrent delivery of the same event
            # waits here and then finds the checkpoint moved.
            moved = conn.execute(
                sql(
                    "UPDATE checkpoints SET next_offset = ? WHERE stream_id = ? AND next_offset = ?"
                ),
                (offset + 1, stream_id, expected),
            ).rowcount
            if moved != 1:
                return self._checkpoint(conn, stream_id)  # not where the engine thinks
            _apply(conn, sql, event)
            return offset + 1

        return await self.db.run(handle)

    async def reset(self, scope: dogma.ProjectionResetScope) -> None:
        # Forget everything, checkpoints included: the engine replays all events.
        def reset(conn: Any) -> None:
            conn.execute("DELETE FROM loans")
            conn.execute("DELETE FROM checkpoints")

        await self.db.run(reset)

    def _checkpoint(self, conn: Any, stream_id: str) -> int:
        row = conn.execute(
            self.db.sql("SELECT next_offset FROM checkpoints WHERE stream_id = ?"), (stream_id,)
        ).fetchone()
        return 0 if row is None else int(row[0])


def _apply(conn: Any, sql: Callable[[str], str], event: dogma.Event) -> None:
    match event:
        case BookBorrowed(book_id=book_id, member=member, loan=loan, due_at=due_at):
            conn.execute(
                sql("INSERT INTO loans VALUES (?, ?, ?, ?, 'out')"),
                (book_id, loan, member, due_at.isoformat()),
            )
        case BookReturned(book_id=book_id, loan=loan):
            conn.execute(
                sql("UPDATE loans SET status = 'returned' WHERE book_id = ? AND loan = ?"),
                (book_id, loan),
            )
        case LoanOverdue(book_id=book_id, loan=loan):
            conn.execute(
                sql("UPDATE loans SET status = 'overdue' WHERE book_id = ? AND loan = ?"),
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
