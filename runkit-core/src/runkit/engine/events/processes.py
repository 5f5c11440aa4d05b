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
5. dispatches the new outbox (deadlines appended to the home partition's
   deadline journal, then commands through ``ctx.accept`` with IDs derived
   from the cause) and caches the instance. It does not write the record again: the
   next commit drops the dispatched outbox, and if none comes within a
   checkpoint interval the consumer writes the record without it then
   (dispatching and clearing: ``process_outbox.py``).

If handling one event of a group fails, nothing of the group is committed and
its events are handled again one at a time, each with the retries below.
Deadlines fire through the same path (``fire_deadline``), one at a time per
instance, different instances concurrently (``DeadlineTimer``).

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
retried for ever. The retries and the poison store writes are in
``process_retries.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import anyio
import attrs
import msgspec

import dogma

from ...config import ApplicationConfig, HandlerConfig, RouteKind
from ...persistence import Conflict, Keyspace, LimitExceeded, PersistenceError
from ..envelope import UNDECODABLE, Envelope, RoutedMessages, decode, to_message
from ..logs import describe_error
from .consumers_support import ConsumerOptions, Restarts, close_iterator, sleep_backoff
from .deadlines import DeadlineEntry
from .process_deliveries import Delivery
from .process_instances import (
    CachedInstance,
    InstanceCache,
    OutboxDeadline,
    ProcessRecord,
    ProcessRoot,
)
from .process_outbox import OutboxDispatcher
from .process_queues import ConsumerCheckpoint, InstanceQueues
from .process_retries import MessageRetries
from .process_retries import process_log as _log
from .process_retries import process_store_log as _store_log
from .process_scopes import (
    ProcessBug,
    ProcessDeadlineScope,
    ProcessEventScope,
    ProcessHandler,
    ProcessScope,
)
from .process_steps import StaleRecord, Step, StepFailed, handle_steps
from .process_stores import (
    PoisonedMessage,
    checkpoint_key,
    checkpoints_store_name,
    poison_error,
    process_store_name,
)

if TYPE_CHECKING:
    from ..partitions import PartitionContext
    from ..streams import ProcessStep, StreamEvent

__all__ = ["ProcessRunner"]

_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(ProcessRecord)
_entry_decoder = msgspec.msgpack.Decoder(DeadlineEntry)


# --- the runner -----------------------------------------------------------------------


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
        self.handler = cast(ProcessHandler, config.handler)
        self.options = options
        self.routed = frozenset(t.id for t in config.types_of(RouteKind.HANDLES_EVENT))
        self.executes = frozenset(t.cls for t in config.types_of(RouteKind.EXECUTES_COMMAND))
        self.schedules = frozenset(t.cls for t in config.types_of(RouteKind.SCHEDULES_DEADLINE))
        self._cache = InstanceCache(options.process_cache_size)
        # What routing decoded, for each event's first handling: one decode per event.
        self._routed = RoutedMessages()
        self._retries = MessageRetries(app.identity.key, config, options)
        self._outbox = OutboxDispatcher(
            app.identity.key,
            config,
            options=options,
            cache=self._cache,
            retries=self._retries,
            wake_timer=wake_timer,
        )

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
        restarts = Restarts(self.options)
        while True:
            restarts.begin()
            try:
                await self._run_once(ctx)
                return
            except PersistenceError as exc:
                _store_log.warning(
                    (self.key, ctx.index),
                    "%s on partition %d: persistence error; restarting the consumer: %s",
                    self.config.describe(),
                    ctx.index,
                    describe_error(exc),
                )
                await restarts.failed()

    async def _run_once(self, ctx: PartitionContext) -> None:
        app_key = self.app.identity.key
        async with (
            await ctx.provider.keyspaces.open(process_store_name(app_key, self.key)) as records,
            await ctx.provider.keyspaces.open(checkpoints_store_name(app_key)) as checkpoints,
        ):
            checkpoint = ConsumerCheckpoint(
                checkpoints,
                checkpoint_key(self.key, ctx.partition_id),
                lambda: self._cache.hold_floor(ctx.index),
            )
            await checkpoint.load()
            async with anyio.create_task_group() as tg:
                tg.start_soon(checkpoint.save_periodically, self.options.checkpoint_interval)
                tg.start_soon(self._outbox.clear_outboxes_periodically, ctx, records)
                queues = InstanceQueues(
                    tg,
                    lambda instance_id, events: self._consume_group(
                        ctx, records, instance_id, events
                    ),
                    checkpoint,
                    limit=self.options.process_concurrency,
                )
                # Only the routed types wake this consumer; the checkpoint
                # passes the other events while it waits (``skip_to``).
                events = ctx.stream.read(
                    checkpoint.value, types=self.routed, on_skip=queues.skip_to
                )
                try:
                    async for event in events:
                        if event.offset < checkpoint.value:
                            continue
                        await queues.put(await self._route(ctx, event), event)
                    await queues.join()  # the stream ended (test streams only)
                finally:
                    await close_iterator(events)
                    # Best effort: a lagging checkpoint only means harmless
                    # redelivery. Outboxes first: the checkpoint saved next
                    # stays below the events of any left in their records, so
                    # the next owner delivers them again and clears them.
                    with anyio.move_on_after(1, shield=True):
                        await self._outbox.clear_all_outboxes(ctx, records)
                    with anyio.move_on_after(1, shield=True):
                        try:
                            await checkpoint.save()
                        except PersistenceError as exc:
                            _log.info(
                                "%s on partition %d: final checkpoint save failed (the next "
                                "owner redelivers from the last saved one): %s",
                                self.config.describe(),
                                ctx.index,
                                describe_error(exc),
                            )
                    # Partition lost or consumer restarting: another node may
                    # write these instances next.
                    self._cache.drop_partition(ctx.index)
                tg.cancel_scope.cancel()

    async def _route(self, ctx: PartitionContext, event: StreamEvent) -> str | None:
        """The instance *event* goes to; ``None`` to ignore it (or if routing was poisoned).

        The message routing was given is kept for the event's first handling.
        """
        routed: str | None = None
        message: dogma.Event | None = None

        async def attempt() -> None:
            nonlocal routed, message
            message = event.message()  # a fresh copy for each attempt
            instance_id = await self.handler.route_event_to_instance(message)
            if instance_id is not None and (not isinstance(instance_id, str) or not instance_id):
                raise ProcessBug(
                    f"{self.config.describe()}: route_event_to_instance() returned "
                    f"{instance_id!r}; expected a non-empty str or None"
                )
            routed = instance_id

        await self._retries.run(
            ctx,
            attempt,
            envelope=event.envelope,
            poison_key=f"{self.key}/event/{event.stream_id}/{event.offset}",
            stream=(event.stream_id, event.offset),
        )
        if routed is not None and message is not None:
            self._routed.keep(event.envelope, message)
        return routed

    def _event_step(self, ctx: PartitionContext, instance_id: str, event: StreamEvent) -> Step:
        """The step handling *event*: its first call takes the message routing
        was given, every later one (a retry, the group handled again) gets a
        fresh copy."""

        async def invoke(root: ProcessRoot, scope: ProcessScope) -> None:
            message = cast(dogma.Event, self._routed.take(event.envelope))
            await self.handler.handle_event(root, cast(ProcessEventScope, scope), message)

        return Step(
            cause=event.envelope,
            invoke=invoke,
            make_scope=lambda root: ProcessEventScope(
                self, ctx, instance_id, root, event.envelope, recorded_at=event.recorded_at
            ),
            stream=(event.stream_id, event.offset),
        )

    async def _consume_group(
        self,
        ctx: PartitionContext,
        records: Keyspace,
        instance_id: str,
        events: list[StreamEvent],
    ) -> None:
        """``_consume``, then drop the routed messages its skipped events left."""
        try:
            await self._consume(ctx, records, instance_id, events)
        finally:
            for event in events:
                self._routed.discard(event.envelope)

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
            except LimitExceeded:
                # The same on every attempt (a key the store cannot hold, or
                # the group's record over its value limit): handle each event
                # alone, where it fits or is poisoned.
                for event in rest:
                    await self._consume_one(ctx, records, instance_id, event)
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
            except StepFailed as failed:
                index, error = failed.index, failed.error
            except Exception:
                # Not one step's failure (marshal_binary() of the group's root,
                # unmarshal_binary() of the stored one): nothing was committed;
                # handle each event alone, with its own retries and poisoning.
                for event in rest:
                    await self._consume_one(ctx, records, instance_id, event)
                return
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

        await self._retries.run(
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
        """Handle a due deadline (called by the home partition's timer), with retries.

        An entry whose envelope cannot be decoded goes to the poison store as
        it is: raised, it would stop the partition at every restart.
        """
        poison_key = f"{self.key}/deadline/{entry.deadline_id}"
        try:
            envelope = decode(entry.envelope)
        except UNDECODABLE as exc:
            _log.error(
                "%s on partition %d: deadline %s of instance %r cannot be decoded; "
                "moving it to the poison store: %s",
                self.config.describe(),
                ctx.index,
                entry.deadline_id,
                entry.instance_id,
                exc,
            )
            await self._retries.poison(
                ctx,
                poison_key,
                PoisonedMessage(
                    handler_key=self.key,
                    envelope=entry.envelope,
                    instance_id=entry.instance_id,
                    stream_id=None,
                    offset=None,
                    error=poison_error(exc),
                    attempts=1,
                    poisoned_at=ctx.now(),
                ),
            )
            return
        name = process_store_name(self.app.identity.key, self.key)

        async def attempt() -> None:
            async with await ctx.provider.keyspaces.open(name) as records:

                async def invoke(root: ProcessRoot, scope: ProcessScope) -> None:
                    await self.handler.handle_deadline(
                        root,
                        cast(ProcessDeadlineScope, scope),
                        cast(dogma.Deadline, to_message(envelope)),
                    )

                step = Step(
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
                handled = await self._handle(ctx, records, entry.instance_id, [step])
                await self._outbox.clear_now(ctx, records, entry.instance_id, handled)

        await self._retries.run(
            ctx,
            attempt,
            envelope=envelope,
            poison_key=poison_key,
            instance_id=entry.instance_id,
        )

    # -- steps in the home partition (ADR 0010; ``process_homes.HomeHandler``) --

    async def route_event(self, ctx: PartitionContext, event: StreamEvent) -> str | None:
        """The instance *event* goes to (``None``: none), with retries and poisoning.

        For the routing consumer (``process_routing``); the message routing
        was given is kept for the event's first handling on this node.
        """
        return await self._route(ctx, event)

    def forget_routed(self, envelope: Envelope) -> None:
        """The event is handled on another node: drop the message kept for it."""
        self._routed.discard(envelope)

    @property
    def retries(self) -> MessageRetries:
        """The handler's retries and poisoning (shared with the home partitions)."""
        return self._retries

    async def invoke_delivery(
        self, ctx: PartitionContext, delivery: Delivery, root: ProcessRoot
    ) -> ProcessScope:
        """Call the handler for *delivery* against *root* (in its home partition *ctx*).

        Returns the scope with what the handling produced; raises what the
        handler raised, or the bug it swallowed. An event's first handling on
        this node takes the message its routing was given.
        """
        scope: ProcessScope
        if delivery.stream is not None:
            event_scope = ProcessEventScope(
                self, ctx, delivery.instance_id, root, delivery.envelope, recorded_at=delivery.at
            )
            message = cast(dogma.Event, self._routed.take(delivery.envelope))
            await self.handler.handle_event(root, event_scope, message)
            scope = event_scope
        else:
            deadline_scope = ProcessDeadlineScope(
                self, ctx, delivery.instance_id, root, delivery.envelope, scheduled_for=delivery.at
            )
            deadline = cast(dogma.Deadline, to_message(delivery.envelope))
            await self.handler.handle_deadline(root, deadline_scope, deadline)
            scope = deadline_scope
        if scope.bug is not None:
            raise scope.bug  # the handler swallowed it; still a bug
        return scope

    def root_from(self, data: bytes | None) -> ProcessRoot:
        """A live root from its ``marshal_binary()`` (a new one for ``None``)."""
        root = self.handler.new()
        if data is not None:
            root.unmarshal_binary(data)
        return root

    async def dispatch_record(
        self, ctx: PartitionContext, instance_id: str, record: ProcessRecord
    ) -> None:
        """Dispatch the outbox of a record written by the ADR 0006 design (found by a load)."""
        await self._outbox.dispatch(ctx, instance_id, record)

    async def dispatch_step(
        self, ctx: PartitionContext, instance_id: str, step: ProcessStep
    ) -> None:
        """Dispatch a committed step's outbox: deadlines to *ctx*'s own journal, then commands.

        Retries until done, as an ADR 0006 outbox (``OutboxDispatcher.dispatch``).
        """
        record = ProcessRecord(
            commands=list(step.commands),
            deadlines=[
                OutboxDeadline(partition=ctx.index, entry=_entry_decoder.decode(d))
                for d in step.deadlines
            ],
        )
        await self._outbox.dispatch(ctx, instance_id, record)

    # -- shared --

    async def _handle(
        self,
        ctx: PartitionContext,
        records: Keyspace,
        instance_id: str,
        steps: list[Step],
    ) -> CachedInstance:
        """Handle *steps* in order against the instance, commit them with one write, dispatch.

        Returns the instance as handled (cached, unless its partition was
        dropped meanwhile).
        """
        async with self._cache.lock(instance_id):
            # Handling changes the root in place: the entry goes back only once
            # its commit and dispatch are done. Until then a dirty one still
            # holds its partition's checkpoint, and if anything fails it goes
            # back as it was, with the stored root (``restore``): dropped, its
            # dispatched outbox would never be cleared and the next load,
            # however much later, would dispatch it again (ADR 0006).
            epoch = self._cache.epoch(ctx.index)
            entry = self._cache.take(instance_id)
            try:
                return await self._handle_taken(
                    ctx, records, instance_id, steps, entry=entry, epoch=epoch
                )
            finally:
                self._cache.restore(instance_id, self._root_of)

    async def _handle_taken(
        self,
        ctx: PartitionContext,
        records: Keyspace,
        instance_id: str,
        steps: list[Step],
        *,
        entry: CachedInstance | None,
        epoch: int,
    ) -> CachedInstance:
        """``_handle`` with the instance locked and taken out of the cache.

        *epoch* is ``ctx``'s partition's when the handling began: what this
        handling caches is not kept if the partition was dropped since.
        """
        key = instance_id.encode()
        stale: CachedInstance | None = None
        # The epoch of the entry's partition when it was obtained.
        entry_epoch = epoch if entry is None else self._cache.epoch(entry.partition)
        stale_epoch = entry_epoch
        while True:
            fresh = entry is None
            if entry is None:
                entry = await self._load(ctx, records, key, stale)
                # The stale entry comes back if unchanged, with its partition.
                entry_epoch = stale_epoch if entry is stale else epoch
            try:
                record = await handle_steps(entry, steps, fresh=fresh)
            except StaleRecord:
                # Raised before any step ran (a deadline's step is alone in its
                # group), so the cached root is unchanged and may be reused.
                entry, stale, stale_epoch = None, entry, entry_epoch
                continue
            except BaseException:
                # The handler failed (or was cancelled). An entry loaded here
                # with an outbox (dispatched by the load) goes back with the
                # stored root, to be cleared; a taken one is restored by the
                # caller.
                if fresh and entry.dirty and entry.partition == ctx.index:
                    with contextlib.suppress(Exception):
                        root = self._root_of(entry.record)
                        self._cache.put(instance_id, attrs.evolve(entry, root=root), entry_epoch)
                raise
            if record is None:  # nothing left to handle: all done before, or ended
                if entry.dirty and entry.held is None and entry.partition == ctx.index:
                    # Loaded with an outbox and dispatched it: these events
                    # are redelivered until it is cleared.
                    entry = attrs.evolve(entry, held=_lowest_offset(steps))
                self._cache.put(instance_id, entry, entry_epoch)
                return entry
            try:
                revision = await records.set(key, _encoder.encode(record), entry.revision)
            except Conflict:
                # Written since we read it (another node's consumer, a stale
                # owner): handle the steps again against what is stored.
                entry = None
                continue
            # The record no longer holds the outbox a taken entry held its
            # partition's checkpoint for: stop holding before the dispatch,
            # which retries for as long as the commands side fails.
            self._cache.forget_taken(instance_id)
            await self._outbox.dispatch(ctx, instance_id, record)
            dispatched_at = held = None
            if record.has_outbox:
                dispatched_at, held = anyio.current_time(), _lowest_offset(steps)
            handled = CachedInstance(record, revision, entry.root, ctx.index, dispatched_at, held)
            self._cache.put(instance_id, handled, epoch)
            return handled

    async def _load(
        self,
        ctx: PartitionContext,
        records: Keyspace,
        key: bytes,
        stale: CachedInstance | None = None,
    ) -> CachedInstance:
        """Read the instance record, dispatch any outbox still in it, decode the root.

        *stale* is the cached entry this read checks (a deadline it does not
        list as pending): if the record is unchanged since, its outbox is the
        one this node dispatched before caching it, and is not dispatched again.
        """
        data, revision = await records.get(key)
        record = _record_decoder.decode(data) if data else ProcessRecord()
        if stale is not None and revision == stale.revision:
            return stale
        dispatched_at = None
        if record.has_outbox:
            # Perhaps dispatched already (by whoever wrote it); perhaps not (a
            # crash before dispatch). Dispatching again is harmless.
            await self._outbox.dispatch(ctx, key.decode(), record)
            dispatched_at = anyio.current_time()
        return CachedInstance(record, revision, self._root_of(record), ctx.index, dispatched_at)

    def _root_of(self, record: ProcessRecord) -> ProcessRoot:
        """The root *record* holds (a new one if it holds none)."""
        root = self.handler.new()
        if record.root is not None:
            root.unmarshal_binary(record.root)
        return root


def _lowest_offset(steps: list[Step]) -> int | None:
    """The lowest stream offset of *steps*' events (``None``: a deadline's step)."""
    return min((step.stream[1] for step in steps if step.stream is not None), default=None)


if TYPE_CHECKING:
    from .process_homes import HomeHandler

    def _is_home_handler(runner: ProcessRunner) -> HomeHandler:
        return runner  # static proof: a runner handles its instances' home steps

    # Static proof that the scopes implement dogma's protocols.
    _event_scope: type[dogma.ProcessEventScope[Any]] = ProcessEventScope
    _deadline_scope: type[dogma.ProcessDeadlineScope[Any]] = ProcessDeadlineScope
