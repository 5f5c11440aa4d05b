"""Driver-specific behaviour on a real server: layout, provisioning, paging, errors."""

from __future__ import annotations

import threading
import uuid
from typing import cast

import anyio
import anyio.to_thread
import psycopg
import pytest
from psycopg import sql

from runkit.persistence import (
    Conflict,
    Interval,
    LimitExceeded,
    PersistenceError,
    RecordNotFound,
    provider_from_url,
)
from runkit_postgres import PostgresProvider
from runkit_postgres.testing import drop_schema, unique_schema

pytestmark = pytest.mark.postgres


def query(dsn: str, statement: str, *params: object) -> list[tuple[object, ...]]:
    """Run one statement on a fresh connection and return its rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(statement.encode(), params or None)
        return cursor.fetchall() if cursor.description else []


async def aquery(dsn: str, statement: str, *params: object) -> list[tuple[object, ...]]:
    return await anyio.to_thread.run_sync(lambda: query(dsn, statement, *params))


class TestProvisioning:
    async def test_schema_is_provisioned_lazily_on_first_open(
        self, postgres_dsn: str, postgres_schema: str
    ) -> None:
        async with PostgresProvider(postgres_dsn, schema=postgres_schema) as provider:
            exists = "SELECT count(*) FROM pg_namespace WHERE nspname = %s"
            assert await aquery(postgres_dsn, exists, postgres_schema) == [(0,)]
            async with await provider.sets.open("s"):
                pass
            assert await aquery(postgres_dsn, exists, postgres_schema) == [(1,)]
            tables = await aquery(
                postgres_dsn,
                "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1",
                postgres_schema,
            )
            assert [t for (t,) in tables] == [
                "journal_records",
                "journals",
                "keyspace_pairs",
                "keyspaces",
                "layout",
                "set_members",
                "sets",
            ]

    async def test_many_providers_provision_and_open_concurrently(
        self, postgres_dsn: str, postgres_schema: str
    ) -> None:
        providers = [PostgresProvider(postgres_dsn, schema=postgres_schema) for _ in range(8)]
        try:
            async with anyio.create_task_group() as tg:
                for p in providers[:4]:
                    tg.start_soon(p.provision)
                for p in providers[4:]:
                    tg.start_soon(p.journals.open, "shared")
            await providers[0].provision()  # idempotent
            first = await providers[0].journals.open("shared")
            await first.append(0, b"<zero>")
            for p in providers:
                async with await p.journals.open("shared") as journal:
                    assert await journal.get(0) == b"<zero>"
            rows = await aquery(postgres_dsn, f'SELECT count(*) FROM "{postgres_schema}".journals')
            assert rows == [(1,)]
        finally:
            for p in providers:
                await p.close()

    async def test_provisioned_schema_needs_only_dml_privileges(
        self, postgres_dsn: str, postgres_schema: str, pg_provider: PostgresProvider
    ) -> None:
        await pg_provider.provision()
        role = f"app_{uuid.uuid4().hex[:12]}"
        statements = [
            f"CREATE ROLE {role} LOGIN",
            f'GRANT USAGE ON SCHEMA "{postgres_schema}" TO {role}',
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{postgres_schema}"'
            f" TO {role}",
        ]
        for statement in statements:
            await aquery(postgres_dsn, statement)
        try:
            limited = postgres_dsn.replace("user=postgres", f"user={role}")
            async with PostgresProvider(limited, schema=postgres_schema) as provider:
                await provider.provision()
                async with await provider.keyspaces.open("k") as keyspace:
                    revision = await keyspace.set(b"k", b"v", "")
                    assert await keyspace.get(b"k") == (b"v", revision)
            # Creating a schema does need the CREATE privilege, and says so.
            other = unique_schema()
            async with PostgresProvider(limited, schema=other) as provider:
                with pytest.raises(PersistenceError) as info:
                    await provider.provision()
                assert str(info.value) == (
                    "provision: InsufficientPrivilege: permission denied for database postgres"
                )
                assert not info.value.retryable
        finally:
            await aquery(postgres_dsn, f"DROP OWNED BY {role}")
            await aquery(postgres_dsn, f"DROP ROLE {role}")

    async def test_newer_layout_is_refused(
        self, postgres_dsn: str, postgres_schema: str, pg_provider: PostgresProvider
    ) -> None:
        await pg_provider.provision()
        await aquery(postgres_dsn, f'INSERT INTO "{postgres_schema}".layout VALUES (2)')
        async with PostgresProvider(postgres_dsn, schema=postgres_schema) as provider:
            with pytest.raises(PersistenceError) as info:
                await provider.journals.open("j")
        assert str(info.value) == (
            f"provision: schema {postgres_schema!r} has layout version 2, but this "
            "runkit-postgres uses version 1; upgrade runkit-postgres or use another schema"
        )

    async def test_dropped_schema_is_reported_and_provision_recreates_it(
        self, postgres_dsn: str, postgres_schema: str, pg_provider: PostgresProvider
    ) -> None:
        journal = await pg_provider.journals.open("j")
        await anyio.to_thread.run_sync(drop_schema, postgres_dsn, postgres_schema)
        with pytest.raises(PersistenceError) as info:
            await journal.bounds()
        assert str(info.value).startswith(
            f"journal 'j': bounds: the schema {postgres_schema!r} or one of its tables is "
            "missing (dropped while in use?): UndefinedTable: relation"
        )
        assert not info.value.retryable
        await pg_provider.provision()
        async with await pg_provider.journals.open("j") as again:
            assert await again.bounds() == Interval(0, 0)


class TestLayout:
    async def test_names_are_stored_as_utf8_bytes_including_nul(
        self, postgres_dsn: str, postgres_schema: str, pg_provider: PostgresProvider
    ) -> None:
        names = ["a\x00b", "a", "a\x00", "ü/%\U0001f600"]
        for name in names:
            async with await pg_provider.journals.open(name) as journal:
                await journal.append(0, name.encode())
        rows = await aquery(
            postgres_dsn, f'SELECT name FROM "{postgres_schema}".journals ORDER BY id'
        )
        assert [bytes(n) for (n,) in rows] == [n.encode() for n in names]  # type: ignore[call-overload]
        for name in names:
            async with await pg_provider.journals.open(name) as journal:
                assert await journal.get(0) == name.encode()

    async def test_revisions_are_uuid_hex_and_foreign_ones_conflict(
        self, pg_provider: PostgresProvider
    ) -> None:
        async with await pg_provider.keyspaces.open("k") as keyspace:
            revision = await keyspace.set(b"k", b"v", "")
            assert uuid.UUID(hex=revision).hex == revision
            for foreign in [str(uuid.UUID(hex=revision)), revision.upper(), "1", " " + revision]:
                with pytest.raises(Conflict) as info:
                    await keyspace.set(b"k", b"w", foreign)
                assert info.value.revision == foreign
            assert await keyspace.get(b"k") == (b"v", revision)

    async def test_truncation_deletes_the_records_below_begin(
        self, postgres_dsn: str, postgres_schema: str, pg_provider: PostgresProvider
    ) -> None:
        async with await pg_provider.journals.open("j") as journal:
            for position in range(5):
                await journal.append(position, b"<r>")
            await journal.truncate(3)
        rows = await aquery(
            postgres_dsn,
            f'SELECT position FROM "{postgres_schema}".journal_records ORDER BY 1',
        )
        assert rows == [(3,), (4,)]

    async def test_configured_limits_are_checked_before_io(
        self, postgres_dsn: str, postgres_schema: str
    ) -> None:
        url_dsn = postgres_dsn.replace(" ", "&")
        provider = provider_from_url(
            f"postgresql:///?{url_dsn}&schema={postgres_schema}"
            "&max_record_bytes=10&max_value_bytes=20"
        )
        async with provider:
            journal = await provider.journals.open("j")
            await journal.append(0, b"x" * 10)
            with pytest.raises(LimitExceeded) as info:
                await journal.append(1, b"x" * 11)
            assert str(info.value) == "record is 11 bytes, over this provider's limit of 10 bytes"
            keyspace = await provider.keyspaces.open("k")
            with pytest.raises(LimitExceeded, match=r"^value is 21 bytes, over .* 20 bytes$"):
                await keyspace.set(b"k", b"v" * 21, "")
            with pytest.raises(LimitExceeded, match=r"^key is 2001 bytes, over .* 2000 bytes$"):
                await keyspace.get(b"k" * 2001)
            assert await journal.bounds() == Interval(0, 1)


class TestPaging:
    @pytest.fixture
    def small_pages(self, pg_provider: PostgresProvider) -> PostgresProvider:
        pg_provider.page_rows = 3  # type: ignore[misc]  # instance override of the class default
        return pg_provider

    async def test_journal_range_crosses_pages(self, small_pages: PostgresProvider) -> None:
        async with await small_pages.journals.open("j") as journal:
            for position in range(10):
                await journal.append(position, f"<{position}>".encode())
            items = [item async for item in journal.range(2)]
            assert items == [(p, f"<{p}>".encode()) for p in range(2, 10)]

    async def test_journal_range_pages_are_cut_by_bytes(
        self, pg_provider: PostgresProvider
    ) -> None:
        pg_provider.page_bytes = 10  # type: ignore[misc]
        async with await pg_provider.journals.open("j") as journal:
            for position in range(4):
                await journal.append(position, b"x" * 25)
            await journal.append(4, b"")
            assert [p async for p, _ in journal.range(0)] == [0, 1, 2, 3, 4]

    async def test_truncation_overtaking_a_range_raises_record_not_found(
        self, small_pages: PostgresProvider
    ) -> None:
        async with await small_pages.journals.open("j") as journal:
            for position in range(10):
                await journal.append(position, b"<r>")
            seen = []

            async def consume() -> None:
                async for position, _ in journal.range(0):
                    seen.append(position)
                    if position == 1:
                        await journal.truncate(8)

            with pytest.raises(RecordNotFound) as info:
                await consume()
            assert seen == [0, 1, 2]
            assert str(info.value) == "journal 'j': no record at position 3"

    async def test_range_holds_no_connection_between_pages(
        self, postgres_dsn: str, postgres_schema: str
    ) -> None:
        # With one connection, writing inside the loop would time out if the
        # range kept its connection.
        async with PostgresProvider(
            postgres_dsn, schema=postgres_schema, pool_max_size=1, pool_timeout=5
        ) as provider:
            provider.page_rows = 2  # type: ignore[misc]
            journal = await provider.journals.open("j")
            keyspace = await provider.keyspaces.open("k")
            set_ = await provider.sets.open("s")
            for position in range(5):
                await journal.append(position, b"<r>")
                await keyspace.set(bytes([position + 1]), b"<v>", "")
                await set_.add(bytes([position + 1]))
            async for position, _ in journal.range(0):
                await keyspace.set_unconditional(bytes([position + 1]), b"<w>")
            async for key, value, _ in keyspace.range():
                assert value == b"<w>"
                await journal.get(key[0] - 1)
            members = [m async for m in set_.range()]
            assert sorted(members) == [bytes([i + 1]) for i in range(5)]

    async def test_keyspace_and_set_ranges_cross_pages(self, small_pages: PostgresProvider) -> None:
        keyspace = await small_pages.keyspaces.open("k")
        set_ = await small_pages.sets.open("s")
        expected = {}
        for i in range(7):
            key = b"\x00" + bytes([i]) + b"\xff"
            expected[key] = await keyspace.set(key, bytes([i]) * (i + 1), "")
            await set_.add(key)
        assert {k: r async for k, _, r in keyspace.range()} == expected
        assert sorted([m async for m in set_.range()]) == sorted(expected)


class _RowLock:
    """Holds a journal's row lock from another session, blocking appends to it."""

    def __init__(self, dsn: str, schema: str, name: str) -> None:
        self._conn = psycopg.connect(dsn)
        self._conn.execute(
            sql.SQL("SELECT FROM {}.journals WHERE name = %s FOR UPDATE").format(
                sql.Identifier(schema)
            ),
            (name.encode(),),
        )

    def release(self) -> None:
        self._conn.commit()
        self._conn.close()


async def wait_until_blocked(dsn: str, application_name: str) -> int:
    """Wait until a session of *application_name* waits for a lock; return its pid."""
    while True:
        rows = await aquery(
            dsn,
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
            " AND wait_event_type = 'Lock'",
            application_name,
        )
        if rows:
            return cast(int, rows[0][0])
        await anyio.sleep(0.01)


class TestErrors:
    async def test_connection_lost_during_a_write_is_ambiguous_and_not_retried(
        self, postgres_dsn: str, postgres_schema: str
    ) -> None:
        app = f"victim-{uuid.uuid4().hex[:8]}"
        dsn = f"{postgres_dsn} application_name={app}"
        async with PostgresProvider(dsn, schema=postgres_schema) as provider:
            journal = await provider.journals.open("j")
            lock = await anyio.to_thread.run_sync(_RowLock, postgres_dsn, postgres_schema, "j")
            error: list[PersistenceError] = []

            async def append() -> None:
                try:
                    await journal.append(0, b"<zero>")
                except PersistenceError as exc:
                    error.append(exc)

            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(append)
                    pid = await wait_until_blocked(postgres_dsn, app)
                    await aquery(postgres_dsn, "SELECT pg_terminate_backend(%s)", pid)
            finally:
                await anyio.to_thread.run_sync(lock.release)
            [exc] = error
            assert exc.ambiguous
            assert exc.retryable
            assert str(exc) == (
                f"journal 'j': append at position 0: lost the connection to {dsn!r}: "
                "AdminShutdown: terminating connection due to administrator command; "
                "the write may or may not have taken effect"
            )
            # Not retried behind the caller's back, and the pool recovers.
            assert await journal.bounds() == Interval(0, 0)
            await journal.append(0, b"<zero>")
            assert await journal.get(0) == b"<zero>"

    async def test_read_on_a_dead_connection_is_retried(
        self, postgres_dsn: str, postgres_schema: str
    ) -> None:
        app = f"victim-{uuid.uuid4().hex[:8]}"
        dsn = f"{postgres_dsn} application_name={app}"
        async with PostgresProvider(
            dsn, schema=postgres_schema, pool_min_size=1, pool_max_size=1
        ) as provider:
            journal = await provider.journals.open("j")
            await journal.append(0, b"<zero>")
            killed = await aquery(
                postgres_dsn,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                app,
            )
            assert killed == [(True,)]
            assert await journal.get(0) == b"<zero>"

    async def test_write_on_a_dead_connection_is_ambiguous(
        self, postgres_dsn: str, postgres_schema: str
    ) -> None:
        # The driver cannot tell whether the server received the statement.
        app = f"victim-{uuid.uuid4().hex[:8]}"
        dsn = f"{postgres_dsn} application_name={app}"
        async with PostgresProvider(
            dsn, schema=postgres_schema, pool_min_size=1, pool_max_size=1
        ) as provider:
            set_ = await provider.sets.open("s")
            await aquery(
                postgres_dsn,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                app,
            )
            with pytest.raises(PersistenceError) as info:
                await set_.add(b"m")
            assert info.value.ambiguous
            assert await set_.try_add(b"m")

    async def test_statement_timeout_is_retryable_and_not_ambiguous(
        self, postgres_dsn: str, postgres_schema: str
    ) -> None:
        dsn = f"{postgres_dsn} options='-c statement_timeout=200'"
        async with PostgresProvider(dsn, schema=postgres_schema) as provider:
            journal = await provider.journals.open("j")
            lock = await anyio.to_thread.run_sync(_RowLock, postgres_dsn, postgres_schema, "j")
            try:
                with pytest.raises(PersistenceError) as info:
                    await journal.append(0, b"<zero>")
            finally:
                await anyio.to_thread.run_sync(lock.release)
            assert str(info.value) == (
                "journal 'j': append at position 0: QueryCanceled: "
                "canceling statement due to statement timeout"
            )
            assert info.value.retryable
            assert not info.value.ambiguous
            assert await journal.bounds() == Interval(0, 0)

    async def test_unreachable_server_fails_without_leaking_the_password(self) -> None:
        provider = PostgresProvider(
            "host=127.0.0.1 port=1 user=u password=s3cret connect_timeout=1",
            pool_timeout=0.5,
        )
        async with provider:
            with pytest.raises(PersistenceError) as info:
                await provider.journals.open("j")
        assert str(info.value) == (
            "provision: 'host=127.0.0.1 port=1 user=u password=*** connect_timeout=1' "
            'is unreachable: connection to server at "127.0.0.1", port 1 failed: '
            "Connection refused; Is the server running on that host and accepting "
            "TCP/IP connections?"
        )
        assert info.value.retryable
        assert not info.value.ambiguous


class TestClosing:
    async def test_close_is_idempotent_and_stops_the_pool_threads(
        self, postgres_dsn: str, postgres_schema: str
    ) -> None:
        provider = PostgresProvider(postgres_dsn, schema=postgres_schema)
        journal = await provider.journals.open("j")
        await journal.append(0, b"<zero>")
        prefix = f"runkit-postgres:{postgres_schema}"
        assert any(t.name.startswith(prefix) for t in threading.enumerate())
        await provider.close()
        await provider.close()
        assert not any(t.name.startswith(prefix) for t in threading.enumerate())
        with pytest.raises(PersistenceError) as info:
            await journal.get(0)
        assert str(info.value) == "journal 'j': get position 0: the provider is closed"
        with pytest.raises(PersistenceError, match=r"^provision: the provider is closed$"):
            await provider.provision()

    async def test_unused_provider_closes_without_connecting(self) -> None:
        provider = PostgresProvider("host=127.0.0.1 port=1")
        await provider.close()
        await provider.close()

    async def test_handles_are_shared_by_many_tasks(self, pg_provider: PostgresProvider) -> None:
        journal = await pg_provider.journals.open("j")
        set_ = await pg_provider.sets.open("s")
        added: list[bool] = []

        async def worker(index: int) -> None:
            for round_ in range(5):
                added.append(await set_.try_add(f"{round_}".encode()))
                await journal.bounds()
            await set_.add(f"w{index}".encode())

        async with anyio.create_task_group() as tg:
            for index in range(20):
                tg.start_soon(worker, index)
        assert added.count(True) == 5
        assert len([m async for m in set_.range()]) == 25
