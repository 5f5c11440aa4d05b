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
from .records import decode_stream_record

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
        unmarked: Keyed commands found committed whose idempotency markers
            may be missing (the new owner writes them).
        scan_from: Where the scan had to read back to (the new owner's
            records keep it until it has written those markers).
    """

    next_position: int
    next_offset: int
    inbox_position: int
    published: frozenset[str]
    materialised: int | None = None
    unmarked: frozenset[str] = frozenset()
    scan_from: int | None = None


async def read_tail(journal: Journal) -> StreamTail:
    """Read the tail of a stream journal (see the module docstring)."""
    bounds = await journal.bounds()
    if bounds.is_empty:
        return StreamTail(bounds.end, 0, 0, frozenset())
    last = decode_stream_record(await journal.get(bounds.end - 1))
    inbox_position = last.inbox_position
    published: set[str] = set()
    unmarked: set[str] = set()
    floor = bounds.end if last.scan_from is None else last.scan_from
    position = bounds.end - 1
    record = last
    above: str | None = None  # the writer of the record above (None: none)
    while True:
        if record.inbox_end <= inbox_position and position < floor:
            if record.writer != above:
                # A writer's last record may be one its stop cut short before
                # the append was confirmed: its callers, told the partition
                # stopped, spill those commands to the inbox, past this
                # record's inbox_end, although they are committed here.
                published.update(record.command_ids)
            break
        published.update(record.command_ids)
        unmarked.update(record.unmarked)
        above = record.writer
        position -= 1
        if position < bounds.begin:
            break
        try:
            record = decode_stream_record(await journal.get(position))
        except RecordNotFound:
            break  # truncated below us: older records cannot hold pending commands
    return StreamTail(
        bounds.end,
        last.first_offset + len(last.events),
        inbox_position,
        frozenset(published),
        last.materialised,
        frozenset(unmarked),
        last.scan_from,
    )
