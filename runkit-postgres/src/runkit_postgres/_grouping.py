"""Write grouping: concurrent single-row writes share one statement.

The engine writes to many journals and keys at once: each partition's stream,
the materialiser's aggregate instance journals behind it, and process instance
records, one row each. Run one statement per write and the node spends most of
its time on per-statement work: a worker-thread hand-off, psycopg's execute, a
server round trip and a commit. So writes of one kind (journal appends, or
keyspace compare-and-sets) queue in a ``WriteGroup``, and up to
``max_statements`` statements are in flight: a write that finds a free slot
runs at once with whatever else is queued (nothing waits for a batch to fill),
and one that does not waits for the next statement, which takes everything
queued by then.

Each write keeps its own outcome: the statement returns the keys it wrote, so
a journal whose end moved, or a key whose revision changed, conflicts without
affecting the others. A statement that fails fails every write in it with the
same error, which is ambiguous for each exactly as it would be alone. One
statement holds at most one write per key (a second waits for the next
statement), and its rows are sorted by key, so concurrent statements take
their row locks in one order.

There is no background task: the write that starts a statement runs it, and
the one that finishes a statement wakes the first still queued to start the
next. If the caller running a statement is cancelled, the statement is
cancelled with it (see ``_executor``) and the others in it get a retryable,
ambiguous ``PersistenceError``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, Generic, Protocol, TypeVar

import anyio
import psycopg

from runkit.persistence import PersistenceError

__all__ = ["MAX_BYTES", "MAX_ROWS", "WriteGroup"]


class _Key(Protocol):
    """What a statement holds one write of (a journal ID, a keyspace key): hashed, sorted."""

    def __hash__(self) -> int: ...
    def __lt__(self, other: Any, /) -> bool: ...


K = TypeVar("K", bound=_Key)
R = TypeVar("R")  # the rest of a write's row

Conn = psycopg.Connection[tuple[object, ...]]
#: Runs an operation with a connection in a worker thread (the provider's ``_run``).
Runner = Callable[[Callable[[Conn], set[K]], str], Awaitable[set[K]]]
#: Builds the operation writing some rows; it returns the keys it wrote.
Statement = Callable[[list[tuple[K, R]]], Callable[[Conn], set[K]]]

#: Rows and bytes per statement (a statement's parameters stay well under
#: PostgreSQL's 1 GB limit and its latency stays short).
MAX_ROWS: Final = 256
MAX_BYTES: Final = 8 * 1024 * 1024


class _Write(Generic[K, R]):
    __slots__ = ("key", "outcome", "queued", "row", "size", "wake")

    def __init__(self, key: K, row: R, size: int) -> None:
        self.key = key
        self.row = row
        self.size = size
        self.wake = anyio.Event()
        self.queued = True  # until a statement takes it
        # None while pending; True written, False conflicted, or the error.
        self.outcome: bool | PersistenceError | None = None


class WriteGroup(Generic[K, R]):
    """Coalesces one provider's concurrent writes of one kind into few statements."""

    def __init__(
        self,
        run: Runner[K],
        single: Statement[K, R],
        several: Statement[K, R],
        max_statements: int,
    ) -> None:
        """Build statements with *single* for one row and *several* for more.

        Both get the rows sorted by key. The single-row statement is cheaper
        for the server than ``unnest()`` with one row.
        """
        if max_statements < 1:
            raise ValueError(f"max_statements must be at least 1, got {max_statements}")
        self._run = run
        self._single = single
        self._several = several
        self._max_statements = max_statements
        self._running = 0
        self._queue: deque[_Write[K, R]] = deque()

    async def write(self, key: K, row: R, size: int, what: str) -> bool:
        """Write *row* for *key*; ``False`` if its condition did not hold (a conflict).

        *size* is the row's size in bytes, to bound a statement's parameters.

        :raises PersistenceError: if the statement carrying it failed (ambiguous).
        """
        item = _Write(key, row, size)
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
        """Let the first queued write start a statement, if a slot is free."""
        if self._queue and self._running < self._max_statements:
            self._queue[0].wake.set()

    def _take(self) -> list[_Write[K, R]]:
        batch: list[_Write[K, R]] = []
        deferred: list[_Write[K, R]] = []
        keys: set[K] = set()
        size = 0
        while self._queue and len(batch) < MAX_ROWS and size < MAX_BYTES:
            item = self._queue.popleft()
            if item.key in keys:
                deferred.append(item)  # one row per key per statement
                continue
            keys.add(item.key)
            item.queued = False
            batch.append(item)
            size += item.size
        self._queue.extendleft(reversed(deferred))
        return batch

    async def _run_one(self, what: str) -> None:
        batch = sorted(self._take(), key=lambda item: item.key)
        rows = [(item.key, item.row) for item in batch]
        operation = self._single(rows) if len(rows) == 1 else self._several(rows)

        self._running += 1
        try:
            written = await self._run(
                operation, what if len(batch) == 1 else f"{what} (with {len(batch) - 1} more)"
            )
        except PersistenceError as exc:
            for item in batch:  # each caller raises it (the caller running it too)
                item.outcome = exc
        except BaseException:
            error = PersistenceError(
                f"{what}: the statement carrying this write was cancelled with the "
                "call that ran it; the write may or may not have taken effect",
                retryable=True,
                ambiguous=True,
            )
            for item in batch:
                item.outcome = error
            raise
        else:
            for item in batch:
                item.outcome = item.key in written
        finally:
            self._running -= 1
            for item in batch:
                item.wake.set()
