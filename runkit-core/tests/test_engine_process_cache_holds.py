"""A process instance taken out of the cache for handling: what it holds, and how it goes back.

Each test failed on the first version of ``InstanceCache.take``: a stale
deadline's re-read gave the taken entry another partition's epoch, so it was
dropped with its hold; a deadline fired while its partition's consumer
restarted left its outbox in the record (its entry was not cached, so the
clear found nothing); and a dispatch retried for ever after the commit kept
holding another partition's checkpoint for an outbox the record no longer held.
The last test is about the deadline path too: an entry that cannot be decoded
raised out of the timer, stopping its partition at every restart.
"""

from __future__ import annotations

import json
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import attrs
import msgspec
import pytest

import dogma

sys.path.insert(0, str(Path(__file__).parent))
from engine_events_harness import CommandSink, harness, wait_until

from runkit.engine.envelope import Envelope, encode, new_envelope
from runkit.engine.events.consumers import ConsumerOptions, partition_consumers
from runkit.engine.events.deadlines import DeadlineEntry
from runkit.engine.events.process_instances import ProcessRecord
from runkit.engine.events.process_stores import (
    checkpoint_key,
    checkpoints_store_name,
    process_store_name,
)
from runkit.engine.partitions import partition_id

REGISTRY = dogma.MessageTypeRegistry()
APP_KEY = "a7710000-0000-4000-8000-000000000001"
PROC_KEY = "b7710000-0000-4000-8000-000000000001"
PROCESS_STORE = process_store_name(APP_KEY, PROC_KEY)
LAZY = ConsumerOptions(
    retry_initial=0.001,
    retry_max=0.005,
    max_attempts=2,
    checkpoint_interval=30.0,
    deadline_rescan_interval=0.01,
)


@dogma.register_event("e7710000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Step(dogma.Event):
    id: str
    n: int
    schedule: bool = False


@dogma.register_command("c7710000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class DoThing(dogma.Command):
    id: str
    n: int


@dogma.register_event("e7710000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class DidThing(dogma.Event):
    id: str


@dogma.register_deadline("d7710000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Timeout(dogma.Deadline):
    id: str


@attrs.define
class Root:
    steps: list[int] = attrs.field(factory=list)

    def marshal_binary(self) -> bytes:
        return json.dumps(self.steps).encode()

    def unmarshal_binary(self, data: bytes) -> None:
        self.steps = json.loads(data)


class Process:
    def __init__(self) -> None:
        self.gate: anyio.Event | None = None
        self.in_deadline = False

    def configure(self, c: Any) -> None:
        c.identity("proc", PROC_KEY)
        c.routes(
            dogma.handles_event(Step, registry=REGISTRY),
            dogma.executes_command(DoThing, registry=REGISTRY),
            dogma.schedules_deadline(Timeout, registry=REGISTRY),
        )

    def new(self) -> Root:
        return Root()

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        assert isinstance(event, Step)
        return event.id

    async def handle_event(self, root: Root, scope: Any, event: dogma.Event) -> None:
        assert isinstance(event, Step)
        n = event.n
        scope.mutate(lambda r: r.steps.append(n))
        scope.execute_command(DoThing(event.id, n))
        if event.schedule:
            scope.schedule_deadline(Timeout(event.id), scope.now() + timedelta(days=1))

    async def handle_deadline(self, root: Any, scope: Any, deadline: Any) -> None:
        self.in_deadline = True
        if self.gate is not None:
            await self.gate.wait()
        scope.execute_command(DoThing(deadline.id, 99))


@attrs.frozen
class App:
    process: Process

    def configure(self, c: Any) -> None:
        c.identity("app", APP_KEY)
        c.routes(
            dogma.via_process(self.process),
            dogma.via_aggregate(
                CommandSink("b7710000-0000-4000-8000-000000000002", DoThing, DidThing, REGISTRY)
            ),
        )


async def read_record(h: Any, instance: str) -> ProcessRecord:
    async with await h.provider.keyspaces.open(PROCESS_STORE) as ks:
        data, _ = await ks.get(instance.encode())
    return msgspec.msgpack.decode(data, type=ProcessRecord)


async def outbox(h: Any, instance: str) -> list[tuple[str, int]]:
    r = await read_record(h, instance)
    msgs = [json.loads(msgspec.msgpack.decode(c, type=Envelope).data) for c in r.commands]
    return [(m["id"], m["n"]) for m in msgs]


async def saved_checkpoint(h: Any, partition: int) -> int | None:
    async with await h.provider.keyspaces.open(checkpoints_store_name(APP_KEY)) as ks:
        data, _ = await ks.get(checkpoint_key(PROC_KEY, partition_id(APP_KEY, partition)))
    return msgspec.msgpack.decode(data, type=int) if data else None


class Consumer:
    """runner.run(ctx) in its own cancel scope (stop = what a handoff/restart does)."""

    def __init__(self, tg: Any, runner: Any, ctx: Any) -> None:
        self.scope = anyio.CancelScope()
        self.stopped = anyio.Event()
        self.runner, self.ctx = runner, ctx
        tg.start_soon(self._run)

    async def _run(self) -> None:
        try:
            with self.scope:
                await self.runner.run(self.ctx)
        finally:
            self.stopped.set()

    async def stop(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


def deadline_entry(h: Any, instance: str, deadline_id: str) -> DeadlineEntry:
    env = new_envelope(
        Timeout(instance),
        app_key=APP_KEY,
        site_key=None,
        created_at=h.clock(),
        message_id=deadline_id,
        scheduled_for=h.clock(),
    )
    return DeadlineEntry(
        handler_key=PROC_KEY,
        instance_id=instance,
        deadline_id=deadline_id,
        scheduled_for=h.clock(),
        envelope=encode(env),
    )


@pytest.mark.parametrize("restart_first", [True, False])
async def test_a_stale_deadline_fire_keeps_another_partitions_hold(restart_first: bool) -> None:
    """X dirty under E (event offset 0). A fire on H of a deadline X's cached record
    does not list (duplicate fire) takes the StaleRecord path; the re-read returns the
    same revision, so _load returns the taken entry, but entry_epoch is set to H's
    epoch. E's epoch differs (E's consumer restarted once before), so put() refuses
    and drops X: E's hold and clear are gone."""
    p = Process()
    async with harness(App(p), registry=REGISTRY, partitions=2) as h:
        node = partition_consumers(h.app, h.settings, options=LAZY)
        runner = node._processes[PROC_KEY]
        cache = runner._cache
        E, H = 0, 1
        async with anyio.create_task_group() as tg:
            if restart_first:
                c = Consumer(tg, runner, h.ctx(E))
                await anyio.sleep(0.05)
                await c.stop()  # e.g. a restart after a store error: drop_partition(E)
                assert cache.epoch(E) == 1
                assert cache.epoch(H) == 0
            c = Consumer(tg, runner, h.ctx(E))

            await h.publish(Step("x", 1), partition=E)  # offset 0
            await wait_until(lambda: len(h.accepted) == 1)
            assert await outbox(h, "x") == [("x", 1)]
            assert cache.hold_floor(E) == 0

            # A duplicate (already handled) deadline of X fires on H.
            await runner.fire_deadline(h.ctx(H), deadline_entry(h, "x", str(uuid.uuid4())))

            held_after = cache.hold_floor(E)
            await c.stop()  # graceful handoff of E
            cp = await saved_checkpoint(h, E)
            left = await outbox(h, "x")
            tg.cancel_scope.cancel()
        assert held_after == 0, (
            f"hold_floor(E) after the fire={held_after}, E's saved checkpoint={cp}, "
            f"outbox left in X's record={left}"
        )


@pytest.mark.parametrize("restart", [True, False])
async def test_a_deadline_fired_across_a_consumer_restart_clears_its_outbox(restart: bool) -> None:
    """A deadline fires on H; while its handler runs, H's consumer restarts
    (drop_partition(H) bumps the epoch; the timer keeps running). The commit's put is
    refused (epoch changed), so clear_now finds no entry and the fire returns with
    the deadline's outbox still in the record (the timer then truncates past it)."""
    p = Process()
    async with harness(App(p), registry=REGISTRY, partitions=2) as h:
        node = partition_consumers(h.app, h.settings, options=LAZY)
        runner = node._processes[PROC_KEY]
        cache = runner._cache
        H, E = 0, 1
        async with anyio.create_task_group() as tg:
            c = Consumer(tg, runner, h.ctx(H))
            Consumer(tg, runner, h.ctx(E))
            await h.publish(Step("x", 1, schedule=True), partition=E)
            await wait_until(lambda: len(h.accepted) == 1)
            rec = await read_record(h, "x")
            assert len(rec.deadlines) == 1
            entry = rec.deadlines[0].entry

            p.gate = anyio.Event()
            done = anyio.Event()

            async def fire() -> None:
                await runner.fire_deadline(h.ctx(H), entry)
                done.set()

            tg.start_soon(fire)
            await wait_until(lambda: p.in_deadline)
            if restart:
                await c.stop()  # consumer restart on H (store error): drop_partition(H)
                c = Consumer(tg, runner, h.ctx(H))
            p.gate.set()
            await done.wait()  # the fire succeeded: the timer truncates past it
            left = await outbox(h, "x")
            await anyio.sleep(0.2)
            cached = cache.get("x")
            tg.cancel_scope.cancel()
        assert left == [], (
            f"fire_deadline returned but X's record still holds the deadline's outbox "
            f"{left}; cached entry={cached!r} (nothing will clear it)"
        )


async def test_a_stuck_dispatch_does_not_hold_another_partitions_checkpoint() -> None:
    """X dirty under P0 (offset 0). X's event on P1 commits (the record no longer
    holds P0's outbox) but its dispatch is stuck (accept keeps failing: retried for
    ever). The taken entry stays in _taken, so P0's checkpoint stays held at 0
    while P0 goes on with other instances."""
    p = Process()
    async with harness(App(p), registry=REGISTRY, partitions=2) as h:
        node = partition_consumers(h.app, h.settings, options=LAZY)
        runner = node._processes[PROC_KEY]
        cache = runner._cache
        async with anyio.create_task_group() as tg:
            Consumer(tg, runner, h.ctx(0))
            Consumer(tg, runner, h.ctx(1))
            await h.publish(Step("x", 1), partition=0)  # offset 0 of P0
            await wait_until(lambda: len(h.accepted) == 1)

            def fault(envs: Any) -> None:
                if any(json.loads(e.data)["n"] == 2 for e in envs):
                    raise RuntimeError("aggregate refuses")

            h.accept_fault = fault
            await h.publish(Step("x", 2), partition=1)

            async def committed() -> bool:
                return await outbox(h, "x") == [("x", 2)]

            await wait_until(committed)  # the commit landed: P0's outbox is gone
            for i in range(5):
                await h.publish(Step(f"y{i}", 1), partition=0)
            await wait_until(lambda: len(h.accepted) == 6)
            await anyio.sleep(0.2)
            floor = cache.hold_floor(0)
            taken = dict(cache._taken)
            tg.cancel_scope.cancel()
        assert floor != 0, (
            f"P0 hold_floor={floor} (taken={list(taken)}) though X's record no longer "
            "holds P0's outbox"
        )


async def test_an_undecodable_deadline_is_poisoned_not_raised() -> None:
    # Raised, the decode error stopped the deadline timer's partition, and the
    # same entry stopped it again after every restart.
    from runkit.engine.events.process_stores import list_poisoned_events

    p = Process()
    async with harness(App(p), registry=REGISTRY, partitions=1) as h:
        node = partition_consumers(h.app, h.settings, options=LAZY)
        runner = node._processes[PROC_KEY]
        entry = msgspec.structs.replace(
            deadline_entry(h, "x", "d-1"), envelope=b"\xc1 not an envelope"
        )
        await runner.fire_deadline(h.ctx(0), entry)
        poisoned = await list_poisoned_events(h.provider, APP_KEY, 0)
    assert list(poisoned) == [f"{PROC_KEY}/deadline/d-1"]
    [record] = poisoned.values()
    assert record.envelope == b"\xc1 not an envelope"
    assert record.instance_id == "x"
    assert not p.in_deadline
