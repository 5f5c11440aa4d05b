"""Statement groups: concurrent appends to different journals, concurrent
compare-and-sets of different keys, and concurrent gets, share statements.

Each write keeps its own outcome (written or ``Conflict``) whatever else its
statement carried; a statement cancelled with the call running it fails the
others in it with a retryable, ambiguous ``PersistenceError`` and leaves the
provider usable (one implementation, ``_grouping``, shown with appends).
"""

from __future__ import annotations

import contextlib
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


def count_statements(group: Any) -> list[str]:
    """Record the label of every statement the write *group* runs from now on."""
    run: Callable[..., Awaitable[set[Any]]] = group._run
    labels: list[str] = []

    async def counting(operation: Any, what: str, /, **options: Any) -> set[Any]:
        labels.append(what)
        return await run(operation, what, **options)

    group._run = counting
    return labels


async def test_appends_to_many_journals_share_statements_and_keep_their_outcomes(
    pg_provider: PostgresProvider,
) -> None:
    journals = [await pg_provider.journals.open(f"j{i}") for i in range(40)]
    for journal in journals[::2]:
        await journal.append(0, b"<taken>")  # position 0 of these now conflicts
    statements = count_statements(pg_provider._appends)
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
    errors: dict[str, PersistenceError] = {}
    b_scope = anyio.CancelScope()

    a_done = anyio.Event()

    async def append(name: str, journal: Any, scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            try:
                await journal.append(0, name.encode())
                outcomes[name] = "appended"
            except PersistenceError as exc:
                outcomes[name] = f"error: {exc}"
                errors[name] = exc
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
    # The statement may have committed: retryable and ambiguous, as for the
    # write alone, so callers retry or read back instead of giving up.
    assert (errors["c"].retryable, errors["c"].ambiguous) == (True, True)
    # Cancelled server-side: neither landed, and both journals take the append again.
    assert await b.bounds() == Interval(0, 0)
    assert await c.bounds() == Interval(0, 0)
    await b.append(0, b"b")
    await c.append(0, b"c")
    assert [await j.bounds() for j in (a, b, c)] == [Interval(0, 1)] * 3


async def test_a_cancelled_append_another_statement_carries_never_lands_after_it_returned(
    postgres_dsn: str, postgres_schema: str, one_statement: tuple[PostgresProvider, str]
) -> None:
    # `b`'s statement carries `v`'s append; `v`'s caller is cancelled while
    # it is blocked on a row lock. Returning at once would leave it to land
    # when the lock goes: it must stop the statement first (`b` goes on alone).
    provider, app_name = one_statement
    a, b, v = [await provider.journals.open(name) for name in "abv"]
    lock_a = await anyio.to_thread.run_sync(RowLock, postgres_dsn, postgres_schema, "a")
    lock_b = await anyio.to_thread.run_sync(RowLock, postgres_dsn, postgres_schema, "b")
    statements: list[str] = []
    second = anyio.Event()  # `b`'s statement, carrying `v`'s append, started
    run = provider._appends._run

    async def watching(operation: Any, what: str, /, **options: Any) -> set[Any]:
        statements.append(what)
        if len(statements) == 2:
            second.set()
        return await run(operation, what, **options)

    provider._appends._run = watching
    v_scope = anyio.CancelScope()
    v_returned = anyio.Event()
    bounds_when_v_returned: list[Interval] = []

    async def append_v() -> None:
        with v_scope:
            await v.append(0, b"v")
        bounds_when_v_returned.append(await v.bounds())
        v_returned.set()

    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.append, 0, b"a")  # the only slot, blocked on its lock
                await wait_for_lock_wait(postgres_dsn, app_name)
                tg.start_soon(b.append, 0, b"b")
                await anyio.sleep(0.05)
                tg.start_soon(append_v)
                await anyio.sleep(0.05)
                await anyio.to_thread.run_sync(lock_a.release)
                await second.wait()
                await wait_for_lock_wait(postgres_dsn, app_name)
                v_scope.cancel()
                await v_returned.wait()
                await anyio.to_thread.run_sync(lock_b.release)
    finally:
        await anyio.to_thread.run_sync(lock_a.release)
        await anyio.to_thread.run_sync(lock_b.release)
    assert statements[1].endswith("(with 1 more)"), statements
    assert v_scope.cancelled_caught
    assert bounds_when_v_returned == [Interval(0, 0)]
    assert await v.bounds() == Interval(0, 0), "the cancelled append landed after it returned"
    assert [await j.bounds() for j in (a, b)] == [Interval(0, 1)] * 2
    await v.append(0, b"v")


async def test_sets_of_many_keys_share_statements_and_keep_their_outcomes(
    pg_provider: PostgresProvider,
) -> None:
    """Inserts and updates, half of them conflicting, in few statements over two keyspaces."""
    spaces = [await pg_provider.keyspaces.open(name) for name in ("ks-a", "ks-b")]
    revisions: dict[tuple[int, int], str] = {}
    for s in range(2):
        for i in range(0, 40, 4):  # these keys exist: an insert of them conflicts
            revisions[(s, i)] = await spaces[s].set(f"k{i}".encode(), b"<old>", "")
        for i in range(2, 40, 4):  # these exist and are updated on their revision
            revisions[(s, i)] = await spaces[s].set(f"k{i}".encode(), b"<old>", "")
    statements = count_statements(pg_provider._keyspace_writes)
    outcomes: dict[tuple[int, int], str] = {}

    async def write(s: int, i: int) -> None:
        if i % 4 == 0:
            revision = ""  # insert of a present key: conflicts
        elif i % 4 == 2:
            revision = revisions[(s, i)] if i % 8 == 2 else "0" * 32  # half stale
        else:
            revision = ""  # insert of an absent key
        try:
            revisions[(s, i)] = await spaces[s].set(
                f"k{i}".encode(), f"<{s}.{i}>".encode(), revision
            )
            outcomes[(s, i)] = "set"
        except Conflict:
            outcomes[(s, i)] = "conflict"

    async with anyio.create_task_group() as tg:
        for s in range(2):
            for i in range(40):
                tg.start_soon(write, s, i)
    want_set = {(s, i) for s in range(2) for i in range(40) if i % 2 == 1 or i % 8 == 2}
    assert outcomes == {
        (s, i): "set" if (s, i) in want_set else "conflict" for s in range(2) for i in range(40)
    }
    assert len(statements) < 40, statements  # 80 writes, a few statements
    assert any(label.endswith("more)") for label in statements)  # several rows in one
    for s in range(2):
        for i in range(40):
            value, revision = await spaces[s].get(f"k{i}".encode())
            assert value == (f"<{s}.{i}>".encode() if (s, i) in want_set else b"<old>")
            assert revision == revisions[(s, i)]


async def test_two_sets_of_one_key_on_one_revision_one_wins(
    pg_provider: PostgresProvider,
) -> None:
    ks = await pg_provider.keyspaces.open("ks")
    revision = await ks.set(b"k", b"<first>", "")
    won: list[tuple[bytes, str]] = []

    async def write(data: bytes) -> None:
        with contextlib.suppress(Conflict):
            won.append((data, await ks.set(b"k", data, revision)))

    async def insert(data: bytes) -> None:
        with contextlib.suppress(Conflict):
            won.append((data, await ks.set(b"new", data, "")))

    async with anyio.create_task_group() as tg:
        for data in (b"<a>", b"<b>", b"<c>"):
            tg.start_soon(write, data)
            tg.start_soon(insert, data)
    assert len(won) == 2  # one update of "k", one insert of "new"
    assert {await ks.get(b"k"), await ks.get(b"new")} == set(won)


async def test_gets_of_many_keys_share_statements_and_each_finds_its_own(
    pg_provider: PostgresProvider,
) -> None:
    spaces = [await pg_provider.keyspaces.open(name) for name in ("ks-a", "ks-b")]
    revisions: dict[tuple[int, int], str] = {}
    for s in range(2):
        for i in range(0, 40, 2):  # the odd keys are absent
            revisions[(s, i)] = await spaces[s].set(f"k{i}".encode(), f"<{s}.{i}>".encode(), "")
    statements = count_statements(pg_provider._keyspace_reads)
    found: dict[tuple[int, int], tuple[bytes, str]] = {}

    async def get(s: int, i: int) -> None:
        found[(s, i)] = await spaces[s].get(f"k{i}".encode())

    hot: list[tuple[bytes, str]] = []

    async def get_hot() -> None:
        hot.append(await spaces[0].get(b"k0"))

    async with anyio.create_task_group() as tg:
        for s in range(2):
            for i in range(40):
                tg.start_soon(get, s, i)
        for _ in range(5):  # gets of one key may share a statement too
            tg.start_soon(get_hot)
    assert found == {
        (s, i): (f"<{s}.{i}>".encode(), revisions[(s, i)]) if i % 2 == 0 else (b"", "")
        for s in range(2)
        for i in range(40)
    }
    assert hot == [(b"<0.0>", revisions[(0, 0)])] * 5
    assert len(statements) < 40, statements  # 80 gets, a few statements
    assert any(label.endswith("more)") for label in statements)


class HeldReads:
    """A provider's read group with one statement slot, whose first two statements are held.

    The first (``z``'s) holds the slot until ``first_go`` is set, so that other
    gets queue behind it; the second, carrying what queued, never ends (until
    its caller is cancelled). Later statements run.
    """

    def __init__(self, provider: PostgresProvider) -> None:
        self.group = provider._keyspace_reads
        self.group._max_statements = 1
        self.run = self.group._run
        self.group._run = self.holding
        self.first_held, self.first_go, self.second_held = (
            anyio.Event(),
            anyio.Event(),
            anyio.Event(),
        )
        self.statements: list[str] = []

    async def holding(self, operation: Any, what: str, /, **options: Any) -> Any:
        self.statements.append(what)
        if len(self.statements) == 1:
            self.first_held.set()
            await self.first_go.wait()
        elif len(self.statements) == 2:
            self.second_held.set()
            await anyio.sleep_forever()
        return await self.run(operation, what, **options)


async def test_a_cancelled_read_statement_reads_the_others_again(
    one_statement: tuple[PostgresProvider, str],
) -> None:
    # A get has no outcome to be unsure about: cancelled with the caller that
    # ran their statement, the others' gets go into the next one.
    provider, _ = one_statement
    ks = await provider.keyspaces.open("ks")
    for name in "zabc":
        await ks.set(name.encode(), f"<{name}>".encode(), "")
    held = HeldReads(provider)  # z's statement, then a's carrying b and c
    found: dict[str, tuple[bytes, str]] = {}
    a_scope = anyio.CancelScope()

    async def get(name: str, scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            found[name] = await ks.get(name.encode())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(get, "z")
            await held.first_held.wait()
            tg.start_soon(get, "a", a_scope)
            await anyio.sleep(0.01)
            for name in "bc":
                tg.start_soon(get, name)
            await anyio.sleep(0.01)
            held.first_go.set()
            await held.second_held.wait()
            a_scope.cancel()  # the caller running the statement of a, b and c
    assert held.statements[1].endswith("(with 2 more)"), held.statements
    assert sorted(found) == ["b", "c", "z"]
    assert [found[name][0] for name in "bcz"] == [b"<b>", b"<c>", b"<z>"]


async def test_a_read_whose_caller_left_is_not_queued_again(
    one_statement: tuple[PostgresProvider, str],
) -> None:
    # `b`'s caller leaves while its read rides in `a`'s statement; then `a`'s
    # is cancelled too. Queued again, `b`'s read would have nobody waiting on
    # it, and `c`, queued behind it with no statement running, would hang.
    provider, _ = one_statement
    ks = await provider.keyspaces.open("ks")
    for name in "zabc":
        await ks.set(name.encode(), f"<{name}>".encode(), "")
    held = HeldReads(provider)  # z's statement, then a's carrying b
    found: dict[str, tuple[bytes, str]] = {}
    scopes = {name: anyio.CancelScope() for name in "zabc"}

    async def get(name: str) -> None:
        with scopes[name]:
            found[name] = await ks.get(name.encode())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(get, "z")
            await held.first_held.wait()
            for name in "ab":
                tg.start_soon(get, name)
                await anyio.sleep(0.01)
            held.first_go.set()
            await held.second_held.wait()
            scopes["b"].cancel()
            await anyio.sleep(0.01)
            tg.start_soon(get, "c")  # waits: the one statement slot is taken
            await anyio.sleep(0.01)
            scopes["a"].cancel()
    assert held.statements[1].endswith("(with 1 more)"), held.statements
    assert sorted(found) == ["c", "z"]
    assert found["c"][0] == b"<c>"
    assert list(held.group._queue) == []
