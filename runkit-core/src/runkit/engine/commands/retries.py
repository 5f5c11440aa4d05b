"""Failing commands: retried with backoff, or moved to the poison store.

After each handler failure ``Retries`` decides: retry after a capped
exponential backoff with jitter (a local command is spilled to the inbox
meanwhile), or, after ``max_attempts`` failures, tell the caller to write
the command to the partition's poison store (``poison``), which finishes it.
An aggregate command waits for its retry, or for its poison record to be
durable, with its instance parked (``parking``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
import msgspec
from opentelemetry import metrics

from ...persistence import LimitExceeded, PersistenceError, Provider
from ..backoff import backoff
from ..logs import MAX_ERROR_CHARS, SHORT_ERROR_CHARS, LogContext, shortened
from ..settings import EngineSettings
from .pending import PendingCommand
from .poison import PoisonRecord, write_poison

__all__ = ["Retries", "failure_reason"]

# Part of the batch processor: logs as it.
_log = logging.getLogger("runkit.engine.commands.batches")
_meter = metrics.get_meter("runkit.engine")
_failed = _meter.create_counter("runkit.commands.failed", description="failed handling attempts")
_poisoned = _meter.create_counter("runkit.commands.poisoned", description="commands poisoned")


def failure_reason(exc: BaseException) -> str:
    """What a poison record says of the failure *exc*."""
    return f"{type(exc).__name__}: {exc}"


class Retries:
    """What happens to a command whose handler failed: a retry or the poison store.

    *spill* makes a local command durable in the inbox; *finish* completes a
    command once it is poisoned (committing that through the stream).
    """

    def __init__(
        self,
        *,
        settings: EngineSettings,
        provider: Provider,
        app_key: str,
        index: int,
        spill: Callable[[PendingCommand], None],
        finish: Callable[[PendingCommand], Awaitable[None]],
    ) -> None:
        self._settings = settings
        self._provider = provider
        self._app_key = app_key
        self._index = index
        self._spill = spill
        self._finish = finish

    def failure(self, item: PendingCommand, exc: Exception) -> float | None:
        """A handler failed: return the delay before retrying, or ``None`` to poison it.

        On ``None`` the caller poisons the command (``poison``, with
        ``failure_reason(exc)``): an aggregate command's instance must stay
        parked until the record is durable.
        """
        handler = item.handler
        name = handler.identity.name if handler is not None else item.entry.handler_key
        item.failures += 1
        _failed.add(1, {"handler": name})
        about = LogContext.of_message(
            item.entry.envelope,
            partition=self._index,
            handler=name,
            instance_id=item.entry.instance_id,
        )
        if item.failures >= self._settings.max_attempts:
            _log.error(
                "command %r failed %d times; moving it to the poison store (%s): %s: %s",
                item.entry.envelope.description,
                item.failures,
                about,
                type(exc).__name__,
                exc,
                exc_info=exc,
                extra=about.extra,
            )
            return None
        delay = backoff(
            item.failures, self._settings.retry_base_delay, self._settings.retry_max_delay
        )
        _log.warning(
            "command %r failed (attempt %d), retrying in %.2fs (%s): %s: %s",
            item.entry.envelope.description,
            item.failures,
            delay,
            about,
            type(exc).__name__,
            exc,
            extra=about.extra,
        )
        self._spill(item)
        return delay

    async def poison(self, item: PendingCommand, reason: str, attempts: int) -> None:
        """Write *item* to the poison store (retrying storage faults), then finish it.

        A record the store refuses as too large (``LimitExceeded``, the same on
        every attempt) is written again with the error text cut short; if even
        that does not fit, the command is finished unrecorded, with an error
        logged, rather than holding up its instance for ever.
        """
        record = PoisonRecord(
            entry=item.entry,
            handler_key=item.entry.handler_key,
            error=shortened(reason, MAX_ERROR_CHARS),
            attempts=attempts,
            poisoned_at=self._settings.clock(),
            inbox_position=item.position,
        )
        failures = 0
        while True:
            try:
                await write_poison(self._provider, self._app_key, self._index, record)
                break
            except LimitExceeded as exc:
                if len(record.error) > SHORT_ERROR_CHARS:
                    record = msgspec.structs.replace(
                        record, error=shortened(record.error, SHORT_ERROR_CHARS)
                    )
                    continue
                _log.error(
                    "command %r (%s) cannot be recorded in the poison store, so it is "
                    "dropped: %s; it failed with: %s",
                    item.entry.envelope.description,
                    item.command_id,
                    exc,
                    record.error,
                )
                break
            except PersistenceError as exc:
                failures += 1
                delay = backoff(failures, self._settings.retry_base_delay, 5.0)
                _log.warning(
                    "writing poison record of command %s failed, retrying in %.2fs: %s",
                    item.command_id,
                    delay,
                    exc,
                )
                await anyio.sleep(delay)
        _poisoned.add(1, {"handler_key": item.entry.handler_key})
        await self._finish(item)
