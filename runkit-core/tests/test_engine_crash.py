"""Architecture §9.7: kill -9 of real node processes on PostgreSQL loses and duplicates nothing.

Each round starts a node process (``crash_runner.py``) running the whole test
application (``engine_faults_app``) on one PostgreSQL schema, lets it work, and
kills it with SIGKILL at a seeded, random point. The node's client logs each
acknowledged idempotency key to a file before the next can be acknowledged, so
the test knows every command ``execute_command`` returned for. A last node
re-executes every key (a client retrying) and runs until the stores settle;
then every invariant is checked, reading the stores through the Provider API:
no acknowledged command lost, no recorded event lost or published twice,
process effects (root, commands, deadlines) exactly once, and the ADR-26
projection applied each event exactly once.

Two variants: killing during the command load, and killing during the
process's and projection's catch-up over a backlog of events.
"""

from __future__ import annotations

import json
import random
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest

pytest.importorskip("runkit_postgres")

from runkit_postgres import PostgresProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_faults_app import (
    ProjectionState,
    check_complete,
    check_safety,
    projection_store_name,
    read_stores,
    settle,
)

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).parent / "crash_runner.py"
COUNT = 240
#: Seconds to wait for progress: generous, as the machine may be busy (2 shared cores).
TIMEOUT = 180


class Nodes:
    """Starts node processes and makes sure none outlives the test."""

    def __init__(self, tmp: Path, base: dict[str, Any]) -> None:
        self._tmp = tmp
        self._base = base
        self._started = 0
        self.running: list[anyio.abc.Process] = []

    async def start(self, **config: Any) -> tuple[anyio.abc.Process, Path, Path]:
        """Start a node; return it, its acknowledgement log and its done marker."""
        n = self._started = self._started + 1
        ack, done = self._tmp / f"ack-{n}", self._tmp / f"done-{n}"
        settings = {**self._base, "ack": str(ack), "done": str(done), **config}
        with (self._tmp / f"node-{n}.log").open("wb") as log:
            process = await anyio.open_process(
                [sys.executable, str(RUNNER), json.dumps(settings)],
                stdin=None,
                stdout=log,
                stderr=log,
            )
        self.running.append(process)
        return process, ack, done

    async def kill(self, process: anyio.abc.Process) -> None:
        """SIGKILL *process*; it must have been running until then."""
        returncode = process.returncode
        if returncode is None:
            process.send_signal(signal.SIGKILL)
        with anyio.fail_after(30):
            await process.wait()
        self.running.remove(process)
        await process.aclose()
        assert returncode is None, f"node exited by itself ({returncode}): see {self._tmp}"

    async def kill_all(self) -> None:
        for process in list(self.running):
            if process.returncode is None:
                process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()
                await process.aclose()
        self.running.clear()


@asynccontextmanager
async def nodes(tmp: Path, **base: Any) -> AsyncIterator[Nodes]:
    started = Nodes(tmp, base)
    try:
        yield started
    finally:
        await started.kill_all()


def _acks(path: Path) -> set[str]:
    if not path.exists():
        return set()
    # A line being written when the node died may be cut short: only whole lines count.
    text = path.read_text()
    return set(text.split("\n")[:-1])


async def _wait_for(
    process: anyio.abc.Process,
    condition: Callable[[], Awaitable[bool]],
    what: str,
    *,
    timeout: float = TIMEOUT,
) -> None:
    """Poll *condition* until true; fail if the node dies or *timeout* passes first."""
    with anyio.fail_after(timeout):
        while not await condition():
            assert process.returncode is None, f"node died while waiting for {what}"
            await anyio.sleep(0.02)


async def _projected(pg: PostgresProvider) -> int:
    """How many events the projection has applied, over all streams."""
    total = 0
    async with await pg.keyspaces.open(projection_store_name()) as ks:
        async for _, value, _ in ks.range():
            total += msgspec.msgpack.decode(value, type=ProjectionState).next
    return total


async def _final_round(started: Nodes, pg: PostgresProvider, acknowledged: set[str]) -> None:
    """A last node re-executes every key; wait until all is settled, then check everything."""
    process, ack, done = await started.start(order_seed=10_000)

    async def finished() -> bool:
        return done.exists()

    await _wait_for(process, finished, "the final node's client")
    acknowledged |= _acks(ack)
    await settle(pg, acknowledged, timeout=TIMEOUT)
    await started.kill(process)
    # Nothing runs any more: the final state, read once more, still holds.
    stores = await read_stores(pg)
    check_safety(stores)
    check_complete(stores, acknowledged)
    assert len(acknowledged) == COUNT
    assert all(stores.stream.values()), "a partition stream is empty"


async def test_sigkill_during_the_command_load(
    postgres_dsn: str, postgres_schema: str, tmp_path: Path, anyio_backend_name: str
) -> None:
    rng = random.Random(20261126)
    acknowledged: set[str] = set()
    async with (
        PostgresProvider(postgres_dsn, schema=postgres_schema) as pg,
        nodes(
            tmp_path,
            dsn=postgres_dsn,
            schema=postgres_schema,
            seed=7,
            count=COUNT,
            backend=anyio_backend_name,
        ) as started,
    ):
        for round_ in range(3):
            # Killed with a second of instance journal unwritten (the default),
            # then with the materialiser writing all the time.
            delay = (1.0, 0.05, 1.0)[round_]
            process, ack, _ = await started.start(order_seed=round_, materialise_delay=delay)
            # Every round's client starts from scratch (re-executing what
            # earlier rounds acknowledged); kill it somewhere in the middle.
            target = rng.randrange(COUNT // 10, COUNT * 3 // 4)

            async def reached(ack: Path = ack, target: int = target) -> bool:
                return len(_acks(ack)) >= target

            await _wait_for(process, reached, f"{target} acknowledgements")
            await anyio.sleep(rng.uniform(0, 0.05))
            await started.kill(process)
            acknowledged |= _acks(ack)
        await _final_round(started, pg, acknowledged)


async def test_sigkill_during_process_and_projection_catch_up(
    postgres_dsn: str, postgres_schema: str, tmp_path: Path, anyio_backend_name: str
) -> None:
    rng = random.Random(11261026)
    acknowledged: set[str] = set()
    async with (
        PostgresProvider(postgres_dsn, schema=postgres_schema) as pg,
        nodes(
            tmp_path,
            dsn=postgres_dsn,
            schema=postgres_schema,
            seed=8,
            count=COUNT,
            backend=anyio_backend_name,
        ) as started,
    ):
        # A backlog: every command executed while the process and the
        # projection are disabled.
        process, ack, done = await started.start(order_seed=0, disabled=["loyalty", "counter"])

        async def finished() -> bool:
            return done.exists()

        await _wait_for(process, finished, "the backlog")
        await started.kill(process)
        acknowledged |= _acks(ack)
        # Catch-up rounds (no new commands), each killed part-way through.
        applied = await _projected(pg)
        for _ in range(3):
            process, _, _ = await started.start(
                execute=False, projection_delay=0.01, process_delay=0.005
            )
            target = applied + rng.randrange(10, 40)

            async def reached(target: int = target) -> bool:
                return await _projected(pg) >= target

            await _wait_for(process, reached, f"{target} projected events")
            await started.kill(process)
            after = await _projected(pg)
            assert after >= applied, "the projection went backwards"
            applied = after
        stores = await read_stores(pg)
        backlog = sum(len(r.events) for records in stores.stream.values() for r in records)
        assert applied < backlog, "the catch-up finished before the last kill"
        await _final_round(started, pg, acknowledged)
