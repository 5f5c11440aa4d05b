"""The PostgreSQL server goes away under load and comes back: the nodes ride it out.

Two node processes (``crash_runner.py``) share one schema on a private
PostgreSQL server as a cluster (heartbeats every 0.5 s, node transport on
127.0.0.1), each running the whole test application (``engine_faults_app``)
and a client executing its own workload. Once both have acknowledged part of
their workload, the server is stopped as a crash would stop it (``pg_ctl stop
-m immediate``) for longer than the nodes' heartbeats stay valid, then started
again on the same data directory and port. Then:

- both node processes are still running, both nodes are live again and took
  every partition back (their logs say ``taking partition`` after the outage),
  and both clients finish their workload;
- the stores settle and every invariant holds: each acknowledged command took
  effect exactly once, nothing was lost or published twice, process effects and
  the projection are exact (``engine_faults_app.check_safety`` and
  ``check_complete``);
- the nodes' logs are sane: no traceback, no password, and a bounded number of
  one-line warnings during the outage (failures are rate-limited).

The server keeps ``synchronous_commit`` on: with it off, a crash loses the
commits of its last fraction of a second, acknowledged or not.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

pytest.importorskip("runkit_postgres")

from runkit.engine.cluster.nodes import list_nodes
from runkit.engine.partitions import partition_id
from runkit.rendezvous import winner
from runkit_postgres import PostgresProvider
from runkit_postgres.testing import PostgresServer, unique_schema

sys.path.insert(0, str(Path(__file__).parent))
from engine_faults_app import APP_KEY, check_complete, check_safety, read_stores, settle

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

RUNNER = Path(__file__).parent / "crash_runner.py"
#: Commands per node's client.
COUNT = 300
#: Partitions of the application (``engine_faults_app.FAST``).
PARTITIONS = 4
HEARTBEAT = 0.5
#: How long the server stays down: longer than a heartbeat stays valid (3 intervals).
OUTAGE = 4.0
#: Seconds after the stop from which no command can be acknowledged until the restart.
GRACE = 1.0
#: Seconds to wait for progress: generous, as the machine may be busy (2 shared cores).
TIMEOUT = 180
#: A password the server (trust authentication) never asks for, to look for in the logs.
PASSWORD = "outage-Secret-7f3a"
#: Log records a node may write from the start of the outage until its client
#: finishes. Failures repeat every retry delay (at most 0.2 s here) in every
#: partition and component: unlimited, that is thousands of lines.
MAX_OUTAGE_RECORDS = 150

_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<logger>\S+): ")


@pytest.fixture
def server() -> Iterator[PostgresServer]:
    """A private server this test may stop and start (never ``RUNKIT_TEST_PG_DSN``'s)."""
    if not PostgresServer.programs_available():
        pytest.skip("no PostgreSQL server programs (initdb, pg_ctl) on this machine")
    with PostgresServer(use_environment=False, settings={"synchronous_commit": "on"}) as pg:
        yield pg


def _splitting_node_ids() -> tuple[str, str]:
    """Two node IDs between which the application's partitions are split."""
    while True:
        ids = (uuid.uuid4(), uuid.uuid4())
        if len({winner(partition_id(APP_KEY, p), ids) for p in range(PARTITIONS)}) == 2:
            return str(ids[0]), str(ids[1])


class Node:
    """One node process, its log, its acknowledgement log and its done marker."""

    def __init__(self, tmp: Path, n: int) -> None:
        self.log = tmp / f"node-{n}.log"
        self.ack = tmp / f"ack-{n}"
        self.done = tmp / f"done-{n}"
        self._process: anyio.abc.Process | None = None

    @property
    def process(self) -> anyio.abc.Process:
        assert self._process is not None
        return self._process

    async def start(self, config: dict[str, Any]) -> None:
        config = {**config, "ack": str(self.ack), "done": str(self.done)}
        with self.log.open("wb") as log:
            self._process = await anyio.open_process(
                [sys.executable, str(RUNNER), json.dumps(config)],
                stdin=None,
                stdout=log,
                stderr=log,
            )

    def acks(self) -> set[str]:
        if not self.ack.exists():
            return set()
        # Only whole lines count.
        return set(self.ack.read_text().split("\n")[:-1])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@asynccontextmanager
async def two_nodes(tmp: Path, dsn: str, schema: str, backend: str) -> AsyncIterator[list[Node]]:
    """Start two nodes of one cluster, each with a client executing its own workload."""
    started: list[Node] = []
    try:
        for n, node_id in enumerate(_splitting_node_ids()):
            node = Node(tmp, n)
            await node.start(
                {
                    "dsn": dsn,
                    "schema": schema,
                    "seed": 100 + n,
                    "count": COUNT,
                    "order_seed": n,
                    "backend": backend,
                    "node_id": node_id,
                    "heartbeat": HEARTBEAT,
                    "listen": "127.0.0.1:0",
                    "log": True,
                }
            )
            started.append(node)
        yield started
    finally:
        for node in started:
            if node.process.returncode is None:
                node.process.send_signal(signal.SIGKILL)
            with anyio.CancelScope(shield=True):
                await node.process.wait()
                await node.process.aclose()


async def _wait_for(nodes: list[Node], condition: Callable[[], bool], what: str) -> None:
    """Poll *condition* until true; fail if a node exits or ``TIMEOUT`` passes first."""
    with anyio.fail_after(TIMEOUT):
        while not condition():
            for n, node in enumerate(nodes):
                assert node.process.returncode is None, (
                    f"node {n} exited ({node.process.returncode}) while waiting for {what}: "
                    f"{node.log_text()[-3000:]}"
                )
            await anyio.sleep(0.05)


def _records(text: str) -> list[tuple[str, str, str]]:
    """(level, logger, first line) of each log record in *text*; other lines as level ``+``."""
    out = []
    for line in text.splitlines():
        match = _RECORD.match(line)
        if match is None:
            out.append(("+", "", line))
        else:
            out.append((match["level"], match["logger"], line[match.end() :]))
    return out


async def test_the_nodes_ride_out_a_database_outage(
    server: PostgresServer, tmp_path: Path, anyio_backend_name: str
) -> None:
    schema = unique_schema()
    dsn = f"{server.dsn} password={PASSWORD}"
    async with two_nodes(tmp_path, dsn, schema, anyio_backend_name) as nodes:
        # Under load: both clients part-way through their workloads.
        await _wait_for(
            nodes, lambda: all(len(n.acks()) >= COUNT // 4 for n in nodes), "acknowledgements"
        )
        before = [len(n.log_text()) for n in nodes]
        server.pause()
        # Commits that made it before the stop may still be acknowledged for a
        # moment (the node writes the key once the call returns); nothing after.
        await anyio.sleep(GRACE)
        down = [len(n.acks()) for n in nodes]
        await anyio.sleep(OUTAGE - GRACE)
        assert [len(n.acks()) for n in nodes] == down, "acknowledged while the store was down"
        server.resume()
        back = time.monotonic()
        await _wait_for(
            nodes,
            lambda: all(
                len(n.acks()) > d or n.done.exists() for n, d in zip(nodes, down, strict=True)
            ),
            "the first acknowledgement after the outage",
        )
        progress = time.monotonic() - back
        await _wait_for(nodes, lambda: all(n.done.exists() for n in nodes), "the clients")
        clients_done = time.monotonic() - back
        acknowledged = set().union(*(n.acks() for n in nodes))
        assert len(acknowledged) == 2 * COUNT
        async with PostgresProvider(server.dsn, schema=schema) as pg:
            with anyio.fail_after(TIMEOUT):
                await settle(pg, acknowledged, timeout=TIMEOUT)
            settled = time.monotonic() - back
            now = datetime.now(UTC)
            live = [r for r in await list_nodes(pg) if r.is_live(now)]
            for n, node in enumerate(nodes):
                assert node.process.returncode is None, f"node {n} exited: {node.log_text()}"
            # Nothing runs any more: the final state, read once more, still holds.
            for node in nodes:
                node.process.send_signal(signal.SIGKILL)
                await node.process.wait()
            stores = await read_stores(pg)
            check_safety(stores)
            check_complete(stores, acknowledged)

    assert len(live) == 2, f"live nodes after the outage: {live}"
    logs = [n.log_text() for n in nodes]
    outage = [log[start:] for log, start in zip(logs, before, strict=True)]
    # Every partition was released during the outage and taken back after it.
    taken = {int(m[1]) for text in outage for m in re.finditer(r"taking partition (\d+)", text)}
    assert taken == set(range(PARTITIONS)), f"partitions taken back after the outage: {taken}"
    for n, (whole, text) in enumerate(zip(logs, outage, strict=True)):
        assert PASSWORD not in whole, f"node {n} logged the password"
        assert "Traceback" not in whole, f"node {n} logged a traceback: {whole[-3000:]}"
        records = _records(text)
        print(  # the measurements, for -s
            f"\nnode {n} ({anyio_backend_name}): {down[n]} of {COUNT} acknowledged at the "
            f"outage; after the server came back, commands were acknowledged again within "
            f"{progress:.1f} s, the clients were done after {clients_done:.1f} s and the stores "
            f"settled after {settled:.1f} s; {len(records)} log lines from the outage on: "
            f"{Counter((level, logger) for level, logger, _ in records)}"
        )
        for level, logger, line in records:
            print(f"  {level} {logger}: {line[:300]}")
        assert len(records) <= MAX_OUTAGE_RECORDS, f"node {n}: {len(records)} log lines"
        assert all(level != "+" for level, _, _ in records), f"node {n}: multi-line records"
