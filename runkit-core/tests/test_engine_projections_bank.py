"""The bank example through ``Engine``: its read models match the reference dispatcher's.

The demo scenario runs once through ``bank.testing.Dispatcher`` (testkit-like,
breadth-first) and once through the engine (processes, deadlines, the
third-party integration and the two SQLite ADR-26 projections, on 4
partitions). Each step waits, through an event observer, for its outcome event.
The customers, accounts and ledger read models must then be equal.
"""

from __future__ import annotations

import functools
import io
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

import dogma

bank = pytest.importorskip("bank")

from bank.app import App  # noqa: E402
from bank.demo import DEMO_TIME, SCENARIO, run_scenario  # noqa: E402
from bank.projections import ReadDB, queries  # noqa: E402
from runkit.config import build  # noqa: E402
from runkit.engine.engine import Engine  # noqa: E402
from runkit.engine.events import consumers as consumers_module  # noqa: E402
from runkit.engine.events.consumers import ConsumerOptions  # noqa: E402
from runkit.engine.settings import EngineSettings  # noqa: E402
from runkit_memory import MemoryProvider  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from engine_events_harness import wait_until  # noqa: E402

#: ``anyio_backend`` for asyncio with uvloop's loop (``runkit run --backend uvloop``).
UVLOOP = ("asyncio", {"use_uvloop": True})
# A dev dependency everywhere uvloop builds: elsewhere the test must run.
needs_uvloop = pytest.mark.skipif(sys.platform == "win32", reason="uvloop has no Windows build")

# An outcome event concludes each scenario step (the demo prints these).
OUTCOMES = (
    "AccountOpened",
    "DepositApproved",
    "WithdrawalApproved",
    "WithdrawalDeclined",
    "TransferApproved",
    "TransferDeclined",
    "TransferFailed",
)


def read_models(path: Path) -> tuple[Any, ...]:
    # ReadDB.connect() creates the schema first, so a read racing the
    # projections' first write never sees a half-made database.
    conn = ReadDB(path).connect()
    try:
        # transaction_order numbers entries in the order the ledger saw them,
        # which depends on which partition's projection ran first: not compared.
        ledger = sorted(
            (attrs.evolve(entry, transaction_order=0) for entry in queries.ledger(conn)),
            key=repr,
        )
        return (queries.customers(conn), queries.accounts(conn), ledger)
    finally:
        conn.close()


def outcome_types() -> list[type[dogma.Event]]:
    types = [
        t.cls
        for t in dogma.registry
        if issubclass(t.cls, dogma.Event) and t.cls.__name__ in OUTCOMES
    ]
    assert len(types) == len(OUTCOMES)
    return types


@pytest.fixture(autouse=True)
def fast_consumers(monkeypatch: pytest.MonkeyPatch) -> None:
    options = ConsumerOptions(retry_initial=0.001, retry_max=0.01, deadline_rescan_interval=0.01)
    monkeypatch.setattr(
        consumers_module,
        "partition_consumers",
        functools.partial(consumers_module.EventConsumers, options=options),
    )


async def test_bank_scenario_read_models_match_the_reference(tmp_path: Path) -> None:
    await bank_scenario_matches_the_reference(tmp_path)


@needs_uvloop
@pytest.mark.parametrize("anyio_backend", [pytest.param(UVLOOP, id="uvloop")])
async def test_bank_scenario_on_uvloop(tmp_path: Path) -> None:
    # runkit run --backend uvloop: asyncio with uvloop's event loop.
    import asyncio

    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    await bank_scenario_matches_the_reference(tmp_path)


async def bank_scenario_matches_the_reference(tmp_path: Path) -> None:
    reference = App(tmp_path / "reference.sqlite3")
    await run_scenario(reference, out=io.StringIO())
    expected = read_models(tmp_path / "reference.sqlite3")

    app = App(tmp_path / "engine.sqlite3")
    config = build(app)
    engine = Engine.from_settings(
        EngineSettings(
            applications=(config,),
            persistence_provider=MemoryProvider(str(uuid.uuid4())),
            clock=lambda: DEMO_TIME,
            partition_count=4,
            retry_base_delay=0.001,
            retry_max_delay=0.01,
            progress_interval=0.002,
        )
    )

    async def concluded(event: dogma.Event) -> bool:
        return True

    observers = [dogma.observe(t, concluded) for t in outcome_types()]
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        executor = engine.executor_for(config)
        for step in SCENARIO:
            with anyio.fail_after(10):
                await executor.execute_command(step.command, observers=observers)
        await wait_until(lambda: read_models(tmp_path / "engine.sqlite3") == expected, timeout=10)
        tg.cancel_scope.cancel()
    assert read_models(tmp_path / "engine.sqlite3") == expected
    assert expected[2]  # the ledger is not trivially empty
