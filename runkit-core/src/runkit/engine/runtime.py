"""One application on this node: acceptance, its consumers and its owned partitions.

``AppRuntime.run`` reads the partition count (``<app>/meta``, ``meta.py``),
opens one ``InboxWriter`` per partition (acceptance), builds the events side's
consumers (``consumers.partition_consumers(app, settings)``, if installed) and
starts a ``PartitionRunner`` that runs each owned partition
(``owned_partition.run_owned_partition``). It also serves what peers ask of the
application on this node (offered commands, wake-ups) and prunes old
idempotency markers.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any

import anyio
from anyio.abc import TaskStatus

from ..config import ApplicationConfig
from ..persistence import PersistenceError, Provider
from .backoff import jitter
from .cluster.ownership import Ownership
from .cluster.routing import Router
from .commands.acceptance import Acceptor, PartitionStopped, prune_idempotency
from .commands.batches import PartitionCommands
from .commands.inbox import InboxEntry, InboxWriter, inbox_name
from .envelope import Envelope, RoutedMessages
from .fresh_reads import FreshReads
from .logs import describe_error
from .meta import load_partition_count
from .owned_partition import run_owned_partition
from .partitions import NodeContext, PartitionRunner, instance_workload, partition_id, partition_of
from .settings import EngineSettings
from .streams import EventBus

__all__ = ["AppRuntime"]

#: The longest wait, after the start, before the first pruning of idempotency markers.
_FIRST_PRUNE_DELAY = 60.0

_log = logging.getLogger("runkit.engine")
#: Bound on one read of an inbox's end for the process consumers (it runs
#: shielded from their cancellation).
_INBOX_END_TIMEOUT = 30.0


def _consumers_module() -> Any | None:
    # The events side is optional at this seam: without it, partitions run commands only.
    if importlib.util.find_spec("runkit.engine.events.consumers") is None:
        return None
    return importlib.import_module("runkit.engine.events.consumers")


class AppRuntime:
    """One application on this node: acceptance and its owned partitions."""

    def __init__(
        self,
        app: ApplicationConfig,
        settings: EngineSettings,
        provider: Provider,
        bus: EventBus,
        ownership: Ownership,
        *,
        router: Router | None = None,
    ) -> None:
        self.app = app
        self.router = router
        self.settings = settings
        self.provider = provider
        self.bus = bus
        self.ownership = ownership
        self.partition_count = 0
        self.inbox_writers: list[InboxWriter] = []
        self.partitions: dict[int, PartitionCommands] = {}
        # Commands routed on this node, for their aggregate's handling here.
        self.routed_commands = RoutedMessages()
        self._acceptor: Acceptor | None = None
        self._consumers: Any = None
        self._inbox_end_reads: dict[int, FreshReads[int]] = {}

    @property
    def acceptor(self) -> Acceptor:
        """Routes and accepts commands (available once started)."""
        if self._acceptor is None:
            raise RuntimeError("the application runtime has not started")
        return self._acceptor

    @property
    def consumers(self) -> Any:
        """The events-side consumers (``consumers.EventConsumers``), once started."""
        return self._consumers

    @property
    def app_key(self) -> str:
        """The application's identity key."""
        return self.app.identity.key

    def partition_of(self, workload: str) -> int:
        """The partition index of a workload key."""
        return partition_of(workload, self.partition_count)

    async def accept(self, envelopes: Sequence[Envelope]) -> None:
        """``PartitionContext.accept``: durably accept handler-produced commands."""
        await self.acceptor.accept_envelopes(envelopes)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run acceptance and owned partitions until cancelled."""
        s = self.settings
        self.partition_count = await load_partition_count(
            self.provider, self.app_key, s.partition_count, s.clock()
        )
        if self.partition_count != s.partition_count:
            _log.info(
                "application %s has %d partitions, fixed when it was first started; "
                "this node's partition count (%d) applies only to a new application",
                self.app.identity,
                self.partition_count,
                s.partition_count,
                extra={"app": self.app_key},
            )
        module = _consumers_module()
        if module is not None:
            self._consumers = module.partition_consumers(
                self.app, s, live_nodes=getattr(self.ownership, "live_nodes", None)
            )
            # Deadlines for a home partition owned elsewhere wake its owner.
            self._consumers.remote_wake = lambda index: self._wake_remote(index, "deadlines")
            # Process deliveries for a home partition not running here (ADR 0010).
            self._consumers.deliver_remote = self._deliver_to_inbox
            self._consumers.inbox_end = self._inbox_end
        async with AsyncExitStack() as stack:
            for index in range(self.partition_count):
                journal = await self.provider.journals.open(inbox_name(self.app_key, index))
                stack.push_async_callback(journal.close)
                self.inbox_writers.append(
                    InboxWriter(
                        journal,
                        batch_limit=s.inbox_batch_limit,
                        record_limit=self.provider.limits.max_record_bytes,
                        max_attempts=s.max_attempts,
                        retry_max_delay=s.retry_max_delay,
                    )
                )
            self._acceptor = Acceptor(
                self.app,
                self.partition_count,
                self.inbox_writers,
                local=self.partitions.get,
                remote=self._offer_remote if self.router is not None else None,
                wake=self._wake_remote if self.router is not None else None,
                routed=self.routed_commands,
                limits=self.provider.limits,
            )
            async with anyio.create_task_group() as tg:
                for writer in self.inbox_writers:
                    await tg.start(writer.run)
                runner = PartitionRunner(
                    self.app_key,
                    self.partition_count,
                    self.ownership,
                    self._run_partition,
                    name=self.app.identity.name,
                )
                tg.start_soon(runner.run)
                if self._consumers is not None:
                    await tg.start(self._consumers.run_node, self._node_context())
                if s.idempotency_retention is not None:
                    tg.start_soon(self._prune_markers, s.idempotency_retention)
                task_status.started()

    async def _deliver_to_inbox(self, delivery: Any) -> None:
        """Append a process delivery (``process_deliveries.Delivery``) to its home's inbox.

        One write, grouped with concurrent appends, and a wake-up for the
        owner (the inbox writer's listener when it runs here). Offers over the
        node transport, which would save the write, are a later optimisation.
        """
        index = self.partition_of(instance_workload(delivery.handler_key, delivery.instance_id))
        entry = InboxEntry(
            envelope=delivery.envelope,
            handler_key=delivery.handler_key,
            instance_id=delivery.instance_id,
            source=delivery.stream,
        )
        await self.inbox_writers[index].submit([entry])
        if self.router is not None and index not in self.partitions:
            self._wake_remote(index, "inbox")

    async def _inbox_end(self, index: int) -> int:
        """The end of partition *index*'s inbox journal, read after this call began.

        Every process consumer taking over asks this of every home partition
        running here (``process_routing``): callers that ask together share
        one ``bounds`` read (``FreshReads``), so a node's start costs about two
        reads per partition, not one per consumer and partition.
        """
        reads = self._inbox_end_reads.get(index)
        if reads is None:
            journal = self.inbox_writers[index].journal

            async def read() -> int:
                # Shielded in ``FreshReads``: bounded here instead.
                with anyio.fail_after(_INBOX_END_TIMEOUT):
                    return (await journal.bounds()).end

            reads = self._inbox_end_reads[index] = FreshReads(read)
        try:
            return await reads.get()
        except TimeoutError:
            raise PersistenceError(
                f"reading the end of partition {index}'s inbox took longer than "
                f"{_INBOX_END_TIMEOUT:.0f}s",
                retryable=True,
            ) from None

    async def _prune_markers(self, retention: float) -> None:
        # One node prunes: the owner of partition 0 (ownership moves it on failover).
        first = partition_id(self.app_key, 0)
        interval = min(3600.0, retention / 4)
        # The first round soon after the start, not an interval later: a node
        # restarted more often than that (or a partition 0 that moves) would
        # otherwise never prune. Jittered, so nodes started together spread out.
        soon = min(_FIRST_PRUNE_DELAY, interval)
        await anyio.sleep(jitter(soon))
        while True:
            if self.ownership.owns(first):
                await self._prune_once(retention)
                await anyio.sleep(interval)
            else:
                await anyio.sleep(soon)  # partition 0 may come here (a start, a failover)

    async def _prune_once(self, retention: float) -> None:
        cutoff = self.settings.clock() - timedelta(seconds=retention)
        try:
            pruned = await prune_idempotency(self.provider, self.app_key, cutoff)
        except Exception as exc:
            # A store failure, or a bug (an undecodable marker): logged, and
            # tried again next round, without stopping the application.
            _log.warning(
                "application %s: pruning idempotency markers failed: %s",
                self.app.identity.name,
                describe_error(exc),
                exc_info=not isinstance(exc, PersistenceError),
                extra={"app": self.app_key},
            )
            return
        if pruned:
            _log.info(
                "application %s: pruned %d idempotency markers",
                self.app.identity.name,
                pruned,
                extra={"app": self.app_key},
            )

    async def _offer_remote(
        self, index: int, entries: list[InboxEntry], room_wait: float | None
    ) -> bool:
        assert self.router is not None
        return await self.router.offer(
            self.app_key, index, partition_id(self.app_key, index), entries, room_wait=room_wait
        )

    def _wake_remote(self, index: int, what: str = "inbox") -> None:
        if self.router is not None:
            self.router.wake(self.app_key, index, partition_id(self.app_key, index), what)

    def offer_local(
        self,
        index: int,
        entries: Sequence[InboxEntry],
        done: Callable[[bool | BaseException], None],
        *,
        room_wait: float | None = None,
    ) -> None:
        """Handle commands a peer offered, if this node runs the partition.

        *done* is called once (maybe at once): ``True`` when they are durable,
        ``False`` when this node does not run the partition (any more), or the
        error that kept them from being durable (a ``PartitionStopped`` only
        when it names an append that may hold some of them, or when some of
        them were committed after all). With *room_wait* (a caller's
        commands) they wait for room in the partition's backlog, in line with
        callers on this node, for up to that many seconds, then get a
        ``PartitionBusy``; without, they are taken at once (produced commands).
        """
        commands = self.partitions.get(index)
        if commands is None:
            done(False)
            return

        def settled(error: BaseException | None) -> None:
            if error is None:
                done(True)
            elif (
                isinstance(error, PartitionStopped)
                and not error.unconfirmed
                and error.covers(entries)
            ):
                done(False)
            else:
                done(error)

        try:
            if room_wait is None:
                commands.execute_nowait(entries, settled)
            else:
                commands.execute_when_room(entries, settled, hold=room_wait)
        except PartitionStopped:
            done(False)

    def wake_local(self, index: int, what: str) -> None:
        """A peer appended to this partition's inbox or deadlines: read them now."""
        if what == "deadlines":
            if self._consumers is not None:
                self._consumers.wake_timer(index)
            return
        commands = self.partitions.get(index)
        if commands is not None:
            commands.poke()
        else:
            # Sent here by a sender whose view of the owner is stale: on to the
            # owner as this node sees it, as deadline wake-ups go (each hop
            # goes to a higher-ranked node, so it ends; at this node if it
            # ranks itself first, where the starting partition reads its inbox).
            self._wake_remote(index, "inbox")

    def _node_context(self) -> NodeContext:
        return NodeContext(
            app=self.app,
            settings=self.settings,
            node_id=str(self.settings.node_id),
            partition_count=self.partition_count,
            provider=self.provider,
            accept=self.accept,
            partition_of=self.partition_of,
            now=self.settings.clock,
        )

    async def _run_partition(self, index: int) -> None:
        await run_owned_partition(self, index)
