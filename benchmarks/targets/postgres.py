"""Benchmark target: the PostgreSQL driver, with a raw psycopg baseline.

Starts its own throwaway server (``runkit_postgres.testing.PostgresServer``,
durable settings unless ``RUNKIT_BENCH_PG_FAST=1``), or uses
``RUNKIT_TEST_PG_DSN``. The pool size is ``RUNKIT_BENCH_PG_POOL`` (default 8),
the same for the driver and the baseline.

The baseline issues the driver's own SQL (``runkit_postgres._sql.Statements``)
with the same pool settings, per-connection setup, prepared statements and
worker-thread limiter, but none of the driver's work around it: no input
validation, error mapping, retries or cancellation handling.

``WriteTransactions`` counts the server's committed write transactions (the
transaction IDs it has assigned): the durable writes PostgreSQL made, however
many grouped writes each statement carried.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar, cast

import anyio
import anyio.to_thread
import psycopg
from psycopg import Connection
from psycopg_pool import ConnectionPool

from runkit.persistence import Conflict, RecordNotFound
from runkit_postgres import PostgresProvider
from runkit_postgres._sql import Statements, configure_connection
from runkit_postgres.testing import PostgresServer, drop_schema

from . import Target

NAME = "postgres"

T = TypeVar("T")
H = TypeVar("H")
Conn = Connection[tuple[object, ...]]


class _Raw:
    """Shared by the baseline handles: the pool, the limiter and the statements."""

    def __init__(self, dsn: str, schema: str, pool_size: int) -> None:
        self.pool: ConnectionPool[Conn] = ConnectionPool(
            dsn,
            kwargs={"autocommit": True},
            min_size=pool_size,
            max_size=pool_size,
            configure=configure_connection,
            open=True,
        )
        self.limiter = anyio.CapacityLimiter(pool_size)
        self.st = Statements.for_schema(schema)
        self.page_rows = PostgresProvider.page_rows
        self.page_bytes = PostgresProvider.page_bytes

    async def run(self, fn: Callable[[Conn], T]) -> T:
        def work() -> T:
            with self.pool.connection() as conn:
                return fn(conn)

        return await anyio.to_thread.run_sync(work, limiter=self.limiter)

    async def open_id(self, query: bytes, name: str) -> int:
        encoded = name.encode()
        row = await self.run(lambda c: c.execute(query, (encoded, encoded)).fetchone())
        assert row is not None
        return cast(int, row[0])


class _RawJournal:
    def __init__(self, raw: _Raw, journal_id: int, name: str) -> None:
        self._raw, self._id, self._name = raw, journal_id, name

    async def append(self, position: int, record: bytes) -> None:
        q, params = self._raw.st.journal_append, (self._id, position, position, record)
        count = await self._raw.run(
            lambda c: c.execute(q, params, prepare=True, binary=True).rowcount
        )
        if not count:
            raise Conflict.journal(self._name, position)

    async def get(self, position: int) -> bytes:
        q, params = self._raw.st.journal_get, (self._id, position)
        row = await self._raw.run(
            lambda c: c.execute(q, params, prepare=True, binary=True).fetchone()
        )
        if row is None:
            raise RecordNotFound(self._name, position)
        return cast(bytes, row[0])

    async def range(self, position: int) -> AsyncIterator[tuple[int, bytes]]:
        raw, q = self._raw, self._raw.st.journal_page
        while True:
            params = (position, raw.page_rows, raw.page_bytes, self._id)

            def page(c: Conn, params: tuple[object, ...] = params) -> list[tuple[object, ...]]:
                return c.execute(q, params, prepare=True, binary=True).fetchall()

            rows = await raw.run(page)
            end = cast(int, rows[0][1])
            for _, _, found, record in rows:
                if found is None:
                    break
                yield cast(int, found), cast(bytes, record)
                position = cast(int, found) + 1
            if position >= end:
                return


class _RawKeyspace:
    def __init__(self, raw: _Raw, keyspace_id: int) -> None:
        self._raw, self._id = raw, keyspace_id

    async def get(self, key: bytes) -> tuple[bytes, str]:
        q, params = self._raw.st.keyspace_get, (self._id, key)
        row = await self._raw.run(
            lambda c: c.execute(q, params, prepare=True, binary=True).fetchone()
        )
        if row is None:
            return b"", ""
        return cast(bytes, row[0]), cast(uuid.UUID, row[1]).hex

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        new = uuid.uuid4()
        st = self._raw.st
        params: tuple[object, ...]
        if revision:
            q, params = st.keyspace_update, (value, new, self._id, key, uuid.UUID(hex=revision))
        else:
            q, params = st.keyspace_insert, (self._id, key, value, new)
        count = await self._raw.run(
            lambda c: c.execute(q, params, prepare=True, binary=True).rowcount
        )
        if count != 1:
            raise Conflict.keyspace("raw", key, revision)
        return new.hex


class _RawSet:
    def __init__(self, raw: _Raw, set_id: int) -> None:
        self._raw, self._id = raw, set_id

    async def add(self, member: bytes) -> None:
        q, params = self._raw.st.set_add, (self._id, member)
        await self._raw.run(lambda c: c.execute(q, params, prepare=True, binary=True).rowcount)


class _RawStore(Generic[H]):
    def __init__(self, raw: _Raw, query: bytes, make: Callable[[int, str], H]) -> None:
        self._raw, self._query, self._make = raw, query, make

    async def open(self, name: str) -> H:
        return self._make(await self._raw.open_id(self._query, name), name)


class RawPostgres:
    """The baseline: the driver's statements issued with psycopg directly."""

    def __init__(self, dsn: str, schema: str, pool_size: int) -> None:
        self._raw = raw = _Raw(dsn, schema, pool_size)
        self.journals = _RawStore(raw, raw.st.open_journal, lambda i, n: _RawJournal(raw, i, n))
        self.keyspaces = _RawStore(raw, raw.st.open_keyspace, lambda i, n: _RawKeyspace(raw, i))
        self.sets = _RawStore(raw, raw.st.open_set, lambda i, n: _RawSet(raw, i))

    def close(self) -> None:
        self._raw.pool.close()


class WriteTransactions:
    """The server's write transactions so far: a count whose differences are exact.

    PostgreSQL assigns a transaction ID to each transaction that writes (a
    read-only one gets none), so the difference of ``pg_current_xact_id()``
    between two readings counts the write transactions committed or rolled
    back in between (none roll back here, bar a conflicting statement, which
    is a write the server did make). Each reading assigns one ID itself; the
    count leaves those out. Server-wide: use a server that runs only the
    benchmark.
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: Conn | None = None
        self._readings = 0

    def _read(self) -> int:
        if self._conn is None:
            self._conn = psycopg.connect(self._dsn, autocommit=True)
        row = self._conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
        assert row is not None
        self._readings += 1
        return cast(int, row[0]) - self._readings

    async def __call__(self) -> int:
        return await anyio.to_thread.run_sync(self._read)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@asynccontextmanager
async def open_target() -> AsyncIterator[Target]:
    """Start a server; yield the driver and the raw baseline on one fresh schema."""
    fast = os.environ.get("RUNKIT_BENCH_PG_FAST") == "1"
    pool_size = int(os.environ.get("RUNKIT_BENCH_PG_POOL", "8"))
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with PostgresServer(durable=not fast) as server:
        version = await anyio.to_thread.run_sync(server.version)
        provider = PostgresProvider(
            server.dsn, schema=schema, pool_min_size=pool_size, pool_max_size=pool_size
        )
        await provider.provision()
        raw = await anyio.to_thread.run_sync(RawPostgres, server.dsn, schema, pool_size)
        settings = ", ".join(f"{k}={v}" for k, v in server.settings.items())
        notes = (
            f"{version.split(' on ')[0]}; {'external server' if server.external else settings}; "
            f"pool {pool_size} connections (driver and baseline)"
        )
        counter = WriteTransactions(server.dsn)
        try:
            yield Target(provider=provider, baseline=raw, notes=notes, write_transactions=counter)
        finally:
            await provider.close()
            await anyio.to_thread.run_sync(raw.close)
            await anyio.to_thread.run_sync(counter.close)
            await anyio.to_thread.run_sync(drop_schema, server.dsn, schema)
