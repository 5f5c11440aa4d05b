"""The first connection: configuration faults fail fast, outages are retryable and quiet.

Against real servers: the session's (trust authentication), one that demands
passwords (its own ``pg_hba.conf``), and throwaway ones stopped mid-test.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import psycopg
import pytest

from runkit.cli import main
from runkit.engine.startup import wait_for_store
from runkit.persistence import PersistenceError, StoreUnavailable
from runkit_postgres import PostgresProvider
from runkit_postgres._connecting import _WARNINGS
from runkit_postgres.testing import PostgresServer, unique_schema, url_for

PASSWORD = "s3cret-Pa55"
WRONG = "wr0ng-Pa55"


@pytest.fixture(scope="module")
def password_server() -> Iterator[PostgresServer]:
    """A server that asks every role but ``postgres`` for a (scram) password."""
    directory = Path(tempfile.mkdtemp(prefix="runkit-hba-"))
    hba = directory / "pg_hba.conf"
    hba.write_text(
        "local all all trust\n"
        "host all postgres 127.0.0.1/32 trust\n"
        "host all all 127.0.0.1/32 scram-sha-256\n"
    )
    directory.chmod(0o755)
    hba.chmod(0o644)  # read by the server, which runs as "postgres" under root
    try:
        with PostgresServer(settings={"hba_file": str(hba)}, use_environment=False) as server:
            with psycopg.connect(server.dsn, autocommit=True) as conn:
                conn.execute(f"CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'")
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _first_call_error(provider: PostgresProvider) -> tuple[StoreUnavailable, float]:
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await provider.keyspaces.open("k")
    finally:
        await provider.close()
    return caught.value, time.monotonic() - started


async def test_a_wrong_password_fails_at_once_with_the_servers_reason(
    password_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """No 30 s pool timeout, no pool warnings: the server's reason, password hidden."""
    dsn = f"host=127.0.0.1 port={password_server.port} user=app password={WRONG} dbname=postgres"
    error, took = await _first_call_error(PostgresProvider(dsn, schema=unique_schema()))

    assert took < 5
    assert not error.retryable
    assert 'password authentication failed for user "app"' in str(error)
    assert "refused the connection" in str(error)
    assert WRONG not in str(error)
    assert WRONG not in caplog.text
    assert not [r for r in caplog.records if r.name == "psycopg.pool"]


async def test_the_right_password_connects(password_server: PostgresServer) -> None:
    dsn = f"host=127.0.0.1 port={password_server.port} user=app password={PASSWORD}"
    async with PostgresProvider(dsn + " dbname=postgres", schema="app_schema") as provider:
        with psycopg.connect(password_server.dsn, autocommit=True) as conn:
            conn.execute("GRANT CREATE ON DATABASE postgres TO app")
        async with await provider.keyspaces.open("k") as ks:
            assert await ks.get(b"x") == (b"", "")


async def test_a_plus_in_a_url_parameter_is_kept_as_libpq_reads_it(
    password_server: PostgresServer,
) -> None:
    """libpq decodes only %XX in a URI: '+' is a plus sign, not a space (unlike forms)."""
    role = unique_schema("plus")
    with psycopg.connect(password_server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'a+b c'")
        conn.execute(f"GRANT CREATE ON DATABASE postgres TO {role}")
    url = f"postgresql://{role}@127.0.0.1:{password_server.port}/postgres?password=a+b%20c"
    with psycopg.connect(url):  # libpq itself accepts the URL
        pass
    provider = PostgresProvider.from_url(f"{url}&schema={role}")
    async with provider, await provider.keyspaces.open("k") as ks:
        assert await ks.get(b"x") == (b"", "")


async def test_a_missing_database_fails_at_once_with_the_servers_reason(
    postgres_dsn: str,
) -> None:
    dsn = psycopg.conninfo.make_conninfo(postgres_dsn, dbname="no_such_db")
    error, took = await _first_call_error(PostgresProvider(dsn, schema=unique_schema()))

    assert took < 5
    assert not error.retryable
    assert 'database "no_such_db" does not exist' in str(error)


async def test_a_server_that_is_down_is_a_retryable_error(postgres_dsn: str) -> None:
    dsn = psycopg.conninfo.make_conninfo(postgres_dsn, host="127.0.0.1", port=str(_free_port()))
    error, took = await _first_call_error(PostgresProvider(dsn, schema=unique_schema()))

    assert took < 5
    assert error.retryable
    assert "is unreachable" in str(error)
    assert "Connection refused" in str(error)


async def test_pool_warnings_during_an_outage_are_one_line_each_and_rate_limited(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg_pool's per-attempt multi-line warnings become one line per interval."""
    monkeypatch.setattr(_WARNINGS.limited, "interval", 1.5)
    caplog.set_level(logging.INFO)
    with PostgresServer(use_environment=False) as server:
        provider = PostgresProvider(
            server.dsn, schema=unique_schema(), pool_min_size=4, pool_timeout=1.0
        )
        ks = await provider.keyspaces.open("k")
        await ks.set_unconditional(b"a", b"1")
        server.stop()  # the pool's four connections break; it reconnects in the background
        try:
            deadline = time.monotonic() + 4.0
            last: StoreUnavailable | None = None
            while time.monotonic() < deadline:
                try:
                    await ks.get(b"a")
                except StoreUnavailable as exc:
                    last = exc
                except PersistenceError:
                    pass  # the broken connections fail first ("lost the connection")
                await anyio.sleep(0.2)
        finally:
            await provider.close()

    assert not [r for r in caplog.records if r.name == "psycopg.pool" and r.levelno >= 30]
    lines = [r.getMessage() for r in caplog.records if "cannot connect to" in r.getMessage()]
    assert lines, "the outage must be reported"
    assert all("\n" not in line for line in lines)
    assert len(lines) <= 4, lines  # one per 1.5 s interval, not one per attempt and connection
    assert any("similar messages suppressed" in line for line in lines), lines
    # A pool timeout names what the pool last saw, instead of guessing.
    assert last is not None
    assert "the last connection attempt failed" in str(last)
    assert "Connection refused" in str(last)


@pytest.mark.slow
async def test_the_pool_reconnects_soon_after_the_server_is_back_however_long_it_was_down() -> None:
    """Calls waiting for a connection get one within seconds of the server's return.

    psycopg_pool alone waits about 1, 2, 4, 8, 16 ... s between its attempts to
    replace a lost connection (and gives up after 5 minutes): after a 20 s
    outage its next attempt came 7 to 14 s after the restart. And a pool that
    gave up waited for a new call to ask for a connection, while the calls
    already waiting (one per thread) waited out their ``pool_timeout``.
    """
    # Synchronous commits, so that the schema the provider made survives the crash.
    with PostgresServer(use_environment=False, settings={"synchronous_commit": "on"}) as server:
        provider = PostgresProvider(
            server.dsn, schema=unique_schema(), pool_min_size=2, pool_max_size=4
        )
        try:
            ks = await provider.keyspaces.open("k")
            await ks.set_unconditional(b"a", b"1")
            done = 0
            all_done = anyio.Event()

            async def caller() -> None:
                # Retries what fails at once (the lost connections), then waits
                # for a connection (pool_timeout: 30 s).
                nonlocal done
                while True:
                    try:
                        value, _ = await ks.get(b"a")
                    except PersistenceError:
                        await anyio.sleep(0.2)
                        continue
                    assert value == b"1"
                    done += 1
                    if done == 8:
                        all_done.set()
                    return

            server.pause()
            paused = time.monotonic()
            async with anyio.create_task_group() as tg:
                for _ in range(8):  # more callers than threads and connections
                    tg.start_soon(caller)
                # Between two of psycopg_pool's own attempts (about 15 and 31 s in).
                await anyio.sleep(paused + 20.0 - time.monotonic())
                assert done == 0
                server.resume()
                with anyio.fail_after(5):
                    await all_done.wait()
        finally:
            await provider.close()


def test_probe_honours_connect_timeout_in_the_url() -> None:
    """A URL's own connect_timeout is kept (the probe adds one only when absent)."""
    from runkit_postgres._connecting import ConnectFailed, probe

    # 192.0.2.0/24 is TEST-NET-1: nothing answers there.
    started = time.monotonic()
    with pytest.raises(ConnectFailed) as caught:
        probe("host=192.0.2.1 port=5432 dbname=x user=x connect_timeout=1")
    assert time.monotonic() - started < 4
    assert caught.value.retryable


def test_runkit_nodes_with_a_wrong_password_exits_2_with_the_reason(
    password_server: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dsn = f"host=127.0.0.1 port={password_server.port} user=app password={WRONG} dbname=postgres"
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", url_for(dsn))

    assert main(["nodes"]) == 2
    err = capsys.readouterr().err
    assert 'password authentication failed for user "app"' in err
    assert WRONG not in err
    assert "Traceback" not in err


def test_runkit_nodes_against_a_server_that_is_down_exits_1_with_the_reason(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = psycopg.conninfo.make_conninfo(postgres_dsn, host="127.0.0.1", port=str(_free_port()))
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", url_for(dsn))

    assert main(["nodes"]) == 1
    err = capsys.readouterr().err
    assert "is unreachable" in err
    assert "Connection refused" in err
    assert "Traceback" not in err


async def test_engine_start_up_waits_out_a_dead_server_then_gives_up(
    postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One log line per attempt, then an error saying how long it tried and why."""
    dsn = psycopg.conninfo.make_conninfo(postgres_dsn, host="127.0.0.1", port=str(_free_port()))
    provider = PostgresProvider(dsn, schema=unique_schema())
    caplog.set_level(logging.INFO, logger="runkit.engine.startup")
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await wait_for_store(provider, timeout=2.5)
    finally:
        await provider.close()

    assert caught.value.retryable
    assert str(caught.value).startswith("the store is still unreachable after 2.5 s (")
    assert "Connection refused" in str(caught.value)
    lines = [r.getMessage() for r in caplog.records]
    assert lines, "every retry is logged"
    assert all(line.startswith("store unreachable (") for line in lines), lines
    assert all("; retrying in " in line and ", giving up in " in line for line in lines)


async def test_engine_start_up_fails_at_once_on_a_wrong_password(
    password_server: PostgresServer,
) -> None:
    dsn = f"host=127.0.0.1 port={password_server.port} user=app password={WRONG} dbname=postgres"
    provider = PostgresProvider(dsn, schema=unique_schema())
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable, match="password authentication failed"):
            await wait_for_store(provider, timeout=60)
    finally:
        await provider.close()
    assert time.monotonic() - started < 5
