"""The throwaway-server helpers other packages' tests and the benchmarks reuse."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest

from runkit.persistence import Interval, provider_from_url
from runkit_postgres import PostgresProvider
from runkit_postgres.testing import (
    DSN_VARIABLE,
    PostgresServer,
    drop_schema,
    unique_schema,
    url_for,
)


def test_unique_schema_names_are_valid_and_distinct() -> None:
    names = {unique_schema() for _ in range(100)}
    assert len(names) == 100
    assert all(re.fullmatch(r"t_[0-9a-f]{32}", name) for name in names)
    assert re.fullmatch(r"bench_[0-9a-f]{32}", unique_schema("bench"))


def test_environment_variable_names_an_existing_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DSN_VARIABLE, "host=elsewhere dbname=x")
    with PostgresServer() as server:
        assert server.external
        assert server.dsn == "host=elsewhere dbname=x"


@pytest.mark.postgres
def test_session_server_is_reachable_and_schemas_are_dropped(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    assert postgres_server.version().startswith("PostgreSQL ")
    schema = unique_schema()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"'.encode())
    drop_schema(postgres_dsn, schema)
    drop_schema(postgres_dsn, schema)  # idempotent
    with psycopg.connect(postgres_dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)
        ).fetchone()
    assert row == (0,)


def test_url_for_turns_a_dsn_into_a_persistence_url() -> None:
    url = url_for("host='/tmp/pg dir' port=5433 user=postgres", schema="s1", pool_max_size=3)
    assert url == (
        "postgresql://?user=postgres&host=%2Ftmp%2Fpg%20dir&port=5433&schema=s1&pool_max_size=3"
    )


@pytest.mark.postgres
async def test_postgres_url_fixture_opens_a_provider_on_the_fresh_schema(
    postgres_url: str, postgres_schema: str
) -> None:
    provider = provider_from_url(postgres_url)
    assert isinstance(provider, PostgresProvider)
    assert provider.schema == postgres_schema
    async with provider, await provider.journals.open("j") as journal:
        assert await journal.bounds() == Interval(0, 0)


def test_the_throwaway_server_example_in_the_driver_docs_runs(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The example used PostgresProvider without importing it.
    docs = Path(__file__).parents[2] / "docs" / "drivers" / "postgres.md"
    section = docs.read_text().split("## Testing with a throwaway server", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("RUNKIT_TEST_PG_DSN", postgres_dsn)  # the session's server
    namespace: dict[str, object] = {}
    exec(compile(example, str(docs), "exec"), namespace)
    assert isinstance(namespace["provider"], PostgresProvider)
    assert str(namespace["url"]).startswith("postgresql://")


@pytest.mark.postgres
def test_a_paused_server_refuses_connections_and_resumes_with_its_data_on_its_port() -> None:
    if not PostgresServer.programs_available():
        pytest.skip("no PostgreSQL server programs (initdb, pg_ctl) on this machine")
    # Commits acknowledged before the pause survive it only if they were synchronous.
    with PostgresServer(use_environment=False, settings={"synchronous_commit": "on"}) as server:
        port = server.port
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (n int)")
            conn.execute("INSERT INTO kept VALUES (7)")
            server.pause()
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        server.pause()  # already paused: nothing to do
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.dsn, connect_timeout=2)
        server.resume()
        server.resume()  # already running: nothing to do
        assert server.port == port
        with psycopg.connect(server.dsn) as conn:
            assert conn.execute("SELECT n FROM kept").fetchall() == [(7,)]
        directory = server._dir
        assert directory is not None
    assert not directory.exists()


def test_pause_and_resume_need_a_server_this_object_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(DSN_VARIABLE, "host=elsewhere dbname=x")
    with PostgresServer() as server:
        with pytest.raises(RuntimeError, match="pause"):
            server.pause()
        with pytest.raises(RuntimeError, match="resume"):
            server.resume()


def test_programs_available_is_false_without_the_server_programs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PGBIN", str(tmp_path))  # no initdb, no pg_ctl there
    assert not PostgresServer.programs_available()
