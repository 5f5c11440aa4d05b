"""Process instances: routing, handling, and one commit per instance per batch (ADR 0006).

One consumer runs per (process handler, owned partition). It routes the events
of routed types in stream order (``route_event_to_instance``; ``None`` =
ignore), then queues each for its instance. A worker per instance takes
*everything* queued for the instance so far (e.g. all its events in one stream
record) and handles it as one group, so one instance's events are handled in
order and different instances concurrently (at most ``process_concurrency``
events unfinished). For a group the worker:

1. takes the instance from the node's ``InstanceCache`` (record, revision and
   live root; ``process_instances.py``), or on a miss reads the record from
   ``<app>/process/<handler-key>`` and first dispatches any outbox still in it
   (a crash, another node or an undone clear left it there);
2. skips the events the record says are done: the instance has ended, or
   already handled this stream at this offset or later;
3. calls ``handle_event`` for each remaining event, in order, against the same
   root, each with its own ``ProcessEventScope``;
4. commits the whole group with ONE conditional write of the record: the root
   (only if ``mutate`` was called), the ended flag, this stream's position,
   the IDs of the pending deadlines, and an outbox with the commands and
   deadlines the group produced. The previous outbox is left out: it was
   dispatched before the group was handled. On ``Conflict`` (another node's
   consumer, a stale owner) the entry is dropped and the group handled again
   against the stored record;
5. dispatches the new outbox (commands through ``ctx.accept`` with IDs derived
   from the cause, deadlines appended to the home partition's deadline
   journal) and caches the instance. It does not write the record again: the
   next commit drops the dispatched outbox, and if none comes within a
   checkpoint interval the consumer writes the record without it then.

If handling one event of a group fails, nothing of the group is committed and
its events are handled again one at a time, each with the retries below.
Deadlines fire one at a time through the same path (``fire_deadline``).

Every step can be repeated: produced commands have deterministic IDs (the
commands side deduplicates by ID), a deadline fires only while its ID is in the
record's pending list, and a record loaded with an outbox is dispatched before
it is used. Cached state is trusted only where it cannot be out of date (an
ended instance, a stream position); a deadline the cached record does not list
as pending is checked against a fresh read. The stream checkpoint in
``<app>/checkpoints`` only bounds redelivery after a restart, so it is written
in the background; it follows the lowest unfinished offset.

Events are handled by the consumer of the stream they are in, not routed to
the instance's home partition: one instance may be written from several
partitions (on one node they share the cache and take turns; across nodes the
conditional write decides). ADR 0006 says why.

Failures: a handler error is retried with capped backoff; after
``max_attempts`` attempts the message is recorded in the partition's
event poison store (``<app>/event-poison/<p>``) and the consumer moves on.
``dogma.UnexpectedMessage``, an invalid produced message, a produced message of
a type the handler has no route for (or no enabled handler handles), or an
empty instance ID are bugs: they are poisoned at once. Persistence errors are
retried for ever.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, cast

import anyio
import attrs
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
from .logs import LogContext, RateLimitedLog, describe_error
from .partitions import instance_workload
from .process_instances import (
    CachedInstance,
    InstanceCache,
    InstanceRecord,
    OutboxDeadline,
    ProcessRoot,
)

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
# Store failures repeat for as long as an outage lasts: one line per handler and
# partition per interval.
_store_log = RateLimitedLog(_log, 10.0)


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


_Root = ProcessRoot


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
        self._cache = InstanceCache(options.process_cache_size)

    # -- events --

    async def run(self, ctx: PartitionContext) -> None:
        """Consume the partition stream for this handler until cancelled.

        Events are routed in stream order, one at a time; then each instance's
        events are handled in order by a worker of that instance, which takes
        all of them queued so far as one group (one commit), up to
        ``process_concurrency`` events in flight. The checkpoint never passes
        an event that is not finished. Dispatched outboxes of idle instances
        are cleared every ``checkpoint_interval``. A persistence error outside handling
        (loading the checkpoint, reading the stream) restarts the consumer
        from its stored checkpoint after a backoff.
        """
        failures = 0
        while True:
            try:
                await self._run_once(ctx)
                return
            except PersistenceError as exc:
                failures += 1
                _store_log.warning(
                    (self.key, ctx.index),
                    "%s on partition %d: persistence error; restarting the consumer: %s",
                    self.config.describe(),
                    ctx.index,
                    describe_error(exc),
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
                tg.start_soon(self._clear_outboxes_periodically, ctx, records)
                queues = _InstanceQueues(
                    tg,
                    lambda instance_id, events: self._consume(ctx, records, instance_id, events),
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
                    # Best effort: a lagging checkpoint only means harmless
                    # redelivery, an outbox left in a record a harmless dispatch.
                    with anyio.move_on_after(1, shield=True):
                        try:
                            await checkpoint.save()
                        except PersistenceError:
                            _log.info("final checkpoint save failed", exc_info=True)
                        try:
                            await self._clear_outboxes(ctx, records, None)
                        except PersistenceError:
                            _log.info("final clear of dispatched outboxes failed", exc_info=True)
                    # Partition lost or consumer restarting: another node may
                    # write these instances next.
                    self._cache.drop_partition(ctx.index)
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

    def _event_step(self, ctx: PartitionContext, instance_id: str, event: StreamEvent) -> _Step:
        async def invoke(root: _Root, scope: _ProcessScope) -> None:
            await self.handler.handle_event(root, cast(ProcessEventScope, scope), event.message())

        return _Step(
            cause=event.envelope,
            invoke=invoke,
            make_scope=lambda root: ProcessEventScope(
                self, ctx, instance_id, root, event.envelope, recorded_at=event.recorded_at
            ),
            stream=(event.stream_id, event.offset),
        )

    async def _consume(
        self,
        ctx: PartitionContext,
        records: Keyspace,
        instance_id: str,
        events: list[StreamEvent],
    ) -> None:
        """Handle *events* of one instance (in stream order), committed with one write.

        If the handler fails on one of them, the events before it are handled
        again and committed as a group, the failing one gets the retries (and
        poisoning) it would get alone, its first failure counted, and the
        events after it are handled as the next group.
        """
        rest = events
        store_failures = 0
        while len(rest) > 1:
            steps = [self._event_step(ctx, instance_id, e) for e in rest]
            try:
                await self._handle(ctx, records, instance_id, steps)
                return
            except PersistenceError as exc:
                store_failures += 1
                _store_log.warning(
                    (self.key, ctx.index),
                    "%s on partition %d: persistence error handling %d events of instance %r; "
                    "retrying: %s",
                    self.config.describe(),
                    ctx.index,
                    len(rest),
                    instance_id,
                    describe_error(exc),
                )
                await sleep_backoff(self.options, store_failures)
                continue
            except _StepFailed as failed:
                index, error = failed.index, failed.error
            if index > 0:
                # The failing event may have changed the root already.
                await self._consume(ctx, records, instance_id, rest[:index])
            await self._consume_one(ctx, records, instance_id, rest[index], failed=error)
            rest = rest[index + 1 :]
        if rest:
            await self._consume_one(ctx, records, instance_id, rest[0])

    async def _consume_one(
        self,
        ctx: PartitionContext,
        records: Keyspace,
        instance_id: str,
        event: StreamEvent,
        *,
        failed: Exception | None = None,
    ) -> None:
        step = self._event_step(ctx, instance_id, event)

        async def attempt() -> None:
            await self._handle(ctx, records, instance_id, [step])

        await self._with_retries(
            ctx,
            attempt,
            envelope=event.envelope,
            poison_key=f"{self.key}/event/{event.stream_id}/{event.offset}",
            stream=(event.stream_id, event.offset),
            instance_id=instance_id,
            failed=failed,
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

                step = _Step(
                    cause=envelope,
                    invoke=invoke,
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
                await self._handle(ctx, records, entry.instance_id, [step])

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
        failed: Exception | None = None,
    ) -> None:
        """Run *attempt* until it succeeds or the message is poisoned.

        *failed* is the error of a first attempt made already (in a group).
        """
        attempts = 0  # failures of the handler (count towards poisoning)
        store_failures = 0  # persistence failures (never poison: the store comes back)
        about = LogContext.of_message(envelope, partition=ctx.index, instance_id=instance_id)
        first_failure = failed

        async def run() -> None:
            nonlocal first_failure
            if first_failure is not None:
                made, first_failure = first_failure, None
                raise made
            await attempt()

        while True:
            try:
                await run()
                return
            except PersistenceError as exc:
                store_failures += 1
                _store_log.warning(
                    (self.key, ctx.index),
                    "%s: persistence error; retrying (%s): %s",
                    self.config.describe(),
                    about,
                    describe_error(exc),
                    extra=about.extra,
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
                _log.warning(
                    "%s failed (attempt %d of %d); retrying (%s): %s",
                    what,
                    attempts,
                    self.options.max_attempts,
                    about,
                    describe_error(error),
                    extra=about.extra,
                )
                await sleep_backoff(self.options, attempts)
                continue
            # The traceback once, on the line that says where the message went.
            _log.error(
                "%s failed (attempt %d); moving it to the poison store (%s): %s",
                what,
                attempts,
                about,
                describe_error(error),
                exc_info=error,
                extra=about.extra,
            )
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
            except PersistenceError as exc:
                attempts += 1
                _store_log.warning(
                    (self.key, ctx.index, "poison"),
                    "%s on partition %d: cannot record poisoned message %s; retrying: %s",
                    self.config.describe(),
                    ctx.index,
                    key,
                    describe_error(exc),
                )
                await sleep_backoff(self.options, attempts)

    async def _handle(
        self,
        ctx: PartitionContext,
        records: Keyspace,
        instance_id: str,
        steps: list[_Step],
    ) -> None:
        """Handle *steps* in order against the instance, commit them with one write, dispatch."""
        key = instance_id.encode()
        async with self._cache.lock(instance_id):
            entry = self._cache.get(instance_id)
            # Handling changes the root in place: the entry goes back only once
            # its commit and dispatch are done, so every failure leaves it out.
            self._cache.drop(instance_id)
            while True:
                fresh = entry is None
                if entry is None:
                    entry = await self._load(ctx, records, key)
                try:
                    record = await _handle_steps(entry, steps, fresh=fresh)
                except _Stale:
                    entry = None
                    continue
                if record is None:  # nothing left to handle: all done before, or ended
                    self._cache.put(instance_id, entry)
                    return
                try:
                    revision = await records.set(key, _encoder.encode(record), entry.revision)
                except Conflict:
                    # Written since we read it (another node's consumer, a stale
                    # owner): handle the steps again against what is stored.
                    entry = None
                    continue
                await self._dispatch(ctx, instance_id, record)
                dispatched_at = anyio.current_time() if record.has_outbox else None
                self._cache.put(
                    instance_id,
                    CachedInstance(record, revision, entry.root, ctx.index, dispatched_at),
                )
                return

    async def _load(self, ctx: PartitionContext, records: Keyspace, key: bytes) -> CachedInstance:
        """Read the instance record, dispatch any outbox still in it, decode the root."""
        data, revision = await records.get(key)
        record = _record_decoder.decode(data) if data else InstanceRecord()
        dispatched_at = None
        if record.has_outbox:
            # Perhaps dispatched already (by whoever wrote it); perhaps not (a
            # crash before dispatch). Dispatching again is harmless.
            await self._dispatch(ctx, key.decode(), record)
            dispatched_at = anyio.current_time()
        root = self.handler.new()
        if record.root is not None:
            root.unmarshal_binary(record.root)
        return CachedInstance(record, revision, root, ctx.index, dispatched_at)

    async def _clear_outboxes_periodically(self, ctx: PartitionContext, records: Keyspace) -> None:
        """Every checkpoint interval, clear outboxes dispatched at least an interval ago."""
        interval = self.options.checkpoint_interval
        while True:
            await anyio.sleep(interval)
            try:
                await self._clear_outboxes(ctx, records, anyio.current_time() - interval)
            except PersistenceError as exc:
                _store_log.warning(
                    (self.key, ctx.index),
                    "%s on partition %d: cannot clear dispatched outboxes; will retry: %s",
                    self.config.describe(),
                    ctx.index,
                    describe_error(exc),
                )

    async def _clear_outboxes(
        self, ctx: PartitionContext, records: Keyspace, dispatched_before: float | None
    ) -> None:
        """Write the records of idle cached instances without their dispatched outbox.

        Instances that commit again soon drop the outbox in that commit; this
        covers the others (an ended instance never commits again), so a later
        load does not dispatch the outbox again long after (``None``: all).
        """
        before = math.inf if dispatched_before is None else dispatched_before
        for instance_id in self._cache.due_clears(ctx.index, before):
            if self._cache.busy(instance_id):
                continue  # being handled: its commit drops the outbox anyway
            async with self._cache.lock(instance_id):
                entry = self._cache.get(instance_id)
                if entry is None or entry.dispatched_at is None or entry.partition != ctx.index:
                    continue
                self._cache.drop(instance_id)
                cleared = entry.record.without_outbox()
                key = instance_id.encode()
                try:
                    revision = await records.set(key, _encoder.encode(cleared), entry.revision)
                except Conflict:
                    continue  # written since: the writer's record is the one to use
                except PersistenceError:
                    # Perhaps written: read back which record is stored.
                    data, revision = await records.get(key)
                    stored = _record_decoder.decode(data) if data else None
                    if stored == entry.record:  # not written: try again next time
                        self._cache.put(instance_id, attrs.evolve(entry, revision=revision))
                        continue
                    if stored != cleared:
                        continue  # someone else wrote it
                self._cache.put(
                    instance_id,
                    attrs.evolve(entry, record=cleared, revision=revision, dispatched_at=None),
                )

    async def _dispatch(
        self, ctx: PartitionContext, instance_id: str, record: InstanceRecord
    ) -> None:
        """Send the committed outbox of *record*: commands, then deadlines.

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
                await self._dispatch_once(ctx, record)
                return
            except PersistenceError as exc:
                store_failures += 1
                _store_log.warning(
                    (self.key, ctx.index),
                    "%s on partition %d: persistence error dispatching the outbox of "
                    "instance %r; retrying: %s",
                    self.config.describe(),
                    ctx.index,
                    instance_id,
                    describe_error(exc),
                )
                await sleep_backoff(self.options, store_failures)
            except Exception as exc:
                failures += 1
                if failures == self.options.max_attempts:
                    await self._outbox_stuck(ctx, instance_id, record, exc, failures)
                else:
                    _log.warning(
                        "%s on partition %d: cannot dispatch the outbox of instance %r "
                        "(attempt %d); retrying: %s",
                        self.config.describe(),
                        ctx.index,
                        instance_id,
                        failures,
                        describe_error(exc),
                    )
                await sleep_backoff(self.options, failures)

    async def _outbox_stuck(
        self,
        ctx: PartitionContext,
        instance_id: str,
        record: InstanceRecord,
        error: Exception,
        attempts: int,
    ) -> None:
        _log.error(
            "%s on partition %d: cannot dispatch the outbox of instance %r after %d "
            "attempts; still retrying, and recording it in the poison store: %s",
            self.config.describe(),
            ctx.index,
            instance_id,
            attempts,
            describe_error(error),
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

    async def _dispatch_once(self, ctx: PartitionContext, record: InstanceRecord) -> None:
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


@attrs.frozen
class _Step:
    """One message to handle for an instance: an event (``stream``) or a deadline."""

    cause: Envelope
    invoke: _Invoke
    make_scope: Callable[[_Root], _ProcessScope]
    stream: tuple[str, int] | None = None
    deadline_id: str | None = None


class _StepFailed(Exception):
    """Handling step *index* of several failed with *error*; nothing was committed."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


class _Stale(Exception):
    """A cached record cannot tell whether a deadline is pending: read it again."""


async def _invoke(step: _Step, root: _Root, scope: _ProcessScope) -> None:
    await step.invoke(root, scope)
    if scope.bug is not None:
        raise scope.bug  # the handler swallowed it; still a bug


async def _handle_steps(
    entry: CachedInstance, steps: list[_Step], *, fresh: bool
) -> InstanceRecord | None:
    """Handle *steps* in order against the entry's root; the record to commit (``None``: none).

    The result's outbox holds only what these steps produced: the entry's own
    outbox is dispatched already. Raises ``_Stale`` if a deadline is not
    pending in a cached (not *fresh*) record, and what a handler raises
    (wrapped in ``_StepFailed`` when there are several steps).
    """
    record = entry.record
    root = entry.root
    ended = record.ended
    positions = dict(record.positions)
    pending = list(record.pending_deadlines)
    commands: list[bytes] = []
    deadlines: list[OutboxDeadline] = []
    mutated = handled = False
    for index, step in enumerate(steps):
        if ended:
            break  # an ended instance never handles again
        if step.stream is not None and positions.get(step.stream[0], -1) >= step.stream[1]:
            continue  # already handled (redelivery)
        if step.deadline_id is not None and step.deadline_id not in pending:
            if not fresh:
                raise _Stale  # another node may have scheduled it since we cached the record
            continue  # already handled, or cancelled by end()
        scope = step.make_scope(root)
        try:
            await _invoke(step, root, scope)
        except PersistenceError:
            raise
        except Exception as exc:
            if len(steps) == 1:
                raise
            raise _StepFailed(index, exc) from exc
        handled = True
        mutated = mutated or scope.mutated
        commands.extend(encode(c) for c in scope.commands)
        if step.stream is not None:
            positions[step.stream[0]] = step.stream[1]
        if scope.ended:
            # Drop the root and cancel every pending deadline (including those
            # this group scheduled); commands executed before end() still go out.
            ended = True
            continue
        pending = [d for d in pending if d != step.deadline_id]
        pending.extend(d.entry.deadline_id for d in scope.deadlines)
        deadlines.extend(scope.deadlines)
    if not handled:
        return None
    if ended:
        return InstanceRecord(ended=True, positions=positions, commands=commands)
    return InstanceRecord(
        root=root.marshal_binary() if mutated else record.root,
        positions=positions,
        pending_deadlines=pending,
        commands=commands,
        deadlines=deadlines,
    )


class _InstanceQueues:
    """Runs each instance's events in order, different instances concurrently.

    A worker per instance takes everything queued for the instance so far and
    hands it to *consume* as one group (committed with one write). ``put``
    blocks while *limit* events are unfinished (back-pressure on the stream
    reader); it does not yield while a slot is free, so the events of one
    stream record are all queued before a worker starts on them. The
    checkpoint follows the lowest unfinished offset, so a restart redelivers
    every event that was not finished.
    """

    def __init__(
        self,
        tg: anyio.abc.TaskGroup,
        consume: Callable[[str, list[StreamEvent]], Awaitable[None]],
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
        try:
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
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
            group = list(queue)
            await self._consume(instance_id, group)
            for event in group:
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
