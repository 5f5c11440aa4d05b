"""The partition as a batch processor: handle what is pending, commit it in one append.

``PartitionCommands`` runs on the owner of one partition. Its loop takes
everything pending (commands from local callers and handlers, and the inbox
from the position the stream says is fully processed), handles aggregate
commands in one synchronous pass against cached roots (no task per command),
and queues each handled command on the partition's ``StreamWriter``. The writer
appends everything queued while its previous append was in flight as ONE
record: the batch's events, the IDs of the commands it handled and the inbox
progress. That conditional append is the commit point and the ownership fence
(ADR 0007); instance journals and snapshots are written afterwards by the
``Materialiser``.

- Aggregate commands of one instance are handled in order, each against the
  root the previous one left (committed or still in the writer's queue: if that
  append fails the partition is lost and every cache dropped). A cache miss
  parks the instance's commands while one task loads it.
- Integration commands run in tasks (``MINIMIZE``: one at a time per handler);
  their events join the next record once the handler returns.
- A failing handler is retried with capped exponential backoff and jitter, its
  instance parked meanwhile; after ``max_attempts`` failures, or at once for a
  ``HandlerBug``, the command goes to the poison store. Storage faults are
  retried without counting against the command.
- A command from a local caller is durable once its record is; if its handler
  fails it is appended to the inbox, and the caller returns once it is there.
- Deduplication: recently completed command IDs (seeded by the takeover scan),
  the instance's recent command IDs (aggregates), and idempotency markers for
  keyed integration commands.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from contextlib import aclosing
from datetime import datetime

import anyio
import anyio.lowlevel
import attrs
from anyio.abc import TaskGroup, TaskStatus
from opentelemetry import metrics

import dogma

from ...config import ApplicationConfig, HandlerConfig, HandlerKind
from ...persistence import Journal, Keyspace, PersistenceError, Provider
from ..backoff import backoff
from ..envelope import Envelope
from ..settings import EngineSettings
from ..streams import (
    CommandDone,
    EventBus,
    OwnershipLost,
    PartitionStream,
    Publication,
    StreamTail,
    StreamWriter,
)
from .acceptance import (
    IdempotencyMarker,
    PartitionStopped,
    marker_decoder,
    marker_encoder,
)
from .aggregates import AggregateInstances, Committed
from .inbox import InboxEntry, InboxRecord, InboxWriter, read_inbox
from .integrations import execute_integration
from .materialiser import Materialiser
from .poison import HandlerBug, PoisonRecord, write_poison

__all__ = ["PartitionCommands"]

_log = logging.getLogger("runkit.engine.commands.batches")
_meter = metrics.get_meter("runkit.engine")
_handled = _meter.create_counter("runkit.commands.handled", description="commands handled")
_failed = _meter.create_counter("runkit.commands.failed", description="failed handling attempts")
_poisoned = _meter.create_counter("runkit.commands.poisoned", description="commands poisoned")

#: Seconds between checks of the inbox for records appended by other nodes.
INBOX_POLL_INTERVAL = 1.0
#: Most inbox commands of one partition in memory at once (the rest is read later).
MAX_PENDING_COMMANDS = 10_000
#: Command IDs remembered per partition as done.
COMPLETED_CACHE = 100_000

# Where a completed command's events are on the stream: (first offset, count).
_Location = tuple[int, int] | None


@attrs.define(eq=False)
class _Waiter:
    """A local caller waiting for its commands to be durable."""

    remaining: int
    done: anyio.Event = attrs.Factory(anyio.Event)
    error: BaseException | None = None

    def settle(self, error: BaseException | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.remaining -= 1
        if self.remaining <= 0 or error is not None:
            self.done.set()


@attrs.define(eq=False)
class _RoomWaiter:
    """A caller waiting for backlog room; ``reserved`` once a slot is handed to it."""

    event: anyio.Event = attrs.Factory(anyio.Event)
    reserved: bool = False


@attrs.define(eq=False)
class _Item:
    """One pending command."""

    entry: InboxEntry
    handler: HandlerConfig | None
    position: int  # inbox position; -1 until a local command is in the inbox
    waiter: _Waiter | None = None
    failures: int = 0
    spilled: bool = False
    finished: bool = False

    @property
    def command_id(self) -> str:
        return self.entry.envelope.message_id

    @property
    def instance_key(self) -> tuple[str, str]:
        return (self.entry.handler_key, self.entry.instance_id or "")


class _Completed:
    """Recently completed command IDs and where their events are (bounded)."""

    def __init__(self, size: int, initial: frozenset[str] = frozenset()) -> None:
        self._items: OrderedDict[str, _Location] = OrderedDict.fromkeys(initial)
        self._size = size

    def __contains__(self, item: str) -> bool:
        return item in self._items

    def location(self, item: str) -> _Location:
        return self._items.get(item)

    def add(self, item: str, location: _Location = None) -> None:
        self._items[item] = location
        self._items.move_to_end(item)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


class PartitionCommands:
    """Executes the commands of one owned partition (see the module docstring)."""

    def __init__(
        self,
        *,
        app: ApplicationConfig,
        settings: EngineSettings,
        index: int,
        provider: Provider,
        inbox: Journal,
        inbox_writer: InboxWriter,
        idempotency: Keyspace,
        writer: StreamWriter,
        stream: PartitionStream,
        bus: EventBus,
        tail: StreamTail,
        inbox_end: int,
        aggregates: AggregateInstances,
        materialiser: Materialiser,
        backlog_limit: int = 1000,
    ) -> None:
        self._backlog_limit = backlog_limit
        self._app = app
        self._settings = settings
        self._index = index
        self._provider = provider
        self._inbox = inbox
        self._inbox_writer = inbox_writer
        self._idempotency = idempotency
        self._writer = writer
        self._stream = stream
        self._bus = bus
        self._aggregates = aggregates
        self._materialiser = materialiser
        self._clock: Callable[[], datetime] = settings.clock
        self._completed = _Completed(COMPLETED_CACHE, tail.published)
        self._unmarked = tail.unmarked
        self._read_end = tail.inbox_position
        self._inbox_seen = 0  # past our own spilled commands (see _append_spilled)
        self._outstanding: dict[int, int] = {}
        self._inbox_pending = 0
        self._backlog = 0
        # Callers waiting for backlog room, first come first served.
        self._room_waiters: deque[_RoomWaiter] = deque()
        self._reserved = 0  # slots handed to woken waiters that have not taken them yet
        self._paused = False
        self._ready: deque[_Item] = deque()
        # Aggregate instances being loaded or retried: their commands wait here, in order.
        self._parked: dict[tuple[str, str], deque[_Item]] = {}
        # MINIMIZE integrations: their commands, run one at a time per handler.
        self._serial: dict[str, deque[_Item]] = {}
        # Commands queued on the writer, not durable yet (and duplicates waiting on them).
        self._publishing: dict[str, list[_Item]] = {}
        # Integration commands being handled, by ID (a repeated ID waits for the first).
        self._running: dict[str, anyio.Event] = {}
        # Local commands appended to the inbox after a failure, not yet seen there.
        self._spilled: dict[str, _Item] = {}
        self._local: set[_Item] = set()
        self._notes: deque[tuple[int, InboxRecord]] = deque()
        self._wake = anyio.Event()
        self._tg: TaskGroup | None = None
        self._stopped = False
        self._poked = False
        # Every stream record this owner writes must say it has read the whole
        # inbox as of takeover (see streams.read_tail).
        writer.set_progress(tail.inbox_position, inbox_end)

    # -- what others see -------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Commands accepted and not yet done (local and inbox)."""
        return self._backlog

    def progress(self) -> dict[str, int]:
        """Counters for operators: stream end, inbox positions, commands in memory."""
        return {
            "stream_end": self._writer.next_offset,
            "inbox_position": self._writer.written_progress,
            "inbox_read": self._read_end,
            "pending": self._backlog,
        }

    def notify(self, position: int, record: InboxRecord) -> None:
        """Hear of an inbox record appended by this node's ``InboxWriter``."""
        self._notes.append((position, record))
        self._wake.set()

    def poke(self) -> None:
        """Another node appended to the inbox: read it now."""
        self._poked = True
        self._wake.set()

    @property
    def backlog_limit(self) -> int:
        """The most commands waiting here before callers wait for room."""
        return self._backlog_limit

    def has_room(self) -> bool:
        """Whether a caller may go ahead now: a free slot, and nobody waiting for one."""
        return self._backlog + self._reserved < self._backlog_limit and not self._room_waiters

    async def wait_for_room(self) -> None:
        """Return once the backlog is below the limit, after those already waiting.

        Waiters are served in arrival order: each freed slot is handed to the
        first waiter and reserved for it until it resumes, so a caller that
        just finished and calls again cannot take it first (closed-loop callers
        would otherwise keep their slots and starve the queue). The caller
        must take its slot (``execute_local``) without suspending in between.
        """
        if self._stopped or self.has_room():
            return
        waiter = _RoomWaiter()
        self._room_waiters.append(waiter)
        try:
            while True:
                await waiter.event.wait()
                self._unreserve(waiter)
                if self._stopped or self._backlog < self._backlog_limit:
                    return
                # Inbox commands filled the slot meanwhile: stay first in line.
                waiter = _RoomWaiter()
                self._room_waiters.appendleft(waiter)
        except BaseException:
            # Cancelled (the caller's wait bound): leave the line, and hand a
            # slot this waiter received but cannot use to the next one.
            if waiter.reserved:
                self._unreserve(waiter)
                self._wake_waiters()
            elif not waiter.event.is_set():
                self._room_waiters.remove(waiter)
            raise

    def _unreserve(self, waiter: _RoomWaiter) -> None:
        if waiter.reserved:
            waiter.reserved = False
            self._reserved -= 1

    def _wake_waiters(self) -> None:
        free = self._backlog_limit - self._backlog - self._reserved
        while free > 0 and self._room_waiters:
            waiter = self._room_waiters.popleft()
            waiter.reserved = True
            self._reserved += 1
            waiter.event.set()
            free -= 1

    async def execute_local(self, entries: Sequence[InboxEntry]) -> None:
        """Handle *entries* in the next batch; return once each is durable.

        Durable means: committed in a stream record, or (after a handler
        failure) appended to the inbox, or poisoned. Raises ``PartitionStopped``
        if the partition stops first; the caller then uses the inbox.
        """
        if self._stopped:
            raise PartitionStopped
        waiter = _Waiter(len(entries))
        for entry in entries:
            item = _Item(entry, self._app.handler_by_key(entry.handler_key), -1, waiter)
            self._local.add(item)
            self._backlog += 1
            self._ready.append(item)
        self._wake.set()
        await waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error

    # -- the loop ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Execute pending and new commands until cancelled.

        Raises ``OwnershipLost`` if another node writes the partition's stream.
        """
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self._catch_up()
                if self._unmarked:
                    tg.start_soon(self.mark_unmarked, sorted(self._unmarked))
                task_status.started()
                while True:
                    behind = self._paused or self._poked
                    self._poked = False
                    if not self._ready and not self._notes:
                        with anyio.move_on_after(INBOX_POLL_INTERVAL) as poll:
                            await self._wake.wait()
                        behind = behind or poll.cancelled_caught
                    self._wake = anyio.Event()
                    while self._notes:
                        position, record = self._notes.popleft()
                        if position == self._read_end and not behind and not self._full:
                            self._add_record(position, record)
                        elif position >= self._read_end:
                            behind = True
                    if behind and not self._full:
                        await self._catch_up()
                    self._paused = self._paused or (behind and self._full)
                    self._handle_ready()
                    # Let the writer take this pass's commands into its next record.
                    await anyio.lowlevel.checkpoint()
        finally:
            self._stop()

    def _stop(self) -> None:
        self._stopped = True
        while self._room_waiters:
            self._room_waiters.popleft().event.set()  # no slot: they see the stop
        for item in list(self._local):
            if item.command_id not in self._publishing:
                self._settle(item, PartitionStopped())

    @property
    def _full(self) -> bool:
        # Bound the inbox commands in memory: a large backlog is read as work completes.
        return self._inbox_pending >= MAX_PENDING_COMMANDS

    async def _catch_up(self) -> None:
        async with aclosing(read_inbox(self._inbox, self._read_end)) as records:
            async for position, record in records:
                self._add_record(position, record)
                if self._full:
                    self._paused = True
                    return
        self._paused = False

    def _add_record(self, position: int, record: InboxRecord) -> None:
        self._read_end = position + 1
        self._outstanding[position] = len(record.entries)
        for entry in record.entries:
            spilled = self._spilled.pop(entry.envelope.message_id, None)
            if spilled is not None:
                # Our own local command, appended after a failure: it is still
                # being handled (or done) here; count it at this position.
                if spilled.finished:
                    self._outstanding[position] -= 1
                else:
                    spilled.position = position
                continue
            self._inbox_pending += 1
            self._backlog += 1
            self._ready.append(_Item(entry, self._app.handler_by_key(entry.handler_key), position))
        self._advance()

    def _handle_ready(self) -> None:
        """One synchronous pass over everything ready."""
        ready = self._ready
        while ready:
            item = ready.popleft()
            if item.command_id in self._completed:
                self._duplicate(item, self._completed.location(item.command_id))
                continue
            handler = item.handler
            if handler is None or handler.disabled:
                reason = (
                    f"handler {item.entry.handler_key} is disabled or no longer part of "
                    f"application {self._app.identity}"
                )
                self._start(self._poison, item, reason, 0)
            elif handler.kind is HandlerKind.AGGREGATE:
                self._handle_aggregate(item, handler)
            elif handler.concurrency is dogma.ConcurrencyPreference.MINIMIZE:
                queue = self._serial.get(handler.identity.key)
                if queue is None:
                    queue = self._serial[handler.identity.key] = deque()
                    self._start(self._run_serial, handler.identity.key, queue)
                queue.append(item)
            else:
                self._start(self._run_integration, item)

    def _start(self, fn: Callable[..., object], *args: object) -> None:
        assert self._tg is not None
        self._tg.start_soon(fn, *args)  # type: ignore[arg-type]

    # -- aggregates --------------------------------------------------------------

    def _handle_aggregate(self, item: _Item, handler: HandlerConfig) -> None:
        key = item.instance_key
        parked = self._parked.get(key)
        if parked is not None:
            parked.append(item)
            return
        inst = self._aggregates.cached(handler, key[1])
        if inst is None:
            self._parked[key] = deque([item])
            self._start(self._load, handler, key)
            return
        try:
            events = self._aggregates.handle(inst, item.entry)
        except HandlerBug as exc:
            _log.error(
                "%s; poisoning command %s (%s)",
                exc,
                item.command_id,
                item.entry.envelope.description,
            )
            self._start(self._poison, item, str(exc), item.failures + 1)
            return
        except Exception as exc:
            self._retry_later(item, exc, key)
            return
        if events is None:  # the instance has handled this command ID already
            location = self._completed.location(item.command_id) or self._aggregates.location(
                key, item.command_id
            )
            self._duplicate(item, location)
            return
        record = self._aggregates.committed(inst, item.entry, events, inbox_position=item.position)
        if record is not None:
            self._materialiser.add(key, record)
        self._publish(item, events, record)

    async def _load(self, handler: HandlerConfig, key: tuple[str, str]) -> None:
        failures = 0
        while True:
            try:
                await self._aggregates.load(handler, key[1])
                break
            except PersistenceError as exc:
                failures += 1
                delay = backoff(failures, self._settings.retry_base_delay, 5.0)
                _log.warning(
                    "loading %s instance %s failed, retrying in %.2fs: %s",
                    handler.identity.name,
                    key[1],
                    delay,
                    exc,
                )
                await anyio.sleep(delay)
            except Exception as exc:
                # new()/apply_event()/unmarshal failed: a bug, or a transient
                # problem in the root's code; the first command takes the blame.
                parked = self._parked.get(key)
                if parked:
                    self._retry_later(parked.popleft(), exc, key)
                    if key in self._parked and not self._parked[key]:
                        del self._parked[key]
                return
        self._unpark(key)

    def _unpark(self, key: tuple[str, str]) -> None:
        parked = self._parked.pop(key, None)
        if parked:
            self._ready.extend(parked)
            self._wake.set()

    def _failure(self, item: _Item, exc: Exception) -> float | None:
        """A handler failed: return the delay before retrying, or poison it (``None``)."""
        handler = item.handler
        name = handler.identity.name if handler is not None else item.entry.handler_key
        item.failures += 1
        _failed.add(1, {"handler": name})
        if item.failures >= self._settings.max_attempts:
            _log.error(
                "command %s (%s, partition %d) failed %d times in handler %s; moving it to "
                "the poison store: %s: %s",
                item.command_id,
                item.entry.envelope.description,
                self._index,
                item.failures,
                name,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
            self._start(self._poison, item, f"{type(exc).__name__}: {exc}", item.failures)
            return None
        delay = backoff(
            item.failures, self._settings.retry_base_delay, self._settings.retry_max_delay
        )
        _log.warning(
            "command %s (%s, partition %d) failed in handler %s (attempt %d), retrying in "
            "%.2fs: %s: %s",
            item.command_id,
            item.entry.envelope.description,
            self._index,
            name,
            item.failures,
            delay,
            type(exc).__name__,
            exc,
        )
        self._spill(item)
        return delay

    def _retry_later(self, item: _Item, exc: Exception, key: tuple[str, str]) -> None:
        """An aggregate command failed: its instance waits until it is retried or poisoned."""
        delay = self._failure(item, exc)
        if delay is None:
            self._unpark(key)
            return
        self._parked.setdefault(key, deque()).appendleft(item)
        self._start(self._unpark_after, key, delay)

    async def _unpark_after(self, key: tuple[str, str], delay: float) -> None:
        await anyio.sleep(delay)
        self._unpark(key)

    # -- integrations -------------------------------------------------------------

    async def _run_serial(self, handler_key: str, queue: deque[_Item]) -> None:
        try:
            while queue:
                await self._run_integration(queue[0])
                queue.popleft()
        finally:
            if self._serial.get(handler_key) is queue:
                del self._serial[handler_key]

    async def _run_integration(self, item: _Item) -> None:
        command_id = item.command_id
        # The same command ID may be pending twice (a retried idempotency key):
        # never handle both at once, nor before the first is published.
        while (other := self._running.get(command_id)) is not None:
            await other.wait()
        self._running[command_id] = finished = anyio.Event()
        try:
            await self._integration_attempts(item)
        finally:
            del self._running[command_id]
            finished.set()

    async def _integration_attempts(self, item: _Item) -> None:
        handler = item.handler
        assert handler is not None
        entry = item.entry
        storage_failures = 0
        while True:
            try:
                if item.command_id in self._completed:
                    self._duplicate(item, self._completed.location(item.command_id))
                    return
                if entry.keyed:
                    marked, location = await self._marked(item.command_id)
                    if marked:
                        self._completed.add(item.command_id, location)
                        self._duplicate(item, location)
                        return
                events = await execute_integration(
                    handler, entry, site_key=self._settings.site_key, clock=self._clock
                )
                publication = self._publish(item, events, None, pinned=entry.keyed)
                if entry.keyed and publication is not None:
                    await self._mark_after(publication)
                return
            except OwnershipLost:
                raise
            except HandlerBug as exc:
                _log.error(
                    "%s; poisoning command %s (%s)",
                    exc,
                    item.command_id,
                    entry.envelope.description,
                )
                await self._poison(item, str(exc), item.failures + 1)
                return
            except PersistenceError as exc:
                storage_failures += 1
                delay = backoff(storage_failures, self._settings.retry_base_delay, 5.0)
                _log.warning(
                    "storage fault handling command %s (%s), retrying in %.2fs: %s",
                    item.command_id,
                    entry.envelope.description,
                    delay,
                    exc,
                )
                await anyio.sleep(delay)
            except Exception as exc:
                retry_in = self._failure(item, exc)
                if retry_in is None:
                    return
                await anyio.sleep(retry_in)

    async def _marked(self, command_id: str) -> tuple[bool, _Location]:
        """Whether a keyed command has a marker, and where its events are."""
        value, _ = await self._idempotency.get(command_id.encode())
        if not value:
            return False, None
        marker = marker_decoder.decode(value)
        if marker.first_offset is None:
            return True, None
        return True, (marker.first_offset, marker.count)

    async def _mark_after(self, publication: Publication) -> None:
        await publication.done.wait()
        if publication.error is not None:
            return
        location = (publication.offset, len(publication.events)) if publication.events else None
        await self._mark(publication.command_id, location)

    async def mark_unmarked(self, command_ids: Sequence[str]) -> None:
        """Write the markers a previous owner may not have written (takeover)."""
        for command_id in command_ids:
            await self._mark(command_id, self._completed.location(command_id))

    async def _mark(self, command_id: str, location: _Location) -> None:
        marker = IdempotencyMarker(
            completed_at=self._clock(),
            partition=self._index,
            first_offset=None if location is None else location[0],
            count=0 if location is None else location[1],
        )
        failures = 0
        while True:
            try:
                await self._idempotency.set_unconditional(
                    command_id.encode(), marker_encoder.encode(marker)
                )
                self._writer.unpin(command_id)
                return
            except PersistenceError as exc:
                failures += 1
                _log.warning("writing an idempotency marker failed, retrying: %s", exc)
                await anyio.sleep(backoff(failures, self._settings.retry_base_delay, 5.0))

    # -- commit and completion ----------------------------------------------------

    def _publish(
        self,
        item: _Item,
        events: tuple[Envelope, ...],
        record: Committed | None,
        *,
        pinned: bool = False,
    ) -> Publication | None:
        """Queue a handled command on the writer; it completes once durable."""
        waiting = self._publishing.get(item.command_id)
        if waiting is not None:
            waiting.append(item)  # the same command committed just before: wait for it
            return None
        self._publishing[item.command_id] = [item]
        return self._writer.enqueue(
            item.command_id, events, functools.partial(self._durable, record), pinned=pinned
        )

    def _durable(self, record: Committed | None, publication: Publication) -> None:
        # Called by the writer once the record holding the publication is durable
        # (or has failed: then the partition is lost or stopping).
        items = self._publishing.pop(publication.command_id, [])
        if publication.error is not None:
            for item in items:
                self._settle(item, PartitionStopped())
            return
        # Event-less commands are located too (count 0): "done, recorded nothing".
        location = (publication.offset, len(publication.events))
        self._completed.add(publication.command_id, location)
        if record is not None:
            record.durable = True
            record.stream_offset = publication.offset
            record.stream_position = publication.position
            self._materialiser.wake()
        if items and items[0].entry.instance_id is not None:
            self._aggregates.located(items[0].instance_key, publication.command_id, location)
        for item in items:
            if item.handler is not None:
                _handled.add(1, {"handler": item.handler.identity.name})
            self._finish(item)

    def _duplicate(self, item: _Item, location: _Location) -> None:
        waiting = self._publishing.get(item.command_id)
        if waiting is not None:
            waiting.append(item)
            return
        if location is not None and self._bus.has_subscribers(item.entry.envelope.correlation_id):
            # A repeated submission with observers waiting: give them the
            # original events (bus only; the stream already has them), then
            # say it is done.
            self._start(self._redeliver, item, location)
            return
        self._finish(item, conclusive=False)

    async def _redeliver(self, item: _Item, location: tuple[int, int]) -> None:
        first, count = location
        try:
            self._bus.publish(await self._stream.events_at(first, count))
        finally:
            self._finish(item)

    def _finish(self, item: _Item, *, conclusive: bool = True) -> None:
        if item.finished:
            return
        item.finished = True
        correlation_id = item.entry.envelope.correlation_id
        if self._bus.has_subscribers(correlation_id):
            self._bus.note(CommandDone(correlation_id, item.command_id, conclusive))
        self._settle(item, None)
        self._backlog -= 1
        if item.position >= 0:
            if not item.spilled:
                self._inbox_pending -= 1
            self._done(item.position)
        # A spilled command not yet read back from the inbox is counted done
        # when it is (_add_record).
        if self._room_waiters:
            self._wake_waiters()

    def _settle(self, item: _Item, error: BaseException | None) -> None:
        if item in self._local:
            self._local.discard(item)
            assert item.waiter is not None
            item.waiter.settle(error)

    def _spill(self, item: _Item) -> None:
        """A local command's handler failed: make it durable in the inbox meanwhile."""
        if item.spilled or item.waiter is None or item not in self._local:
            return
        item.spilled = True
        self._spilled[item.command_id] = item
        self._start(self._append_spilled, item)

    async def _append_spilled(self, item: _Item) -> None:
        try:
            position = await self._inbox_writer.submit([item.entry])
        except Exception as exc:
            self._spilled.pop(item.command_id, None)
            self._settle(item, exc)
            return
        # Every later stream record must say the inbox was read past it, so
        # that a new owner's takeover scan sees the command's commit (if it
        # is committed here) and does not handle it again (ADR 0002).
        self._inbox_seen = max(self._inbox_seen, position + 1)
        self._advance()
        self._settle(item, None)

    def _done(self, position: int) -> None:
        self._outstanding[position] -= 1
        if self._inbox_pending == MAX_PENDING_COMMANDS // 2:
            self._wake.set()  # room again: read more of the backlog
        self._advance()

    def _advance(self) -> None:
        while self._outstanding:
            first = next(iter(self._outstanding))
            if self._outstanding[first]:
                break
            del self._outstanding[first]
        processed = next(iter(self._outstanding)) if self._outstanding else self._read_end
        self._writer.set_progress(processed, max(self._read_end, self._inbox_seen))

    async def _poison(self, item: _Item, reason: str, attempts: int) -> None:
        record = PoisonRecord(
            entry=item.entry,
            handler_key=item.entry.handler_key,
            error=reason,
            attempts=attempts,
            poisoned_at=self._clock(),
            inbox_position=item.position,
        )
        failures = 0
        while True:
            try:
                await write_poison(self._provider, self._app.identity.key, self._index, record)
                break
            except PersistenceError as exc:
                failures += 1
                delay = backoff(failures, self._settings.retry_base_delay, 5.0)
                _log.warning(
                    "writing poison record of command %s failed, retrying in %.2fs: %s",
                    item.command_id,
                    delay,
                    exc,
                )
                await anyio.sleep(delay)
        _poisoned.add(1, {"handler_key": item.entry.handler_key})
        self._finish(item)
