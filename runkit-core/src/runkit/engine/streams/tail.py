"""The tail read at takeover: ``read_tail`` and what it finds, ``StreamTail``.

A new partition owner reads the last record of the stream journal, then scans
back over the records whose ``inbox_end`` is past the last record's
``inbox_position``, and at least to its ``scan_from``, to learn which pending
commands are already published and which keyed commands may lack their
idempotency markers (the record header is described in ``records``). The record
the scan stops at counts too if it is the last of its writer: a writer that
stopped before it could confirm that append told its callers the commands were
not committed, and they spilled them to the inbox. Owners whose scans stop
short of that record learn of it from the spilled entries (``unconfirmed``).
"""

from __future__ import annotations

import attrs

from ...persistence import Journal, RecordNotFound
from ..envelope import closing_iter
from .records import Location, command_locations, decode_stream_record

__all__ = ["StreamTail", "read_tail"]


@attrs.frozen
class StreamTail:
    """What a new partition owner learns from the end of the stream journal.

    Attributes:
        next_position: The journal position of the next record.
        next_offset: The stream offset of the next event.
        inbox_position: Inbox records below it are fully processed.
        published: IDs of commands at or after ``inbox_position`` already
            committed in the stream (with their events, if any).
        materialised: The last record's materialised watermark (``None``:
            every aggregate event is in its instance journal).
        dispatched: The last record's dispatched watermark (``None``: no
            process step's outbox waits to be dispatched, ADR 0010).
        unmarked: Keyed commands found committed whose idempotency markers
            may be missing (the new owner writes them).
        scan_from: Where the scan had to read back to (the new owner's
            records keep it until it has written those markers).
        poisoned: Inbox entries (position, command ID) found poisoned: done.
        locations: Where the events of the ``published`` commands are, so
            that observers of a repeated submission get them again.
        inbox_end: The last record's ``inbox_end``. The new owner's records
            start from it, not from what it has read itself: ``inbox_end``
            must never decrease along the journal, or a later owner's scan
            would stop at this owner's first record, short of records that
            committed inbox commands still below ``inbox_position``.
    """

    next_position: int
    next_offset: int
    inbox_position: int
    published: frozenset[str]
    materialised: int | None = None
    unmarked: frozenset[str] = frozenset()
    scan_from: int | None = None
    inbox_end: int = 0
    poisoned: frozenset[tuple[int, str]] = frozenset()
    locations: dict[str, Location] = attrs.field(factory=dict, eq=False)
    dispatched: int | None = None


async def read_tail(journal: Journal) -> StreamTail:
    """Read the tail of a stream journal (see the module docstring)."""
    bounds = await journal.bounds()
    if bounds.is_empty:
        return StreamTail(bounds.end, 0, 0, frozenset())
    last = decode_stream_record(await journal.get(bounds.end - 1))
    inbox_position = last.inbox_position
    unmarked: set[str] = set()
    poisoned: set[tuple[int, str]] = set()
    locations: dict[str, Location] = {}
    floor = bounds.end if last.scan_from is None else last.scan_from
    position = bounds.end - 1
    record = last
    above: str | None = None  # the writer of the record above (None: none)
    older = _Pages(journal, bounds.begin, position)
    while True:
        if record.inbox_end <= inbox_position and position < floor:
            if record.writer != above:
                # A writer's last record may be one its stop cut short before
                # the append was confirmed: its callers, told the partition
                # stopped, spill those commands to the inbox, past this
                # record's inbox_end, although they are committed here.
                locations.update(command_locations(record))
                poisoned.update(record.poisoned)
            break
        locations.update(command_locations(record))
        poisoned.update(record.poisoned)
        unmarked.update(record.unmarked)
        above = record.writer
        position -= 1
        data = await older.get(position)
        if data is None:
            # The journal's beginning, or truncated below: older records
            # cannot hold pending commands.
            break
        record = decode_stream_record(data)
    return StreamTail(
        bounds.end,
        last.first_offset + len(last.events),
        inbox_position,
        frozenset(locations),  # every command a scanned record lists
        last.materialised,
        frozenset(unmarked),
        last.scan_from,
        last.inbox_end,
        frozenset(poisoned),
        locations,
        last.dispatched,
    )


#: Records the backward scan reads one ``get`` at a time, as most scans stop
#: within a record or two; after them it reads pages of ``range``, the first
#: ``FIRST_PAGE`` records long and each next one twice as long, up to
#: ``LAST_PAGE``. A long scan (an inbox command pending for minutes under
#: steady load) then costs a few calls instead of a round trip per record. A
#: page is held in memory whole: at most 256 records (about 100 MB of the
#: largest records a store takes, 400 KB on DynamoDB).
SINGLE_GETS = 4
FIRST_PAGE = 8
LAST_PAGE = 256


class _Pages:
    """A journal read backwards from *below* (exclusive): single gets, then growing pages."""

    def __init__(self, journal: Journal, begin: int, below: int) -> None:
        self._journal = journal
        self._begin = begin
        self._low = below  # the records in [self._low, below) are read
        self._gets = 0
        self._size = FIRST_PAGE
        self._page: list[bytes] = []

    async def get(self, position: int) -> bytes | None:
        """The record at *position* (each lower than the last), or ``None`` below the live part."""
        if position < self._low:
            if position < self._begin:
                return None
            if self._gets < SINGLE_GETS:
                self._gets += 1
                try:
                    data = await self._journal.get(position)
                except RecordNotFound:
                    return None  # truncated meanwhile
                self._page, self._low = [data], position
                return data
            high = self._low
            low = max(self._begin, high - self._size)
            self._size = min(self._size * 2, LAST_PAGE)
            try:
                page = await self._read(low, high)
            except RecordNotFound:
                # Truncated meanwhile: what is still live, if the position is.
                self._begin = (await self._journal.bounds()).begin
                if position < self._begin:
                    return None
                low = self._begin
                try:
                    page = await self._read(low, high)
                except RecordNotFound:
                    return None
            self._page, self._low = page, low
        return self._page[position - self._low]

    async def _read(self, low: int, high: int) -> list[bytes]:
        page: list[bytes] = []
        async with closing_iter(self._journal.range(low)) as records:
            async for at, data in records:
                if at >= high:
                    break
                page.append(data)
        if len(page) != high - low:
            raise RecordNotFound(self._journal.name, low + len(page))
        return page
