"""A process instance's outbox: dispatching it once committed.

A step commits the commands and deadlines its group produced (its outbox) in
the home partition's stream record; ``OutboxDispatcher.dispatch`` then sends
them: deadlines appended to their home partition's deadline journal (waking
its timer), then commands through ``ctx.accept`` with IDs derived from the
cause. The handling is committed, so dispatch is retried until it succeeds;
an outbox that keeps failing is also recorded in the event poison store
(``_outbox_stuck``). The same dispatch sends the outbox an instance record
written by an earlier version may still hold, when the record is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ...config import HandlerConfig
from ...persistence import PersistenceError
from ..envelope import decode
from ..logs import describe_error
from .consumers_support import ConsumerOptions, sleep_backoff
from .deadlines import DeadlineEntry, append_deadlines, deadline_journal_name
from .process_instances import ProcessRecord
from .process_retries import MessageRetries
from .process_retries import process_log as _log
from .process_retries import process_store_log as _store_log
from .process_stores import PoisonedMessage, outbox_poison_key, poison_error

if TYPE_CHECKING:
    from ..partitions import PartitionContext

__all__ = ["OutboxDispatcher"]


class OutboxDispatcher:
    """Dispatches the outboxes of one process handler's instances on this node.

    Records a stuck outbox through the runner's ``MessageRetries``.
    *wake_timer* is told the partition index whenever this node appends to a
    deadline journal, so a local timer re-reads it at once.
    """

    def __init__(
        self,
        app_key: str,
        config: HandlerConfig,
        *,
        options: ConsumerOptions,
        retries: MessageRetries,
        wake_timer: Callable[[int], None],
    ) -> None:
        self.app_key = app_key
        self.config = config
        self.key = config.identity.key
        self.options = options
        self._retries = retries
        self._wake_timer = wake_timer

    async def dispatch(
        self, ctx: PartitionContext, instance_id: str, record: ProcessRecord
    ) -> None:
        """Send the committed outbox of *record*: deadlines, then commands.

        The handling is committed, so the outbox is never dropped and dispatch
        is retried until it succeeds (with capped backoff), holding up only
        this instance's later outboxes: other instances dispatch meanwhile. After
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
