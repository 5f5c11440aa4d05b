"""The consumer of a partition's stream for a process handler, when steps run at home (ADR 0010).

With process steps in the home partition, the consumer of stream *p* for
process handler *H* does not handle events: it routes each one
(``route_event_to_instance``, with the usual retries and poisoning) and
submits a ``Delivery`` to the instance's home partition *h*:

- *h* running on this node: into *h*'s ``HomeSteps`` in memory (no write);
  acknowledged once *h*'s stream record holding the step is durable;
- otherwise, or if *h* stops before it commits the delivery: appended to
  *h*'s inbox (one write, grouped with concurrent appends) with a wake-up for
  its owner; acknowledged once the append is durable. Offers over the node
  transport would save that write; they are a later optimisation.

The checkpoint passes an event only once its delivery is acknowledged (the
lowest unacknowledged offset), so a crash delivers again whatever was not
durable at home, and the instance's committed positions skip what was.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import anyio
from anyio.abc import TaskGroup

from ...persistence import PersistenceError
from ..logs import describe_error
from .consumers_support import ConsumerOptions, Restarts, close_iterator, sleep_backoff
from .process_deliveries import Delivery
from .process_homes import Ack
from .process_queues import ConsumerCheckpoint
from .process_retries import process_store_log
from .process_stores import checkpoint_key, checkpoints_store_name

if TYPE_CHECKING:
    from ..partitions import PartitionContext
    from ..streams import StreamEvent
    from .processes import ProcessRunner

__all__ = ["DeliveryRoute", "InFlight", "run_routing"]

_log = logging.getLogger("runkit.engine.events.processes")


class DeliveryRoute(Protocol):
    """Where a routing consumer sends deliveries (``EventConsumers``)."""

    def submit_local(self, delivery: Delivery, ack: Ack) -> bool:
        """Hand *delivery* to its home partition if this node runs it (``False``: it does not)."""
        ...

    async def submit_to_inbox(self, delivery: Delivery) -> None:
        """Append *delivery* to its home partition's inbox and wake the owner; durable on return."""
        ...


class InFlight:
    """Offsets of deliveries submitted and not yet acknowledged; the checkpoint follows them.

    ``begin`` waits while *limit* are unacknowledged (back-pressure on the
    stream reader, not on the home partitions' backlog: deliveries never wait
    for backlog room, as commands produced by handlers do not).
    """

    def __init__(self, checkpoint: ConsumerCheckpoint, limit: int) -> None:
        self._checkpoint = checkpoint
        self._slots = anyio.Semaphore(limit)
        self._unfinished: set[int] = set()
        self._read = checkpoint.value

    async def begin(self, offset: int) -> None:
        try:
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            await self._slots.acquire()
        self._read = offset + 1
        self._unfinished.add(offset)

    def done(self, offset: int) -> None:
        if offset in self._unfinished:
            self._unfinished.discard(offset)
            self._slots.release()
            self._advance()

    def passed(self, offset: int) -> None:
        """The event at *offset* goes to no instance: done."""
        self._read = offset + 1
        self._advance()

    def skip_to(self, offset: int) -> None:
        """Every event before *offset* not yet seen is of no interest (``PartitionStream.read``)."""
        if offset > self._read:
            self._read = offset
            self._advance()

    @property
    def pending(self) -> int:
        return len(self._unfinished)

    def _advance(self) -> None:
        self._checkpoint.value = min(self._unfinished, default=self._read)


async def run_routing(
    runner: ProcessRunner, ctx: PartitionContext, route: DeliveryRoute, options: ConsumerOptions
) -> None:
    """Route partition *ctx*'s stream for *runner*'s handler until cancelled (module docstring).

    A persistence error outside routing (loading the checkpoint, reading the
    stream) restarts the consumer from its stored checkpoint after a backoff.
    """
    restarts = Restarts(options)
    while True:
        restarts.begin()
        try:
            await _run_once(runner, ctx, route, options)
            return
        except PersistenceError as exc:
            process_store_log.warning(
                (runner.key, ctx.index),
                "%s on partition %d: persistence error; restarting the consumer: %s",
                runner.config.describe(),
                ctx.index,
                describe_error(exc),
            )
            await restarts.failed()


async def _run_once(
    runner: ProcessRunner, ctx: PartitionContext, route: DeliveryRoute, options: ConsumerOptions
) -> None:
    name = checkpoints_store_name(runner.app.identity.key)
    async with await ctx.provider.keyspaces.open(name) as checkpoints:
        checkpoint = ConsumerCheckpoint(checkpoints, checkpoint_key(runner.key, ctx.partition_id))
        await checkpoint.load()
        inflight = InFlight(checkpoint, options.process_concurrency)
        async with anyio.create_task_group() as tg:
            tg.start_soon(checkpoint.save_periodically, options.checkpoint_interval)
            sender = _Sender(runner, route, inflight, tg, options)
            events = ctx.stream.read(
                checkpoint.value, types=runner.routed, on_skip=inflight.skip_to
            )
            try:
                async for event in events:
                    if event.offset < checkpoint.value:
                        continue
                    instance_id = await runner.route_event(ctx, event)
                    if instance_id is None:
                        inflight.passed(event.offset)
                        continue
                    await inflight.begin(event.offset)
                    sender.send(_delivery(runner.key, instance_id, event))
            finally:
                sender.stopped = True
                await close_iterator(events)
                # Best effort: a lagging checkpoint only means harmless redelivery.
                with anyio.move_on_after(1, shield=True):
                    try:
                        await checkpoint.save()
                    except PersistenceError as exc:
                        _log.info(
                            "%s on partition %d: final checkpoint save failed (the next "
                            "owner redelivers from the last saved one): %s",
                            runner.config.describe(),
                            ctx.index,
                            describe_error(exc),
                        )
            tg.cancel_scope.cancel()


def _delivery(handler_key: str, instance_id: str, event: StreamEvent) -> Delivery:
    return Delivery.of_event(
        handler_key,
        instance_id,
        event.envelope,
        stream_id=event.stream_id,
        offset=event.offset,
        recorded_at=event.recorded_at,
    )


class _Sender:
    """Sends deliveries home: locally if this node runs the home, else through its inbox."""

    def __init__(
        self,
        runner: ProcessRunner,
        route: DeliveryRoute,
        inflight: InFlight,
        tg: TaskGroup,
        options: ConsumerOptions,
    ) -> None:
        self._runner = runner
        self._route = route
        self._inflight = inflight
        self._tg = tg
        self._options = options
        self.stopped = False

    def send(self, delivery: Delivery) -> None:
        assert delivery.stream is not None
        offset = delivery.stream[1]

        def ack(error: BaseException | None) -> None:
            # In the home partition's writer task: must not block.
            if error is None:
                self._inflight.done(offset)
            elif not self.stopped:
                # The home stopped before committing it: the inbox path.
                self._tg.start_soon(self._via_inbox, delivery)

        if not self._route.submit_local(delivery, ack):
            self._runner.forget_routed(delivery.envelope)  # handled elsewhere
            self._tg.start_soon(self._via_inbox, delivery)

    async def _via_inbox(self, delivery: Delivery) -> None:
        assert delivery.stream is not None
        failures = 0
        while True:
            try:
                await self._route.submit_to_inbox(delivery)
                break
            except PersistenceError as exc:
                failures += 1
                process_store_log.warning(
                    (self._runner.key, "inbox"),
                    "%s: cannot append a delivery to its home partition's inbox; retrying: %s",
                    self._runner.config.describe(),
                    describe_error(exc),
                )
                await sleep_backoff(self._options, failures)
        self._inflight.done(delivery.stream[1])
