"""The serving side: the handshake of an accepted connection and running its requests."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSAttribute, TLSStream

from ._client import read_frame
from ._errors import ProtocolError, RemoteError
from ._frames import (
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
from ._tls import TlsIdentity, certificate_fingerprint, verify_proof

__all__ = ["ServerConfig", "StreamHandler", "UnaryHandler", "handle_connection"]

_log = logging.getLogger("runkit.transport")
# Under the wire limits of Error.code and Error.message.
_MAX_CODE = 200
_MAX_TEXT = 4000

#: Answers one request: gets the caller and the request payload, returns the response.
UnaryHandler = Callable[[PeerInfo, bytes], Awaitable[bytes]]
#: Answers one stream request with items (an async generator, typically).
StreamHandler = Callable[[PeerInfo, bytes], AsyncIterator[bytes]]


class _Refused(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail or reason
        super().__init__(reason)


class ServerConfig:
    """What the serving side needs, shared by all its connections."""

    def __init__(
        self,
        *,
        node_id: str,
        identity: TlsIdentity,
        context: ssl.SSLContext,
        authenticate: Authenticate,
        unary: Mapping[str, UnaryHandler],
        streams: Mapping[str, StreamHandler],
        max_frame_size: int,
        keepalive_interval: float,
        handshake_timeout: float,
        max_concurrent_requests: int,
    ) -> None:
        self.node_id = node_id
        self.identity = identity
        self.context = context
        self.authenticate = authenticate
        self.unary = unary
        self.streams = streams
        self.max_frame_size = max_frame_size
        self.keepalive_interval = keepalive_interval
        self.handshake_timeout = handshake_timeout
        self.max_concurrent_requests = max_concurrent_requests


async def handle_connection(config: ServerConfig, tcp: anyio.abc.SocketStream) -> None:
    """Serve one accepted TCP connection until it closes.

    Never raises (except cancellation): a failing connection must not take the
    listener, and every other connection, down with it.
    """
    remote = _remote_address(tcp)
    try:
        accepted = None
        with anyio.move_on_after(config.handshake_timeout) as scope:
            accepted = await _handshake(config, tcp, remote)
        if scope.cancelled_caught:
            _log.warning(
                "refused connection from %s: no handshake within %g s",
                remote,
                config.handshake_timeout,
            )
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
    address = tcp.extra(SocketAttribute.remote_address)  # noqa: S610 - anyio, not Django
    if isinstance(address, str):  # a UNIX socket
        return address
    return format_address(str(address[0]), int(address[1]))


async def _handshake(
    config: ServerConfig, tcp: anyio.abc.SocketStream, remote: str
) -> tuple[Link, PeerInfo] | None:
    """TLS, then ``Hello``: return the link and peer, or ``None`` if refused (logged)."""
    try:
        stream = await TLSStream.wrap(
            tcp, server_side=True, ssl_context=config.context, standard_compatible=False
        )
    except (ssl.SSLError, OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
        _log.warning("refused connection from %s: TLS handshake failed: %s", remote, exc)
        return None
    decoder = FrameDecoder(config.max_frame_size)
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
    if not await authenticated(config.authenticate, fingerprint):
        raise _Refused("unknown certificate", f"unknown certificate {fingerprint}")
    return fingerprint


class _Active:
    """A request being served: its cancel scope and, for streams, its credit."""

    __slots__ = ("credit", "scope", "wake")

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.credit = 0
        self.wake = anyio.Event()

    def grant(self, n: int) -> None:
        self.credit += n
        self.wake.set()

    async def take_credit(self) -> None:
        while self.credit == 0:
            self.wake = anyio.Event()
            await self.wake.wait()
        self.credit -= 1


class _RequestRunner:
    """Runs one connection's requests, each in its own task, with a bound on how many."""

    def __init__(self, config: ServerConfig, link: Link, peer: PeerInfo) -> None:
        self._config = config
        self._link = link
        self._peer = peer
        self._active: dict[int, _Active] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(self) -> str:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            reason = await self._link.run(self._dispatch)
            tg.cancel_scope.cancel()
        return reason

    def _reply_now(self, frame: Frame) -> None:
        if not self._link.send_nowait(frame):
            raise ProtocolError("the peer sends requests faster than it reads answers")

    def _dispatch(self, frame: Frame) -> None:
        if isinstance(frame, Credit):
            if (active := self._active.get(frame.id)) is not None:
                active.grant(frame.n)
        elif isinstance(frame, Cancel):
            if (active := self._active.get(frame.id)) is not None:
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

    async def _serve_unary(self, request: Request, active: _Active) -> None:
        handler = self._config.unary[request.method]
        try:
            with active.scope:
                try:
                    reply: Frame = Response(
                        id=request.id, payload=await handler(self._peer, request.payload)
                    )
                except Exception as exc:
                    reply = self._error(request, exc)
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
                    reply = self._error(request, exc)
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

    def _error(self, request: Request, exc: Exception) -> Error:
        if isinstance(exc, RemoteError):
            return Error(id=request.id, code=exc.code[:_MAX_CODE], message=exc.message[:_MAX_TEXT])
        _log.exception(
            "handler %r failed for node %r (%s)",
            request.method,
            self._peer.node_id,
            self._peer.address,
        )
        message = str(exc) or type(exc).__name__
        return Error(id=request.id, code="handler_error", message=message[:_MAX_TEXT])

    async def _reply(self, request: Request, frame: Frame) -> None:
        try:
            await self._link.send(frame)
        except ProtocolError as exc:
            await self._link.send(
                Error(id=request.id, code="response_too_large", message=exc.reason)
            )
