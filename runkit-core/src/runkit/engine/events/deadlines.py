"""Deadlines: the deadline journal of each partition and its timer.

A process instance's deadlines live in the deadline journal of its *home*
partition, ``partition_of(instance_workload(handler key, instance ID))``, as ``DeadlineBatch``
records appended when a step's outbox is dispatched (``process_outbox``). The
owner of the home partition runs one ``DeadlineTimer``: it reads the journal
into a heap ordered by ``scheduled_for`` (rebuilt from the journal on
takeover), sleeps until the earliest is due, and fires each one no earlier than
``scheduled_for`` by the engine clock. Appends made by this node wake the timer
at once; the timer also re-reads the journal tail at least every
``deadline_rescan_interval`` seconds, which bounds how late it notices
deadlines appended by another node or a jump of an injected clock.

A due deadline is a delivery to the process steps of the home partition
(``process_homes``). Exactly-once is not the journal's job: the instance's
state lists the IDs of its pending deadlines, a deadline is handled only while
its ID is pending (the step that handles it removes it), and ending the
instance clears the list. So a deadline appended twice (an outbox dispatched
again after a takeover) or fired twice (a crash before truncation) is handled
once, and a cancelled one is skipped. Once every deadline of a journal record
has fired or been skipped, the journal is truncated past it.

The deadlines of a disabled process handler are *held*: never fired, never
dropped, and never truncated past, however overdue, as its events wait in the
stream for it. A timer started once the handler is enabled again reads them
from the journal and fires them, late, like any deadline overdue after a
restart. So a handler disabled for long holds back its home journals'
truncation.

A deadline of a handler this node's application does not have is held too,
for ``UNKNOWN_HANDLER_GRACE`` past its time, then dropped with a warning: during
a rolling upgrade that adds a process, a node still running the old version may
own the home partition of a new instance's deadline, and the node that takes
the partition over next fires it, late rather than never. A handler removed
from the application holds its home journals' truncation back for that long.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import attrs
import msgspec

from ...persistence import Conflict, Journal, LimitExceeded, PersistenceError, RecordNotFound
from ..backoff import backoff
from ..envelope import UNDECODABLE
from ..logs import RateLimitedLog, describe_error
from .process_stores import PoisonedMessage, event_poison_store_name, poison_error

if TYPE_CHECKING:
    from ..partitions import PartitionContext

__all__ = [
    "UNKNOWN_HANDLER_GRACE",
    "DeadlineBatch",
    "DeadlineEntry",
    "DeadlineTimer",
    "append_deadlines",
    "deadline_journal_name",
]

#: How long past its time a deadline of a handler this node does not know is
#: held (for a node that knows it) before it is dropped.
UNKNOWN_HANDLER_GRACE = timedelta(hours=24)

_log = logging.getLogger("runkit.engine.events.deadlines")
# One line per partition per interval while the store is out.
_store_log = RateLimitedLog(_log, 10.0)
_poison_encoder = msgspec.msgpack.Encoder()


class DeadlineEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One scheduled deadline, as stored in a deadline journal and an outbox.

    ``envelope`` is the encoded deadline envelope; its ``message_id`` is
    ``deadline_id`` and its ``scheduled_for`` is ``scheduled_for``.
    """

    handler_key: str
    instance_id: str
    deadline_id: str
    scheduled_for: datetime
    envelope: bytes


class DeadlineBatch(msgspec.Struct, frozen=True):
    """A deadline journal record: the deadlines of one outbox for one home partition."""

    entries: list[DeadlineEntry]


_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(DeadlineBatch)


def deadline_journal_name(app_key: str, partition: int) -> str:
    """The name of the deadline journal of partition *partition*."""
    return f"{app_key}/deadlines/{partition}"


async def append_deadlines(journal: Journal, entries: list[DeadlineEntry]) -> None:
    """Append *entries* as one record at the journal's end, retrying on conflict.

    Several partitions' consumers may append to one home journal; OCC makes
    each append land whole, once per call (a repeated call after an ambiguous
    failure may append a duplicate, which the pending-ID check makes harmless).
    """
    record = _encoder.encode(DeadlineBatch(entries))
    while True:
        end = (await journal.bounds()).end
        try:
            await journal.append(end, record)
            return
        except Conflict:
            continue


@attrs.frozen(order=True)
class _Due:
    scheduled_for: datetime
    position: int
    index: int
    entry: DeadlineEntry = attrs.field(order=False, eq=False)


class DeadlineTimer:
    """Fires the deadlines of one home partition, never before they are due.

    *fire* handles one deadline (a delivery to the home partition's steps,
    which skip it unless it is pending and retry or poison the handler);
    when it returns the deadline is done, whether handled or skipped. The
    deadlines of the handlers in *held* (disabled ones) are never fired and
    keep the journal from being truncated past them. With *known* given, the
    deadlines of a handler in neither are fired only *unknown_grace* after
    their time (*fire* then drops them): another node may know the handler.

    Due deadlines of different instances fire concurrently (at most
    *concurrency* at once), those of one instance one after another in
    ``scheduled_for`` order: a deadline waits for its instance while the
    instance handles something else (a slow event handler, an outbox whose
    integration command is still running), and must not hold up the
    deadlines of other instances meanwhile.
    """

    def __init__(
        self,
        ctx: PartitionContext,
        fire: Callable[[DeadlineEntry], Awaitable[None]],
        *,
        rescan_interval: float,
        held: Collection[str] = frozenset(),
        known: Collection[str] | None = None,
        unknown_grace: timedelta = UNKNOWN_HANDLER_GRACE,
        concurrency: int = 32,
    ) -> None:
        self._ctx = ctx
        self._fire = fire
        self._rescan = rescan_interval
        self._held = held
        self._known = known
        self._unknown_grace = unknown_grace
        self._heap: list[_Due] = []
        # Journal position -> entries not yet fired (held ones never are).
        self._remaining: Counter[int] = Counter()
        self._cursor = 0  # next journal position to read
        self._begin = 0
        self._wake = anyio.Event()
        self._concurrency = concurrency
        # (handler key, instance ID) with a deadline firing -> its due ones waiting behind it.
        self._firing: dict[tuple[str, str], deque[_Due]] = {}
        self._fired = False  # a deadline finished since the journal was last truncated
        self._tg: anyio.abc.TaskGroup | None = None

    def wake(self) -> None:
        """Re-read the journal now (called after this node appended to it)."""
        self._wake.set()

    @property
    def pending(self) -> int:
        """How many deadlines are not fired yet (including skipped-on-fire ones)."""
        return len(self._heap) + sum(1 + len(q) for q in self._firing.values())

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Load the journal, then fire deadlines as they fall due, until cancelled."""
        name = deadline_journal_name(self._ctx.app.identity.key, self._ctx.index)
        async with await self._ctx.provider.journals.open(name) as journal:
            failures = 0
            while True:
                try:
                    bounds = await journal.bounds()
                    self._begin = self._cursor = bounds.begin
                    await self._read(journal)
                    break
                except PersistenceError as exc:
                    failures += 1
                    _store_log.warning(
                        name,
                        "deadline journal %r (partition %d): cannot load; retrying: %s",
                        name,
                        self._ctx.index,
                        describe_error(exc),
                    )
                    self._heap.clear()
                    self._remaining.clear()
                    await anyio.sleep(backoff(failures, 0.1, self._rescan))
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                await self._follow(journal, name)

    async def _follow(self, journal: Journal, name: str) -> None:
        """Fire deadlines as they fall due and read the journal's new records."""
        failures = 0
        while True:
            try:
                await self._fire_due(journal)
                delay = self._rescan
                # At capacity, a finishing fire wakes the loop: no spinning.
                if self._heap and len(self._firing) < self._concurrency:
                    until = (self._heap[0].scheduled_for - self._ctx.now()).total_seconds()
                    delay = min(delay, max(until, 0.0))
                with anyio.move_on_after(delay):
                    await self._wake.wait()
                self._wake = anyio.Event()
                await self._read(journal)
                failures = 0
            except PersistenceError as exc:
                failures += 1
                _store_log.warning(
                    name,
                    "deadline journal %r (partition %d): persistence error; retrying: %s",
                    name,
                    self._ctx.index,
                    describe_error(exc),
                )
                await anyio.sleep(backoff(failures, 0.1, self._rescan))

    async def _read(self, journal: Journal) -> None:
        end = (await journal.bounds()).end
        if end <= self._cursor:
            return
        try:
            async for position, record in journal.range(self._cursor):
                try:
                    batch = _batch_decoder.decode(record)
                except UNDECODABLE as exc:
                    # Raised, it would stop the partition at every restart.
                    await self._poison_record(journal, position, record, exc)
                    self._cursor = position + 1
                    continue
                for i, entry in enumerate(batch.entries):
                    if entry.handler_key in self._held:
                        continue
                    due_at = entry.scheduled_for
                    if self._known is not None and entry.handler_key not in self._known:
                        due_at += self._unknown_grace
                    heapq.heappush(self._heap, _Due(due_at, position, i, entry))
                if batch.entries:
                    self._remaining[position] = len(batch.entries)
                self._cursor = position + 1
        except RecordNotFound:
            # Truncated under us: only another owner (we lost the partition) does that.
            bounds = await journal.bounds()
            self._cursor = max(self._cursor, bounds.begin)

    async def _poison_record(
        self, journal: Journal, position: int, record: bytes, error: Exception
    ) -> None:
        """Keep a record that cannot be decoded in the event poison store, as it is.

        Under ``deadline-record/<position>`` (no handler can be named), without
        its bytes if they do not fit a value: its deadlines cannot fire, and
        the journal is truncated past it.
        """
        _log.error(
            "deadline journal %r (partition %d): the record at %d cannot be decoded; "
            "moving it to the event poison store: %s",
            journal.name,
            self._ctx.index,
            position,
            error,
        )
        name = event_poison_store_name(self._ctx.app.identity.key, self._ctx.index)
        poisoned = PoisonedMessage(
            handler_key="",
            envelope=bytes(record),
            instance_id=None,
            stream_id=journal.name,
            offset=position,
            error=poison_error(error),
            attempts=1,
            poisoned_at=self._ctx.now(),
        )
        key = f"deadline-record/{position}".encode()
        async with await self._ctx.provider.keyspaces.open(name) as poison:
            try:
                await poison.set_unconditional(key, _poison_encoder.encode(poisoned))
            except LimitExceeded:
                # The record fills the journal's limit, and a value has no more
                # room: keep what it was, without its bytes.
                poisoned = msgspec.structs.replace(
                    poisoned,
                    envelope=b"",
                    error=f"{poisoned.error} (the record's {len(record)} bytes not kept)",
                )
                await poison.set_unconditional(key, _poison_encoder.encode(poisoned))

    async def _fire_due(self, journal: Journal) -> None:
        assert self._tg is not None
        while self._heap and self._heap[0].scheduled_for <= self._ctx.now():
            due = heapq.heappop(self._heap)
            instance = (due.entry.handler_key, due.entry.instance_id)
            waiting = self._firing.get(instance)
            if waiting is not None:
                waiting.append(due)  # after the one in flight, in order
            elif len(self._firing) >= self._concurrency:
                # At most *concurrency* instances (and tasks) at once, however
                # many are overdue after an outage: the rest wait in the heap,
                # and each finished fire wakes this loop.
                heapq.heappush(self._heap, due)
                break
            else:
                self._firing[instance] = deque()
                self._tg.start_soon(self._fire_instance, instance, due)
        if self._fired:
            self._fired = False
            await self._truncate(journal)

    async def _fire_instance(self, instance: tuple[str, str], due: _Due) -> None:
        """Fire *due*, then the instance's deadlines that fell due meanwhile."""
        waiting = self._firing[instance]
        failures = 0
        while True:
            try:
                await self._fire(due.entry)
            except PersistenceError as exc:
                failures += 1
                _store_log.warning(
                    (instance, self._ctx.index),
                    "deadline %s (partition %d): persistence error; retrying: %s",
                    due.entry.deadline_id,
                    self._ctx.index,
                    describe_error(exc),
                )
                await anyio.sleep(backoff(failures, 0.1, self._rescan))
                continue
            failures = 0
            self._remaining[due.position] -= 1
            if self._remaining[due.position] <= 0:
                del self._remaining[due.position]
            self._fired = True
            self._wake.set()  # the loop truncates the journal past it
            if not waiting:
                del self._firing[instance]
                return
            due = waiting.popleft()

    async def _truncate(self, journal: Journal) -> None:
        below = min(self._remaining, default=self._cursor)
        if below > self._begin:
            await journal.truncate(below)
            self._begin = below
