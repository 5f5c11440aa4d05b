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

This module is the loop: taking a batch, handling it, committing it to the
stream and completing its commands. Its helpers, each with its own job:
``backlog`` (back-pressure: callers waiting for room), ``local_callers``
(settling local callers, spilling to the inbox), ``inbox_progress`` (the inbox
progress stream records state), ``parking`` (instances loading or awaiting a
retry), ``retries`` (backoff and poisoning), ``integration_tasks`` (running
integration commands), ``markers`` (idempotency markers) and ``pending`` (a
pending command, completed command IDs).
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import aclosing

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup, TaskStatus
from opentelemetry import metrics

from ...config import ApplicationConfig, HandlerConfig, HandlerKind
from ...persistence import Journal, Keyspace, PersistenceError, Provider
from ..envelope import Envelope
from ..settings import EngineSettings
from ..signals import event_maker
from ..streams import (
    CLOCK_MARGIN,
    CommandDone,
    EventBus,
    OwnershipLost,
    PartitionStream,
    PriorCommits,
    Publication,
    StreamTail,
    StreamWriter,
    holds_command,
)
from .acceptance import PartitionBusy, PartitionStopped
from .aggregates import AggregateInstances
from .backlog import Backlog
from .inbox import InboxEntry, InboxRecord, InboxWriter, read_inbox
from .inbox_deliveries import InboxDeliveries
from .inbox_progress import InboxProgress
from .instance_records import Committed
from .integration_tasks import IntegrationTasks
from .local_callers import LocalCallers
from .markers import Markers
from .materialiser import Materialiser
from .parking import ParkedInstances
from .pending import CompletedCommands, Location, PendingCommand, Waiter
from .poison import HandlerBug
from .retries import Retries

__all__ = ["DeliverySink", "PartitionCommands"]

_log = logging.getLogger("runkit.engine.commands.batches")
_meter = metrics.get_meter("runkit.engine")
_handled = _meter.create_counter("runkit.commands.handled", description="commands handled")

#: Seconds between checks of the inbox for records appended by other nodes.
INBOX_POLL_INTERVAL = 1.0
#: Most inbox commands of one partition in memory at once (the rest is read later).
MAX_PENDING_COMMANDS = 10_000
#: Command IDs remembered per partition as done.
COMPLETED_CACHE = 100_000

#: Takes an inbox entry holding a process delivery (``InboxEntry.source``)
#: into the partition's process steps (ADR 0010); the callback is told once it
#: is durable (``None``) or will not be here. ``False``: no process steps run
#: here for its handler.
DeliverySink = Callable[[InboxEntry, Callable[[BaseException | None], None]], bool]


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
        deliveries: DeliverySink | None = None,
    ) -> None:
        self._backlog = Backlog[PendingCommand](backlog_limit, admit=self._admit)
        self._app = app
        self._inbox = inbox
        self._writer = writer
        self._stream = stream
        self._bus = bus
        self._aggregates = aggregates
        self._materialiser = materialiser
        self._deliveries = deliveries
        self._index = index
        # Disabled processes whose inbox deliveries wait here (logged once each).
        self._waiting: set[str] = set()
        # Process deliveries in the inbox not yet handed to the process steps.
        self._inbox_deliveries = InboxDeliveries()
        # Inbox deliveries below this may not be counted yet (``hold_deliveries_below``).
        self._deliveries_floor = 0
        # Unmarked commands are committed even when they published nothing. Records
        # list them in command_ids too now; those of earlier releases only as unmarked.
        self._completed = CompletedCommands(
            COMPLETED_CACHE, tail.published | tail.unmarked, tail.locations
        )
        # Inbox entries (position, ID) earlier owners poisoned: done. And the
        # IDs poisoned lately: a copy of one that a caller or gateway spilled
        # with a hint (an unconfirmed append, an unanswered offer) is done too;
        # a copy ``requeue`` appends carries no hint and is handled.
        self._poisoned_found = set(tail.poisoned)
        self._poisoned_ids = CompletedCommands(
            COMPLETED_CACHE, frozenset(cid for _, cid in tail.poisoned)
        )
        self._unmarked = tail.unmarked
        # Spilled offers' commands that the owners before us may have committed.
        self._prior = PriorCommits(stream.journal, tail.next_position)
        self._inbox_progress = InboxProgress(writer.set_progress, tail.inbox_position)
        self._inbox_pending = 0
        self._paused = False
        self._ready: deque[PendingCommand] = deque()
        # Commands queued on the writer, not durable yet (and duplicates waiting on them).
        self._publishing: dict[str, list[PendingCommand]] = {}
        self._notes: deque[tuple[int, InboxRecord]] = deque()
        self._new_event = event_maker()
        self._wake = self._new_event()
        self._tg: TaskGroup | None = None
        self._stopped = False
        self._poked = False
        self._callers = LocalCallers(
            inbox_writer, start=self._start, spilled_at=self._inbox_progress.seen
        )
        self._retries = Retries(
            settings=settings,
            provider=provider,
            app_key=app.identity.key,
            index=index,
            spill=self._callers.spill,
            finish=self._finish_poisoned,
        )
        self._parked = ParkedInstances(
            self._ready,
            wake=self._wake_up,
            start=self._start,
            load=aggregates.load,
            failure=self._retries.failure,
            poison=self._retries.poison,
            retry_base_delay=settings.retry_base_delay,
        )
        self._markers = Markers(idempotency, settings=settings, index=index, unpin=writer.unpin)
        self._integrations = IntegrationTasks(
            settings=settings,
            start=self._start,
            completed=self._completed,
            markers=self._markers,
            retries=self._retries,
            publish=self._publish,
            publishing=self._publishing,
            duplicate=self._duplicate,
            record_limit=provider.limits.max_record_bytes,
        )
        # Every stream record this owner writes must say it has read the whole
        # inbox as of takeover (see streams.read_tail).
        writer.set_progress(tail.inbox_position, inbox_end)

    # -- what others see -------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Commands taken into the batch and not yet done (local and inbox)."""
        return self._backlog.count

    @property
    def held(self) -> int:
        """Inbox commands read and waiting for backlog room (not in ``backlog``)."""
        return len(self._backlog.held)

    def inbox_read_end(self) -> int:
        """How far the inbox is read (its entries taken into the batch or held)."""
        return self._inbox_progress.read_end

    def progress(self) -> dict[str, int]:
        """Counters for operators: stream end, inbox positions, commands in memory."""
        return {
            "stream_end": self._writer.next_offset,
            "inbox_position": self._writer.written_progress,
            "inbox_read": self._inbox_progress.read_end,
            "pending": self._backlog.count + len(self._backlog.held),
        }

    def notify(self, position: int, record: InboxRecord) -> None:
        """Hear of an inbox record appended by this node's ``InboxWriter``."""
        self._inbox_deliveries.notified(position, record, self._inbox_progress.read_end)
        self._notes.append((position, record))
        self._wake.set()

    def poke(self) -> None:
        """Another node appended to the inbox: read it now."""
        self._poked = True
        self._wake.set()

    @property
    def backlog_limit(self) -> int:
        """The most commands waiting here before callers wait for room."""
        return self._backlog.limit

    def has_room(self) -> bool:
        """Whether a caller may go ahead now: a free slot, and nobody waiting for one."""
        return self._backlog.has_room()

    async def wait_for_room(self, *, take: bool = True) -> None:
        """Return once the backlog is below the limit, after those already waiting.

        See ``Backlog.wait_for_room``: the caller must take its slot
        (``execute_local``) without suspending in between, unless *take* is
        false (its command reaches the partition through the inbox).
        """
        await self._backlog.wait_for_room(take=take)

    async def execute_local(self, entries: Sequence[InboxEntry]) -> None:
        """Handle *entries* in the next batch; return once each is durable.

        Durable means: committed in a stream record, or (after a handler
        failure) appended to the inbox, or poisoned. Raises ``PartitionStopped``
        if the partition stops first; the caller then uses the inbox.
        """
        done = self._new_event()
        waiter = Waiter(len(entries), done=done)
        self._take(entries, waiter)
        await done.wait()
        if waiter.error is not None:
            raise waiter.error

    def execute_nowait(
        self, entries: Sequence[InboxEntry], done: Callable[[BaseException | None], None]
    ) -> None:
        """``execute_local`` without waiting: *done* is called once they are durable.

        *done* gets ``None``, or the error ``execute_local`` would raise
        (``PartitionStopped`` among them). It runs in the partition's tasks, so
        it must not block. Raises ``PartitionStopped`` at once if the partition
        has stopped.
        """
        self._take(entries, Waiter(len(entries), callback=done))

    def execute_when_room(
        self,
        entries: Sequence[InboxEntry],
        done: Callable[[BaseException | None], None],
        *,
        hold: float,
    ) -> None:
        """``execute_nowait`` for a caller's commands offered by a peer: once there is room.

        Waits in line with local callers for up to *hold* seconds, then takes
        the commands, or calls *done* with a ``PartitionBusy`` (they are not
        taken). One parked offer per remote caller, rather than offers repeated
        until room appears: under overload those would cost the owner more
        than the commands. Raises ``PartitionStopped`` at once if the partition
        has stopped; *done* gets one if it stops while they wait.
        """
        if self._stopped:
            raise PartitionStopped
        if self.has_room():
            self.execute_nowait(entries, done)
        else:
            self._start(self._execute_when_room, entries, done, hold)

    async def _execute_when_room(
        self,
        entries: Sequence[InboxEntry],
        done: Callable[[BaseException | None], None],
        hold: float,
    ) -> None:
        try:
            with anyio.move_on_after(hold) as waited:
                await self._backlog.wait_for_room()
        except BaseException:
            done(PartitionStopped())  # cancelled: the partition is stopping
            raise
        if waited.cancelled_caught:
            done(PartitionBusy(self.backlog, self.backlog_limit))
            return
        try:
            # At once: the slot is reserved only until this task suspends.
            self.execute_nowait(entries, done)
        except PartitionStopped as stopped:
            done(stopped)

    def _take(self, entries: Sequence[InboxEntry], waiter: Waiter) -> None:
        if self._stopped:
            raise PartitionStopped
        for entry in entries:
            item = PendingCommand(entry, self._app.handler_by_key(entry.handler_key), -1, waiter)
            self._callers.add(item)
            self._backlog.count += 1
            self._ready.append(item)
        self._wake.set()

    async def mark_unmarked(self, command_ids: Sequence[str]) -> None:
        """Write the markers a previous owner may not have written (takeover)."""
        await self._markers.mark_unmarked(command_ids, self._completed.location)

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
                tg.start_soon(self._poll_inbox)
                task_status.started()
                while True:
                    if not self._ready and not self._notes:
                        await self._wake.wait()
                    else:
                        # Let the writer take the last pass's commands into its
                        # next record before handling more.
                        await anyio.lowlevel.checkpoint()
                    if not self._materialiser.has_room:
                        # Instance journals are written slower than commits
                        # come: hold commits back (callers wait in the backlog).
                        await self._materialiser.wait_for_room()
                    behind = self._paused or self._poked
                    self._poked = False
                    self._wake = self._new_event()
                    while self._notes:
                        position, record = self._notes.popleft()
                        read_end = self._inbox_progress.read_end
                        if (
                            position == read_end
                            and not behind
                            and not self._full
                            and not self._unresolved(record)
                        ):
                            self._add_record(position, record)
                        elif position >= read_end:
                            behind = True
                    if behind and not self._full:
                        await self._catch_up()
                    self._paused = self._paused or (behind and self._full)
                    self._handle_ready()
        finally:
            self._stop()

    async def _poll_inbox(self) -> None:
        # Records other nodes appended without a wake-up (or whose wake-up was
        # lost) are read within a poll interval. One timer per partition: a
        # timeout around every wait of the loop would cost a cancel scope per pass.
        while True:
            await anyio.sleep(INBOX_POLL_INTERVAL)
            self.poke()

    def _stop(self) -> None:
        self._stopped = True
        self._backlog.close()
        # The writer settles the items of the commits in flight (``_durable``).
        self._callers.stop({i for items in self._publishing.values() for i in items})

    def _wake_up(self) -> None:
        self._wake.set()

    @property
    def _full(self) -> bool:
        # Bound the inbox commands in memory: a large backlog is read as work completes.
        return self._inbox_pending >= MAX_PENDING_COMMANDS

    async def _catch_up(self) -> None:
        async with aclosing(read_inbox(self._inbox, self._inbox_progress.read_end)) as records:
            async for position, record in records:
                if self._unresolved(record):
                    await self._resolve(position, record)
                self._add_record(position, record)
                if self._full:
                    self._paused = True
                    return
        self._paused = False

    def _unresolved(self, record: InboxRecord) -> bool:
        return any(
            (e.unconfirmed is not None or e.offered_at is not None)
            and e.envelope.message_id not in self._completed
            for e in record.entries
        )

    async def _resolve(self, position: int, record: InboxRecord) -> None:
        """Find the commands of *record* spilled from an append that did land.

        A stopping owner whose last append was unconfirmed told its callers
        the partition stopped, and they spilled its commands here with that
        append's position and writer. The takeover scan may not reach back to
        it (an owner between it and us read the spill but recorded no progress
        past it): look there. Rare, and before the record is added, so that
        the commands keep their order. A command spilled after an offer that
        went unanswered, and unknown here, is looked for in the records the
        owners before us wrote since the offer (``PriorCommits``).
        """
        for entry in record.entries:
            command_id = entry.envelope.message_id
            if command_id in self._completed:
                continue
            if command_id in self._poisoned_ids and (
                entry.unconfirmed is not None or entry.offered_at is not None
            ):
                self._poisoned_found.add((position, command_id))  # a copy of a poisoned one
                continue
            if entry.unconfirmed is not None:
                found = await holds_command(self._stream.journal, entry.unconfirmed, command_id)
            elif entry.offered_at is not None:
                found = await self._prior.holds(command_id, entry.offered_at)
                if found is None and self._completed.forgot_since(entry.offered_at - CLOCK_MARGIN):
                    # We may have committed it since the offer and forgotten it.
                    found = await self._prior.holds_own(command_id, entry.offered_at)
            else:
                continue
            if found is not None:
                # Handled as a published command; its observers get its events.
                self._completed.add(command_id, found)

    def delivery_pending(self, handler_key: str, instance_id: str) -> bool:
        """Whether process deliveries for the instance are in the inbox, not yet handed over.

        A delivery submitted in memory must then not overtake them
        (``inbox_deliveries``).
        """
        if self._inbox_progress.read_end < self._deliveries_floor:
            return True  # the inbox may hold some that no count knows of yet
        return self._inbox_deliveries.pending(handler_key, instance_id)

    def hold_deliveries_below(self, end: int) -> None:
        """Refuse in-memory deliveries until the inbox is read up to *end*.

        Set when the partition's process steps start taking deliveries: the
        inbox may hold deliveries appended before this owner was counting
        them (by this node while the partition ran elsewhere, or by another
        node), and an in-memory one must not overtake them.
        """
        self._deliveries_floor = max(self._deliveries_floor, end)

    def _add_record(self, position: int, record: InboxRecord) -> None:
        self._inbox_progress.read(position, len(record.entries))
        self._inbox_deliveries.read(position, record)
        for entry in record.entries:
            # Poisoned notes name a process delivery by its delivery ID, not by
            # its event's message ID (``PendingCommand.command_id``).
            if (position, entry.entry_id) in self._poisoned_found:
                self._inbox_progress.done(position)  # a poisoned command's copy
                if entry.source is not None:
                    self._inbox_deliveries.handed_over(entry)
                continue
            # Our own spill copies its local command's entry, which carries no
            # hint: a hinted entry with the same ID is another copy (a gateway's
            # fallback, say), and taking the local command for it would leave
            # the spill itself to be read as new work.
            spilled = (
                self._callers.take_spilled(entry.envelope.message_id)
                if entry.unconfirmed is None and entry.offered_at is None
                else None
            )
            if spilled is not None:
                # Our own local command, appended after a failure: it is still
                # being handled (or done) here; count it at this position.
                if spilled.finished:
                    self._inbox_progress.done(position)
                else:
                    spilled.position = position
                continue
            self._inbox_pending += 1
            # Into the batch once the backlog has room (ADR 0005, back-pressure).
            self._backlog.hold(
                PendingCommand(entry, self._app.handler_by_key(entry.handler_key), position)
            )
        self._inbox_progress.advance()

    def _admit(self, item: PendingCommand) -> None:
        """A held inbox command goes into the batch (the backlog counts it)."""
        self._ready.append(item)
        self._wake.set()

    def _handle_ready(self) -> None:
        """One synchronous pass over everything ready."""
        ready = self._ready
        materialiser = self._materialiser
        while ready and materialiser.has_room:  # else the rest waits for it (``run``)
            item = ready.popleft()
            entry = item.entry
            if entry.source is not None and item.position >= 0:
                self._inbox_deliveries.handed_over(entry)  # below, in order
            if item.command_id in self._completed:
                self._duplicate(item, self._completed.location(item.command_id))
                continue
            if (
                entry.unconfirmed is not None or entry.offered_at is not None
            ) and item.command_id in self._poisoned_ids:
                # A hinted copy read before its command was poisoned (it
                # waited behind it, parked): done, like one read after.
                self._finish(item, conclusive=False)
                continue
            if item.command_id in self._publishing:
                # Another copy is being committed: its outcome is this one's.
                # (Its instance may not know the ID: a copy that recorded
                # nothing leaves no trace in a root rebuilt meanwhile.)
                self._duplicate(item, None)
                continue
            if entry.source is not None:
                self._deliver(item)
                continue
            handler = item.handler
            if handler is None or handler.disabled:
                reason = (
                    f"handler {item.entry.handler_key} is disabled or no longer part of "
                    f"application {self._app.identity}"
                )
                self._start(self._retries.poison, item, reason, 0)
            elif handler.kind is HandlerKind.AGGREGATE:
                self._handle_aggregate(item, handler)
            else:
                self._integrations.handle(item, handler)

    def _deliver(self, item: PendingCommand) -> None:
        """A process delivery read from the inbox: to the partition's process steps."""
        if item.handler is not None and item.handler.disabled:
            self._wait(item)
            return
        if self._deliveries is not None and self._deliveries(
            item.entry, functools.partial(self._delivered, item)
        ):
            return
        reason = (
            f"process {item.entry.handler_key} takes no deliveries on this node (not part "
            f"of application {self._app.identity}, or process steps off)"
        )
        self._start(self._retries.poison, item, reason, 0)

    def _wait(self, item: PendingCommand) -> None:
        """A delivery for a disabled process: it waits in the inbox for the process.

        As the process's events wait in their streams and its deadlines in
        their journals: neither handled nor poisoned. Its entry stays
        outstanding, so the inbox progress the stream records state stays
        below it and an owner running the process enabled reads it again. It
        leaves the batch (its backlog slot, its place among the inbox commands
        in memory). Few wait so: no consumer here routes events to a disabled
        process, so only deliveries appended before it was disabled, or by a
        node running it enabled, reach its home.
        """
        item.finished = True  # nothing finishes it here
        self._backlog.count -= 1
        self._inbox_pending -= 1
        if self._inbox_pending == MAX_PENDING_COMMANDS // 2:
            self._wake.set()  # room again: read more of the backlog
        if item.entry.handler_key not in self._waiting:
            self._waiting.add(item.entry.handler_key)
            _log.info(
                "partition %d: deliveries for disabled process %s wait in the inbox "
                "(from position %d) until it is enabled",
                self._index,
                item.entry.handler_key,
                item.position,
            )
        self._backlog.wake_waiters()

    def _delivered(self, item: PendingCommand, error: BaseException | None) -> None:
        # The step holding it is durable (or it was done already); on an error
        # the partition is stopping and the next owner reads the entry again.
        if error is None:
            self._finish(item, note=False)

    def _start(self, fn: Callable[..., object], *args: object) -> None:
        assert self._tg is not None
        self._tg.start_soon(fn, *args)  # type: ignore[arg-type]

    # -- aggregates --------------------------------------------------------------

    def _handle_aggregate(self, item: PendingCommand, handler: HandlerConfig) -> None:
        key = item.instance_key
        if self._parked.join(key, item):
            return
        inst = self._aggregates.cached(handler, key[1])
        if inst is None:
            self._parked.load(handler, key, item)
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
            self._parked.poison(key, item, str(exc), item.failures + 1)
            return
        except Exception as exc:
            self._parked.retry_later(item, exc, key)
            return
        if events is None:  # the instance has handled this command ID already
            location = self._completed.location(item.command_id) or self._aggregates.location(
                key, item.command_id
            )
            self._duplicate(item, location)
            return
        record = self._aggregates.committed(inst, item.entry, events, inbox_position=item.position)
        self._materialiser.add(key, record)
        self._publish(item, events, record, instance=key)

    # -- commit and completion ----------------------------------------------------

    def _publish(
        self,
        item: PendingCommand,
        events: tuple[Envelope, ...],
        record: Committed | None,
        *,
        pinned: bool = False,
        instance: tuple[str, str] | None = None,
    ) -> Publication | None:
        """Queue a handled command on the writer; it completes once durable.

        *instance* is an aggregate command's (handler key, instance ID).
        """
        waiting = self._publishing.get(item.command_id)
        if waiting is not None:
            waiting.append(item)  # the same command committed just before: wait for it
            return None
        # Registered only once the writer took it: a writer that has stopped
        # raises OwnershipLost and will never settle the item (``_stop`` does).
        publication = self._writer.enqueue(
            item.command_id,
            events,
            functools.partial(self._durable, record),
            pinned=pinned,
            instance=instance,
        )
        self._publishing[item.command_id] = [item]
        return publication

    def _durable(self, record: Committed | None, publication: Publication) -> None:
        # Called by the writer once the record holding the publication is durable
        # (or has failed: then the partition is lost or stopping).
        items = self._publishing.pop(publication.command_id, [])
        if publication.error is not None:
            unconfirmed = publication.unconfirmed
            for item in items:
                hint = {} if unconfirmed is None else {item.command_id: unconfirmed}
                self._callers.settle(item, PartitionStopped(hint))
            return
        # Event-less commands are located too (count 0): "done, recorded nothing".
        location = (publication.offset, len(publication.events))
        self._completed.add(publication.command_id, location)
        if record is not None:
            record.durable = True
            record.stream_offset = publication.offset
            record.stream_position = publication.position
            record.stream_index = publication.index
            self._materialiser.wake()
        if items and items[0].entry.instance_id is not None:
            self._aggregates.located(items[0].instance_key, publication.command_id, location)
        for item in items:
            if item.handler is not None:
                _handled.add(1, {"handler": item.handler.identity.name})
            self._finish(item)

    def _duplicate(self, item: PendingCommand, location: Location) -> None:
        waiting = self._publishing.get(item.command_id)
        if waiting is not None:
            waiting.append(item)
            return
        if location is not None:
            # A repeated submission: publish the original events again (bus
            # only; the stream has them), then say it is done. Even with no
            # subscriber here yet: the bus keeps them for one that starts late,
            # such as a peer's observer whose subscription reaches this node
            # after the offer of the command did.
            self._start(self._redeliver, item, location)
            return
        self._finish(item, conclusive=False, always_note=True)

    async def _redeliver(self, item: PendingCommand, location: tuple[int, int]) -> None:
        first, count = location
        conclusive = False
        try:
            self._bus.publish(await self._stream.events_at(first, count))
            conclusive = True
        except (PersistenceError, ValueError) as exc:
            # The note then decides nothing: observers wait for the events.
            _log.warning(
                "re-delivering the events of repeated command %s at offset %d failed: %s",
                item.command_id,
                first,
                exc,
            )
        finally:
            self._finish(item, conclusive=conclusive, always_note=True)

    def _finish(
        self,
        item: PendingCommand,
        *,
        conclusive: bool = True,
        always_note: bool = False,
        note: bool = True,
    ) -> None:
        if item.finished:
            return
        item.finished = True
        correlation_id = item.entry.envelope.correlation_id
        # Kept for late subscribers too when read from an inbox: a caller's
        # observers subscribe once its command is appended (an integration
        # command, an offer that fell back), and the owner may be quicker.
        # Not for a process delivery: no caller observes it as a command.
        if note and (
            always_note or item.position >= 0 or self._bus.has_subscribers(correlation_id)
        ):
            self._bus.note(CommandDone(correlation_id, item.command_id, conclusive))
        self._callers.settle(item, None)
        self._backlog.count -= 1
        if item.position >= 0:
            if not item.spilled:
                self._inbox_pending -= 1
            self._done(item.position)
        # A spilled command not yet read back from the inbox is counted done
        # when it is (_add_record).
        self._backlog.wake_waiters()  # held inbox commands first

    async def _finish_poisoned(self, item: PendingCommand) -> None:
        """*item* is in the poison store: note that on the stream, then finish it.

        Its inbox entry is done, but no record commits it: without the note a
        next owner reading the inbox before this one's progress passed the
        entry (a command before it still pending, a stop, a crash) would handle
        it again, maybe after later commands of its instance. An aggregate's
        instance stays parked meanwhile, so those commit after the note.
        """
        self._poisoned_ids.add(item.command_id)
        await item.spill_landed()
        # Without an inbox entry (-1: a local or offered command never spilled)
        # the note still names the ID, for copies spilled with a hint.
        position = item.position if item.position >= 0 else item.spill_position
        try:
            note = self._writer.enqueue_poisoned(position, item.command_id)
        except OwnershipLost:
            return  # stopping: the next owner reads it again
        await note.wait_settled()
        if note.error is None:
            self._finish(item)

    def _done(self, position: int) -> None:
        self._inbox_progress.done(position)
        if self._inbox_pending == MAX_PENDING_COMMANDS // 2:
            self._wake.set()  # room again: read more of the backlog
        self._inbox_progress.advance()
