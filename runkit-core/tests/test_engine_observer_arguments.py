"""``execute_command`` checks its observers before it stores the command."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

import dogma
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import REGISTRY, Deposit, Deposited, Notify, running, setup


async def _saw(event: Any) -> bool:
    return True


def _sync_saw(event: Any) -> bool:
    return True


async def test_observers_given_as_a_generator_are_waited_for() -> None:
    # They were taken twice: the second time (waiting) found none, and a
    # satisfiable observer was reported as one that can never be satisfied.
    s = setup()
    async with running(MemoryProvider(f"observers-{uuid.uuid4()}"), s.config) as engine:
        with anyio.fail_after(10):
            await engine.executor_for(s.app).execute_command(
                Deposit("acc", 1, "gen"),
                observers=(o for o in [dogma.observe(Deposited, _saw, registry=REGISTRY)]),  # type: ignore[arg-type]
            )


@pytest.mark.parametrize(
    ("observer", "message"),
    [
        (object(), "dogma.EventObserver"),
        (dogma.EventObserver(Notify, _saw), "dogma.Event class"),  # type: ignore[type-var]
        (dogma.EventObserver(Deposited, _sync_saw), "async callable"),  # type: ignore[arg-type]
        (dogma.EventObserver(Deposited, "not callable"), "async callable"),  # type: ignore[arg-type]
    ],
    ids=["not-an-observer", "not-an-event", "sync-fn", "not-callable"],
)
async def test_an_observer_dogma_observe_would_refuse_is_refused_before_the_command_is_stored(
    observer: Any, message: str
) -> None:
    s = setup()
    async with running(MemoryProvider(f"observers-{uuid.uuid4()}"), s.config) as engine:
        with anyio.fail_after(10), pytest.raises(TypeError, match=message):
            await engine.executor_for(s.app).execute_command(
                Deposit("acc", 1, "refused"), observers=[observer]
            )
        await anyio.sleep(0.2)
    assert not [c for c in s.accounts.calls if c[1] == "refused"], "executed all the same"
