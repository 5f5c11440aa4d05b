"""Process instances on their home partitions: the cache of instances, store operations.

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

import dogma
from runkit.engine.envelope import Envelope
from runkit.engine.events.consumers import ConsumerOptions, EventConsumers, partition_consumers
from runkit.engine.events.process_instances import ProcessRecord
from runkit.engine.events.process_stores import process_store_name
from runkit.testing.faults import AFTER, FaultPlan, FaultyProvider, Timing

sys.path.insert(0, str(Path(__file__).parent))
from engine_events_harness import (
    CommandSink,
    Harness,
    harness,
    start_partition,
    wait_until,
)

REGISTRY = dogma.MessageTypeRegistry()
APP_KEY = "a6000000-0000-4000-8000-000000000001"
PROC_KEY = "b6000000-0000-4000-8000-000000000001"
PROCESS_STORE = process_store_name(APP_KEY, PROC_KEY)
# Checkpoints saved rarely unless a test asks for them: store counts stay exact.
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


async def test_a_commit_whose_response_is_lost_is_dispatched_once() -> None:
    # The instance record's write lands, then fails (the record is derived
    # from the committed step): the step's outbox is dispatched once and the
    # event is not handled again.
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
