"""The wire format: length-prefixed msgpack frames, one msgspec Struct per kind.

Every frame is ``u32 big-endian body length | msgpack body``; the body is an
array whose first element is the frame kind (a small integer tag), followed by
the fields in declaration order. The length is checked against the frame size
limit before any of the body is buffered.
"""

from __future__ import annotations

import struct
from typing import Annotated

import msgspec

from ._errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HANDSHAKE_MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "Cancel",
    "Credit",
    "Error",
    "Frame",
    "FrameDecoder",
    "Goodbye",
    "Hello",
    "HelloOk",
    "Ping",
    "Pong",
    "Request",
    "Response",
    "StreamEnd",
    "StreamItem",
    "check_call",
    "check_node_id",
    "encode_frame",
]

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_SIZE = 4 * 1024 * 1024
#: The frame limit until the handshake is answered: a ``Hello`` is a certificate
#: and a signature (~1 KiB), and a peer not yet authenticated must not make us
#: buffer up to the full limit.
HANDSHAKE_MAX_FRAME_SIZE = 64 * 1024
_LENGTH = struct.Struct(">I")

# Bounds that keep a hostile peer from making us hold silly values. A peer
# closes the connection on a frame outside them, failing every call on it, so
# what callers choose (method names, windows, node IDs) is checked before
# sending (``check_call``, ``check_node_id``).
MAX_SHORT_TEXT = 256
MAX_CREDIT = 2**31 - 1
RequestId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
ShortText = Annotated[str, msgspec.Meta(max_length=MAX_SHORT_TEXT)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]


class _Frame(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    pass


class Hello(_Frame, frozen=True, tag=1):
    """Client -> server, first frame: protocol version and the client's node ID.

    Without an operator CA, ``cert`` carries the client's DER certificate and
    ``proof`` its signature over this TLS session (see ``_tls.sign_proof``).
    """

    version: int
    node_id: ShortText
    cert: bytes = b""
    proof: bytes = b""


class HelloOk(_Frame, frozen=True, tag=2):
    """Server -> client: handshake accepted."""

    node_id: ShortText


class Request(_Frame, frozen=True, tag=3):
    """Client -> server: call ``method``; ``stream`` asks for a stream of items."""

    id: RequestId
    method: ShortText
    payload: bytes
    stream: bool = False


class Response(_Frame, frozen=True, tag=4):
    """Server -> client: the result of a unary request."""

    id: RequestId
    payload: bytes


class StreamItem(_Frame, frozen=True, tag=5):
    """Server -> client: one item of a stream; each consumes one credit."""

    id: RequestId
    payload: bytes


class StreamEnd(_Frame, frozen=True, tag=6):
    """Server -> client: the stream finished normally."""

    id: RequestId


class Credit(_Frame, frozen=True, tag=7):
    """Client -> server: the server may send ``n`` more items on stream ``id``."""

    id: RequestId
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_CREDIT)]


class Cancel(_Frame, frozen=True, tag=8):
    """Client -> server: the caller gave up on request ``id``."""

    id: RequestId


class Error(_Frame, frozen=True, tag=9):
    """Server -> client: request ``id`` failed."""

    id: RequestId
    code: ShortText
    message: Text


class Ping(_Frame, frozen=True, tag=10):
    """Either way: keepalive probe, answered by ``Pong``."""


class Pong(_Frame, frozen=True, tag=11):
    """Either way: answer to ``Ping``."""


class Goodbye(_Frame, frozen=True, tag=12):
    """Either way: the sender is closing the connection, and why."""

    reason: Text


Frame = (
    Hello
    | HelloOk
    | Request
    | Response
    | StreamItem
    | StreamEnd
    | Credit
    | Cancel
    | Error
    | Ping
    | Pong
    | Goodbye
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


def check_call(method: str, window: int | None = None) -> None:
    """Refuse a call the peer would take as a malformed frame.

    :raises ValueError: if *method* is longer than 256 characters or *window*
        is outside 1..2**31-1.
    """
    if len(method) > MAX_SHORT_TEXT:
        raise ValueError(
            f"method name {method[:40]!r}... is {len(method)} characters long; "
            f"the limit is {MAX_SHORT_TEXT}"
        )
    if window is not None and not 1 <= window <= MAX_CREDIT:
        raise ValueError(f"window must be between 1 and {MAX_CREDIT}, got {window}")


def check_node_id(node_id: str) -> None:
    """:raises ValueError: if *node_id* is too long for a ``Hello`` (256 characters)."""
    if len(node_id) > MAX_SHORT_TEXT:
        raise ValueError(
            f"node ID {node_id[:40]!r}... is {len(node_id)} characters long; "
            f"the limit is {MAX_SHORT_TEXT}"
        )


def encode_frame(frame: Frame, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Return *frame* with its length prefix.

    :raises ProtocolError: if the body is larger than *max_frame_size*.
    """
    body = _encoder.encode(frame)
    if len(body) > max_frame_size:
        raise ProtocolError(
            f"{type(frame).__name__} frame of {len(body)} bytes exceeds "
            f"the {max_frame_size}-byte frame size limit"
        )
    return _LENGTH.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder: feed it received bytes, get whole frames back.

    Holds at most one partial frame (never more than the limit plus what was
    last fed). After a ``ProtocolError`` the decoder is unusable, as is the
    connection it was reading.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self._max = max_frame_size
        self._buffer = bytearray()
        self._failed: str | None = None

    @property
    def max_frame_size(self) -> int:
        """The largest frame body accepted; raised once the handshake is done."""
        return self._max

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        self._max = value

    def _frame_length(self, buffer: bytearray, pos: int) -> int:
        (size,) = _LENGTH.unpack_from(buffer, pos)
        if size == 0 or size > self._max:
            raise ProtocolError(f"frame length {size} is outside 1..{self._max} bytes")
        return int(size)

    def feed(self, data: bytes) -> list[Frame]:
        """Append *data* and return the frames it completes, in order.

        :raises ProtocolError: on a zero or oversized length, or a body that is
            not a valid frame.
        """
        if self._failed is not None:
            raise ProtocolError(f"decoder already failed: {self._failed}")
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        pos = 0
        try:
            with memoryview(buffer) as view:
                while len(buffer) - pos >= _LENGTH.size:
                    size = self._frame_length(buffer, pos)
                    end = pos + _LENGTH.size + size
                    if len(buffer) < end:
                        break
                    try:
                        frames.append(_decoder.decode(view[pos + _LENGTH.size : end]))
                    # msgspec reports invalid UTF-8 as UnicodeDecodeError (found by fuzzing).
                    except (msgspec.MsgspecError, ValueError) as exc:
                        raise ProtocolError(f"malformed frame: {exc}") from None
                    pos = end
        except ProtocolError as exc:
            self._failed = exc.reason
            buffer.clear()
            raise
        del buffer[:pos]
        return frames
