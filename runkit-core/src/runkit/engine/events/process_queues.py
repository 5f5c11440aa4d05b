"""A process consumer's plumbing: per-instance queues and the stream checkpoint.

``InstanceQueues`` runs each instance's events in order and different instances
concurrently, with back-pressure on the stream reader; ``ConsumerCheckpoint``
saves the consumer's stream offset (the lowest unfinished event) in the
background with conditional writes.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import msgspec

from ...persistence import Conflict, Keyspace, PersistenceError
from ..logs import RateLimitedLog, describe_error
from ..signals import event_maker
from ..workers import KeptWorkers

if TYPE_CHECKING:
    from ..streams import StreamEvent

__all__ = ["ConsumerCheckpoint", "InstanceQueues"]

_log = logging.getLogger("runkit.engine.events.processes")
_save_log = RateLimitedLog(_log, 10.0)
_encoder = msgspec.msgpack.Encoder()
_int_decoder = msgspec.msgpack.Decoder(int)


class InstanceQueues:
    """Runs each instance's events in order, different instances concurrently.

    A worker takes everything queued for one instance so far and hands it to
    *consume* as one group (committed with one write), until the instance's
    queue is empty. Workers are started as needed, at most one per unfinished
    event slot, and kept: a process event costs no task spawn. ``put``
    blocks while *limit* events are unfinished (back-pressure on the stream
    reader); it does not yield while a slot is free, so the events of one
    stream record are all queued before a worker starts on them. The
    checkpoint follows the lowest unfinished offset, so a restart redelivers
    every event that was not finished.
    """

    def __init__(
        self,
        tg: anyio.abc.TaskGroup,
        consume: Callable[[str, list[StreamEvent]], Awaitable[None]],
        checkpoint: ConsumerCheckpoint,
        *,
        limit: int,
    ) -> None:
        self._consume = consume
        self._checkpoint = checkpoint
        self._slots = anyio.Semaphore(limit)
        self._queues: dict[str, deque[StreamEvent]] = {}
        self._unfinished: set[int] = set()
        self._read = checkpoint.value  # next offset after the last event put
        self._new_event = event_maker()
        # Made only while ``join`` waits: most consumers never join, and an
        # event per busy spell would cost more than the rest of ``_advance``.
        self._idle: anyio.Event | None = None
        # Takes each instance that has events and no worker (``_work``).
        self._workers: KeptWorkers[str] = KeptWorkers(tg.start_soon, self._work, limit=limit)

    async def put(self, instance_id: str | None, event: StreamEvent) -> None:
        """Queue *event* for *instance_id*; ``None`` marks it done at once (not handled)."""
        if instance_id is None:
            self._read = event.offset + 1
            self._advance()
            return
        try:
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            await self._slots.acquire()
        # Only now is the event read: while we waited for a slot, a finishing
        # worker must not move the checkpoint past it.
        self._read = event.offset + 1
        self._unfinished.add(event.offset)
        queue = self._queues.get(instance_id)
        if queue is not None:
            queue.append(event)  # its worker is running and will get to it
            return
        self._queues[instance_id] = deque([event])
        self._workers.submit(instance_id)

    def skip_to(self, offset: int) -> None:
        """Every event before *offset* not yet put is of no interest: done.

        Called by the stream reader only while the consumer waits for its
        next event (never while ``put`` waits for a slot).
        """
        if offset > self._read:
            self._read = offset
            self._advance()

    async def join(self) -> None:
        """Wait until every queued event is finished."""
        while self._unfinished:
            if self._idle is None:
                self._idle = self._new_event()
            await self._idle.wait()

    async def _work(self, instance_id: str) -> None:
        queue = self._queues[instance_id]
        while queue:
            group = list(queue)
            await self._consume(instance_id, group)
            for event in group:
                queue.popleft()
                self._unfinished.discard(event.offset)
                self._slots.release()
            self._advance()
        # No await since the last check: nothing was queued after it.
        del self._queues[instance_id]

    def _advance(self) -> None:
        self._checkpoint.value = min(self._unfinished, default=self._read)
        if not self._unfinished and self._idle is not None:
            self._idle.set()
            self._idle = None


class ConsumerCheckpoint:
    """A process consumer's stream offset, saved with conditional writes in the background.

    ``value`` is the lowest unfinished offset; what is saved is never above
    *floor*'s answer either (the events whose outboxes are not cleared yet,
    ``InstanceCache.hold_floor``).
    """

    def __init__(
        self,
        store: Keyspace,
        key: bytes,
        floor: Callable[[], int | None] | None = None,
    ) -> None:
        self._store = store
        self._key = key
        self._floor = floor
        self._revision = ""
        self._saved = 0
        self.value = 0

    async def load(self) -> None:
        data, self._revision = await self._store.get(self._key)
        self.value = self._saved = _int_decoder.decode(data) if data else 0

    async def save(self) -> None:
        value = self.value
        if self._floor is not None:
            held = self._floor()
            if held is not None and held < value:
                value = held
        if value <= self._saved:
            return
        try:
            self._revision = await self._store.set(
                self._key, _encoder.encode(value), self._revision
            )
            self._saved = value
        except Conflict:
            # Another owner wrote it (we may have lost the partition): take its
            # revision and let the next save decide.
            data, self._revision = await self._store.get(self._key)
            self._saved = _int_decoder.decode(data) if data else 0

    async def save_periodically(self, interval: float) -> None:
        while True:
            await anyio.sleep(interval)
            try:
                await self.save()
            except PersistenceError as exc:
                # The store is failing (an outage): one line, at most one per interval.
                _save_log.warning(
                    self._key,
                    "cannot save checkpoint %r; will retry: %s",
                    self._key,
                    describe_error(exc),
                )
            else:
                _save_log.reset(self._key)
