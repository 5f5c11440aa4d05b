"""A slow but working heartbeat store keeps a node active (it does not flap).

A heartbeat beat writes the node's record and reads the node set. Done one
after the other, a store answering each call in more than half an interval left
the node without a read for two intervals, and so inactive: it kept stopping
and restarting its partitions while its peers, seeing its record refreshed,
still counted it as their owner.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from runkit.engine.cluster.membership import Membership
from runkit.engine.settings import EngineSettings
from runkit.persistence import Keyspace, KeyspaceStore, Limits, Provider
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import wait_until

INTERVAL = 0.2
N1 = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
N2 = uuid.UUID("00000000-0000-4000-8000-0000000000a2")


class _SlowKeyspace:
    """Answers every call on the node set after *latency* seconds."""

    def __init__(self, inner: Keyspace, latency: float) -> None:
        self._inner = inner
        self._latency = latency

    @property
    def name(self) -> str:
        return self._inner.name

    async def __aenter__(self) -> _SlowKeyspace:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._inner.close()

    async def close(self) -> None:
        await self._inner.close()

    async def get(self, key: bytes) -> tuple[bytes, str]:
        await anyio.sleep(self._latency)
        return await self._inner.get(key)

    async def has(self, key: bytes) -> bool:
        await anyio.sleep(self._latency)
        return await self._inner.has(key)

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        await anyio.sleep(self._latency)
        return await self._inner.set(key, value, revision)

    async def range(self) -> AsyncIterator[tuple[bytes, bytes, str]]:
        await anyio.sleep(self._latency)
        async for item in self._inner.range():
            yield item


class _SlowNodeSet(KeyspaceStore):
    def __init__(self, inner: KeyspaceStore, latency: float) -> None:
        self._inner = inner
        self._latency = latency

    async def open(self, name: str) -> Keyspace:
        keyspace = await self._inner.open(name)
        if name != "cluster/nodes":
            return keyspace
        return _SlowKeyspace(keyspace, self._latency)  # type: ignore[return-value]


class _SlowNodeSetProvider(Provider):
    def __init__(self, inner: Provider, latency: float) -> None:
        self._inner = inner
        self._keyspaces = _SlowNodeSet(inner.keyspaces, latency)

    @property
    def journals(self) -> Any:
        return self._inner.journals

    @property
    def keyspaces(self) -> KeyspaceStore:
        return self._keyspaces

    @property
    def sets(self) -> Any:
        return self._inner.sets

    @property
    def limits(self) -> Limits:
        return self._inner.limits

    async def provision(self) -> None:
        await self._inner.provision()

    async def close(self) -> None:
        await self._inner.close()


async def test_a_store_answering_in_most_of_an_interval_keeps_the_node_active() -> None:
    silo = f"slow-node-set-{uuid.uuid4()}"
    kept = MemoryProvider(silo)
    slow = Membership(
        _SlowNodeSetProvider(MemoryProvider(silo), 0.6 * INTERVAL),
        EngineSettings(node_id=N1, heartbeat_interval=INTERVAL),
    )
    peer = Membership(kept, EngineSettings(node_id=N2, heartbeat_interval=INTERVAL))
    stops = 0
    async with anyio.create_task_group() as tg:
        await tg.start(slow.run)
        await tg.start(peer.run)
        await wait_until(lambda: slow.active and str(N1) in peer.live_nodes(), timeout=10)
        was_active = True
        end = anyio.current_time() + 10 * INTERVAL
        while anyio.current_time() < end:
            await anyio.sleep(0.01)
            assert str(N1) in peer.live_nodes()  # the peer counts it the whole time
            stops += was_active and not slow.active
            was_active = slow.active
        tg.cancel_scope.cancel()
    assert stops == 0, f"the node stopped taking work {stops} times in {10 * INTERVAL} s"


async def test_dead_records_to_prune_do_not_make_a_slow_node_flap() -> None:
    # Pruning deleted every long-expired record one after another within the
    # beat's read: with calls of most of an interval, a beat outlasted the
    # read's freshness and the node stopped taking work until they were gone.
    from datetime import UTC, datetime, timedelta

    import msgspec

    from runkit.engine.cluster.nodes import NODES_KEYSPACE, RECORD_VERSION, Heartbeat

    silo = f"slow-prune-{uuid.uuid4()}"
    kept = MemoryProvider(silo)
    slow = Membership(
        _SlowNodeSetProvider(MemoryProvider(silo), 0.6 * INTERVAL),
        EngineSettings(node_id=N1, heartbeat_interval=INTERVAL),
        prune_after=1.0,
    )
    stops = 0
    async with anyio.create_task_group() as tg:
        await tg.start(slow.run)
        await wait_until(lambda: slow.active, timeout=10)
        # Dead nodes' records, found by the reads from now on.
        long_ago = datetime.now(UTC) - timedelta(hours=1)
        async with await kept.keyspaces.open(NODES_KEYSPACE) as ks:
            for _ in range(5):
                node_id = str(uuid.uuid4())
                beat = Heartbeat(
                    version=RECORD_VERSION,
                    node_id=node_id,
                    incarnation=str(uuid.uuid4()),
                    started_at=long_ago,
                    written_at=long_ago,
                    expires_at=long_ago,
                    heartbeat_interval=INTERVAL,
                )
                await ks.set(node_id.encode("ascii"), msgspec.msgpack.encode(beat), "")
        was_active = True
        end = anyio.current_time() + 10 * INTERVAL
        while anyio.current_time() < end:
            await anyio.sleep(0.01)
            stops += was_active and not slow.active
            was_active = slow.active
        tg.cancel_scope.cancel()
    async with await kept.keyspaces.open(NODES_KEYSPACE) as ks:
        left = [key async for key, _, _ in ks.range()]
    assert stops == 0, f"the node stopped taking work {stops} times in {10 * INTERVAL} s"
    assert left == [str(N1).encode()] or not left  # the dead ones are pruned
