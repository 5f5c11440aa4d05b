"""A home partition's process instances and derived records stay correct at their bounds (ADR 0010).

- The instance cache full of busy instances never evicts one in use (a second
  worker would handle its next delivery beside the first, on stale state).
- An instance ID the store cannot key is poisoned and gets no record: it
  must not hold up the other records, the materialised watermark or a takeover.
- A full queue of unwritten states younger than the delay is written, not
  spun on; record revisions are remembered for a bounded number of instances.
- Steps of a process disabled for a while are not passed over: a later owner
  running it enabled folds them into its records.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import attrs
import msgspec
import pytest
from anyio.abc import TaskGroup

from runkit.engine.events import process_records
from runkit.engine.events.consumers import partition_consumers
from runkit.engine.events.process_instances import ProcessRecord
from runkit.engine.events.process_records import ProcessRecords
from runkit.engine.events.process_state import InstanceState
from runkit.engine.events.process_stores import process_store_name
from runkit.engine.streams import decode_stream_record
from runkit.persistence import Provider
from runkit.testing.faults import BEFORE, FaultyProvider
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
import test_engine_processes_failures as pf
from engine_events_harness import Harness, harness, start_partition, wait_until
from engine_faults_app import APP_KEY as BANK_KEY
from engine_faults_app import LOYALTY_KEY, BankApp, Deposit, execute_all, running

pytestmark = pytest.mark.anyio


class _Gated(pf.Process):
    """Events 1 and 10 wait for a gate (a handler doing I/O)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = anyio.Event()
        self.waiting = 0
        self.order: list[tuple[str, int]] = []

    async def handle_event(self, root: Any, scope: Any, event: Any) -> None:
        if event.n in (1, 10):
            self.waiting += 1
            await self.gate.wait()
        self.order.append((event.id, event.n))
        await super().handle_event(root, scope, event)


async def test_an_instance_in_use_is_never_evicted_nor_handled_by_two_workers() -> None:
    process = _Gated()
    options = attrs.evolve(pf.BRISK, process_cache_size=1)
    async with (
        harness(pf.App(process), registry=pf.REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await start_partition(partition_consumers(h.app, h.settings, options=options), h, 0, tg)
        await h.publish(pf.Step("a", 1))
        await wait_until(lambda: process.waiting == 1)  # a is busy
        await h.publish(pf.Step("b", 10))
        await wait_until(lambda: process.waiting == 2)  # b is busy with event 10
        await h.publish(pf.Step("b", 11))  # must wait behind b's event 10
        await anyio.sleep(0.2)
        early = list(process.order)
        process.gate.set()
        await wait_until(lambda: len(h.accepted) == 3)
        await anyio.sleep(0.1)
        root = json.loads((await pf.record(h, "b")).root or b"null")
        tg.cancel_scope.cancel()
    assert early == []
    assert root == [10, 11]


async def _start(h: Harness, tg: TaskGroup) -> ProcessRecords:
    consumers = partition_consumers(h.app, h.settings, options=pf.BRISK)
    records: ProcessRecords = await start_partition(consumers, h, 0, tg)
    return records


async def _has_record(provider: Provider, instance: str) -> bool:
    async with await provider.keyspaces.open(pf.PROCESS_STORE) as ks:
        data, _ = await ks.get(instance.encode())
    return bool(data)


async def test_an_unkeyable_instance_holds_up_no_record_and_no_takeover() -> None:
    provider = pf.limited(max_key_bytes=120)
    async with (
        harness(pf.App(pf.Process()), registry=pf.REGISTRY, partitions=1, provider=provider) as h,
        anyio.create_task_group() as tg,
    ):
        records = await _start(h, tg)
        await h.publish(pf.Step("x" * 121, 1))  # poisoned: the store cannot key it
        await wait_until(lambda: pf.poisoned(h))
        await h.publish(pf.Step("short", 2))
        await wait_until(lambda: len(h.accepted) == 1)
        await wait_until(lambda: _has_record(provider, "short"))
        await wait_until(lambda: records.backlog == 0)
        end = h.writers[0].next_position
        assert records.watermark(end) == end
        tg.cancel_scope.cancel()
    # A new owner folding the whole stream (as if nothing were materialised).
    new_owner = ProcessRecords(provider, pf.APP_KEY, delay=0.0, retry_max_delay=0.01)
    async with await provider.journals.open(f"{pf.APP_KEY}/stream/0") as journal:
        await new_owner.recover_from(journal, materialised=0, dispatched=None, end=end)
    assert new_owner.backlog == 1  # "short" only


async def test_record_revisions_are_remembered_for_a_bounded_number_of_instances(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(process_records, "REVISIONS_KEPT", 20)
    async with (
        harness(pf.App(pf.Process()), registry=pf.REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        records = await _start(h, tg)
        for i in range(0, 300, 50):
            await h.publish(*(pf.Step(f"i{j}", j) for j in range(i, i + 50)))
        await wait_until(lambda: len(h.accepted) == 300)
        await wait_until(lambda: records.backlog == 0)
        remembered = len(records._revisions)
        tg.cancel_scope.cancel()
    assert remembered == 20


async def test_a_full_queue_of_young_states_is_written_without_blocking_the_loop() -> None:
    handler = "b9900000-0000-4000-8000-0000000000aa"
    records = ProcessRecords(
        MemoryProvider(str(uuid.uuid4())),
        "a9900000-0000-4000-8000-0000000000aa",
        delay=60.0,
        retry_max_delay=0.01,
    )
    for i in range(process_records.QUEUE_LIMIT):
        state = InstanceState(root=b"1", positions={"s": i}, through=(i, 0))
        records.committed(handler, f"i{i}", state, i)
    async with anyio.create_task_group() as tg:
        start = anyio.current_time()
        tg.start_soon(records.run)
        await anyio.sleep(0.01)  # any other task of the node
        elapsed = anyio.current_time() - start
        await wait_until(lambda: records.backlog < process_records.QUEUE_LIMIT)
        tg.cancel_scope.cancel()
    assert elapsed < 0.2


_LOYALTY_STORE = process_store_name(BANK_KEY, LOYALTY_KEY)


async def _loyalty_steps(provider: Provider, instance: str) -> int:
    count = 0
    for p in range(4):
        async with await provider.journals.open(f"{BANK_KEY}/stream/{p}") as journal:
            bounds = await journal.bounds()
            for position in range(bounds.begin, bounds.end):
                for step in decode_stream_record(await journal.get(position)).steps:
                    if step.handler_key == LOYALTY_KEY and step.instance_id == instance:
                        count += len(step.deliveries)
    return count


async def _deposits(provider: Provider, instance: str) -> int | None:
    async with await provider.keyspaces.open(_LOYALTY_STORE) as ks:
        data, _ = await ks.get(instance.encode())
    if not data:
        return None
    record = msgspec.msgpack.decode(data, type=ProcessRecord)
    return int(json.loads(record.root)) if record.root else 0


async def test_steps_not_yet_in_records_survive_a_run_with_the_process_disabled() -> None:
    silo = f"homes-disabled-{uuid.uuid4()}"
    # Run 1: three committed loyalty steps whose derived records cannot be
    # written (the store refuses them), as after a crash before the write.
    faulty = FaultyProvider(MemoryProvider(silo))
    faulty.plan.fail(BEFORE, kinds=["keyspace"], names=lambda n: n == _LOYALTY_STORE)
    async with running(faulty, BankApp(faulty).config()) as engine:
        await execute_all(
            engine.executor_for(BANK_KEY), [(f"a{i}", Deposit("acct-0", 1)) for i in range(3)], []
        )
        with anyio.fail_after(5):
            while await _loyalty_steps(MemoryProvider(silo), "acct-0") < 3:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        await anyio.sleep(0.3)
    # Run 2: the process disabled for a while; other work goes on.
    provider = MemoryProvider(silo)
    async with running(provider, BankApp(provider, disabled=["loyalty"]).config()) as engine:
        await execute_all(
            engine.executor_for(BANK_KEY), [(f"b{i}", Deposit("acct-1", 1)) for i in range(8)], []
        )
        await anyio.sleep(0.3)
    # Run 3: enabled again; one more deposit.
    provider = MemoryProvider(silo)
    async with running(provider, BankApp(provider).config()) as engine:
        await execute_all(engine.executor_for(BANK_KEY), [("c0", Deposit("acct-0", 1))], [])

        async def four() -> bool:
            return await _deposits(MemoryProvider(silo), "acct-0") == 4

        await wait_until(four, timeout=5)
