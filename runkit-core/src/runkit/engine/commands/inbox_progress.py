"""How far a partition's inbox is processed and read: the progress every stream record states.

Each inbox record read has its commands outstanding at its position until each
is done. The processed position is the first position with commands
outstanding (or the read end); with the read end (or past the owner's own
spilled commands, if further) it goes to the stream writer, which puts it in
its next record (ADR 0002).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["InboxProgress"]


class InboxProgress:
    """The inbox positions read and the commands outstanding at each.

    *set_progress* is ``StreamWriter.set_progress``; *read_end* is the position
    the partition starts reading the inbox from.
    """

    def __init__(self, set_progress: Callable[[int, int], None], read_end: int) -> None:
        self._set_progress = set_progress
        self.read_end = read_end
        self._inbox_seen = 0  # past our own spilled commands (see seen)
        self._outstanding: dict[int, int] = {}

    def read(self, position: int, count: int) -> None:
        """The record at *position* is read, with *count* commands outstanding."""
        self.read_end = position + 1
        self._outstanding[position] = count

    def done(self, position: int) -> None:
        """One command of the record at *position* is done (then ``advance``)."""
        self._outstanding[position] -= 1

    def seen(self, position: int) -> None:
        """This owner appended (spilled) a command at *position*."""
        # Every later stream record must say the inbox was read past it, so
        # that a new owner's takeover scan sees the command's commit (if it
        # is committed here) and does not handle it again (ADR 0002).
        self._inbox_seen = max(self._inbox_seen, position + 1)
        self.advance()

    def advance(self) -> None:
        """Tell the stream writer how far the inbox is processed and read."""
        while self._outstanding:
            first = next(iter(self._outstanding))
            if self._outstanding[first]:
                break
            del self._outstanding[first]
        processed = next(iter(self._outstanding)) if self._outstanding else self.read_end
        self._set_progress(processed, max(self.read_end, self._inbox_seen))
