"""What runs per owned partition and per node on the events side (seam 3).

``partition_consumers(app, settings)`` returns the application's
``ConsumerSet``. For each partition this node owns, ``run_partition`` runs:

- one routing consumer per enabled process handler
  (``process_routing.run_routing``): it routes the partition's events to
  their instances and hands each to the steps of the instance's home
  partition (``process_homes.HomeSteps``, run by the partition's owner
  beside its derived records, ``process_records.ProcessRecords``; see
  ``home_steps``);
- one consumer per enabled projection handler (``projections.run_projection``);
- the partition's deadline timer (``deadlines.DeadlineTimer``), when the
  application has enabled process handlers: a due deadline is a delivery to
  the partition's own home steps. It holds the deadlines of disabled ones
  (neither fired nor dropped) until they are enabled again.

``run_node`` runs the node-wide work: ``compact()`` of each enabled
projection, one after another, first within ``first_compact_delay`` seconds of
start (jittered) and then every ``compact_interval`` seconds, on the node that
``runs_node_work`` picks from the live node set (rendezvous over the handler
key; a single node always runs it).

State shared across partitions lives here: each process handler's
``ProcessRunner``, the home steps running on this node (``homes``), the
node-wide lock of each ``MINIMIZE`` projection, each
projection's ``ProjectionControl`` (for ``reset``) and the running deadline
timers (so an append to a local deadline journal wakes its timer at once).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from datetime import datetime
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

import dogma

from ... import rendezvous
from ...config import ApplicationConfig, HandlerConfig, HandlerKind
from ...persistence import PersistenceError
from ..backoff import jitter
from ..envelope import UNDECODABLE, Envelope, decode
from ..logs import RateLimitedLog, describe_error
from ..partitions import NodeContext, PartitionContext, instance_workload, partition_id
from ..settings import EngineSettings
from ..streams import OwnershipLost
from . import process_homes
from .consumers_support import ConsumerOptions
from .deadlines import UNKNOWN_HANDLER_GRACE, DeadlineEntry, DeadlineTimer
from .process_deliveries import Delivery
from .process_homes import Ack, DeliveriesBehind, HomeSteps
from .process_instances import ProcessRecord
from .process_records import ProcessRecords
from .process_routing import run_routing
from .processes import ProcessRunner
from .projections import (
    ProjectionControl,
    compact_projection,
    reset_projection,
    run_projection,
)

__all__ = [
    "ConsumerOptions",
    "ConsumerSet",
    "EventConsumers",
    "partition_consumers",
    "runs_node_work",
]

_log = logging.getLogger("runkit.engine.events.consumers")
# compact() runs every compact_interval; a failing one is shown in full once,
# then briefly, one line per projection per interval.
_compact_log = RateLimitedLog(_log, 300.0)


class ConsumerSet(Protocol):
    """The events-side work of one application (seam 3)."""

    async def run_partition(
        self, ctx: PartitionContext, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the partition's consumers and deadline timer until cancelled."""
        ...

    async def run_node(
        self, ctx: NodeContext, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run node-wide work (periodic ``compact()``) until cancelled."""
        ...


def runs_node_work(workload_key: str, node_id: str, live_nodes: Collection[str]) -> bool:
    """Whether this node does the node-wide work named by *workload_key* (a UUID).

    The rendezvous winner over the live nodes does it. A node that sees no
    other live node (single node, or not yet in the live set) always does:
    node-wide work tolerates running on two nodes at once (``compact()`` may run
    at any time, Dogma says), so erring towards running is safe.
    """
    others = {n for n in live_nodes if n != node_id}
    if not others:
        return True
    return rendezvous.wins(workload_key, node_id, {*others, node_id})


class EventConsumers:
    """The ``ConsumerSet`` of one application; see the module docstring."""

    def __init__(
        self,
        app: ApplicationConfig,
        settings: EngineSettings,
        *,
        options: ConsumerOptions | None = None,
        live_nodes: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.options = options or ConsumerOptions.from_settings(settings)
        self._live_nodes = live_nodes
        self._processes = {
            h.identity.key: ProcessRunner(app, h, options=self.options, wake_timer=self._wake_timer)
            for h in app.enabled_handlers(HandlerKind.PROCESS)
        }
        # Their deadlines wait for them, as their events do.
        self._disabled_processes = frozenset(
            h.identity.key for h in app.handlers if h.kind is HandlerKind.PROCESS and h.disabled
        )
        self._projections = app.enabled_handlers(HandlerKind.PROJECTION)
        self._controls: dict[str, ProjectionControl] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._timers: dict[int, DeadlineTimer] = {}
        self._compact_failing: set[str] = set()  # handler keys whose last compact() failed
        # The home partitions running on this node, by index, and where
        # deliveries for the others go.
        self.homes: dict[int, HomeSteps] = {}
        self.deliver_remote: Callable[[Delivery], Awaitable[None]] | None = None
        #: The end of a partition's inbox journal now (set by the engine).
        self.inbox_end: Callable[[int], Awaitable[int]] | None = None
        self._partition_of: Callable[[str], int] | None = None

    # -- per partition --

    async def run_partition(
        self, ctx: PartitionContext, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the partition's consumers and deadline timer until cancelled.

        ``task_status.started()`` is called once the deadline timer has
        loaded the partition's deadline journal and every consumer is started.
        Cancellation leaves durable state consistent: every write is a single
        conditional operation and every step is repeatable.
        """
        timer: DeadlineTimer | None = None
        self._partition_of = ctx.partition_of
        async with anyio.create_task_group() as tg:
            try:
                if self._processes:
                    timer = DeadlineTimer(
                        ctx,
                        self._fire(ctx),
                        rescan_interval=self.options.deadline_rescan_interval,
                        held=self._disabled_processes,
                        known=self._processes.keys(),
                        concurrency=self.options.process_concurrency,
                    )
                    self._timers[ctx.index] = timer
                    await tg.start(timer.run)
                for runner in self._processes.values():
                    name = f"process {runner.key} p{ctx.index}"
                    tg.start_soon(run_routing, runner, ctx, self, self.options, name=name)
                for config in self._projections:
                    tg.start_soon(self._run_projection, ctx, config)
                task_status.started()
                await anyio.sleep_forever()
            finally:
                if timer is not None and self._timers.get(ctx.index) is timer:
                    del self._timers[ctx.index]

    async def _run_projection(self, ctx: PartitionContext, config: HandlerConfig) -> None:
        await run_projection(
            ctx,
            config,
            options=self.options,
            control=self.projection_control(config.identity.key),
            serialise=self._lock_for(config),
        )

    def _lock_for(self, config: HandlerConfig) -> anyio.Lock | None:
        if config.concurrency is not dogma.ConcurrencyPreference.MINIMIZE:
            return None
        lock = self._locks.get(config.identity.key)
        if lock is None:
            lock = self._locks[config.identity.key] = anyio.Lock()
        return lock

    def projection_control(self, handler_key: str) -> ProjectionControl:
        """The delivery control of a projection on this node (used by ``reset``)."""
        control = self._controls.get(handler_key)
        if control is None:
            control = self._controls[handler_key] = ProjectionControl()
        return control

    # -- process steps in the home partition --

    @property
    def has_processes(self) -> bool:
        """Whether the application has process handlers (then ``home_steps`` runs).

        Disabled ones count: the steps and outboxes they committed in the
        stream must be recovered, not passed over by the watermarks.
        """
        return bool(self._processes or self._disabled_processes)

    def home_steps(
        self,
        ctx: PartitionContext,
        writer: process_homes.StepWriter,
        *,
        record_limit: int,
        materialise_delay: float,
        retry_max_delay: float,
    ) -> tuple[HomeSteps, ProcessRecords]:
        """The process steps of partition *ctx* and its derived instance records.

        The caller (the partition's owner) runs both, recovers the records
        before the partition takes work, and registers the steps with
        ``homes`` once it does.
        """

        self._partition_of = ctx.partition_of

        async def dispatch_outbox(
            handler_key: str, instance_id: str, record: ProcessRecord
        ) -> None:
            await self._processes[handler_key].dispatch_record(ctx, instance_id, record)

        records = ProcessRecords(
            ctx.provider,
            self.app.identity.key,
            delay=materialise_delay,
            retry_max_delay=retry_max_delay,
            dispatch_outbox=dispatch_outbox,
        )
        steps = HomeSteps(
            ctx,
            writer,
            self._processes,
            load=records.load,
            options=self.options,
            record_limit=record_limit,
            stream_partitions={
                partition_id(self.app.identity.key, i): i for i in range(ctx.partition_count)
            },
            committed=records.committed,
        )
        return steps, records

    def submit_local(self, delivery: Delivery, ack: Ack) -> bool:
        """Hand *delivery* to its home partition if it runs here (``process_routing``)."""
        runner = self._processes.get(delivery.handler_key)
        if runner is None:
            return False
        home = self.homes.get(self._home_of(delivery))
        if home is None:
            return False
        try:
            home.submit(delivery, ack)
        except (OwnershipLost, DeliveriesBehind):
            return False
        return True

    async def submit_to_inbox(self, delivery: Delivery) -> None:
        """Append *delivery* to its home partition's inbox and wake the owner."""
        if self.deliver_remote is None:
            # No engine around this consumer set (tests): wait for the home to run here.
            home_of = self._home_of(delivery)
            while True:
                if await self._submit_and_wait(self.homes.get(home_of), delivery):
                    return
                await anyio.sleep(0.01)
        await self.deliver_remote(delivery)

    @staticmethod
    async def _submit_and_wait(home: HomeSteps | None, delivery: Delivery) -> bool:
        """Submit *delivery* to *home* and wait until it is durable (``False``: it was not)."""
        if home is None:
            return False
        done = anyio.Event()
        result: list[BaseException | None] = []

        def ack(error: BaseException | None) -> None:
            result.append(error)
            done.set()

        try:
            home.submit(delivery, ack, in_order=True)
        except OwnershipLost:
            return False
        await done.wait()
        return result[0] is None

    def inbox_delivery(
        self,
        index: int,
        envelope: Envelope,
        *,
        handler_key: str,
        instance_id: str | None,
        source: tuple[str, int],
        ack: Ack,
    ) -> bool:
        """A delivery read from partition *index*'s inbox: into its steps (``False``: none here)."""
        home = self.homes.get(index)
        runner = self._processes.get(handler_key)
        if home is None or runner is None or instance_id is None:
            return False
        stream_id, offset = source
        delivery = Delivery.of_event(
            handler_key,
            instance_id,
            envelope,
            stream_id=stream_id,
            offset=offset,
            recorded_at=envelope.created_at,
        )
        try:
            home.submit(delivery, ack, in_order=True)
        except OwnershipLost as stopped:
            ack(stopped)  # stopping: the next owner reads the entry again
        return True

    def home_of(self, delivery: Delivery) -> int:
        """The home partition of the delivery's instance (``process_routing``)."""
        return self._home_of(delivery)

    async def inbox_floors(self) -> dict[int, int]:
        """The inbox end now of each home partition running here (``process_routing``)."""
        inbox_end = self.inbox_end
        if inbox_end is None:
            return {}
        floors: dict[int, int] = {}
        failed: list[PersistenceError] = []

        async def read(index: int) -> None:
            try:
                floors[index] = await inbox_end(index)
            except PersistenceError as exc:
                failed.append(exc)  # raised as it is below, not in an exception group

        async with anyio.create_task_group() as tg:  # one store round trip, not one per home
            for index in list(self.homes):
                tg.start_soon(read, index)
        if failed:
            raise failed[0]
        return floors

    def inbox_read(self, index: int) -> int:
        """How far home partition *index* has read its inbox (-1: not running here)."""
        home = self.homes.get(index)
        if home is None or home.inbox_read is None:
            return -1
        return home.inbox_read()

    def _home_of(self, delivery: Delivery) -> int:
        assert self._partition_of is not None  # set by the first partition started
        return self._partition_of(instance_workload(delivery.handler_key, delivery.instance_id))

    async def _fire_home(self, ctx: PartitionContext, entry: DeadlineEntry) -> None:
        """Fire a due deadline as a delivery into its home partition's steps (this one)."""
        try:
            envelope = decode(entry.envelope)
        except UNDECODABLE as exc:
            await self._processes[entry.handler_key].poison_undecodable_deadline(ctx, entry, exc)
            return
        delivery = Delivery.of_deadline(
            entry.handler_key, entry.instance_id, envelope, scheduled_for=entry.scheduled_for
        )
        # Not running yet, or stopping (then the timer stops with it): again shortly.
        while True:
            if await self._submit_and_wait(self.homes.get(ctx.index), delivery):
                return
            await anyio.sleep(0.01)

    def _fire(self, ctx: PartitionContext) -> Callable[[DeadlineEntry], Awaitable[None]]:
        async def fire(entry: DeadlineEntry) -> None:
            runner = self._processes.get(entry.handler_key)
            if runner is None:
                # Not a disabled handler (the timer holds those): one this
                # node does not know, held for a grace period already.
                _log.warning(
                    "dropping deadline %s for instance %r: process %s is not in the "
                    "application, and no node ran it within %s of the deadline's time "
                    "(partition %d)",
                    entry.deadline_id,
                    entry.instance_id,
                    entry.handler_key,
                    UNKNOWN_HANDLER_GRACE,
                    ctx.index,
                )
                return
            await self._fire_home(ctx, entry)

        return fire

    #: Wakes the owner of a home partition this node does not run (set by the engine).
    remote_wake: Callable[[int], None] | None = None

    def wake_timer(self, partition: int) -> None:
        """Deadlines were appended to *partition*'s journal: its timer reads them now."""
        self._wake_timer(partition)

    def _wake_timer(self, partition: int) -> None:
        timer = self._timers.get(partition)
        if timer is not None:
            timer.wake()
        elif self.remote_wake is not None:
            self.remote_wake(partition)

    # -- per node --

    async def run_node(
        self, ctx: NodeContext, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Call ``compact()`` of each projection periodically, where ``runs_node_work`` says.

        The first round comes soon after start, not a whole ``compact_interval``
        later: a node restarted more often than that would never compact.
        """
        task_status.started()
        if not self._projections:
            await anyio.sleep_forever()
        options = self.options
        await anyio.sleep(jitter(min(options.first_compact_delay, options.compact_interval)))
        while True:
            live = self._live_nodes() if self._live_nodes is not None else (ctx.node_id,)
            for config in self._projections:
                if not runs_node_work(config.identity.key, ctx.node_id, live):
                    continue
                key = config.identity.key
                try:
                    await compact_projection(config, clock=ctx.now)
                except Exception as exc:
                    if key not in self._compact_failing:
                        self._compact_failing.add(key)
                        _log.exception("%s: compact() failed; will try again", config.describe())
                    else:
                        _compact_log.warning(
                            key,
                            "%s: compact() failed again; will try again: %s",
                            config.describe(),
                            describe_error(exc),
                        )
                else:
                    self._compact_failing.discard(key)
            await anyio.sleep(options.compact_interval)

    # -- operations --

    async def reset_projection(self, handler: str, *, clock: Callable[[], datetime]) -> None:
        """Reset a projection, pausing its delivery on this node meanwhile.

        See ``projections.reset_projection``.
        """
        config = self.app.handler_by_name(handler) or self.app.handler_by_key(handler)
        control = None if config is None else self.projection_control(config.identity.key)
        await reset_projection(self.app, handler, clock=clock, control=control)


def partition_consumers(
    app: ApplicationConfig,
    settings: EngineSettings,
    *,
    options: ConsumerOptions | None = None,
    live_nodes: Callable[[], Collection[str]] | None = None,
) -> EventConsumers:
    """The events-side work of *app*: what ``run_partition``/``run_node`` run.

    *options* tune retries, checkpoints, compaction and deadline timers
    (default: ``ConsumerOptions.from_settings(settings)``). *live_nodes*
    returns the live node IDs (membership); without it this node acts alone.
    """
    return EventConsumers(app, settings, options=options, live_nodes=live_nodes)
