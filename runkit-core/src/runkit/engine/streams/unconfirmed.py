"""An append its writer could not confirm: ``UnconfirmedAppend`` and ``holds_command``.

A writer that stops while an append is unconfirmed (the store kept failing
until the shutdown timeout) tells the callers of the commands in it that the
partition stopped, and they append ("spill") the commands to the inbox,
although the append may have landed. Each spilled entry carries the position
and writer of that append, so whoever reads it later can look the command up
there rather than rely on a takeover scan reaching back that far (ADR 0002).
"""

from __future__ import annotations

import msgspec

from ...persistence import Journal, RecordNotFound
from .records import decode_stream_record

__all__ = ["UnconfirmedAppend", "holds_command"]


class UnconfirmedAppend(msgspec.Struct, frozen=True, kw_only=True):
    """A stream append that may hold a command: its journal position and writer ID."""

    position: int
    writer: str


async def holds_command(journal: Journal, append: UnconfirmedAppend, command_id: str) -> bool:
    """Whether the record at *append*'s position is its writer's and commits *command_id*.

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
        return False
    return record.writer == append.writer and command_id in record.command_ids
