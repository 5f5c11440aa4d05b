"""Cancelling an operation (an anyio cancel scope) cancels its statement server-side.

The statement under test is an append blocked behind the journal's row lock,
held by another session: if the cancel did not reach the server, the append
would complete as soon as the lock is released.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import anyio.to_thread
import psycopg
import pytest
from psycopg import sql

from runkit.persistence import Interval, Journal, PersistenceError
from runkit_postgres import PostgresProvider
from runkit_postgres.testing import PostgresServer, unique_schema

pytestmark = pytest.mark.postgres


def _rows(dsn: str, statement: bytes, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(statement, params or None)
        return cursor.fetchall() if cursor.description else []


async def sessions(dsn: str, application_name: str) -> list[tuple[object, ...]]:
    """``(pid, state, wait_event_type)`` of each session of *application_name*."""
    statement = (
        b"SELECT pid, state, wait_event_type FROM pg_stat_activity"
        b" WHERE application_name = %s ORDER BY pid"
    )
    return await anyio.to_thread.run_sync(_rows, dsn, statement, application_name)


async def wait_for_lock_wait(dsn: str, application_name: str) -> None:
    # Polling: the server offers no notification for "a session started waiting".
    while True:
        if any(s[2] == "Lock" for s in await sessions(dsn, application_name)):
            return
        await anyio.sleep(0.01)


class RowLock:
    """Another session holding the journal row lock (FOR UPDATE) until released."""

    def __init__(self, dsn: str, schema: str, name: str) -> None:
        self._conn = psycopg.connect(dsn)
        statement = sql.SQL("SELECT FROM {}.journals WHERE name = %s FOR UPDATE")
        self._conn.execute(statement.format(sql.Identifier(schema)), (name.encode(),))

    def release(self) -> None:
        """Commit, releasing the lock. Idempotent."""
        if not self._conn.closed:
            self._conn.commit()
            self._conn.close()


@pytest.fixture
def app_name() -> str:
    return f"cancel-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def single(
    postgres_dsn: str, postgres_schema: str, app_name: str
) -> AsyncIterator[PostgresProvider]:
    """A provider with exactly one connection, so reuse of that connection is visible."""
    dsn = f"{postgres_dsn} application_name={app_name}"
    async with PostgresProvider(
        dsn, schema=postgres_schema, pool_min_size=1, pool_max_size=1, pool_timeout=10
    ) as provider:
        yield provider


async def test_cancelled_append_is_cancelled_server_side_and_connection_is_reused(
    postgres_dsn: str, postgres_schema: str, app_name: str, single: PostgresProvider
) -> None:
    journal = await single.journals.open("j")
    await journal.append(0, b"<zero>")
    [(pid, _, _)] = await sessions(postgres_dsn, app_name)
    lock = await anyio.to_thread.run_sync(RowLock, postgres_dsn, postgres_schema, "j")
    try:
        scope = anyio.CancelScope()

        async def append() -> None:
            with scope:
                await journal.append(1, b"<blocked>")

        async with anyio.create_task_group() as tg:
            tg.start_soon(append)
            await wait_for_lock_wait(postgres_dsn, app_name)
            scope.cancel()
        assert scope.cancelled_caught
        # The statement is gone from the server while the lock is still held...
        assert await sessions(postgres_dsn, app_name) == [(pid, "idle", "Client")]
    finally:
        await anyio.to_thread.run_sync(lock.release)
    # ... so releasing the lock does not let it complete.
    assert await journal.bounds() == Interval(0, 1)
    # The same connection serves the next operation.
    await journal.append(1, b"<one>")
    assert await journal.get(1) == b"<one>"
    assert [s[0] for s in await sessions(postgres_dsn, app_name)] == [pid]


async def test_timeout_cancels_an_operation_waiting_for_a_connection(
    postgres_dsn: str, postgres_schema: str, app_name: str, single: PostgresProvider
) -> None:
    journal = await single.journals.open("j")
    lock = await anyio.to_thread.run_sync(RowLock, postgres_dsn, postgres_schema, "j")
    outcome: list[str] = []
    try:

        async def blocked_append() -> None:
            await journal.append(0, b"<zero>")
            outcome.append("appended")

        async with anyio.create_task_group() as tg:
            tg.start_soon(blocked_append)
            await wait_for_lock_wait(postgres_dsn, app_name)
            # The only connection is busy: this waits in the pool until cancelled.
            with anyio.move_on_after(0.2) as scope:
                await journal.bounds()
            assert scope.cancelled_caught
            await anyio.to_thread.run_sync(lock.release)
    finally:
        await anyio.to_thread.run_sync(lock.release)
    assert outcome == ["appended"]
    assert await journal.bounds() == Interval(0, 1)


async def test_cancelling_many_operations_leaves_the_pool_usable(
    postgres_dsn: str, postgres_schema: str
) -> None:
    async with PostgresProvider(
        postgres_dsn, schema=postgres_schema, pool_max_size=3, pool_timeout=10
    ) as provider:
        journal = await provider.journals.open("j")
        for position in range(50):
            await journal.append(position, b"<r>")

        async def reader(handle: Journal) -> None:
            while True:
                async for _ in handle.range(0):
                    await anyio.lowlevel.checkpoint()

        for _ in range(5):
            with anyio.move_on_after(0.05):
                async with anyio.create_task_group() as tg:
                    for _ in range(8):
                        tg.start_soon(reader, journal)
        await journal.append(50, b"<last>")
        assert [p async for p, _ in journal.range(45)] == [45, 46, 47, 48, 49, 50]


async def test_cancelled_range_leaves_the_journal_usable(single: PostgresProvider) -> None:
    single.page_rows = 2  # type: ignore[misc]  # instance override of the class default
    journal = await single.journals.open("j")
    for position in range(6):
        await journal.append(position, b"<r>")
    seen: list[int] = []
    with anyio.CancelScope() as scope:
        async for position, _ in journal.range(0):
            seen.append(position)
            if position == 2:
                scope.cancel()
                await anyio.lowlevel.checkpoint()
    assert seen == [0, 1, 2]
    assert await journal.bounds() == Interval(0, 6)


async def test_a_connection_closed_after_a_late_cancel_is_not_reported_as_lost(
    postgres_dsn: str,
    app_name: str,
    single: PostgresProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The driver closes a connection a cancel request may still hit: no outage warning."""
    caplog.set_level(logging.INFO)
    journal = await single.journals.open("j")
    [(pid, _, _)] = await sessions(postgres_dsn, app_name)
    # Cancelled while it holds the connection between statements: the cancel
    # request finds no statement, so the driver must not reuse the connection.
    started = threading.Event()

    def sleep(conn: object) -> None:
        started.set()
        time.sleep(0.3)

    async with anyio.create_task_group() as tg:
        scope = anyio.CancelScope()

        async def run() -> None:
            with scope:
                await single._run(sleep, what="sleep", write=False)

        tg.start_soon(run)
        # Cancelled once the worker thread holds the connection, not before.
        assert await anyio.to_thread.run_sync(started.wait, 10)
        scope.cancel()
    assert scope.cancelled_caught
    assert await journal.bounds() == Interval(0, 0)
    assert [s[0] for s in await sessions(postgres_dsn, app_name)] != [pid]  # a new connection
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []


def test_a_cancel_the_server_cannot_take_is_one_line_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # During an outage the cancel request itself fails: expected, so the log
    # says so in one line (operators grep node logs for tracebacks).
    from runkit_postgres._executor import _Call

    class Gone:
        def fileno(self) -> int:
            raise psycopg.OperationalError("the connection is closed")

        def cancel_safe(self, timeout: float) -> None:
            raise psycopg.OperationalError(
                "cancellation failed: connection to server failed: server closed the "
                "connection unexpectedly\n\tThis probably means the server terminated"
            )

    provider = PostgresProvider("host=127.0.0.1 password=hunter2")
    call = _Call()
    call.conn = Gone()  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="runkit_postgres"):
        provider._executor._cancel(call)
    [record] = caplog.records
    assert record.exc_info is None
    assert "could not cancel a statement server-side" in record.getMessage()
    assert "server closed the connection unexpectedly" in record.getMessage()
    assert call.cancel_sent


async def test_a_statement_on_a_server_that_stops_answering_does_not_hold_its_thread(
    postgres_dsn: str,
    postgres_schema: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The backend is stopped (SIGSTOP: a hung server, or a network that drops
    # packets): the cancel request is taken but the statement never ends. The
    # worker thread must not stay blocked on the socket for ever (it would
    # hold the process open at exit): its connection is shut down.
    import os
    import signal

    from runkit_postgres import _executor

    monkeypatch.setattr(_executor, "_CANCEL_TIMEOUT", 0.5)
    started, ended = threading.Event(), threading.Event()
    backend: list[int] = []

    def sleep(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        backend.append(conn.info.backend_pid)
        started.set()
        try:
            conn.execute("SELECT pg_sleep(60)")
        finally:
            ended.set()

    provider = PostgresProvider(
        postgres_dsn, schema=postgres_schema, pool_min_size=1, pool_max_size=2
    )
    try:
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def run() -> None:
                with scope:
                    await provider._executor.run(sleep, what="sleep", write=False)

            tg.start_soon(run)
            await anyio.to_thread.run_sync(started.wait, 10)
            os.kill(backend[0], signal.SIGSTOP)
            try:
                scope.cancel()
                with anyio.fail_after(10):
                    await anyio.to_thread.run_sync(ended.wait, 10)
                assert ended.is_set()
            finally:
                os.kill(backend[0], signal.SIGCONT)
        assert "its connection is dropped" in caplog.text
        # The pool serves the next operation on a new connection.
        journal = await provider.journals.open(f"after-{uuid.uuid4().hex[:8]}")
        await journal.append(0, b"<zero>")
    finally:
        await provider.close()


@pytest.fixture(scope="module")
def stoppable_server() -> Iterator[PostgresServer]:
    """A server of this module's own, which a test may stop and start again.

    Synchronous commits, so that the schemas made before a stop survive it.
    """
    with PostgresServer(use_environment=False, settings={"synchronous_commit": "on"}) as server:
        yield server


@asynccontextmanager
async def outage_journal(
    server: PostgresServer, *, pool_timeout: float
) -> AsyncIterator[tuple[PostgresProvider, Journal]]:
    """A journal holding one record on a two-connection provider; the block runs in an outage.

    Once the server is back, the journal reads as before (nothing was lost or
    half-written).
    """
    provider = PostgresProvider(
        server.dsn,
        schema=unique_schema(),
        pool_min_size=1,
        pool_max_size=2,
        pool_timeout=pool_timeout,
    )
    try:
        journal = await provider.journals.open("j")
        await journal.append(0, b"<zero>")
        server.pause()
        try:
            yield provider, journal
        finally:
            server.resume()
        with anyio.fail_after(30):
            assert await journal.bounds() == Interval(0, 1)
    finally:
        with anyio.CancelScope(shield=True):
            await provider.close()


async def test_callers_timing_out_during_an_outage_do_not_pile_up_threads(
    stoppable_server: PostgresServer,
) -> None:
    # Each call waits for a connection that cannot come (up to pool_timeout)
    # and is cancelled first. A thread waiting in the pool gave its place up
    # when its caller left (anyio's asyncio backend releases a limiter's token
    # when the call is abandoned), so the next call started another: threads
    # grew by one per call, beyond pool_max_size.
    async with outage_journal(stoppable_server, pool_timeout=20) as (_, journal):
        base = peak = threading.active_count()
        for _ in range(20):
            with anyio.move_on_after(0.1), contextlib.suppress(PersistenceError):
                await journal.bounds()
            peak = max(peak, threading.active_count())
    # At most a worker and its canceller per place.
    assert peak - base <= 2 * 2, (base, peak)


async def test_callers_waiting_through_an_outage_leave_no_queue_behind(
    stoppable_server: PostgresServer,
) -> None:
    # A worker waits for a connection in short slices (to notice that its caller
    # left); psycopg_pool kept every timed-out slice's place in its queue until
    # a connection came back: about 20 a second per waiting thread.
    async with outage_journal(stoppable_server, pool_timeout=30) as (provider, journal):
        pool = provider._executor._pool
        assert pool is not None

        async def call() -> None:
            with anyio.move_on_after(2), contextlib.suppress(PersistenceError):
                await journal.bounds()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            tg.start_soon(call)
        waiting = len(pool._waiting)
    assert waiting <= 4, f"{waiting} waiters queued after a 2 s outage"
