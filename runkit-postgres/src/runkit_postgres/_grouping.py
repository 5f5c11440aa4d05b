"""Statement grouping: concurrent single-row writes (and reads) share one statement.

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
ambiguous ``PersistenceError``. If another caller whose write the statement
carries is cancelled, it stops the statement (``Interrupt``) and returns once
the statement has ended: its write then took effect wholly or not at all,
never after the call returned. A statement so stopped had no effect, and the
writes of callers still waiting go into the next one.

Keyspace reads (``get``) are grouped the same way (``ReadGroup``): a process
step or an instance load reads one key, many at once. A read cancelled with
the call running its statement is not failed but queued again: it has no
outcome to be unsure about.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, Generic, Protocol, TypeVar, cast

import anyio
import psycopg

from runkit.persistence import PersistenceError

from ._executor import Interrupt, Interrupted

__all__ = ["MAX_BYTES", "MAX_ROWS", "ReadGroup", "WriteGroup"]


class _Key(Protocol):
    """What a statement holds one write of (a journal ID, a keyspace key): hashed, sorted."""

    def __hash__(self) -> int: ...
    def __lt__(self, other: Any, /) -> bool: ...


K = TypeVar("K", bound=_Key)
R = TypeVar("R")  # the rest of a write's row
Out = TypeVar("Out")  # what a statement returns

Conn = psycopg.Connection[tuple[object, ...]]


class Runner(Protocol[Out]):
    """Runs an operation with a connection in a worker thread (the provider's ``_run``)."""

    def __call__(
        self, operation: Callable[[Conn], Out], what: str, /, *, interrupt: Interrupt | None = None
    ) -> Awaitable[Out]: ...


#: Builds the operation for some rows.
Statement = Callable[[list[tuple[K, R]]], Callable[[Conn], Out]]

#: Rows and bytes per statement (a statement's parameters stay well under
#: PostgreSQL's 1 GB limit and its latency stays short).
MAX_ROWS: Final = 256
MAX_BYTES: Final = 8 * 1024 * 1024

_PENDING: Final = object()


class _Item(Generic[K, R]):
    __slots__ = ("gone", "key", "outcome", "queued", "row", "size", "statement", "wake")

    def __init__(self, key: K, row: R, size: int) -> None:
        self.key = key
        self.row = row
        self.size = size
        self.wake = anyio.Event()
        self.queued = True  # until a statement takes it
        self.gone = False  # its caller has left (its outcome no longer matters)
        self.statement: Interrupt | None = None  # stops the statement carrying it
        # _PENDING until its statement ends: then its result, or the error.
        self.outcome: object = _PENDING


class _Group(Generic[K, R, Out]):
    """Coalesces one provider's concurrent single-row operations of one kind into few statements."""

    def __init__(
        self,
        run: Runner[Out],
        single: Statement[K, R, Out],
        several: Statement[K, R, Out],
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
        self._queue: deque[_Item[K, R]] = deque()

    async def _submit(self, key: K, row: R, size: int, what: str) -> object:
        """Queue one row, run or wait for the statement carrying it; its outcome.

        :raises PersistenceError: if the statement carrying it failed.
        """
        item = _Item(key, row, size)
        self._queue.append(item)
        try:
            while item.outcome is _PENDING:
                if self._running < self._max_statements and item.queued:
                    await self._run_one(what)
                else:
                    item.wake = anyio.Event()
                    try:
                        await item.wake.wait()
                    except anyio.get_cancelled_exc_class():
                        if self._settle_on_cancel and not item.queued and item.outcome is _PENDING:
                            await self._settle(item)
                        raise
        finally:
            item.gone = True
            if item.queued:
                self._queue.remove(item)  # cancelled before any statement took it
            self._kick()
        if isinstance(item.outcome, PersistenceError):
            raise item.outcome
        return item.outcome

    #: Whether a caller cancelled while another caller's statement carries its
    #: row waits for that statement to end (a write must not land afterwards).
    _settle_on_cancel = True

    async def _settle(self, item: _Item[K, R]) -> None:
        """Stop the running statement carrying *item*, and wait until it has ended."""
        item.gone = True  # the statement stopped, it is not queued again
        # A fresh event: the one waited on may have been set by ``_kick`` while
        # the item was queued, just before a statement took it.
        item.wake = anyio.Event()
        with anyio.CancelScope(shield=True):
            if item.statement is not None:
                await item.statement.stop()
            await item.wake.wait()  # set when the statement carrying it ends

    def _kick(self) -> None:
        """Let the first queued item start a statement, if a slot is free."""
        if self._queue and self._running < self._max_statements:
            self._queue[0].wake.set()

    #: Whether a statement may carry one row per key only (a write's outcome is its own).
    _one_per_key = True

    def _take(self) -> list[_Item[K, R]]:
        batch: list[_Item[K, R]] = []
        deferred: list[_Item[K, R]] = []
        keys: set[K] = set()
        size = 0
        while self._queue and len(batch) < MAX_ROWS and size < MAX_BYTES:
            item = self._queue.popleft()
            if self._one_per_key and item.key in keys:
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
        interrupt = Interrupt() if self._settle_on_cancel else None
        for item in batch:
            item.statement = interrupt

        self._running += 1
        try:
            result = await self._run(
                operation,
                what if len(batch) == 1 else f"{what} (with {len(batch) - 1} more)",
                interrupt=interrupt,
            )
        except Interrupted:
            # Stopped by a cancelled caller before it took effect: the rest go
            # into the next statement (the runner's own too).
            self._requeue(batch)
        except PersistenceError as exc:
            for item in batch:  # each caller raises it (the caller running it too)
                item.outcome = exc
        except BaseException as exc:
            self._interrupted(batch, what, exc)
            raise
        else:
            for item in batch:
                item.outcome = self._outcome(item.key, result)
        finally:
            self._running -= 1
            for item in batch:
                item.wake.set()

    def _requeue(self, batch: list[_Item[K, R]]) -> None:
        """Queue again, at the front, the items of *batch* whose callers still wait.

        Not those whose callers have left: queued again, nobody would wait on
        them, and the queue behind them would stall.
        """
        for item in reversed(batch):
            if not item.gone:
                item.queued = True
                item.statement = None
                self._queue.appendleft(item)

    def _outcome(self, key: K, result: Out) -> object:
        raise NotImplementedError

    def _interrupted(self, batch: list[_Item[K, R]], what: str, exc: BaseException) -> None:
        """The call running the statement of *batch* ended with *exc* (mostly a cancellation)."""
        raise NotImplementedError


class WriteGroup(_Group[K, R, set[K]]):
    """Coalesces one provider's concurrent writes of one kind into few statements.

    A statement returns the keys it wrote.
    """

    async def write(self, key: K, row: R, size: int, what: str) -> bool:
        """Write *row* for *key*; ``False`` if its condition did not hold (a conflict).

        *size* is the row's size in bytes, to bound a statement's parameters.

        :raises PersistenceError: if the statement carrying it failed (ambiguous).
        """
        return cast(bool, await self._submit(key, row, size, what))

    def _outcome(self, key: K, result: set[K]) -> object:
        return key in result

    def _interrupted(self, batch: list[_Item[K, R]], what: str, exc: BaseException) -> None:
        error = PersistenceError(
            f"{what}: the statement carrying this write was cancelled with the "
            "call that ran it; the write may or may not have taken effect",
            retryable=True,
            ambiguous=True,
        )
        for item in batch:
            item.outcome = error


class ReadGroup(_Group[K, None, dict[K, Out]]):
    """Coalesces one provider's concurrent single-row reads of one kind into few statements.

    A statement returns the rows it found, by key; a key it did not find is absent.
    """

    async def read(self, key: K, what: str) -> Out | None:
        """The row of *key*, or ``None`` if there is none.

        :raises PersistenceError: if the statement carrying it failed.
        """
        return cast("Out | None", await self._submit(key, None, 0, what))

    def _outcome(self, key: K, result: dict[K, Out]) -> object:
        return result.get(key)

    _one_per_key = False  # duplicates of a key all take the row the statement found
    _settle_on_cancel = False  # a read has no effect to wait for

    def _interrupted(self, batch: list[_Item[K, None]], what: str, exc: BaseException) -> None:
        if not isinstance(exc, anyio.get_cancelled_exc_class()):
            error = PersistenceError(f"{what}: the statement carrying this read failed: {exc!r}")
            for item in batch:
                item.outcome = error
            return
        # Cancelled with the call that ran it: the reads of callers still
        # waiting go into the next statement.
        self._requeue(batch)
