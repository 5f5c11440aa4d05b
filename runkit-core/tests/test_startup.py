"""Start-up: an unreachable store is retried, one line per attempt; a wrong one fails at once."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from runkit.engine.engine import Engine
from runkit.engine.settings import EngineSettings
from runkit.engine.startup import wait_for_store
from runkit.persistence import PersistenceError, StoreUnavailable
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import FAST, setup

LOGGER = "runkit.engine.startup"
SETTINGS: dict[str, Any] = dict(FAST)
LINE = re.compile(
    r"store unreachable \(connection refused\); retrying in \d+\.\d s, giving up in \d+ s"
)


class FlakyProvider(MemoryProvider):
    """A memory provider whose first ``provision()`` calls fail as scripted."""

    def __init__(self, *failures: PersistenceError, hang: bool = False) -> None:
        super().__init__()
        self.failures = list(failures)
        self.hang = hang
        self.attempts = 0

    async def provision(self) -> None:
        self.attempts += 1
        if self.hang:
            await anyio.sleep_forever()
        if self.failures:
            raise self.failures.pop(0)
        await super().provision()


def outage() -> StoreUnavailable:
    return StoreUnavailable("connection refused", retryable=True)


async def test_a_reachable_store_is_provisioned_once(caplog: pytest.LogCaptureFixture) -> None:
    provider = FlakyProvider()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        await wait_for_store(provider, timeout=5)
    assert provider.attempts == 1
    assert caplog.records == []


async def test_an_outage_is_retried_with_one_line_per_attempt(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("runkit.engine.startup.RETRY_BASE", 0.02)
    provider = FlakyProvider(outage(), outage())
    with caplog.at_level(logging.INFO, logger=LOGGER):
        await wait_for_store(provider, timeout=30)

    assert provider.attempts == 3
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert all(LINE.fullmatch(m) for m in messages[:2]), messages
    assert messages[2] == "store reachable after 3 attempts"


async def test_a_configuration_fault_fails_at_once(caplog: pytest.LogCaptureFixture) -> None:
    fault = StoreUnavailable('password authentication failed for user "app"', retryable=False)
    provider = FlakyProvider(fault)
    with caplog.at_level(logging.INFO, logger=LOGGER), pytest.raises(StoreUnavailable) as caught:
        await wait_for_store(provider, timeout=30)

    assert caught.value is fault
    assert provider.attempts == 1
    assert caplog.records == []


async def test_giving_up_after_the_start_timeout_names_the_reason_and_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("runkit.engine.startup.RETRY_BASE", 0.05)
    provider = FlakyProvider(*[outage() for _ in range(1000)])
    started = anyio.current_time()
    with pytest.raises(StoreUnavailable) as caught:
        await wait_for_store(provider, timeout=0.5)

    assert 0.5 <= anyio.current_time() - started < 3
    assert caught.value.retryable
    message = str(caught.value)
    assert message.startswith("the store is still unreachable after 0.5 s (")
    # The likely causes, and every way to wait longer: a node's flag or variable, or code.
    assert message.endswith(
        "attempts): connection refused; check that the store is running and that the "
        "persistence URL names the right host and port; to wait longer, raise the start "
        "timeout (DOGMA_START_TIMEOUT or runkit run --start-timeout; "
        "runkit.with_start_timeout() in code)"
    )


async def test_a_hanging_attempt_says_it_is_still_waiting(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A store that accepts connections but never answers (a wrong port), or a
    # driver retrying inside the call: without this, nothing until the timeout.
    monkeypatch.setattr("runkit.engine.startup.PROGRESS_INTERVAL", 0.01)
    provider = FlakyProvider(hang=True)
    logged = anyio.Event()
    notify = logging.Handler()
    notify.emit = lambda record: logged.set()  # type: ignore[method-assign]
    logging.getLogger(LOGGER).addHandler(notify)
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: wait_for_store(provider, timeout=600))
                with anyio.fail_after(5):
                    await logged.wait()
                tg.cancel_scope.cancel()
    finally:
        logging.getLogger(LOGGER).removeHandler(notify)
    assert re.fullmatch(
        r"no answer from the store yet \(attempt 1, waiting \d+ s\); giving up in \d+ s",
        caplog.records[0].getMessage(),
    )
    assert caplog.records[0].levelno == logging.WARNING


async def test_a_hanging_attempt_is_abandoned_at_the_start_timeout() -> None:
    provider = FlakyProvider(hang=True)
    with anyio.fail_after(5), pytest.raises(StoreUnavailable, match=r"no answer within 1\.0 s"):
        await wait_for_store(provider, timeout=0.2)


async def test_the_engine_waits_for_its_store_before_starting(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("runkit.engine.startup.RETRY_BASE", 0.02)
    provider = FlakyProvider(outage(), outage())
    s = setup()
    engine = Engine.from_settings(
        EngineSettings(
            applications=(s.config,), persistence_provider=provider, start_timeout=30, **SETTINGS
        )
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            with anyio.fail_after(10):
                await engine.runtime(s.config.identity.key)
            tg.cancel_scope.cancel()
    assert provider.attempts >= 3
    assert len([r for r in caplog.records if LINE.fullmatch(r.getMessage())]) == 2


async def test_the_engine_fails_at_once_on_a_configuration_fault(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fault = StoreUnavailable('database "nope" does not exist', retryable=False)
    s = setup()
    engine = Engine.from_settings(
        EngineSettings(
            applications=(s.config,), persistence_provider=FlakyProvider(fault), **SETTINGS
        )
    )
    with (
        caplog.at_level(logging.INFO, logger="runkit.engine"),
        anyio.fail_after(5),
        pytest.raises(StoreUnavailable, match="does not exist"),
    ):
        await engine.run()
    # It never started: an "engine stopped" line before the error misled operators.
    assert "engine stopped" not in [r.getMessage() for r in caplog.records]


async def test_a_started_engine_says_it_stopped(caplog: pytest.LogCaptureFixture) -> None:
    s = setup()
    engine = Engine.from_settings(
        EngineSettings(applications=(s.config,), persistence_provider=MemoryProvider(), **SETTINGS)
    )
    with caplog.at_level(logging.INFO, logger="runkit.engine"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            with anyio.fail_after(10):
                await engine.runtime(s.config.identity.key)
            tg.cancel_scope.cancel()
    assert "engine stopped" in [r.getMessage() for r in caplog.records]
