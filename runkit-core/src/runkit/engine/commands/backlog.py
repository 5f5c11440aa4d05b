"""Back-pressure: a partition's backlog and the callers waiting for room below its limit.

``Backlog`` counts the commands a partition has taken into its batch and not
yet done (local and inbox) and lines up callers that wait for room, first come
first served, handing each freed slot to the first of them. Inbox commands the
partition has read but not taken for want of room (``inbox_held``) go before
every caller.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import anyio
import attrs

__all__ = ["Backlog"]


@attrs.define(eq=False)
class _RoomWaiter:
    """A caller waiting for backlog room; ``reserved`` once a slot is handed to it."""

    event: anyio.Event = attrs.Factory(anyio.Event)
    reserved: bool = False


class Backlog:
    """Commands accepted and not yet done, and the callers waiting for room.

    The partition adds to ``count`` when it takes a command, subtracts when the
    command is done (then calls ``wake_waiters``) and calls ``close`` when it stops.
    """

    def __init__(self, limit: int, *, admit_held: Callable[[], None] | None = None) -> None:
        self.limit = limit
        # Takes held inbox commands into the batch while there is room (the partition's).
        self._admit_held = admit_held
        self.count = 0
        # Callers waiting for backlog room, first come first served.
        self._room_waiters: deque[_RoomWaiter] = deque()
        self._reserved = 0  # slots handed to woken waiters that have not taken them yet
        self._closed = False
        #: Inbox commands read and waiting for room: while any is, callers wait.
        self.inbox_held = 0

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
        return self.free > 0 and not self._room_waiters and not self.inbox_held

    async def wait_for_room(self) -> None:
        """Return once the backlog is below the limit, after those already waiting.

        Waiters are served in arrival order: each freed slot is handed to the
        first waiter and reserved for it until it resumes, so a caller that
        just finished and calls again cannot take it first (closed-loop callers
        would otherwise keep their slots and starve the queue). The caller
        must take its slot (``execute_local``) without suspending in between.
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
        """Hand the free slots to the first waiters in line, after held inbox commands."""
        if self.inbox_held:
            # A slot freed without a command finishing (a woken waiter that left)
            # goes to them first; waiters get theirs once none is held.
            if self._admit_held is not None:
                self._admit_held()
            if self.inbox_held:
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

    def close(self) -> None:
        """The partition stopped: wake every waiter (and let nobody wait any more)."""
        self._closed = True
        while self._room_waiters:
            self._room_waiters.popleft().event.set()  # no slot: they see the stop

    def _unreserve(self, waiter: _RoomWaiter) -> None:
        if waiter.reserved:
            waiter.reserved = False
            self._reserved -= 1
