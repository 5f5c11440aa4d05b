"""Process instance records: what ``<app>/process/<handler>`` stores per instance.

``ProcessRecord`` is the instance's state as of a step of its home partition
(``through``), derived from the home stream behind it
(``process_records.ProcessRecords``); the state in the stream's steps is the
truth, and a record is only the point a load folds them onto. A record
written by an earlier version precedes every step (``through`` is ``None``)
and may still hold an outbox (``commands``, ``deadlines``), which a load
dispatches (the commands side deduplicates) until a step rewrites the record;
records derived from steps never hold one.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from .deadlines import DeadlineEntry

__all__ = ["OutboxDeadline", "ProcessRecord", "ProcessRoot"]


class ProcessRoot(Protocol):
    """The parts of a process root the engine uses."""

    def marshal_binary(self) -> bytes: ...
    def unmarshal_binary(self, data: bytes) -> None: ...


class OutboxDeadline(msgspec.Struct, frozen=True, kw_only=True):
    """A deadline waiting in an outbox, with the home partition it goes to."""

    partition: int
    entry: DeadlineEntry


class ProcessRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The stored state of one process instance (msgpack, keyed by instance ID).

    Attributes:
        root: ``marshal_binary()`` of the root; ``None`` until ``mutate`` is
            first called (the root is then ``handler.new()``), and once ended.
        ended: ``end()`` was called; the instance never handles again.
        positions: Stream ID -> offset of the last event handled from it.
        pending_deadlines: IDs of scheduled deadlines not yet handled; a
            deadline fires only while it is listed here.
        commands: Outbox of a record written by an earlier version: encoded
            envelopes of produced commands to accept (empty in derived records).
        deadlines: Outbox of a record written by an earlier version: scheduled
            deadlines to append to their journal (empty in derived records).
        through: (stream journal position, step index) of the last process
            step of the home partition the record includes, when the record
            is derived from the stream; ``None`` for a record written by an
            earlier version's consumers (ADR 0006), which precedes every step.
            The materialiser replaces a stored record only with one further
            through the stream, so a stale owner never overwrites a newer one.
    """

    root: bytes | None = None
    ended: bool = False
    positions: dict[str, int] = msgspec.field(default_factory=dict)
    pending_deadlines: list[str] = msgspec.field(default_factory=list)
    commands: list[bytes] = msgspec.field(default_factory=list)
    deadlines: list[OutboxDeadline] = msgspec.field(default_factory=list)
    through: tuple[int, int] | None = None

    @property
    def has_outbox(self) -> bool:
        """Whether commands or deadlines are in the outbox."""
        return bool(self.commands or self.deadlines)
