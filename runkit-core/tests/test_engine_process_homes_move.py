"""A process instance's home partition starting or moving loses no delivery (ADR 0010).

An instance skips a delivery at or below its recorded position for the
delivery's stream, so an in-memory delivery must never overtake an earlier one
of the same stream and instance still in the home's inbox, and a delivery in
hand when its home moves away must reach the new owner. Engines on the memory
driver; the application is the one of ``test_engine_process_consumer_moves``.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from runkit.config import build
from runkit.engine.commands.inbox import inbox_name
from runkit.engine.engine import Engine
from runkit.engine.events.process_deliveries import home_partition
from runkit.engine.partitions import instance_workload, partition_id, partition_of
from runkit.engine.settings import EngineSettings
from runkit.engine.streams import stream_name
from runkit.rendezvous import winner
from runkit.testing import faults
from runkit.testing.faults import FaultPlan, FaultyProvider
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import FAST, splitting_node_ids, wait_until
from test_engine_process_consumer_moves import (
    APP_KEY,
    ORDERLY_KEY,
    PARTITIONS,
    REGISTRY,
    THINGS_KEY,
    App,
    Do,
    Orderly,
    inbox_deliveries,
    node,
)

pytestmark = pytest.mark.anyio


async def test_a_home_that_starts_late_reads_its_inbox_before_taking_deliveries_in_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = "s0"
    p = partition_of(instance_workload(THINGS_KEY, source), PARTITIONS)
    target = next(
        t for t in (f"t{n}" for n in range(1000)) if home_partition(ORDERLY_KEY, t, PARTITIONS) != p
    )
    h = home_partition(ORDERLY_KEY, target, PARTITIONS)
    h_stream, h_inbox = stream_name(APP_KEY, h), inbox_name(APP_KEY, h)
    start_h = anyio.Event()  # h's stream journal opens (h starts) once set
    slow_inbox = [False]  # the next read of h's inbox waits for ``release``
    release = anyio.Event()

    real_open = faults._FaultyJournalStore.open

    async def open_(self: Any, name: str) -> Any:
        if name == h_stream:
            await start_h.wait()
        return await real_open(self, name)

    real_range = faults._FaultyJournal.range

    async def range_(self: Any, position: int) -> AsyncIterator[Any]:
        if self.name == h_inbox and slow_inbox[0]:
            slow_inbox[0] = False
            await release.wait()  # a slow store
        async for item in real_range(self, position):
            yield item

    monkeypatch.setattr(faults._FaultyJournalStore, "open", open_)
    monkeypatch.setattr(faults._FaultyJournal, "range", range_)
    app = App()
    config = build(app, registry=REGISTRY)
    silo = f"late-home-{uuid.uuid4()}"
    settings: dict[str, Any] = {**FAST, "partition_count": PARTITIONS}
    engine = Engine.from_settings(
        EngineSettings(
            applications=(config,),
            persistence_provider=FaultyProvider(MemoryProvider(silo), FaultPlan()),
            **settings,
        )
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: p in runtime.partitions)
        executor = engine.executor_for(config)
        with anyio.fail_after(10):
            await executor.execute_command(Do(source, target, 0))

        async def appended() -> bool:  # by p's consumer: h does not run here yet
            return await inbox_deliveries(silo, {h}) > 0

        await wait_until(appended, timeout=10)
        slow_inbox[0] = True
        start_h.set()
        consumers: Any = runtime.consumers
        await wait_until(lambda: h in consumers.homes, timeout=10)
        with anyio.fail_after(10):
            await executor.execute_command(Do(source, target, 1))
        await anyio.sleep(0.3)
        release.set()  # h's catch-up read of its inbox completes
        await wait_until(lambda: len(app.orderly.calls.get(target, [])) >= 2, timeout=10)
        await anyio.sleep(0.2)
        calls = dict(app.orderly.calls)
        tg.cancel_scope.cancel()
    assert calls == {target: [0, 1]}


class _Gated(Orderly):
    """Event 0's handling awaits (slow I/O) until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = anyio.Event()
        self.entered = anyio.Event()

    async def handle_event(self, root: Any, scope: Any, event: Any) -> None:
        if event.n == 0 and not self.gate.is_set():
            self.entered.set()
            await self.gate.wait()
        await super().handle_event(root, scope, event)


async def test_a_delivery_in_hand_when_its_home_moves_reaches_the_new_owner() -> None:
    gated = _Gated()
    app = App(gated)
    config = build(app, registry=REGISTRY)
    silo = f"home-moves-{uuid.uuid4()}"
    first, second = splitting_node_ids(PARTITIONS, APP_KEY)

    def owner(index: int) -> uuid.UUID:
        found = winner(partition_id(APP_KEY, index), (first, second))
        assert found is not None
        return found

    def source_partition(s: str) -> int:
        return partition_of(instance_workload(THINGS_KEY, s), PARTITIONS)

    source = next(s for s in (f"s{n}" for n in range(1000)) if owner(source_partition(s)) == first)
    target = next(
        t
        for t in (f"t{n}" for n in range(1000))
        if owner(home_partition(ORDERLY_KEY, t, PARTITIONS)) == second
    )
    everything = set(range(PARTITIONS))
    firsts = {i for i in everything if owner(i) == first}
    async with node(config, silo, first) as one:
        runtime_one = await one.runtime(APP_KEY)
        await wait_until(lambda: set(runtime_one.partitions) == everything, timeout=30)
        executor = one.executor_for(config)
        with anyio.fail_after(10):
            await executor.execute_command(Do(source, target, 0))
            await gated.entered.wait()  # event 0 in hand at its home, on the first node
        async with node(config, silo, second) as two:  # takes the home
            runtime_two = await two.runtime(APP_KEY)
            await wait_until(
                lambda: (
                    set(runtime_one.partitions) == firsts
                    and set(runtime_two.partitions) == everything - firsts
                ),
                timeout=30,
            )
            gated.gate.set()
            for n in (1, 2):
                with anyio.fail_after(10):
                    await executor.execute_command(Do(source, target, n))
            await wait_until(lambda: len(gated.roots.get(target, [])) == 3, timeout=10)
            roots = dict(gated.roots)
    assert roots == {target: [0, 1, 2]}
