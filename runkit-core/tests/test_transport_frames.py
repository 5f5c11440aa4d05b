"""The wire codec: length-prefixed msgpack frames and the incremental decoder.

The decoder faces bytes from the network, so besides round trips it is fuzzed:
whatever it is fed, it yields frames or raises ``ProtocolError``, and it never
buffers more than one frame's worth.
"""

from __future__ import annotations

import contextlib
import struct

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runkit.transport import ProtocolError
from runkit.transport._frames import (
    Cancel,
    Credit,
    Error,
    Frame,
    FrameDecoder,
    Goodbye,
    Hello,
    HelloOk,
    Ping,
    Pong,
    Request,
    Response,
    StreamEnd,
    StreamItem,
    encode_frame,
)

LIMIT = 1024

request_ids = st.integers(min_value=1, max_value=2**63 - 1)
payloads = st.binary(max_size=200)
texts = st.text(max_size=50)
frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Hello, version=st.integers(0, 10), node_id=texts, cert=payloads, proof=payloads),
    st.builds(HelloOk, node_id=texts),
    st.builds(Request, id=request_ids, method=texts, payload=payloads, stream=st.booleans()),
    st.builds(Response, id=request_ids, payload=payloads),
    st.builds(StreamItem, id=request_ids, payload=payloads),
    st.builds(StreamEnd, id=request_ids),
    st.builds(Credit, id=request_ids, n=st.integers(1, 2**31 - 1)),
    st.builds(Cancel, id=request_ids),
    st.builds(Error, id=request_ids, code=texts, message=texts),
    st.just(Ping()),
    st.just(Pong()),
    st.builds(Goodbye, reason=texts),
)


def decode_all(data: bytes, chunk: int = 7, limit: int = LIMIT) -> list[Frame]:
    decoder = FrameDecoder(limit)
    out: list[Frame] = []
    for i in range(0, len(data), chunk):
        out += decoder.feed(data[i : i + chunk])
        # Never more than one partial frame (header + limit) plus the last chunk.
        assert len(decoder._buffer) <= 4 + limit + chunk
    return out


@given(st.lists(frames, max_size=20), st.integers(1, 64))
def test_frames_round_trip_whatever_the_chunking(items: list[Frame], chunk: int) -> None:
    data = b"".join(encode_frame(f, LIMIT) for f in items)
    assert decode_all(data, chunk) == items


def test_a_frame_is_a_length_prefix_and_a_tagged_msgpack_array() -> None:
    data = encode_frame(Request(id=7, method="m", payload=b"p", stream=True))
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    assert msgspec.msgpack.decode(data[4:]) == [3, 7, "m", b"p", True]


def test_encoding_over_the_limit_is_refused() -> None:
    with pytest.raises(ProtocolError, match="exceeds the 100-byte frame size limit"):
        encode_frame(Response(id=1, payload=b"x" * 200), 100)


def test_an_oversized_length_is_refused_before_the_body_arrives() -> None:
    decoder = FrameDecoder(LIMIT)
    with pytest.raises(ProtocolError, match=r"frame length 4294967295 is outside 1\.\.1024"):
        decoder.feed(b"\xff\xff\xff\xff")
    assert len(decoder._buffer) == 0
    # A failed decoder stays failed: the connection is unusable.
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(encode_frame(Ping()))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "frame length 0"),
        (msgspec.msgpack.encode([99]), "malformed frame"),
        (msgspec.msgpack.encode([4, 0, b"x"]), "malformed frame"),  # request IDs start at 1
        (msgspec.msgpack.encode([10, "extra"]), "malformed frame"),
        (msgspec.msgpack.encode({"k": 1}), "malformed frame"),
        (b"\xc1", "malformed frame"),  # never-used msgpack byte
    ],
)
def test_invalid_bodies_are_protocol_errors(body: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        FrameDecoder(LIMIT).feed(struct.pack(">I", len(body)) + body)


def feed_everything(data: bytes, chunk: int) -> None:
    """Feed *data*; allow only ProtocolError, and check the buffering bound."""
    with contextlib.suppress(ProtocolError):
        decode_all(data, chunk)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000), st.integers(1, 512))
def test_fuzz_random_bytes(data: bytes, chunk: int) -> None:
    feed_everything(data, chunk)


@settings(max_examples=300)
@given(st.lists(frames, min_size=1, max_size=5), st.data())
def test_fuzz_truncated_and_mutated_frames(items: list[Frame], data: st.DataObject) -> None:
    raw = bytearray(b"".join(encode_frame(f, LIMIT) for f in items))
    cut = data.draw(st.integers(0, len(raw)))
    feed_everything(bytes(raw[:cut]), 5)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    feed_everything(bytes(raw), data.draw(st.integers(1, 64)))


@settings(max_examples=200)
@given(st.integers(LIMIT + 1, 2**32 - 1), st.binary(max_size=100))
def test_fuzz_oversized_lengths_never_buffer_the_body(length: int, tail: bytes) -> None:
    decoder = FrameDecoder(LIMIT)
    with pytest.raises(ProtocolError, match="outside"):
        decoder.feed(struct.pack(">I", length) + tail)
    assert len(decoder._buffer) == 0
