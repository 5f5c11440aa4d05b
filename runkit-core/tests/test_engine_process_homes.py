"""ADR 0010: ``HomeSteps`` handles the deliveries of instances homed on its partition.

Driven directly (no engine, no consumer): deliveries are submitted as a
consumer of another partition's stream would, and the home partition's real
stream writer (memory driver) commits the steps. The harness's ``accept``
records produced commands, deduplicating by ID as the commands side does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import anyio
import attrs
import msgspec
import pytest

import dogma
from runkit.engine.envelope import Envelope, decode
from runkit.engine.events.consumers import ConsumerOptions
from runkit.engine.events.consumers_support import ConsumerCheckpoint
from runkit.engine.events.process_deliveries import Delivery
from runkit.engine.events.process_homes import HomeSteps
from runkit.engine.events.process_instances import ProcessRecord
from runkit.engine.events.process_records import ProcessRecords
from runkit.engine.events.process_routing import InFlight, _Sender
from runkit.engine.events.process_state import InstanceState
from runkit.engine.events.process_stores import list_poisoned_events
from runkit.engine.events.processes import ProcessRunner
from runkit.engine.streams import (
    EventBus,
    PartitionStream,
    ProcessStep,
    Publication,
    StreamWriter,
    decode_stream_record,
    read_tail,
)
from runkit.persistence import Journal

sys.path.insert(0, str(Path(__file__).parent))
from engine_events_harness import CommandSink, Harness, harness, wait_until

pytestmark = pytest.mark.anyio

REGISTRY = dogma.MessageTypeRegistry()
APP_KEY = "a3000000-0000-4000-8000-000000000001"
PROC_KEY = "b3000000-0000-4000-8000-000000000001"
OPTIONS = ConsumerOptions(
    retry_initial=0.001,
    retry_max=0.005,
    max_attempts=3,
    checkpoint_interval=0.01,
    deadline_rescan_interval=0.01,
)


@dogma.register_event("e3000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Moved(dogma.Event):
    id: str
    n: int
    fail: str | None = None  # "always", "once", "end"


@dogma.register_command("c3000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Act(dogma.Command):
    id: str
    n: int


@dogma.register_event("e3000000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class Acted(dogma.Event):
    id: str


@attrs.define
class Root:
    seen: list[int] = attrs.field(factory=list)

    def process_instance_description(self, ended: bool) -> str:
        return f"seen {self.seen}"

    def marshal_binary(self) -> bytes:
        return json.dumps(self.seen).encode()

    def unmarshal_binary(self, data: bytes) -> None:
        self.seen = json.loads(data)


class Process:
    def __init__(self) -> None:
        self.calls: list[int] = []
        self.failed: set[int] = set()

    def configure(self, c: Any) -> None:
        c.identity("homed", PROC_KEY)
        c.routes(
            dogma.handles_event(Moved, registry=REGISTRY),
            dogma.executes_command(Act, registry=REGISTRY),
        )

    def new(self) -> Root:
        return Root()

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        assert isinstance(event, Moved)
        return event.id

    async def handle_event(
        self, root: Root, scope: dogma.ProcessEventScope[Root], event: dogma.Event
    ) -> None:
        assert isinstance(event, Moved)
        self.calls.append(event.n)
        n = event.n
        scope.mutate(lambda r: r.seen.append(n))  # before failing: the root changes in place
        if event.fail == "always" or (event.fail == "once" and n not in self.failed):
            self.failed.add(n)
            raise RuntimeError(f"failure {n}")
        scope.execute_command(Act(event.id, n))
        if event.fail == "end":
            scope.end()

    async def handle_deadline(self, root: Root, scope: Any, deadline: dogma.Deadline) -> None:
        raise AssertionError("no deadlines here")


@attrs.frozen
class App:
    process: Process

    def configure(self, c: Any) -> None:
        c.identity("app", APP_KEY)
        c.routes(
            dogma.via_process(self.process),
            dogma.via_aggregate(
                CommandSink("b3000000-0000-4000-8000-000000000002", Act, Acted, REGISTRY)
            ),
        )


@attrs.define
class Acks:
    done: dict[str, BaseException | None] = attrs.field(factory=dict)

    def ack(self, delivery: Delivery) -> Any:
        def ack(error: BaseException | None) -> None:
            assert delivery.id not in self.done, "acknowledged twice"
            self.done[delivery.id] = error

        return ack


@attrs.define
class Home:
    h: Harness
    steps: HomeSteps
    runner: ProcessRunner
    acks: Acks
    loads: list[str]

    def submit(self, *deliveries: Delivery) -> None:
        for d in deliveries:
            self.steps.submit(d, self.acks.ack(d))

    async def records(self) -> list[tuple[int, ProcessStep]]:
        journal = self.h.streams[0].journal
        end = (await journal.bounds()).end
        out: list[tuple[int, ProcessStep]] = []
        for position in range(end):
            record = decode_stream_record(await journal.get(position))
            out.extend((position, s) for s in record.steps)
        return out


@asynccontextmanager
async def home(process: Process, state: InstanceState | None = None) -> AsyncIterator[Home]:
    async with harness(App(process), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        config = h.app.handler_by_key(PROC_KEY)
        assert config is not None
        runner = ProcessRunner(h.app, config, options=OPTIONS, wake_timer=lambda _: None)
        loads: list[str] = []

        async def load(handler_key: str, instance_id: str) -> InstanceState:
            loads.append(instance_id)
            return state or InstanceState()

        steps = HomeSteps(
            h.ctx(0),
            h.writers[0],
            {PROC_KEY: runner},
            load=load,
            options=OPTIONS,
            record_limit=1 << 20,
            stream_partitions={h.streams[i].stream_id: i for i in range(h.partitions)},
        )
        await tg.start(steps.run)
        yield Home(h, steps, runner, Acks(), loads)
        tg.cancel_scope.cancel()


async def deliveries(h: Harness, *events: Moved, partition: int = 1) -> list[Delivery]:
    """Publish *events* on *partition* and make their deliveries, as its consumer would."""
    envelopes: list[Envelope] = await h.publish(*events, partition=partition)
    stream = h.streams[partition]
    first = h.writers[partition].next_offset - len(envelopes)
    return [
        Delivery.of_event(
            PROC_KEY,
            e.id,
            env,
            stream_id=stream.stream_id,
            offset=first + i,
            recorded_at=env.created_at,
        )
        for i, (e, env) in enumerate(zip(events, envelopes, strict=True))
    ]


def acted(h: Harness) -> list[tuple[str, int]]:
    return sorted((json.loads(e.data)["id"], json.loads(e.data)["n"]) for e in h.accepted)


async def test_a_group_commits_in_the_home_stream_and_is_acknowledged_once_durable() -> None:
    p = Process()
    async with home(p) as t:
        ds = await deliveries(t.h, Moved("a", 1), Moved("a", 2), Moved("b", 3))
        t.submit(*ds)
        await wait_until(lambda: len(t.acks.done) == 3)
        assert all(error is None for error in t.acks.done.values())
        steps = await t.records()
        by_instance: dict[str, list[ProcessStep]] = {}
        for _, s in steps:
            by_instance.setdefault(s.instance_id, []).append(s)
        # Every delivery is in a committed step; a's two are in at most two steps.
        committed = {d for s in (s for _, s in steps) for d in s.deliveries}
        assert committed == {d.id for d in ds}
        assert json.loads(by_instance["a"][-1].root or b"") == [1, 2]
        assert dict(by_instance["b"][-1].positions) == {ds[2].stream[0]: ds[2].stream[1]}  # type: ignore[index]
        # Outboxes go out after the commit, with IDs derived from the cause.
        await wait_until(lambda: len(t.h.accepted) == 3)
        assert acted(t.h) == [("a", 1), ("a", 2), ("b", 3)]
        assert t.steps.dispatched(100) == 100
        assert sorted(t.loads) == ["a", "b"]  # one load per instance, then cached
        assert t.steps.cached(PROC_KEY, "a") is not None


async def test_redelivery_is_skipped_by_the_committed_position() -> None:
    # A crash between h's commit and p's checkpoint delivers again.
    p = Process()
    async with home(p) as t:
        ds = await deliveries(t.h, Moved("a", 1), Moved("a", 2))
        t.submit(*ds)
        await wait_until(lambda: len(t.acks.done) == 2)
        before = len(await t.records())
        again = [attrs.evolve(d, at=d.at) for d in ds]
        t.acks.done.clear()
        t.submit(*again)
        await wait_until(lambda: len(t.acks.done) == 2)
        assert p.calls == [1, 2]
        assert len(await t.records()) == before  # nothing new to commit
        assert acted(t.h) == [("a", 1), ("a", 2)]


async def test_redelivery_to_a_new_owner_is_skipped_by_the_loaded_state() -> None:
    p = Process()
    async with harness(App(p), registry=REGISTRY) as h0:
        ds = await deliveries(h0, Moved("a", 1))
    stream_id, offset = ds[0].stream  # type: ignore[misc]
    state = InstanceState(root=b"[1]", positions={stream_id: offset})
    async with home(p, state) as t:
        t.submit(*ds)
        await wait_until(lambda: len(t.acks.done) == 1)
        assert p.calls == []  # the loaded state says it is handled
        assert await t.records() == []


async def test_an_ended_instance_handles_nothing_more() -> None:
    p = Process()
    async with home(p) as t:
        ds = await deliveries(t.h, Moved("a", 1, fail="end"), Moved("a", 2))
        t.submit(*ds)
        await wait_until(lambda: len(t.acks.done) == 2)
        steps = [s for _, s in await t.records()]
        assert steps[-1].ended
        assert p.calls == [1]
        state = t.steps.cached(PROC_KEY, "a")
        assert state is not None
        assert state.ended
        assert state.root is None


async def test_a_handler_failure_in_a_group_is_retried_alone_and_the_rest_commit() -> None:
    p = Process()
    async with home(p) as t:
        ds = await deliveries(t.h, Moved("a", 1), Moved("a", 2, fail="once"), Moved("a", 3))
        t.submit(*ds)
        await wait_until(lambda: len(t.acks.done) == 3)
        state = t.steps.cached(PROC_KEY, "a")
        assert state is not None
        # The failed attempt's in-place change of the root did not leak.
        assert json.loads(state.root or b"") == [1, 2, 3]
        await wait_until(lambda: len(t.h.accepted) == 3)
        assert acted(t.h) == [("a", 1), ("a", 2), ("a", 3)]


async def test_a_delivery_that_always_fails_is_poisoned_alone_and_its_position_committed() -> None:
    p = Process()
    async with home(p) as t:
        ds = await deliveries(t.h, Moved("a", 1), Moved("a", 2, fail="always"), Moved("b", 3))
        t.submit(*ds)
        await wait_until(lambda: len(t.acks.done) == 3, timeout=10)
        assert all(error is None for error in t.acks.done.values())
        steps = [s for _, s in await t.records()]
        poisoned = [s for s in steps if s.poisoned]
        assert [s.deliveries for s in poisoned] == [(ds[1].id,)]
        state = t.steps.cached(PROC_KEY, "a")
        assert state is not None
        assert json.loads(state.root or b"") == [1]
        assert state.done(ds[1])
        # Recorded in the poison store of the partition whose stream holds it.
        stored = await list_poisoned_events(t.h.provider, APP_KEY, 1)
        assert list(stored) == [f"{PROC_KEY}/event/{ds[1].stream[0]}/{ds[1].stream[1]}"]  # type: ignore[index]
        assert p.calls.count(2) == OPTIONS.max_attempts
        assert acted(t.h) == [("a", 1), ("b", 3)]


async def test_a_stopped_home_refuses_deliveries_and_fails_those_queued() -> None:
    p = Process()
    async with home(p) as t:
        ds = await deliveries(t.h, Moved("a", 1))
        t.steps.close(RuntimeError("stopped"))
        with pytest.raises(Exception, match="not running"):
            t.submit(*ds)


# -- takeover: derived records behind the stream, outboxes re-dispatched -------------------


@attrs.define
class Owner:
    """One owner of home partition 0 on its own stream journal, wired as an owned partition."""

    steps: HomeSteps
    records: ProcessRecords
    writer: StreamWriter
    journal: Journal


@asynccontextmanager
async def owner(
    h: Harness, process: Process, tg_outer: Any, *, delay: float = 60.0
) -> AsyncIterator[Owner]:
    journal = await h.provider.journals.open(f"{APP_KEY}/home-stream")
    tail = await read_tail(journal)
    config = h.app.handler_by_key(PROC_KEY)
    assert config is not None
    runner = ProcessRunner(h.app, config, options=OPTIONS, wake_timer=lambda _: None)
    records = ProcessRecords(h.provider, APP_KEY, delay=delay, retry_max_delay=0.01)
    parts: dict[str, Any] = {}

    class Late:
        def enqueue_step(self, step: ProcessStep, on_durable: Any = None) -> Publication:
            return cast(StreamWriter, parts["writer"]).enqueue_step(step, on_durable)

    steps = HomeSteps(
        h.ctx(0),
        Late(),
        {PROC_KEY: runner},
        load=records.load,
        options=OPTIONS,
        record_limit=1 << 20,
        committed=records.committed,
    )
    for outbox in await records.recover_from(
        journal,
        materialised=tail.next_position if tail.materialised is None else tail.materialised,
        dispatched=tail.dispatched,
        end=tail.next_position,
    ):
        steps.redispatch(outbox.position, outbox.step)
    writer = parts["writer"] = StreamWriter(
        journal,
        PartitionStream("home", journal, next_offset=tail.next_offset),
        EventBus(),
        tail,
        clock=h.clock,
        batch_limit=100,
        record_limit=1 << 20,
        progress_interval=0.01,
        retry_max_delay=0.01,
        watermark=records.watermark,
        dispatched=steps.dispatched,
    )
    async with anyio.create_task_group() as tg:
        await writer.claim()
        await tg.start(writer.run)
        await tg.start(records.run)
        await tg.start(steps.run)
        yield Owner(steps, records, writer, journal)
        tg.cancel_scope.cancel()  # a crash: nothing flushed


async def submit_all(o: Owner, ds: list[Delivery]) -> dict[str, BaseException | None]:
    acks = Acks()
    for d in ds:
        o.steps.submit(d, acks.ack(d))
    await wait_until(lambda: len(acks.done) == len(ds))
    return acks.done


async def test_a_new_owner_rebuilds_from_the_record_and_the_tail_above_the_watermark() -> None:
    p = Process()
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        ds = await deliveries(h, Moved("a", 1), Moved("b", 2))
        async with owner(h, p, tg, delay=0.0) as first:
            await submit_all(first, ds)
            await wait_until(lambda: first.records.backlog == 0)  # a and b written
            more = await deliveries(h, Moved("a", 3))
            first.records._delay = 60.0
            await submit_all(first, more)
        # The record of a holds [1]; the stream holds the step that added 3.
        async with await h.provider.keyspaces.open(f"{APP_KEY}/process/{PROC_KEY}") as ks:
            stored, _ = await ks.get(b"a")
        assert json.loads(msgspec.msgpack.decode(stored, type=ProcessRecord).root or b"") == [1]
        calls = list(p.calls)
        async with owner(h, p, tg) as second:
            state = await second.records.load(PROC_KEY, "a")
            assert json.loads(state.root or b"") == [1, 3]
            # Everything delivered again (a crash before the consumers' checkpoints) is skipped.
            done = await submit_all(second, [*ds, *more])
            assert all(e is None for e in done.values())
            assert p.calls == calls
            await second.records.flush()
        async with await h.provider.keyspaces.open(f"{APP_KEY}/process/{PROC_KEY}") as ks:
            stored, _ = await ks.get(b"a")
        record = msgspec.msgpack.decode(stored, type=ProcessRecord)
        assert json.loads(record.root or b"") == [1, 3]
        assert record.through is not None
        tg.cancel_scope.cancel()


async def test_an_outbox_not_dispatched_before_a_crash_is_dispatched_by_the_next_owner() -> None:
    p = Process()
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        ds = await deliveries(h, Moved("a", 1), Moved("b", 2))

        def refuse(envelopes: Any) -> None:
            raise dogma.ValidationError("the commands side is down")

        h.accept_fault = refuse
        async with owner(h, p, tg) as first:
            await submit_all(first, ds)
            await anyio.sleep(0.05)  # dispatch keeps failing
            assert h.accepted == []
            assert first.steps.dispatched(first.writer.next_position) < first.writer.next_position
            # A later record (the writer's progress) carries the watermark below the steps.
            await first.writer.claim()
        h.accept_fault = None
        tail = await read_tail(first.journal)
        assert tail.dispatched is not None
        assert tail.dispatched < tail.next_position
        async with owner(h, p, tg):
            await wait_until(lambda: len(h.accepted) == 2)
            assert acted(h) == [("a", 1), ("b", 2)]
            # Same IDs as the first owner's steps derived: the commands side deduplicates.
            steps = [
                s
                for position in range(tail.next_position)
                for s in decode_stream_record(await first.journal.get(position)).steps
            ]
            ids = sorted(decode(c).message_id for s in steps for c in s.commands)
            assert sorted(e.message_id for e in h.accepted) == ids
        tg.cancel_scope.cancel()


# -- the routing consumer's order across the in-memory and inbox paths ---------------------


@attrs.define
class FakeRoute:
    """A home partition 0 on this node that has read its inbox to ``read``."""

    read: int = 0
    local: list[str] = attrs.field(factory=list)
    inbox: list[str] = attrs.field(factory=list)

    def submit_local(self, delivery: Delivery, ack: Any) -> bool:
        self.local.append(delivery.id)
        return True

    async def submit_to_inbox(self, delivery: Delivery) -> None:
        self.inbox.append(delivery.id)

    def home_of(self, delivery: Delivery) -> int:
        return 0

    async def inbox_floors(self) -> dict[int, int]:
        return {0: 5}

    def inbox_read(self, index: int) -> int:
        return self.read


async def test_nothing_goes_home_in_memory_before_the_home_read_an_earlier_runs_appends() -> None:
    # An earlier run of the consumer (maybe on another node) appended
    # deliveries to the home's inbox up to position 5 before its checkpoint
    # passed them: a later delivery of the same instance handed over in
    # memory first would make the home skip them.
    route = FakeRoute(read=3)
    async with harness(App(Process()), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        config = h.app.handler_by_key(PROC_KEY)
        assert config is not None
        runner = ProcessRunner(h.app, config, options=OPTIONS, wake_timer=lambda _: None)
        async with await h.provider.keyspaces.open("checkpoints") as ks:
            inflight = InFlight(ConsumerCheckpoint(ks, b"k"), 10)
            floors = await route.inbox_floors()
            sender = _Sender(runner, route, inflight, tg, OPTIONS, floors=floors)
            first, second = await deliveries(h, Moved("a", 1), Moved("b", 2))
            await inflight.begin(0)
            sender.send(first)
            await wait_until(lambda: route.inbox == [first.id])
            assert route.local == []
            route.read = 5  # the home has read that far
            await inflight.begin(1)
            sender.send(second)
            assert route.local == [second.id]
        tg.cancel_scope.cancel()
