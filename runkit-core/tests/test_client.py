"""``runkit.Client`` on its own: how it makes its per-application acceptors.

The clients here send commands to applications "started" by storing their
partition count (what a node does first), with no node running: every
command goes to an inbox. Clients alongside nodes are in ``test_engine_cluster.py``.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import dogma
import runkit
from runkit import EngineStopped
from runkit.config import build
from runkit.engine.commands.inbox import inbox_name
from runkit.engine.meta import load_partition_count, meta_name
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import (
    APP_KEY,
    REGISTRY,
    Accounts,
    App,
    Deposit,
    Deposited,
    setup,
    wait_until,
)

PARTITIONS = 4


async def start_application(silo: str, app_key: str = APP_KEY) -> None:
    """Store the application's partition count, as the first node to start it does."""
    await load_partition_count(MemoryProvider(silo), app_key, PARTITIONS, datetime.now(UTC))


def inbox_writer_tasks() -> int:
    """The inbox writers running in this event loop (every client's, every engine's)."""
    return sum((t.name or "").endswith("InboxWriter.run") for t in anyio.get_running_tasks())


async def test_a_first_call_cancelled_while_the_acceptor_is_made_leaves_one_set_of_writers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = setup()
    silo = f"client-{uuid.uuid4()}"
    await start_application(silo)
    provider = MemoryProvider(silo)
    real_open = provider.journals.open
    reached, release = anyio.Event(), anyio.Event()

    async def open_journal(name: str) -> Any:
        # The first call's opening of inbox 1 waits: inbox 0's writer is running by then.
        if name == inbox_name(APP_KEY, 1) and not reached.is_set():
            reached.set()
            await release.wait()
        return await real_open(name)

    monkeypatch.setattr(provider.journals, "open", open_journal)
    async with runkit.Client(
        runkit.with_application(s.config), runkit.with_persistence_provider(provider)
    ) as client:
        executor = client.executor_for(s.app)
        async with anyio.create_task_group() as tg:
            tg.start_soon(executor.execute_command, Deposit("a", 1, "first"))
            with anyio.fail_after(10):
                await reached.wait()
            tg.cancel_scope.cancel()  # the first caller gives up
        release.set()
        with anyio.fail_after(10):
            await executor.execute_command(Deposit("a", 1, "second"))
            await executor.execute_command(Deposit("a", 1, "third"))
        assert inbox_writer_tasks() == PARTITIONS


async def test_callers_of_an_application_not_started_in_time_fail_and_later_calls_retry() -> None:
    s = setup()
    silo = f"client-{uuid.uuid4()}"
    async with runkit.Client(
        runkit.with_application(s.config),
        runkit.with_persistence_provider(MemoryProvider(silo)),
        runkit.with_start_timeout(0.2),
    ) as client:
        executor = client.executor_for(s.app)
        errors: list[Exception] = []

        async def deposit(ref: str) -> None:
            with pytest.raises(runkit.ConfigurationError, match="has never run") as raised:
                await executor.execute_command(Deposit("a", 1, ref))
            errors.append(raised.value)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(deposit, "r1")
                tg.start_soon(deposit, "r2")
            await start_application(silo)
            await executor.execute_command(Deposit("a", 1, "r3"))
        assert len(errors) == 2
        assert inbox_writer_tasks() == PARTITIONS


async def test_an_application_waiting_to_be_started_does_not_hold_up_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = setup()
    other_key = "c0000000-0000-4000-8000-0000000000ff"
    other = App(Accounts(), key=other_key, name="other")
    silo = f"client-{uuid.uuid4()}"
    await start_application(silo)  # not the other one
    provider = MemoryProvider(silo)
    real_open = provider.keyspaces.open
    waiting = anyio.Event()

    async def open_keyspace(name: str) -> Any:
        if name == meta_name(other_key):
            waiting.set()  # the other application's acceptor waits for its partition count
        return await real_open(name)

    monkeypatch.setattr(provider.keyspaces, "open", open_keyspace)
    async with (
        runkit.Client(
            runkit.with_application(s.config),
            runkit.with_application(build(other, registry=REGISTRY)),
            runkit.with_persistence_provider(provider),
        ) as client,
        anyio.create_task_group() as tg,
    ):
        done = anyio.Event()

        async def deposit_to_other() -> None:
            await client.executor_for(other).execute_command(Deposit("a", 1, "other"))
            done.set()

        tg.start_soon(deposit_to_other)
        with anyio.fail_after(10):
            await waiting.wait()
            await client.executor_for(s.app).execute_command(Deposit("a", 1, "mine"))
        assert not done.is_set()
        await start_application(silo, other_key)
        with anyio.fail_after(10):
            await done.wait()


async def test_a_client_in_a_nodes_environment_joins_under_an_id_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `docker exec node-1 python script.py`: DOGMA_NODE_ID is that node's.
    s = setup()
    node_id = str(uuid.uuid4())
    monkeypatch.setenv("DOGMA_NODE_ID", node_id)
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", f"memory:///client-{uuid.uuid4()}")
    monkeypatch.setenv("DOGMA_HEARTBEAT_INTERVAL", "0.5")
    engine = runkit.Engine(
        runkit.with_application(s.config),
        runkit.with_partition_count(PARTITIONS),
        runkit.from_environment(),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        with anyio.fail_after(10):
            await engine.executor_for(s.app).execute_command(Deposit("a", 1, "node"))
            async with runkit.Client(
                runkit.with_application(s.config), runkit.from_environment()
            ) as client:
                await client.executor_for(s.app).execute_command(Deposit("a", 1, "client"))
                status = await client.status()
        tg.cancel_scope.cancel()
    assert [n.node_id for n in status.live_nodes] == [node_id]
    [member] = status.clients
    assert member.live
    assert member.node_id != node_id


def test_a_client_takes_a_node_id_given_in_code() -> None:
    s = setup()
    node_id = uuid.uuid4()
    client = runkit.Client(runkit.with_application(s.config), runkit.with_node_id(node_id))
    assert client.settings.node_id == node_id


def test_a_client_refuses_the_options_only_nodes_use(monkeypatch: pytest.MonkeyPatch) -> None:
    # Said in code they would be ignored, and the caller misled.
    s = setup()
    app = runkit.with_application(s.config)
    with pytest.raises(ValueError, match=r"^Client\(\) does not take with_listen_address\(\): "):
        runkit.Client(app, runkit.with_listen_address("127.0.0.1:0"))
    with pytest.raises(
        ValueError,
        match=r"with_partition_count\(\), with_backlog_limit\(\): .* they apply to nodes",
    ):
        runkit.Client(app, runkit.with_partition_count(4), runkit.with_backlog_limit(10))
    # From the environment they are a node's, in whose environment a client may run.
    monkeypatch.setenv("DOGMA_LISTEN_ADDRESS", "127.0.0.1:0")
    monkeypatch.setenv("DOGMA_PARTITION_COUNT", "4")
    runkit.Client(app, runkit.from_environment())


def test_a_client_refusing_a_non_option_names_itself() -> None:
    s = setup()
    with pytest.raises(TypeError, match=r"^Client\(\) takes options made by .*, not str$"):
        runkit.Client(runkit.with_application(s.config), "memory:///x")


@asynccontextmanager
async def stalled_owner(provider: MemoryProvider, offered: anyio.Event) -> AsyncIterator[None]:
    """Serve a node that owns every partition and takes offers without answering them."""
    from runkit.engine.cluster.nodes import NODES_KEYSPACE, RECORD_VERSION, Heartbeat
    from runkit.transport import NodeTransport, PeerInfo, Reply, TlsIdentity

    def offer(peer: PeerInfo, payload: bytes, reply: Reply) -> None:
        offered.set()

    node_id = str(uuid.uuid4())
    transport = NodeTransport(
        node_id=node_id,
        identity=TlsIdentity.self_signed(node_id),
        authenticate=lambda fingerprint: True,
        deferred={"offer": offer},
    )
    async with transport, anyio.create_task_group() as tg:
        address = await tg.start(transport.serve, "127.0.0.1:0")
        now = datetime.now(UTC)
        beat = Heartbeat(
            version=RECORD_VERSION,
            node_id=node_id,
            incarnation="i",
            started_at=now,
            written_at=now,
            expires_at=now + timedelta(hours=1),
            heartbeat_interval=60.0,
            advertise_address=address,
            listen_address=address,
            tls_fingerprint=transport.identity.fingerprint,
        )
        async with await provider.keyspaces.open(NODES_KEYSPACE) as ks:
            await ks.set_unconditional(node_id.encode(), msgspec.msgpack.encode(beat))
        yield
        tg.cancel_scope.cancel()


async def test_a_call_after_the_client_was_left_says_so() -> None:
    # A caller that reaches the client once it is left (a call under way in
    # another task, say) is told that, not to use the client inside its block.
    s = setup()
    provider = MemoryProvider(f"client-{uuid.uuid4()}")
    client = runkit.Client(
        runkit.with_application(s.config), runkit.with_persistence_provider(provider)
    )
    executor = client.executor_for(s.app)
    with pytest.raises(RuntimeError, match="inside `async with"):
        await executor.execute_command(Deposit("a", 1, "early"))
    async with client:
        pass
    with pytest.raises(EngineStopped, match="the client was left"):
        await executor.execute_command(Deposit("a", 1, "late"))
    with pytest.raises(EngineStopped, match="the client was left"):
        await client.status()


async def test_an_acceptor_made_after_the_client_was_left_says_so() -> None:
    # acceptor() makes the application's acceptor in the client's task group;
    # the client can be left before that task takes its first step.
    from runkit.client import _Making

    s = setup()
    provider = MemoryProvider(f"client-{uuid.uuid4()}")
    client = runkit.Client(
        runkit.with_application(s.config), runkit.with_persistence_provider(provider)
    )
    await client.__aenter__()
    key = s.config.identity.key
    making = client._acceptors[key] = _Making()
    assert client._tg is not None
    client._tg.start_soon(client._make, key, making)  # what acceptor() does
    await client.__aexit__(None, None, None)
    assert making.done.is_set()
    assert isinstance(making.error, EngineStopped), repr(making.error)


async def test_leaving_the_client_while_a_call_waits_for_the_application_says_so() -> None:
    # No node has started the application yet: the call waits for one. The
    # client is left meanwhile: the caller was told to use the client inside
    # its `async with`, which it did.
    s = setup()
    provider = MemoryProvider(f"client-{uuid.uuid4()}")
    outcome: list[BaseException] = []

    async def deposit(executor: Any) -> None:
        try:
            await executor.execute_command(Deposit("a", 1, "waiting"))
        except Exception as exc:
            outcome.append(exc)

    async with (
        anyio.create_task_group() as tg,
        runkit.Client(
            runkit.with_application(s.config), runkit.with_persistence_provider(provider)
        ) as client,
    ):
        tg.start_soon(deposit, client.executor_for(s.app))
        await wait_until(lambda: bool(client._acceptors))  # the call waits for the application
        await anyio.sleep(0.05)
    assert len(outcome) == 1
    assert isinstance(outcome[0], EngineStopped), outcome
    assert str(outcome[0]) == "the client was left before the command was accepted"


@pytest.mark.parametrize("observed", [False, True], ids=["unobserved", "observed"])
async def test_leaving_the_client_ends_a_call_in_flight_with_a_clear_error(
    observed: bool,
) -> None:
    # The call is offered to the owner when the client is left: the offer fails
    # with the closing transport and the call falls back to an inbox whose
    # writer has already stopped. It must fail at once, not wait for ever.
    # Observed, the failed offer also widens the observation, with the
    # client's task group gone.
    s = setup()
    silo = f"client-{uuid.uuid4()}"
    await start_application(silo)
    provider = MemoryProvider(silo)
    offered, done = anyio.Event(), anyio.Event()
    outcome: list[BaseException] = []

    async def saw(event: Deposited) -> bool:
        return True

    observers = [dogma.observe(Deposited, saw, registry=REGISTRY)] if observed else []

    async def deposit(executor: Any) -> None:
        try:
            await executor.execute_command(Deposit("a", 1, "in flight"), observers=observers)
        except Exception as exc:
            outcome.append(exc)
        done.set()

    async with stalled_owner(provider, offered), anyio.create_task_group() as tg:
        async with runkit.Client(
            runkit.with_application(s.config), runkit.with_persistence_provider(provider)
        ) as client:
            tg.start_soon(deposit, client.executor_for(s.app))
            with anyio.fail_after(10):
                await offered.wait()
        with anyio.fail_after(10):
            await done.wait()
    assert len(outcome) == 1
    assert isinstance(outcome[0], EngineStopped)
