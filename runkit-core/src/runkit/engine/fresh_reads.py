"""Fresh reads shared by the callers that ask together.

Some readers need a value read from the store *after* they asked (a read that
began earlier might miss what was written just before they asked), and many
ask at once: every process consumer of every partition taking over at a
node's start asks for the inbox end of every home partition. ``FreshReads``
runs at most one read at a time; a caller that finds one running waits for it
to end and then shares the next one, which starts after every caller of that
round asked. So a burst of callers costs two reads, not one each.

The read runs shielded from cancellation (a cancelled caller must not cancel
the others' read): *read* must bound its own time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio
import attrs

__all__ = ["FreshReads"]

T = TypeVar("T")


@attrs.define(eq=False)
class _Round(Generic[T]):
    done: anyio.Event = attrs.field(factory=anyio.Event)
    value: T | None = None
    error: Exception | None = None

    def result(self) -> T:
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


class FreshReads(Generic[T]):
    """Shares reads of *read* that start after each caller asked (module docstring)."""

    def __init__(self, read: Callable[[], Awaitable[T]]) -> None:
        self._read = read
        self._running: _Round[T] | None = None
        self._next: _Round[T] | None = None  # not started: starts when the running one ends

    async def get(self) -> T:
        """A value read after this call began."""
        mine = self._next
        if mine is None:
            mine = self._next = _Round()
        while not mine.done.is_set():
            running = self._running
            if running is None:
                await self._run(mine)
            else:
                await running.done.wait()
        return mine.result()

    async def _run(self, round_: _Round[T]) -> None:
        self._running = round_
        if self._next is round_:
            self._next = None  # later callers share the round after this one
        try:
            with anyio.CancelScope(shield=True):
                round_.value = await self._read()
        except Exception as exc:
            round_.error = exc  # every caller of the round gets it
        finally:
            self._running = None
            round_.done.set()
