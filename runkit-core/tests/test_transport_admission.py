"""Getting a connection in: the accept loop and the bounds on handshakes in progress.

Strangers here are raw TCP connections that send nothing, or a few bytes of
a TLS record and then stall; members are ``NodeTransport`` instances.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
import sys
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest

from runkit.transport import NodeTransport, PeerInfo, PeerUnavailable, TlsIdentity

A = TlsIdentity.self_signed("node-a")
B = TlsIdentity.self_signed("node-b")
CLUSTER = frozenset({A.fingerprint, B.fingerprint})
# The first bytes of a TLS record: the server's handshake has heard from its peer.
TLS_RECORD_START = b"\x16\x03\x01"


async def echo(peer: PeerInfo, payload: bytes) -> bytes:
    return payload


def node(node_id: str, identity: TlsIdentity, **kwargs: object) -> NodeTransport:
    return NodeTransport(
        node_id=node_id,
        identity=identity,
        authenticate=CLUSTER.__contains__,
        unary={"echo": echo},
        **kwargs,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def serving(transport: NodeTransport) -> AsyncIterator[str]:
    async with transport, anyio.create_task_group() as tg:
        bound: str = await tg.start(transport.serve, "127.0.0.1:0")
        yield bound
        tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def strangers(
    address: str, count: int, *, send: bytes = b"", local_host: str | None = None
) -> AsyncIterator[list[anyio.abc.SocketStream]]:
    """*count* TCP connections to *address* that send *send*, then nothing more."""
    host, port = address.rsplit(":", 1)
    streams: list[anyio.abc.SocketStream] = []
    try:
        for _ in range(count):
            stream = await anyio.connect_tcp(host, int(port), local_host=local_host)
            streams.append(stream)
            if send:
                await stream.send(send)
        await anyio.sleep(0.2)  # all accepted, in their handshakes
        yield streams
    finally:
        for stream in streams:
            await stream.aclose()


async def closed_by_peer(stream: anyio.abc.ByteStream) -> bool:
    """Whether the server closed *stream* (it sends nothing to a stalled handshake)."""
    try:
        while await stream.receive():
            pass
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return True
    return False


@pytest.fixture
def transport_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="runkit.transport")
    return caplog


def warnings(log: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in log.records
        if r.levelno == logging.WARNING and text in r.getMessage()
    ]


# --- the accept loop -------------------------------------------------------------------


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds in /proc")
async def test_running_out_of_file_descriptors_does_not_end_the_listener(
    transport_log: pytest.LogCaptureFixture,
) -> None:
    # anyio's Listener.serve re-raised EMFILE (trio: BrokenResourceError from it),
    # which ended the listener and, in the node's task group, the node.
    b = node("node-b", B)
    ended: list[BaseException] = []

    async def serve(*, task_status: anyio.abc.TaskStatus[str]) -> None:
        try:
            await b.serve("127.0.0.1:0", task_status=task_status)
        except Exception as exc:
            ended.append(exc)

    async with b, node("node-a", A) as a, anyio.create_task_group() as tg:
        address: str = await tg.start(serve)
        host, port = address.rsplit(":", 1)
        assert await a.call(address, "echo", b"before") == b"before"
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 40, hard))
        flood: list[socket.socket] = []
        try:
            # A connection flood in this process, so it shares the fd limit: the
            # kernel completes the connections, the listener cannot accept them.
            while True:
                try:
                    s = socket.socket()
                except OSError as exc:
                    problem = exc
                    break
                flood.append(s)
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect((host, int(port)))
            await anyio.sleep(0.5)  # the listener tries to accept meanwhile
        finally:
            for s in flood:
                s.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert problem.errno == errno.EMFILE
        await anyio.sleep(0.2)
        assert not ended, f"the listener ended: {ended[0]!r}"
        assert await a.call(address, "echo", b"after", timeout=3) == b"after"
        tg.cancel_scope.cancel()
    # Retried every 0.1 s, warned about once (rate-limited), saying what to do.
    [warning] = warnings(transport_log, "cannot accept connections on")
    assert "EMFILE (Too many open files)" in warning
    assert "ulimit -n" in warning


# --- handshake slots -------------------------------------------------------------------


async def test_silent_connections_do_not_lock_members_out(
    transport_log: pytest.LogCaptureFixture,
) -> None:
    # Default bounds (64 handshakes, 10 s each): 64 connections that never sent
    # a byte refused every member for 10 s, again and again.
    async with (
        serving(node("node-b", B)) as address,
        node("node-a", A) as a,
        strangers(address, 64),
    ):
        assert await a.call(address, "echo", b"member", timeout=2) == b"member"
    assert warnings(transport_log, "its handshake slot went to a newer connection")


async def test_at_the_bound_a_silent_handshake_makes_way_and_a_talking_one_does_not(
    transport_log: pytest.LogCaptureFixture,
) -> None:
    b = node("node-b", B, max_handshakes=2, handshake_timeout=30)
    async with serving(b) as address, node("node-a", A) as a:
        async with strangers(address, 2, send=TLS_RECORD_START):
            # Both slots are making progress: the newcomer is refused at once.
            async with strangers(address, 1) as [third]:
                with anyio.fail_after(1):  # not the 2 s of a silent connection
                    assert await closed_by_peer(third)
            with pytest.raises(PeerUnavailable) as refused:
                await a.call(address, "echo", b"", timeout=2)
        # The member's client says what happened (the error used to be empty).
        assert refused.value.reason.startswith(
            "cannot connect: the peer closed the connection during the handshake "
            "(overloaded, or it does not accept this node's certificate)"
        ), refused.value.reason
        async with (
            strangers(address, 1, send=TLS_RECORD_START),
            strangers(address, 1) as [silent],
        ):
            # One slot is silent: it goes to the member.
            assert await a.call(address, "echo", b"in", timeout=2) == b"in"
            with anyio.fail_after(1):
                assert await closed_by_peer(silent)
    assert warnings(transport_log, "2 handshakes already in progress")
    assert warnings(transport_log, "its handshake slot went to a newer connection")


async def test_a_connection_that_sends_nothing_is_dropped_before_the_handshake_timeout(
    transport_log: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("runkit.transport._admission.FIRST_BYTE_TIMEOUT", 0.3)
    async with (
        serving(node("node-b", B, handshake_timeout=30)) as address,
        strangers(address, 1) as [silent],
        strangers(address, 1, send=TLS_RECORD_START) as [talking],
    ):
        with anyio.fail_after(2):
            assert await closed_by_peer(silent)
        # One that has sent something has the handshake timeout (30 s).
        with anyio.move_on_after(1):
            await closed_by_peer(talking)
            pytest.fail("a connection that sent something was dropped")
    assert warnings(transport_log, "it sent nothing within 0.3 s")


@pytest.mark.skipif(sys.platform != "linux", reason="binds to 127.0.0.2 (Linux loopback)")
async def test_one_host_holds_at_most_8_handshake_slots(
    transport_log: pytest.LogCaptureFixture,
) -> None:
    # A host that sends a byte and stalls cannot be made to give way: it gets
    # 8 slots, and the other 56 are left to everyone else.
    async with (
        serving(node("node-b", B, handshake_timeout=30)) as address,
        strangers(address, 8, send=TLS_RECORD_START, local_host="127.0.0.2"),
    ):
        async with strangers(address, 1, local_host="127.0.0.2") as [ninth]:
            with anyio.fail_after(1):
                assert await closed_by_peer(ninth)
        async with node("node-a", A) as a:  # from 127.0.0.1
            assert await a.call(address, "echo", b"in", timeout=2) == b"in"
    assert warnings(transport_log, "8 handshakes from 127.0.0.2 already in progress")


class _FailingOnce:
    """A listener whose first accept fails with *code*, the second gives a connection."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.calls = 0

    async def accept(self) -> object:
        self.calls += 1
        if self.calls == 1:
            raise OSError(self.code, "a pending network error on one connection")
        if self.calls == 2:
            return object()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


@pytest.mark.parametrize("code", [errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN])
async def test_a_network_error_accept_reports_for_one_connection_skips_it(code: int) -> None:
    # accept(2) passes a pending connection's network error on: its man page
    # says to retry as for EAGAIN. It ended the listener, and the node.
    from runkit.transport._listener import accept_forever

    listener = _FailingOnce(code)
    served: list[object] = []

    async def handler(stream: object) -> None:
        served.append(stream)

    with anyio.move_on_after(0.5):
        await accept_forever(listener, handler, label="test")  # type: ignore[arg-type]
    assert len(served) == 1
