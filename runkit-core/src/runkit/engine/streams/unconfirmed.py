"""Commits a spilled command may have: ``UnconfirmedAppend``, ``holds_command``, ``PriorCommits``.

A writer that stops while an append is unconfirmed (the store kept failing
until the shutdown timeout) tells the callers of the commands in it that the
partition stopped, and they append ("spill") the commands to the inbox,
although the append may have landed. Each spilled entry carries the position
and writer of that append, so whoever reads it later can look the command up
there rather than rely on a takeover scan reaching back that far (ADR 0002).

A gateway whose offer to the owner went unanswered (a timeout, a connection
lost in the call) spills the commands marked with the time of the offer: the
owner may have committed them in any record since. If it stopped before it
read the spilled copies, its successor looks through the records its
predecessors wrote since that time (``PriorCommits``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from datetime import datetime, timedelta

import msgspec

from ...persistence import Journal, RecordNotFound
from .records import Location, StreamRecord, command_locations, decode_stream_record

__all__ = ["CLOCK_MARGIN", "PriorCommits", "UnconfirmedAppend", "holds_command"]

#: How far the clocks of a gateway and of the owners it offers to may differ:
#: records written this much before an offer are looked through too.
CLOCK_MARGIN = timedelta(seconds=10)


class UnconfirmedAppend(msgspec.Struct, frozen=True, kw_only=True):
    """A stream append that may hold a command: its journal position and writer ID."""

    position: int
    writer: str


async def holds_command(
    journal: Journal, append: UnconfirmedAppend, command_id: str
) -> Location | None:
    """Where *command_id*'s events are if the record at *append*'s position is its
    writer's and commits it; ``None`` if not.

    The writer ID tells the append apart from another writer's record at the
    same position (a new owner appends there when the append did not land).
    """
    try:
        record = decode_stream_record(await journal.get(append.position))
    except RecordNotFound:
        # Nothing there: the append did not land (and nothing has since). Or
        # the stream was truncated past it (the engine never truncates
        # streams; an operator might): then the record cannot be told any
        # more, and the command is handled as an entry without a hint is.
        return None
    if record.writer != append.writer:
        return None
    return command_locations(record).get(command_id)


class PriorCommits:
    """The command IDs of the stream records that earlier owners wrote, read on demand.

    Records at and above *end* (where this owner started) are this owner's:
    it knows their commands, and ``holds_own`` reads them for one it may
    have forgotten. Below it, records are read back once, newest first, as
    far as the earliest offer asked about (less ``CLOCK_MARGIN``) needs, and
    their command IDs kept: every later question within that reach costs no
    read.
    """

    def __init__(self, journal: Journal, end: int) -> None:
        self._journal = journal
        self._end = end
        self._low = end  # records at or above it have been read (or are ours)
        self._floor: datetime | None = None  # the oldest time read back to
        self._ids: dict[str, Location] = {}

    async def holds(self, command_id: str, offered_at: datetime) -> Location | None:
        """Where *command_id*'s events are if an earlier owner committed it at or
        after *offered_at*; ``None`` if not."""
        floor = offered_at - CLOCK_MARGIN
        if self._floor is None or floor < self._floor:
            await self._read_back(floor)
        return self._ids.get(command_id)

    async def holds_own(self, command_id: str, offered_at: datetime) -> Location | None:
        """Where *command_id*'s events are if this owner committed it at or after
        *offered_at*; ``None`` if not.

        For a command it completed and has since forgotten (many completions
        later): its records are read back, newest first, as far as the
        offer's time, every time. Rare, so nothing read is kept.
        """
        end = (await self._journal.bounds()).end
        async with aclosing(self._back(end, self._end, offered_at - CLOCK_MARGIN)) as records:
            async for _, record in records:
                location = command_locations(record).get(command_id)
                if location is not None:
                    return location
        return None

    async def _read_back(self, floor: datetime) -> None:
        begin = (await self._journal.bounds()).begin
        async with aclosing(self._back(self._low, begin, floor)) as records:
            async for position, record in records:
                self._ids.update(command_locations(record))
                self._low = position
        self._floor = floor

    async def _back(
        self, position: int, low: int, floor: datetime
    ) -> AsyncGenerator[tuple[int, StreamRecord]]:
        """The records below *position*, newest first, down to *low* or to the
        first written before *floor* (or truncated away)."""
        while position > low:
            try:
                record = decode_stream_record(await self._journal.get(position - 1))
            except RecordNotFound:
                return  # truncated below: nothing older is left to read
            if record.written_at < floor:
                return
            position -= 1
            yield position, record
