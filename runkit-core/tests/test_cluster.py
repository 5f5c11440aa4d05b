"""Three real node processes on one store, talking over the node transport.

The main scenario runs on PostgreSQL and on DynamoDB (moto), end to end (real
sockets, mutual TLS, real processes):

- a ``runkit.Client`` (no partitions, no handlers) executes commands; each is
  offered to its partition's owner and committed there, so (almost) no inbox
  is used;
- observers are satisfied for commands whose events are recorded on other
  nodes than the caller's (the client owns nothing);
- after kill -9 of one node, and while another is stopped with SIGTERM and
  restarted with its node ID, commands keep succeeding (offers fail over to the
  inbox plus a wake-up, then to the new owner) and the stores hold every
  command exactly once (the commands harness invariants);
- a peer without a certificate of a live member is refused, and plain TCP is
  dropped; ``runkit execute`` reaches a running node.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs
import pytest

import dogma
import runkit
from runkit.engine.cluster.nodes import list_nodes
from runkit.persistence import Provider, provider_from_url
from runkit.testing.moto import MotoServer
from runkit_postgres import PostgresProvider
from runkit_postgres.testing import url_for

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import (
    APP_KEY,
    REGISTRY,
    Deposit,
    Deposited,
    check_invariants,
    read_stores,
    settled,
    setup,
    wait_until,
)

RUNNER = Path(__file__).parent / "cluster_runner.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    """A serialized moto server for the session (killed at its end)."""
    with MotoServer() as server:
        yield server


@pytest.fixture
def moto_server(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoServer:
    """moto with fake credentials and no AWS configuration from the machine (inherited by
    the node processes); the root conftest marks its users ``dynamodb``."""
    for name in list(os.environ):
        if name.startswith(("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL")):
            monkeypatch.delenv(name)
    for name, value in MotoServer.environ().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return moto


@attrs.define
class Cluster:
    """Node processes of one cluster; ``start`` adds a node or restarts one by index."""

    tmp: Path
    url: str
    backend: str
    heartbeat: float
    processes: list[anyio.abc.Process] = attrs.Factory(list)
    configs: list[dict[str, Any]] = attrs.Factory(list)

    async def start(self, n: int | None = None) -> None:
        if n is None:
            n = len(self.configs)
            self.configs.append(
                {
                    "url": self.url,
                    "node_id": str(uuid.uuid4()),
                    "heartbeat": self.heartbeat,
                    "backend": self.backend,
                }
            )
        config = {
            **self.configs[n],
            "listen": "127.0.0.1:0",
            "ready": str(self.tmp / f"ready-{n}-{uuid.uuid4().hex[:6]}"),
        }
        with (self.tmp / f"node-{n}.log").open("ab") as log:
            process = await anyio.open_process(
                [sys.executable, str(RUNNER), json.dumps(config)],
                stdin=None,
                stdout=log,
                stderr=log,
            )
        if n == len(self.processes):
            self.processes.append(process)
        else:
            self.processes[n] = process
        with anyio.fail_after(60):
            while not await anyio.Path(config["ready"]).exists():
                assert process.returncode is None, f"node {n} died: see {self.tmp}"
                await anyio.sleep(0.05)


@asynccontextmanager
async def cluster(
    tmp: Path, url: str, backend: str, *, count: int = 3, heartbeat: float = 0.25
) -> AsyncIterator[Cluster]:
    nodes = Cluster(tmp, url, backend, heartbeat)
    try:
        for _ in range(count):
            await nodes.start()
        yield nodes
    finally:
        for process in nodes.processes:
            if process.returncode is None:
                process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()
                await process.aclose()


async def _live_nodes(store: Provider, count: int) -> None:
    with anyio.fail_after(30):
        while True:
            nodes = await list_nodes(store)
            live = [
                n for n in nodes if n.role == "node" and n.tls_fingerprint and n.advertise_address
            ]
            if len(live) >= count:
                return
            await anyio.sleep(0.1)


async def _deposits(
    executor: Any, refs: list[str], latencies: list[float], *, accounts: int = 12
) -> None:
    async def one(i: int, ref: str) -> None:
        seen = anyio.Event()

        async def observe(event: Deposited) -> bool:
            if event.ref == ref:
                seen.set()
                return True
            return False

        started = time.perf_counter()
        with anyio.fail_after(20):
            await executor.execute_command(
                Deposit(f"acc-{i % accounts}", 1, ref),
                idempotency_key=ref,
                observers=[dogma.observe(Deposited, observe, registry=REGISTRY)],
            )
        latencies.append(time.perf_counter() - started)
        assert seen.is_set()

    limiter = anyio.CapacityLimiter(8)

    async def limited(i: int, ref: str) -> None:
        async with limiter:
            await one(i, ref)

    async with anyio.create_task_group() as tg:
        for i, ref in enumerate(refs):
            tg.start_soon(limited, i, ref)


async def _three_nodes_and_a_client(
    url: str, tmp_path: Path, backend: str, *, heartbeat: float, inbox_at_most: int
) -> None:
    """Routing, observers, kill -9, SIGTERM and a restart under load, exactly once."""
    s = setup()
    async with (
        provider_from_url(url) as store,
        cluster(tmp_path, url, backend, heartbeat=heartbeat) as nodes,
    ):
        await _live_nodes(store, 3)
        async with runkit.Client(
            runkit.with_application(s.config),
            runkit.with_persistence_provider(store),
            runkit.with_heartbeat_interval(heartbeat),
        ) as client:
            executor = client.executor_for(s.app)
            latencies: list[float] = []
            await _deposits(executor, [f"r{i}" for i in range(60)], latencies)
            stores = await read_stores(store)
            # Every command was offered to its owner and committed there.
            # (A loaded machine may let a few offers time out and fall back.)
            in_inbox = sum(len(r.entries) for records in stores.inbox.values() for _, r in records)
            assert in_inbox <= inbox_at_most, f"{in_inbox} of 60 commands went to the inbox"
            status = await client.status()
            assert len([n for n in status.nodes if n.live]) >= 3

            # kill -9 one node: commands still succeed, through the inbox or the new owner.
            nodes.processes[0].send_signal(signal.SIGKILL)
            await nodes.processes[0].wait()
            await _deposits(executor, [f"k{i}" for i in range(30)], latencies)

            # SIGTERM another node while commands run, then restart it (same node
            # ID) while they still run: its partitions leave and come back.
            async with anyio.create_task_group() as tg:
                tg.start_soon(_deposits, executor, [f"t{i}" for i in range(30)], latencies)
                await anyio.sleep(0.2)
                nodes.processes[1].send_signal(signal.SIGTERM)
                assert await nodes.processes[1].wait() == 0
                tg.start_soon(_deposits, executor, [f"b{i}" for i in range(30)], latencies)
                await nodes.start(1)
            await _live_nodes(store, 2)

            # A repeated idempotency key takes effect once.
            await _deposits(executor, [f"r{i}" for i in range(5)], latencies)
        check_invariants(await settled(store, APP_KEY, timeout=90))
        stores = await read_stores(store)
        refs = [env.causation_id for env in stores.all_events()]
        assert len(refs) == len(set(refs)) == 150


async def test_three_nodes_and_a_client_on_postgres(
    postgres_dsn: str, postgres_schema: str, tmp_path: Path, anyio_backend_name: str
) -> None:
    url = url_for(postgres_dsn, schema=postgres_schema)
    await _three_nodes_and_a_client(
        url, tmp_path, anyio_backend_name, heartbeat=0.25, inbox_at_most=10
    )


async def test_three_nodes_and_a_client_on_dynamodb(
    moto_server: MotoServer, tmp_path: Path, anyio_backend_name: str
) -> None:
    # moto serialises every request: a slower heartbeat, and more offers may time out.
    url = (
        f"dynamodb://{moto_server.netloc}/c-{uuid.uuid4().hex[:12]}?insecure=true&region=us-east-1"
    )
    await _three_nodes_and_a_client(
        url, tmp_path, anyio_backend_name, heartbeat=1.0, inbox_at_most=30
    )


async def test_a_peer_that_stops_answering_mid_call_falls_back_within_a_timeout(
    postgres_dsn: str, postgres_schema: str, tmp_path: Path, anyio_backend_name: str
) -> None:
    # SIGSTOP the owner of an account's partition: the node keeps its sockets
    # open but answers nothing. An offer to it times out, the command goes to
    # the inbox, the stopped node's heartbeat expires, a survivor takes the
    # partition and handles it. After SIGCONT the stopped node finds it no
    # longer owns the partition; nothing is lost or done twice.
    from runkit.engine.partitions import instance_workload, partition_of

    s = setup()
    url = url_for(postgres_dsn, schema=postgres_schema)
    async with (
        provider_from_url(url) as store,
        cluster(tmp_path, url, anyio_backend_name) as nodes,
    ):
        await _live_nodes(store, 3)
        async with runkit.Client(
            runkit.with_application(s.config),
            runkit.with_persistence_provider(store),
            runkit.with_heartbeat_interval(0.25),
        ) as client:
            executor = client.executor_for(s.app)
            latencies: list[float] = []
            await _deposits(executor, [f"w{i}" for i in range(16)], latencies)  # warm-up
            owners = {p.index: p.claimed_by for p in (await client.status()).partitions}
            # The node claiming the most partitions (a random node may claim none).
            ids = [str(uuid.UUID(c["node_id"])) for c in nodes.configs]
            victim = max(range(len(ids)), key=lambda n: list(owners.values()).count(ids[n]))
            stopped = ids[victim]
            account = next(
                f"acc-{i}"
                for i in range(1000)
                if owners.get(partition_of(instance_workload(s.accounts_key, f"acc-{i}"), 8))
                == stopped
            )
            nodes.processes[victim].send_signal(signal.SIGSTOP)
            try:
                seen = anyio.Event()

                async def observe(event: Deposited) -> bool:
                    seen.set()
                    return event.account == account

                # Bounded, not timed: the offer times out (2 s), then the inbox
                # and a takeover after the heartbeat expires (3 x 0.25 s).
                with anyio.fail_after(30):
                    await executor.execute_command(
                        Deposit(account, 1, "stopped"),
                        idempotency_key="stopped",
                        observers=[dogma.observe(Deposited, observe, registry=REGISTRY)],
                    )
                assert seen.is_set()
            finally:
                nodes.processes[victim].send_signal(signal.SIGCONT)
            await _deposits(executor, [f"c{i}" for i in range(16)], latencies)
        check_invariants(await settled(store, APP_KEY, timeout=60))
        stores = await read_stores(store)
        refs = [env.causation_id for env in stores.all_events()]
        assert len(refs) == len(set(refs)) == 33


async def test_a_peer_without_a_member_certificate_is_refused(
    postgres_dsn: str, postgres_schema: str, tmp_path: Path, anyio_backend_name: str
) -> None:
    from runkit.transport import NodeTransport, PeerUnavailable, TlsIdentity

    url = url_for(postgres_dsn, schema=postgres_schema)
    async with (
        PostgresProvider(postgres_dsn, schema=postgres_schema) as pg,
        cluster(tmp_path, url, anyio_backend_name, count=1),
    ):
        await _live_nodes(pg, 1)
        [node] = [n for n in await list_nodes(pg) if n.role == "node"]
        assert node.advertise_address is not None
        stranger = TlsIdentity.self_signed("stranger")
        async with NodeTransport(
            node_id=str(uuid.uuid4()), identity=stranger, authenticate=lambda _: True
        ) as transport:
            with pytest.raises(PeerUnavailable):
                await transport.call(node.advertise_address, "wake", b"", timeout=5)
        # Plain TCP: the node drops it and keeps serving.
        host, port = node.advertise_address.rsplit(":", 1)
        stream = await anyio.connect_tcp(host, int(port))
        async with stream:
            await stream.send(b"GET / HTTP/1.1\r\n\r\n")
            with anyio.fail_after(15):
                try:
                    data = await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                    data = b""
            assert b"HTTP" not in data


async def test_runkit_execute_sends_a_command_to_a_running_node(
    postgres_dsn: str, postgres_schema: str, tmp_path: Path
) -> None:
    import os

    url = url_for(postgres_dsn, schema=postgres_schema)
    runkit_cli = str(Path(sys.executable).with_name("runkit"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DOGMA_")},
        "DOGMA_PERSISTENCE_URL": url,
    }
    with (tmp_path / "node.log").open("wb") as log:
        node = await anyio.open_process(
            [runkit_cli, "run", "bank:app"],
            env={**env, "DOGMA_LISTEN_ADDRESS": "127.0.0.1:0"},
            stdin=None,
            stdout=log,
            stderr=log,
        )
    try:
        async with PostgresProvider(postgres_dsn, schema=postgres_schema) as pg:
            await _live_nodes(pg, 1)

            async def execute(*args: str) -> tuple[int, str, str]:
                result = await anyio.run_process(
                    [runkit_cli, "execute", "bank:app", *args], env=env, check=False
                )
                return result.returncode, result.stdout.decode(), result.stderr.decode()

            code, stdout, stderr = await execute(
                "OpenAccountForNewCustomer",
                '{"customer_id": "C1", "customer_name": "Ann", "account_id": "A1", '
                '"account_name": "Savings"}',
            )
            assert (code, stderr) == (0, "")  # the client's own log only with -v
            assert "executed" in stdout
            code, _, stderr = await execute("NoSuchCommand", "{}")
            assert code == 2
            assert stderr.startswith("runkit execute: ")
            assert "not a command" in stderr
            assert stderr.count("\n") == 1
            code, _, stderr = await execute("OpenAccount", '{"customer_id": 1}')
            assert code == 2, stderr
            assert stderr.startswith("runkit execute: the JSON does not decode as OpenAccount")
            assert stderr.count("\n") == 1
            # The account was opened: the bank's streams hold its events.
            await wait_until(lambda: _recorded(pg), timeout=30)
    finally:
        node.kill()
        with anyio.CancelScope(shield=True):
            await node.wait()
            await node.aclose()


async def _recorded(pg: PostgresProvider) -> bool:
    from bank import app as bank_app
    from runkit.config import build
    from runkit.engine.cluster.status import read_status

    status = await read_status(pg, (build(bank_app),), now=datetime.now(UTC))
    return any(p.stream_end > 0 for p in status.partitions)
