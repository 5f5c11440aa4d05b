"""Membership: heartbeats, live sets, rendezvous ownership, failover and handoff.

Several ``Membership`` instances share one memory silo, each through its own
provider, as separate nodes would. Heartbeats tick every ``INTERVAL`` of real
time, but expiry follows an injected clock that only moves when a test says,
so nothing expires by accident on a slow machine.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import attrs
import msgspec
import pytest
from anyio.abc import TaskGroup, TaskStatus

from runkit import rendezvous
from runkit.engine.cluster.membership import Membership
from runkit.engine.cluster.nodes import (
    NODES_KEYSPACE,
    RECORD_VERSION,
    NodeIdInUse,
    Progress,
    list_nodes,
)
from runkit.engine.engine import AppRuntime, Engine
from runkit.engine.partitions import partition_id
from runkit.engine.settings import EngineSettings
from runkit.persistence import (
    JournalStore,
    Keyspace,
    KeyspaceStore,
    Limits,
    Provider,
    SetStore,
)
from runkit.testing.faults import AFTER, BEFORE, FaultPlan, FaultyProvider
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import (
    APP_KEY,
    FAST,
    Deposit,
    check_invariants,
    settled,
    setup,
)
from engine_events_harness import FakeClock

INTERVAL = 0.02
N1 = uuid.UUID("00000000-0000-4000-8000-000000000001")
N2 = uuid.UUID("00000000-0000-4000-8000-000000000002")
N3 = uuid.UUID("00000000-0000-4000-8000-000000000003")
APPS = ("a0000000-0000-4000-8000-000000000001", "a0000000-0000-4000-8000-000000000002")
PARTITIONS = [partition_id(app, i) for app in APPS for i in range(32)]


def expected(node: uuid.UUID, live: Iterable[uuid.UUID]) -> set[str]:
    live = list(live)
    return {p for p in PARTITIONS if rendezvous.winner(p, live) == node}


def owned(m: Membership) -> set[str]:
    return {p for p in PARTITIONS if m.owns(p)}


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await anyio.sleep(INTERVAL / 4)


@pytest.fixture
def silo() -> str:
    return f"membership-{uuid.uuid4()}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def node_settings(node_id: uuid.UUID, clock: FakeClock, **overrides: Any) -> EngineSettings:
    options: dict[str, Any] = {
        "node_id": node_id,
        "heartbeat_interval": INTERVAL,
        "clock": clock,
        "advertise_address": f"node-{str(node_id)[-1]}:7000",
        "listen_address": "0.0.0.0:7000",
        "shutdown_timeout": 5.0,
    }
    return EngineSettings(**{**options, **overrides})


@attrs.define
class Running:
    """A membership running in its own cancel scope (cancel = stop the process)."""

    membership: Membership
    provider: Provider
    scope: anyio.CancelScope
    done: anyio.Event

    async def stop(self) -> None:
        self.scope.cancel()
        with anyio.fail_after(10):
            await self.done.wait()


async def start(
    tg: TaskGroup,
    node_id: uuid.UUID,
    clock: FakeClock,
    provider: Provider,
    **kwargs: Any,
) -> Running:
    m = Membership(provider, node_settings(node_id, clock), **kwargs)
    running = Running(m, provider, anyio.CancelScope(), anyio.Event())

    async def run(*, task_status: TaskStatus[None]) -> None:
        try:
            with running.scope:
                await m.run(task_status=task_status)
        finally:
            running.done.set()

    with anyio.fail_after(10):
        await tg.start(run)
    return running


@asynccontextmanager
async def cluster(
    silo: str, clock: FakeClock, *node_ids: uuid.UUID
) -> AsyncIterator[tuple[TaskGroup, list[Running]]]:
    async with anyio.create_task_group() as tg:
        nodes = [await start(tg, n, clock, MemoryProvider(silo)) for n in node_ids]
        await converged(nodes)
        yield tg, nodes
        tg.cancel_scope.cancel()


async def converged(nodes: list[Running]) -> None:
    """Wait until every node sees exactly the given nodes as live."""
    ids = {str(n.membership.node_id) for n in nodes}
    await wait_until(lambda: all(n.membership.live_nodes() == ids for n in nodes))


async def records(silo: str) -> dict[uuid.UUID, Any]:
    return {r.node_id: r for r in await list_nodes(MemoryProvider(silo))}


async def step(silo: str, clock: FakeClock, nodes: Iterable[Running | Membership]) -> None:
    """Advance the clock by one interval and wait for *nodes* to heartbeat at the new time."""
    clock.advance(INTERVAL)
    ids = [(n if isinstance(n, Membership) else n.membership).node_id for n in nodes]

    async def written() -> bool:
        current = await records(silo)
        return all(i in current and current[i].written_at == clock.now for i in ids)

    await wait_until(written)


def assert_exactly_one_owner(nodes: list[Running]) -> None:
    live = [n.membership.node_id for n in nodes]
    for p in PARTITIONS:
        owners = [n.membership.node_id for n in nodes if n.membership.owns(p)]
        assert owners == [rendezvous.winner(p, live)], p


async def test_owns_nothing_until_started_then_everything_alone(
    silo: str, clock: FakeClock
) -> None:
    m = Membership(MemoryProvider(silo), node_settings(N1, clock))
    assert owned(m) == set()
    assert m.live_nodes() == set()
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await tg.start(m.run)
        # started() is reported only once the record is written and the node set read.
        assert m.active
        assert m.generation > 0
        assert owned(m) == set(PARTITIONS)
        assert m.live_nodes() == {str(N1)}
        assert m.live_peers() == {}
        assert set(await records(silo)) == {N1}
        tg.cancel_scope.cancel()
    assert owned(m) == set()


@pytest.mark.parametrize("count", [2, 3])
async def test_nodes_split_partitions_as_rendezvous_says(
    silo: str, clock: FakeClock, count: int
) -> None:
    ids = [N1, N2, N3][:count]
    async with cluster(silo, clock, *ids) as (_, nodes):
        for n in nodes:
            assert owned(n.membership) == expected(n.membership.node_id, ids)
            assert owned(n.membership), "every node should win some of 64 partitions"
        assert_exactly_one_owner(nodes)
        peers = nodes[0].membership.live_peers()
        assert set(peers) == set(ids[1:])
        assert peers[N2].advertise_address == "node-2:7000"


async def test_join_moves_only_partitions_the_newcomer_wins(silo: str, clock: FakeClock) -> None:
    async with cluster(silo, clock, N1, N2) as (tg, nodes):
        before = {n.membership.node_id: owned(n.membership) for n in nodes}
        generations = [n.membership.generation for n in nodes]
        nodes.append(await start(tg, N3, clock, MemoryProvider(silo)))
        await converged(nodes)
        moved = expected(N3, [N1, N2, N3])
        assert moved, "the newcomer should win some partitions"
        for n in nodes[:2]:
            m = n.membership
            assert owned(m) == before[m.node_id] - moved
        assert owned(nodes[2].membership) == moved
        assert [n.membership.generation for n in nodes[:2]] != generations
        assert_exactly_one_owner(nodes)


async def test_wait_changed_wakes_when_a_node_joins(silo: str, clock: FakeClock) -> None:
    async with cluster(silo, clock, N1) as (tg, nodes):
        m = nodes[0].membership
        generation = m.generation
        woke: list[int] = []

        async def waiter() -> None:
            woke.append(await m.wait_changed(generation))

        tg.start_soon(waiter)
        await anyio.sleep(INTERVAL * 3)
        assert woke == [], "nothing changed yet"
        await start(tg, N2, clock, MemoryProvider(silo))
        await wait_until(lambda: bool(woke))
        assert woke[0] > generation
        assert await m.wait_changed(generation) == m.generation  # no wait when already changed


async def test_graceful_leave_hands_over_without_waiting_for_expiry(
    silo: str, clock: FakeClock
) -> None:
    async with cluster(silo, clock, N1, N2, N3) as (_, nodes):
        await nodes[2].stop()
        assert owned(nodes[2].membership) == set()
        assert set(await records(silo)) == {N1, N2}, "leaving deletes the record"
        # The clock does not move, so nothing expires: only the deletion can hand over.
        survivors = nodes[:2]
        await converged(survivors)
        for n in survivors:
            assert owned(n.membership) == expected(n.membership.node_id, [N1, N2])
        assert_exactly_one_owner(survivors)


async def test_crashed_node_is_taken_over_only_after_its_record_expires(
    silo: str, clock: FakeClock
) -> None:
    async with cluster(silo, clock, N1, N2, N3) as (_, nodes):
        survivors = nodes[:2]
        # kill -9: the process stops writing anything, so its record stays behind.
        crashed = nodes[2]
        await crashed.provider.close()
        await crashed.stop()
        assert N3 in await records(silo)
        for _ in range(2):  # two intervals later the record has not expired yet
            await step(silo, clock, survivors)
        await anyio.sleep(INTERVAL * 3)
        for n in survivors:
            assert str(N3) in n.membership.live_nodes()
            assert owned(n.membership) == expected(n.membership.node_id, [N1, N2, N3])
        await step(silo, clock, survivors)  # three intervals: expired
        await converged(survivors)
        for n in survivors:
            assert owned(n.membership) == expected(n.membership.node_id, [N1, N2])
        assert_exactly_one_owner(survivors)
        record = (await records(silo))[N3]
        assert not record.is_live(clock.now), "operators still see the dead node's record"


async def test_dead_records_are_pruned_long_after_expiry(silo: str, clock: FakeClock) -> None:
    async with anyio.create_task_group() as tg:
        survivor = await start(tg, N1, clock, MemoryProvider(silo), prune_after=3600)
        crashed = await start(tg, N2, clock, MemoryProvider(silo))
        await converged([survivor, crashed])
        await crashed.provider.close()
        await crashed.stop()
        clock.advance(3600)
        await step(silo, clock, [survivor])
        assert N2 in await records(silo), "not yet: expired for less than prune_after"
        clock.advance(INTERVAL * 3)
        await wait_until(lambda: _absent(silo, N2))
        tg.cancel_scope.cancel()


async def _absent(silo: str, node: uuid.UUID) -> bool:
    return node not in await records(silo)


async def test_duplicate_node_id_is_fatal(silo: str, clock: FakeClock) -> None:
    async with cluster(silo, clock, N1) as (_, nodes):
        duplicate = Membership(
            MemoryProvider(silo), node_settings(N1, clock, advertise_address="dup:7000")
        )
        with anyio.fail_after(10), pytest.raises(NodeIdInUse) as caught:
            await duplicate.run()
        message = str(caught.value)
        assert str(N1) in message
        assert "in use by another process" in message
        assert "node-1:7000" in message, "names the other process's address"
        assert "dup:7000" not in message
        assert "DOGMA_NODE_ID" in message, "says what to do"
        assert caught.value.node_id == N1
        assert owned(duplicate) == set()
        # The first process is unharmed: the duplicate neither wrote nor deleted its record.
        await anyio.sleep(INTERVAL * 3)
        assert (await records(silo))[N1].incarnation != duplicate._heartbeat.incarnation
        assert owned(nodes[0].membership) == set(PARTITIONS)


async def test_foreign_write_to_our_record_is_fatal_and_the_record_is_left_alone(
    silo: str, clock: FakeClock
) -> None:
    m = Membership(MemoryProvider(silo), node_settings(N1, clock))
    errors: list[NodeIdInUse] = []

    async def run(*, task_status: TaskStatus[None]) -> None:
        try:
            await m.run(task_status=task_status)
        except NodeIdInUse as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        await tg.start(run)
        await overwrite_with_foreign_record(silo, N1)
        await wait_until(lambda: bool(errors))
    assert "intruder:7000" in str(errors[0])
    assert owned(m) == set()
    assert (await records(silo))[N1].incarnation == "someone-else"


async def overwrite_with_foreign_record(silo: str, node_id: uuid.UUID) -> None:
    """Do what another process with the same node ID would: rewrite the record."""
    async with await MemoryProvider(silo).keyspaces.open(NODES_KEYSPACE) as ks:
        key = str(node_id).encode()
        value, _ = await ks.get(key)
        foreign = msgspec.msgpack.decode(value)
        foreign["incarnation"] = "someone-else"
        foreign["advertise_address"] = "intruder:7000"
        await ks.set_unconditional(key, msgspec.msgpack.encode(foreign))


async def test_joined_keeps_heartbeating_while_the_block_winds_down_then_leaves(
    silo: str, clock: FakeClock
) -> None:
    m = Membership(MemoryProvider(silo), node_settings(N1, clock))
    wound_down = False
    with anyio.fail_after(10), anyio.CancelScope() as outer:
        async with m.joined():
            assert owned(m) == set(PARTITIONS)
            outer.cancel()  # the engine is asked to stop
            try:
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    # Flushing takes a while: the record must not expire meanwhile.
                    for _ in range(4):
                        await step(silo, clock, [m])
                    assert m.active
                    assert N1 in await records(silo)
                    wound_down = True
    assert wound_down
    assert await records(silo) == {}, "left once the block had exited"
    assert owned(m) == set()


async def test_joined_raises_the_blocks_error_plainly_and_leaves(
    silo: str, clock: FakeClock
) -> None:
    m = Membership(MemoryProvider(silo), node_settings(N1, clock))

    async def work() -> None:
        async with m.joined():
            assert N1 in await records(silo)
            raise ValueError("the block failed")

    with anyio.fail_after(10), pytest.raises(ValueError, match="the block failed"):
        await work()
    assert await records(silo) == {}


async def test_joined_raises_node_id_in_use_plainly(silo: str, clock: FakeClock) -> None:
    async with cluster(silo, clock, N1):
        duplicate = Membership(MemoryProvider(silo), node_settings(N1, clock))
        entered = False
        with anyio.fail_after(10), pytest.raises(NodeIdInUse):
            async with duplicate.joined():
                entered = True
        assert not entered

    m = Membership(MemoryProvider(silo), node_settings(N2, clock))
    cancelled = False

    async def work() -> None:
        nonlocal cancelled
        async with m.joined():
            await overwrite_with_foreign_record(silo, N2)
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                cancelled = True
                raise

    with anyio.fail_after(10), pytest.raises(NodeIdInUse) as caught:
        await work()
    assert cancelled, "the block is cancelled when the membership fails"
    assert "intruder:7000" in str(caught.value)


async def restart_after_crash(
    tg: TaskGroup, silo: str, clock: FakeClock, provider: Provider
) -> tuple[Membership, anyio.Event]:
    """Crash N1 (its record stays, unexpired) and start it again on *provider*.

    The restart runs in *tg*; the event is set once it has joined.
    """
    first = await start(tg, N1, clock, MemoryProvider(silo))
    await first.provider.close()
    await first.stop()
    restarted = Membership(provider, node_settings(N1, clock))
    started = anyio.Event()

    async def run() -> None:
        await tg.start(restarted.run)
        started.set()

    tg.start_soon(run)
    return restarted, started


async def test_restart_waits_out_its_crashed_predecessor(silo: str, clock: FakeClock) -> None:
    async with anyio.create_task_group() as tg:
        restarted, started = await restart_after_crash(tg, silo, clock, MemoryProvider(silo))
        await anyio.sleep(INTERVAL * 5)
        assert not started.is_set(), "must not take a record that may still be live"
        clock.advance(INTERVAL * 3)
        with anyio.fail_after(10):
            await started.wait()
        assert owned(restarted) == set(PARTITIONS)
        assert (await records(silo))[N1].incarnation == restarted._heartbeat.incarnation
        tg.cancel_scope.cancel()


async def test_failing_heartbeat_writes_stop_work_until_they_succeed(
    silo: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    plan = FaultPlan()
    async with anyio.create_task_group() as tg:
        faulty = await start(tg, N1, clock, FaultyProvider(MemoryProvider(silo), plan))
        healthy = await start(tg, N2, clock, MemoryProvider(silo))
        nodes = [faulty, healthy]
        await converged(nodes)
        generation = faulty.membership.generation
        rule = plan.fail(BEFORE, ops={"set"}, names=lambda n: n == NODES_KEYSPACE)
        with caplog.at_level(logging.WARNING, logger="runkit.engine.cluster.membership"):
            await step(silo, clock, [healthy])
            await step(silo, clock, [healthy])
            # Two intervals without a successful write: N1 stops, before peers drop it.
            await wait_until(lambda: not faulty.membership.active)
            assert owned(faulty.membership) == set()
            assert faulty.membership.generation > generation
            assert owned(healthy.membership) == expected(N2, [N1, N2])
            assert "stops taking work" in caplog.text
            await step(silo, clock, [healthy])  # three: N1's record has expired
            await wait_until(lambda: healthy.membership.live_nodes() == {str(N2)})
            assert owned(healthy.membership) == set(PARTITIONS)
            assert owned(faulty.membership) == set()
            assert rule.injected > 0
            plan.clear()
            await converged(nodes)
            for n in nodes:
                assert owned(n.membership) == expected(n.membership.node_id, [N1, N2])
            assert "takes work again" in caplog.text
        tg.cancel_scope.cancel()


@attrs.define
class Gate:
    """Holds writes back while closed."""

    _closed: anyio.Event | None = None

    def close(self) -> None:
        self._closed = anyio.Event()

    def open(self) -> None:
        if self._closed is not None:
            self._closed.set()
            self._closed = None

    async def passage(self) -> None:
        if self._closed is not None:
            await self._closed.wait()


class _HangingKeyspaces(KeyspaceStore):
    def __init__(self, inner: KeyspaceStore, gate: Gate) -> None:
        self._inner = inner
        self._gate = gate

    async def open(self, name: str) -> Keyspace:
        return _HangingKeyspace(await self._inner.open(name), self._gate)


class _HangingKeyspace(Keyspace):
    """Writes block while the gate is closed (a store that stopped answering)."""

    def __init__(self, inner: Keyspace, gate: Gate) -> None:
        self._inner = inner
        self._gate = gate

    @property
    def name(self) -> str:
        return self._inner.name

    async def close(self) -> None:
        await self._inner.close()

    async def get(self, key: bytes) -> tuple[bytes, str]:
        return await self._inner.get(key)

    async def has(self, key: bytes) -> bool:
        return await self._inner.has(key)

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        await self._gate.passage()
        return await self._inner.set(key, value, revision)

    async def set_unconditional(self, key: bytes, value: bytes) -> str:
        return await self._inner.set_unconditional(key, value)

    def range(self) -> AsyncIterator[tuple[bytes, bytes, str]]:
        return self._inner.range()


class _HangingProvider(Provider):
    def __init__(self, inner: Provider, gate: Gate) -> None:
        self._inner = inner
        self._keyspaces = _HangingKeyspaces(inner.keyspaces, gate)

    @property
    def journals(self) -> JournalStore:
        return self._inner.journals

    @property
    def keyspaces(self) -> KeyspaceStore:
        return self._keyspaces

    @property
    def sets(self) -> SetStore:
        return self._inner.sets

    @property
    def limits(self) -> Limits:
        return self._inner.limits

    async def provision(self) -> None:
        await self._inner.provision()

    async def close(self) -> None:
        await self._inner.close()


async def test_ownership_changes_only_together_with_the_generation(
    silo: str, clock: FakeClock
) -> None:
    # A partition runner looks at owns() only when the generation changes. When
    # owns() read the clock, a heartbeat going stale turned it false with no
    # generation change: a pass over the partitions that straddled that moment
    # stopped the later ones, and nothing made the runner look at them again
    # once the next write made the heartbeat fresh.
    plan = FaultPlan()
    async with anyio.create_task_group() as tg:
        node = await start(tg, N1, clock, FaultyProvider(MemoryProvider(silo), plan))
        m = node.membership
        generation = m.generation
        assert owned(m) == set(PARTITIONS)
        plan.fail(BEFORE, ops={"set"}, names=lambda n: n == NODES_KEYSPACE)
        clock.advance(INTERVAL * 3)  # past the last write's freshness
        # No scheduling point since: the watchdog has not run, so nothing changed yet.
        assert (m.generation, m.active, owned(m)) == (generation, True, set(PARTITIONS))
        with anyio.fail_after(10):
            generation = await m.wait_changed(generation)
        assert (m.active, owned(m)) == (False, set())
        plan.clear()
        with anyio.fail_after(10):
            await m.wait_changed(generation)
        await wait_until(lambda: owned(m) == set(PARTITIONS))
        tg.cancel_scope.cancel()


async def test_a_hung_heartbeat_write_still_stops_work_on_time(silo: str, clock: FakeClock) -> None:
    gate = Gate()
    provider = _HangingProvider(MemoryProvider(silo), gate)
    async with anyio.create_task_group() as tg:
        # The write is abandoned only after a minute: the watchdog must not wait for it.
        node = await start(tg, N1, clock, provider, store_timeout=60)
        m = node.membership
        generation = m.generation
        gate.close()
        await anyio.sleep(INTERVAL * 2)  # a write is now stuck
        clock.advance(INTERVAL * 2)
        with anyio.fail_after(10):
            generation = await m.wait_changed(generation)
        assert not m.active
        assert owned(m) == set()
        gate.open()
        with anyio.fail_after(10):
            await m.wait_changed(generation)
        await wait_until(lambda: owned(m) == set(PARTITIONS))
        tg.cancel_scope.cancel()


async def test_leave_is_bounded_when_the_store_hangs(silo: str, clock: FakeClock) -> None:
    gate = Gate()
    provider = _HangingProvider(MemoryProvider(silo), gate)
    m = Membership(provider, node_settings(N1, clock, shutdown_timeout=0.1))
    async with anyio.create_task_group() as tg:
        await tg.start(m.run)
        gate.close()
        with anyio.fail_after(10):
            await m.leave()
        assert owned(m) == set()
    assert N1 in await records(silo), "peers will take over when it expires"
    gate.open()


async def test_leave_while_running_ends_run(silo: str, clock: FakeClock) -> None:
    async with cluster(silo, clock, N1, N2) as (_, nodes):
        await nodes[1].membership.leave()
        with anyio.fail_after(10):
            await nodes[1].done.wait()
        assert set(await records(silo)) == {N1}
        await converged(nodes[:1])
        assert owned(nodes[0].membership) == set(PARTITIONS)


async def test_ambiguous_heartbeat_writes_are_recognised_as_our_own(
    silo: str, clock: FakeClock
) -> None:
    plan = FaultPlan(seed=3)
    plan.fail(AFTER, ops={"set"}, names=lambda n: n == NODES_KEYSPACE, every=3)
    async with anyio.create_task_group() as tg:
        node = await start(tg, N1, clock, FaultyProvider(MemoryProvider(silo), plan))
        for _ in range(5):
            await step(silo, clock, [node])
        assert len(plan.injected) >= 2
        # A landed write whose reply was lost is our own, not another process's.
        assert not node.done.is_set()
        await wait_until(lambda: node.membership.active)
        tg.cancel_scope.cancel()
    assert await records(silo) == {}, "and leaving still deletes the record"


async def test_record_carries_identity_addresses_and_progress(silo: str, clock: FakeClock) -> None:
    progress: dict[str, dict[int, dict[str, int]]] = {
        APPS[0]: {0: {"stream_end": 5, "inbox_position": 3}}
    }
    async with anyio.create_task_group() as tg:
        node = await start(
            tg,
            N1,
            clock,
            MemoryProvider(silo),
            progress=lambda: progress,
            tls_fingerprint="sha256:abcd",
        )
        record = (await records(silo))[N1]
        assert record.progress == {APPS[0]: {0: {"stream_end": 5, "inbox_position": 3}}}
        assert record.advertise_address == "node-1:7000"
        assert record.listen_address == "0.0.0.0:7000"
        assert record.tls_fingerprint == "sha256:abcd"
        assert record.started_at == clock.now
        assert record.expires_at == clock.now + timedelta(seconds=3 * INTERVAL)
        assert record.heartbeat_interval == INTERVAL
        raw, _ = await (await MemoryProvider(silo).keyspaces.open(NODES_KEYSPACE)).get(
            str(N1).encode()
        )
        assert msgspec.msgpack.decode(raw)["version"] == RECORD_VERSION

        progress[APPS[0]][1] = {"stream_end": 9}
        await step(silo, clock, [node])
        record = (await records(silo))[N1]
        assert record.progress[APPS[0]][1] == {"stream_end": 9}
        tg.cancel_scope.cancel()


def _broken_progress() -> Progress:
    raise RuntimeError("progress is broken")


@pytest.mark.parametrize(
    "progress",
    [_broken_progress, lambda: {APPS[0]: {0: {"stream_end": "five"}}}],
    ids=["raises", "wrong-type"],
)
async def test_bad_progress_does_not_stop_heartbeats(
    silo: str, clock: FakeClock, progress: Callable[[], Progress]
) -> None:
    async with anyio.create_task_group() as tg:
        node = await start(tg, N1, clock, MemoryProvider(silo), progress=progress)
        await step(silo, clock, [node])
        assert (await records(silo))[N1].progress == {}, "the record stays readable"
        assert node.membership.active
        tg.cancel_scope.cancel()


async def test_list_nodes_shows_live_and_dead_nodes_in_order(silo: str, clock: FakeClock) -> None:
    provider = MemoryProvider(silo)
    assert await list_nodes(provider) == []
    async with cluster(silo, clock, N3, N1, N2) as (_, nodes):
        crashed = nodes[0]
        await crashed.provider.close()
        await crashed.stop()
        async with await provider.keyspaces.open(NODES_KEYSPACE) as ks:
            await ks.set_unconditional(b"not-a-node", b"garbage")
        for _ in range(3):
            await step(silo, clock, nodes[1:])
        listed = await list_nodes(provider)
        assert [r.node_id for r in listed] == [N1, N2, N3]
        assert [r.is_live(clock.now) for r in listed] == [True, True, False]
        assert listed[2].advertise_address == "node-3:7000"


async def test_engine_runs_exactly_the_partitions_membership_assigns(
    silo: str, clock: FakeClock
) -> None:
    s = setup()
    count = int(FAST["partition_count"])
    nodes: list[tuple[Engine, AppRuntime, Running]] = []

    async def start_engine(tg: TaskGroup, node_id: uuid.UUID) -> None:
        provider = MemoryProvider(silo)
        # No listen address: these engines do not serve the node transport.
        settings = node_settings(
            node_id,
            clock,
            applications=(s.config,),
            persistence_provider=provider,
            listen_address=None,
            advertise_address=None,
            **FAST,
        )
        engine = Engine.from_settings(settings)
        made: list[Membership] = []

        def membership(provider: Provider) -> Membership:
            made.append(Membership(provider, settings))
            return made[-1]

        # The engine starts the membership's run() before the applications.
        engine.use_ownership(membership)
        scope, done = anyio.CancelScope(), anyio.Event()

        async def run() -> None:
            try:
                with scope:
                    await engine.run()
            finally:
                done.set()

        tg.start_soon(run)
        runtime = await engine.runtime(APP_KEY)
        nodes.append((engine, runtime, Running(made[0], provider, scope, done)))

    def assigned(running: Running) -> set[int]:
        return {i for i in range(count) if running.membership.owns(partition_id(APP_KEY, i))}

    def runs_owned() -> bool:
        return all(set(rt.partitions) == assigned(running) for _, rt, running in nodes)

    async with anyio.create_task_group() as tg:
        await start_engine(tg, N1)
        await start_engine(tg, N2)
        await converged([running for _, _, running in nodes])
        await wait_until(runs_owned)
        assert all(assigned(running) for _, _, running in nodes), "both nodes should own some"
        executor = nodes[0][0].executor_for(s.app)
        for i in range(8):
            await executor.execute_command(Deposit(f"a{i}", 1, f"d{i}"), idempotency_key=f"d{i}")
        check_invariants(await settled(MemoryProvider(silo)))
        await nodes[1][2].stop()  # N2 leaves: N1 takes every partition
        survivor = nodes[0][1]
        await wait_until(lambda: set(survivor.partitions) == set(range(count)))
        tg.cancel_scope.cancel()


async def test_engine_heartbeats_on_their_own_provider_when_given_a_url() -> None:
    # Heartbeats must not queue behind the data path's connections, or a busy
    # node misses them and stops taking work: the engine opens a second provider.
    import dogma
    import runkit
    from runkit.persistence import PersistenceError

    class _App:
        def configure(self, c: dogma.ApplicationConfigurer) -> None:
            c.identity("membership-app", "5b1f7c0e-3a2d-4e6f-9a8b-7c6d5e4f3a21")

    app = _App()
    engine = runkit.Engine(
        runkit.with_application(app), runkit.with_persistence(f"memory:///{uuid.uuid4()}")
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        runtime = await engine.runtime(engine.applications[0].identity.key)
        membership = runtime.ownership._membership  # type: ignore[attr-defined]
        heartbeat_provider = membership._provider
        assert heartbeat_provider is not runtime.provider
        tg.cancel_scope.cancel()
    with pytest.raises(PersistenceError, match="closed"):
        await heartbeat_provider.keyspaces.open("x")


# -- log lines ---------------------------------------------------------------------


async def test_a_slow_heartbeat_write_does_not_make_a_peer_look_skewed(
    silo: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Skew is judged when the read returns: a peer that wrote while our write hung is not ahead."""
    gate = Gate()
    caplog.set_level(logging.INFO, logger="runkit.engine.cluster.membership")
    async with anyio.create_task_group() as tg:
        slow = await start(tg, N1, clock, _HangingProvider(MemoryProvider(silo), gate))
        fast = await start(tg, N2, clock, MemoryProvider(silo))
        await converged([slow, fast])
        gate.close()
        await anyio.sleep(INTERVAL * 2)  # N1's write is now stuck, its beat began at the old time
        await step(silo, clock, [fast])
        await step(silo, clock, [fast])
        await step(silo, clock, [fast])  # N2 wrote three intervals after N1's beat began
        gate.open()
        await step(silo, clock, [slow, fast])
        await converged([slow, fast])
        tg.cancel_scope.cancel()
    assert "clock is at least" not in caplog.text


async def test_a_peer_whose_clock_is_ahead_is_logged_once(
    silo: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer writing records dated ten intervals ahead of our clock is reported, once."""
    ahead = FakeClock(now=clock.now + timedelta(seconds=INTERVAL * 10))
    caplog.set_level(logging.INFO, logger="runkit.engine.cluster.membership")
    async with anyio.create_task_group() as tg:
        node = await start(tg, N1, clock, MemoryProvider(silo))
        await start(tg, N2, ahead, MemoryProvider(silo))
        # (N2 sees N1's records as expired: only N1's view matters here.)
        await wait_until(lambda: node.membership.live_nodes() == {str(N1), str(N2)})
        await step(silo, clock, [node])
        tg.cancel_scope.cancel()
    skewed = [r.getMessage() for r in caplog.records if "clock is at least" in r.getMessage()]
    assert skewed == [
        f"node {N2}'s clock is at least 0.2s ahead of node {N1}'s; "
        "skew near a heartbeat interval makes ownership flap"
    ]


class _HangingReads(_HangingKeyspaces):
    """Node-set reads (``range``) block while the gate is closed."""

    async def open(self, name: str) -> Keyspace:
        inner = await self._inner.open(name)
        gate = self._gate

        class Reads(_HangingKeyspace):
            async def set(self, key: bytes, value: bytes, revision: str) -> str:
                return await inner.set(key, value, revision)

            def range(self) -> AsyncIterator[tuple[bytes, bytes, str]]:
                async def items() -> AsyncIterator[tuple[bytes, bytes, str]]:
                    await gate.passage()
                    async for item in inner.range():
                        yield item

                return items()

        return Reads(inner, gate)


async def test_a_timed_out_node_set_read_names_the_timeout(
    silo: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The reason of a read that timed out is never empty (it was "... trying): ")."""
    gate = Gate()
    provider = _HangingProvider(MemoryProvider(silo), gate)
    provider._keyspaces = _HangingReads(MemoryProvider(silo).keyspaces, gate)
    caplog.set_level(logging.INFO, logger="runkit.engine.cluster.membership")
    async with anyio.create_task_group() as tg:
        node = await start(tg, N1, clock, provider, store_timeout=0.2)
        gate.close()
        await wait_until(lambda: "could not read the node set" in caplog.text)
        gate.open()
        await wait_until(lambda: "node set read again" in caplog.text)
        await node.stop()
    failures = [r.getMessage() for r in caplog.records if "could not read" in r.getMessage()]
    assert failures == [
        f"node {N1} could not read the node set (will keep trying): reading took longer than 0.2s"
    ]


async def test_a_joining_node_is_logged_in_words(
    silo: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Peers joining and leaving read as sentences with the live count."""
    caplog.set_level(logging.INFO, logger="runkit.engine.cluster.membership")
    async with cluster(silo, clock, N1) as (tg, nodes):
        nodes.append(await start(tg, N2, clock, MemoryProvider(silo)))
        await converged(nodes)
        await nodes[1].stop()
        await wait_until(lambda: nodes[0].membership.live_nodes() == {str(N1)})
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"node {N1}: ")]
    assert f"node {N1}: node {N2} joined; 2 live nodes" in messages
    assert f"node {N1}: node {N2} left or expired; 1 live node" in messages


async def test_a_client_is_logged_as_a_client(
    silo: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """`runkit execute` shows a client's lines: they must not call it a node that owns."""
    caplog.set_level(logging.INFO, logger="runkit.engine.cluster.membership")
    async with cluster(silo, clock, N1) as (tg, _):
        client = await start(tg, N2, clock, MemoryProvider(silo), role="client")
        await client.membership.leave()
        await client.stop()
    messages = [r.getMessage() for r in caplog.records if str(N2) in r.getMessage()]
    assert f"client {N2} joined the cluster: 1 live node(s)" in messages
    assert f"client {N2} is leaving" in messages
    assert f"client {N2} left the cluster" in messages
    assert not [m for m in messages if m.startswith(f"node {N2}")], messages


class _FailingRangeKeyspaces(_HangingKeyspaces):
    """``range()`` fails ``failures`` times (a node-set read that fails)."""

    failures = 0

    async def open(self, name: str) -> Keyspace:
        outer = self

        class Failing(_HangingKeyspace):
            def range(self) -> AsyncIterator[tuple[bytes, bytes, str]]:
                if outer.failures > 0:
                    outer.failures -= 1
                    return _failing_range()
                return super().range()

        return Failing(await self._inner.open(name), self._gate)


async def _failing_range() -> AsyncIterator[tuple[bytes, bytes, str]]:
    from runkit.persistence import PersistenceError

    empty: tuple[tuple[bytes, bytes, str], ...] = ()
    for item in empty:  # an async generator that fails when iterated
        yield item
    raise PersistenceError("node-set read failed (injected)")


def _failing_reads(silo: str) -> tuple[_HangingProvider, _FailingRangeKeyspaces]:
    """A provider whose node-set reads fail while ``keyspaces.failures`` is positive."""
    provider = _HangingProvider(MemoryProvider(silo), Gate())
    keyspaces = _FailingRangeKeyspaces(MemoryProvider(silo).keyspaces, Gate())
    provider._keyspaces = keyspaces
    return provider, keyspaces


async def test_a_takeover_followed_by_a_failed_read_is_not_taken_for_an_intruder(
    silo: str, clock: FakeClock
) -> None:
    # The restarted node watches its predecessor's record, takes it over once
    # it expires, and the read right after that write fails: on the retry it
    # finds a revision it did not watch, but written by itself, not an intruder.
    provider, keyspaces = _failing_reads(silo)
    async with anyio.create_task_group() as tg:
        restarted, started = await restart_after_crash(tg, silo, clock, provider)
        await anyio.sleep(INTERVAL * 5)
        assert not started.is_set()
        keyspaces.failures = 1
        clock.advance(INTERVAL * 3)
        with anyio.fail_after(10):
            await started.wait()
        assert keyspaces.failures == 0, "the read after the take-over failed"
        assert owned(restarted) == set(PARTITIONS)
        tg.cancel_scope.cancel()


async def test_a_node_that_cannot_read_the_node_set_hands_its_partitions_over(
    silo: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Its heartbeat lands but its reads fail: judged against a moving clock, its
    # last copy of the peers' records would expire and it would claim their
    # partitions while they run them. It stops taking work instead, and stops
    # refreshing its heartbeat, so that its peer takes its partitions: while its
    # record stayed fresh they had no owner at all.
    provider, keyspaces = _failing_reads(silo)
    async with anyio.create_task_group() as tg:
        blind = await start(tg, N1, clock, provider)
        healthy = await start(tg, N2, clock, MemoryProvider(silo))
        await converged([blind, healthy])
        keyspaces.failures = 10**9
        for _ in range(8):
            await step(silo, clock, [healthy])
            await anyio.sleep(INTERVAL)  # time for the blind node's watch to see the clock
            both = owned(blind.membership) & owned(healthy.membership)
            assert not both, f"{len(both)} partitions owned by two live nodes"
        await wait_until(lambda: owned(healthy.membership) == set(PARTITIONS))
        assert not owned(blind.membership)
        assert "it has not read the node set since" in caplog.text
        tg.cancel_scope.cancel()


def test_a_client_whose_heartbeat_is_late_is_not_said_to_stop_taking_work(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A client owns nothing; "stops taking work (it owns nothing ...)" sent
    # operators looking for lost partitions. What it risks is its peers' trust.
    from datetime import UTC, datetime

    from runkit.engine.cluster.live_view import LiveView

    client = uuid.UUID("00000000-0000-4000-8000-00000000c11e")
    view = LiveView(client, role="client")
    now = datetime.now(UTC)
    with caplog.at_level(logging.WARNING, logger="runkit.engine.cluster.membership"):
        view.update(now, {}, active=True, left=False, last_written=now)
        view.update(now, {}, active=False, left=False, last_written=now)
        view.update(now, {}, active=True, left=False, last_written=now)
    assert "stops taking work" not in caplog.text
    assert "takes work" not in caplog.text
    assert f"client {client}: its heartbeat has not been written since" in caplog.text
    assert "refuse its new connections" in caplog.text
    assert f"client {client} is trusted again: its heartbeat is fresh" in caplog.text


def test_a_heartbeat_record_with_naive_times_is_ignored_not_compared() -> None:
    # Compared with the reader's aware clock, a naive time would raise
    # TypeError and stop every node's membership: such a record is unreadable.
    from datetime import UTC, datetime, timedelta

    import msgspec

    from runkit.engine.cluster.nodes import Heartbeat, decode_node_record

    naive = datetime(2026, 1, 1)
    record = {
        "version": 1,
        "node_id": str(N1),
        "incarnation": "x",
        "started_at": naive,
        "written_at": naive,
        "expires_at": naive + timedelta(seconds=5),
        "heartbeat_interval": 1.0,
    }
    assert decode_node_record(str(N1).encode(), msgspec.msgpack.encode(record)) is None
    aware = {k: v.replace(tzinfo=UTC) if isinstance(v, datetime) else v for k, v in record.items()}
    decoded = decode_node_record(str(N1).encode(), msgspec.msgpack.encode(aware))
    assert decoded is not None
    assert isinstance(
        msgspec.msgpack.decode(msgspec.msgpack.encode(aware), type=Heartbeat), Heartbeat
    )
