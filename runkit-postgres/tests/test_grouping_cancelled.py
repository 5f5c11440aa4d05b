"""A write carried by a statement whose runner was cancelled gets a retryable, ambiguous
error (the statement may have committed): the engine then retries or reads back, as it
would for the write alone."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from runkit.persistence import PersistenceError

sys.path.insert(0, str(Path(__file__).parent))
from test_cancellation import RowLock, wait_for_lock_wait
from test_grouping import one_statement  # noqa: F401  (fixture)

pytestmark = pytest.mark.postgres


async def test_a_write_in_a_cancelled_statement_gets_a_retryable_ambiguous_error(
    postgres_dsn: str,
    postgres_schema: str,
    one_statement: Any,  # noqa: F811
) -> None:
    provider, app_name = one_statement
    a, b, c = [await provider.journals.open(name) for name in "abc"]
    lock_a = await anyio.to_thread.run_sync(RowLock, postgres_dsn, postgres_schema, "a")
    lock_b = await anyio.to_thread.run_sync(RowLock, postgres_dsn, postgres_schema, "b")
    errors: dict[str, PersistenceError] = {}
    b_scope = anyio.CancelScope()
    a_done = anyio.Event()

    async def append(name: str, journal: Any, scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            try:
                await journal.append(0, name.encode())
            except PersistenceError as exc:
                errors[name] = exc
        if name == "a":
            a_done.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(append, "a", a)
            await wait_for_lock_wait(postgres_dsn, app_name)
            tg.start_soon(append, "b", b, b_scope)
            await anyio.sleep(0.05)
            tg.start_soon(append, "c", c)
            await anyio.sleep(0.05)
            await anyio.to_thread.run_sync(lock_a.release)
            with anyio.fail_after(10):
                await a_done.wait()
            await wait_for_lock_wait(postgres_dsn, app_name)
            b_scope.cancel()  # cancels the statement carrying `b` and `c`
    finally:
        await anyio.to_thread.run_sync(lock_a.release)
        await anyio.to_thread.run_sync(lock_b.release)
    error = errors["c"]
    assert "may or may not" in str(error)
    assert (error.retryable, error.ambiguous) == (True, True)
