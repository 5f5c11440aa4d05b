"""Group append: concurrent appends to different journals share statements.

Each append keeps its own outcome (appended or ``Conflict``) whatever else its
statement carried; a statement cancelled with the call running it fails the
others in it with a retryable, ambiguous ``PersistenceError`` and leaves the
provider usable.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from runkit.persistence import Conflict, Interval, PersistenceError
from runkit_postgres import PostgresProvider

sys.path.insert(0, str(Path(__file__).parent))
from test_cancellation import RowLock, wait_for_lock_wait

pytestmark = pytest.mark.postgres


def count_statements(provider: PostgresProvider) -> list[str]:
    """Record the label of every append statement *provider* runs from now on."""
    appender: Any = provider._appends
    run: Callable[[Any, str], Awaitable[set[int]]] = appender._run
    labels: list[str] = []

    async def counting(operation: Any, what: str) -> set[int]:
        labels.append(what)
        return await run(operation, what)

    appender._run = counting
    return labels


async def test_appends_to_many_journals_share_statements_and_keep_their_outcomes(
    pg_provider: PostgresProvider,
) -> None:
    journals = [await pg_provider.journals.open(f"j{i}") for i in range(40)]
    for journal in journals[::2]:
        await journal.append(0, b"<taken>")  # position 0 of these now conflicts
    statements = count_statements(pg_provider)
    outcomes: dict[int, str] = {}

    async def append(i: int) -> None:
        try:
            await journals[i].append(0, f"<{i}>".encode())
            outcomes[i] = "appended"
        except Conflict:
            outcomes[i] = "conflict"

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(append, i)
    assert outcomes == {i: "conflict" if i % 2 == 0 else "appended" for i in range(40)}
    assert len(statements) < 20, statements  # 40 appends, a few statements
    for i, journal in enumerate(journals):
        assert await journal.bounds() == Interval(0, 1)
        assert await journal.get(0) == (b"<taken>" if i % 2 == 0 else f"<{i}>".encode())


async def test_two_appends_at_one_position_of_one_journal_one_wins(
    pg_provider: PostgresProvider,
) -> None:
    journal = await pg_provider.journals.open("j")
    won: list[bytes] = []

    async def append(data: bytes) -> None:
        try:
            await journal.append(0, data)
            won.append(data)
        except Conflict:
            pass

    async with anyio.create_task_group() as tg:
        for data in (b"<a>", b"<b>", b"<c>"):
            tg.start_soon(append, data)
    assert len(won) == 1
    assert await journal.get(0) == won[0]
    await journal.append(1, b"<next>")
    assert await journal.bounds() == Interval(0, 2)


@pytest.fixture
async def one_statement(
    postgres_dsn: str, postgres_schema: str
) -> AsyncIterator[tuple[PostgresProvider, str]]:
    """A provider with one append statement in flight at a time (two connections)."""
    app_name = f"group-{uuid.uuid4().hex[:12]}"
    async with PostgresProvider(
        f"{postgres_dsn} application_name={app_name}",
        schema=postgres_schema,
        pool_min_size=1,
        pool_max_size=2,
        pool_timeout=10,
    ) as provider:
        yield provider, app_name


async def test_a_cancelled_statement_fails_the_appends_it_carried_and_nothing_else(
    postgres_dsn: str, postgres_schema: str, one_statement: tuple[PostgresProvider, str]
) -> None:
    provider, app_name = one_statement
    a, b, c = [await provider.journals.open(name) for name in "abc"]
    lock_a = await anyio.to_thread.run_sync(RowLock, postgres_dsn, postgres_schema, "a")
    lock_b = await anyio.to_thread.run_sync(RowLock, postgres_dsn, postgres_schema, "b")
    outcomes: dict[str, str] = {}
    b_scope = anyio.CancelScope()

    a_done = anyio.Event()

    async def append(name: str, journal: Any, scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            try:
                await journal.append(0, name.encode())
                outcomes[name] = "appended"
            except PersistenceError as exc:
                outcomes[name] = f"error: {exc}"
        if scope is not None and scope.cancelled_caught:
            outcomes[name] = "cancelled"
        if name == "a":
            a_done.set()

    try:
        async with anyio.create_task_group() as tg:
            # `a` takes the only slot and blocks on its row lock; `b` and `c`
            # queue and then go in one statement, which blocks on `b`'s lock.
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
    assert outcomes["a"] == "appended"
    assert outcomes["b"] == "cancelled"
    assert outcomes["c"].startswith("error: ")
    assert "may or may not" in outcomes["c"]
    # Cancelled server-side: neither landed, and both journals take the append again.
    assert await b.bounds() == Interval(0, 0)
    assert await c.bounds() == Interval(0, 0)
    await b.append(0, b"b")
    await c.append(0, b"c")
    assert [await j.bounds() for j in (a, b, c)] == [Interval(0, 1)] * 3
