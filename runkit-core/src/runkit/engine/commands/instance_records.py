"""What is stored and committed of aggregate instances: records, snapshots, names.

An instance journal ``<app>/aggregate/<handler>/<instance>`` holds
``InstanceRecord``s (one or more consecutive commands each, ADR 0009); a
handler's snapshot keyspace ``<app>/snapshot/<handler>`` holds one
``SnapshotRecord`` per instance. Both are derived from the partition stream,
written by the ``Materialiser`` from the ``Committed`` records the batch
processor hands it (``aggregates.AggregateInstances.committed``).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
import msgspec

from ..envelope import Envelope

__all__ = [
    "Committed",
    "InstanceCommand",
    "InstanceRecord",
    "Mark",
    "SnapshotRecord",
    "aggregate_name",
    "follows",
    "instance_decoder",
    "instance_encoder",
    "snapshot_decoder",
    "snapshot_name",
]


def aggregate_name(app_key: str, handler_key: str, instance_id: str) -> str:
    """The name of an aggregate instance's journal."""
    return f"{app_key}/aggregate/{handler_key}/{instance_id}"


def snapshot_name(app_key: str, handler_key: str) -> str:
    """The name of an aggregate handler's snapshot keyspace."""
    return f"{app_key}/snapshot/{handler_key}"


class InstanceCommand(msgspec.Struct, frozen=True, array_like=True):
    """A command handled on an aggregate instance, and the events it recorded.

    A command that recorded no events is kept too (``events`` empty): the
    instance's recent command IDs must include it after a rebuild, or a
    retried command would be handled again on a changed root.

    Attributes:
        command_id: The command.
        events: The events, in order (maybe none).
        inbox_position: Where the command was in its partition inbox (-1 if it
            never was, or is unknown).
        stream_offset: The stream offset of the first event; for a command
            without events, the offset of the next event after it on the
            stream (-1: unknown).
        stream_position: The stream journal position of the record that
            committed it (-1: unknown, in records written before it was kept).
        stream_index: The command's index among that record's commands (-1:
            unknown). With ``stream_position``, it orders two event-less
            commands at one offset.
    """

    command_id: str
    events: tuple[Envelope, ...]
    inbox_position: int = -1
    stream_offset: int = -1
    stream_position: int = -1
    stream_index: int = -1


class InstanceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One or more consecutive commands handled on an aggregate instance.

    Derived from the stream: the materialiser writes every command an instance
    committed since its last write as one record (the first command in the
    top-level fields, the others in ``more``), so a busy instance costs one
    append per round, not one per command.

    Attributes:
        command_id: The first command.
        events: Its events, in order (maybe none).
        inbox_position: Its inbox position (-1 if it never was, or unknown).
        stream_offset: See ``InstanceCommand``. Per instance, commands only
            move forward in stream order (``follows``): the materialiser
            appends only commands after the journal's last one, which makes
            writing the same commands twice (two owners, an ambiguous append)
            harmless.
        more: The commands after the first, in order.
        stream_position: See ``InstanceCommand``.
        stream_index: See ``InstanceCommand``.
    """

    command_id: str
    events: tuple[Envelope, ...]
    inbox_position: int = -1
    stream_offset: int = -1
    more: tuple[InstanceCommand, ...] = ()
    stream_position: int = -1
    stream_index: int = -1

    def commands(self) -> Iterable[InstanceCommand | InstanceRecord]:
        """Every command of the record, in order (each with the fields above)."""
        yield self
        yield from self.more

    @property
    def last_mark(self) -> Mark:
        """Where the last command is in stream order (see ``follows``)."""
        return mark(self.more[-1] if self.more else self)


#: Where a command is in its partition's stream order: its ``stream_offset``,
#: whether it recorded events, its ``stream_position`` and ``stream_index``.
Mark = tuple[int, bool, int, int]


def mark(command: InstanceCommand | InstanceRecord | Committed) -> Mark:
    """The ``Mark`` of a stored or committed command."""
    return (
        command.stream_offset,
        bool(command.events),
        command.stream_position,
        command.stream_index,
    )


def follows(command: Mark, last: Mark | None) -> bool:
    """Whether *command* comes after *last* (an instance journal's last command).

    Offsets decide, except between an event-less *last* and a command at its
    offset (the offset of the next event, which may be the command's first):
    a command with events there comes after it, and an event-less one comes
    after it if it was committed later (stream position, then index). A
    *last* of unknown offset (records written before offsets were kept) is
    followed by everything, as before.
    """
    if last is None or last[0] < 0:
        return True
    offset, has_events, position, index = command
    last_offset, last_has_events, last_position, last_index = last
    if offset != last_offset:
        return offset > last_offset
    if last_has_events:
        return False  # the same command, or an event-less one just before it
    if has_events:
        return True
    return last_position >= 0 and (position, index) > (last_position, last_index)


class SnapshotRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An aggregate root snapshot covering instance journal positions below ``position``.

    ``recent`` holds the IDs of the most recent commands it covers (with a
    second element kept for the format's sake), for deduplication.
    ``inbox_max`` is the highest inbox position of the commands it covers
    (-1 if none is known).
    """

    position: int
    data: bytes
    recent: tuple[tuple[str, int], ...] = ()
    inbox_max: int = -1


instance_encoder = msgspec.msgpack.Encoder()
instance_decoder = msgspec.msgpack.Decoder(InstanceRecord)
snapshot_decoder = msgspec.msgpack.Decoder(SnapshotRecord)


@attrs.define(eq=False)
class Committed:
    """A command handled on one instance, committed (or being committed) to the stream.

    Attributes:
        command_id: The command.
        events: Its events on this instance (maybe none: it is written all
            the same, so that a rebuilt instance knows the command ID).
        inbox_position: Its inbox position, or -1.
        durable: Set once the stream record holding the events is durable.
        stream_offset: The stream offset of the first event, or for a command
            without events the next event's (once durable).
        stream_position: The stream journal position of the record (once durable).
        stream_index: The command's index among the record's commands (once durable).
        snapshot: The root's ``marshal_binary()`` right after this command
            (with the recent command IDs), when a snapshot is due.
        queued_at: When the materialiser was given it (its clock).
        written: Set once the materialiser wrote it to the instance journal.
    """

    command_id: str
    events: tuple[Envelope, ...]
    inbox_position: int = -1
    durable: bool = False
    stream_offset: int = -1
    stream_position: int = -1
    stream_index: int = -1
    snapshot: tuple[bytes, tuple[str, ...]] | None = None
    queued_at: float = 0.0
    written: bool = False
