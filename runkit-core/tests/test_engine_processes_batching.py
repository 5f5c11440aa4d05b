"""Process instance commits (ADR 0006): the cache, one write per group, the folded outbox clear.

Store operations are counted per store by a ``FaultPlan`` that also records
which store each call went to (``FaultyProvider`` asks the plan about every
call, reads included). Real streams and the memory driver, as in
``test_engine_processes``; the commands side is the harness's ``accept``.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import attrs
import msgspec
import pytest

import dogma
from runkit.engine.envelope import Envelope
from runkit.engine.events.consumers import ConsumerOptions, EventConsumers, partition_consumers
from runkit.engine.events.deadlines import deadline_journal_name
from runkit.engine.events.process_instances import CachedInstance, InstanceCache, ProcessRecord
from runkit.engine.events.process_stores import process_store_name
from runkit.engine.partitions import instance_workload, partition_of
from runkit.testing.faults import AFTER, BEFORE, FaultPlan, FaultyProvider, Timing

sys.path.insert(0, str(Path(__file__).parent))
from engine_events_harness import (
    CommandSink,
    Harness,
    adr0006_only,
    harness,
    start_partition,
    wait_until,
)

REGISTRY = dogma.MessageTypeRegistry()
APP_KEY = "a6000000-0000-4000-8000-000000000001"
PROC_KEY = "b6000000-0000-4000-8000-000000000001"
PROCESS_STORE = process_store_name(APP_KEY, PROC_KEY)
# No background clears unless a test asks for them: write counts stay exact.
QUIET = ConsumerOptions(
    retry_initial=0.001,
    retry_max=0.005,
    max_attempts=3,
    checkpoint_interval=3600,
    deadline_rescan_interval=0.01,
)
BRISK = attrs.evolve(QUIET, checkpoint_interval=0.01)


@dogma.register_event("e6000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Step(dogma.Event):
    id: str
    n: int
    end: bool = False  # execute the command, then end the instance
    fail_once: bool = False  # raise on the first attempt only
    schedule_in: float | None = None  # schedule a Tick this many seconds after now()


@dogma.register_command("c6000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class DoThing(dogma.Command):
    id: str
    n: int


@dogma.register_deadline("d6000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Tick(dogma.Deadline):
    id: str
    n: int


@dogma.register_event("e6000000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class DidThing(dogma.Event):
    id: str


@attrs.define
class Root:
    steps: list[int] = attrs.field(factory=list)

    def process_instance_description(self, ended: bool) -> str:
        return f"steps {self.steps}"

    def marshal_binary(self) -> bytes:
        return json.dumps(self.steps).encode()

    def unmarshal_binary(self, data: bytes) -> None:
        self.steps = json.loads(data)


class Process:
    """Routes by ``id``; appends ``n`` to the root and executes ``DoThing(id, n)``."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, int]] = Counter()  # handle_event calls per (id, n)
        self.failed: set[tuple[str, int]] = set()
        self.deadlines: list[tuple[str, int]] = []

    def configure(self, c: Any) -> None:
        c.identity("proc", PROC_KEY)
        c.routes(
            dogma.handles_event(Step, registry=REGISTRY),
            dogma.executes_command(DoThing, registry=REGISTRY),
            dogma.schedules_deadline(Tick, registry=REGISTRY),
        )

    def new(self) -> Root:
        return Root()

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        assert isinstance(event, Step)
        return event.id

    async def handle_event(
        self, root: Root, scope: dogma.ProcessEventScope[Root], event: dogma.Event
    ) -> None:
        assert isinstance(event, Step)
        self.calls[event.id, event.n] += 1
        n = event.n
        scope.mutate(lambda r: r.steps.append(n))
        if event.fail_once and (event.id, n) not in self.failed:
            self.failed.add((event.id, n))
            raise RuntimeError(f"first attempt at {n} fails")
        scope.execute_command(DoThing(event.id, n))
        if event.schedule_in is not None:
            at = scope.now() + timedelta(seconds=event.schedule_in)
            scope.schedule_deadline(Tick(event.id, n), at)
        if event.end:
            scope.end()

    async def handle_deadline(
        self, root: Root, scope: dogma.ProcessDeadlineScope[Root], deadline: dogma.Deadline
    ) -> None:
        assert isinstance(deadline, Tick)
        self.deadlines.append((deadline.id, deadline.n))
        n = 1000 + deadline.n
        scope.mutate(lambda r: r.steps.append(n))
        scope.execute_command(DoThing(deadline.id, n))


@attrs.frozen
class App:
    process: Process

    def configure(self, c: Any) -> None:
        c.identity("app", APP_KEY)
        c.routes(
            dogma.via_process(self.process),
            dogma.via_aggregate(
                CommandSink("b6000000-0000-4000-8000-000000000002", DoThing, DidThing, REGISTRY)
            ),
        )


class CountingPlan(FaultPlan):
    """A fault plan that also counts every call per (operation, store name)."""

    def __init__(self) -> None:
        super().__init__(seed=1)
        self.by_store: Counter[tuple[str, str]] = Counter()

    def decide(self, op: str, kind: str, name: str) -> Timing | None:
        self.by_store[op, name] += 1
        return super().decide(op, kind, name)

    def process_ops(self, op: str) -> int:
        return self.by_store[op, PROCESS_STORE]

    def reset(self) -> None:
        self.by_store.clear()


async def start(
    h: Harness,
    tg: Any,
    plan: FaultPlan,
    *,
    options: ConsumerOptions = QUIET,
    partitions: Sequence[int] | None = None,
) -> EventConsumers:
    consumers = partition_consumers(h.app, h.settings, options=options)
    provider = FaultyProvider(h.provider, plan)
    for i in range(h.partitions) if partitions is None else partitions:
        await start_partition(consumers, h, i, tg, provider)
    return consumers


async def record(h: Harness, instance: str) -> ProcessRecord:
    async with await h.provider.keyspaces.open(PROCESS_STORE) as ks:
        data, _ = await ks.get(instance.encode())
    assert data, f"no record for {instance!r}"
    return msgspec.msgpack.decode(data, type=ProcessRecord)


def commands(envelopes: Sequence[Envelope]) -> list[tuple[str, int]]:
    return sorted((json.loads(e.data)["id"], json.loads(e.data)["n"]) for e in envelopes)


def outbox(r: ProcessRecord) -> list[tuple[str, int]]:
    return commands([msgspec.msgpack.decode(c, type=Envelope) for c in r.commands])


class AcceptLog:
    """Records every envelope the commands side was asked to accept (duplicates too)."""

    def __init__(self) -> None:
        self.offered: list[str] = []
        self.refuse = False

    def __call__(self, envelopes: Sequence[Envelope]) -> None:
        if self.refuse:
            raise ConnectionError("the commands side is unreachable")
        self.offered.extend(e.message_id for e in envelopes)


async def test_a_cached_instance_handles_an_event_without_reading_its_record() -> None:
    p = Process()
    plan = CountingPlan()
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        await start(h, tg, plan)
        await h.publish(Step("a", 1))
        await wait_until(lambda: len(h.accepted) == 1)
        assert plan.process_ops("get") == 1  # the first event: a cache miss
        plan.reset()
        await h.publish(Step("a", 2))
        await h.publish(Step("a", 3), partition=1)  # another partition of this node
        await wait_until(lambda: len(h.accepted) == 3)
        assert plan.process_ops("get") == 0
        assert plan.process_ops("set") == 2
        r = await record(h, "a")
        assert json.loads(r.root or b"") == [1, 2, 3]
        tg.cancel_scope.cancel()


@adr0006_only
async def test_events_of_one_instance_in_one_stream_record_are_committed_with_one_write() -> None:
    p = Process()
    plan = CountingPlan()
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        await start(h, tg, plan)
        await h.publish(*(Step("a", n) for n in range(5)), Step("b", 9), partition=0)
        await wait_until(lambda: len(h.accepted) == 6)
        assert plan.process_ops("set") == 2  # one per instance
        assert plan.process_ops("get") == 2  # cache misses
        r = await record(h, "a")
        assert json.loads(r.root or b"") == [0, 1, 2, 3, 4]
        assert r.positions == {h.streams[0].stream_id: 4}
        assert outbox(r) == [("a", n) for n in range(5)]  # the whole group's commands
        assert set(p.calls.values()) == {1}
        # And again, now that the instance is cached: one write, no read.
        plan.reset()
        await h.publish(*(Step("a", n) for n in range(5, 8)), partition=0)
        await wait_until(lambda: len(h.accepted) == 9)
        assert (plan.process_ops("get"), plan.process_ops("set")) == (0, 1)
        tg.cancel_scope.cancel()


@adr0006_only
async def test_the_dispatched_outbox_is_dropped_by_the_next_commit_not_by_its_own_write() -> None:
    p = Process()
    plan = CountingPlan()
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        await start(h, tg, plan)
        await h.publish(Step("a", 1))
        await wait_until(lambda: len(h.accepted) == 1)
        await anyio.sleep(0.02)
        assert plan.process_ops("set") == 1  # no write just to clear the outbox
        assert outbox(await record(h, "a")) == [("a", 1)]  # dispatched, still stored
        await h.publish(Step("a", 2))
        await wait_until(lambda: len(h.accepted) == 2)
        assert plan.process_ops("set") == 2
        assert outbox(await record(h, "a")) == [("a", 2)]  # only the new one
        tg.cancel_scope.cancel()


@adr0006_only
async def test_an_idle_or_ended_instance_has_its_outbox_cleared_once() -> None:
    p = Process()
    plan = CountingPlan()
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        await start(h, tg, plan, options=BRISK)
        await h.publish(Step("a", 1, end=True), Step("b", 2))
        await wait_until(lambda: len(h.accepted) == 2)

        async def cleared() -> bool:
            return not (await record(h, "a")).has_outbox and not (await record(h, "b")).has_outbox

        await wait_until(cleared)
        await anyio.sleep(0.05)  # several intervals: nothing more to write
        assert plan.process_ops("set") == 4  # a commit and a clear each
        assert plan.process_ops("get") == 2
        r = await record(h, "a")
        assert r.ended
        assert commands(h.accepted) == [("a", 1), ("b", 2)]
        tg.cancel_scope.cancel()


@adr0006_only
@pytest.mark.parametrize("timing", [BEFORE, AFTER], ids=["not-written", "written"])
async def test_a_stopping_consumer_retries_a_failed_clear(timing: Timing) -> None:
    # The partition stops (lost, or restarted after a conflict) while an idle
    # instance's record still holds its dispatched outbox. The entry is
    # dropped next, so the clear must not give up on its first failed write:
    # nobody else would clear the record until the instance is loaded again.
    p = Process()
    plan = CountingPlan()
    plan.fail(timing, ops={"set"}, names=lambda n: n == PROCESS_STORE, nth=2)
    async with harness(App(p), registry=REGISTRY) as h:
        async with anyio.create_task_group() as tg:
            await start(h, tg, plan)  # QUIET: no periodic clears
            await h.publish(Step("a", 1))
            await wait_until(lambda: len(h.accepted) == 1)
            assert (await record(h, "a")).has_outbox
            tg.cancel_scope.cancel()
        assert len(plan.injected) == 1  # the first clear failed
        assert not (await record(h, "a")).has_outbox
        assert len(h.accepted) == 1


async def test_a_commit_whose_response_is_lost_is_dispatched_once() -> None:
    # The record write lands, then fails: the retry reads the record back,
    # finds the event handled and dispatches the outbox (once).
    p = Process()
    plan = CountingPlan()
    plan.fail(AFTER, ops={"set"}, names=lambda n: n == PROCESS_STORE, nth=1)
    log = AcceptLog()
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        h.accept_fault = log
        [cause] = await h.publish(Step("a", 1))
        await start(h, tg, plan)
        await wait_until(lambda: len(h.accepted) == 1)
        await anyio.sleep(0.02)
        assert len(plan.injected) == 1
        assert len(log.offered) == 1
        assert p.calls["a", 1] == 1  # not handled again: the record says it was
        assert log.offered == [h.accepted[0].message_id]
        assert h.accepted[0].causation_id == cause.message_id
        tg.cancel_scope.cancel()


@adr0006_only
async def test_a_crash_between_commit_and_dispatch_dispatches_once_after_restart() -> None:
    p = Process()
    log = AcceptLog()
    async with harness(App(p), registry=REGISTRY) as h:
        h.accept_fault = log
        log.refuse = True  # every dispatch fails until the "crash"
        async with anyio.create_task_group() as tg:
            await start(h, tg, CountingPlan())
            await h.publish(Step("a", 1, schedule_in=5))
            await wait_until(lambda: h.accept_calls >= 1)
            r = await record(h, "a")
            assert outbox(r) == [("a", 1)]  # committed, not dispatched
            assert len(r.deadlines) == 1
            tg.cancel_scope.cancel()  # the node dies
        assert h.accepted == []
        # The deadline went to its journal first, once, however often the commands failed.
        home = partition_of(instance_workload(PROC_KEY, "a"), h.partitions)
        async with await h.provider.journals.open(deadline_journal_name(APP_KEY, home)) as j:
            assert (await j.bounds()).end == 1
        log.refuse = False
        async with anyio.create_task_group() as tg:
            await start(h, tg, CountingPlan())  # a new node: empty cache
            await wait_until(lambda: len(h.accepted) == 1)
            h.clock.advance(10)
            await wait_until(lambda: len(h.accepted) == 2)
            await anyio.sleep(0.03)
            tg.cancel_scope.cancel()
        assert p.calls["a", 1] == 1  # redelivered, skipped, outbox dispatched
        assert len(log.offered) == len(set(log.offered)) == 2
        assert commands(h.accepted) == [("a", 1), ("a", 1001)]
        assert p.deadlines == [("a", 1)]


@adr0006_only
async def test_a_conflict_drops_the_cache_and_handles_again_against_the_stored_record() -> None:
    # Two nodes: node 1 consumes partition 0, node 2 partition 1. Instance
    # "a" gets events from both, so node 1's cached record goes stale.
    p = Process()
    plan1, plan2 = CountingPlan(), CountingPlan()
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        await start(h, tg, plan1, partitions=[0])
        await start(h, tg, plan2, partitions=[1])
        await h.publish(Step("a", 1), partition=0)
        await wait_until(lambda: len(h.accepted) == 1)
        await h.publish(Step("a", 2), partition=1)
        await wait_until(lambda: len(h.accepted) == 2)
        plan1.reset()
        await h.publish(Step("a", 3), partition=0)
        await wait_until(lambda: len(h.accepted) == 3)
        assert plan1.process_ops("set") == 2  # the stale one (Conflict), then the commit
        assert plan1.process_ops("get") == 1  # the reload
        assert p.calls["a", 3] == 2  # handled again, committed once
        r = await record(h, "a")
        assert json.loads(r.root or b"") == [1, 2, 3]
        assert commands(h.accepted) == [("a", 1), ("a", 2), ("a", 3)]
        tg.cancel_scope.cancel()


@adr0006_only
async def test_a_deadline_scheduled_by_another_node_is_not_skipped_by_a_stale_cache() -> None:
    p = Process()
    # An instance whose deadlines live in partition 0, which node 1 runs.
    instance = next(
        f"i{k}" for k in range(100) if partition_of(instance_workload(PROC_KEY, f"i{k}"), 2) == 0
    )
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        await start(h, tg, CountingPlan(), partitions=[0])
        await start(h, tg, CountingPlan(), partitions=[1])
        await h.publish(Step(instance, 1), partition=0)  # node 1 caches it
        await wait_until(lambda: len(h.accepted) == 1)
        await h.publish(Step(instance, 2, schedule_in=5), partition=1)  # node 2 schedules
        await wait_until(lambda: len(h.accepted) == 2)
        h.clock.advance(10)
        await wait_until(lambda: len(h.accepted) == 3)
        assert p.deadlines == [(instance, 2)]
        r = await record(h, instance)
        assert json.loads(r.root or b"") == [1, 2, 1002]
        assert r.pending_deadlines == []
        tg.cancel_scope.cancel()


@adr0006_only
async def test_a_failing_event_in_a_group_is_retried_alone_and_the_others_commit() -> None:
    p = Process()
    plan = CountingPlan()
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        await start(h, tg, plan)
        await h.publish(Step("a", 1), Step("a", 2, fail_once=True), Step("a", 3), Step("a", 4))
        await wait_until(lambda: len(h.accepted) == 4)
        r = await record(h, "a")
        assert json.loads(r.root or b"") == [1, 2, 3, 4]
        assert commands(h.accepted) == [("a", n) for n in range(1, 5)]
        # The failure counted as the event's first attempt; the event before it
        # was handled again for its own commit, the ones after as one group.
        assert p.calls == Counter({("a", 1): 2, ("a", 2): 2, ("a", 3): 1, ("a", 4): 1})
        assert plan.process_ops("set") == 3
        tg.cancel_scope.cancel()


async def test_the_cache_is_bounded_and_an_evicted_instance_is_read_again() -> None:
    p = Process()
    plan = CountingPlan()
    options = attrs.evolve(BRISK, process_cache_size=1)
    async with (
        harness(App(p), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await start(h, tg, plan, options=options)

        async def handled(instance: str, n: int) -> None:
            async def cleared() -> bool:
                async with await h.provider.keyspaces.open(PROCESS_STORE) as ks:
                    data, _ = await ks.get(instance.encode())
                if not data:
                    return False
                r = msgspec.msgpack.decode(data, type=ProcessRecord)
                return r.positions.get(h.streams[0].stream_id) == n and not r.has_outbox

            await h.publish(Step(instance, n))
            await wait_until(cleared)  # clean: it may be evicted (dirty ones are kept)

        for n, instance in enumerate(["a", "b", "a", "b"]):
            await handled(instance, n)
        assert plan.process_ops("get") == 4  # each evicted the other
        await handled("b", 4)
        assert plan.process_ops("get") == 4  # b is the one cached
        assert json.loads((await record(h, "a")).root or b"") == [0, 2]
        tg.cancel_scope.cancel()


# --- the cache itself -------------------------------------------------------------------


def _entry(partition: int = 0, *, dirty: bool = False) -> CachedInstance:
    return CachedInstance(ProcessRecord(), "r1", Root(), partition, 1.0 if dirty else None)


def test_the_cache_evicts_the_least_recently_used_clean_entries() -> None:
    cache = InstanceCache(2)
    cache.put("a", _entry(dirty=True))
    cache.put("b", _entry())
    cache.put("c", _entry())
    assert cache.get("b") is None  # "a" is dirty: kept until cleared
    assert cache.get("a") is not None
    cache.put("d", _entry())
    assert cache.get("c") is None
    assert len(cache) == 2


def test_the_cache_forgets_a_partition_and_lists_due_clears() -> None:
    cache = InstanceCache(10)
    cache.put("a", _entry(0, dirty=True))
    cache.put("b", _entry(1, dirty=True))
    cache.put("c", _entry(0))
    assert cache.due_clears(0, 2.0) == ["a"]
    assert cache.due_clears(0, 0.5) == []
    cache.drop_partition(0)
    assert cache.get("a") is None
    assert cache.get("c") is None
    assert cache.get("b") is not None


def test_the_cache_keeps_each_partitions_dirty_entries_and_their_hold_floor() -> None:
    cache = InstanceCache(10)
    cache.put("a", attrs.evolve(_entry(0, dirty=True), held=7))
    cache.put("b", attrs.evolve(_entry(0, dirty=True), held=3))
    cache.put("c", attrs.evolve(_entry(1, dirty=True), held=1))
    cache.put("d", _entry(0, dirty=True))  # a deadline's: holds no stream offset
    assert cache.hold_floor(0) == 3
    assert cache.hold_floor(1) == 1
    cache.put("b", _entry(0))  # cleared
    assert cache.hold_floor(0) == 7
    cache.put("a", attrs.evolve(_entry(1, dirty=True), held=0))  # written through partition 1
    assert cache.hold_floor(0) is None
    assert sorted(cache.due_clears(1, 2.0)) == ["a", "c"]
    assert cache.due_clears(0, 2.0) == ["d"]
    cache.drop("c")
    assert cache.hold_floor(1) == 0
    cache.drop_partition(1)
    assert cache.hold_floor(1) is None
    assert cache.due_clears(1, 2.0) == []


async def test_the_cache_lock_serialises_one_instance_only() -> None:
    cache = InstanceCache(10)
    order: list[str] = []
    release_x1 = anyio.Event()

    async def hold(instance: str, label: str, release: anyio.Event | None = None) -> None:
        async with cache.lock(instance):
            order.append(f"{label}+")
            if release is not None:
                await release.wait()
            order.append(f"{label}-")

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold, "x", "x1", release_x1)
        await wait_until(lambda: cache.busy("x"))
        tg.start_soon(hold, "x", "x2")
        tg.start_soon(hold, "y", "y1")
        await wait_until(lambda: "y1-" in order)
        await anyio.sleep(0.05)  # x2 would have run by now
        assert order == ["x1+", "y1+", "y1-"]
        release_x1.set()
    assert order[-3:] == ["x1-", "x2+", "x2-"]
    assert not cache.busy("x")


async def test_a_cancelled_waiter_for_an_instance_neither_holds_nor_blocks_it() -> None:
    cache = InstanceCache(10)
    order: list[str] = []
    handed = anyio.CancelScope()
    holding, release = anyio.Event(), anyio.Event()

    async def hold(label: str) -> None:
        async with cache.lock("x"):
            order.append(label)

    async def first() -> None:
        async with cache.lock("x"):
            order.append("first")
            holding.set()
            await release.wait()
            # The next waiter is cancelled as the instance is handed to it:
            # it must pass the instance on, not keep it.
            handed.cancel()

    async def cancelled_at_hand_off() -> None:
        with handed:
            await hold("handed")

    async def waiters(n: int) -> None:
        while len(cache._locks["x"]) < n:  # noqa: ASYNC110 (polling the private queue)
            await anyio.sleep(0.001)

    with anyio.fail_after(5):  # a waiter keeping the instance would hang "last"
        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await holding.wait()
            with anyio.CancelScope() as waiting:
                waiting.cancel()  # cancelled while waiting: leaves the queue
                await hold("never")
            tg.start_soon(cancelled_at_hand_off)
            await waiters(1)
            tg.start_soon(hold, "last")
            await waiters(2)
            release.set()
    assert order == ["first", "last"]
    assert not cache.busy("x")


async def test_taking_a_free_instance_does_not_yield() -> None:
    cache = InstanceCache(10)
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        async with cache.lock("x"):
            assert ran == []  # nothing else ran: no checkpoint on the fast path
        await anyio.lowlevel.checkpoint()
    assert ran == ["other"]
