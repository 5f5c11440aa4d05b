"""One owned partition of an application, from takeover to stop.

``run_owned_partition`` is what the ``PartitionRunner`` of an ``AppRuntime``
runs for each partition this node owns: it opens the partition's journals,
reads the stream tail, publishes the stream's last events again, recovers what
the previous owner had not materialised, and starts the ``StreamWriter``, the
materialiser, the ``PartitionCommands`` executor and the events side's
consumers (``consumers.run_partition(ctx)``). When the partition is lost or the
engine stops, it unwires them; on a graceful stop the stream writer flushes what
is already committed, within ``shutdown_timeout``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import anyio

from ..persistence import PersistenceError
from .commands.acceptance import idempotency_name
from .commands.aggregates import AggregateInstances
from .commands.batches import DeliverySink, PartitionCommands
from .commands.inbox import InboxEntry, inbox_name
from .commands.materialiser import Materialiser
from .logs import describe_error
from .partitions import PartitionContext, partition_id
from .streams import (
    OwnershipLost,
    PartitionStream,
    ProcessStep,
    Publication,
    StreamWriter,
    read_tail,
    stream_name,
)

if TYPE_CHECKING:
    from .runtime import AppRuntime

__all__ = ["REPUBLISH_ON_TAKEOVER", "run_owned_partition"]

_log = logging.getLogger("runkit.engine")

#: Events at the end of a partition's stream a new owner publishes again.
REPUBLISH_ON_TAKEOVER = 256


async def run_owned_partition(runtime: AppRuntime, index: int) -> None:
    """Run partition *index* of *runtime*'s application until it is lost or cancelled."""
    s = runtime.settings
    pid = partition_id(runtime.app_key, index)
    context = {"app": runtime.app_key, "partition": index}
    async with AsyncExitStack() as stack:
        journals = runtime.provider.journals
        stream_journal = await journals.open(stream_name(runtime.app_key, index))
        stack.push_async_callback(stream_journal.close)
        inbox = await journals.open(inbox_name(runtime.app_key, index))
        stack.push_async_callback(inbox.close)
        idempotency = await runtime.provider.keyspaces.open(idempotency_name(runtime.app_key))
        stack.push_async_callback(idempotency.close)

        tail = await read_tail(stream_journal)
        inbox_end = (await inbox.bounds()).end
        _log.info(
            "application %s: taking partition %d: stream offset %d, %d inbox records pending",
            runtime.app.identity.name,
            index,
            tail.next_offset,
            max(0, inbox_end - tail.inbox_position),
            extra=context,
        )
        stream = PartitionStream(pid, stream_journal, next_offset=tail.next_offset)
        # The previous owner may have committed events and died before its
        # observers (here or on peers) heard of them: publish the stream's
        # last events again; observers skip what they have already seen.
        republish = min(tail.next_offset, REPUBLISH_ON_TAKEOVER)
        if republish:
            runtime.bus.publish(await stream.events_at(tail.next_offset - republish, republish))
        aggregates = AggregateInstances(
            runtime.provider,
            runtime.app_key,
            site_key=s.site_key,
            clock=s.clock,
            snapshot_every=s.snapshot_every,
            cache_size=s.instance_cache_size,
            routed=runtime.routed_commands,
        )
        stack.push_async_callback(aggregates.close)
        materialiser = Materialiser(
            runtime.provider,
            runtime.app,
            aggregates,
            truncate=s.truncate_aggregate_journals,
            retry_base_delay=s.retry_base_delay,
            retry_max_delay=s.retry_max_delay,
            delay=s.materialise_delay,
        )
        if tail.materialised is not None:
            # Aggregate events a previous owner committed but had not yet
            # written to their instance journals (ADR 0007).
            await materialiser.recover_from(stream_journal, tail.materialised, tail.next_position)
        ctx = PartitionContext(
            app=runtime.app,
            settings=s,
            index=index,
            partition_id=pid,
            partition_count=runtime.partition_count,
            provider=runtime.provider,
            stream=stream,
            accept=runtime.accept,
            partition_of=runtime.partition_of,
            now=s.clock,
        )
        # Process steps in the home partition (ADR 0010): built before the
        # writer, whose headers carry their watermarks.
        homes = _HomeParts()
        consumers = runtime.consumers
        if consumers is not None and getattr(consumers, "has_processes", False):
            homes.steps, homes.records = consumers.home_steps(
                ctx,
                homes,
                record_limit=runtime.provider.limits.max_record_bytes,
                materialise_delay=s.materialise_delay,
                retry_max_delay=s.retry_max_delay,
            )
            # Steps the previous owner committed but had not written to their
            # instance records, and outboxes it may not have dispatched.
            for outbox in await homes.records.recover_from(
                stream_journal,
                materialised=(
                    tail.next_position if tail.materialised is None else tail.materialised
                ),
                dispatched=tail.dispatched,
                end=tail.next_position,
            ):
                homes.steps.redispatch(outbox.position, outbox.step)
        writer = StreamWriter(
            stream_journal,
            stream,
            runtime.bus,
            tail,
            clock=s.clock,
            batch_limit=s.stream_batch_limit,
            record_limit=runtime.provider.limits.max_record_bytes,
            progress_interval=s.progress_interval,
            retry_max_delay=s.retry_max_delay,
            watermark=homes.watermark(materialiser.watermark),
            dispatched=None if homes.steps is None else homes.steps.dispatched,
        )
        homes.writer = writer
        inbox_writer = runtime.inbox_writers[index]
        lost = False
        try:
            await writer.claim()  # fence off a previous owner before taking work
            async with anyio.create_task_group() as tg:
                commands = PartitionCommands(
                    app=runtime.app,
                    settings=s,
                    index=index,
                    provider=runtime.provider,
                    inbox=inbox,
                    inbox_writer=inbox_writer,
                    idempotency=idempotency,
                    writer=writer,
                    stream=stream,
                    bus=runtime.bus,
                    tail=tail,
                    inbox_end=inbox_end,
                    aggregates=aggregates,
                    materialiser=materialiser,
                    backlog_limit=s.backlog_limit,
                    deliveries=homes.sink(index, consumers),
                )
                if homes.steps is not None:
                    homes.steps.behind = commands.delivery_pending
                    homes.steps.inbox_read = commands.inbox_read_end
                await tg.start(materialiser.run)
                await tg.start(writer.run)
                inbox_writer.listener = commands.notify
                if homes.steps is not None and homes.records is not None:
                    await tg.start(homes.records.run)
                    await tg.start(homes.steps.run)
                    # Deliveries appended to the inbox before this node counted
                    # them (the listener, just set) are read before any in
                    # memory is taken: none may overtake one of them.
                    commands.hold_deliveries_below((await inbox.bounds()).end)
                    consumers.homes[index] = homes.steps
                await tg.start(commands.run)
                runtime.partitions[index] = commands
                # A peer's wake-up that came between the catch-up's read of the
                # inbox and the line above found no partition: read it once more.
                commands.poke()
                if runtime.consumers is not None:
                    await tg.start(runtime.consumers.run_partition, ctx)
        except BaseException as exc:
            lost, rest = _split_lost(exc)
            if not lost:
                raise
            _log.warning(
                "application %s: partition %d: another node appended to its stream (a new "
                "owner, or the previous one still committing); restarting it if still owned",
                runtime.app.identity.name,
                index,
                extra=context,
            )
            if rest is not None:
                # A bug that failed beside the loss goes the way of any other
                # error (the runner logs it in full and restarts the partition
                # if still owned); the loss still skips the final flush.
                raise rest from None
        finally:
            inbox_writer.listener = None
            runtime.partitions.pop(index, None)
            if homes.steps is not None and consumers.homes.get(index) is homes.steps:
                del consumers.homes[index]
            if not lost:
                with anyio.move_on_after(s.shutdown_timeout, shield=True):
                    try:
                        await writer.flush()
                        # Derived state too, so a restart need not rebuild it,
                        # and a record saying so for the next owner.
                        await materialiser.flush()
                        covered = materialiser.covered
                        if homes.records is not None:
                            await homes.records.flush()
                            covered = min(covered, homes.records.watermark(writer.next_position))
                        await writer.record_watermark(covered)
                    except Exception as exc:  # e.g. OwnershipLost: the next owner repairs
                        _log.info(
                            "application %s: partition %d: final stream flush skipped: %s",
                            runtime.app.identity.name,
                            index,
                            describe_error(exc),
                            extra=context,
                        )
            # Whatever is still queued was not committed: its local callers
            # fall back to the inbox.
            writer.close()


class _HomeParts:
    """A partition's process steps and instance records, if the application has processes.

    Stands in for the stream writer towards the steps (it is built after
    them, since its headers carry their watermarks).
    """

    def __init__(self) -> None:
        self.steps: Any = None
        self.records: Any = None
        self.writer: StreamWriter | None = None

    def enqueue_step(self, step: ProcessStep, on_durable: Any = None) -> Publication:
        assert self.writer is not None
        return self.writer.enqueue_step(step, on_durable)

    def watermark(self, aggregates: Callable[[int], int]) -> Callable[[int], int]:
        """The materialised watermark: aggregate commands and, if on, process steps."""
        if self.records is None:
            return aggregates
        records = self.records
        return lambda position: min(aggregates(position), records.watermark(position))

    def sink(self, index: int, consumers: Any) -> DeliverySink | None:
        """What the partition's batch hands the deliveries it reads from its inbox to."""
        if self.steps is None:
            return None

        def deliver(entry: InboxEntry, ack: Callable[[BaseException | None], None]) -> bool:
            assert entry.source is not None
            return bool(
                consumers.inbox_delivery(
                    index,
                    entry.envelope,
                    handler_key=entry.handler_key,
                    instance_id=entry.instance_id,
                    source=entry.source,
                    ack=ack,
                )
            )

        return deliver


def _split_lost(exc: BaseException) -> tuple[bool, BaseException | None]:
    """Whether *exc* reports a lost partition, and what in it is not part of the loss.

    An ``OwnershipLost`` anywhere in *exc* means the partition is lost. Store
    errors and cancellations beside it are its echoes (other tasks fenced off
    or stopped with it); anything else is returned, as a group, to be raised.
    """
    if isinstance(exc, OwnershipLost):
        return True, None
    if not isinstance(exc, BaseExceptionGroup):
        return False, exc
    lost, rest = exc.split(OwnershipLost)
    if lost is None:
        return False, exc
    if rest is not None:
        _, rest = rest.split(_is_echo)
    return True, rest


def _is_echo(exc: BaseException) -> bool:
    # False for a group, so that split() looks inside it.
    return isinstance(exc, PersistenceError | anyio.get_cancelled_exc_class())
