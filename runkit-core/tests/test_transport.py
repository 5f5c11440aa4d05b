"""The node transport end to end: real TLS sockets on 127.0.0.1, both backends.

Nodes are ``NodeTransport`` instances in one process; hostile or broken peers
are written by hand on raw anyio streams, so the refusals are tested against
an independent client implementation.
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import itertools
import logging
import math
import re
import shutil
import ssl
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from anyio.streams.tls import TLSAttribute, TLSStream
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runkit._errors import ConfigurationError
from runkit.transport import (
    CallTimeout,
    NodeTransport,
    PeerInfo,
    PeerUnavailable,
    RemoteError,
    Reply,
    TlsIdentity,
    TransportError,
    certificate_fingerprint,
)
from runkit.transport import _client as client_module
from runkit.transport import _link as link_module
from runkit.transport._frames import (
    Cancel,
    Frame,
    FrameDecoder,
    Goodbye,
    Hello,
    HelloOk,
    Ping,
    Pong,
    Request,
    Response,
    encode_frame,
)
from runkit.transport._link import Link
from runkit.transport._tls import client_context, server_context, sign_proof

sys.path.insert(0, str(Path(__file__).parent))
from tls_harness import issue, load_issuer

A = TlsIdentity.self_signed("node-a")
B = TlsIdentity.self_signed("node-b")
STRANGER = TlsIdentity.self_signed("stranger")
CLUSTER = frozenset({A.fingerprint, B.fingerprint})


def members(fingerprint: str) -> bool:
    return fingerprint in CLUSTER


async def echo(peer: PeerInfo, payload: bytes) -> bytes:
    return peer.node_id.encode() + b":" + payload


def node(
    node_id: str = "node-a",
    identity: TlsIdentity = A,
    authenticate: Callable[[str], bool | Awaitable[bool]] = members,
    **kwargs: object,
) -> NodeTransport:
    kwargs.setdefault("unary", {"echo": echo})
    return NodeTransport(
        node_id=node_id,
        identity=identity,
        authenticate=authenticate,
        **kwargs,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def serving(transport: NodeTransport, address: str = "127.0.0.1:0") -> AsyncIterator[str]:
    """Run *transport*'s server for the duration of the block; yield its address."""
    async with transport, anyio.create_task_group() as tg:
        bound: str = await tg.start(transport.serve, address)
        yield bound
        tg.cancel_scope.cancel()


@pytest.fixture
def transport_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="runkit.transport")
    return caplog


# --- calls ---------------------------------------------------------------------------


async def test_unary_round_trip_sees_the_authenticated_peer() -> None:
    seen: list[PeerInfo] = []

    async def whoami(peer: PeerInfo, payload: bytes) -> bytes:
        seen.append(peer)
        return payload[::-1]

    async with serving(node("node-b", B, unary={"whoami": whoami})) as address, node() as a:
        assert await a.call(address, "whoami", b"abc") == b"cba"
    assert seen[0].node_id == "node-a"
    assert seen[0].fingerprint == A.fingerprint
    assert seen[0].address.startswith("127.0.0.1:")


async def test_connections_reset_before_they_are_served_do_not_end_the_listener() -> None:
    # A port scanner or a load balancer's health check connects and resets
    # (RST) at once: its socket has no peer address by the time it is served.
    import socket
    import struct

    async def echo(peer: PeerInfo, payload: bytes) -> bytes:
        return payload

    async with serving(node("node-b", B, unary={"echo": echo})) as address, node() as a:
        host, port = address.rsplit(":", 1)

        def reset_many() -> None:
            for _ in range(100):
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.connect((host, int(port)))

        await anyio.to_thread.run_sync(reset_many)
        await anyio.sleep(0.2)
        assert await a.call(address, "echo", b"still here") == b"still here"


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop has no Windows build")
@pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")]
)
async def test_calls_over_tls_on_uvloop() -> None:
    # runkit run --backend uvloop: the transport's TLS streams on uvloop's loop.
    import asyncio

    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    async with serving(node("node-b", B)) as address, node() as a:
        replies = [await a.call(address, "echo", str(i).encode()) for i in range(20)]
    assert replies == [b"node-a:" + str(i).encode() for i in range(20)]


async def test_closing_says_shutting_down_on_both_sides(
    transport_log: pytest.LogCaptureFixture,
) -> None:
    # "the node is shutting down" read, on the closing side, as if the peer were.
    async with serving(node("node-b", B)) as address:
        async with node() as a:
            await a.call(address, "echo", b"x")
        with anyio.fail_after(5):  # the server logs the goodbye on its own
            while True:
                if "the peer said goodbye: shutting down" in transport_log.text:
                    break
                await anyio.sleep(0.01)
    closed = [r.getMessage() for r in transport_log.records if " closed: " in r.getMessage()]
    assert f"connection to node 'node-b' at {address} closed: shutting down" in closed
    assert not [m for m in closed if "the node is" in m], closed


async def test_a_call_after_the_transport_is_closed_fails_as_with_a_peer_gone() -> None:
    # A caller still at work as its node or client stops (an offer made again
    # after a busy answer, say) got an internal RuntimeError.
    async with serving(node("node-b", B)) as address:
        transport = node()
        async with transport:
            assert await transport.call(address, "echo", b"x") == b"node-a:x"
        with pytest.raises(PeerUnavailable, match="closed"):
            await transport.call(address, "echo", b"x")


async def test_concurrent_calls_share_one_connection() -> None:
    callers: set[str] = set()

    async def slow_echo(peer: PeerInfo, payload: bytes) -> bytes:
        callers.add(peer.address)
        await anyio.sleep(0.01 * (payload[0] % 5))
        return payload

    results: dict[int, bytes] = {}
    async with serving(node("node-b", B, unary={"e": slow_echo})) as address, node() as a:

        async def one(i: int) -> None:
            results[i] = await a.call(address, "e", bytes([i % 256]) + str(i).encode())

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
    assert results == {i: bytes([i % 256]) + str(i).encode() for i in range(200)}
    # Every request arrived from the same client socket: one TCP connection.
    assert len(callers) == 1


async def test_unknown_method_and_handler_errors_are_remote_errors(
    transport_log: pytest.LogCaptureFixture,
) -> None:
    async def broken(peer: PeerInfo, payload: bytes) -> bytes:
        raise KeyError("no such account")

    async def refusing(peer: PeerInfo, payload: bytes) -> bytes:
        raise RemoteError("not_owner", "partition 7 moved")

    handlers = {"broken": broken, "refusing": refusing, "echo": echo}
    async with serving(node("node-b", B, unary=handlers)) as address, node() as a:
        with pytest.raises(RemoteError) as unknown:
            await a.call(address, "nope", b"")
        assert unknown.value.code == "unknown_method"
        assert "'nope'" in unknown.value.message
        await _check_handler_errors(a, address)
        # The connection survives all of that.
        assert await a.call(address, "echo", b"ok") == b"node-a:ok"
    # The server logged the traceback; the caller got only the message.
    failures = [r for r in transport_log.records if "handler 'broken' failed" in r.message]
    assert failures
    assert failures[0].exc_info is not None


async def _check_handler_errors(a: NodeTransport, address: str) -> None:
    """Methods "broken" (raises KeyError) and "refusing" (a RemoteError) answer with errors."""
    with pytest.raises(RemoteError) as failed:
        await a.call(address, "broken", b"")
    assert (failed.value.code, failed.value.message) == ("handler_error", "'no such account'")
    with pytest.raises(RemoteError) as chosen:
        await a.call(address, "refusing", b"")
    assert (chosen.value.code, chosen.value.message) == ("not_owner", "partition 7 moved")


async def test_call_timeout_cancels_the_handler_and_keeps_the_connection() -> None:
    cancelled = anyio.Event()

    async def stuck(peer: PeerInfo, payload: bytes) -> bytes:
        try:
            await anyio.sleep(30)
        finally:
            cancelled.set()
        return b""

    b = node("node-b", B, unary={"stuck": stuck, "echo": echo})
    async with serving(b) as address, node(call_timeout=0.3) as a:
        # Connected first: the short timeout bounds connecting too.
        await a.call(address, "echo", b"warm", timeout=10)
        with pytest.raises(CallTimeout, match=r"'stuck' to .* timed out after 0\.3 s"):
            await a.call(address, "stuck", b"")
        with anyio.fail_after(5):
            await cancelled.wait()
        assert await a.call(address, "echo", b"still here") == b"node-a:still here"


async def test_a_cancelled_caller_does_not_break_the_shared_connection() -> None:
    release = anyio.Event()

    async def gated(peer: PeerInfo, payload: bytes) -> bytes:
        await release.wait()
        return payload

    b = node("node-b", B, unary={"gated": gated, "echo": echo})
    async with serving(b) as address, node() as a, anyio.create_task_group() as tg:
        tg.start_soon(a.call, address, "echo", b"warm-up")
        with anyio.move_on_after(0.2):
            await a.call(address, "gated", b"abandoned")
        release.set()  # its late answer, if any, is dropped
        assert await a.call(address, "echo", b"after") == b"node-a:after"


class _SilentPeer(anyio.abc.ByteStream):
    """A peer that never sends anything; ``send`` is the subclass's."""

    def __init__(self) -> None:
        self._closed = anyio.Event()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await self._closed.wait()
        raise anyio.EndOfStream

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        self._closed.set()


class _Unread(_SilentPeer):
    """A peer that reads nothing until ``reading`` is set; ``cancelled`` once it reads a Cancel."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = anyio.Event()
        self.cancelled = anyio.Event()
        self.frames: list[Frame] = []
        self._decoder = FrameDecoder()

    async def send(self, item: bytes) -> None:
        await self.reading.wait()
        self.frames += self._decoder.feed(item)
        if any(isinstance(frame, Cancel) for frame in self.frames):
            self.cancelled.set()


async def test_a_caller_leaving_while_the_outgoing_queue_is_full_still_cancels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A lost Cancel leaves the request holding a slot on the server (a stream, for good).
    monkeypatch.setattr(link_module, "_QUEUE_FRAMES", 2)
    peer = _Unread()
    link = Link(
        peer, label="test", max_frame_size=1024, keepalive_interval=math.inf, decoder=FrameDecoder()
    )
    connection = client_module.PeerConnection(link, PeerInfo("node-b", B.fingerprint, "b:1"))
    scopes = [anyio.CancelScope() for _ in range(4)]

    async def call(scope: anyio.CancelScope) -> None:
        with scope:
            await connection.unary("m", b"")

    async with anyio.create_task_group() as tg:
        tg.start_soon(connection.run)
        for scope in scopes:
            tg.start_soon(call, scope)
            await anyio.sleep(0.01)
        # Request 1 is being written, 2 and 3 fill the queue, 4 waits for room.
        scopes[1].cancel()
        await anyio.sleep(0.01)
        peer.reading.set()
        with anyio.fail_after(5):
            await peer.cancelled.wait()
        tg.cancel_scope.cancel()
    frames = peer.frames
    assert frames.index(Request(id=2, method="m", payload=b"")) < frames.index(Cancel(id=2))


@contextlib.asynccontextmanager
async def tls_client_of(
    read: Callable[[TLSStream], Awaitable[None]],
) -> AsyncIterator[TLSStream]:
    """A client TLS stream to a hand-written peer that runs *read* on its side."""

    async def peer(tcp: anyio.abc.SocketStream) -> None:
        try:
            stream = await TLSStream.wrap(
                tcp, server_side=True, ssl_context=server_context(B), standard_compatible=False
            )
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                await read(stream)
        finally:
            await anyio.aclose_forcefully(tcp)

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, peer)
            stream = await anyio.connect_tcp(
                "127.0.0.1", port, ssl_context=client_context(A), tls_standard_compatible=False
            )
            try:
                yield stream
            finally:
                await anyio.aclose_forcefully(stream)
                tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def tls_pair(
    reading: anyio.Event, expected: int
) -> AsyncIterator[tuple[TLSStream, anyio.Event]]:
    """A client TLS stream to a peer that reads nothing until *reading* is set.

    The peer then reads until the client closes; the event is set once it has
    read *expected* bytes.
    """
    received_all = anyio.Event()

    async def read(stream: TLSStream) -> None:
        await reading.wait()
        received = 0
        while True:
            received += len(await stream.receive())
            if received >= expected:
                received_all.set()

    async with tls_client_of(read) as stream:
        yield stream, received_all


def unread_link(stream: anyio.abc.ByteStream, max_frame_size: int) -> Link:
    return Link(
        stream,
        label="test",
        max_frame_size=max_frame_size,
        keepalive_interval=math.inf,
        decoder=FrameDecoder(),
    )


class _ClosedByPeer(_SilentPeer):
    """A peer that has closed its TLS session: a write raises ``EndOfStream``.

    anyio's ``TLSStream.send`` raises it when the peer's close_notify arrived
    first, as when a peer node shuts down while this one writes to it.
    """

    async def send(self, item: bytes) -> None:
        raise anyio.EndOfStream


async def test_writing_to_a_peer_that_closed_its_session_closes_the_link() -> None:
    # The EndOfStream escaped the writer and crashed the node that wrote.
    link = unread_link(_ClosedByPeer(), 1024)
    assert link.send_nowait(Ping())
    with anyio.fail_after(5):
        reason = await link.run(lambda frame: None)
    assert reason.startswith("connection lost while sending")
    assert link.closed


async def test_the_outgoing_queue_is_bounded_in_bytes_not_only_in_frames() -> None:
    # 64 KiB frames: the 1,024-frame bound alone would queue 64 MiB for a peer
    # that does not read; the byte bound stops the sender long before.
    frame = Request(id=1, method="m", payload=bytes(64 * 1024))
    size, total = len(encode_frame(frame)), 800
    reading, done = anyio.Event(), anyio.Event()
    sent = 0

    async def send_all(link: Link) -> None:
        nonlocal sent
        for _ in range(total):
            await link.send(frame)
            sent += 1
        done.set()

    async with (
        tls_pair(reading, total * size) as (stream, received_all),
        anyio.create_task_group() as tg,
    ):
        link = unread_link(stream, 1024 * 1024)
        tg.start_soon(link.run, lambda frame: None)
        tg.start_soon(send_all, link)
        with anyio.fail_after(10):  # until the sender stops: the socket's buffers are full
            progress = -1
            while progress != sent:
                progress = sent
                await anyio.sleep(0.3)
        # What it got into the queue fits the byte bound, besides what the
        # kernel's socket buffers took (a few MiB).
        assert sent * size < link_module._QUEUE_BYTES + 16 * 1024 * 1024
        assert sent < total
        # Filled to the byte bound exactly, the queue still takes the reader's
        # small control frames (a pong must not close a connection that is
        # merely slow), but not a large frame without waiting.
        room = link_module._QUEUE_BYTES - link._queued_bytes
        filler = next(
            f
            for n in range(max(room - 64, 0), room + 1)
            if len(encode_frame(f := Request(id=2, method="m", payload=bytes(n)))) == room
        )
        assert link.send_nowait(filler)
        assert link.send_nowait(Pong())
        assert not link.send_nowait(frame)
        reading.set()  # the peer reads: the writer drains, the sender resumes
        with anyio.fail_after(10):
            await done.wait()
            await received_all.wait()
        link.close("done", goodbye=False)


class _Received:
    """Frames a test peer has decoded, in order."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self._changed = anyio.Event()

    def add(self, frames: list[Frame]) -> None:
        if frames:
            self.frames.extend(frames)
            self._changed.set()
            self._changed = anyio.Event()

    async def until(self, count: int) -> list[Frame]:
        with anyio.fail_after(10):
            while len(self.frames) < count:
                await self._changed.wait()
        return self.frames


@contextlib.asynccontextmanager
async def decoding_pair(
    reading: anyio.Event | None = None,
) -> AsyncIterator[tuple[TLSStream, _Received]]:
    """A client TLS stream to a peer that decodes every frame it reads.

    The peer reads nothing until *reading* is set (if given).
    """
    received = _Received()

    async def read(stream: TLSStream) -> None:
        decoder = FrameDecoder()
        if reading is not None:
            await reading.wait()
        while True:
            received.add(list(decoder.feed(await stream.receive())))

    async with tls_client_of(read) as stream:
        yield stream, received


async def test_an_inline_request_on_an_idle_link_leaves_without_the_writer() -> None:
    # The writer task's turn of the loop is what an inline send saves: with the
    # writer not running at all, only a frame sent inline on an idle link can
    # reach the peer; one sent while another is queued waits its turn.
    first, queued, second = (Request(id=n, method="m", payload=b"%d" % n) for n in (1, 2, 3))
    async with decoding_pair() as (stream, received):
        link = unread_link(stream, 1024 * 1024)
        await link.send(first, inline=True)
        assert await received.until(1) == [first]
        await link.send(queued)
        await link.send(second, inline=True)  # queued behind it, not written
        await anyio.sleep(0.2)
        assert received.frames == [first]
        async with anyio.create_task_group() as tg:
            tg.start_soon(link.run, lambda frame: None)
            assert await received.until(3) == [first, queued, second]
            link.close("done", goodbye=False)


async def test_frames_sent_around_inline_writes_keep_each_senders_order() -> None:
    # Requests of 60 KiB go inline and, once the socket's buffers are full,
    # wait for it while the peer does not read yet; small frames sent
    # meanwhile queue, and the writer must hold them until the inline write
    # is done (two writes at once break TLS).
    big, small = 96, 200
    reading = anyio.Event()
    async with (
        decoding_pair(reading) as (stream, received),
        anyio.create_task_group() as tg,
    ):
        link = unread_link(stream, 2 * 1024 * 1024)
        tg.start_soon(link.run, lambda frame: None)

        async def requests() -> None:
            for n in range(1, big + 1):
                await link.send(Request(id=n, method="r", payload=bytes(60 * 1024)), inline=True)
                await anyio.sleep(0.001)

        async def others() -> None:
            for n in range(1, small + 1):
                await link.send(Request(id=n, method="s", payload=b"x"))
                await anyio.sleep(0.001)

        async with anyio.create_task_group() as senders:
            senders.start_soon(requests)
            senders.start_soon(others)
            await anyio.sleep(0.3)
            reading.set()
        frames = await received.until(big + small)
        for method, count in (("r", big), ("s", small)):
            ids = [f.id for f in frames if isinstance(f, Request) and f.method == method]
            assert ids == list(range(1, count + 1))
        assert not link.closed, link.reason
        link.close("done", goodbye=False)


async def test_a_sender_cancelled_during_its_inline_write_leaves_once_it_is_written() -> None:
    # TLS has taken the whole record when the write starts: cut short, the rest
    # of the stream would be unreadable for the peer and every call on the
    # link would fail for one caller's timeout. The write goes on; the sender
    # leaves once it is done, and the link stays usable.
    reading = anyio.Event()
    left = anyio.Event()
    returned: list[int] = []  # frames whose send returned

    async def sender() -> None:
        with anyio.move_on_after(0.3):
            for n in itertools.count(1):  # until the socket's buffers are full and a write waits
                await link.send(Request(id=n, method="m", payload=bytes(60 * 1024)), inline=True)
                returned.append(n)
        left.set()

    async with (
        decoding_pair(reading) as (stream, received),
        anyio.create_task_group() as tg,
    ):
        link = unread_link(stream, 1024 * 1024)
        tg.start_soon(link.run, lambda frame: None)
        tg.start_soon(sender)
        await anyio.sleep(0.6)
        assert not left.is_set()  # still writing, past its deadline
        assert not link.closed, link.reason
        reading.set()
        with anyio.fail_after(10):
            await left.wait()
        last = Request(id=10**9, method="after", payload=b"")
        await link.send(last, inline=True)
        frames = await received.until(len(returned) + 1)
        assert frames == [
            *(Request(id=n, method="m", payload=bytes(60 * 1024)) for n in returned),
            last,
        ]
        link.close("done", goodbye=False)


async def test_a_cancel_while_a_large_answer_waits_for_the_client_keeps_the_connection() -> None:
    # The client gives up on a request (its timeout) while the server writes
    # the answer to it, the client not reading yet: the request's cancellation
    # must not cut that write short, or every other call on the connection
    # fails with it.
    size = 24 * 1024 * 1024  # more than the sockets' buffers hold

    async def big(peer: PeerInfo, payload: bytes) -> bytes:
        return bytes(size)

    b = node("node-b", B, unary={"big": big, "echo": echo}, max_frame_size=32 * 1024 * 1024)
    async with serving(b) as address:
        stream = await raw_session(address, A)
        await stream.send(encode_frame(Request(id=1, method="big", payload=b"")))
        await anyio.sleep(0.5)  # the answer's write waits for the client to read
        await stream.send(encode_frame(Cancel(id=1)))
        await stream.send(encode_frame(Request(id=2, method="echo", payload=b"x")))
        decoder = FrameDecoder(32 * 1024 * 1024)
        frames: list[Frame] = []
        with anyio.fail_after(10):
            while not any(isinstance(f, Response) and f.id == 2 for f in frames):
                frames += decoder.feed(await stream.receive())
        await anyio.aclose_forcefully(stream)


async def test_a_large_frame_sent_inline_is_queued_and_its_senders_cancellation_is_harmless() -> (
    None
):
    # A frame over 64 KiB goes through the writer's queue even when sent
    # inline: a sender that gives up while it waits for room leaves the link
    # usable (written inline, its write would have been cut short).
    reading = anyio.Event()
    sent: list[int] = []
    async with (
        decoding_pair(reading) as (stream, received),
        anyio.create_task_group() as tg,
    ):
        link = unread_link(stream, 8 * 1024 * 1024)
        tg.start_soon(link.run, lambda frame: None)
        with anyio.fail_after(5), anyio.move_on_after(0.3) as scope:
            for n in itertools.count(1):  # until the queue is full and a send waits
                await link.send(
                    Request(id=n, method="m", payload=bytes(2 * 1024 * 1024)), inline=True
                )
                sent.append(n)
        assert scope.cancelled_caught
        assert not link.closed, link.reason
        reading.set()
        await link.send(Ping(), inline=True)
        frames = await received.until(len(sent) + 1)
        assert [f.id for f in frames if isinstance(f, Request)] == sent
        assert isinstance(frames[-1], Ping)
        link.close("done", goodbye=False)


async def test_an_inline_write_the_peer_does_not_read_for_two_intervals_closes_the_link() -> None:
    # The peer keeps sending (so keepalive sees it alive) but reads nothing: a
    # shielded write would hold its sender for ever; after two keepalive
    # intervals the link gives up on the peer, and the sender is released.
    # (Pongs, which need no answer: an answer would be queued, and the frames
    # sent after it would wait in the queue rather than be written inline.)
    async def sending(stream: TLSStream) -> None:
        pong = encode_frame(Pong(), 1024)
        while True:
            await stream.send(pong)
            await anyio.sleep(0.02)

    async with tls_client_of(sending) as stream, anyio.create_task_group() as tg:
        link = Link(
            stream,
            label="test",
            max_frame_size=1024 * 1024,
            keepalive_interval=0.25,
            decoder=FrameDecoder(),
        )
        tg.start_soon(link.run, lambda frame: None)

        async def send_until_closed() -> None:
            for n in itertools.count(1):
                await link.send(Request(id=n, method="m", payload=bytes(60 * 1024)), inline=True)

        with anyio.fail_after(10), pytest.raises(link_module.LinkClosed):
            await send_until_closed()
        # Keepalive closes it instead only if a stall held back the peer's pongs
        # for as long; without the bound nothing would (the write waits for ever).
        assert link.reason == "the peer read nothing of a frame for 0.5 s" or (
            link.reason.startswith("keepalive:")
        )


async def test_a_frame_larger_than_the_queue_bound_still_goes() -> None:
    limit = 2 * link_module._QUEUE_BYTES
    frame = Request(id=1, method="m", payload=bytes(link_module._QUEUE_BYTES + 1))
    reading = anyio.Event()
    reading.set()
    expected = 2 * len(encode_frame(frame, limit))
    async with (
        tls_pair(reading, expected) as (stream, received_all),
        anyio.create_task_group() as tg,
    ):
        link = unread_link(stream, limit)
        tg.start_soon(link.run, lambda frame: None)
        with anyio.fail_after(10):
            await link.send(frame)
            await link.send(frame)  # once the first has left
            await received_all.wait()
        link.close("done", goodbye=False)


# --- deferred handlers (answered through a Reply, without a task per request) -------


async def test_deferred_handlers_answer_now_later_or_with_errors(
    transport_log: pytest.LogCaptureFixture,
) -> None:
    later: list[tuple[bytes, Reply]] = []
    three = anyio.Event()

    def now(peer: PeerInfo, payload: bytes, reply: Reply) -> None:
        reply.ok(peer.node_id.encode() + b":" + payload)
        reply.ok(b"a second answer is ignored")

    def queued(peer: PeerInfo, payload: bytes, reply: Reply) -> None:
        later.append((payload, reply))
        if len(later) == 3:
            three.set()

    def broken(peer: PeerInfo, payload: bytes, reply: Reply) -> None:
        raise KeyError("no such account")

    def refusing(peer: PeerInfo, payload: bytes, reply: Reply) -> None:
        reply.fail(RemoteError("not_owner", "partition 7 moved"))

    deferred = {"now": now, "queued": queued, "broken": broken, "refusing": refusing}
    b = node("node-b", B, deferred=deferred)
    async with serving(b) as address, node() as a:
        assert await a.call(address, "now", b"x") == b"node-a:x"
        async with anyio.create_task_group() as tg:
            answers: dict[bytes, bytes] = {}

            async def call(payload: bytes) -> None:
                answers[payload] = await a.call(address, "queued", payload)

            for p in (b"1", b"2", b"3"):
                tg.start_soon(call, p)
            with anyio.fail_after(5):
                await three.wait()
            for payload, reply in reversed(later):  # answered out of order
                assert not reply.done
                reply.ok(payload * 2)
                assert reply.done
        assert answers == {b"1": b"11", b"2": b"22", b"3": b"33"}
        await _check_handler_errors(a, address)
        assert await a.call(address, "echo", b"ok") == b"node-a:ok"
    assert "handler 'broken' failed" in transport_log.text


async def test_a_deferred_request_the_caller_leaves_is_cancelled_once() -> None:
    held: list[Reply] = []
    cancelled: list[str] = []
    cancel_seen = anyio.Event()

    def on_cancel(payload: bytes) -> None:
        cancelled.append(payload.decode())
        cancel_seen.set()

    def hold(peer: PeerInfo, payload: bytes, reply: Reply) -> None:
        reply.on_cancel = lambda: on_cancel(payload)
        held.append(reply)

    b = node("node-b", B, deferred={"hold": hold})
    async with serving(b) as address, node(call_timeout=0.2) as a:
        await a.call(address, "echo", b"warm", timeout=10)  # connected first, as above
        with pytest.raises(CallTimeout):
            await a.call(address, "hold", b"timed-out")
        with anyio.fail_after(5):
            await cancel_seen.wait()  # the caller's Cancel frame reached the server
        assert cancelled == ["timed-out"]
        assert held[0].done
        held[0].ok(b"too late")  # ignored: nothing is sent, the connection is fine
        held[0].fail(RuntimeError("too late"))
        assert await a.call(address, "echo", b"after") == b"node-a:after"
    assert cancelled == ["timed-out"]  # on_cancel ran once


async def test_a_closing_connection_cancels_its_deferred_requests() -> None:
    cancelled = anyio.Event()
    arrived = anyio.Event()
    held: list[Reply] = []

    def hold(peer: PeerInfo, payload: bytes, reply: Reply) -> None:
        reply.on_cancel = cancelled.set
        held.append(reply)
        arrived.set()

    async with serving(node("node-b", B, deferred={"hold": hold})) as address:
        # A hand-written client sends the request, then drops the connection
        # without cancelling it.
        stream = await raw_session(address, A)
        decoder = FrameDecoder()
        with anyio.fail_after(5):
            assert isinstance(decoder.feed(await stream.receive())[0], HelloOk)
        await stream.send(encode_frame(Request(id=1, method="hold", payload=b"")))
        with anyio.fail_after(5):
            await arrived.wait()
        assert not held[0].done
        await anyio.aclose_forcefully(stream)
        with anyio.fail_after(5):
            await cancelled.wait()
        assert all(reply.done for reply in held)
        held[0].ok(b"nobody is listening")  # ignored


async def test_a_deferred_answer_over_the_frame_limit_is_an_error() -> None:
    def big(peer: PeerInfo, payload: bytes, reply: Reply) -> None:
        reply.ok(b"x" * 4096)

    b = node("node-b", B, deferred={"big": big}, max_frame_size=1024)
    async with serving(b) as address, node() as a:
        with pytest.raises(RemoteError, match="response_too_large"):
            await a.call(address, "big", b"")
        assert await a.call(address, "echo", b"still") == b"node-a:still"


async def test_deferred_answers_a_peer_does_not_read_count_against_the_request_bound(
    transport_log: pytest.LogCaptureFixture,
) -> None:
    # A peer that sends requests and never reads the answers: once the
    # outgoing queue is full, answers waiting for room are requests still in
    # progress, as a unary handler's are, so the server holds no more than the
    # bound of them and then closes the connection.
    def instant(peer: PeerInfo, payload: bytes, reply: Reply) -> None:
        reply.ok(b"x" * 60_000)

    most_waiting = 0

    def waiting_answers() -> int:
        return sum("_send_later" in (t.name or "") for t in anyio.get_running_tasks())

    b = node("node-b", B, deferred={"instant": instant}, max_concurrent_requests=4)
    async with serving(b) as address:
        flooder = await raw_session(address, A)
        with anyio.fail_after(30):
            try:
                for i in range(1, 20_001):
                    await flooder.send(encode_frame(Request(id=i, method="instant", payload=b"")))
                    if i % 100 == 0:
                        await anyio.lowlevel.checkpoint()  # let the server read and answer
                        most_waiting = max(most_waiting, waiting_answers())
            except (anyio.BrokenResourceError, ssl.SSLError, OSError):
                pass  # closed by the server
            while True:
                if "sends requests faster than it reads answers" in transport_log.text:
                    break
                await anyio.sleep(0.01)
        await anyio.aclose_forcefully(flooder)
    assert most_waiting <= 4


def test_a_method_cannot_be_both_unary_and_deferred() -> None:
    def both(peer: PeerInfo, payload: bytes, reply: Reply) -> None:
        reply.ok(b"")

    with pytest.raises(ValueError, match=r"\['echo'\] are given as both unary and deferred"):
        node(deferred={"echo": both})


async def test_an_unreachable_peer_is_unavailable() -> None:
    async with anyio.create_task_group() as tg:
        address: str = await tg.start(node("node-b", B).serve, "127.0.0.1:0")
        tg.cancel_scope.cancel()  # the port was bound, then closed again
    async with node() as a:
        with pytest.raises(PeerUnavailable, match="cannot connect"):
            await a.call(address, "echo", b"")


async def test_a_broken_connection_fails_in_flight_calls_and_reopens_on_the_next_call() -> None:
    started = anyio.Event()

    async def never(peer: PeerInfo, payload: bytes) -> bytes:
        started.set()
        await anyio.sleep(30)
        return b""

    b = node("node-b", B, unary={"never": never, "echo": echo})
    async with node() as a:
        async with anyio.create_task_group() as server:
            address: str = await server.start(b.serve, "127.0.0.1:0")
            assert await a.call(address, "echo", b"1") == b"node-a:1"

            async def stop_server_once_busy() -> None:
                await started.wait()
                server.cancel_scope.cancel()

            server.start_soon(stop_server_once_busy)
            with pytest.raises(PeerUnavailable, match="connection"):
                await a.call(address, "never", b"")
        # The peer restarts on the same address: the next call reconnects.
        async with anyio.create_task_group() as server:
            await server.start(b.serve, address)
            assert await a.call(address, "echo", b"2") == b"node-a:2"
            server.cancel_scope.cancel()


async def test_requests_beyond_the_per_connection_bound_are_overloaded() -> None:
    release = anyio.Event()

    async def gated(peer: PeerInfo, payload: bytes) -> bytes:
        await release.wait()
        return payload

    b = node("node-b", B, unary={"gated": gated}, max_concurrent_requests=2)
    outcomes: list[bytes | str] = []
    async with serving(b) as address, node() as a:

        async def one(i: int) -> None:
            try:
                outcomes.append(await a.call(address, "gated", str(i).encode()))
            except RemoteError as exc:
                outcomes.append(exc.code)
                release.set()  # the refusal came first; let the two admitted finish

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(one, i)
    assert sorted(map(str, outcomes))[-1] == "overloaded"
    assert len([o for o in outcomes if isinstance(o, bytes)]) == 2


async def test_a_connection_that_never_handshakes_is_dropped(
    transport_log: pytest.LogCaptureFixture,
) -> None:
    async with serving(node("node-b", B, handshake_timeout=0.3)) as address:
        host, port = address.rsplit(":", 1)
        async with await anyio.connect_tcp(host, int(port)) as idle:
            assert await read_frames_until_closed(idle) == []
    assert any("no handshake within 0.3 s" in r.message for r in transport_log.records)


async def test_a_busy_listen_address_is_a_clear_error() -> None:
    async with serving(node("node-b", B)) as address:
        with pytest.raises(TransportError, match=f"cannot listen on {address}: "):
            await node().serve(address)
        with pytest.raises(ValueError, match="expected host:port"):
            await node().serve("no-port")


async def test_calling_outside_async_with_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        await node().call("127.0.0.1:1", "echo", b"")


async def test_a_call_still_connecting_when_the_transport_closes_fails_cleanly(
    transport_log: pytest.LogCaptureFixture,
) -> None:
    checking, release = anyio.Event(), anyio.Event()

    async def slow_members(fingerprint: str) -> bool:
        checking.set()  # the client's handshake is under way
        await release.wait()
        return members(fingerprint)

    outcome: list[BaseException] = []
    failed = anyio.Event()
    async with serving(node("node-b", B, authenticate=slow_members)) as address:
        async with anyio.create_task_group() as tg:
            async with node() as a:

                async def call() -> None:
                    try:
                        await a.call(address, "echo", b"x", timeout=30)
                    except Exception as exc:
                        outcome.append(exc)
                        failed.set()

                tg.start_soon(call)
                with anyio.fail_after(10):
                    await checking.wait()
            # Leaving the transport cancelled the handshake: it did not wait for it.
            with anyio.fail_after(1):
                await failed.wait()
            release.set()
        with anyio.fail_after(10):  # and the socket it had opened is closed, not left open
            while True:
                if "closed connection from" in transport_log.text:
                    break
                await anyio.sleep(0.01)
    assert len(outcome) == 1
    assert isinstance(outcome[0], PeerUnavailable)
    assert outcome[0].reason == "shutting down"


def slow_handshakes(
    delay: float, verdicts: list[bool] | None = None
) -> tuple[list[str], Callable[[str], Awaitable[bool]]]:
    """An authenticator taking *delay* s per handshake, answering *verdicts* first; its calls."""
    calls: list[str] = []

    async def authenticate(fingerprint: str) -> bool:
        calls.append(fingerprint)
        await anyio.sleep(delay)
        if verdicts:
            return verdicts.pop(0)
        return members(fingerprint)

    return calls, authenticate


async def count(peer: PeerInfo, payload: bytes) -> AsyncIterator[bytes]:
    for i in range(int(payload)):
        yield str(i).encode()


async def test_a_call_timing_out_while_connecting_leaves_the_connection_to_the_next_call() -> None:
    # Each handshake takes longer than the callers' timeouts: they give up
    # waiting, and the connection they started is ready for a later call.
    handshakes, authenticate = slow_handshakes(1.5)
    b = node("node-b", B, authenticate=authenticate, streams={"count": count})
    async with serving(b) as address, node() as a:
        with pytest.raises(CallTimeout, match=r"'count' .* after 0\.3 s"):
            async with a.stream(address, "count", b"3", timeout=0.3) as items:
                await anext(items)
        with pytest.raises(CallTimeout, match=r"'echo' .* after 0\.3 s"):
            await a.call(address, "echo", b"1", timeout=0.3)
        await anyio.sleep(1.5)  # the handshake ends meanwhile
        assert await a.call(address, "echo", b"2", timeout=0.5) == b"node-a:2"
        async with a.stream(address, "count", b"3", timeout=0.5) as items:
            assert [item async for item in items] == [b"0", b"1", b"2"]
    assert handshakes == [A.fingerprint]


async def test_a_failed_connection_attempt_fails_every_caller_waiting_for_it() -> None:
    handshakes, authenticate = slow_handshakes(0.5, verdicts=[False])
    b = node("node-b", B, authenticate=authenticate)
    outcomes: list[Exception] = []
    async with serving(b) as address, node() as a:

        async def one(timeout: float) -> None:
            try:
                await a.call(address, "echo", b"", timeout=timeout)
            except (PeerUnavailable, CallTimeout) as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as tg:
            for timeout in (5, 5, 5, 0.2):
                tg.start_soon(one, timeout)
        # The refusal went to everyone still waiting; the next call tries again.
        assert await a.call(address, "echo", b"x") == b"node-a:x"
    assert isinstance(outcomes[0], CallTimeout)
    refusals = outcomes[1:]
    assert [type(exc) for exc in refusals] == [PeerUnavailable] * 3
    assert {exc.reason for exc in refusals} == {"refused by the peer: unknown certificate"}  # type: ignore[attr-defined]
    assert handshakes == [A.fingerprint] * 2


# --- streams -----------------------------------------------------------------------


async def test_stream_items_arrive_in_order_and_the_server_waits_for_credit() -> None:
    produced = 0

    async def count(peer: PeerInfo, payload: bytes) -> AsyncIterator[bytes]:
        nonlocal produced
        for i in range(int(payload)):
            produced += 1
            yield str(i).encode()

    b = node("node-b", B, streams={"count": count})
    async with (
        serving(b) as address,
        node() as a,
        a.stream(address, "count", b"500", window=8) as items,
    ):
        first = await anext(items)
        await anyio.sleep(0.3)  # a slow consumer
        # The window's worth was sent; the generator is parked on the next item.
        assert produced <= 8 + 1
        rest = [item async for item in items]
    assert [first, *rest] == [str(i).encode() for i in range(500)]
    assert produced == 500


async def test_leaving_a_stream_early_cancels_it_on_the_server() -> None:
    closed = anyio.Event()

    async def forever(peer: PeerInfo, payload: bytes) -> AsyncIterator[bytes]:
        try:
            i = 0
            while True:
                yield str(i).encode()
                i += 1
        finally:
            closed.set()

    async with serving(node("node-b", B, streams={"forever": forever})) as address, node() as a:
        async with a.stream(address, "forever", b"") as items:
            got = [await anext(items) for _ in range(3)]
        assert got == [b"0", b"1", b"2"]
        with anyio.fail_after(5):
            await closed.wait()
        assert await a.call(address, "echo", b"x") == b"node-a:x"


async def test_stream_errors_and_waits_are_bounded() -> None:
    async def fails(peer: PeerInfo, payload: bytes) -> AsyncIterator[bytes]:
        yield b"one"
        raise ValueError("disk on fire")

    async def silent(peer: PeerInfo, payload: bytes) -> AsyncIterator[bytes]:
        await anyio.sleep(30)
        yield b""

    b = node("node-b", B, streams={"fails": fails, "silent": silent})
    async with serving(b) as address, node() as a:
        async with a.stream(address, "fails", b"") as items:
            assert await anext(items) == b"one"
            with pytest.raises(RemoteError, match="handler_error: disk on fire"):
                await anext(items)
        with pytest.raises(CallTimeout):
            async with a.stream(address, "silent", b"", timeout=0.2) as items:
                await anext(items)
        with pytest.raises(RemoteError, match="unknown_method"):
            async with a.stream(address, "echo", b"") as items:  # echo is unary only
                await anext(items)


async def test_opening_a_stream_without_a_timeout_is_bounded_and_blocks_no_other_call() -> None:
    # An observer waits for items forever (math.inf), but not for a peer that
    # accepts TCP and never answers: every call to the address waits for that attempt.
    tarpit = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    address = f"127.0.0.1:{tarpit.extra(anyio.abc.SocketAttribute.local_port)}"
    held: list[anyio.abc.SocketStream] = []
    gave_up = anyio.Event()

    async def hold(tcp: anyio.abc.SocketStream) -> None:
        held.append(tcp)
        await anyio.sleep_forever()

    async def observe(a: NodeTransport) -> None:
        try:
            async with a.stream(address, "observe", b"", timeout=math.inf) as items:
                async for _ in items:
                    pass
        except (PeerUnavailable, CallTimeout):
            gave_up.set()

    async with node(call_timeout=1.0) as a, anyio.create_task_group() as tg:
        started = anyio.current_time()
        async with anyio.create_task_group() as pit:
            pit.start_soon(tarpit.serve, hold)
            tg.start_soon(observe, a)
            await anyio.sleep(0.5)
            pit.cancel_scope.cancel()  # the listener goes; the accepted socket stays silent
        await tarpit.aclose()
        # A healthy node comes up at the same address while the open is stuck.
        async with node("node-b", B) as b:
            assert await tg.start(b.serve, address) == address
            # A call now waits for the stuck attempt, which ends at call_timeout.
            with pytest.raises(PeerUnavailable, match="no handshake within 1 s"):
                await a.call(address, "echo", b"x", timeout=2.0)
            assert await a.call(address, "echo", b"y", timeout=2.0) == b"node-a:y"
            with anyio.fail_after(5):
                await gave_up.wait()
            tg.cancel_scope.cancel()
    assert anyio.current_time() - started < 3
    assert held
    for tcp in held:
        await tcp.aclose()


# --- keepalive ---------------------------------------------------------------------


async def test_keepalive_closes_a_connection_to_a_silent_peer() -> None:
    """A peer that completes the handshake and then never reads or answers."""
    stop = anyio.Event()

    async def mute(tcp: anyio.abc.SocketStream) -> None:
        stream = await TLSStream.wrap(
            tcp, server_side=True, ssl_context=server_context(B), standard_compatible=False
        )
        await stream.receive()  # Hello
        await stream.send(encode_frame(HelloOk(node_id="node-b")))
        await stop.wait()
        await stream.aclose()

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, mute)
            async with node(keepalive_interval=0.2) as a:
                started = anyio.current_time()
                with pytest.raises(PeerUnavailable, match="keepalive"):
                    await a.call(f"127.0.0.1:{port}", "echo", b"", timeout=10)
                assert anyio.current_time() - started < 3
            stop.set()
            tg.cancel_scope.cancel()


# --- refusals ----------------------------------------------------------------------


async def raw_session(address: str, identity: TlsIdentity, hello: Hello | None = None) -> TLSStream:
    """A hand-written client: TLS, then the fingerprint-mode Hello (proof included)."""
    host, port = address.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    stream = await anyio.connect_tcp(
        host, int(port), ssl_context=ctx, tls_standard_compatible=False
    )
    if hello is None:
        server_der = stream.extra(TLSAttribute.peer_certificate_binary)
        assert server_der is not None
        server_fp = certificate_fingerprint(server_der)
        binding = stream.extra(TLSAttribute.channel_binding_tls_unique)
        der = ssl.PEM_cert_to_DER_cert(identity.cert_pem.decode())
        proof = sign_proof(identity, binding, server_fp)
        hello = Hello(version=1, node_id="raw", cert=der, proof=proof)
    await stream.send(encode_frame(hello))
    return stream


async def read_frames_until_closed(stream: anyio.abc.ByteStream) -> list[Frame]:
    decoder = FrameDecoder()
    frames: list[Frame] = []
    with anyio.fail_after(5):
        try:
            while True:
                frames += decoder.feed(await stream.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError):
            pass
    await stream.aclose()
    return frames


async def test_the_hand_written_client_is_accepted() -> None:
    """The refusal tests below are meaningful: the same client, done right, works."""
    async with serving(node("node-b", B)) as address:
        stream = await raw_session(address, A)
        await stream.send(encode_frame(Request(id=1, method="echo", payload=b"hi")))
        await stream.send(encode_frame(Ping()))
        decoder = FrameDecoder()
        frames: list[Frame] = []
        with anyio.fail_after(5):
            while len(frames) < 3:
                frames += decoder.feed(await stream.receive())
        await stream.aclose()
    assert frames[0] == HelloOk(node_id="node-b")
    assert Response(id=1, payload=b"raw:hi") in frames[1:]


async def test_plain_tcp_is_dropped_and_others_are_still_served(
    transport_log: pytest.LogCaptureFixture,
) -> None:
    async with serving(node("node-b", B)) as address, node() as a:
        host, port = address.rsplit(":", 1)
        async with await anyio.connect_tcp(host, int(port)) as plain:
            await plain.send(b"GET / HTTP/1.0\r\n\r\n")
            assert await read_frames_until_closed(plain) == []
        assert await a.call(address, "echo", b"ok") == b"node-a:ok"
    assert any("TLS handshake failed" in r.message for r in transport_log.records)


async def _tls_stranger(address: str) -> TLSStream:
    """A TLS connection from anyone: no certificate, nothing proven yet."""
    host, port = address.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return await anyio.connect_tcp(host, int(port), ssl_context=ctx, tls_standard_compatible=False)


async def test_before_its_hello_a_peer_may_send_only_small_frames(
    transport_log: pytest.LogCaptureFixture,
) -> None:
    # A Hello is ~1 KiB: a stranger must not make the node buffer up to the 4 MiB limit.
    async with serving(node("node-b", B)) as address, node() as a:
        stranger = await _tls_stranger(address)
        await stranger.send(struct.pack(">I", 4 * 1024 * 1024 - 1) + b"\0" * 1024)
        assert await read_frames_until_closed(stranger) == []
        # Once the handshake is done, frames may be as large as the limit.
        big = b"x" * (1024 * 1024)
        assert await a.call(address, "echo", big) == b"node-a:" + big
    assert any(
        "frame length 4194303 is outside 1..65536 bytes" in r.message for r in transport_log.records
    )


async def test_a_client_without_a_certificate_is_refused(
    transport_log: pytest.LogCaptureFixture,
) -> None:
    async with serving(node("node-b", B)) as address:
        stream = await raw_session(address, A, Hello(version=1, node_id="anonymous"))
        assert await read_frames_until_closed(stream) == [Goodbye(reason="no client certificate")]
    assert any("'anonymous'): no client certificate" in r.message for r in transport_log.records)


@pytest.mark.parametrize(
    "signer", [STRANGER, A], ids=["another-key", "replayed-from-another-session"]
)
async def test_a_certificate_proof_must_be_made_for_this_session(signer: TlsIdentity) -> None:
    async with serving(node("node-b", B)) as address:
        # A's certificate, with a proof over a channel binding this session does not have.
        stolen = await raw_session(
            address,
            A,
            Hello(
                version=1,
                node_id="node-a",
                cert=ssl.PEM_cert_to_DER_cert(A.cert_pem.decode()),
                proof=sign_proof(signer, b"x" * 48, B.fingerprint),
            ),
        )
        assert await read_frames_until_closed(stolen) == [
            Goodbye(reason="invalid certificate proof")
        ]


async def test_a_client_with_an_unknown_certificate_is_refused(
    transport_log: pytest.LogCaptureFixture,
) -> None:
    async with serving(node("node-b", B)) as address:
        async with node("stranger", STRANGER, authenticate=lambda fp: True) as stranger:
            with pytest.raises(PeerUnavailable, match="refused by the peer: unknown certificate"):
                await stranger.call(address, "echo", b"")
        async with node() as a:  # a member still gets in
            assert await a.call(address, "echo", b"ok") == b"node-a:ok"
    refusals = [r.message for r in transport_log.records if "unknown certificate" in r.message]
    assert any(STRANGER.fingerprint in m for m in refusals)


async def test_a_server_with_an_unknown_certificate_is_refused_by_the_client() -> None:
    called = False

    async def spy(peer: PeerInfo, payload: bytes) -> bytes:
        nonlocal called
        called = True
        return b""

    impostor = node("node-b", STRANGER, authenticate=lambda fp: True, unary={"spy": spy})
    async with serving(impostor) as address, node() as a:
        with pytest.raises(PeerUnavailable, match=f"unknown certificate {STRANGER.fingerprint}"):
            await a.call(address, "spy", b"secret")
    assert not called


def dated(
    tmp: Path, name: str, valid_from: datetime.timedelta, valid_to: datetime.timedelta
) -> TlsIdentity:
    """A self-signed identity valid from *valid_from* to *valid_to* relative to now.

    Built from PEM, not loaded (``load`` refuses such dates): a peer that presents it anyway.
    """
    cert, key = issue(tmp, name, None, valid_from=valid_from, valid_to=valid_to)
    return TlsIdentity(cert_pem=cert.read_bytes(), key_pem=key.read_bytes())


OUTSIDE_VALIDITY = pytest.mark.parametrize(
    ("valid_from", "valid_to", "state"),
    [
        (datetime.timedelta(days=-30), datetime.timedelta(minutes=-6), "has expired"),
        (datetime.timedelta(minutes=6), datetime.timedelta(days=30), "is not valid yet"),
    ],
    ids=["expired", "not-yet-valid"],
)


def _window(identity: TlsIdentity) -> str:
    cert = x509.load_pem_x509_certificate(identity.cert_pem)
    return (
        f"valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC "
        f"to {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC (now "
    )


@OUTSIDE_VALIDITY
async def test_a_client_whose_pinned_certificate_is_outside_its_dates_is_refused(
    tmp_path: Path,
    transport_log: pytest.LogCaptureFixture,
    valid_from: datetime.timedelta,
    valid_to: datetime.timedelta,
    state: str,
) -> None:
    # Its fingerprint is trusted: only the dates can refuse it.
    stale = dated(tmp_path, "node-c", valid_from, valid_to)
    trusted = CLUSTER | {stale.fingerprint}
    async with serving(node("node-b", B, authenticate=trusted.__contains__)) as address:
        async with node("node-c", stale, authenticate=trusted.__contains__) as c:
            with pytest.raises(PeerUnavailable) as refused:
                await c.call(address, "echo", b"")
        async with node() as a:  # a member still gets in
            assert await a.call(address, "echo", b"ok") == b"node-a:ok"
    assert f"refused by the peer: certificate CN=node-c {state}: {_window(stale)}" in str(
        refused.value
    )
    [logged] = [r for r in transport_log.records if f"CN=node-c {state}" in r.getMessage()]
    assert logged.levelno == logging.WARNING
    assert "(node 'node-c')" in logged.getMessage()
    assert _window(stale) in logged.getMessage()
    assert stale.fingerprint in logged.getMessage()


@OUTSIDE_VALIDITY
async def test_a_server_whose_pinned_certificate_is_outside_its_dates_is_refused(
    tmp_path: Path,
    transport_log: pytest.LogCaptureFixture,
    valid_from: datetime.timedelta,
    valid_to: datetime.timedelta,
    state: str,
) -> None:
    called = False

    async def spy(peer: PeerInfo, payload: bytes) -> bytes:
        nonlocal called
        called = True
        return b""

    stale = dated(tmp_path, "node-c", valid_from, valid_to)
    trusted = CLUSTER | {stale.fingerprint}
    server = node("node-c", stale, authenticate=trusted.__contains__, unary={"spy": spy})
    async with serving(server) as address, node(authenticate=trusted.__contains__) as a:
        with pytest.raises(PeerUnavailable) as refused:
            await a.call(address, "spy", b"secret")
    assert not called
    assert f"certificate CN=node-c {state}: {_window(stale)}" in str(refused.value)
    [logged] = [r for r in transport_log.records if r.getMessage().startswith("refused peer")]
    assert logged.levelno == logging.WARNING
    assert address in logged.getMessage()
    assert _window(stale) in logged.getMessage()
    assert stale.fingerprint in logged.getMessage()


async def test_pinned_certificates_dates_allow_for_clock_skew(tmp_path: Path) -> None:
    # A server whose certificate expired a minute ago and a client whose
    # certificate starts in a minute: their clocks may be that far from ours.
    minute = datetime.timedelta(minutes=1)
    behind = dated(tmp_path, "behind", -2 * minute, -minute)
    ahead = dated(tmp_path, "ahead", minute, 2 * minute)
    trusted = frozenset({behind.fingerprint, ahead.fingerprint})
    async with (
        serving(node("behind", behind, authenticate=trusted.__contains__)) as address,
        node("ahead", ahead, authenticate=trusted.__contains__) as client,
    ):
        assert await client.call(address, "echo", b"ok") == b"ahead:ok"


async def test_an_expected_fingerprint_is_enforced() -> None:
    async with serving(node("node-b", B)) as address, node() as a:
        assert await a.call(address, "echo", b"", expect_fingerprint=B.fingerprint) == b"node-a:"
        with pytest.raises(PeerUnavailable, match="not the expected"):
            await a.call(address, "echo", b"", expect_fingerprint=A.fingerprint)


async def test_a_connection_to_an_unexpected_certificate_is_dropped() -> None:
    # Say the node at this address was replaced: the next call must reconnect,
    # not keep failing on the old connection until keepalive notices.
    async def port(peer: PeerInfo, payload: bytes) -> bytes:
        return peer.address.encode()

    async with serving(node("node-b", B, unary={"port": port})) as address, node() as a:
        before = await a.call(address, "port", b"")
        with pytest.raises(PeerUnavailable, match="not the expected"):
            await a.call(address, "port", b"", expect_fingerprint=A.fingerprint)
        assert await a.call(address, "port", b"") != before  # a new connection


async def test_an_async_authenticator_is_awaited() -> None:
    asked: list[str] = []

    async def authenticate(fingerprint: str) -> bool:
        asked.append(fingerprint)
        await anyio.lowlevel.checkpoint()
        return fingerprint in CLUSTER

    b = node("node-b", B, authenticate=authenticate)
    async with serving(b) as address, node() as a:
        assert await a.call(address, "echo", b"") == b"node-a:"
    assert asked == [A.fingerprint]


async def test_a_protocol_version_mismatch_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving(node("node-b", B)) as address, node() as a:
        monkeypatch.setattr(client_module, "PROTOCOL_VERSION", 2)
        with pytest.raises(
            PeerUnavailable, match="unsupported protocol version 2; this node speaks 1"
        ):
            await a.call(address, "echo", b"")


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (struct.pack(">I", 0xFFFFFF), "frame length 16777215 is outside"),
        (struct.pack(">I", 3) + b"\x93\x63\x00", "malformed frame"),
        (encode_frame(Response(id=1, payload=b"")), "unexpected Response frame from a client"),
    ],
    ids=["oversized", "unknown-kind", "wrong-direction"],
)
async def test_bad_frames_close_only_that_connection(
    garbage: bytes, reason: str, transport_log: pytest.LogCaptureFixture
) -> None:
    b = node("node-b", B, max_frame_size=64 * 1024)
    async with serving(b) as address, node() as a:
        assert await a.call(address, "echo", b"before") == b"node-a:before"
        bad = await raw_session(address, A)
        await bad.send(garbage)
        frames = await read_frames_until_closed(bad)
        assert frames[0] == HelloOk(node_id="node-b")
        assert isinstance(frames[-1], Goodbye)
        assert reason in frames[-1].reason
        assert await a.call(address, "echo", b"after") == b"node-a:after"
    closes = [r for r in transport_log.records if "closed connection from" in r.message]
    assert any(reason in r.message and r.levelno == logging.WARNING for r in closes)


async def test_an_oversized_request_fails_locally_and_an_oversized_answer_remotely() -> None:
    async def big(peer: PeerInfo, payload: bytes) -> bytes:
        return b"x" * 2000

    async with serving(node("node-b", B, unary={"big": big})) as address:
        async with node(max_frame_size=1024) as a:
            with pytest.raises(Exception, match="exceeds the 1024-byte frame size limit"):
                await a.call(address, "echo", b"y" * 2000)
        async with node() as a:
            b_small = node("node-c", B, unary={"big": big}, max_frame_size=1024)
            async with serving(b_small) as small:
                with pytest.raises(RemoteError, match="response_too_large"):
                    await a.call(small, "big", b"")
            assert await a.call(address, "big", b"") == b"x" * 2000


# --- operator CA -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = issue(tmp, "cluster-ca", None)
    ca = load_issuer(ca_cert, ca_key)
    files = {"ca": ca_cert, "ca-key": ca_key}
    for name in ("one", "two"):
        files[name], files[f"{name}-key"] = issue(tmp, name, ca)
    files["rogue"], files["rogue-key"] = issue(tmp, "rogue", None)  # self-signed
    return files


async def test_operator_ca_certificates_are_accepted_and_self_signed_ones_refused(
    ca_files: dict[str, Path], tmp_path: Path
) -> None:
    def load(name: str) -> TlsIdentity:
        return TlsIdentity.load(ca_files[name], ca_files[f"{name}-key"], ca_files["ca"])

    # The CA decides: the authenticator is not consulted in CA mode.
    def nobody(fingerprint: str) -> bool:
        return False

    one, two = load("one"), load("two")
    # The rogue trusts itself as well as the cluster's CA: with the cluster's CA
    # alone it would be refused at load (see below).
    bundle = tmp_path / "rogue-bundle.pem"
    bundle.write_bytes(ca_files["rogue"].read_bytes() + ca_files["ca"].read_bytes())
    rogue = TlsIdentity.load(ca_files["rogue"], ca_files["rogue-key"], bundle)
    async with serving(node("one", one, authenticate=nobody)) as address:
        async with node("two", two, authenticate=nobody) as client:
            assert await client.call(address, "echo", b"signed") == b"two:signed"
        async with node("rogue", rogue, authenticate=nobody) as client:
            with pytest.raises(PeerUnavailable, match="handshake"):
                await client.call(address, "echo", b"")
        async with node("a", A) as client:  # fingerprint mode cannot verify the CA chain
            with pytest.raises(PeerUnavailable):
                await client.call(address, "echo", b"")
    async with serving(node("rogue", rogue)) as address, node("two", two) as client:
        with pytest.raises(PeerUnavailable, match="does not verify against this node's CA"):
            await client.call(address, "echo", b"")


async def test_a_refused_tls_handshake_says_why_and_what_to_do(
    ca_files: dict[str, Path], tmp_path: Path, transport_log: pytest.LogCaptureFixture
) -> None:
    # A node whose certificate comes from another CA, trusting that CA only.
    other_cert, other_key = issue(tmp_path, "other-ca", None)
    stranger_files = issue(tmp_path, "stranger", load_issuer(other_cert, other_key))
    stranger = TlsIdentity.load(*stranger_files, other_cert)
    one = TlsIdentity.load(ca_files["one"], ca_files["one-key"], ca_files["ca"])
    advice = "give every node and client the same DOGMA_TLS_CA and a certificate it issued"

    async def refusals() -> list[str]:
        with anyio.fail_after(5):  # the server logs on its own
            while True:
                if "refused connection" in transport_log.text:
                    break
                await anyio.sleep(0.01)
        found = [r.getMessage() for r in transport_log.records if "refused" in r.getMessage()]
        transport_log.clear()
        return found

    async with serving(node("one", one)) as address:
        # The stranger refuses one's certificate; one only sees it hang up.
        async with node("stranger", stranger) as client:
            with pytest.raises(PeerUnavailable) as caller:
                await client.call(address, "echo", b"")
        assert "does not verify against this node's CA" in str(caller.value)
        assert advice in str(caller.value)
        [line] = await refusals()
        assert line.startswith("refused connection from 127.0.0.1:")
        assert "TLS handshake failed: the peer closed the connection (" in line
        assert (
            "probably does not trust this node's certificate (a peer without this node's CA" in line
        )
        assert advice in line
        # A node without a CA sends a self-signed certificate: one refuses it.
        async with node("a", A, authenticate=lambda fingerprint: True) as client:
            with pytest.raises(PeerUnavailable) as caller:
                await client.call(address, "echo", b"")
        assert "handshake failed: the peer closed the connection" in str(caller.value)
        assert "this node's self-signed certificate (a peer with a CA does not)" in str(
            caller.value
        )
        [line] = await refusals()
        assert (
            "TLS handshake failed: the peer's certificate does not verify against this "
            "node's CA (self-signed certificate): it was issued by another CA, or the peer "
            "has no CA"
        ) in line
        assert advice in line


async def test_pem_files_with_text_around_their_certificates_work(
    ca_files: dict[str, Path], tmp_path: Path
) -> None:
    # certifi's bundle names issuers in UTF-8 comments; openssl pkcs12 writes
    # "Bag Attributes" before each certificate. Both are valid PEM files.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        "# Issuer: CN=Főtanúsítvány\n".encode() + ca_files["ca"].read_bytes() + b"# end\n"
    )
    cert = {}
    for name in ("one", "two"):
        cert[name] = tmp_path / f"{name}-bag.pem"
        cert[name].write_bytes(
            b"Bag Attributes\n    friendlyName: " + name.encode() + b"\n"
            b"subject=CN = " + name.encode() + b"\n" + ca_files[name].read_bytes()
        )
    one = TlsIdentity.load(cert["one"], ca_files["one-key"], bundle)
    two = TlsIdentity.load(cert["two"], ca_files["two-key"], bundle)
    async with serving(node("one", one)) as address, node("two", two) as client:
        assert await client.call(address, "echo", b"ca") == b"two:ca"
    # Trusted by fingerprint, the client sends its own certificate in Hello.
    one = TlsIdentity.load(cert["one"], ca_files["one-key"])
    two = TlsIdentity.load(cert["two"], ca_files["two-key"])
    pinned = frozenset({one.fingerprint, two.fingerprint})
    async with (
        serving(node("one", one, authenticate=pinned.__contains__)) as address,
        node("two", two, authenticate=pinned.__contains__) as client,
    ):
        assert await client.call(address, "echo", b"pinned") == b"two:pinned"


# --- identities --------------------------------------------------------------------


def test_a_self_signed_identity_names_the_node_and_has_a_fingerprint() -> None:
    cert = x509.load_pem_x509_certificate(A.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-a"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:runkit:node:node-a"]
    der = cert.public_bytes(serialization.Encoding.DER)
    assert A.fingerprint == certificate_fingerprint(der)
    assert len(A.fingerprint) == 64
    assert A.fingerprint == A.fingerprint.lower()
    assert A.fingerprint != B.fingerprint
    assert "key_pem" not in repr(A)
    # Peers refuse an expired certificate: it must outlast any run of the node.
    assert cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > datetime.timedelta(
        days=3649
    )
    assert cert.not_valid_before_utc < datetime.datetime.now(datetime.UTC)


def test_loading_an_identity_reports_every_problem(
    tmp_path: Path, ca_files: dict[str, Path]
) -> None:
    loaded = TlsIdentity.load(ca_files["one"], ca_files["one-key"])
    assert loaded.ca_pem is None
    assert loaded.fingerprint == certificate_fingerprint(
        ssl.PEM_cert_to_DER_cert(ca_files["one"].read_text())
    )
    with pytest.raises(ConfigurationError) as missing:
        TlsIdentity.load(tmp_path / "nope.pem", tmp_path / "nope.key", tmp_path)
    assert f"TLS certificate file {tmp_path / 'nope.pem'} does not exist" in str(missing.value)
    assert "private key file" in str(missing.value)
    assert "is a directory" in str(missing.value)

    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(ConfigurationError, match="is not a PEM certificate") as bad:
        TlsIdentity.load(junk, junk)
    assert "is not a PEM private key" in str(bad.value)

    with pytest.raises(ConfigurationError, match="does not match the certificate"):
        TlsIdentity.load(ca_files["one"], ca_files["two-key"])


def test_a_certificate_the_ca_does_not_verify_is_refused_at_load(
    ca_files: dict[str, Path],
) -> None:
    # Else the node starts and every connection to or from it fails.
    with pytest.raises(ConfigurationError) as rogue:
        TlsIdentity.load(ca_files["rogue"], ca_files["rogue-key"], ca_files["ca"])
    assert (
        f"the certificate in {ca_files['rogue']} does not verify against {ca_files['ca']} "
        "(self-signed certificate): peers trusting that CA would refuse this node"
    ) in str(rogue.value)
    with pytest.raises(ConfigurationError, match="unable to get local issuer certificate"):
        TlsIdentity.load(ca_files["one"], ca_files["one-key"], ca_files["two"])  # not a CA
    with pytest.raises(ConfigurationError, match="does not verify against CA certificate"):
        TlsIdentity(
            cert_pem=ca_files["rogue"].read_bytes(),
            key_pem=ca_files["rogue-key"].read_bytes(),
            ca_pem=ca_files["ca"].read_bytes(),
        )


def test_a_certificate_for_one_side_of_tls_only_is_refused_at_load_saying_so(
    ca_files: dict[str, Path], tmp_path: Path
) -> None:
    # Issued by the right CA, but "serverAuth" only: peers would refuse it as a
    # client. "Use a certificate the CA issued" would send the operator astray.
    ca = load_issuer(ca_files["ca"], ca_files["ca-key"])
    cert, key = issue(tmp_path, "server-only", ca, usages=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(ConfigurationError) as info:
        TlsIdentity.load(cert, key, ca_files["ca"])
    message = str(info.value)
    assert "(unsuitable certificate purpose)" in message
    assert "its extended key usage must allow both serverAuth and clientAuth" in message
    assert "use a certificate the CA issued" not in message
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    TlsIdentity.load(*issue(tmp_path, "both", ca, usages=both), ca_files["ca"])


def _utc(moment: datetime.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


@pytest.mark.parametrize(
    ("valid_from", "valid_to", "state"),
    [
        (datetime.timedelta(days=-30), datetime.timedelta(minutes=-6), "has expired"),
        (datetime.timedelta(minutes=6), datetime.timedelta(days=30), "is not valid yet"),
    ],
    ids=["expired", "not-yet-valid"],
)
@pytest.mark.parametrize("with_ca", [False, True], ids=["fingerprints", "ca"])
def test_a_certificate_outside_its_validity_window_is_refused_at_load(
    tmp_path: Path,
    ca_files: dict[str, Path],
    valid_from: datetime.timedelta,
    valid_to: datetime.timedelta,
    state: str,
    with_ca: bool,
) -> None:
    # Trusted by fingerprint, nothing else would ever check the dates.
    issuer = load_issuer(ca_files["ca"], ca_files["ca-key"]) if with_ca else None
    cert, key = issue(tmp_path, "node-9", issuer, valid_from=valid_from, valid_to=valid_to)
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    with pytest.raises(ConfigurationError) as refused:
        TlsIdentity.load(cert, key, ca_files["ca"] if with_ca else None)
    [problem] = refused.value.problems
    assert problem.startswith(
        f"the certificate in {cert} (CN=node-9) {state}: valid from "
        f"{_utc(parsed.not_valid_before_utc)} to {_utc(parsed.not_valid_after_utc)} (now "
    )
    assert problem.endswith(" UTC); use a certificate valid now")


def test_the_validity_window_at_load_allows_for_clock_skew(tmp_path: Path) -> None:
    # Made by a clock a little ahead of ours, or expired a moment ago by ours.
    minute = datetime.timedelta(minutes=1)
    ahead = issue(tmp_path, "ahead", None, valid_from=minute, valid_to=2 * minute)
    behind = issue(tmp_path, "behind", None, valid_from=-2 * minute, valid_to=-minute)
    assert TlsIdentity.load(*ahead).subject == "CN=ahead"
    assert TlsIdentity.load(*behind).subject == "CN=behind"


# --- layering ----------------------------------------------------------------------


def test_the_transport_imports_nothing_from_the_engine() -> None:
    package = Path(__file__).resolve().parents[1] / "src" / "runkit" / "transport"
    allowed = ("runkit._errors", "runkit.persistence", "runkit.transport")
    found: list[str] = []
    for path in sorted(package.glob("*.py")):
        for stmt in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(stmt, ast.Import):
                names = [alias.name for alias in stmt.names]
            elif isinstance(stmt, ast.ImportFrom) and stmt.level == 0 and stmt.module:
                names = [stmt.module]
            found += [
                f"{path.name}: {n}"
                for n in names
                if n.split(".")[0] == "runkit" and not n.startswith(allowed)
            ]
    assert not found, found


@pytest.fixture
def recipe_pki(tmp_path: Path) -> Path:
    """docs/user-guide/running.md's openssl recipe ("Certificates from your own CA"), run."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    page = Path(__file__).resolve().parents[2] / "docs" / "user-guide" / "running.md"
    [recipe] = [
        block
        for block in re.findall(r"```sh\n(.*?)```", page.read_text(encoding="utf-8"), re.DOTALL)
        if "openssl req -x509" in block
    ]
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", recipe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return tmp_path


async def test_the_running_guides_openssl_recipe_makes_certificates_nodes_accept(
    recipe_pki: Path,
) -> None:
    def member(name: str) -> TlsIdentity:
        return TlsIdentity.load(
            recipe_pki / f"{name}.crt", recipe_pki / f"{name}.key", recipe_pki / "ca.crt"
        )

    async with serving(node("node-1", member("node-1"))) as address:
        async with node("node-2", member("node-2")) as client:
            assert await client.call(address, "echo", b"hi") == b"node-2:hi"
        async with node("ops", member("ops")) as client:
            assert await client.call(address, "echo", b"hi") == b"ops:hi"
