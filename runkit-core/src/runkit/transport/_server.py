"""The serving side: the handshake of an accepted connection and running its requests."""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSAttribute, TLSStream

from ._admission import Handshakes, Watched, remote_host
from ._client import read_frame
from ._errors import ProtocolError, RemoteError
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
from ._peer import Authenticate, PeerInfo, authenticated, format_address
from ._tls import (
    TlsIdentity,
    certificate_fingerprint,
    handshake_failure,
    peer_certificate_problem,
    verify_proof,
)

__all__ = [
    "DeferredHandler",
    "Reply",
    "ServerConfig",
    "StreamHandler",
    "UnaryHandler",
    "handle_connection",
]

_log = logging.getLogger("runkit.transport")
# Under the wire limits of Error.code and Error.message.
_MAX_CODE = 200
_MAX_TEXT = 4000

#: Answers one request: gets the caller and the request payload, returns the response.
UnaryHandler = Callable[[PeerInfo, bytes], Awaitable[bytes]]
#: Answers one stream request with items (an async generator, typically).
StreamHandler = Callable[[PeerInfo, bytes], AsyncIterator[bytes]]


class Reply:
    """The answer to one request served by a ``DeferredHandler``.

    The handler calls ``ok`` or ``fail`` exactly once, now or later, from the
    event loop's thread; later calls, and calls after the caller cancelled or
    the connection closed, do nothing. ``on_cancel``, if the handler sets it,
    runs once if the request ends unanswered (the caller cancelled, or the
    connection closed), so the handler can release what it holds.
    """

    __slots__ = ("_answered", "_method", "_request_id", "_runner", "on_cancel")

    def __init__(self, runner: _RequestRunner, request: Request) -> None:
        self._runner = runner
        self._request_id = request.id
        self._method = request.method
        self._answered = False
        self.on_cancel: Callable[[], object] | None = None

    @property
    def done(self) -> bool:
        """Whether the request is answered or cancelled (nothing more will be sent)."""
        return self._answered

    def ok(self, payload: bytes) -> None:
        """Answer with *payload* (the caller's ``call`` returns it)."""
        if self._finish():
            self._runner.answer(self._request_id, Response(id=self._request_id, payload=payload))

    def fail(self, exc: Exception) -> None:
        """Answer with an error: ``RemoteError``'s code and message, else ``handler_error``."""
        if self._finish():
            self._runner.answer(
                self._request_id, self._runner.error(self._request_id, self._method, exc)
            )

    def _finish(self) -> bool:
        if self._answered:
            return False
        self._answered = True
        self._runner.forget(self._request_id)
        return True

    def _cancel(self) -> None:
        if self._finish() and self.on_cancel is not None:
            self.on_cancel()


#: Answers one request without a task of its own: gets the caller, the request
#: payload and the ``Reply`` to answer through; must not block. What it raises
#: is the answer (as ``Reply.fail``), unless it has answered already.
DeferredHandler = Callable[[PeerInfo, bytes, Reply], None]


class _Refused(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail or reason
        super().__init__(reason)


class ServerConfig:
    """What the serving side needs, shared by all its connections.

    Also holds the handshakes in progress (``handshakes``), to bound them.
    """

    def __init__(
        self,
        *,
        node_id: str,
        identity: TlsIdentity,
        context: ssl.SSLContext,
        authenticate: Authenticate,
        unary: Mapping[str, UnaryHandler],
        streams: Mapping[str, StreamHandler],
        deferred: Mapping[str, DeferredHandler],
        max_frame_size: int,
        keepalive_interval: float,
        handshake_timeout: float,
        max_concurrent_requests: int,
        max_handshakes: int,
        reauthenticate_interval: float = math.inf,
    ) -> None:
        self.node_id = node_id
        self.identity = identity
        self.context = context
        self.authenticate = authenticate
        self.unary = unary
        self.streams = streams
        self.deferred = deferred
        self.max_frame_size = max_frame_size
        self.keepalive_interval = keepalive_interval
        self.handshake_timeout = handshake_timeout
        self.max_concurrent_requests = max_concurrent_requests
        self.reauthenticate_interval = reauthenticate_interval
        self.handshakes = Handshakes(max_handshakes, handshake_timeout)


async def handle_connection(config: ServerConfig, tcp: anyio.abc.SocketStream) -> None:
    """Serve one accepted TCP connection until it closes.

    Never raises (except cancellation): a failing connection must not take the
    listener, and every other connection, down with it.
    """
    remote = _remote_address(tcp)
    try:
        # Strangers get no more than this many connections' worth of our memory
        # (see _admission for who gets a slot).
        slot = config.handshakes.admit(remote_host(tcp))
        if isinstance(slot, str):
            _log.warning("refused connection from %s: %s", remote, slot)
            return
        try:
            accepted = None
            with slot.scope:
                accepted = await _handshake(config, Watched(tcp, slot), remote)
        finally:
            slot.release()
        if slot.scope.cancelled_caught:
            _log.warning("refused connection from %s: %s", remote, slot.why_dropped())
        if accepted is None:
            return
        link, peer = accepted
        reason = await _RequestRunner(config, link, peer).run()
        level = logging.WARNING if reason.startswith(("protocol", "internal")) else logging.INFO
        _log.log(level, "closed connection from %s (node %r): %s", remote, peer.node_id, reason)
    except Exception:
        _log.exception("connection from %s failed", remote)
    finally:
        await anyio.aclose_forcefully(tcp)


def _remote_address(tcp: anyio.abc.SocketStream) -> str:
    # A peer that reset the connection before we got here has no address
    # (``getpeername`` fails): a port scan or a health check must not raise.
    address = tcp.extra(SocketAttribute.remote_address, None)  # noqa: S610 - anyio, not Django
    if address is None:
        return "an unknown address (the connection was already reset)"
    if isinstance(address, str):  # a UNIX socket
        return address
    return format_address(str(address[0]), int(address[1]))


async def _handshake(
    config: ServerConfig, tcp: anyio.abc.ByteStream, remote: str
) -> tuple[Link, PeerInfo] | None:
    """TLS, then ``Hello``: return the link and peer, or ``None`` if refused (logged)."""
    try:
        stream = await TLSStream.wrap(
            tcp, server_side=True, ssl_context=config.context, standard_compatible=False
        )
    except (ssl.SSLError, OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
        _log.warning(
            "refused connection from %s: TLS handshake failed: %s",
            remote,
            handshake_failure(exc, ca=config.identity.ca_pem is not None),
        )
        return None
    # The peer is nobody until its Hello is verified: a small limit until then.
    decoder = FrameDecoder(min(HANDSHAKE_MAX_FRAME_SIZE, config.max_frame_size))
    node = "?"
    try:
        hello = _check_hello(await read_frame(stream, decoder))
        node = hello.node_id
        fingerprint = await _authenticate(config, stream, hello)
    except _Refused as refusal:
        _log.warning("refused connection from %s (node %r): %s", remote, node, refusal.detail)
        with anyio.move_on_after(1):
            await stream.send(encode_frame(Goodbye(reason=refusal.reason)))
        await anyio.aclose_forcefully(stream)
        return None
    except ProtocolError as exc:
        _log.warning("refused connection from %s: protocol error: %s", remote, exc.reason)
        await anyio.aclose_forcefully(stream)
        return None
    except (ssl.SSLError, OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
        _log.warning("refused connection from %s: lost during the handshake: %r", remote, exc)
        await anyio.aclose_forcefully(stream)
        return None
    await stream.send(encode_frame(HelloOk(node_id=config.node_id)))
    decoder.max_frame_size = config.max_frame_size
    peer = PeerInfo(node_id=hello.node_id, fingerprint=fingerprint, address=remote)
    link = Link(
        stream,
        label=f"client {remote}",
        max_frame_size=config.max_frame_size,
        keepalive_interval=config.keepalive_interval,
        decoder=decoder,
    )
    return link, peer


def _check_hello(frame: Frame) -> Hello:
    if not isinstance(frame, Hello):
        raise _Refused(f"expected Hello, got {type(frame).__name__}")
    if frame.version != PROTOCOL_VERSION:
        raise _Refused(
            f"unsupported protocol version {frame.version}; this node speaks {PROTOCOL_VERSION}"
        )
    return frame


async def _authenticate(config: ServerConfig, stream: TLSStream, hello: Hello) -> str:
    """Return the client's certificate fingerprint, or raise ``_Refused``."""
    if config.identity.ca_pem is not None:
        # CERT_REQUIRED with the operator's CA: the TLS layer verified the chain.
        der = stream.extra(TLSAttribute.peer_certificate_binary)  # noqa: S610
        if der is None:  # pragma: no cover - CERT_REQUIRED guarantees one
            raise _Refused("no client certificate")
        return certificate_fingerprint(der)
    if not hello.cert:
        raise _Refused("no client certificate")
    binding = stream.extra(TLSAttribute.channel_binding_tls_unique) or b""  # noqa: S610
    if not verify_proof(hello.cert, hello.proof, binding, config.identity.fingerprint):
        raise _Refused("invalid certificate proof")
    fingerprint = certificate_fingerprint(hello.cert)
    # Trusted by fingerprint, not by a chain: the dates are checked here.
    outside = peer_certificate_problem(hello.cert)
    if outside is not None:
        raise _Refused(outside, f"{outside} (fingerprint {fingerprint})")
    if not await authenticated(config.authenticate, fingerprint):
        raise _Refused("unknown certificate", f"unknown certificate {fingerprint}")
    return fingerprint


class _Active:
    """A request being served: its cancel scope and, for streams, its credit."""

    __slots__ = ("credit", "scope", "wake")

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.credit = 0
        self.wake: anyio.Event | None = None  # made only while a stream waits for credit

    def grant(self, n: int) -> None:
        self.credit += n
        if self.wake is not None:
            self.wake.set()

    async def take_credit(self) -> None:
        while self.credit == 0:
            self.wake = anyio.Event()
            await self.wake.wait()
        self.credit -= 1


class _RequestRunner:
    """Runs one connection's requests, with a bound on how many.

    A unary or stream request runs in a task of its own; a deferred one runs
    in the read loop's turn and is answered through its ``Reply``.
    """

    def __init__(self, config: ServerConfig, link: Link, peer: PeerInfo) -> None:
        self._config = config
        self._link = link
        self._peer = peer
        self._active: dict[int, _Active | Reply] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(self) -> str:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self._config.identity.ca_pem is None:
                    tg.start_soon(self._reauthenticate)
                reason = await self._link.run(self._dispatch)
                tg.cancel_scope.cancel()
        finally:
            self._tg = None
            for active in list(self._active.values()):
                if isinstance(active, Reply):
                    active._cancel()  # the connection is gone: nobody waits for it
        return reason

    async def _reauthenticate(self) -> None:
        """Close the connection once its peer's certificate is no longer accepted.

        Trusted by fingerprint, a peer is accepted as long as it is a live
        member: checked at the handshake only, a member that expired or was
        removed (or whoever holds its key) would be served for as long as it
        keeps the connection open. The engine's authenticator answers a live
        member from its membership view in memory, so this costs nothing much.
        """
        interval = self._config.reauthenticate_interval
        if not math.isfinite(interval):
            return
        while True:
            await anyio.sleep(interval)
            if not await authenticated(self._config.authenticate, self._peer.fingerprint):
                _log.warning(
                    "closing the connection from %s (node %r): certificate %s no longer "
                    "belongs to a live member",
                    self._peer.address,
                    self._peer.node_id,
                    self._peer.fingerprint,
                )
                # Stops reading at once: no request after this one is served.
                self._link.close("certificate no longer belongs to a live member")
                return

    def forget(self, request_id: int) -> None:
        """A deferred request is answered or cancelled."""
        self._active.pop(request_id, None)

    def answer(self, request_id: int, frame: Frame) -> None:
        """Send a deferred request's answer, without waiting if the queue has room."""
        try:
            if self._link.send_nowait(frame):
                return
        except ProtocolError as exc:  # over the frame size limit
            frame = Error(id=request_id, code="response_too_large", message=exc.reason)
            if self._link.send_nowait(frame):
                return
        if self._tg is not None and not self._link.closed:
            # Until it is queued the request is still in progress, as a unary
            # handler's is: a peer that does not read its answers gets no more
            # of them held here than the request bound (then "overloaded").
            active = self._active[request_id] = _Active()
            self._tg.start_soon(self._send_later, request_id, frame, active)

    async def _send_later(self, request_id: int, frame: Frame, active: _Active) -> None:
        try:
            # A closed link: the caller learns that from the connection.
            with active.scope, contextlib.suppress(LinkClosed):
                await self._link.send(frame)
        finally:
            self._active.pop(request_id, None)

    def _reply_now(self, frame: Frame) -> None:
        if not self._link.send_nowait(frame):
            raise ProtocolError("the peer sends requests faster than it reads answers")

    def _dispatch(self, frame: Frame) -> None:
        if isinstance(frame, Credit):
            if isinstance(active := self._active.get(frame.id), _Active):
                active.grant(frame.n)
        elif isinstance(frame, Cancel):
            if (active := self._active.get(frame.id)) is not None:
                if isinstance(active, Reply):
                    active._cancel()
                else:
                    active.scope.cancel()
        elif isinstance(frame, Request):
            self._start(frame)
        else:
            raise ProtocolError(f"unexpected {type(frame).__name__} frame from a client")

    def _start(self, request: Request) -> None:
        if request.id in self._active:
            raise ProtocolError(f"request ID {request.id} is already in use")
        if len(self._active) >= self._config.max_concurrent_requests:
            self._reply_now(
                Error(
                    id=request.id,
                    code="overloaded",
                    message=f"more than {self._config.max_concurrent_requests} "
                    "concurrent requests on one connection",
                )
            )
            return
        if not request.stream and (deferred := self._config.deferred.get(request.method)):
            self._start_deferred(request, deferred)
            return
        handlers: Mapping[str, object] = (
            self._config.streams if request.stream else self._config.unary
        )
        if request.method not in handlers:
            kind = "stream" if request.stream else "unary"
            self._reply_now(
                Error(
                    id=request.id,
                    code="unknown_method",
                    message=f"node {self._config.node_id!r} has no {kind} method "
                    f"{request.method!r}",
                )
            )
            return
        active = self._active[request.id] = _Active()
        assert self._tg is not None
        if request.stream:
            self._tg.start_soon(self._serve_stream, request, active)
        else:
            self._tg.start_soon(self._serve_unary, request, active)

    def _start_deferred(self, request: Request, handler: DeferredHandler) -> None:
        reply = self._active[request.id] = Reply(self, request)
        try:
            handler(self._peer, request.payload, reply)
        except Exception as exc:
            reply.fail(exc)

    async def _serve_unary(self, request: Request, active: _Active) -> None:
        handler = self._config.unary[request.method]
        try:
            with active.scope:
                try:
                    reply: Frame = Response(
                        id=request.id, payload=await handler(self._peer, request.payload)
                    )
                except Exception as exc:
                    reply = self.error(request.id, request.method, exc)
                await self._reply(request, reply)
        except LinkClosed:
            pass  # the connection is going away; its caller learns that from it
        finally:
            self._active.pop(request.id, None)

    async def _serve_stream(self, request: Request, active: _Active) -> None:
        handler = self._config.streams[request.method]
        try:
            with active.scope:
                items = handler(self._peer, request.payload)
                try:
                    async for item in items:
                        # Without credit the handler waits here: no unbounded buffering.
                        await active.take_credit()
                        await self._link.send(StreamItem(id=request.id, payload=item))
                    reply: Frame = StreamEnd(id=request.id)
                except ProtocolError as exc:  # an item over the frame size limit
                    reply = Error(id=request.id, code="response_too_large", message=exc.reason)
                except LinkClosed:
                    raise
                except Exception as exc:
                    reply = self.error(request.id, request.method, exc)
                finally:
                    await self._close_items(request, items)
                await self._reply(request, reply)
        except LinkClosed:
            pass
        finally:
            self._active.pop(request.id, None)

    async def _close_items(self, request: Request, items: AsyncIterator[bytes]) -> None:
        """Close a stream handler's generator (runs its ``finally`` blocks)."""
        aclose = getattr(items, "aclose", None)
        if aclose is None:
            return
        try:
            await aclose()
        except Exception:
            _log.exception("closing stream handler %r failed", request.method)

    def error(self, request_id: int, method: str, exc: Exception) -> Error:
        """The answer for a handler's exception (logged unless it is a ``RemoteError``)."""
        if isinstance(exc, RemoteError):
            return Error(id=request_id, code=exc.code[:_MAX_CODE], message=exc.message[:_MAX_TEXT])
        _log.error(
            "handler %r failed for node %r (%s)",
            method,
            self._peer.node_id,
            self._peer.address,
            exc_info=exc,
        )
        message = str(exc) or type(exc).__name__
        return Error(id=request_id, code="handler_error", message=message[:_MAX_TEXT])

    async def _reply(self, request: Request, frame: Frame) -> None:
        try:
            # Inline: the caller waits on it (a stream's items have all been sent).
            await self._link.send(frame, inline=True)
        except ProtocolError as exc:
            await self._link.send(
                Error(id=request.id, code="response_too_large", message=exc.reason)
            )
