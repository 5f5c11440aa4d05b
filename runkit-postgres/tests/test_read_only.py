"""Read-only providers never create a schema, a table or a store row, and refuse writes."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from runkit.cli import main
from runkit.persistence import Interval, PersistenceError, RecordNotFound, StoreUnavailable
from runkit_postgres import PostgresProvider
from runkit_postgres.testing import url_for


def schema_exists(dsn: str, schema: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s", (schema,)
        ).fetchone()
        return bool(row and row[0])


def count_rows(dsn: str, schema: str, table: str) -> int:
    with psycopg.connect(dsn) as conn:
        query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
        row = conn.execute(query).fetchone()
        return int(row[0]) if row else 0


async def test_opening_a_missing_schema_says_so_and_creates_nothing(
    postgres_dsn: str, postgres_schema: str
) -> None:
    provider = PostgresProvider(postgres_dsn, schema=postgres_schema)
    provider.set_read_only()
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await provider.keyspaces.open("cluster/nodes")
    finally:
        await provider.close()

    assert not caught.value.retryable
    assert f"schema {postgres_schema!r} does not exist in database 'postgres'" in str(caught.value)
    assert not schema_exists(postgres_dsn, postgres_schema)


async def test_unknown_names_read_as_empty_and_create_no_rows(
    postgres_dsn: str, postgres_schema: str
) -> None:
    # Reading existing stores and refusing writes: the conformance suite's
    # test_provider_read_only_refuses_every_write_and_still_reads.
    async with PostgresProvider(postgres_dsn, schema=postgres_schema) as writer:
        async with await writer.keyspaces.open("ks") as ks:
            await ks.set_unconditional(b"k", b"v")
        async with await writer.journals.open("j") as j:
            await j.append(0, b"r0")
    names_before = count_rows(postgres_dsn, postgres_schema, "keyspaces")

    reader = PostgresProvider(postgres_dsn, schema=postgres_schema)
    reader.set_read_only()
    async with reader:
        assert reader.read_only
        async with await reader.keyspaces.open("never-opened") as empty:
            assert await empty.get(b"k") == (b"", "")
            assert [item async for item in empty.range()] == []
        async with await reader.journals.open("never-opened") as none:
            assert await none.bounds() == Interval(0, 0)
            with pytest.raises(RecordNotFound):
                await anext(none.range(0))
        async with await reader.sets.open("never-opened") as members:
            assert not await members.has(b"m")

    assert count_rows(postgres_dsn, postgres_schema, "keyspaces") == names_before
    assert count_rows(postgres_dsn, postgres_schema, "journals") == 1


async def test_the_server_refuses_writes_on_a_read_only_session(
    postgres_dsn: str, postgres_schema: str
) -> None:
    """Belt and braces: even SQL that bypasses the driver's checks cannot write."""
    async with PostgresProvider(postgres_dsn, schema=postgres_schema) as writer:
        await writer.provision()
    reader = PostgresProvider(postgres_dsn, schema=postgres_schema)
    reader.set_read_only()
    async with reader:
        await reader.provision()  # only checks
        query = sql.SQL("CREATE TABLE {} (x int)").format(sql.Identifier(postgres_schema, "x"))
        with pytest.raises(PersistenceError, match="read-only transaction"):
            await reader._run(lambda conn: conn.execute(query), what="ddl", write=True)


async def test_deleting_an_absent_key_is_refused_like_any_write(
    postgres_dsn: str, postgres_schema: str
) -> None:
    # It only reads on a writable provider, but it is a write all the same.
    async with PostgresProvider(postgres_dsn, schema=postgres_schema) as writer:
        keyspace = await writer.keyspaces.open("k")
        await keyspace.set(b"present", b"<v>", "")
    reader = PostgresProvider(postgres_dsn, schema=postgres_schema)
    reader.set_read_only()
    async with reader:
        keyspace = await reader.keyspaces.open("k")
        for key in (b"absent", b"present"):
            with pytest.raises(PersistenceError, match=r"the provider is read-only$"):
                await keyspace.set(key, b"", "")


async def test_read_only_must_be_chosen_before_first_use(
    postgres_dsn: str, postgres_schema: str
) -> None:
    async with PostgresProvider(postgres_dsn, schema=postgres_schema) as provider:
        await provider.provision()
        with pytest.raises(RuntimeError, match="before the provider is used"):
            provider.set_read_only()


def test_runkit_nodes_with_a_mistyped_schema_creates_nothing_and_exits_2(
    postgres_dsn: str,
    postgres_schema: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", url_for(postgres_dsn, schema=postgres_schema))

    status = main(["nodes"])

    assert status == 2
    err = capsys.readouterr().err
    assert f"schema {postgres_schema!r} does not exist in database 'postgres'" in err
    assert "Traceback" not in err
    assert not schema_exists(postgres_dsn, postgres_schema)
