"""What a caller passes is checked against the wire's bounds before it is sent.

A frame outside them is malformed to the peer, which closes the connection:
one caller's mistake failed every other call sharing it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import pytest

from runkit.transport import NodeTransport, PeerInfo, RemoteError, TlsIdentity

A = TlsIdentity.self_signed("node-a")
B = TlsIdentity.self_signed("node-b")
CLUSTER = frozenset({A.fingerprint, B.fingerprint})


async def slow(peer: PeerInfo, payload: bytes) -> bytes:
    await anyio.sleep(0.5)
    return b"done"


async def items(peer: PeerInfo, payload: bytes) -> AsyncIterator[bytes]:
    for i in range(3):
        yield b"%d" % i


def node(node_id: str, identity: TlsIdentity) -> NodeTransport:
    return NodeTransport(
        node_id=node_id,
        identity=identity,
        authenticate=CLUSTER.__contains__,
        unary={"slow": slow},
        streams={"items": items},
    )


@contextlib.asynccontextmanager
async def serving(transport: NodeTransport) -> AsyncIterator[str]:
    async with transport, anyio.create_task_group() as tg:
        bound: str = await tg.start(transport.serve, "127.0.0.1:0")
        yield bound
        tg.cancel_scope.cancel()


async def drain(a: NodeTransport, address: str, window: int) -> list[bytes]:
    async with a.stream(address, "items", b"", window=window) as stream:
        return [item async for item in stream]


async def misuse(a: NodeTransport, address: str, bad: str) -> None:
    if bad == "long-method":
        await a.call(address, "m" * 300, b"")
    else:
        await drain(a, address, 2**31 if bad == "huge-window" else 0)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("long-method", r"method name 'mmm.*'\.\.\. is 300 characters long; the limit is 256"),
        ("huge-window", r"window must be between 1 and 2147483647, got 2147483648"),
        ("zero-window", r"window must be between 1 and 2147483647, got 0"),
    ],
)
async def test_a_call_outside_the_bounds_fails_alone(bad: str, error: str) -> None:
    async with serving(node("node-b", B)) as address, node("node-a", A) as a:
        good: list[bytes] = []

        async def innocent() -> None:
            good.append(await a.call(address, "slow", b"", timeout=3))

        async with anyio.create_task_group() as tg:
            tg.start_soon(innocent)
            await anyio.sleep(0.2)  # in flight on the shared connection
            shared = a._peers[address]
            with pytest.raises(ValueError, match=error):
                await misuse(a, address, bad)
        assert good == [b"done"]
        assert await drain(a, address, 64) == [b"0", b"1", b"2"]
        assert a._peers[address] is shared
        assert not shared.closed


async def test_calls_at_the_bounds_go_through() -> None:
    # The checks are the decoder's bounds, not stricter: 256 characters (not
    # bytes) of method name, and a window of 2**31-1.
    async with serving(node("node-b", B)) as address, node("node-a", A) as a:
        with pytest.raises(RemoteError, match="no unary method") as unknown:
            await a.call(address, "é" * 256, b"")
        assert unknown.value.code == "unknown_method"
        assert await drain(a, address, 2**31 - 1) == [b"0", b"1", b"2"]
        assert await a.call(address, "slow", b"") == b"done"  # the same connection, still up


def test_a_node_id_too_long_for_the_handshake_is_refused_at_once() -> None:
    # Every peer would refuse its Hello as malformed, with nothing said why.
    with pytest.raises(ValueError, match=r"node ID 'nnn.*'\.\.\. is 257 characters long"):
        NodeTransport(node_id="n" * 257, identity=A, authenticate=CLUSTER.__contains__)
