"""Integration commands of a partition, each run in a task.

``MINIMIZE`` integrations run one command at a time per handler; the others
run concurrently, but never two commands with the same ID at once. A command
found completed (or marked, for a keyed command) is a duplicate; otherwise the
handler's events are queued on the stream writer (they join the next record)
and a keyed command is marked once that record is durable. Handler failures
are retried or poisoned (``Retries``); storage faults are retried without
counting against the command.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Container
from typing import Protocol

import anyio

import dogma

from ...config import HandlerConfig
from ...persistence import PersistenceError
from ..backoff import backoff
from ..envelope import Envelope
from ..settings import EngineSettings
from ..streams import OwnershipLost, Publication, max_command_bytes
from .integrations import execute_integration
from .markers import Markers
from .pending import CompletedCommands, Location, PendingCommand
from .poison import HandlerBug
from .retries import Retries, failure_reason

__all__ = ["IntegrationTasks"]

# Part of the batch processor: logs as it.
_log = logging.getLogger("runkit.engine.commands.batches")


class _Publish(Protocol):
    def __call__(
        self,
        item: PendingCommand,
        events: tuple[Envelope, ...],
        record: None,
        *,
        pinned: bool = False,
    ) -> Publication | None: ...


class IntegrationTasks:
    """Runs the integration commands of one partition.

    *start* runs a task in the partition; *publish* queues a handled command on
    the stream writer; *duplicate* completes a command handled before.
    """

    def __init__(
        self,
        *,
        settings: EngineSettings,
        start: Callable[..., None],
        completed: CompletedCommands,
        markers: Markers,
        retries: Retries,
        publish: _Publish,
        duplicate: Callable[[PendingCommand, Location], None],
        publishing: Container[str],
        record_limit: int,
    ) -> None:
        self._max_event_bytes = max_command_bytes(record_limit)
        self._publishing = publishing
        self._settings = settings
        self._start = start
        self._completed = completed
        self._markers = markers
        self._retries = retries
        self._publish = publish
        self._duplicate = duplicate
        # MINIMIZE integrations: their commands, run one at a time per handler.
        self._serial: dict[str, deque[PendingCommand]] = {}
        # Integration commands being handled, by ID (a repeated ID waits for the first).
        self._running: dict[str, anyio.Event] = {}

    def handle(self, item: PendingCommand, handler: HandlerConfig) -> None:
        """Start handling *item* (an integration command of *handler*)."""
        if handler.concurrency is dogma.ConcurrencyPreference.MINIMIZE:
            queue = self._serial.get(handler.identity.key)
            if queue is None:
                queue = self._serial[handler.identity.key] = deque()
                self._start(self._run_serial, handler.identity.key, queue)
            queue.append(item)
        else:
            self._start(self._run_integration, item)

    async def _run_serial(self, handler_key: str, queue: deque[PendingCommand]) -> None:
        try:
            while queue:
                await self._run_integration(queue[0])
                queue.popleft()
        finally:
            if self._serial.get(handler_key) is queue:
                del self._serial[handler_key]

    async def _run_integration(self, item: PendingCommand) -> None:
        command_id = item.command_id
        # The same command ID may be pending twice (a retried idempotency key):
        # never handle both at once, nor before the first is published.
        while (other := self._running.get(command_id)) is not None:
            await other.wait()
        self._running[command_id] = finished = anyio.Event()
        try:
            await self._integration_attempts(item)
        finally:
            del self._running[command_id]
            finished.set()

    async def _integration_attempts(self, item: PendingCommand) -> None:
        handler = item.handler
        assert handler is not None
        entry = item.entry
        storage_failures = 0
        while True:
            in_handler = False
            try:
                if item.command_id in self._completed or item.command_id in self._publishing:
                    self._duplicate(item, self._completed.location(item.command_id))
                    return
                if entry.keyed:
                    marked, location = await self._markers.marked(item.command_id)
                    if marked:
                        self._completed.add(item.command_id, location)
                        self._duplicate(item, location)
                        return
                in_handler = True
                events = await execute_integration(
                    handler,
                    entry,
                    site_key=self._settings.site_key,
                    clock=self._settings.clock,
                    max_bytes=self._max_event_bytes,
                )
                in_handler = False
                publication = self._publish(item, events, None, pinned=entry.keyed)
                if entry.keyed and publication is not None:
                    await self._markers.mark_after(publication)
                return
            except OwnershipLost:
                raise
            except HandlerBug as exc:
                _log.error(
                    "%s; poisoning command %s (%s)",
                    exc,
                    item.command_id,
                    entry.envelope.description,
                )
                await self._retries.poison(item, str(exc), item.failures + 1)
                return
            except PersistenceError as exc:
                if in_handler:
                    # The handler's own store failed (its exception, not the
                    # engine's): retried, counted and poisoned like any failure.
                    if await self._failed(item, exc):
                        return
                    continue
                storage_failures += 1
                delay = backoff(storage_failures, self._settings.retry_base_delay, 5.0)
                _log.warning(
                    "storage fault handling command %s (%s), retrying in %.2fs: %s",
                    item.command_id,
                    entry.envelope.description,
                    delay,
                    exc,
                )
                await anyio.sleep(delay)
            except Exception as exc:
                if await self._failed(item, exc):
                    return

    async def _failed(self, item: PendingCommand, exc: Exception) -> bool:
        """The handler failed: poison the command (``True``) or wait for its retry."""
        retry_in = self._retries.failure(item, exc)
        if retry_in is None:
            await self._retries.poison(item, failure_reason(exc), item.failures)
            return True
        await anyio.sleep(retry_in)
        # Commit only once the spill's inbox position is known, so
        # that the record says the inbox was read past it (ADR 0002).
        await item.spill_landed()
        return False
