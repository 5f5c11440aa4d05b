"""Partition stream records: the journal name, ``StreamRecord`` and its codec, ``StreamEvent``.

One record of the journal ``<app>/stream/<p>`` holds the events of one or more
commands (never part of a command's events, so a handling's events become
visible all at once), and a header:

- ``first_offset``: the stream offset of the record's first event. Offsets are
  dense per stream and independent of journal positions; a record may hold no
  events at all (it then only records progress).
- ``inbox_position``: every command in inbox records below it is done (its
  events are in this or an earlier record, or it had none, or it was poisoned).
- ``inbox_end``: how far the writer's owner had read the inbox when it built the
  record, and never less than the record before it (a new owner starts from the
  last one's); a new owner scans back only over records whose ``inbox_end`` is past
  the tail's ``inbox_position`` to learn which pending commands are published.
- ``command_ids``: the commands the record commits (it is the commit point of a
  batch, ADR 0007), those that recorded no events included: a new owner reading
  one of them from the inbox again learns here that it was handled.
- ``materialised``: every aggregate event in records below this journal
  position is in its instance journal (``None``: all of them, as in records
  written before instance journals became derived state).
- ``event_less``: the aggregate commands among ``command_ids`` that recorded no
  events, each with its instance and the offset of the next event after it:
  a new owner materialises them too (their instance journals name them, so a
  rebuilt instance knows their IDs).
- ``poisoned``: inbox entries (position, command ID) whose commands were moved
  to the poison store: done, although no record lists them in ``command_ids``.
  A new owner skips those entries, and only those (a requeued copy of the
  command is a later entry), and copies of those commands spilled with a hint
  (an unconfirmed append, an unanswered offer). Position -1: the command had no
  inbox entry.
- ``unmarked`` / ``scan_from``: keyed integration commands committed whose
  idempotency marker may not be written yet, and the oldest record holding one. A new
  owner's takeover scan reads back at least to ``scan_from``, so it learns of
  them (counts them as handled, and writes their markers).
- ``steps``: process steps the record commits (ADR 0010): per process
  instance homed on this partition, what handling one or more deliveries
  changed (``ProcessStep``). The record is their commit point, as it is for
  aggregate commands; the instance's keyspace record is derived from them.
- ``dispatched``: every step's outbox in records below this journal position
  has been dispatched (``None``: the writer dispatches none, as in records
  written before process steps). A new owner dispatches the outboxes of the
  records from there again; their targets deduplicate.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

import dogma

from ..envelope import Envelope, to_message

__all__ = [
    "EventLessCommand",
    "Location",
    "OwnershipLost",
    "ProcessStep",
    "StreamEvent",
    "StreamRecord",
    "command_locations",
    "decode_stream_record",
    "encode_stream_record",
    "envelope_size",
    "max_command_bytes",
    "stream_name",
]

#: More than an event adds to a stream record besides its data and description
#: (its other envelope fields and their msgpack keys).
_EVENT_OVERHEAD = 512


def envelope_size(envelope: Envelope) -> int:
    """An upper estimate of the bytes an envelope adds to a record.

    An event's to a stream record, a command's to an inbox record. Every
    field of free length counts (an aggregate's instance ID may take
    hundreds of bytes); the overhead covers the IDs, times and field names.
    """
    return (
        len(envelope.data)
        + _text_bytes(envelope.description)
        + _text_bytes(envelope.type_id)
        + _text_bytes(envelope.source_instance)
        + _text_bytes(envelope.source_handler)
        + _text_bytes(envelope.site_key)
        + _EVENT_OVERHEAD
    )


def _text_bytes(text: str | None) -> int:
    if text is None:
        return 0
    return len(text) if text.isascii() else len(text.encode())


def max_command_bytes(record_limit: int) -> int:
    """The most ``envelope_size`` one command's events may add up to, for a store
    whose records take at most *record_limit* bytes: they must fit one stream
    record, with its header."""
    return record_limit * 3 // 4


def stream_name(app_key: str, index: int) -> str:
    """The name of partition *index*'s stream journal."""
    return f"{app_key}/stream/{index}"


class OwnershipLost(Exception):
    """Another node wrote to a journal this node believed it was the only writer of."""


class EventLessCommand(msgspec.Struct, frozen=True, array_like=True):
    """An aggregate command a stream record commits that recorded no events.

    Attributes:
        index: Its index in the record's ``command_ids``.
        offset: The stream offset of the next event after it.
        handler_key: The aggregate handler's identity key.
        instance_id: The instance that handled it.
    """

    index: int
    offset: int
    handler_key: str
    instance_id: str


class ProcessStep(msgspec.Struct, frozen=True, array_like=True, kw_only=True):
    """What handling deliveries changed in one process instance homed on this partition.

    Committed in the home partition's stream record (ADR 0010): the record is
    the step's commit point and the fence against another writer, so the
    instance's state is the fold of its steps over its keyspace record. Only
    what changed is stored, so a step that neither mutated the root nor
    scheduled anything costs its IDs and a position.

    Attributes:
        handler_key: The process handler's identity key.
        instance_id: The instance.
        deliveries: IDs of the deliveries the step commits (handled, skipped
            or poisoned): an inbox delivery is done once a record lists it.
        positions: (source stream ID, offset of the last event handled from
            it) for each stream the step advanced; a delivery at or below the
            instance's position for its stream is skipped.
        root: The root's ``marshal_binary()`` if the step mutated it;
            ``None``: unchanged.
        ended: ``end()`` was called: the root and pending deadlines are
            dropped and the instance never handles again.
        pending: The pending deadline IDs after the step; ``None``: unchanged.
        commands: Outbox: encoded envelopes of the commands produced (their IDs
            derived from the cause), dispatched after the commit.
        deadlines: Outbox: encoded ``DeadlineEntry`` values of the deadlines
            scheduled (their home is this partition), appended to its deadline
            journal after the commit. Bytes, so that streams need not know the
            events side's types.
        poisoned: The deliveries were given up on (moved to the event poison
            store), not handled; ``positions`` still advance past them.
    """

    handler_key: str
    instance_id: str
    deliveries: tuple[str, ...] = ()
    positions: tuple[tuple[str, int], ...] = ()
    root: bytes | None = None
    ended: bool = False
    pending: tuple[str, ...] | None = None
    commands: tuple[bytes, ...] = ()
    deadlines: tuple[bytes, ...] = ()
    poisoned: bool = False

    @property
    def has_outbox(self) -> bool:
        """Whether the step has commands or deadlines to dispatch."""
        return bool(self.commands or self.deadlines)

    def size(self) -> int:
        """An upper estimate of the bytes the step adds to a stream record."""
        # Plain loops: computed for every step, and generator expressions
        # cost more than the sums they feed at these lengths.
        size = 64 + len(self.handler_key) + _text_bytes(self.instance_id)
        size += 40 * len(self.deliveries)
        for delivery_id in self.deliveries:
            size += len(delivery_id)
        size += 48 * len(self.positions)
        for stream_id, _ in self.positions:
            size += _text_bytes(stream_id)
        if self.root is not None:
            size += len(self.root) + 8
        if self.pending:
            size += 40 * len(self.pending)
            for p in self.pending:
                size += len(p)
        size += 8 * (len(self.commands) + len(self.deadlines))
        for c in self.commands:
            size += len(c)
        for entry in self.deadlines:
            size += len(entry)
        return size


class StreamRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One record of a partition stream journal (see the module docstring)."""

    first_offset: int
    inbox_position: int
    inbox_end: int
    written_at: datetime
    writer: str
    command_ids: tuple[str, ...] = ()
    events: tuple[Envelope, ...] = ()
    materialised: int | None = None
    unmarked: tuple[str, ...] = ()
    scan_from: int | None = None
    event_less: tuple[EventLessCommand, ...] = ()
    poisoned: tuple[tuple[int, str], ...] = ()
    steps: tuple[ProcessStep, ...] = ()
    dispatched: int | None = None


#: Where a command's events are on its stream: (first offset, count). A command
#: that recorded none has count 0 at the offset of the next event.
Location = tuple[int, int]


def command_locations(record: StreamRecord) -> dict[str, Location]:
    """Where the events of each command *record* commits are.

    A record holds each command's events together, in the order of its
    ``command_ids``, and every event's ``causation_id`` is its command's ID.
    """
    locations: dict[str, Location] = {}
    events = record.events
    offset = record.first_offset
    i = 0
    for command_id in record.command_ids:
        start = i
        while i < len(events) and events[i].causation_id == command_id:
            i += 1
        locations[command_id] = (offset + start, i - start)
    return locations


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(StreamRecord)


def encode_stream_record(record: StreamRecord) -> bytes:
    """Encode a stream record as msgpack."""
    return _record_encoder.encode(record)


def decode_stream_record(data: bytes) -> StreamRecord:
    """Decode a stream record made by :func:`encode_stream_record`."""
    return _record_decoder.decode(data)


class StreamEvent(msgspec.Struct, frozen=True, gc=False):
    """An event at an offset of a partition stream.

    A frozen value, made a struct that the cyclic collector never tracks: a
    node keeps up to thousands per partition in its stream tails, and it holds
    nothing that could close a cycle (strings, an int, a time and an
    envelope, itself untracked), so every collection would traverse them for
    nothing.

    Attributes:
        stream_id: The partition's UUID (what projections see as the stream ID).
        offset: The event's dense, zero-based offset in the stream.
        envelope: The event's envelope.
        recorded_at: When the handler recorded the event.
    """

    stream_id: str
    offset: int
    envelope: Envelope
    recorded_at: datetime

    def message(self) -> dogma.Event:
        """Decode the event: a fresh, re-validated copy on every call (ADR-32)."""
        message = to_message(self.envelope)
        if not isinstance(message, dogma.Event):
            raise TypeError(f"stream holds a non-event message: {self.envelope.description}")
        return message


def _events_of(stream_id: str, record: StreamRecord) -> list[StreamEvent]:
    return [
        StreamEvent(stream_id, record.first_offset + i, env, env.created_at)
        for i, env in enumerate(record.events)
    ]
