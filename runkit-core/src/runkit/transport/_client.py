"""The calling side: opening a connection to a peer and multiplexing calls over it."""

from __future__ import annotations

import contextlib
import itertools
import logging
import ssl
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.tls import TLSAttribute, TLSStream

from ._errors import CallTimeout, PeerUnavailable, ProtocolError, RemoteError, TransportError
from ._frames import (
    HANDSHAKE_MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    Cancel,
    Credit,
    Error,
    Frame,
    FrameDecoder,
    Goodbye,
    Hello,
    HelloOk,
    Request,
    Response,
    StreamEnd,
    StreamItem,
    encode_frame,
)
from ._link import Link, LinkClosed
from ._peer import Authenticate, PeerInfo, authenticated, parse_address
from ._tls import (
    TlsIdentity,
    certificate_fingerprint,
    handshake_failure,
    handshake_untrusted,
    peer_certificate_problem,
    sign_proof,
)

__all__ = ["PeerConnection", "open_connection", "read_frame"]

_log = logging.getLogger("runkit.transport")
_STREAM_ERRORS = (anyio.BrokenResourceError, anyio.EndOfStream, ssl.SSLError, OSError)


async def read_frame(stream: anyio.abc.ByteStream, decoder: FrameDecoder) -> Frame:
    """Read until *decoder* yields one frame; used only during the handshake.

    Neither side may send anything else until the handshake is answered, so
    more than one frame here is a protocol error.
    """
    while True:
        frames = decoder.feed(await stream.receive())
        if frames:
            if len(frames) > 1:
                raise ProtocolError("frames sent before the handshake completed")
            return frames[0]


async def open_connection(
    address: str,
    *,
    node_id: str,
    identity: TlsIdentity,
    context: ssl.SSLContext,
    authenticate: Authenticate,
    max_frame_size: int,
    keepalive_interval: float,
) -> PeerConnection:
    """Connect to *address*, check its certificate, and do the ``Hello`` handshake.

    The caller bounds the time this takes.

    :raises PeerUnavailable: if the peer cannot be reached, its certificate is
        not accepted, or it refuses us (the reason says which).
    """
    host, port = parse_address(address)
    try:
        stream = await anyio.connect_tcp(
            host, port, ssl_context=context, tls_standard_compatible=False
        )
    except ssl.SSLError as exc:
        detail = handshake_failure(exc, ca=identity.ca_pem is not None)
        raise PeerUnavailable(
            address, f"cannot connect: {detail}", untrusted=handshake_untrusted(exc)
        ) from None
    except _STREAM_ERRORS as exc:
        raise PeerUnavailable(address, f"cannot connect: {_connect_failure(exc)}") from None
    try:
        fingerprint, hello = await _client_hello(stream, address, node_id, identity, authenticate)
        decoder = FrameDecoder(min(HANDSHAKE_MAX_FRAME_SIZE, max_frame_size))
        await stream.send(encode_frame(hello, max_frame_size))
        answer = await read_frame(stream, decoder)
        decoder.max_frame_size = max_frame_size
    except PeerUnavailable:
        await anyio.aclose_forcefully(stream)
        raise
    except ProtocolError as exc:
        await anyio.aclose_forcefully(stream)
        raise PeerUnavailable(address, f"protocol error in the handshake: {exc.reason}") from None
    except _STREAM_ERRORS as exc:
        await anyio.aclose_forcefully(stream)
        detail = handshake_failure(exc, ca=identity.ca_pem is not None)
        raise PeerUnavailable(
            address, f"handshake failed: {detail}", untrusted=handshake_untrusted(exc)
        ) from None
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise
    if not isinstance(answer, HelloOk):
        await anyio.aclose_forcefully(stream)
        if isinstance(answer, Goodbye):
            raise PeerUnavailable(address, f"refused by the peer: {answer.reason}")
        raise PeerUnavailable(address, f"unexpected {type(answer).__name__} frame in handshake")
    peer = PeerInfo(node_id=answer.node_id, fingerprint=fingerprint, address=address)
    link = Link(
        stream,
        label=f"peer {address}",
        max_frame_size=max_frame_size,
        keepalive_interval=keepalive_interval,
        decoder=decoder,
    )
    return PeerConnection(link, peer)


def _connect_failure(exc: BaseException) -> str:
    """Say why connecting (TCP, then TLS) failed with *exc*, not an ``ssl.SSLError``."""
    if isinstance(exc, anyio.EndOfStream | anyio.BrokenResourceError):
        # Neither has text of its own (the operator saw "cannot connect: "): the
        # peer hung up before TLS was done, which a busy or refusing node does.
        return (
            "the peer closed the connection during the handshake (overloaded, "
            "or it does not accept this node's certificate)"
        )
    return str(exc) or repr(exc)


async def _client_hello(
    stream: TLSStream,
    address: str,
    node_id: str,
    identity: TlsIdentity,
    authenticate: Authenticate,
) -> tuple[str, Hello]:
    """Check the server's certificate; return its fingerprint and our ``Hello``."""
    der = stream.extra(TLSAttribute.peer_certificate_binary)  # noqa: S610 - anyio, not Django
    if der is None:  # pragma: no cover - TLS 1.3 servers always send one
        raise PeerUnavailable(address, "the peer presented no certificate")
    fingerprint = certificate_fingerprint(der)
    if identity.ca_pem is not None:
        # The TLS layer verified the server's chain against the operator's CA.
        return fingerprint, Hello(version=PROTOCOL_VERSION, node_id=node_id)
    # Trusted by fingerprint, not by a chain: the dates are checked here.
    outside = peer_certificate_problem(der)
    if outside is not None:
        with anyio.move_on_after(1):
            await stream.send(encode_frame(Goodbye(reason=outside)))
        _log.warning("refused peer %s: %s (fingerprint %s)", address, outside, fingerprint)
        raise PeerUnavailable(address, outside)
    if not await authenticated(authenticate, fingerprint):
        with anyio.move_on_after(1):
            await stream.send(encode_frame(Goodbye(reason="unknown certificate")))
        _log.warning("refused peer %s: unknown certificate %s", address, fingerprint)
        raise PeerUnavailable(
            address, f"unknown certificate {fingerprint} (not a live node of this store)"
        )
    binding = stream.extra(TLSAttribute.channel_binding_tls_unique)  # noqa: S610
    proof = sign_proof(identity, binding or b"", fingerprint)
    hello = Hello(version=PROTOCOL_VERSION, node_id=node_id, cert=identity.cert_der, proof=proof)
    return fingerprint, hello


class _Unary:
    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.outcome: bytes | TransportError | None = None

    def settle(self, outcome: bytes | TransportError) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.done.set()


class _Stream:
    __slots__ = ("failure", "rx", "tx")

    def __init__(self, window: int) -> None:
        # The server may have at most `window` items in flight, so this never overflows.
        self.tx, self.rx = anyio.create_memory_object_stream[bytes](window)
        self.failure: TransportError | None = None

    def settle(self, failure: TransportError | None) -> None:
        if self.failure is None:
            self.failure = failure
        self.tx.close()


class PeerConnection:
    """One multiplexed connection to a peer, shared by concurrent calls.

    Requests carry IDs; the link's reader hands each answer to its waiting
    caller. A caller that gives up sends ``Cancel`` and forgets the ID, so a
    late answer is dropped without disturbing anyone else.
    """

    def __init__(self, link: Link, peer: PeerInfo) -> None:
        self.link = link
        self.peer = peer
        self._ids = itertools.count(1)
        self._pending: dict[int, _Unary | _Stream] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def closed(self) -> bool:
        return self.link.closed

    async def run(self) -> str:
        """Serve the connection until it closes; fail whatever is in flight."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                reason = await self.link.run(self._dispatch)
                tg.cancel_scope.cancel()
            return reason
        finally:
            self._tg = None
            failure = PeerUnavailable(self.peer.address, self.link.reason or "connection closed")
            for waiter in self._pending.values():
                waiter.settle(failure)
            self._pending.clear()

    def _dispatch(self, frame: Frame) -> None:
        if not isinstance(frame, Response | Error | StreamItem | StreamEnd):
            raise ProtocolError(f"unexpected {type(frame).__name__} frame from a server")
        waiter = self._pending.get(frame.id)
        if waiter is None:
            return  # the caller gave up; drop the late answer
        if isinstance(frame, Error):
            del self._pending[frame.id]
            waiter.settle(RemoteError(frame.code, frame.message))
        elif isinstance(waiter, _Unary):
            if not isinstance(frame, Response):
                raise ProtocolError(f"{type(frame).__name__} for unary request {frame.id}")
            del self._pending[frame.id]
            waiter.settle(frame.payload)
        elif isinstance(frame, StreamItem):
            try:
                waiter.tx.send_nowait(frame.payload)
            except anyio.WouldBlock:
                raise ProtocolError(f"stream {frame.id} sent more items than credited") from None
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass  # the consumer left; its Cancel is on the way
        elif isinstance(frame, StreamEnd):
            del self._pending[frame.id]
            waiter.settle(None)
        else:
            raise ProtocolError(f"{type(frame).__name__} for stream request {frame.id}")

    def forget(self, request_id: int) -> None:
        """Drop *request_id* if still pending, telling the server to stop working on it."""
        if self._pending.pop(request_id, None) is None or self.link.closed:
            return  # closing the link ends the request on the server too
        if self.link.send_nowait(Cancel(id=request_id)):
            return
        # The queue is full. A lost Cancel would leave the request holding a slot
        # on the server (a stream, for good), so send it once there is room.
        if self._tg is not None:
            self._tg.start_soon(self._send_cancel, request_id)
        else:  # pragma: no cover - the queue filled before the link's first turn
            self.link.close("a Cancel could not be queued")

    async def _send_cancel(self, request_id: int) -> None:
        with contextlib.suppress(LinkClosed):  # the server drops the request with the link
            await self.link.send(Cancel(id=request_id))

    async def _send(self, frame: Frame, *, inline: bool = False) -> None:
        try:
            await self.link.send(frame, inline=inline)
        except LinkClosed as exc:
            raise PeerUnavailable(self.peer.address, exc.reason) from None

    async def unary(self, method: str, payload: bytes) -> bytes:
        """Call *method* and wait for its answer (the caller bounds the wait)."""
        request_id = next(self._ids)
        waiter = _Unary()
        self._pending[request_id] = waiter
        try:
            await self._send(Request(id=request_id, method=method, payload=payload), inline=True)
            await waiter.done.wait()
        finally:
            self.forget(request_id)
        outcome = waiter.outcome
        if isinstance(outcome, TransportError):
            raise outcome
        assert outcome is not None
        return outcome

    async def open_stream(
        self, method: str, payload: bytes, *, window: int, timeout: float
    ) -> StreamReader:
        """Start a stream call with *window* items of credit."""
        request_id = next(self._ids)
        waiter = _Stream(window)
        self._pending[request_id] = waiter
        try:
            await self._send(Request(id=request_id, method=method, payload=payload, stream=True))
            await self._send(Credit(id=request_id, n=window))
        except BaseException:
            self.forget(request_id)
            waiter.tx.close()
            waiter.rx.close()
            raise
        return StreamReader(
            self,
            request_id=request_id,
            waiter=waiter,
            method=method,
            window=window,
            timeout=timeout,
        )


class StreamReader:
    """The caller's side of one stream: yields items and grants credit as it consumes.

    Each wait for the next item is bounded by the call's timeout.
    """

    def __init__(
        self,
        connection: PeerConnection,
        *,
        request_id: int,
        waiter: _Stream,
        method: str,
        window: int,
        timeout: float,
    ) -> None:
        self._connection = connection
        self._id = request_id
        self._waiter = waiter
        self._method = method
        self._timeout = timeout
        # Grant credit in batches of half the window, not one frame per item.
        self._grant_at = max(1, window // 2)
        self._consumed = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        item: bytes | None = None
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
            try:
                # Items already here need no timer: another 2-3x the items/s of a stream.
                item = self._waiter.rx.receive_nowait()
            except anyio.WouldBlock:
                with anyio.move_on_after(self._timeout):
                    item = await self._waiter.rx.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            if self._waiter.failure is not None:
                raise self._waiter.failure from None
            raise StopAsyncIteration from None
        if item is None:
            raise CallTimeout(self._connection.peer.address, self._method, self._timeout)
        self._consumed += 1
        if self._consumed >= self._grant_at:
            credit, self._consumed = self._consumed, 0
            # If the link closed, the failure surfaces on the next read.
            with contextlib.suppress(LinkClosed):
                await self._connection.link.send(Credit(id=self._id, n=credit))
        return item

    def close(self) -> None:
        """Stop the stream: tell the server (if it has not finished) and drop what is queued."""
        self._connection.forget(self._id)
        self._waiter.tx.close()
        self._waiter.rx.close()
