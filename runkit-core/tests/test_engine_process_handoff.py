"""A dispatched process outbox is cleared within a handoff, even while its instance is busy.

X is dirty under partition 0 (event 0 produced a command; the outbox is
dispatched, not yet cleared). While X's handler is running for an event of
partition 1, partition 0 is handed off. Before the fix X was out of the cache
while being handled, so partition 0's consumer skipped it in its final clear
(busy), saved its checkpoint past event 0 (nothing held it) and dropped the
partition; then the handler failed and the old dirty entry was put back under
partition 0, on a node that no longer owned it. The next owner started past
event 0, so the outbox stayed in the record until X's next load, where it was
dispatched again (ADR 0006 addendum). Now a taken dirty entry keeps holding
the checkpoint, and nothing is put back under a dropped partition.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import attrs
import msgspec

import dogma

sys.path.insert(0, str(Path(__file__).parent))
from engine_events_harness import CommandSink, adr0006_only, harness, wait_until

from runkit.engine.envelope import Envelope
from runkit.engine.events.consumers import ConsumerOptions, partition_consumers
from runkit.engine.events.process_instances import ProcessRecord
from runkit.engine.events.process_stores import (
    checkpoint_key,
    checkpoints_store_name,
    list_poisoned_events,
    process_store_name,
)
from runkit.engine.partitions import partition_id

REGISTRY = dogma.MessageTypeRegistry()
APP_KEY = "a7700000-0000-4000-8000-000000000001"
PROC_KEY = "b7700000-0000-4000-8000-000000000001"
PROCESS_STORE = process_store_name(APP_KEY, PROC_KEY)
LAZY = ConsumerOptions(
    retry_initial=0.001,
    retry_max=0.005,
    max_attempts=2,
    checkpoint_interval=30.0,  # no background clear/save on node A before the stop
    deadline_rescan_interval=0.01,
)
BRISK = attrs.evolve(LAZY, checkpoint_interval=0.01)


@dogma.register_event("e7700000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Step(dogma.Event):
    id: str
    n: int
    fail: bool = False


@dogma.register_command("c7700000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class DoThing(dogma.Command):
    id: str
    n: int


@dogma.register_event("e7700000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class DidThing(dogma.Event):
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
        self.blocked = False

    def configure(self, c: Any) -> None:
        c.identity("proc", PROC_KEY)
        c.routes(
            dogma.handles_event(Step, registry=REGISTRY),
            dogma.executes_command(DoThing, registry=REGISTRY),
        )

    def new(self) -> Root:
        return Root()

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        assert isinstance(event, Step)
        return event.id

    async def handle_event(self, root: Root, scope: Any, event: dogma.Event) -> None:
        assert isinstance(event, Step)
        if event.fail:
            if not self.blocked:
                self.blocked = True
                assert self.gate is not None
                await self.gate.wait()  # e.g. an awaited read that then fails
            raise RuntimeError("handler failure")
        n = event.n
        scope.mutate(lambda r: r.steps.append(n))
        scope.execute_command(DoThing(event.id, n))

    async def handle_deadline(self, root: Any, scope: Any, deadline: Any) -> None:
        raise AssertionError


@attrs.frozen
class App:
    process: Process

    def configure(self, c: Any) -> None:
        c.identity("app", APP_KEY)
        c.routes(
            dogma.via_process(self.process),
            dogma.via_aggregate(
                CommandSink("b7700000-0000-4000-8000-000000000002", DoThing, DidThing, REGISTRY)
            ),
        )


async def outbox(h: Any, instance: str) -> list[tuple[str, int]]:
    async with await h.provider.keyspaces.open(PROCESS_STORE) as ks:
        data, _ = await ks.get(instance.encode())
    r = msgspec.msgpack.decode(data, type=ProcessRecord)
    msgs = [json.loads(msgspec.msgpack.decode(c, type=Envelope).data) for c in r.commands]
    return [(m["id"], m["n"]) for m in msgs]


async def saved_checkpoint(h: Any, partition: int) -> int | None:
    async with await h.provider.keyspaces.open(checkpoints_store_name(APP_KEY)) as ks:
        data, _ = await ks.get(checkpoint_key(PROC_KEY, partition_id(APP_KEY, partition)))
    return msgspec.msgpack.decode(data, type=int) if data else None


@adr0006_only
async def test_a_handoff_while_the_instance_is_handled_elsewhere_leaves_no_outbox() -> None:
    p = Process()
    p.gate = anyio.Event()
    async with harness(App(p), registry=REGISTRY, partitions=2) as h:
        node_a = partition_consumers(h.app, h.settings, options=LAZY)
        async with anyio.create_task_group() as tg:
            scope0 = anyio.CancelScope()
            p0_stopped = anyio.Event()

            async def run_p0(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
                try:
                    with scope0:
                        await node_a.run_partition(h.ctx(0), task_status=task_status)
                finally:
                    p0_stopped.set()

            await tg.start(run_p0)
            await tg.start(node_a.run_partition, h.ctx(1))

            await h.publish(Step("x", 1), partition=0)  # offset 0 of partition 0
            await wait_until(lambda: len(h.accepted) == 1)
            assert await outbox(h, "x") == [("x", 1)]  # dispatched, not yet cleared

            await h.publish(Step("x", 2, fail=True), partition=1)
            await wait_until(lambda: p.blocked)  # X is being handled on partition 1

            scope0.cancel()  # partition 0 is handed off (graceful stop)
            await p0_stopped.wait()
            p.gate.set()  # the handling fails; then it is retried and poisoned
            await wait_until(lambda: _poisoned(h, 1))

            # Node A no longer owns partition 0: it keeps nothing dirty under it.
            cache = node_a._processes[PROC_KEY]._cache
            assert cache.hold_floor(0) is None
            assert not cache.due_clears(0, float("inf"))

            # The next owner of partition 0 (node B) starts from the saved checkpoint.
            node_b = partition_consumers(h.app, h.settings, options=BRISK)
            await tg.start(node_b.run_partition, h.ctx(0))

            async def cleared() -> bool:
                return await outbox(h, "x") == []

            try:
                await wait_until(cleared, timeout=1.0)
            except TimeoutError:
                raise AssertionError(
                    "the dispatched outbox of X is still in its record after the handoff; "
                    f"partition 0's checkpoint was saved at {await saved_checkpoint(h, 0)} "
                    "(past event 0, which left it), so no owner will deliver event 0 again "
                    "and the outbox waits for X's next load"
                ) from None
            finally:
                tg.cancel_scope.cancel()


async def _poisoned(h: Any, partition: int) -> bool:
    return bool(await list_poisoned_events(h.provider, APP_KEY, partition))
