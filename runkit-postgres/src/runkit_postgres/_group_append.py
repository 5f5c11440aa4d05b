"""Group append: concurrent appends to different journals share one statement.

The engine appends to many journals at once (each partition's stream, and the
materialiser's aggregate instance journals behind it), one record each. Run one
statement per append and the node spends most of its time on per-statement
work: a worker-thread hand-off, psycopg's execute, a server round trip and a
commit. So appends queue here, and up to ``max_statements`` statements are in
flight: an append that finds a free slot runs at once with whatever else is
queued (nothing waits for a batch to fill), and one that does not waits for
the next statement, which takes everything queued by then.

Each append keeps its own outcome: a journal whose end moved conflicts
without affecting the others (the statement returns the journals it appended
to). A statement that fails fails every append in it with the same error,
which is ambiguous for each exactly as it would be alone. One statement holds
at most one append per journal; a second waits for the next statement.

There is no background task: the append that starts a statement runs it, and
the one that finishes a statement wakes the first still queued to start the
next. If the caller running a statement is cancelled, the statement is
cancelled with it (see ``_executor``) and the others in it get a retryable,
ambiguous ``PersistenceError``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, cast

import anyio
import psycopg

from runkit.persistence import PersistenceError

__all__ = ["GroupAppender"]

Conn = psycopg.Connection[tuple[object, ...]]
#: Runs an operation with a connection in a worker thread (the provider's ``_run``).
Runner = Callable[[Callable[[Conn], set[int]], str], Awaitable[set[int]]]

#: Rows and record bytes per statement (a statement's parameters stay well
#: under PostgreSQL's 1 GB limit and its latency stays short).
MAX_ROWS: Final = 256
MAX_BYTES: Final = 8 * 1024 * 1024


class _Append:
    __slots__ = ("data", "journal_id", "outcome", "position", "queued", "wake")

    def __init__(self, journal_id: int, position: int, data: bytes) -> None:
        self.journal_id = journal_id
        self.position = position
        self.data = data
        self.wake = anyio.Event()
        self.queued = True  # until a statement takes it
        # None while pending; True appended, False conflicted, or the error.
        self.outcome: bool | PersistenceError | None = None


class GroupAppender:
    """Coalesces concurrent journal appends into few statements (one provider's)."""

    def __init__(self, run: Runner, one: bytes, many: bytes, max_statements: int) -> None:
        """Use *one* for a single append and *many* for several (``_sql``)."""
        if max_statements < 1:
            raise ValueError(f"max_statements must be at least 1, got {max_statements}")
        self._run = run
        self._one = one
        self._many = many
        self._max_statements = max_statements
        self._running = 0
        self._queue: deque[_Append] = deque()

    async def append(self, journal_id: int, position: int, data: bytes, what: str) -> bool:
        """Append *data* at *position* of the journal; ``False`` on a conflict.

        :raises PersistenceError: if the statement carrying it failed (ambiguous).
        """
        item = _Append(journal_id, position, data)
        self._queue.append(item)
        try:
            while item.outcome is None:
                if self._running < self._max_statements and item.queued:
                    await self._run_one(what)
                else:
                    item.wake = anyio.Event()
                    await item.wake.wait()
        finally:
            if item.queued:
                self._queue.remove(item)  # cancelled before any statement took it
            self._kick()
        if isinstance(item.outcome, PersistenceError):
            raise item.outcome
        return item.outcome

    def _kick(self) -> None:
        """Let the first queued append start a statement, if a slot is free."""
        if self._queue and self._running < self._max_statements:
            self._queue[0].wake.set()

    def _take(self) -> list[_Append]:
        batch: list[_Append] = []
        deferred: list[_Append] = []
        journals: set[int] = set()
        size = 0
        while self._queue and len(batch) < MAX_ROWS and size < MAX_BYTES:
            item = self._queue.popleft()
            if item.journal_id in journals:
                deferred.append(item)  # one row per journal per statement
                continue
            journals.add(item.journal_id)
            item.queued = False
            batch.append(item)
            size += len(item.data)
        self._queue.extendleft(reversed(deferred))
        return batch

    async def _run_one(self, what: str) -> None:
        batch = sorted(self._take(), key=lambda item: item.journal_id)
        operation = self._single(batch[0]) if len(batch) == 1 else self._several(batch)

        self._running += 1
        try:
            appended = await self._run(
                operation, what if len(batch) == 1 else f"{what} (with {len(batch) - 1} more)"
            )
        except PersistenceError as exc:
            for item in batch:  # each caller raises it (the caller running it too)
                item.outcome = exc
        except BaseException:
            error = PersistenceError(
                f"{what}: the statement carrying this append was cancelled with the "
                "call that ran it; the append may or may not have taken effect"
            )
            for item in batch:
                item.outcome = error
            raise
        else:
            for item in batch:
                item.outcome = item.journal_id in appended
        finally:
            self._running -= 1
            for item in batch:
                item.wake.set()

    def _single(self, item: _Append) -> Callable[[Conn], set[int]]:
        # The plain statement: cheaper for the server than unnest() with one row.
        statement, journal_id = self._one, item.journal_id
        params = (journal_id, item.position, item.position, item.data)

        def operation(conn: Conn) -> set[int]:
            count = conn.execute(statement, params, prepare=True, binary=True).rowcount
            return {journal_id} if count else set()

        return operation

    def _several(self, batch: list[_Append]) -> Callable[[Conn], set[int]]:
        statement = self._many
        params = (
            [item.journal_id for item in batch],
            [item.position for item in batch],
            [item.data for item in batch],
        )

        def operation(conn: Conn) -> set[int]:
            rows = conn.execute(statement, params, prepare=True, binary=True).fetchall()
            return {cast(int, row[0]) for row in rows}

        return operation
