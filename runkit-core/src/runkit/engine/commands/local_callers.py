"""The local-caller side of a partition: settling callers' waiters, spilling to the inbox.

A command from a caller on this node is durable once its stream record is; if
its handler fails it is appended to the inbox ("spilled"), and the caller
returns once it is there. ``LocalCallers`` keeps the local commands not settled
yet and those spilled but not yet read back from the inbox.
"""

from __future__ import annotations

from collections.abc import Callable, Container

import anyio

from .acceptance import PartitionStopped
from .inbox import InboxWriter
from .pending import PendingCommand

__all__ = ["LocalCallers"]


class LocalCallers:
    """The commands of local callers until each caller may return.

    *start* runs a task in the partition; *spilled_at* hears the inbox position
    of a spilled command.
    """

    def __init__(
        self,
        inbox_writer: InboxWriter,
        *,
        start: Callable[..., None],
        spilled_at: Callable[[int], None],
    ) -> None:
        self._inbox_writer = inbox_writer
        self._start = start
        self._spilled_at = spilled_at
        # Local commands appended to the inbox after a failure, not yet seen there.
        self._spilled: dict[str, PendingCommand] = {}
        self._local: set[PendingCommand] = set()

    def add(self, item: PendingCommand) -> None:
        """A local caller waits for *item* (its ``waiter``)."""
        self._local.add(item)

    def settle(self, item: PendingCommand, error: BaseException | None) -> None:
        """*item* is durable (or failed with *error*): tell its caller, if local."""
        if item in self._local:
            self._local.discard(item)
            assert item.waiter is not None
            item.waiter.settle(error, item.command_id)

    def spill(self, item: PendingCommand) -> None:
        """A local command's handler failed: make it durable in the inbox meanwhile."""
        if item.spilled or item.waiter is None or item not in self._local:
            return
        item.spilled = True
        item.spill_settled = settled = anyio.Event()
        self._spilled[item.command_id] = item
        self._start(self._append_spilled, item, settled)

    def take_spilled(self, command_id: str) -> PendingCommand | None:
        """The spilled local command with *command_id*, now read back from the inbox."""
        return self._spilled.pop(command_id, None)

    def stop(self, committing: Container[PendingCommand]) -> None:
        """The partition stops: settle the callers whose commands are not *committing*.

        *committing* holds the items themselves, not their command IDs: a caller
        retrying a command whose first attempt is still being committed has an
        item of its own, not yet handled, which the writer will never settle.
        """
        for item in list(self._local):
            if item not in committing:
                self.settle(item, PartitionStopped())

    async def _append_spilled(self, item: PendingCommand, settled: anyio.Event) -> None:
        try:
            try:
                # Until it is known to have landed: a spill given up after an
                # attempt that landed all the same would leave a copy nobody
                # knows the position of, which a next owner would read as new
                # work after the command was committed or poisoned here.
                position = await self._inbox_writer.submit([item.entry], until_landed=True)
            except Exception as exc:
                self._spilled.pop(item.command_id, None)
                self.settle(item, exc)
                return
            item.spill_position = position
            self._spilled_at(position)
            self.settle(item, None)
        finally:
            # Its position is seen (or it failed): a retry may commit now (PendingCommand).
            settled.set()
