"""Back-pressure: a partition's backlog and the callers waiting for room below its limit.

``Backlog`` counts the commands a partition has taken into its batch and not
yet done (local and inbox) and lines up callers that wait for room, first come
first served, handing each freed slot to the first of them. Inbox commands the
partition has read while it had no room are *held* here and take freed slots
before any caller.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio
import attrs

__all__ = ["Backlog"]

T = TypeVar("T")


@attrs.define(eq=False)
class _RoomWaiter:
    """A caller waiting for backlog room; ``reserved`` once a slot is handed to it."""

    event: anyio.Event = attrs.Factory(anyio.Event)
    reserved: bool = False


class Backlog(Generic[T]):
    """Commands taken and not yet done, held inbox commands, and callers waiting for room.

    The partition adds to ``count`` when it takes a command, subtracts when the
    command is done (then calls ``wake_waiters``), passes inbox commands
    through ``hold`` and calls ``close`` when it stops. *admit* takes a held
    command into the batch (``count`` already includes it).
    """

    def __init__(self, limit: int, *, admit: Callable[[T], None] = lambda item: None) -> None:
        self.limit = limit
        self.count = 0
        self._admit = admit
        #: Inbox commands read and waiting for room: while any is, callers wait.
        self.held: deque[T] = deque()
        # Callers waiting for backlog room, first come first served.
        self._room_waiters: deque[_RoomWaiter] = deque()
        self._reserved = 0  # slots handed to woken waiters that have not taken them yet
        self._closed = False

    @property
    def waiting(self) -> int:
        """How many callers wait for room."""
        return len(self._room_waiters)

    @property
    def free(self) -> int:
        """Slots neither taken nor reserved for a woken waiter (negative when over)."""
        return self.limit - self.count - self._reserved

    def has_room(self) -> bool:
        """Whether a caller may go ahead now: a free slot, and nobody waiting for one."""
        return self.free > 0 and not self._room_waiters and not self.held

    def hold(self, item: T) -> None:
        """An inbox command: admitted at once if there is room, else once there is.

        Held ones are older than any caller waiting for room, so they take
        freed slots first. A command produced by a handler is not held (it
        never waits for room), so it overtakes them.
        """
        self.held.append(item)
        self._admit_held()

    async def wait_for_room(self, *, take: bool = True) -> None:
        """Return once the backlog is below the limit, after those already waiting.

        Waiters are served in arrival order: each freed slot is handed to the
        first waiter and reserved for it until it resumes, so a caller that
        just finished and calls again cannot take it first (closed-loop callers
        would otherwise keep their slots and starve the queue). The caller
        must take its slot (``execute_local``) without suspending in between;
        one that only waits its turn (*take* false: its command takes a slot
        later, as an inbox command) passes the slot on as it returns.
        """
        if self._closed or self.has_room():
            return
        waiter = _RoomWaiter()
        self._room_waiters.append(waiter)
        try:
            while True:
                await waiter.event.wait()
                self._unreserve(waiter)
                if self._closed or self.count < self.limit:
                    if not take:
                        # Nothing takes the slot: held inbox commands or the
                        # next caller do (else it stays free until a finish).
                        self.wake_waiters()
                    return
                # Inbox commands filled the slot meanwhile: stay first in line.
                waiter = _RoomWaiter()
                self._room_waiters.appendleft(waiter)
        except BaseException:
            # Cancelled (the caller's wait bound): leave the line, and hand a
            # slot this waiter received but cannot use to the next one.
            if waiter.reserved:
                self._unreserve(waiter)
                self.wake_waiters()
            elif not waiter.event.is_set():
                self._room_waiters.remove(waiter)
            raise

    def wake_waiters(self) -> None:
        """Hand the free slots to held inbox commands, then to the first waiters in line.

        Whatever freed them: a command finishing, or a woken waiter that left.
        """
        if self.held:
            self._admit_held()
            if self.held:
                return
        if not self._room_waiters:
            return
        free = self.free
        while free > 0 and self._room_waiters:
            waiter = self._room_waiters.popleft()
            waiter.reserved = True
            self._reserved += 1
            waiter.event.set()
            free -= 1

    def _admit_held(self) -> None:
        while self.held and self.free > 0:
            self.count += 1
            self._admit(self.held.popleft())

    def close(self) -> None:
        """The partition stopped: wake every waiter (and let nobody wait any more)."""
        self._closed = True
        while self._room_waiters:
            self._room_waiters.popleft().event.set()  # no slot: they see the stop

    def _unreserve(self, waiter: _RoomWaiter) -> None:
        if waiter.reserved:
            waiter.reserved = False
            self._reserved -= 1
