"""Partition event streams: the writer, ``PartitionStream`` readers and the ``EventBus``.

Each partition of an application has one event stream, stored in the journal
``<app>/stream/<p>``. One record holds the events of one or more commands (never
part of a command's events, so a handling's events become visible all at once),
and a header that records the partition's progress (see ``records``).

The modules, bottom-up (each imports only those before it):

- ``records``: the journal name, ``StreamRecord`` (its header fields) and its
  msgpack codec, ``StreamEvent``, and ``OwnershipLost``.
- ``reading``: ``PartitionStream``: journal catch-up, then the writer's live tail.
- ``bus``: the in-process ``EventBus``, its ``CommandDone`` notes, ``UniqueEvents`` and ``Widen``.
- ``tail``: ``read_tail``, what a new owner learns from the end of the journal.
- ``unconfirmed``: ``UnconfirmedAppend``, the hint a spilled command carries of
  an append its writer could not confirm, and ``holds_command``, its check.
- ``writer``: ``StreamWriter``, the single writer (the commit point, ADR 0007).
"""

from __future__ import annotations

from .bus import (
    CommandDone,
    EventBus,
    Observed,
    Stopped,
    UniqueEvents,
    Widen,
    end_subscriptions,
    fed_subscription,
)
from .reading import PartitionStream
from .records import (
    EventLessCommand,
    OwnershipLost,
    ProcessStep,
    StreamEvent,
    StreamRecord,
    command_locations,
    decode_stream_record,
    encode_stream_record,
    envelope_size,
    max_command_bytes,
    stream_name,
)
from .tail import StreamTail, read_tail
from .unconfirmed import CLOCK_MARGIN, PriorCommits, UnconfirmedAppend, holds_command
from .writer import Publication, StreamWriter

__all__ = [
    "CLOCK_MARGIN",
    "CommandDone",
    "EventBus",
    "EventLessCommand",
    "Observed",
    "OwnershipLost",
    "PartitionStream",
    "PriorCommits",
    "ProcessStep",
    "Publication",
    "Stopped",
    "StreamEvent",
    "StreamRecord",
    "StreamTail",
    "StreamWriter",
    "UnconfirmedAppend",
    "UniqueEvents",
    "Widen",
    "command_locations",
    "decode_stream_record",
    "encode_stream_record",
    "end_subscriptions",
    "envelope_size",
    "fed_subscription",
    "holds_command",
    "max_command_bytes",
    "read_tail",
    "stream_name",
]
