"""Commands: acceptance into partition inboxes, and execution on the partition owner.

Acceptance (``Acceptor``) finds the command's handler, routes it to a partition
(aggregate: handler key + instance ID; integration preferring minimal
concurrency: handler key; other integrations: command ID) and submits it to
that partition's ``InboxWriter``; it returns once the inbox record is durable.

Execution (``PartitionCommands``, one per owned partition) follows the inbox
from the position the stream says is fully processed. Aggregate commands run
one at a time per instance, integration commands of a ``MINIMIZE`` handler one
at a time per handler, everything else concurrently. Each command is handled
with retries (capped exponential backoff with jitter); after ``max_attempts``
consecutive handler failures, or at once for a ``HandlerBug``, it moves to the
poison store. Storage faults are retried without counting against the command.

Deduplication by command ID happens where effects commit: the instance journal
(aggregates), the stream records the new owner scanned (``StreamTail.published``)
plus everything published since, and ``<app>/idempotency`` markers, written
after the effects of a keyed command are published. A command counts as done for
the stream header's inbox position only after its marker is written, so every
keyed command below that position has one.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from contextlib import aclosing
from datetime import datetime

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus
from opentelemetry import metrics

import dogma

from ..config import ApplicationConfig, HandlerConfig, HandlerKind
from ..persistence import Conflict, Journal, Keyspace, PersistenceError, Provider
from ._handling import backoff
from .aggregates import AggregateInstances
from .envelope import Envelope, closing_iter, to_message
from .inbox import InboxEntry, InboxRecord, InboxWriter, read_inbox
from .integrations import execute_integration
from .partitions import instance_workload, partition_of
from .poison import HandlerBug, PoisonRecord, write_poison
from .settings import EngineSettings
from .streams import (
    EventBus,
    OwnershipLost,
    PartitionStream,
    Publication,
    StreamTail,
    StreamWriter,
)

__all__ = [
    "Acceptor",
    "IdempotencyMarker",
    "PartitionCommands",
    "command_id_for",
    "idempotency_name",
    "prune_idempotency",
]

_log = logging.getLogger("runkit.engine.commands")
_meter = metrics.get_meter("runkit.engine")
_handled = _meter.create_counter("runkit.commands.handled", description="commands handled")
_failed = _meter.create_counter("runkit.commands.failed", description="failed handling attempts")
_poisoned = _meter.create_counter("runkit.commands.poisoned", description="commands poisoned")

#: Seconds between checks of the inbox for records appended by other nodes.
INBOX_POLL_INTERVAL = 1.0
#: Most commands of one partition being handled (or waiting for their instance) at once.
MAX_PENDING_COMMANDS = 10_000
#: Command IDs remembered per partition as done (a cache in front of the markers).
COMPLETED_CACHE = 100_000


def idempotency_name(app_key: str) -> str:
    """The name of the application's idempotency marker keyspace."""
    return f"{app_key}/idempotency"


def command_id_for(app_key: str, idempotency_key: str) -> str:
    """The command ID derived from an idempotency key: ``uuid5(app_key, key)``."""
    return str(uuid.uuid5(uuid.UUID(app_key), idempotency_key))


class IdempotencyMarker(msgspec.Struct, frozen=True, kw_only=True):
    """Written under the command ID once a keyed command's effects are committed.

    ``first_offset``/``count`` locate the command's events on its partition
    stream (``None``/0 if it recorded none or they are unknown), so observers of
    a repeated submission can be given the original events.
    """

    completed_at: datetime
    partition: int
    first_offset: int | None = None
    count: int = 0


_marker_decoder = msgspec.msgpack.Decoder(IdempotencyMarker)


async def prune_idempotency(provider: Provider, app_key: str, older_than: datetime) -> int:
    """Delete idempotency markers completed before *older_than*; return how many.

    After this, a command re-submitted with one of those keys may execute
    again: the retention period bounds how late a caller may safely retry.
    """
    pruned = 0
    ks = await provider.keyspaces.open(idempotency_name(app_key))
    async with ks, closing_iter(ks.range()) as markers:
        async for key, value, revision in markers:
            if _marker_decoder.decode(value).completed_at >= older_than:
                continue
            try:
                await ks.set(key, b"", revision)
                pruned += 1
            except Conflict:
                pass  # re-marked meanwhile: keep it
    return pruned


_marker_encoder = msgspec.msgpack.Encoder()

# Where a completed command's events are on the stream: (first offset, count).
_Location = tuple[int, int] | None


def _describe_handler(handler: HandlerConfig) -> dict[str, str]:
    return {"handler": handler.identity.name, "handler_key": handler.identity.key}


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _leaf_flags(group: BaseExceptionGroup[BaseException], flag: str) -> list[bool]:
    # The flag (retryable/ambiguous) of every leaf exception in a nested group.
    flags: list[bool] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            flags.extend(_leaf_flags(exc, flag))
        else:
            flags.append(bool(getattr(exc, flag, False)))
    return flags


class Acceptor:
    """Routes commands to their partition inboxes and makes them durable."""

    def __init__(
        self, app: ApplicationConfig, partition_count: int, writers: Sequence[InboxWriter]
    ) -> None:
        self.app = app
        self.partition_count = partition_count
        self.writers = writers

    def handler_for(self, command_type: type) -> HandlerConfig:
        """The enabled handler of *command_type*; ``ValueError`` if there is none."""
        handler = self.app.command_handler(command_type)
        if handler is None or handler.disabled:
            raise ValueError(
                f"no handler of application {self.app.identity} consumes "
                f"{command_type.__module__}.{command_type.__qualname__}"
                + (f" ({handler.describe()} is disabled)" if handler is not None else "")
            )
        return handler

    def route(self, envelope: Envelope, *, keyed: bool) -> tuple[int, InboxEntry]:
        """Return the partition and inbox entry of a command envelope.

        Aggregate routing is given its own decoded copy of the command (ADR-32).
        Raises ``ValueError`` for a command no handler consumes or an empty
        instance ID, and whatever ``route_command_to_instance`` raises.
        """
        command = to_message(envelope)
        handler = self.handler_for(type(command))
        instance_id: str | None = None
        if handler.kind is HandlerKind.AGGREGATE:
            instance_id = handler.handler.route_command_to_instance(command)  # type: ignore[attr-defined]
            if not isinstance(instance_id, str) or not instance_id:
                raise ValueError(
                    f"{handler.describe()} routed {envelope.description!r} to instance "
                    f"{instance_id!r}; instance IDs must be non-empty strings"
                )
            workload = instance_workload(handler.identity.key, instance_id)
        elif handler.concurrency is dogma.ConcurrencyPreference.MINIMIZE:
            workload = handler.identity.key
        else:
            workload = envelope.message_id
        entry = InboxEntry(
            envelope=envelope,
            handler_key=handler.identity.key,
            instance_id=instance_id,
            keyed=keyed,
        )
        return partition_of(workload, self.partition_count), entry

    async def accept(self, routed: Sequence[tuple[int, InboxEntry]]) -> None:
        """Make routed commands durable; returns once every inbox append succeeded."""
        by_partition: dict[int, list[InboxEntry]] = {}
        for index, entry in routed:
            by_partition.setdefault(index, []).append(entry)
        if len(by_partition) == 1:
            [(index, entries)] = by_partition.items()
            await self.writers[index].submit(entries)
            return
        try:
            async with anyio.create_task_group() as tg:
                for index, entries in by_partition.items():
                    tg.start_soon(self.writers[index].submit, entries)
        except ExceptionGroup as group:
            # Callers handle storage failures by type (a process outbox retries
            # them for ever, a handler error it would poison): when every
            # partition failed on storage, raise one PersistenceError, not a group.
            rest = group.subgroup(lambda e: not isinstance(e, PersistenceError | ExceptionGroup))
            if rest is not None:
                raise
            first = _first_leaf(group)
            raise PersistenceError(
                f"accepting commands on {len(by_partition)} partitions failed: {first}",
                retryable=all(_leaf_flags(group, "retryable")),
                ambiguous=any(_leaf_flags(group, "ambiguous")),
            ) from group

    async def accept_envelopes(self, envelopes: Sequence[Envelope]) -> None:
        """Accept commands produced by handlers (``PartitionContext.accept``).

        Their IDs are deterministic, so they are deduplicated like keyed commands.
        """
        await self.accept([self.route(env, keyed=True) for env in envelopes])


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
        idempotency: Keyspace,
        writer: StreamWriter,
        stream: PartitionStream,
        bus: EventBus,
        tail: StreamTail,
        inbox_end: int,
        aggregates: AggregateInstances,
    ) -> None:
        self._app = app
        self._settings = settings
        self._index = index
        self._provider = provider
        self._inbox = inbox
        self._idempotency = idempotency
        self._writer = writer
        self._stream = stream
        self._bus = bus
        self._aggregates = aggregates
        self._clock: Callable[[], datetime] = settings.clock
        self._completed = _Completed(COMPLETED_CACHE, tail.published)
        self._read_end = tail.inbox_position
        self._outstanding: dict[int, int] = {}
        self._pending = 0
        self._paused = False
        self._queues: dict[str, deque[tuple[int, InboxEntry, HandlerConfig]]] = {}
        self._in_flight: dict[str, anyio.Event] = {}
        self._notes: deque[tuple[int, InboxRecord]] = deque()
        self._wake = anyio.Event()
        self._tg: TaskGroup | None = None
        # Every stream record this owner writes must say it has read the whole
        # inbox as of takeover (see streams.read_tail).
        writer.set_progress(tail.inbox_position, inbox_end)

    def progress(self) -> dict[str, int]:
        """Counters for operators: stream end, inbox positions, commands in memory."""
        return {
            "stream_end": self._writer.next_offset,
            "inbox_position": self._writer.written_progress,
            "inbox_read": self._read_end,
            "pending": self._pending,
        }

    def notify(self, position: int, record: InboxRecord) -> None:
        """Hear of an inbox record appended by this node's ``InboxWriter``."""
        self._notes.append((position, record))
        self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Execute pending and new commands until cancelled.

        Raises ``OwnershipLost`` if another node writes the partition's stream.
        """
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await self._catch_up()
            task_status.started()
            while True:
                with anyio.move_on_after(INBOX_POLL_INTERVAL) as poll:
                    await self._wake.wait()
                self._wake = anyio.Event()
                behind = poll.cancelled_caught or self._paused
                while self._notes:
                    position, record = self._notes.popleft()
                    if position == self._read_end and not behind and not self._full:
                        self._add_record(position, record)
                    elif position >= self._read_end:
                        behind = True
                if behind and not self._full:
                    await self._catch_up()
                self._paused = self._paused or (behind and self._full)

    @property
    def _full(self) -> bool:
        # Bound the commands in memory: a large backlog is read as work completes.
        return self._pending >= MAX_PENDING_COMMANDS

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
        self._pending += len(record.entries)
        for entry in record.entries:
            self._dispatch(position, entry)
        self._advance()

    def _dispatch(self, position: int, entry: InboxEntry) -> None:
        assert self._tg is not None
        handler = self._app.handler_by_key(entry.handler_key)
        if handler is None or handler.disabled:
            self._tg.start_soon(self._orphan, position, entry)
            return
        if handler.kind is HandlerKind.AGGREGATE:
            key = f"{handler.identity.key}/{entry.instance_id}"
        elif handler.concurrency is dogma.ConcurrencyPreference.MINIMIZE:
            key = handler.identity.key
        else:
            self._tg.start_soon(self._process, position, entry, handler)
            return
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            self._tg.start_soon(self._drain, key, queue)
        queue.append((position, entry, handler))

    async def _drain(self, key: str, queue: deque[tuple[int, InboxEntry, HandlerConfig]]) -> None:
        try:
            while queue:
                position, entry, handler = queue[0]
                # Pipelined: the next command of this instance (or MINIMIZE
                # handler) starts once this one is committed; the stream
                # writer's queue keeps their events in order.
                await self._process(position, entry, handler, pipelined=True)
                queue.popleft()
        finally:
            if self._queues.get(key) is queue:
                del self._queues[key]

    def _done(self, position: int) -> None:
        self._outstanding[position] -= 1
        self._pending -= 1
        if self._pending == MAX_PENDING_COMMANDS // 2:
            self._wake.set()  # room again: read more of the backlog
        self._advance()

    def _advance(self) -> None:
        while self._outstanding:
            first = next(iter(self._outstanding))
            if self._outstanding[first]:
                break
            del self._outstanding[first]
        processed = next(iter(self._outstanding)) if self._outstanding else self._read_end
        self._writer.set_progress(processed, self._read_end)

    async def _orphan(self, position: int, entry: InboxEntry) -> None:
        reason = (
            f"handler {entry.handler_key} is disabled or no longer part of "
            f"application {self._app.identity}"
        )
        await self._poison(position, entry, reason, attempts=0)
        self._done(position)

    async def _process(
        self, position: int, entry: InboxEntry, handler: HandlerConfig, *, pipelined: bool = False
    ) -> None:
        command_id = entry.envelope.message_id
        # The same command ID may be pending twice (a retried idempotency key):
        # never handle both at once, nor before the first is published.
        while (other := self._in_flight.get(command_id)) is not None:
            await other.wait()
        self._in_flight[command_id] = anyio.Event()
        try:
            publication = await self._process_once(position, entry, handler)
        except BaseException:
            self._in_flight.pop(command_id).set()
            raise
        if publication is None:
            self._in_flight.pop(command_id).set()
            self._done(position)
        elif pipelined:
            assert self._tg is not None
            self._tg.start_soon(self._complete, position, entry, handler, publication)
        else:
            await self._complete(position, entry, handler, publication)

    async def _complete(
        self, position: int, entry: InboxEntry, handler: HandlerConfig, publication: Publication
    ) -> None:
        """Finish a command whose events are queued: wait for them, then mark it done."""
        command_id = entry.envelope.message_id
        try:
            first = await self._writer.wait(publication)
            location = (first, len(publication.events))
            self._completed.add(command_id, location)
            if entry.keyed:
                failures = 0
                while True:
                    try:
                        await self._mark(command_id, location)
                        break
                    except PersistenceError as exc:
                        failures += 1
                        _log.warning("writing an idempotency marker failed, retrying: %s", exc)
                        await anyio.sleep(backoff(failures, self._settings.retry_base_delay, 5.0))
            _handled.add(1, {"handler": handler.identity.name})
        finally:
            self._in_flight.pop(command_id).set()
        self._done(position)

    async def _process_once(
        self, position: int, entry: InboxEntry, handler: HandlerConfig
    ) -> Publication | None:
        """Handle a command (with retries); return its queued publication, if any."""
        command_id = entry.envelope.message_id
        log_context = {
            **_describe_handler(handler),
            "instance": entry.instance_id,
            "message_id": command_id,
            "message_description": entry.envelope.description,
            "partition": self._index,
        }
        failures = storage_failures = 0
        while True:
            try:
                if await self._already_done(entry):
                    _log.debug("command already handled; skipping", extra=log_context)
                    return None
                events = await self._execute(handler, entry, position)
                if events:
                    return self._writer.enqueue(command_id, events)
                self._completed.add(command_id, None)
                if entry.keyed:
                    await self._mark(command_id, None)
                _handled.add(1, {"handler": handler.identity.name})
                return None
            except OwnershipLost:
                raise
            except HandlerBug as exc:
                _log.error("command poisoned: %s", exc, extra=log_context)
                await self._poison(position, entry, str(exc), attempts=failures + 1)
                return None
            except PersistenceError as exc:
                storage_failures += 1
                delay = backoff(storage_failures, self._settings.retry_base_delay, 5.0)
                _log.warning(
                    "storage fault handling command, retrying in %.2fs: %s",
                    delay,
                    exc,
                    extra=log_context,
                )
                await anyio.sleep(delay)
            except Exception as exc:
                failures += 1
                _failed.add(1, {"handler": handler.identity.name})
                if failures >= self._settings.max_attempts:
                    _log.exception(
                        "command failed %d times; moving it to the poison store",
                        failures,
                        extra=log_context,
                    )
                    await self._poison(
                        position, entry, f"{type(exc).__name__}: {exc}", attempts=failures
                    )
                    return None
                delay = backoff(
                    failures, self._settings.retry_base_delay, self._settings.retry_max_delay
                )
                _log.warning(
                    "command failed (attempt %d), retrying in %.2fs: %s: %s",
                    failures,
                    delay,
                    type(exc).__name__,
                    exc,
                    extra=log_context,
                )
                await anyio.sleep(delay)

    async def _execute(
        self, handler: HandlerConfig, entry: InboxEntry, position: int
    ) -> tuple[Envelope, ...]:
        if handler.kind is HandlerKind.AGGREGATE:
            return await self._aggregates.execute(handler, entry, inbox_position=position)
        return await execute_integration(
            handler, entry, site_key=self._settings.site_key, clock=self._clock
        )

    async def _already_done(self, entry: InboxEntry) -> bool:
        command_id = entry.envelope.message_id
        if command_id in self._completed:
            location = self._completed.location(command_id)
            if entry.keyed:
                # A previous owner may have crashed before writing it.
                await self._mark(command_id, location)
            await self._redeliver(entry, location)
            return True
        if entry.keyed:
            value, _ = await self._idempotency.get(command_id.encode())
            if value:
                marker = _marker_decoder.decode(value)
                location = (
                    None
                    if marker.first_offset is None
                    else (
                        marker.first_offset,
                        marker.count,
                    )
                )
                self._completed.add(command_id, location)
                await self._redeliver(entry, location)
                return True
        return False

    async def _redeliver(self, entry: InboxEntry, location: _Location) -> None:
        # A repeated submission with observers waiting: give them the original
        # events (bus only; the stream already has them).
        if location is None or not self._bus.has_subscribers(entry.envelope.correlation_id):
            return
        first, count = location
        self._bus.publish(await self._stream.events_at(first, count))

    async def _mark(self, command_id: str, location: _Location) -> None:
        marker = IdempotencyMarker(
            completed_at=self._clock(),
            partition=self._index,
            first_offset=None if location is None else location[0],
            count=0 if location is None else location[1],
        )
        await self._idempotency.set_unconditional(
            command_id.encode(), _marker_encoder.encode(marker)
        )

    async def _poison(
        self, position: int, entry: InboxEntry, reason: str, *, attempts: int
    ) -> None:
        record = PoisonRecord(
            entry=entry,
            handler_key=entry.handler_key,
            error=reason,
            attempts=attempts,
            poisoned_at=self._clock(),
            inbox_position=position,
        )
        failures = 0
        while True:
            try:
                await write_poison(self._provider, self._app.identity.key, self._index, record)
                break
            except PersistenceError as exc:
                failures += 1
                delay = backoff(failures, self._settings.retry_base_delay, 5.0)
                _log.warning("writing a poison record failed, retrying: %s", exc)
                await anyio.sleep(delay)
        _poisoned.add(1, {"handler_key": entry.handler_key})
