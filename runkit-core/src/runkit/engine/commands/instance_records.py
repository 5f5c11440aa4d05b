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
    "SnapshotRecord",
    "aggregate_name",
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
    """The events one command recorded on an aggregate instance.

    Attributes:
        command_id: The command that recorded the events.
        events: The events, in order.
        inbox_position: Where the command was in its partition inbox (-1 if it
            never was, or is unknown).
        stream_offset: The stream offset of the first event (-1: unknown).
    """

    command_id: str
    events: tuple[Envelope, ...]
    inbox_position: int = -1
    stream_offset: int = -1


class InstanceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The events of one or more consecutive commands on an aggregate instance.

    Derived from the stream: the materialiser writes every command an instance
    recorded since its last write as one record (the first command in the
    top-level fields, the others in ``more``), so a busy instance costs one
    append per round, not one per command.

    Attributes:
        command_id: The first command.
        events: Its events, in order.
        inbox_position: Its inbox position (-1 if it never was, or unknown).
        stream_offset: The stream offset of its first event (-1: unknown).
            Per instance, offsets only grow: the materialiser appends only
            commands above the last offset in the journal, which makes writing
            the same commands twice (two owners, an ambiguous append) harmless.
        more: The commands after the first, in order.
    """

    command_id: str
    events: tuple[Envelope, ...]
    inbox_position: int = -1
    stream_offset: int = -1
    more: tuple[InstanceCommand, ...] = ()

    def commands(self) -> Iterable[InstanceCommand | InstanceRecord]:
        """Every command of the record, in order (each with the fields above)."""
        yield self
        yield from self.more

    @property
    def last_offset(self) -> int:
        """The stream offset of the last command's first event (-1: unknown)."""
        return self.more[-1].stream_offset if self.more else self.stream_offset


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
    """A command's events on one instance, committed (or being committed) to the stream.

    Attributes:
        command_id: The command.
        events: Its events on this instance.
        inbox_position: Its inbox position, or -1.
        durable: Set once the stream record holding the events is durable.
        stream_offset: The stream offset of the first event (once durable).
        stream_position: The stream journal position of the record (once durable).
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
    snapshot: tuple[bytes, tuple[str, ...]] | None = None
    queued_at: float = 0.0
    written: bool = False
