"""ADR 0010 through ``Engine``: process steps in the home partition, on the memory driver.

The fault application of ``engine_faults_app`` (aggregate, a process with
deadlines, an integration, a projection) runs, and the §9 checker settles
over the final stores. One run sends every delivery through its home
partition's inbox, as a node that does not run the home partition does (the
partition then reads it back and hands it to its steps), so that path is
checked by the same invariants.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from runkit.engine.commands.inbox import decode_inbox_record
from runkit.engine.events import consumers as consumers_module
from runkit.engine.streams import decode_stream_record
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_faults_app import (
    APP_KEY,
    BankApp,
    execute_all,
    running,
    settle,
    workload,
)

pytestmark = pytest.mark.anyio


async def run_bank(count: int = 48) -> tuple[MemoryProvider, list[str]]:
    silo = f"homes-{uuid.uuid4()}"
    provider = MemoryProvider(silo)
    acknowledged: list[str] = []
    async with running(provider, BankApp(provider).config()) as engine:
        await execute_all(engine.executor_for(APP_KEY), workload(7, count), acknowledged)
        await settle(MemoryProvider(silo), acknowledged, timeout=30)
    return MemoryProvider(silo), acknowledged


async def steps_and_inbox_deliveries(provider: MemoryProvider) -> tuple[int, int]:
    steps = deliveries = 0
    for p in range(4):
        async with await provider.journals.open(f"{APP_KEY}/stream/{p}") as journal:
            bounds = await journal.bounds()
            for position in range(bounds.begin, bounds.end):
                steps += len(decode_stream_record(await journal.get(position)).steps)
    for p in range(4):
        async with await provider.journals.open(f"{APP_KEY}/inbox/{p}") as journal:
            bounds = await journal.bounds()
            for position in range(bounds.begin, bounds.end):
                record = decode_inbox_record(await journal.get(position))
                deliveries += sum(1 for e in record.entries if e.source is not None)
    return steps, deliveries


async def test_the_application_settles_with_process_steps_at_home() -> None:
    provider, _ = await run_bank()
    steps, _ = await steps_and_inbox_deliveries(provider)
    assert steps > 0  # the process ran on the new path


async def test_deliveries_through_the_home_partitions_inbox_take_effect_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As if no home partition ran on this node: every delivery takes the inbox.
    monkeypatch.setattr(
        consumers_module.EventConsumers, "submit_local", lambda self, delivery, ack: False
    )
    provider, _ = await run_bank()
    steps, deliveries = await steps_and_inbox_deliveries(provider)
    assert steps > 0
    assert deliveries > 0
