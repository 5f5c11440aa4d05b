"""A connection's peer is authenticated again while the connection lasts.

Trusted by fingerprint, a peer is accepted while it is a live member; checked
only at the handshake, a member that expired or was removed (or whoever holds
its key) was served for as long as it kept its connection open.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
import pytest

from runkit.transport import NodeTransport, PeerInfo, PeerUnavailable, TlsIdentity

A = TlsIdentity.self_signed("node-a")
B = TlsIdentity.self_signed("node-b")


@contextlib.asynccontextmanager
async def serving(transport: NodeTransport) -> AsyncIterator[str]:
    async with transport, anyio.create_task_group() as tg:
        bound: str = await tg.start(transport.serve, "127.0.0.1:0")
        yield bound
        tg.cancel_scope.cancel()


@pytest.fixture
def transport_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="runkit.transport")
    return caplog


class Server:
    """Node B, serving ``offer``, accepting the fingerprints in ``live``."""

    def __init__(self, *, reauthenticate_interval: float) -> None:
        self.live = {A.fingerprint, B.fingerprint}
        self.handled: list[bytes] = []
        self.checks = 0
        self.transport = NodeTransport(
            node_id="node-b",
            identity=B,
            authenticate=self.authenticate,
            unary={"offer": self.offer},
            keepalive_interval=0.5,  # the connection is kept alive meanwhile
            reauthenticate_interval=reauthenticate_interval,
        )

    def authenticate(self, fingerprint: str) -> bool:
        self.checks += 1
        return fingerprint in self.live

    async def offer(self, peer: PeerInfo, payload: bytes) -> bytes:
        self.handled.append(payload)
        return b"ok"


def client() -> NodeTransport:
    return NodeTransport(
        node_id="node-a", identity=A, authenticate=lambda fp: True, keepalive_interval=0.5
    )


async def test_an_expired_members_connection_is_closed(
    transport_log: pytest.LogCaptureFixture,
) -> None:
    b = Server(reauthenticate_interval=0.3)
    async with serving(b.transport) as address, client() as a:
        assert await a.call(address, "offer", b"1") == b"ok"
        b.live.discard(A.fingerprint)  # A's heartbeat expires
        await anyio.sleep(1)
        with pytest.raises(PeerUnavailable, match="refused by the peer: unknown certificate"):
            await a.call(address, "offer", b"2")  # on a new connection: refused
    assert b.handled == [b"1"]
    messages = [r.getMessage() for r in transport_log.records]
    assert any(
        "closing the connection from 127.0.0.1:" in m
        and f"certificate {A.fingerprint} no longer belongs to a live member" in m
        for m in messages
    ), messages
    # The member is told why, in the goodbye.
    assert any(
        m.endswith("closed: the peer said goodbye: certificate no longer belongs to a live member")
        for m in messages
    ), messages


async def test_a_live_members_connection_is_kept() -> None:
    b = Server(reauthenticate_interval=0.05)
    async with serving(b.transport) as address, client() as a:
        assert await a.call(address, "offer", b"0") == b"ok"
        connection = a._peers[address]
        for i in range(20):
            assert await a.call(address, "offer", b"%d" % i) == b"ok"
            await anyio.sleep(0.05)
        assert a._peers[address] is connection
        assert not connection.closed
    assert b.checks > 5  # the handshake's check, then one per interval
