"""What the batch processor keeps per command: pending commands and completed IDs.

``PendingCommand`` is one command waiting in the partition (from a local caller,
with the ``Waiter`` its caller awaits, or from the inbox); ``CompletedCommands``
remembers recently completed command IDs and where their events are on the
stream, for deduplication.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import anyio
import attrs

from ...config import HandlerConfig
from .acceptance import PartitionStopped
from .inbox import InboxEntry

__all__ = ["CompletedCommands", "Location", "PendingCommand", "Waiter"]

_log = logging.getLogger("runkit.engine.commands.pending")

# Where a completed command's events are on the stream: (first offset, count).
Location = tuple[int, int] | None


@attrs.define(eq=False)
class Waiter:
    """A local caller waiting for its commands to be durable.

    The caller waits on ``done``, or is called back through *callback* (with
    the first error, or ``None``) once, when the last command settles or the
    first fails. A ``PartitionStopped`` waits for the last: the stopping
    partition settles each command soon, and some may still be committed by
    its final flush; the error then names those that were not (the caller
    spills only them, each with its append, if any).
    """

    remaining: int
    done: anyio.Event | None = None
    callback: Callable[[BaseException | None], None] | None = None
    error: BaseException | None = None
    settled: bool = False

    def settle(self, error: BaseException | None = None, command_id: str | None = None) -> None:
        """One of the caller's commands (*command_id*) is durable, or failed with *error*."""
        if isinstance(error, PartitionStopped):
            if self.error is None:
                self.error = PartitionStopped(commands=())
            stopped = self.error
            if isinstance(stopped, PartitionStopped):
                stopped.unconfirmed.update(error.unconfirmed)
                if command_id is None or stopped.commands is None:
                    stopped.commands = None  # unknown which: all are spilled
                else:
                    stopped.commands.add(command_id)
            error = None
        elif error is not None and (self.error is None or isinstance(self.error, PartitionStopped)):
            self.error = error
        self.remaining -= 1
        if (self.remaining <= 0 or error is not None) and not self.settled:
            self.settled = True
            if self.done is not None:
                self.done.set()
            if self.callback is not None:
                try:
                    self.callback(self.error)
                except Exception:
                    # Runs in the partition's writer: a failing caller must not stop it.
                    _log.exception("a command's completion callback failed")


@attrs.define(eq=False)
class PendingCommand:
    """One pending command."""

    entry: InboxEntry
    handler: HandlerConfig | None
    position: int  # inbox position; -1 until a local command is in the inbox
    waiter: Waiter | None = None
    failures: int = 0
    spilled: bool = False
    finished: bool = False
    #: Set once a spill's inbox append has settled. A retry commits only after
    #: it, so that its record says the inbox was read past the spilled entry
    #: (ADR 0002); else a next owner would take that entry for unhandled.
    spill_settled: anyio.Event | None = None
    #: The inbox position of the spill, once it has landed (-1: none).
    spill_position: int = -1

    @property
    def command_id(self) -> str:
        return self.entry.entry_id

    async def spill_landed(self) -> None:
        """Return once a spill of this command has settled (at once if none was made).

        A retry waits for it before it commits: a command that records
        nothing is otherwise proven handled by nothing a new owner reads
        before the spilled copy.
        """
        if self.spill_settled is not None:
            await self.spill_settled.wait()

    @property
    def instance_key(self) -> tuple[str, str]:
        return (self.entry.handler_key, self.entry.instance_id or "")


class CompletedCommands:
    """Completed command IDs and where their events are.

    Those this owner completes are kept up to *size*, the oldest forgotten
    first; ``forgot_since`` tells whether one completed since a time may be
    among them (then the stream has the answer). Those the takeover scan
    found committed (*initial*) are never forgotten while the partition is
    owned: their inbox copies may be read only after many more completions
    (one command pending for long holds the processed position back while
    everything after it is committed), and a forgotten one would be handled
    again.
    """

    def __init__(
        self,
        size: int,
        initial: frozenset[str] = frozenset(),
        locations: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        # ID -> (location, when it was added, monotonic clock).
        self._items: OrderedDict[str, tuple[Location, float]] = OrderedDict()
        self._found = initial
        self._found_locations = locations or {}
        self._size = size
        self._forgotten_added = -math.inf  # the latest addition forgotten since

    def __contains__(self, item: str) -> bool:
        return item in self._items or item in self._found

    def location(self, item: str) -> Location:
        if item in self._items:
            return self._items[item][0]
        return self._found_locations.get(item)

    def add(self, item: str, location: Location = None) -> None:
        self._items[item] = (location, time.monotonic())
        self._items.move_to_end(item)
        while len(self._items) > self._size:
            _, (_, added) = self._items.popitem(last=False)
            self._forgotten_added = max(self._forgotten_added, added)

    def forgot_since(self, since: datetime) -> bool:
        """Whether an ID added at or after *since* (wall clock) has been forgotten."""
        age = (datetime.now(UTC) - since).total_seconds()
        return self._forgotten_added >= time.monotonic() - age
