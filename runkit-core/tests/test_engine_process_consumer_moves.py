"""Two engines, one memory silo: a source partition's consumer moves, the home stays (ADR 0010).

A process instance skips a delivery at or below its recorded position for
the delivery's stream, so no delivery may overtake an earlier one of the same
stream. The consumer of a source partition *p* runs on one node and the
instance's home partition *h* on the other, so its deliveries go through
*h*'s inbox; then *p* moves to *h*'s node (its first node stops), where they
go in memory, and back (the first node starts again), twice. Every event
must be handled once, in stream order.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

import dogma
from runkit.config import build
from runkit.engine.commands.inbox import decode_inbox_record, inbox_name
from runkit.engine.engine import Engine
from runkit.engine.events.process_deliveries import home_partition
from runkit.engine.partitions import instance_workload, partition_id, partition_of
from runkit.engine.settings import EngineSettings
from runkit.rendezvous import winner
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import FAST, splitting_node_ids, wait_until

pytestmark = pytest.mark.anyio

REGISTRY = dogma.MessageTypeRegistry()
APP_KEY = "a9a20000-0000-4000-8000-000000000001"
THINGS_KEY = "b9a20000-0000-4000-8000-000000000001"
ORDERLY_KEY = "b9a20000-0000-4000-8000-000000000002"
PARTITIONS = 8


@dogma.register_command("c9a20000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Do(dogma.Command):
    source: str
    target: str
    n: int


@dogma.register_event("e9a20000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Done(dogma.Event):
    source: str
    target: str
    n: int


class Thing:
    def apply_event(self, event: dogma.Event) -> None:
        pass

    def marshal_binary(self) -> bytes:
        raise dogma.NotSupported()

    def unmarshal_binary(self, data: bytes) -> None:
        raise dogma.NotSupported()


class Things:
    def configure(self, c: Any) -> None:
        c.identity("things", THINGS_KEY)
        c.routes(
            dogma.handles_command(Do, registry=REGISTRY),
            dogma.records_event(Done, registry=REGISTRY),
        )

    def new(self) -> Thing:
        return Thing()

    def route_command_to_instance(self, command: Any) -> str:
        return str(command.source)

    def handle_command(self, root: Thing, scope: Any, command: Any) -> None:
        scope.record_event(Done(command.source, command.target, command.n))


@attrs.define
class Root:
    handled: list[int] = attrs.field(factory=list)

    def marshal_binary(self) -> bytes:
        return ",".join(map(str, self.handled)).encode()

    def unmarshal_binary(self, data: bytes) -> None:
        self.handled = [int(n) for n in data.decode().split(",") if n]


class Orderly(dogma.NoDeadlineMessagesBehavior):
    """Notes each event's number, per instance: every handling, and in its root."""

    def __init__(self) -> None:
        self.calls: dict[str, list[int]] = {}
        self.roots: dict[str, list[int]] = {}

    def configure(self, c: Any) -> None:
        c.identity("orderly", ORDERLY_KEY)
        c.routes(
            dogma.handles_event(Done, registry=REGISTRY),
            dogma.executes_command(Do, registry=REGISTRY),
        )

    def new(self) -> Root:
        return Root()

    async def route_event_to_instance(self, event: Any) -> str | None:
        return str(event.target)

    async def handle_event(self, root: Root, scope: Any, event: Any) -> None:
        self.calls.setdefault(event.target, []).append(event.n)
        n = event.n
        scope.mutate(lambda r: r.handled.append(n))
        self.roots[event.target] = [*root.handled]


@attrs.define
class App:
    orderly: Orderly = attrs.field(factory=Orderly)

    def configure(self, c: Any) -> None:
        c.identity("moves", APP_KEY)
        c.routes(dogma.via_aggregate(Things()), dogma.via_process(self.orderly))


@asynccontextmanager
async def node(config: Any, silo: str, node_id: uuid.UUID) -> AsyncIterator[Engine]:
    settings: dict[str, Any] = {**FAST, "partition_count": PARTITIONS}
    engine = Engine.from_settings(
        EngineSettings(
            applications=(config,),
            persistence_provider=MemoryProvider(silo),
            listen_address="127.0.0.1:0",
            node_id=node_id,
            heartbeat_interval=0.5,
            **settings,
        )
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        try:
            yield engine
        finally:
            tg.cancel_scope.cancel()


async def running_only(*nodes: tuple[Engine, set[int]]) -> None:
    """Wait until each engine runs exactly the partitions given for it.

    Until two starting nodes see each other both may run a partition for a
    moment (the loser's steps do not commit, but its handler was called):
    the events are sent once ownership has settled.
    """
    runtimes = [(await engine.runtime(APP_KEY), owned) for engine, owned in nodes]
    await wait_until(
        lambda: all(set(runtime.partitions) == owned for runtime, owned in runtimes), timeout=30
    )


async def test_events_are_handled_once_in_order_as_their_partition_moves_between_nodes() -> None:
    app = App()
    config = build(app, registry=REGISTRY)
    silo = f"moves-{uuid.uuid4()}"
    first, second = splitting_node_ids(PARTITIONS, APP_KEY)
    pair = (first, second)

    def owner(index: int) -> uuid.UUID:
        found = winner(partition_id(APP_KEY, index), pair)
        assert found is not None
        return found

    # Events on a partition p of the first node, for instances homed on
    # partitions of the second: the first node's deliveries take the inbox.
    source = next(
        s
        for s in (f"s{n}" for n in range(1000))
        if owner(partition_of(instance_workload(THINGS_KEY, s), PARTITIONS)) == first
    )
    p = partition_of(instance_workload(THINGS_KEY, source), PARTITIONS)
    targets = [
        t
        for t in (f"t{n}" for n in range(1000))
        if owner(home_partition(ORDERLY_KEY, t, PARTITIONS)) == second
    ][:3]
    homes = {home_partition(ORDERLY_KEY, t, PARTITIONS) for t in targets}
    count = 0

    async def send(engine: Engine, n: int) -> None:
        nonlocal count
        executor = engine.executor_for(config)
        for _ in range(n):
            with anyio.fail_after(20):
                await executor.execute_command(Do(source, targets[count % 3], count))
            count += 1

    everything = set(range(PARTITIONS))
    firsts = {i for i in everything if owner(i) == first}
    assert p in firsts
    assert not homes & firsts
    async with node(config, silo, second) as two:
        for _ in range(2):
            async with node(config, silo, first) as one:
                await running_only((one, firsts), (two, everything - firsts))
                await send(one, 20)  # p on the first node, the homes on the second
                # p moves to the second node while deliveries are in flight.
            await running_only((two, everything))
            await send(two, 20)
        async with node(config, silo, first) as one:
            await running_only((one, firsts), (two, everything - firsts))  # and back
            await send(one, 20)

            def all_handled() -> bool:
                return sum(len(r) for r in app.orderly.roots.values()) == count

            await wait_until(all_handled, timeout=30)
            await anyio.sleep(0.5)  # anything handled twice would show by now
    expected = {t: [n for n in range(count) if n % 3 == i] for i, t in enumerate(targets)}
    assert app.orderly.roots == expected  # committed: once each, in stream order
    assert app.orderly.calls == expected  # and the handler called once for each
    # The first node's deliveries went through the homes' inboxes.
    assert await inbox_deliveries(silo, homes) > 0


async def inbox_deliveries(silo: str, homes: set[int]) -> int:
    provider = MemoryProvider(silo)
    found = 0
    for index in homes:
        async with await provider.journals.open(inbox_name(APP_KEY, index)) as journal:
            bounds = await journal.bounds()
            for position in range(bounds.begin, bounds.end):
                record = decode_inbox_record(await journal.get(position))
                found += sum(1 for e in record.entries if e.source is not None)
    return found
