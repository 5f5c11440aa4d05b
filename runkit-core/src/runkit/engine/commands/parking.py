"""Parked aggregate instances: their commands wait, in order, while they load or retry.

A command for an instance that is not cached parks the instance while a loader
loads it; a failed command parks it until its retry (``Retries``), or, when it
is poisoned, until its poison record is durable. Commands arriving meanwhile
queue behind; unparking hands them all back to the batch
loop, in order. Loaders are kept workers (``KeptWorkers``), at most
``_LOADERS``: a workload that opens a new instance per command (the
bank's transactions) spawns no task per instance.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable

import anyio

from ...config import HandlerConfig
from ...persistence import LimitExceeded, PersistenceError
from ..backoff import backoff
from ..workers import KeptWorkers
from .pending import PendingCommand
from .retries import failure_reason

__all__ = ["ParkedInstances"]

# Part of the batch processor: logs as it.
_log = logging.getLogger("runkit.engine.commands.batches")

#: Instances loaded at once per partition, at most.
_LOADERS = 64


class ParkedInstances:
    """Aggregate instances being loaded or retried, by (handler key, instance ID).

    Unparked commands go back to *ready*, and *wake* wakes the batch loop;
    *start* runs a task in the partition, *load* loads an instance into the
    cache, *failure* is ``Retries.failure`` and *poison* is ``Retries.poison``.
    """

    def __init__(
        self,
        ready: deque[PendingCommand],
        *,
        wake: Callable[[], None],
        start: Callable[..., None],
        load: Callable[[HandlerConfig, str], Awaitable[object]],
        failure: Callable[[PendingCommand, Exception], float | None],
        poison: Callable[[PendingCommand, str, int], Awaitable[None]],
        retry_base_delay: float,
    ) -> None:
        self._ready = ready
        self._wake = wake
        self._start = start
        self._load_instance = load
        self._failure = failure
        self._poison = poison
        self._retry_base_delay = retry_base_delay
        # Aggregate instances being loaded or retried: their commands wait here, in order.
        self._parked: dict[tuple[str, str], deque[PendingCommand]] = {}
        self._loaders: KeptWorkers[tuple[HandlerConfig, tuple[str, str]]] = KeptWorkers(
            start, self._load, limit=_LOADERS
        )

    def join(self, key: tuple[str, str], item: PendingCommand) -> bool:
        """If instance *key* is parked, queue *item* behind its commands (``True``)."""
        parked = self._parked.get(key)
        if parked is not None:
            parked.append(item)
            return True
        return False

    def load(self, handler: HandlerConfig, key: tuple[str, str], item: PendingCommand) -> None:
        """Instance *key* is not cached: park it with *item* while a loader loads it."""
        self._parked[key] = deque([item])
        self._loaders.submit((handler, key))

    def retry_later(self, item: PendingCommand, exc: Exception, key: tuple[str, str]) -> None:
        """An aggregate command failed: its instance waits until it is retried or poisoned."""
        delay = self._failure(item, exc)
        if delay is None:
            self.poison(key, item, failure_reason(exc), item.failures)
            return
        self._parked.setdefault(key, deque()).appendleft(item)
        self._start(self._unpark_after, key, delay, item)

    def poison(
        self, key: tuple[str, str], item: PendingCommand, reason: str, attempts: int
    ) -> None:
        """Poison *item*; instance *key* stays parked until the poison record is durable.

        Until then the inbox may still hold the command: a crash would hand it
        to the next owner, which must not find later commands of the instance
        committed before it.
        """
        self._parked.setdefault(key, deque())
        self._start(self._poison_then_unpark, key, item, reason, attempts)

    def unpark(self, key: tuple[str, str]) -> None:
        """Instance *key* may go on: its commands are ready again."""
        parked = self._parked.pop(key, None)
        if parked:
            # In front: a newer command for the instance may have reached the
            # ready queue since the loop last drained it.
            self._ready.extendleft(reversed(parked))
            self._wake()

    async def _load(self, load: tuple[HandlerConfig, tuple[str, str]]) -> None:
        handler, key = load
        failures = 0
        while True:
            try:
                await self._load_instance(handler, key[1])
                break
            except PersistenceError as exc:
                if isinstance(exc, LimitExceeded):
                    # The same on every attempt (an instance ID too long for the
                    # store, accepted before acceptance checked it): the
                    # command's retries and poisoning decide, as for a bug.
                    self._blame_first(key, exc)
                    return
                failures += 1
                delay = backoff(failures, self._retry_base_delay, 5.0)
                _log.warning(
                    "loading %s instance %s failed, retrying in %.2fs: %s",
                    handler.identity.name,
                    key[1],
                    delay,
                    exc,
                )
                await anyio.sleep(delay)
            except Exception as exc:
                # new()/apply_event()/unmarshal failed: a bug, or a transient
                # problem in the root's code.
                self._blame_first(key, exc)
                return
        self.unpark(key)

    def _blame_first(self, key: tuple[str, str], exc: Exception) -> None:
        """Loading instance *key* failed with *exc*: its first command takes the blame."""
        parked = self._parked.get(key)
        if parked:
            # The instance stays parked: until the retry, or the poison record.
            self.retry_later(parked.popleft(), exc, key)

    async def _poison_then_unpark(
        self, key: tuple[str, str], item: PendingCommand, reason: str, attempts: int
    ) -> None:
        await self._poison(item, reason, attempts)
        self.unpark(key)

    async def _unpark_after(self, key: tuple[str, str], delay: float, item: PendingCommand) -> None:
        await anyio.sleep(delay)
        await item.spill_landed()  # as integration retries do (ADR 0002)
        self.unpark(key)
