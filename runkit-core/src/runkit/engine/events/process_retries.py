"""Retrying a process handler's message, and poisoning it once the retries are spent.

Routing an event (``process_routing``) and handling a delivery, an event or
a deadline, in its home partition (``process_homes``) both run through
``MessageRetries.run``: a handler error is retried with capped backoff; after
``max_attempts`` attempts (at once for a bug: ``ProcessBug``,
``dogma.UnexpectedMessage``, ``dogma.ValidationError``) the message is recorded
in the partition's event poison store (``<app>/event-poison/<p>``) and the
instance moves on. Persistence errors are retried for ever. The outbox
(``process_outbox``) records a stuck dispatch through ``MessageRetries.poison``.

The processes' loggers live here too, shared by the runner, its outbox and
these retries, so that a store outage logs one line per handler and partition
per interval whichever of them meets it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec

import dogma

from ...config import HandlerConfig
from ...persistence import LimitExceeded, PersistenceError
from ..envelope import Envelope, encode
from ..logs import (
    SHORT_ERROR_CHARS,
    LogContext,
    RateLimitedLog,
    describe_error,
    shortened,
)
from .consumers_support import ConsumerOptions, sleep_backoff
from .process_scopes import ProcessBug
from .process_stores import PoisonedMessage, event_poison_store_name, poison_error

if TYPE_CHECKING:
    from ..partitions import PartitionContext

__all__ = ["MessageRetries", "process_log", "process_store_log"]

process_log = logging.getLogger("runkit.engine.events.processes")
# Store failures repeat for as long as an outage lasts: one line per handler and
# partition per interval.
process_store_log = RateLimitedLog(process_log, 10.0)

_encoder = msgspec.msgpack.Encoder()


class MessageRetries:
    """Retries and poisoning for the messages of one process handler on this node.

    Shared by the handler's consumers on every owned partition and by its
    deadline timers, like the runner that owns it.
    """

    def __init__(self, app_key: str, config: HandlerConfig, options: ConsumerOptions) -> None:
        self.app_key = app_key
        self.config = config
        self.key = config.identity.key
        self.options = options

    async def run(
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
            except (
                LimitExceeded,
                ProcessBug,
                dogma.UnexpectedMessage,
                dogma.ValidationError,
            ) as exc:
                # LimitExceeded is a store refusal that is the same on every
                # attempt (an instance ID longer than its keys, a root larger
                # than its values): a bug, unlike other persistence errors.
                attempts += 1
                error: Exception = exc
                give_up = True
            except PersistenceError as exc:
                store_failures += 1
                # Built only on failure: most messages succeed at once.
                about = LogContext.of_message(
                    envelope, partition=ctx.index, instance_id=instance_id
                )
                process_store_log.warning(
                    (self.key, ctx.index),
                    "%s: persistence error; retrying (%s): %s",
                    self.config.describe(),
                    about,
                    describe_error(exc),
                    extra=about.extra,
                )
                await sleep_backoff(self.options, store_failures)
                continue
            except Exception as exc:
                attempts += 1
                error = exc
                give_up = attempts >= self.options.max_attempts
            what = f"{self.config.describe()} handling {envelope.description!r}"
            about = LogContext.of_message(envelope, partition=ctx.index, instance_id=instance_id)
            if not give_up:
                process_log.warning(
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
            process_log.error(
                "%s failed (attempt %d); moving it to the poison store (%s): %s",
                what,
                attempts,
                about,
                describe_error(error),
                exc_info=error,
                extra=about.extra,
            )
            await self.poison(
                ctx,
                poison_key,
                PoisonedMessage(
                    handler_key=self.key,
                    envelope=encode(envelope),
                    instance_id=instance_id,
                    stream_id=stream[0] if stream else None,
                    offset=stream[1] if stream else None,
                    error=poison_error(error),
                    attempts=attempts,
                    poisoned_at=ctx.now(),
                ),
            )
            return

    async def poison(self, ctx: PartitionContext, key: str, record: PoisonedMessage) -> None:
        """Record *record* under *key* in the partition's event poison store, retrying.

        A record the store refuses as too large (``LimitExceeded``, the same on
        every attempt) is written again with its error text cut short; if even
        that does not fit, the message is dropped with an error logged rather
        than holding up the consumer for ever.
        """
        name = event_poison_store_name(self.app_key, ctx.index)
        attempts = 0
        while True:
            try:
                async with await ctx.provider.keyspaces.open(name) as poison:
                    await poison.set_unconditional(key.encode(), _encoder.encode(record))
                return
            except LimitExceeded as exc:
                if len(record.error) > SHORT_ERROR_CHARS:
                    record = msgspec.structs.replace(
                        record, error=shortened(record.error, SHORT_ERROR_CHARS)
                    )
                    continue
                process_log.error(
                    "%s on partition %d: message %s cannot be recorded in the poison "
                    "store, so it is dropped: %s; it failed with: %s",
                    self.config.describe(),
                    ctx.index,
                    key,
                    describe_error(exc),
                    record.error,
                )
                return
            except PersistenceError as exc:
                attempts += 1
                process_store_log.warning(
                    (self.key, ctx.index, "poison"),
                    "%s on partition %d: cannot record poisoned message %s; retrying: %s",
                    self.config.describe(),
                    ctx.index,
                    key,
                    describe_error(exc),
                )
                await sleep_backoff(self.options, attempts)
