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
from typing import Any

import anyio
import attrs
import pytest

import dogma
from runkit.engine.envelope import Envelope
from runkit.engine.events.consumers import ConsumerOptions
from runkit.engine.events.process_deliveries import Delivery
from runkit.engine.events.process_homes import HomeSteps
from runkit.engine.events.process_state import InstanceState
from runkit.engine.events.process_stores import list_poisoned_events
from runkit.engine.events.processes import ProcessRunner
from runkit.engine.streams import ProcessStep, decode_stream_record

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
