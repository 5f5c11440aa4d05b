"""A process instance's outbox: dispatching it once committed, and clearing it after.

A commit writes the commands and deadlines the group produced into the
instance's record (its outbox); ``OutboxDispatcher.dispatch`` then sends them:
deadlines appended to their home partition's deadline journal (waking its
timer), then commands through ``ctx.accept`` with IDs derived from the cause. The
handling is committed, so dispatch is retried until it succeeds; an outbox that
keeps failing is also recorded in the event poison store (``_outbox_stuck``).

The dispatched outbox stays in the record until the instance's next commit drops
it. For instances that do not commit again within a checkpoint interval (an
ended one never does) the consumer writes the record without it
(``clear_outboxes``), and once more as it stops (``clear_all_outboxes``), so a
later load does not dispatch it again long after.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import attrs
import msgspec

from ...config import HandlerConfig
from ...persistence import Conflict, Keyspace, PersistenceError
from ..envelope import decode
from ..logs import describe_error
from .consumers_support import ConsumerOptions, sleep_backoff
from .deadlines import DeadlineEntry, append_deadlines, deadline_journal_name
from .process_instances import CachedInstance, InstanceCache, ProcessRecord
from .process_retries import MessageRetries
from .process_retries import process_log as _log
from .process_retries import process_store_log as _store_log
from .process_stores import PoisonedMessage, outbox_poison_key, poison_error

if TYPE_CHECKING:
    from ..partitions import PartitionContext

__all__ = ["OutboxDispatcher"]

_encoder = msgspec.msgpack.Encoder()


class OutboxDispatcher:
    """Dispatches and clears the outboxes of one process handler's instances on this node.

    Shares the handler's ``InstanceCache`` with its runner (cleared entries go
    back into it) and records a stuck outbox through the runner's
    ``MessageRetries``. *wake_timer* is told the partition index whenever this
    node appends to a deadline journal, so a local timer re-reads it at once.
    """

    def __init__(
        self,
        app_key: str,
        config: HandlerConfig,
        *,
        options: ConsumerOptions,
        cache: InstanceCache,
        retries: MessageRetries,
        wake_timer: Callable[[int], None],
    ) -> None:
        self.app_key = app_key
        self.config = config
        self.key = config.identity.key
        self.options = options
        self._cache = cache
        self._retries = retries
        self._wake_timer = wake_timer

    async def dispatch(
        self, ctx: PartitionContext, instance_id: str, record: ProcessRecord
    ) -> None:
        """Send the committed outbox of *record*: deadlines, then commands.

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
        # Deadlines first: a local integration command is durable only once its
        # handle_command returns, so accepting the commands may last as long as
        # an external call, and a timeout scheduled to guard that call must be
        # armed meanwhile. Appended once, not again on each retry of the commands.
        deadlines_appended = not record.deadlines
        while True:
            try:
                if not deadlines_appended:
                    await self._append_deadlines(ctx, record)
                    deadlines_appended = True
                if record.commands:
                    await ctx.accept([decode(c) for c in record.commands])
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
        record: ProcessRecord,
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
        await self._retries.poison(
            ctx,
            outbox_poison_key(self.key, instance_id, ctx.provider.limits.max_key_bytes),
            PoisonedMessage(
                handler_key=self.key,
                envelope=first,
                instance_id=instance_id,
                stream_id=None,
                offset=None,
                error=poison_error(error),
                attempts=attempts,
                poisoned_at=ctx.now(),
            ),
        )

    async def _append_deadlines(self, ctx: PartitionContext, record: ProcessRecord) -> None:
        by_home: dict[int, list[DeadlineEntry]] = {}
        for d in record.deadlines:
            by_home.setdefault(d.partition, []).append(d.entry)
        for home, entries in by_home.items():
            name = deadline_journal_name(self.app_key, home)
            async with await ctx.provider.journals.open(name) as journal:
                await append_deadlines(journal, entries)
            self._wake_timer(home)

    async def clear_outboxes_periodically(self, ctx: PartitionContext, records: Keyspace) -> None:
        """Every checkpoint interval, clear outboxes dispatched at least an interval ago."""
        interval = self.options.checkpoint_interval
        while True:
            await anyio.sleep(interval)
            error = await self.clear_outboxes(ctx, records, anyio.current_time() - interval)
            if error is not None:
                _store_log.warning(
                    (self.key, ctx.index),
                    "%s on partition %d: cannot clear dispatched outboxes; will retry: %s",
                    self.config.describe(),
                    ctx.index,
                    describe_error(error),
                )

    async def clear_all_outboxes(self, ctx: PartitionContext, records: Keyspace) -> None:
        """Clear every dispatched outbox of the partition, retrying until none fails.

        Called as the consumer stops (the caller bounds the time): the entries
        are dropped next, and an outbox nobody clears stays in its record until
        the instance is next loaded, perhaps long after.
        """
        failures = 0
        while (error := await self.clear_outboxes(ctx, records, None)) is not None:
            failures += 1
            _log.info("final clear of dispatched outboxes failed; retrying: %s", error)
            await sleep_backoff(self.options, failures)

    async def clear_outboxes(
        self, ctx: PartitionContext, records: Keyspace, dispatched_before: float | None
    ) -> PersistenceError | None:
        """Write the records of idle cached instances without their dispatched outbox.

        Instances that commit again soon drop the outbox in that commit; this
        covers the others (an ended instance never commits again), so a later
        load does not dispatch the outbox again long after (``None``: all).
        Returns the last persistence error, if a write failed: those entries
        stay dirty at their old revision, so the next attempt either writes
        the record or gets ``Conflict`` because the failed write landed after all.
        """
        before = math.inf if dispatched_before is None else dispatched_before
        error: PersistenceError | None = None
        for instance_id in self._cache.due_clears(ctx.index, before):
            if self._cache.busy(instance_id):
                continue  # being handled: its commit drops the outbox anyway
            async with self._cache.lock(instance_id):
                try:
                    await self._clear(ctx, records, instance_id)
                except PersistenceError as exc:
                    error = exc
        return error

    async def clear_now(
        self,
        ctx: PartitionContext,
        records: Keyspace,
        instance_id: str,
        handled: CachedInstance | None = None,
    ) -> None:
        """Clear the instance's dispatched outbox now, if it has one (raises on failure).

        For a deadline's outbox: the deadline timer truncates its journal past
        a fired deadline, so nothing would deliver it again to a next owner
        if this node stopped before the background clear. *handled* is the
        instance as the handling left it, for when it was not cached (its
        partition's consumer restarted meanwhile).
        """
        async with self._cache.lock(instance_id):
            await self._clear(ctx, records, instance_id, handled)

    async def _clear(
        self,
        ctx: PartitionContext,
        records: Keyspace,
        instance_id: str,
        handled: CachedInstance | None = None,
    ) -> None:
        """Write the instance's record without its dispatched outbox (lock held)."""
        entry = self._cache.get(instance_id) or handled
        if entry is None or entry.dispatched_at is None or entry.partition != ctx.index:
            return
        cleared = entry.record.without_outbox()
        try:
            revision = await records.set(
                instance_id.encode(), _encoder.encode(cleared), entry.revision
            )
        except Conflict:
            # Written since (by another node, or by an earlier attempt whose
            # outcome was unknown): the stored record is newer.
            self._cache.drop(instance_id)
            return
        self._cache.put(
            instance_id,
            attrs.evolve(entry, record=cleared, revision=revision, dispatched_at=None, held=None),
        )
