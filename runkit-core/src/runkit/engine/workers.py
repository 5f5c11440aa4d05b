"""Kept workers: long-lived tasks that take queued items, started only as needed.

Spawning a task per item costs a task group entry, a cancel scope and a
scheduler round trip. ``KeptWorkers`` starts a worker only when an item finds
every worker busy, up to a limit, and keeps it: an idle worker waits on an
event of its own until the next item.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

import anyio

from .signals import event_maker

__all__ = ["KeptWorkers"]

T = TypeVar("T")


class KeptWorkers(Generic[T]):
    """Runs *work* on submitted items, in submission order, with at most *limit* workers.

    *start* starts a task (e.g. a task group's ``start_soon``); workers live
    until it cancels them.
    """

    def __init__(
        self,
        start: Callable[[Callable[[], Coroutine[Any, Any, None]]], object],
        work: Callable[[T], Awaitable[None]],
        *,
        limit: int,
    ) -> None:
        self._start = start
        self._work = work
        self._limit = limit
        self._items: deque[T] = deque()
        self._idle: deque[anyio.Event] = deque()  # one per worker with nothing to do
        self._workers = 0

    def submit(self, item: T) -> None:
        """Queue *item*; wake an idle worker, or start one if all are busy and room is left."""
        self._items.append(item)
        if self._idle:
            self._idle.popleft().set()
        elif self._workers < self._limit:
            self._workers += 1
            self._start(self._worker)
        # else every worker is busy: the first to finish takes it

    async def _worker(self) -> None:
        new_event = event_maker()  # in the loop this worker runs in
        while True:
            if not self._items:
                turn = new_event()
                self._idle.append(turn)
                await turn.wait()
                continue
            await self._work(self._items.popleft())
