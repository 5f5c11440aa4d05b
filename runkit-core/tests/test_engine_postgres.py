"""The commands side on PostgreSQL: end to end, and a SIGKILL crash test (§9.7)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

pytest.importorskip("runkit_postgres")

from runkit_postgres import PostgresProvider
from runkit_postgres.testing import PostgresServer, drop_schema, unique_schema

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from engine_commands_harness import (  # noqa: E402
    APP_KEY,
    Deposit,
    Notify,
    check_invariants,
    running,
    settled,
    setup,
    wait_until,
)

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    with PostgresServer() as server:
        yield server.dsn


@pytest.fixture
def postgres_schema(postgres_dsn: str) -> Iterator[str]:
    schema = unique_schema()
    yield schema
    drop_schema(postgres_dsn, schema)


@pytest.fixture
async def pg(postgres_dsn: str, postgres_schema: str) -> AsyncIterator[PostgresProvider]:
    async with PostgresProvider(postgres_dsn, schema=postgres_schema) as provider:
        yield provider


async def test_end_to_end_with_restart(
    pg: PostgresProvider, postgres_dsn: str, postgres_schema: str
) -> None:
    s = setup()
    async with running(pg, s.config, snapshot_every=3, truncate_aggregate_journals=True) as engine:
        executor = engine.executor_for(s.app)
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(executor.execute_command, Deposit(f"a{i % 3}", 1, f"r{i}"))
                tg.start_soon(executor.execute_command, Notify(i))
        await executor.execute_command(Deposit("a0", 1, "k"), idempotency_key="k")
        await wait_until(lambda: len(s.accounts.calls) == 21)
        await settled(pg)
    async with (
        PostgresProvider(postgres_dsn, schema=postgres_schema) as again,
        running(again, s.config) as engine,
    ):
        executor = engine.executor_for(s.app)
        await executor.execute_command(Deposit("a0", 1, "k"), idempotency_key="k")
        await executor.execute_command(Deposit("a0", 1, "last"))
        await wait_until(lambda: len(s.accounts.calls) == 22)
        stores = await settled(again)
    check_invariants(stores)
    assert s.accounts.calls[-1][1:] == ("last", 8)
    assert len(stores.events_of(str(uuid.uuid5(uuid.UUID(APP_KEY), "k")))) == 1


_CHILD = textwrap.dedent(
    """
    import sys
    import anyio
    sys.path.insert(0, {tests!r})
    from engine_commands_harness import Deposit, Notify, running, setup
    from runkit_postgres import PostgresProvider

    async def main() -> None:
        s = setup()
        async with PostgresProvider({dsn!r}, schema={schema!r}) as provider:
            async with running(provider, s.config, snapshot_every=5) as engine:
                executor = engine.executor_for(s.app)
                limiter = anyio.CapacityLimiter(16)

                async def one(i: int) -> None:
                    async with limiter:
                        if i % 2:
                            command = Deposit(f"a{{i % 5}}", 1, f"r{{i}}")
                        else:
                            command = Notify(i, f"n{{i}}")
                        await executor.execute_command(command, idempotency_key=f"c{{i}}")
                        print(f"accepted {{i}}", flush=True)

                async with anyio.create_task_group() as tg:
                    for i in range(100000):
                        tg.start_soon(one, i)
                        if i % 16 == 15:
                            await anyio.sleep(0.001)

    anyio.run(main)
    """
)


@pytest.mark.slow
async def test_sigkill_mid_load_loses_and_duplicates_nothing(
    pg: PostgresProvider, postgres_dsn: str, postgres_schema: str, tmp_path: Path
) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(HERE), dsn=postgres_dsn, schema=postgres_schema))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    accepted: set[int] = set()
    # The child's log goes to a file: an unread stderr pipe could fill and stall it.
    with (tmp_path / "child.log").open("wb") as log:
        process = await anyio.open_process(
            [sys.executable, str(script)], env=env, stdin=subprocess.DEVNULL, stderr=log
        )
    try:
        assert process.stdout is not None
        buffer = b""
        with anyio.fail_after(120):
            async for chunk in process.stdout:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                accepted.update(
                    int(line.split()[1]) for line in lines if line.startswith(b"accepted")
                )
                if len(accepted) >= 400:
                    break
        process.send_signal(signal.SIGKILL)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await process.aclose()
    assert process.returncode == -signal.SIGKILL

    s = setup()
    async with running(pg, s.config):
        stores = await settled(pg, timeout=60)
    check_invariants(stores)
    published = {env.causation_id for env in stores.all_events()}
    for i in accepted:
        command_id = str(uuid.uuid5(uuid.UUID(APP_KEY), f"c{i}"))
        assert command_id in published, f"accepted command c{i} was lost"
        assert len(stores.events_of(command_id)) == 1
    assert not stores.poison
    # Every accepted command was handled: no event lost, none duplicated.
    assert len(published) >= len(accepted)
