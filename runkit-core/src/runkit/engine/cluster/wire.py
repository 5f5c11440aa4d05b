"""The cluster's messages on the node transport: requests, answers, events.

msgspec (msgpack) encodings of what ``routing`` sends and serves: an
``Offer`` of commands and its ``OfferAnswer``, a ``Wake``, an ``Observe``
request and the ``WireEvent``/``WireDone`` items of its stream.
"""

from __future__ import annotations

from datetime import datetime
from typing import TypeVar

import msgspec

from ...transport import RemoteError
from ..commands.inbox import InboxEntry
from ..envelope import UNDECODABLE, Envelope
from ..streams import CommandDone, Observed, StreamEvent, UnconfirmedAppend

__all__ = [
    "ANSWER_BYTES",
    "NOT_OWNER",
    "OBSERVE_BATCH",
    "OK",
    "Observe",
    "Offer",
    "OfferAnswer",
    "Wake",
    "WireDone",
    "WireEvent",
    "answer_decoder",
    "decode_request",
    "encoder",
    "events_decoder",
    "from_wire",
    "observe_decoder",
    "offer_decoder",
    "to_wire",
    "wake_decoder",
]

OK = b"ok"
NOT_OWNER = b"not_owner"
#: Events sent per ``observe`` frame (or ``OfferAnswer``) at most.
OBSERVE_BATCH = 64
#: The largest ``OfferAnswer`` with events; a larger one goes without them.
ANSWER_BYTES = 256 * 1024


class Offer(msgspec.Struct, frozen=True, kw_only=True):
    """Commands for one partition of an application."""

    app_key: str
    partition: int
    entries: tuple[InboxEntry, ...]
    #: Answer with an ``OfferAnswer`` holding the chains' events (see ``Router.observe``).
    reply_events: bool = False
    #: Commands a caller executes: the owner waits up to this many seconds for
    #: room in the partition's backlog (in line with its own callers), then
    #: refuses them (``OfferAnswer.busy``). ``None``: taken at once, however
    #: full (commands produced by handlers, which drain the backlog, and those
    #: of gateways that predate the field).
    room_wait: float | None = None


class Wake(msgspec.Struct, frozen=True, kw_only=True):
    """Read a partition's inbox (``what="inbox"``) or deadlines (``"deadlines"``) now."""

    app_key: str
    partition: int
    what: str = "inbox"


class Observe(msgspec.Struct, frozen=True, kw_only=True):
    """Stream the events of one correlation chain recorded on the serving node.

    The stream starts with the chain's events the node published recently
    (``EventBus`` keeps them), so a subscription that arrives late (after the
    command's events, after a reconnect, or at a node that took a partition
    over) misses nothing. The caller does not wait for the stream to start.
    """

    app_key: str
    correlation_id: str


class WireEvent(msgspec.Struct, frozen=True, kw_only=True, tag="event"):
    """A ``StreamEvent`` on the wire."""

    stream_id: str
    offset: int
    envelope: Envelope
    recorded_at: datetime


class WireDone(msgspec.Struct, frozen=True, kw_only=True, tag="done"):
    """A ``CommandDone`` note on the wire."""

    correlation_id: str
    command_id: str
    conclusive: bool


class OfferAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to an ``Offer`` with ``reply_events``, or to one its owner stopped on.

    ``events``: what the offered commands' correlation chains published on the
    owner from the offer until they were durable, in order; empty when there was
    too much to send (the gateway then observes the chain as usual).
    ``unconfirmed``: not accepted, the owner stopped with these commands in a
    stream append it could not confirm (by command ID): the gateway's inbox
    fallback must carry them (``PartitionStopped``, ADR 0002).
    ``stopped``: not accepted, and only these of the offered commands (by ID)
    were not committed: the gateway spills only them (``None``: all).
    ``busy``: not accepted, a caller's commands and the partition's backlog at
    its limit: (commands waiting, limit). The gateway offers them again later.
    """

    accepted: bool
    events: tuple[WireEvent | WireDone, ...] = ()
    unconfirmed: dict[str, UnconfirmedAppend] = msgspec.field(default_factory=dict)
    stopped: tuple[str, ...] | None = None
    busy: tuple[int, int] | None = None


offer_decoder = msgspec.msgpack.Decoder(Offer)
answer_decoder = msgspec.msgpack.Decoder(OfferAnswer)
wake_decoder = msgspec.msgpack.Decoder(Wake)
observe_decoder = msgspec.msgpack.Decoder(Observe)
events_decoder = msgspec.msgpack.Decoder(tuple[WireEvent | WireDone, ...])
encoder = msgspec.msgpack.Encoder()


_M = TypeVar("_M")


def decode_request(decoder: msgspec.msgpack.Decoder[_M], payload: bytes) -> _M:
    """Decode a request; a malformed one is the caller's ``bad_request``."""
    try:
        return decoder.decode(payload)
    except UNDECODABLE as exc:
        raise RemoteError("bad_request", f"malformed request: {exc}") from exc


def to_wire(event: Observed) -> WireEvent | WireDone:
    """A bus item as sent."""
    if isinstance(event, CommandDone):
        return WireDone(
            correlation_id=event.correlation_id,
            command_id=event.command_id,
            conclusive=event.conclusive,
        )
    return WireEvent(
        stream_id=event.stream_id,
        offset=event.offset,
        envelope=event.envelope,
        recorded_at=event.recorded_at,
    )


def from_wire(item: WireEvent | WireDone) -> Observed:
    """A received item as the bus would have given it."""
    if isinstance(item, WireDone):
        return CommandDone(item.correlation_id, item.command_id, item.conclusive)
    return StreamEvent(item.stream_id, item.offset, item.envelope, item.recorded_at)
