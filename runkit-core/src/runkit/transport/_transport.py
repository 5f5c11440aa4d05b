"""``NodeTransport``: the node-to-node RPC endpoint (serving and calling)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from functools import partial
from types import TracebackType
from typing import Self, cast

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from ._client import PeerConnection, open_connection
from ._errors import CallTimeout, PeerUnavailable, TransportError
from ._frames import DEFAULT_MAX_FRAME_SIZE, check_call, check_node_id
from ._listener import accept_forever
from ._peer import Authenticate, format_address, parse_address
from ._server import (
    DeferredHandler,
    ServerConfig,
    StreamHandler,
    UnaryHandler,
    handle_connection,
)
from ._tls import TlsIdentity, client_context, server_context

__all__ = ["NodeTransport"]

_log = logging.getLogger("runkit.transport")


class NodeTransport:
    """Calls to and from other nodes over mutual TLS.

    One instance per node: it serves the node's handlers on its listen address
    (:meth:`serve`) and calls peers by their advertised address (:meth:`call`,
    :meth:`stream`). Calls to one address share one lazily opened connection,
    reopened on the next call after it breaks. The transport opens it, not the
    call: a call that times out while connecting leaves it to a later call.

    Use it as an async context manager; leaving it closes every connection it
    opened::

        async with NodeTransport(node_id=..., identity=..., authenticate=...) as transport:
            tg.start_soon(transport.serve, "0.0.0.0:7400")
            answer = await transport.call("10.0.0.6:7400", "offer_command", payload)

    :param node_id: this node's ID, announced in every handshake.
    :param identity: this node's certificate and key (and the operator's CA).
    :param authenticate: given a peer certificate's fingerprint, whether to
        accept it (a live node of the same store). Called for every connection
        in both directions, unless *identity* has a CA, whose chain check then
        decides. May be sync or async.
    :param unary: handlers of unary methods, by name.
    :param streams: handlers of stream methods, by name.
    :param deferred: handlers of unary methods that answer through a ``Reply``
        without a task per request (for methods whose answer waits on work
        the node does anyway), by name.
    :param max_frame_size: largest frame body accepted or sent, in bytes.
    :param keepalive_interval: seconds of silence before a ``Ping``; a
        connection silent for twice this long is closed.
    :param call_timeout: default timeout of a call, in seconds; also bounds
        connecting to a peer and opening a stream, whatever their timeout.
    :param handshake_timeout: how long an accepted connection may take to
        complete TLS and ``Hello``.
    :param max_concurrent_requests: requests served at once per connection;
        more are answered with ``RemoteError("overloaded")``.
    :param max_handshakes: accepted connections that may be in their handshake
        at once (each may hold a partial ``Hello`` of up to 64 KiB), at most 8
        of them from one host. At a bound, the oldest connection that has sent
        nothing is dropped for the newcomer; if none has, the newcomer is
        closed at once, with a warning. A connection that sends nothing for
        2 s is dropped whatever the bound.
    :param reauthenticate_interval: without a CA, how often (seconds) the peer
        of each accepted connection is checked with *authenticate* again; a
        connection whose peer is no longer accepted (an expired member) is
        closed.
    :raises ValueError: if *node_id* is over 256 characters.
    """

    def __init__(
        self,
        *,
        node_id: str,
        identity: TlsIdentity,
        authenticate: Authenticate,
        unary: Mapping[str, UnaryHandler] | None = None,
        streams: Mapping[str, StreamHandler] | None = None,
        deferred: Mapping[str, DeferredHandler] | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        keepalive_interval: float = 10.0,
        call_timeout: float = 5.0,
        handshake_timeout: float = 10.0,
        max_concurrent_requests: int = 256,
        max_handshakes: int = 64,
        reauthenticate_interval: float = 5.0,
    ) -> None:
        check_node_id(node_id)  # peers would refuse its Hello as malformed
        self.node_id = node_id
        self.identity = identity
        self._authenticate = authenticate
        self._max_frame_size = max_frame_size
        self._keepalive_interval = keepalive_interval
        self._call_timeout = call_timeout
        self._client_context = client_context(identity)
        both = set(unary or {}) & set(deferred or {})
        if both:
            raise ValueError(f"methods {sorted(both)} are given as both unary and deferred")
        self._server = ServerConfig(
            node_id=node_id,
            identity=identity,
            context=server_context(identity),
            authenticate=authenticate,
            unary=dict(unary or {}),
            streams=dict(streams or {}),
            deferred=dict(deferred or {}),
            max_frame_size=max_frame_size,
            keepalive_interval=keepalive_interval,
            handshake_timeout=handshake_timeout,
            max_concurrent_requests=max_concurrent_requests,
            max_handshakes=max_handshakes,
            reauthenticate_interval=reauthenticate_interval,
        )
        self._peers: dict[str, PeerConnection] = {}
        self._connecting: dict[str, _Attempt] = {}
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._closed = False  # left: calls made since fail as with a peer gone

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            self._exit_stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._closed = True
        self._close_peers()
        stack, self._exit_stack, self._tg = self._exit_stack, None, None
        if stack is not None:
            # The body's exception is not passed in, so it propagates as itself,
            # not wrapped in an ExceptionGroup; the closing links end on their own.
            await stack.__aexit__(None, None, None)
        return None

    async def aclose(self) -> None:
        """Close every connection this node opened (same as leaving the ``async with``)."""
        await self.__aexit__(None, None, None)

    def _close_peers(self) -> None:
        for connection in self._peers.values():
            # Logged here and, in the goodbye, by the peer: "shutting down" reads
            # right on both sides ("the node is" read as the peer on this one).
            connection.link.close("shutting down")
        self._peers.clear()
        for attempt in self._connecting.values():
            attempt.scope.cancel()  # its waiters get PeerUnavailable("shutting down")

    async def serve(
        self,
        listen_address: str,
        *,
        task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept peers on *listen_address* (``host:port``) until cancelled.

        Reports the bound ``host:port`` (the real port when asked for port 0)
        through *task_status*.

        :raises TransportError: if the address cannot be bound (in use, not local).
        :raises ValueError: if *listen_address* is not ``host:port``.
        """
        host, port = parse_address(listen_address)
        try:
            listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as exc:
            raise TransportError(
                f"cannot listen on {listen_address}: {exc.strerror or exc}"
            ) from exc
        async with listener:
            bound_port = listener.extra(SocketAttribute.local_port)  # noqa: S610
            bound = format_address(host, bound_port)
            _log.info("node %r listening on %s", self.node_id, bound)
            task_status.started(bound)
            async with anyio.create_task_group() as tg:
                for one in listener.listeners:  # one per address family
                    # create_tcp_listener makes socket listeners, with accept().
                    accepting = cast(anyio.abc.SocketListener, one)
                    tg.start_soon(partial(accept_forever, accepting, self._accept, label=bound))

    async def _accept(self, tcp: anyio.abc.SocketStream) -> None:
        # handle_connection raises nothing but cancellation; if it ever did,
        # one connection's fault would end the listener and the node with it.
        try:
            await handle_connection(self._server, tcp)
        except Exception:
            _log.exception("a connection to node %r failed", self.node_id)

    async def call(
        self,
        address: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        expect_fingerprint: str | None = None,
    ) -> bytes:
        """Call *method* on the node at *address* and return its answer.

        :param timeout: seconds for the whole call, connecting included
            (default: the transport's ``call_timeout``, which also bounds
            connecting). A call that runs out of time while connecting
            leaves the connection to be made for the next call.
        :param expect_fingerprint: refuse the peer unless its certificate has
            this fingerprint (the one the target node published).
        :raises CallTimeout: no answer in time (the peer is told to cancel).
        :raises PeerUnavailable: cannot connect, refused, or the connection broke.
        :raises RemoteError: the peer's handler failed, or has no such method.
        :raises ProtocolError: *payload* is over the frame size limit.
        :raises ValueError: *method* is over 256 characters (checked before
            sending: the peer would close the shared connection over it).
        """
        check_call(method)
        limit = self._call_timeout if timeout is None else timeout
        with anyio.move_on_after(limit):
            connection = await self._connection(address, expect_fingerprint)
            return await connection.unary(method, payload)
        raise CallTimeout(address, method, limit)

    @contextlib.asynccontextmanager
    async def stream(
        self,
        address: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        window: int = 64,
        expect_fingerprint: str | None = None,
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open a stream call; iterate over what it yields inside the ``async with``.

        The peer sends at most *window* items ahead of what has been consumed.
        Leaving the block early cancels the stream on the peer. *timeout*
        bounds each wait for an item (``math.inf`` for none); opening the
        stream takes at most the smaller of *timeout* and ``call_timeout``.
        Errors are those of :meth:`call`, raised on open or while iterating;
        a *window* outside 1..2**31-1 is a ``ValueError``.
        """
        check_call(method, window)
        limit = self._call_timeout if timeout is None else timeout
        # A long wait between items must not mean a long wait for a dead peer.
        open_limit = min(limit, self._call_timeout)
        reader = None
        with anyio.move_on_after(open_limit):
            connection = await self._connection(address, expect_fingerprint)
            reader = await connection.open_stream(method, payload, window=window, timeout=limit)
        if reader is None:
            raise CallTimeout(address, method, open_limit)
        try:
            yield reader
        finally:
            reader.close()

    async def _connection(self, address: str, expect_fingerprint: str | None) -> PeerConnection:
        connection = self._peers.get(address)
        if connection is None or connection.closed:
            attempt = self._connecting.get(address)
            if attempt is None:
                tg = self._tg
                if tg is None and self._closed:
                    # A caller still at work as the node or client stops.
                    raise PeerUnavailable(address, "this node's transport is closed")
                if tg is None:
                    raise RuntimeError("use the NodeTransport in `async with` before calling peers")
                # The attempt runs in the transport's task group, not in this
                # caller's cancel scope: a caller whose timeout is shorter than
                # the handshake gives up waiting, not connecting, so a later
                # call finds the connection made.
                attempt = self._connecting[address] = _Attempt()
                tg.start_soon(self._connect, address, attempt)
            connection = await attempt.outcome()
        if expect_fingerprint is not None and connection.peer.fingerprint != expect_fingerprint:
            reason = (
                f"the node there presents certificate {connection.peer.fingerprint}, "
                f"not the expected {expect_fingerprint}"
            )
            # Most likely a stale connection to a node since replaced at this
            # address: drop it, so the next call reconnects.
            connection.link.close(reason)
            raise PeerUnavailable(address, reason)
        return connection

    async def _connect(self, address: str, attempt: _Attempt) -> None:
        """Open the connection to *address* for everyone waiting on *attempt*, then run it."""
        # What the waiters get if the attempt is cancelled: only leaving the
        # transport does that.
        outcome: PeerConnection | PeerUnavailable = PeerUnavailable(address, "shutting down")
        try:
            with attempt.scope:
                outcome = await self._open(address)
        except PeerUnavailable as exc:
            outcome = exc
        except Exception as exc:
            # Raising would take the transport's task group, and every connection, down.
            _log.exception("bug while connecting to %s", address)
            outcome = PeerUnavailable(address, f"internal error: {exc!r}")
        finally:
            # Failed or not, the next call after this makes a new attempt.
            if self._connecting.get(address) is attempt:
                del self._connecting[address]
            connection = outcome if isinstance(outcome, PeerConnection) else None
            left = attempt.scope.cancel_called
            if connection is not None and not left:
                self._peers[address] = connection
                attempt.settle(connection)
            else:
                attempt.settle(PeerUnavailable(address, "shutting down") if left else outcome)
        if connection is None:
            return
        if left:
            # Made as the transport was left, too late to be cancelled.
            connection.link.close("shutting down")
            await connection.run()  # says goodbye and closes the socket
        else:
            await self._run_connection(connection)

    async def _open(self, address: str) -> PeerConnection:
        # Other callers of this address wait for it meanwhile: bound it by the
        # call timeout even for callers willing to wait longer.
        with anyio.move_on_after(self._call_timeout):
            return await open_connection(
                address,
                node_id=self.node_id,
                identity=self.identity,
                context=self._client_context,
                authenticate=self._authenticate,
                max_frame_size=self._max_frame_size,
                keepalive_interval=self._keepalive_interval,
            )
        raise PeerUnavailable(address, f"no handshake within {self._call_timeout:g} s")

    async def _run_connection(self, connection: PeerConnection) -> None:
        address = connection.peer.address
        _log.debug("connected to node %r at %s", connection.peer.node_id, address)
        reason = await connection.run()
        _log.info(
            "connection to node %r at %s closed: %s", connection.peer.node_id, address, reason
        )
        if self._peers.get(address) is connection:
            del self._peers[address]


class _Attempt:
    """A connection being opened to one address, and what its waiters get.

    Owned by the transport, not by whichever call started it: each waiter
    bounds only its own wait.
    """

    __slots__ = ("_done", "_outcome", "scope")

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self._done = anyio.Event()
        self._outcome: PeerConnection | PeerUnavailable | None = None

    def settle(self, outcome: PeerConnection | PeerUnavailable) -> None:
        """Record the first outcome and wake every waiter (later ones are ignored)."""
        if self._outcome is None:
            self._outcome = outcome
            self._done.set()

    async def outcome(self) -> PeerConnection:
        """Wait for the connection. :raises PeerUnavailable: if the attempt failed."""
        await self._done.wait()
        outcome = self._outcome
        if isinstance(outcome, PeerUnavailable):
            # A copy per waiter: one exception raised in several tasks would
            # gather all their tracebacks.
            raise PeerUnavailable(outcome.address, outcome.reason, untrusted=outcome.untrusted)
        assert outcome is not None
        return outcome
