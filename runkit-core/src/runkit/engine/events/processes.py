"""Process handlers: what one handler does on this node (ADR 0010).

A process instance is handled on its *home* partition
(``process_deliveries.home_partition``), which is its only writer:

- the consumer of each partition's stream (``process_routing``) routes the
  events of routed types in stream order (``route_event``; ``None`` =
  ignore) and hands each to its instance's home as a ``Delivery``;
- the home partition's ``HomeSteps`` (``process_homes``) handles each
  instance's deliveries in order, one group at a time, against the live root
  (``invoke_delivery`` calls the handler, ``root_from`` decodes a root), and
  commits the group's ``ProcessStep`` in its stream record; due deadlines
  are deliveries to the same steps (``consumers``, ``deadlines``);
- once a step is durable its outbox is dispatched (``dispatch_step``):
  deadlines to the home partition's deadline journal, then commands through
  ``ctx.accept`` with IDs derived from the cause (``process_outbox``);
- ``ProcessRecords`` (``process_records``) writes each instance's derived
  record to ``<app>/process/<handler-key>`` behind the stream; a record
  written by an earlier version may still hold an outbox, which a load
  dispatches (``dispatch_record``) until a step rewrites the record.

``ProcessRunner`` holds what these share for one handler: its routes, the
message routing decoded for each event's first handling, its retries and
poisoning (``process_retries``) and its outbox dispatcher.

Failures: a handler error is retried with capped backoff; after
``max_attempts`` attempts the message is recorded in the event poison store
(``<app>/event-poison/<p>``) and the instance moves on.
``dogma.UnexpectedMessage``, an invalid produced message, a produced message of
a type the handler has no route for (or no enabled handler handles), or an
empty instance ID are bugs: they are poisoned at once. Persistence errors are
retried for ever.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import msgspec

import dogma

from ...config import ApplicationConfig, HandlerConfig, RouteKind
from ..envelope import Envelope, RoutedMessages, to_message
from .consumers_support import ConsumerOptions
from .deadlines import DeadlineEntry
from .process_deliveries import Delivery
from .process_instances import OutboxDeadline, ProcessRecord, ProcessRoot
from .process_outbox import OutboxDispatcher
from .process_retries import MessageRetries
from .process_retries import process_log as _log
from .process_scopes import (
    ProcessBug,
    ProcessDeadlineScope,
    ProcessEventScope,
    ProcessHandler,
    ProcessScope,
)
from .process_stores import PoisonedMessage, poison_error

if TYPE_CHECKING:
    from ..partitions import PartitionContext
    from ..streams import ProcessStep, StreamEvent

__all__ = ["ProcessRunner"]

_entry_decoder = msgspec.msgpack.Decoder(DeadlineEntry)


class ProcessRunner:
    """What one process handler's routing consumers and home steps share on this node.

    Shared by the handler's routing consumers on every owned partition, the
    home partitions' steps and records, and the deadline timers. *wake_timer*
    is told the partition index whenever this node appends to a deadline
    journal, so a local timer re-reads it at once.
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
        # What routing decoded, for each event's first handling: one decode per event.
        self._routed = RoutedMessages()
        self._retries = MessageRetries(app.identity.key, config, options)
        self._outbox = OutboxDispatcher(
            app.identity.key,
            config,
            options=options,
            retries=self._retries,
            wake_timer=wake_timer,
        )

    # -- routing (``process_routing``) --

    async def route_event(self, ctx: PartitionContext, event: StreamEvent) -> str | None:
        """The instance *event* goes to (``None``: none, or routing was poisoned).

        Retried and poisoned as a handler call. The message routing was given
        is kept for the event's first handling on this node.
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

    def forget_routed(self, envelope: Envelope) -> None:
        """The event is handled on another node: drop the message kept for it."""
        self._routed.discard(envelope)

    # -- deadlines --

    async def poison_undecodable_deadline(
        self, ctx: PartitionContext, entry: DeadlineEntry, error: Exception
    ) -> None:
        """Record a due deadline whose envelope cannot be decoded (*error*) in the poison store.

        Kept as it is: it cannot be delivered, and raised it would stop the
        partition at every restart.
        """
        _log.error(
            "%s on partition %d: deadline %s of instance %r cannot be decoded; "
            "moving it to the poison store: %s",
            self.config.describe(),
            ctx.index,
            entry.deadline_id,
            entry.instance_id,
            error,
        )
        await self._retries.poison(
            ctx,
            f"{self.key}/deadline/{entry.deadline_id}",
            PoisonedMessage(
                handler_key=self.key,
                envelope=entry.envelope,
                instance_id=entry.instance_id,
                stream_id=None,
                offset=None,
                error=poison_error(error),
                attempts=1,
                poisoned_at=ctx.now(),
            ),
        )

    # -- steps in the home partition (``process_homes.HomeHandler``) --

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
        """Dispatch the outbox a record written by an earlier version still holds (on load)."""
        await self._outbox.dispatch(ctx, instance_id, record)

    async def dispatch_step(
        self, ctx: PartitionContext, instance_id: str, step: ProcessStep
    ) -> None:
        """Dispatch a committed step's outbox: deadlines to *ctx*'s own journal, then commands.

        Retries until done (``OutboxDispatcher.dispatch``).
        """
        record = ProcessRecord(
            commands=list(step.commands),
            deadlines=[
                OutboxDeadline(partition=ctx.index, entry=_entry_decoder.decode(d))
                for d in step.deadlines
            ],
        )
        await self._outbox.dispatch(ctx, instance_id, record)


if TYPE_CHECKING:
    from .process_homes import HomeHandler

    def _is_home_handler(runner: ProcessRunner) -> HomeHandler:
        return runner  # static proof: a runner handles its instances' home steps

    # Static proof that the scopes implement dogma's protocols.
    _event_scope: type[dogma.ProcessEventScope[Any]] = ProcessEventScope
    _deadline_scope: type[dogma.ProcessDeadlineScope[Any]] = ProcessDeadlineScope
