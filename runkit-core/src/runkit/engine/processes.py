"""Process instances: routing, handling, the instance record and its outbox.

One consumer runs per (process handler, owned partition). It routes the events
of routed types in stream order (``route_event_to_instance``; ``None`` =
ignore), then hands each to a worker of its instance, so that one instance's
events are handled in order and different instances concurrently (at most
``process_concurrency`` events unfinished). For each event the worker:

1. (routing, above);
2. loads the instance record from ``<app>/process/<handler-key>``, first
   dispatching any outbox a crash left behind;
3. skips the event if the instance has ended or already handled this stream
   at this offset or later;
4. calls ``handle_event`` with a ``ProcessEventScope``;
5. commits with ONE conditional write of the record: the new root (only if
   ``mutate`` was called), the ended flag, this stream's position, the IDs of
   the instance's pending deadlines, and an outbox of the produced commands
   and deadlines. On ``Conflict`` (another partition's consumer or a stale
   owner wrote the instance) it reloads and handles again;
6. dispatches the outbox (commands through ``ctx.accept`` with IDs derived
   from the cause, deadlines appended to the home partition's deadline
   journal) and clears it with another conditional write.

Every step can be repeated: produced commands have deterministic IDs (the
commands side deduplicates by ID), a deadline fires only while its ID is in the
record's pending list, and a record with a non-empty outbox is dispatched
before it is used again. The stream checkpoint in ``<app>/checkpoints`` only
bounds redelivery after a restart, so it is written in the background; it
follows the lowest unfinished offset.

Failures: a handler error is retried with capped backoff; after
``max_attempts`` attempts the message is recorded in the partition's
event poison store (``<app>/event-poison/<p>``) and the consumer moves on.
``dogma.UnexpectedMessage``, an invalid produced message, a produced message of
a type the handler has no route for (or no enabled handler handles), or an
empty instance ID are bugs: they are poisoned at once. Persistence errors are
retried for ever. Deadlines (``deadlines.py``) are handled by the same code.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, cast

import anyio
import msgspec

import dogma

from ..config import ApplicationConfig, HandlerConfig, RouteKind
from ..persistence import Conflict, Keyspace, PersistenceError, Provider
from .consumers_support import ConsumerOptions, HandlerLogger, close_iterator, sleep_backoff
from .deadlines import (
    DeadlineEntry,
    append_deadlines,
    deadline_journal_name,
)
from .envelope import Envelope, decode, encode, new_envelope, to_message, validate_new
from .partitions import instance_workload

if TYPE_CHECKING:
    from .partitions import PartitionContext
    from .streams import StreamEvent

__all__ = [
    "InstanceRecord",
    "OutboxDeadline",
    "PoisonedMessage",
    "ProcessDeadlineScope",
    "ProcessEventScope",
    "ProcessRunner",
    "checkpoint_key",
    "checkpoints_store_name",
    "event_poison_store_name",
    "list_poisoned_events",
    "process_store_name",
]

_log = logging.getLogger("runkit.engine.processes")


# --- stores and records ---------------------------------------------------------------


def process_store_name(app_key: str, handler_key: str) -> str:
    """The keyspace of a process handler's instance records."""
    return f"{app_key}/process/{handler_key}"


def checkpoints_store_name(app_key: str) -> str:
    """The keyspace of the process consumers' stream checkpoints."""
    return f"{app_key}/checkpoints"


def checkpoint_key(handler_key: str, partition_id: str) -> bytes:
    """The key of one (process handler, partition stream) checkpoint."""
    return f"{handler_key}/{partition_id}".encode()


def event_poison_store_name(app_key: str, partition: int) -> str:
    """The keyspace of events and deadlines a process gave up on, per partition."""
    return f"{app_key}/event-poison/{partition}"


class OutboxDeadline(msgspec.Struct, frozen=True, kw_only=True):
    """A deadline waiting in an outbox, with the home partition it goes to."""

    partition: int
    entry: DeadlineEntry


class InstanceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The stored state of one process instance (msgpack, keyed by instance ID).

    Attributes:
        root: ``marshal_binary()`` of the root; ``None`` until ``mutate`` is
            first called (the root is then ``handler.new()``), and once ended.
        ended: ``end()`` was called; the instance never handles again.
        positions: Stream ID -> offset of the last event handled from it.
        pending_deadlines: IDs of scheduled deadlines not yet handled; a
            deadline fires only while it is listed here.
        commands: Outbox: encoded envelopes of produced commands to accept.
        deadlines: Outbox: scheduled deadlines to append to their journal.
    """

    root: bytes | None = None
    ended: bool = False
    positions: dict[str, int] = msgspec.field(default_factory=dict)
    pending_deadlines: list[str] = msgspec.field(default_factory=list)
    commands: list[bytes] = msgspec.field(default_factory=list)
    deadlines: list[OutboxDeadline] = msgspec.field(default_factory=list)

    @property
    def has_outbox(self) -> bool:
        """Whether commands or deadlines still need dispatching."""
        return bool(self.commands or self.deadlines)


class PoisonedMessage(msgspec.Struct, frozen=True, kw_only=True):
    """An event or deadline a process handler gave up on (``<app>/event-poison/<p>``).

    Keyed by ``<handler key>/event/<stream offset>`` or
    ``<handler key>/deadline/<deadline ID>``.
    """

    handler_key: str
    envelope: bytes
    instance_id: str | None
    stream_id: str | None
    offset: int | None
    error: str
    attempts: int
    poisoned_at: datetime


_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(InstanceRecord)
_poison_decoder = msgspec.msgpack.Decoder(PoisonedMessage)
_int_decoder = msgspec.msgpack.Decoder(int)


async def list_poisoned_events(
    provider: Provider, app_key: str, partition: int
) -> dict[str, PoisonedMessage]:
    """What processes gave up on in a partition: events, deadlines and stuck outboxes.

    Keyed as described at ``PoisonedMessage``; for operators' tools (the CLI).
    """
    name = event_poison_store_name(app_key, partition)
    async with await provider.keyspaces.open(name) as store:
        return {
            key.decode(): _poison_decoder.decode(value) async for key, value, _ in store.range()
        }


# --- handler protocol and scopes ----------------------------------------------------


class _Root(Protocol):
    def marshal_binary(self) -> bytes: ...
    def unmarshal_binary(self, data: bytes) -> None: ...


class _Process(Protocol):
    """The parts of ``dogma.ProcessMessageHandler`` the engine calls."""

    def new(self) -> _Root: ...
    async def route_event_to_instance(self, event: dogma.Event) -> str | None: ...
    async def handle_event(
        self, root: _Root, scope: ProcessEventScope, event: dogma.Event
    ) -> None: ...
    async def handle_deadline(
        self, root: _Root, scope: ProcessDeadlineScope, deadline: dogma.Deadline
    ) -> None: ...


class _Bug(Exception):
    """A handler did something no retry can fix; the message is poisoned at once."""


class _ProcessScope:
    """What ``handle_event``/``handle_deadline`` may do; effects are buffered until commit."""

    def __init__(
        self,
        runner: ProcessRunner,
        ctx: PartitionContext,
        instance_id: str,
        root: _Root,
        cause: Envelope,
    ) -> None:
        self._runner = runner
        self._ctx = ctx
        self._instance_id = instance_id
        self._root = root
        self._cause = cause
        self._logger = HandlerLogger(
            _log, f"process {runner.config.identity.name} instance {instance_id}"
        )
        self.mutated = False
        self.ended = False
        self.commands: list[Envelope] = []
        self.deadlines: list[OutboxDeadline] = []
        self.bug: Exception | None = None

    @property
    def instance_id(self) -> str:
        """The ID of the process instance."""
        return self._instance_id

    def now(self) -> datetime:
        """The engine's current time (UTC)."""
        return self._ctx.now()

    def log(self, fmt: str, *args: object) -> None:
        """Log a %-style message attributed to the process instance."""
        self._logger.log(fmt, *args)

    def _check_not_ended(self, what: str) -> None:
        if self.ended:
            raise RuntimeError(f"{what}: process instance {self._instance_id!r} has ended")

    def root_bytes(self) -> bytes:
        """The root as it is now, marshalled (for the commit)."""
        return self._root.marshal_binary()

    def mutate(self, fn: Callable[[_Root], object]) -> None:
        """Change the root by calling ``fn(root)``; the change is persisted on success."""
        self._check_not_ended("mutate()")
        fn(self._root)
        self.mutated = True

    def end(self) -> None:
        """End the instance: its state and pending deadlines are discarded."""
        self.ended = True

    def _produced_id(self, kind: str, index: int) -> str:
        # Deterministic: handling the same cause again (redelivery, a retried
        # commit) yields the same IDs, so the commands side deduplicates them.
        cause = uuid.UUID(self._cause.message_id)
        return str(uuid.uuid5(cause, f"{self._runner.key}/{kind}/{index}"))

    def _fail(self, error: Exception) -> Exception:
        self.bug = self.bug or error
        return error

    def execute_command(self, command: dogma.Command) -> None:
        """Execute *command* once the handler returns successfully."""
        self._check_not_ended("execute_command()")
        if type(command) not in self._runner.executes:
            raise self._fail(
                _Bug(
                    f"{self._runner.config.describe()} executed a "
                    f"{type(command).__qualname__} without an executes_command route for it"
                )
            )
        handler = self._runner.app.command_handler(type(command))
        if handler is None or handler.disabled:
            raise self._fail(
                _Bug(
                    f"{self._runner.config.describe()} executed a "
                    f"{type(command).__qualname__}, which no enabled handler of the "
                    "application handles"
                )
            )
        try:
            validate_new(command)
        except dogma.ValidationError as exc:
            self._fail(exc)
            raise
        self.commands.append(
            new_envelope(
                command,
                app_key=self._cause.app_key,
                site_key=self._cause.site_key,
                created_at=self._ctx.now(),
                message_id=self._produced_id("command", len(self.commands)),
                causation_id=self._cause.message_id,
                correlation_id=self._cause.correlation_id,
                source_handler=self._runner.key,
                source_instance=self._instance_id,
            )
        )

    def schedule_deadline(self, deadline: dogma.Deadline, at: datetime) -> None:
        """Schedule *deadline* to come back to this instance at *at* (never earlier)."""
        self._check_not_ended("schedule_deadline()")
        if at.tzinfo is None:
            raise ValueError(f"schedule_deadline(): {at!r} is a naive datetime; use UTC")
        if type(deadline) not in self._runner.schedules:
            raise self._fail(
                _Bug(
                    f"{self._runner.config.describe()} scheduled a "
                    f"{type(deadline).__qualname__} without a schedules_deadline route for it"
                )
            )
        at = at.astimezone(UTC)
        try:
            validate_new(deadline, scheduled_for=at)
        except dogma.ValidationError as exc:
            self._fail(exc)
            raise
        deadline_id = self._produced_id("deadline", len(self.deadlines))
        envelope = new_envelope(
            deadline,
            app_key=self._cause.app_key,
            site_key=self._cause.site_key,
            created_at=self._ctx.now(),
            message_id=deadline_id,
            causation_id=self._cause.message_id,
            correlation_id=self._cause.correlation_id,
            source_handler=self._runner.key,
            source_instance=self._instance_id,
            scheduled_for=at,
        )
        home = self._ctx.partition_of(instance_workload(self._runner.key, self._instance_id))
        self.deadlines.append(
            OutboxDeadline(
                partition=home,
                entry=DeadlineEntry(
                    handler_key=self._runner.key,
                    instance_id=self._instance_id,
                    deadline_id=deadline_id,
                    scheduled_for=at,
                    envelope=encode(envelope),
                ),
            )
        )


class ProcessEventScope(_ProcessScope):
    """The scope of ``handle_event`` (dogma's ``ProcessEventScope``)."""

    def __init__(
        self,
        runner: ProcessRunner,
        ctx: PartitionContext,
        instance_id: str,
        root: _Root,
        cause: Envelope,
        *,
        recorded_at: datetime,
    ) -> None:
        super().__init__(runner, ctx, instance_id, root, cause)
        self._recorded_at = recorded_at

    @property
    def recorded_at(self) -> datetime:
        """When the event being handled was recorded."""
        return self._recorded_at


class ProcessDeadlineScope(_ProcessScope):
    """The scope of ``handle_deadline`` (dogma's ``ProcessDeadlineScope``)."""

    def __init__(
        self,
        runner: ProcessRunner,
        ctx: PartitionContext,
        instance_id: str,
        root: _Root,
        cause: Envelope,
        *,
        scheduled_for: datetime,
    ) -> None:
        super().__init__(runner, ctx, instance_id, root, cause)
        self._scheduled_for = scheduled_for

    @property
    def scheduled_for(self) -> datetime:
        """The time the deadline being handled was scheduled for."""
        return self._scheduled_for


# --- the runner -----------------------------------------------------------------------

_Invoke = Callable[[_Root, _ProcessScope], Awaitable[None]]


class ProcessRunner:
    """Handles events and deadlines for one process handler on this node.

    Shared by the handler's consumers on every owned partition and by the
    deadline timers. *wake_timer* is told the partition index whenever this
    node appends to a deadline journal, so a local timer re-reads it at once.
    """

    def __init__(
        self,
        app: ApplicationConfig,
        config: HandlerConfig,
        *,
        options: ConsumerOptions,
        wake_timer: Callable[[int], None],
    ) -> None:
        self.app = app
        self.config = config
        self.key = config.identity.key
        self.handler = cast(_Process, config.handler)
        self.options = options
        self.routed = frozenset(t.id for t in config.types_of(RouteKind.HANDLES_EVENT))
        self.executes = frozenset(t.cls for t in config.types_of(RouteKind.EXECUTES_COMMAND))
        self.schedules = frozenset(t.cls for t in config.types_of(RouteKind.SCHEDULES_DEADLINE))
        self._wake_timer = wake_timer

    # -- events --

    async def run(self, ctx: PartitionContext) -> None:
        """Consume the partition stream for this handler until cancelled.

        Events are routed in stream order, one at a time; then each instance's
        events are handled in order by a worker of that instance, up to
        ``process_concurrency`` events in flight. The checkpoint never passes
        an event that is not finished. A persistence error outside handling
        (loading the checkpoint, reading the stream) restarts the consumer
        from its stored checkpoint after a backoff.
        """
        failures = 0
        while True:
            try:
                await self._run_once(ctx)
                return
            except PersistenceError:
                failures += 1
                _log.warning(
                    "%s on partition %d: persistence error; restarting the consumer",
                    self.config.describe(),
                    ctx.index,
                    exc_info=True,
                )
                await sleep_backoff(self.options, failures)

    async def _run_once(self, ctx: PartitionContext) -> None:
        app_key = self.app.identity.key
        async with (
            await ctx.provider.keyspaces.open(process_store_name(app_key, self.key)) as records,
            await ctx.provider.keyspaces.open(checkpoints_store_name(app_key)) as checkpoints,
        ):
            checkpoint = _Checkpoint(checkpoints, checkpoint_key(self.key, ctx.partition_id))
            await checkpoint.load()
            async with anyio.create_task_group() as tg:
                tg.start_soon(checkpoint.save_periodically, self.options.checkpoint_interval)
                queues = _InstanceQueues(
                    tg,
                    lambda instance_id, event: self._consume(ctx, records, instance_id, event),
                    checkpoint,
                    limit=self.options.process_concurrency,
                )
                events = ctx.stream.read(checkpoint.value)
                try:
                    async for event in events:
                        if event.offset < checkpoint.value:
                            continue
                        instance_id = None
                        if event.envelope.type_id in self.routed:
                            instance_id = await self._route(ctx, event)
                        await queues.put(instance_id, event)
                    await queues.join()  # the stream ended (test streams only)
                finally:
                    await close_iterator(events)
                    # Best effort: a lagging checkpoint only means harmless redelivery.
                    with anyio.move_on_after(1, shield=True):
                        try:
                            await checkpoint.save()
                        except PersistenceError:
                            _log.info("final checkpoint save failed", exc_info=True)
                tg.cancel_scope.cancel()

    async def _route(self, ctx: PartitionContext, event: StreamEvent) -> str | None:
        """The instance *event* goes to; ``None`` to ignore it (or if routing was poisoned)."""
        routed: str | None = None

        async def attempt() -> None:
            nonlocal routed
            instance_id = await self.handler.route_event_to_instance(event.message())
            if instance_id is not None and (not isinstance(instance_id, str) or not instance_id):
                raise _Bug(
                    f"{self.config.describe()}: route_event_to_instance() returned "
                    f"{instance_id!r}; expected a non-empty str or None"
                )
            routed = instance_id

        await self._with_retries(
            ctx,
            attempt,
            envelope=event.envelope,
            poison_key=f"{self.key}/event/{event.stream_id}/{event.offset}",
            stream=(event.stream_id, event.offset),
        )
        return routed

    async def _consume(
        self, ctx: PartitionContext, records: Keyspace, instance_id: str, event: StreamEvent
    ) -> None:
        async def invoke(root: _Root, scope: _ProcessScope) -> None:
            await self.handler.handle_event(root, cast(ProcessEventScope, scope), event.message())

        async def attempt() -> None:
            await self._handle(
                ctx,
                records,
                instance_id,
                event.envelope,
                invoke,
                make_scope=lambda root: ProcessEventScope(
                    self, ctx, instance_id, root, event.envelope, recorded_at=event.recorded_at
                ),
                stream=(event.stream_id, event.offset),
            )

        await self._with_retries(
            ctx,
            attempt,
            envelope=event.envelope,
            poison_key=f"{self.key}/event/{event.stream_id}/{event.offset}",
            stream=(event.stream_id, event.offset),
            instance_id=instance_id,
        )

    # -- deadlines --

    async def fire_deadline(self, ctx: PartitionContext, entry: DeadlineEntry) -> None:
        """Handle a due deadline (called by the home partition's timer), with retries."""
        envelope = decode(entry.envelope)
        name = process_store_name(self.app.identity.key, self.key)

        async def attempt() -> None:
            async with await ctx.provider.keyspaces.open(name) as records:

                async def invoke(root: _Root, scope: _ProcessScope) -> None:
                    await self.handler.handle_deadline(
                        root,
                        cast(ProcessDeadlineScope, scope),
                        cast(dogma.Deadline, to_message(envelope)),
                    )

                await self._handle(
                    ctx,
                    records,
                    entry.instance_id,
                    envelope,
                    invoke,
                    make_scope=lambda root: ProcessDeadlineScope(
                        self,
                        ctx,
                        entry.instance_id,
                        root,
                        envelope,
                        scheduled_for=entry.scheduled_for,
                    ),
                    deadline_id=entry.deadline_id,
                )

        await self._with_retries(
            ctx,
            attempt,
            envelope=envelope,
            poison_key=f"{self.key}/deadline/{entry.deadline_id}",
            instance_id=entry.instance_id,
        )

    # -- shared --

    async def _with_retries(
        self,
        ctx: PartitionContext,
        attempt: Callable[[], Awaitable[None]],
        *,
        envelope: Envelope,
        poison_key: str,
        stream: tuple[str, int] | None = None,
        instance_id: str | None = None,
    ) -> None:
        attempts = 0  # failures of the handler (count towards poisoning)
        store_failures = 0  # persistence failures (never poison: the store comes back)
        while True:
            try:
                await attempt()
                return
            except PersistenceError as exc:
                store_failures += 1
                _log.warning(
                    "%s: persistence error; retrying", self.config.describe(), exc_info=exc
                )
                await sleep_backoff(self.options, store_failures)
                continue
            except (_Bug, dogma.UnexpectedMessage, dogma.ValidationError) as exc:
                attempts += 1
                error: Exception = exc
                give_up = True
            except Exception as exc:
                attempts += 1
                error = exc
                give_up = attempts >= self.options.max_attempts
            what = f"{self.config.describe()} handling {envelope.description!r}"
            if not give_up:
                _log.warning("%s failed (attempt %d); retrying", what, attempts, exc_info=error)
                await sleep_backoff(self.options, attempts)
                continue
            _log.error("%s failed (attempt %d); poisoned", what, attempts, exc_info=error)
            await self._poison(
                ctx,
                poison_key,
                PoisonedMessage(
                    handler_key=self.key,
                    envelope=encode(envelope),
                    instance_id=instance_id,
                    stream_id=stream[0] if stream else None,
                    offset=stream[1] if stream else None,
                    error=f"{type(error).__qualname__}: {error}",
                    attempts=attempts,
                    poisoned_at=ctx.now(),
                ),
            )
            return

    async def _poison(self, ctx: PartitionContext, key: str, record: PoisonedMessage) -> None:
        name = event_poison_store_name(self.app.identity.key, ctx.index)
        attempts = 0
        while True:
            try:
                async with await ctx.provider.keyspaces.open(name) as poison:
                    await poison.set_unconditional(key.encode(), _encoder.encode(record))
                return
            except PersistenceError:
                attempts += 1
                _log.exception("cannot record poisoned message %s; retrying", key)
                await sleep_backoff(self.options, attempts)

    async def _handle(
        self,
        ctx: PartitionContext,
        records: Keyspace,
        instance_id: str,
        cause: Envelope,
        invoke: _Invoke,
        *,
        make_scope: Callable[[_Root], _ProcessScope],
        stream: tuple[str, int] | None = None,
        deadline_id: str | None = None,
    ) -> None:
        key = instance_id.encode()
        while True:
            record, revision = await self._load(records, key)
            if record.has_outbox:
                record, revision = await self._dispatch(ctx, records, key, record, revision)
            if record.ended:
                return  # an ended instance never handles again
            if stream is not None and record.positions.get(stream[0], -1) >= stream[1]:
                return  # already handled (redelivery)
            if deadline_id is not None and deadline_id not in record.pending_deadlines:
                return  # already handled, or cancelled by end()

            root = self.handler.new()
            if record.root is not None:
                root.unmarshal_binary(record.root)
            scope = make_scope(root)
            await invoke(root, scope)
            if scope.bug is not None:
                raise scope.bug  # the handler swallowed it; still a bug

            updated = _apply(record, scope, stream=stream, deadline_id=deadline_id)
            try:
                revision = await records.set(key, _encoder.encode(updated), revision)
            except Conflict:
                continue  # someone else wrote the instance: reload and handle again
            await self._dispatch(ctx, records, key, updated, revision)
            return

    async def _load(self, records: Keyspace, key: bytes) -> tuple[InstanceRecord, str]:
        data, revision = await records.get(key)
        if not data:
            return InstanceRecord(), revision
        return _record_decoder.decode(data), revision

    async def _dispatch(
        self,
        ctx: PartitionContext,
        records: Keyspace,
        key: bytes,
        record: InstanceRecord,
        revision: str,
    ) -> tuple[InstanceRecord, str]:
        """Send the outbox, then clear it; returns the record as stored afterwards.

        The handling is committed, so the outbox is never dropped and dispatch
        is retried until it succeeds (with capped backoff), holding up only
        this instance: other instances have their own workers. After
        ``max_attempts`` failures other than persistence errors (``accept``
        refusing a command, e.g. an aggregate's ``route_command_to_instance``
        raising) the problem is also recorded in the event poison store, so
        operators see it.
        """
        failures = 0
        store_failures = 0
        while True:
            try:
                return await self._dispatch_once(ctx, records, key, record, revision)
            except PersistenceError:
                store_failures += 1
                _log.warning(
                    "%s: persistence error dispatching the outbox of instance %r; retrying",
                    self.config.describe(),
                    key.decode(),
                    exc_info=True,
                )
                await sleep_backoff(self.options, store_failures)
            except Exception as exc:
                failures += 1
                if failures == self.options.max_attempts:
                    await self._outbox_stuck(ctx, key.decode(), record, exc, failures)
                else:
                    _log.warning(
                        "%s: cannot dispatch the outbox of instance %r (attempt %d); retrying",
                        self.config.describe(),
                        key.decode(),
                        failures,
                        exc_info=True,
                    )
                await sleep_backoff(self.options, failures)
            while True:
                try:
                    record, revision = await self._load(records, key)
                    break
                except PersistenceError:
                    store_failures += 1
                    await sleep_backoff(self.options, store_failures)

    async def _outbox_stuck(
        self,
        ctx: PartitionContext,
        instance_id: str,
        record: InstanceRecord,
        error: Exception,
        attempts: int,
    ) -> None:
        _log.error(
            "%s: cannot dispatch the outbox of instance %r after %d attempts; still retrying",
            self.config.describe(),
            instance_id,
            attempts,
            exc_info=error,
        )
        first = record.commands[0] if record.commands else record.deadlines[0].entry.envelope
        await self._poison(
            ctx,
            f"{self.key}/outbox/{instance_id}",
            PoisonedMessage(
                handler_key=self.key,
                envelope=first,
                instance_id=instance_id,
                stream_id=None,
                offset=None,
                error=f"{type(error).__qualname__}: {error}",
                attempts=attempts,
                poisoned_at=ctx.now(),
            ),
        )

    async def _dispatch_once(
        self,
        ctx: PartitionContext,
        records: Keyspace,
        key: bytes,
        record: InstanceRecord,
        revision: str,
    ) -> tuple[InstanceRecord, str]:
        while record.has_outbox:
            if record.commands:
                await ctx.accept([decode(c) for c in record.commands])
            by_home: dict[int, list[DeadlineEntry]] = {}
            for d in record.deadlines:
                by_home.setdefault(d.partition, []).append(d.entry)
            for home, entries in by_home.items():
                name = deadline_journal_name(self.app.identity.key, home)
                async with await ctx.provider.journals.open(name) as journal:
                    await append_deadlines(journal, entries)
                self._wake_timer(home)
            cleared = msgspec.structs.replace(record, commands=[], deadlines=[])
            try:
                revision = await records.set(key, _encoder.encode(cleared), revision)
                return cleared, revision
            except Conflict:
                # Written since we read it: whatever outbox it has now (perhaps
                # this one again, perhaps already cleared) is dispatched next.
                record, revision = await self._load(records, key)
        return record, revision


def _apply(
    record: InstanceRecord,
    scope: _ProcessScope,
    *,
    stream: tuple[str, int] | None,
    deadline_id: str | None,
) -> InstanceRecord:
    # The record's outbox is empty here (``_handle`` dispatches it first);
    # appending rather than replacing keeps that safe even if it were not.
    commands = [*record.commands, *(encode(c) for c in scope.commands)]
    positions = dict(record.positions)
    if stream is not None:
        positions[stream[0]] = stream[1]
    if scope.ended:
        # Drop the root and cancel every pending deadline (including any not
        # yet dispatched); commands executed before end() still go out.
        return InstanceRecord(ended=True, positions=positions, commands=commands)
    pending = [d for d in record.pending_deadlines if d != deadline_id]
    pending.extend(d.entry.deadline_id for d in scope.deadlines)
    return InstanceRecord(
        root=scope.root_bytes() if scope.mutated else record.root,
        positions=positions,
        pending_deadlines=pending,
        commands=commands,
        deadlines=[*record.deadlines, *scope.deadlines],
    )


class _InstanceQueues:
    """Runs each instance's events in order, different instances concurrently.

    ``put`` blocks while *limit* events are unfinished (back-pressure on the
    stream reader). The checkpoint follows the lowest unfinished offset, so a
    restart redelivers every event that was not finished.
    """

    def __init__(
        self,
        tg: anyio.abc.TaskGroup,
        consume: Callable[[str, StreamEvent], Awaitable[None]],
        checkpoint: _Checkpoint,
        *,
        limit: int,
    ) -> None:
        self._tg = tg
        self._consume = consume
        self._checkpoint = checkpoint
        self._slots = anyio.Semaphore(limit)
        self._queues: dict[str, deque[StreamEvent]] = {}
        self._unfinished: set[int] = set()
        self._read = checkpoint.value  # next offset after the last event put
        self._idle = anyio.Event()
        self._idle.set()

    async def put(self, instance_id: str | None, event: StreamEvent) -> None:
        """Queue *event* for *instance_id*; ``None`` marks it done at once (not handled)."""
        if instance_id is None:
            self._read = event.offset + 1
            self._advance()
            return
        await self._slots.acquire()
        # Only now is the event read: while we waited for a slot, a finishing
        # worker must not move the checkpoint past it.
        self._read = event.offset + 1
        if not self._unfinished:
            self._idle = anyio.Event()
        self._unfinished.add(event.offset)
        queue = self._queues.get(instance_id)
        if queue is not None:
            queue.append(event)  # its worker is running and will get to it
            return
        self._queues[instance_id] = deque([event])
        self._tg.start_soon(self._work, instance_id)

    async def join(self) -> None:
        """Wait until every queued event is finished."""
        await self._idle.wait()

    async def _work(self, instance_id: str) -> None:
        queue = self._queues[instance_id]
        while queue:
            event = queue[0]
            await self._consume(instance_id, event)
            queue.popleft()
            self._unfinished.discard(event.offset)
            self._slots.release()
            self._advance()
        # No await since the last check: nothing was queued after it.
        del self._queues[instance_id]

    def _advance(self) -> None:
        self._checkpoint.value = min(self._unfinished, default=self._read)
        if not self._unfinished:
            self._idle.set()


class _Checkpoint:
    """A process consumer's stream offset, saved with conditional writes in the background."""

    def __init__(self, store: Keyspace, key: bytes) -> None:
        self._store = store
        self._key = key
        self._revision = ""
        self._saved = 0
        self.value = 0

    async def load(self) -> None:
        data, self._revision = await self._store.get(self._key)
        self.value = self._saved = _int_decoder.decode(data) if data else 0

    async def save(self) -> None:
        if self.value <= self._saved:
            return
        value = self.value
        try:
            self._revision = await self._store.set(
                self._key, _encoder.encode(value), self._revision
            )
            self._saved = value
        except Conflict:
            # Another owner wrote it (we may have lost the partition): take its
            # revision and let the next save decide.
            data, self._revision = await self._store.get(self._key)
            self._saved = _int_decoder.decode(data) if data else 0

    async def save_periodically(self, interval: float) -> None:
        while True:
            await anyio.sleep(interval)
            try:
                await self.save()
            except PersistenceError:
                _log.warning("cannot save checkpoint %r; will retry", self._key, exc_info=True)


if TYPE_CHECKING:
    # Static proof that the scopes implement dogma's protocols.
    _event_scope: type[dogma.ProcessEventScope[Any]] = ProcessEventScope
    _deadline_scope: type[dogma.ProcessDeadlineScope[Any]] = ProcessDeadlineScope
