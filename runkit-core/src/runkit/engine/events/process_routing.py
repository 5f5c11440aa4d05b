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

import functools
from collections import deque
from typing import TYPE_CHECKING, Protocol

import anyio
from anyio.abc import TaskGroup

from ...persistence import PersistenceError
from ..logs import describe_error
from .consumers_support import (
    ConsumerCheckpoint,
    ConsumerOptions,
    Restarts,
    close_iterator,
    sleep_backoff,
)
from .process_deliveries import Delivery
from .process_homes import Ack
from .process_retries import process_log, process_store_log
from .process_stores import checkpoint_key, checkpoints_store_name

if TYPE_CHECKING:
    from ..partitions import PartitionContext
    from ..streams import StreamEvent
    from .processes import ProcessRunner

__all__ = ["DeliveryRoute", "InFlight", "run_routing"]


class DeliveryRoute(Protocol):
    """Where a routing consumer sends deliveries (``EventConsumers``)."""

    def submit_local(self, delivery: Delivery, ack: Ack) -> bool:
        """Hand *delivery* to its home partition if this node runs it (``False``: it does not)."""
        ...

    async def submit_to_inbox(self, delivery: Delivery) -> None:
        """Append *delivery* to its home partition's inbox and wake the owner; durable on return."""
        ...

    def home_of(self, delivery: Delivery) -> int:
        """The home partition of the delivery's instance."""
        ...

    async def inbox_floors(self) -> dict[int, int]:
        """The inbox end now of each home partition running here (``{}``: not known)."""
        ...

    def inbox_read(self, index: int) -> int:
        """How far home partition *index* has read its inbox and handed deliveries over."""
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
        # Deliveries an earlier run (maybe on another node) appended to a home's
        # inbox are there by now (its checkpoint passed them only then): none
        # goes to that home in memory before the home has read that far.
        floors = await route.inbox_floors()
        async with anyio.create_task_group() as tg:
            tg.start_soon(checkpoint.save_periodically, options.checkpoint_interval)
            sender = _Sender(runner, route, inflight, tg, options, floors=floors)
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
                        process_log.info(
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
    """Sends deliveries home: in memory if this node runs the home, else through its inbox.

    Order matters per instance: the instance skips an event at or below its
    position for the event's stream, so a delivery must never overtake an
    earlier one of the same stream. So inbox appends go one after another,
    in order, from one task, and while an instance has a delivery on its way
    to the inbox its later ones go that way too (after the append, the home
    partition itself keeps later in-memory deliveries behind it:
    ``HomeSteps.behind``).
    """

    def __init__(
        self,
        runner: ProcessRunner,
        route: DeliveryRoute,
        inflight: InFlight,
        tg: TaskGroup,
        options: ConsumerOptions,
        *,
        floors: dict[int, int] | None = None,
    ) -> None:
        self._runner = runner
        # Home partition -> the inbox position it must have read before
        # deliveries go to it in memory (``run_routing``).
        self._floors = floors or {}
        self._route = route
        self._inflight = inflight
        self._tg = tg
        self._options = options
        self.stopped = False
        self._to_inbox: deque[Delivery] = deque()
        # Instance -> its deliveries queued for the inbox and not appended yet.
        self._inboxed: dict[str, int] = {}
        # Instance -> its deliveries handed over in memory and not acknowledged.
        self._local: dict[str, int] = {}
        # Instance -> deliveries for the inbox waiting behind its in-memory ones
        # (their home stopped: those may still fail and go to the inbox first).
        self._held: dict[str, list[Delivery]] = {}
        self._sending = False

    def send(self, delivery: Delivery) -> None:
        assert delivery.stream is not None
        instance_id = delivery.instance_id
        if instance_id in self._held:
            self._held[instance_id].append(delivery)  # behind those that failed at home
        elif instance_id in self._inboxed or self._behind_floor(delivery):
            self._enqueue_for_inbox(delivery)
        elif self._route.submit_local(delivery, functools.partial(self._acked, delivery)):
            self._local[instance_id] = self._local.get(instance_id, 0) + 1
        elif instance_id in self._local:
            self._held[instance_id] = [delivery]
        else:
            self._enqueue_for_inbox(delivery)

    def _behind_floor(self, delivery: Delivery) -> bool:
        """Whether the delivery's home has not yet read the inbox an earlier run wrote to."""
        if not self._floors:
            return False
        home = self._route.home_of(delivery)
        floor = self._floors.get(home)
        if floor is None:
            return False
        if self._route.inbox_read(home) < floor:
            return True
        del self._floors[home]
        return False

    def _acked(self, delivery: Delivery, error: BaseException | None) -> None:
        """A delivery handed over in memory is durable at home, or will not be (*error*).

        Runs in the home partition's writer task: must not block. Those that
        failed (their home stopped) go to the inbox once none of the
        instance's is outstanding, in stream order, with those held behind
        them: a stopping home fails its queued deliveries before the ones in
        its last append.
        """
        assert delivery.stream is not None
        instance_id = delivery.instance_id
        left = self._local[instance_id] - 1
        if left:
            self._local[instance_id] = left
        else:
            del self._local[instance_id]
        if error is None:
            self._inflight.done(delivery.stream[1])
        elif not self.stopped:
            self._held.setdefault(instance_id, []).append(delivery)
        if not left and not self.stopped:
            held = self._held.pop(instance_id, [])
            held.sort(key=lambda d: d.stream[1] if d.stream else 0)
            for waiting in held:
                self._enqueue_for_inbox(waiting)

    def _enqueue_for_inbox(self, delivery: Delivery) -> None:
        self._runner.forget_routed(delivery.envelope)  # handled through the inbox
        instance_id = delivery.instance_id
        self._inboxed[instance_id] = self._inboxed.get(instance_id, 0) + 1
        self._to_inbox.append(delivery)
        if not self._sending:
            self._sending = True
            self._tg.start_soon(self._send_to_inbox)

    async def _send_to_inbox(self) -> None:
        """Append queued deliveries to their homes' inboxes, one after another, in order."""
        try:
            while self._to_inbox:
                delivery = self._to_inbox[0]
                await self._append(delivery)
                self._to_inbox.popleft()
                left = self._inboxed[delivery.instance_id] - 1
                if left:
                    self._inboxed[delivery.instance_id] = left
                else:
                    del self._inboxed[delivery.instance_id]
                assert delivery.stream is not None
                self._inflight.done(delivery.stream[1])
        finally:
            self._sending = False

    async def _append(self, delivery: Delivery) -> None:
        failures = 0
        while True:
            try:
                await self._route.submit_to_inbox(delivery)
                return
            except PersistenceError as exc:
                failures += 1
                process_store_log.warning(
                    (self._runner.key, "inbox"),
                    "%s: cannot append a delivery to its home partition's inbox; retrying: %s",
                    self._runner.config.describe(),
                    describe_error(exc),
                )
                await sleep_backoff(self._options, failures)
