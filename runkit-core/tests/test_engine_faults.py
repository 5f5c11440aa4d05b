"""Invariants §9.1-9.3 under injected storage faults, before and after every kind of write."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import anyio
import pytest

from runkit.persistence import PersistenceError
from runkit.testing.faults import AFTER, BEFORE, FaultPlan, FaultyProvider
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import (
    APP_KEY,
    Deposit,
    Notify,
    check_invariants,
    read_stores,
    running,
    settled,
    setup,
    splitting_node_ids,
    wait_until,
)


async def _execute_until_accepted(executor, command, key: str) -> None:  # type: ignore[no-untyped-def]
    # A caller that got an error retries with the same idempotency key (Dogma ADR-31).
    for _ in range(50):
        try:
            await executor.execute_command(command, idempotency_key=key)
            return
        except PersistenceError:
            await anyio.sleep(0.001)
    raise AssertionError(f"command {key} never accepted")


@pytest.mark.parametrize(
    ("timing", "ops", "kinds"),
    [
        (BEFORE, None, ("journal",)),
        (AFTER, None, ("journal",)),
        (BEFORE, None, ("keyspace",)),
        (AFTER, None, ("keyspace",)),
        (AFTER, ("append",), None),
    ],
    ids=["before-journal", "after-journal", "before-keyspace", "after-keyspace", "after-append"],
)
async def test_invariants_hold_under_faults_and_restart(
    timing: object, ops: tuple[str, ...] | None, kinds: tuple[str, ...] | None
) -> None:
    s = setup()
    s.accounts.fail["f3"] = 1  # a handler failure on top of the storage faults
    inner = MemoryProvider(f"faults-{uuid.uuid4()}")
    plan = FaultPlan(seed=7)
    plan.fail(timing, ops=ops, kinds=kinds, probability=0.15)  # type: ignore[arg-type]
    provider = FaultyProvider(inner, plan)

    async with running(
        provider, s.config, snapshot_every=2, truncate_aggregate_journals=True
    ) as engine:
        executor = engine.executor_for(s.app)
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(
                    _execute_until_accepted, executor, Deposit(f"a{i % 4}", 1, f"f{i}"), f"d{i}"
                )
                tg.start_soon(_execute_until_accepted, executor, Notify(i, f"n{i}"), f"n{i}")
        # Retries of keys already accepted (maybe already handled) must not repeat effects.
        for i in range(0, 30, 3):
            await _execute_until_accepted(executor, Deposit(f"a{i % 4}", 1, f"f{i}"), f"d{i}")
        await anyio.sleep(0.05)
    assert plan.injected, "the plan injected no fault"

    # A new engine without faults on the same store finishes whatever is pending.
    plan.clear()
    async with running(MemoryProvider(inner.silo), s.config) as engine:
        stores = await settled(inner)
    check_invariants(stores)
    assert not stores.poison
    for i in range(30):
        key_id = str(uuid.uuid5(uuid.UUID(APP_KEY), f"d{i}"))
        assert len(stores.events_of(key_id)) == 1, f"deposit d{i} did not take effect exactly once"
        notify_id = str(uuid.uuid5(uuid.UUID(APP_KEY), f"n{i}"))
        assert len(stores.events_of(notify_id)) == 1, f"notify n{i} not published exactly once"
    deposits = [e for e in stores.all_events() if e.description == "Deposited"]
    assert len(deposits) == 30


async def test_two_engines_owning_the_same_partitions_never_duplicate() -> None:
    # Two nodes that both believe they own every partition: OCC must fence them.
    s = setup()
    inner = MemoryProvider(f"dual-{uuid.uuid4()}")
    async with (
        running(MemoryProvider(inner.silo), s.config, partition_count=2) as one,
        running(MemoryProvider(inner.silo), s.config, partition_count=2) as two,
    ):
        executors = [one.executor_for(s.app), two.executor_for(s.app)]
        async with anyio.create_task_group() as tg:
            for i in range(60):
                executor = executors[i % 2]
                tg.start_soon(
                    _execute_until_accepted, executor, Deposit(f"a{i % 3}", 1, f"r{i}"), f"d{i}"
                )
                tg.start_soon(_execute_until_accepted, executor, Notify(i, f"n{i}"), f"n{i}")
        stores = await settled(inner, timeout=30)
    check_invariants(stores)
    for i in range(60):
        key_id = str(uuid.uuid5(uuid.UUID(APP_KEY), f"d{i}"))
        assert len(stores.events_of(key_id)) == 1


async def test_two_owners_racing_never_acknowledge_a_command_that_is_not_durable() -> None:
    # Both engines believe they own every partition, so each batch commit may
    # lose the stream append to the other's (ownership lost mid-batch). A call
    # may only return once its command is committed in the stream or durable
    # in the inbox: checked right after each return, before the store settles.
    from runkit.engine.commands.acceptance import command_id_for

    s = setup()
    inner = MemoryProvider(f"dual-ack-{uuid.uuid4()}")
    not_durable: list[str] = []
    async with (
        running(MemoryProvider(inner.silo), s.config, partition_count=2) as one,
        running(MemoryProvider(inner.silo), s.config, partition_count=2) as two,
    ):
        executors = [one.executor_for(s.app), two.executor_for(s.app)]

        async def deposit(i: int) -> None:
            key = f"ack{i}"
            await _execute_until_accepted(executors[i % 2], Deposit(f"a{i % 4}", 1, key), key)
            command_id = command_id_for(APP_KEY, key)
            stores = await read_stores(inner)
            inboxed = {
                entry.envelope.message_id
                for records in stores.inbox.values()
                for _, record in records
                for entry in record.entries
            }
            if not stores.events_of(command_id) and command_id not in inboxed:
                not_durable.append(key)

        async with anyio.create_task_group() as tg:
            for i in range(80):
                tg.start_soon(deposit, i)
        stores = await settled(inner, timeout=30)
    assert not not_durable, f"acknowledged before durable: {not_durable}"
    check_invariants(stores)
    for i in range(80):
        assert len(stores.events_of(command_id_for(APP_KEY, f"ack{i}"))) == 1


@pytest.mark.parametrize("truncate", [False, True], ids=["keep-journals", "truncate-journals"])
async def test_engines_stopped_at_random_points_lose_and_duplicate_nothing(truncate: bool) -> None:
    # Cancelling an engine abandons work at whatever await it is at: a crash, for
    # what the store sees. Several rounds, then a clean engine finishes the work.
    import random

    s = setup()
    s.notifier.delay = 0.001
    inner = MemoryProvider(f"crash-{uuid.uuid4()}")
    rng = random.Random(2)
    accepted: set[str] = set()
    for round_ in range(6):
        async with anyio.create_task_group() as outer:

            async def load(round_: int = round_) -> None:
                async with running(
                    MemoryProvider(inner.silo),
                    s.config,
                    snapshot_every=2,
                    truncate_aggregate_journals=truncate,
                ) as e:
                    executor = e.executor_for(s.app)
                    for i in range(40):
                        key = f"{round_}-{i}"
                        command = Deposit(f"a{i % 5}", 1, key) if i % 2 else Notify(i, key)
                        await executor.execute_command(command, idempotency_key=key)
                        accepted.add(key)
                    await anyio.sleep_forever()

            outer.start_soon(load)
            await anyio.sleep(rng.uniform(0.01, 0.1))
            outer.cancel_scope.cancel()
    async with running(MemoryProvider(inner.silo), s.config):
        stores = await settled(inner, timeout=30)
    check_invariants(stores)
    assert accepted
    for key in accepted:
        command_id = str(uuid.uuid5(uuid.UUID(APP_KEY), key))
        assert len(stores.events_of(command_id)) == 1, f"{key} lost or duplicated"


async def test_two_nodes_with_membership_share_partitions_and_fail_over() -> None:
    from engine_commands_harness import FAST

    from runkit.engine.cluster.membership import Membership
    from runkit.engine.cluster.nodes import list_nodes
    from runkit.engine.engine import Engine
    from runkit.engine.settings import EngineSettings

    s = setup()
    inner = MemoryProvider(f"nodes-{uuid.uuid4()}")

    def node(node_id: uuid.UUID) -> Engine:
        settings = EngineSettings(
            applications=(s.config,),
            persistence_provider=MemoryProvider(inner.silo),
            node_id=node_id,
            # Not shorter: a loaded CI machine stalls a loop for 100 ms and nodes flap.
            heartbeat_interval=0.2,
            **{**FAST, "partition_count": 8},  # type: ignore[arg-type]
        )
        engine = Engine.from_settings(settings)
        engine.use_ownership(
            lambda provider: Membership(provider, settings, progress=engine.progress)
        )
        return engine

    one, two = map(node, splitting_node_ids(8))
    async with anyio.create_task_group() as tg:
        scope_two = anyio.CancelScope()

        async def run_two() -> None:
            with scope_two:
                await two.run()

        tg.start_soon(one.run)
        tg.start_soon(run_two)
        executors = [one.executor_for(s.app), two.executor_for(s.app)]
        for i in range(40):
            await _execute_until_accepted(
                executors[i % 2], Deposit(f"a{i % 6}", 1, f"r{i}"), f"d{i}"
            )
        await wait_until(lambda: {ref for _, ref, _ in s.accounts.calls} >= refs(40), timeout=30)
        rt_one, rt_two = await one.runtime(APP_KEY), await two.runtime(APP_KEY)
        # Rendezvous split the partitions between the two live nodes (once each
        # has seen the other: until then one may run all of them).
        await wait_until(
            lambda: (
                len(rt_one.partitions) + len(rt_two.partitions) == 8
                and bool(rt_one.partitions)
                and bool(rt_two.partitions)
            )
        )
        # Node two leaves: node one takes its partitions and handles what follows.
        scope_two.cancel()
        for i in range(40, 60):
            await _execute_until_accepted(executors[0], Deposit(f"a{i % 6}", 1, f"r{i}"), f"d{i}")
        stores = await settled(inner, timeout=30)
        # Node one takes every partition (at its next heartbeat read; a loaded
        # machine may have settled the stores first).
        await wait_until(lambda: len(rt_one.partitions) == 8, timeout=30)
        progress = one.progress()[APP_KEY]
        assert sum(p["stream_end"] for p in progress.values()) == 60
        assert all(p["pending"] == 0 for p in progress.values())
        published = {n.node_id: n.progress for n in await list_nodes(inner)}
        assert published[one.settings.node_id]  # heartbeats carry it
        tg.cancel_scope.cancel()
    check_invariants(stores)
    assert {ref for _, ref, _ in s.accounts.calls} == refs(60)


def refs(n: int) -> set[str]:
    return {f"r{i}" for i in range(n)}
