"""``Engine.status()``, ``read_status`` and ``runkit status``: nodes, owners, backlog, lag.

Real engines on the memory driver (two nodes on one silo for ownership), the
CLI in process (``--json``) and in a subprocess against PostgreSQL (the human
output, and a mistyped schema).
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

import runkit
from runkit.cli import main, status_text
from runkit.engine.cluster.status import ClusterStatus, read_status
from runkit.engine.engine import Engine
from runkit.engine.settings import EngineSettings
from runkit.persistence import Provider
from runkit.testing.faults import WRITE_OPS, FaultPlan, FaultyProvider
from runkit_memory import MemoryProvider

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
import engine_commands_harness as ch  # noqa: E402
import engine_faults_app as fa  # noqa: E402

VERSION = importlib.metadata.version("runkit-core")
FAST: dict[str, Any] = dict(ch.FAST)


def silo() -> MemoryProvider:
    return MemoryProvider(f"status-{uuid.uuid4()}")


def now() -> datetime:
    return datetime.now(UTC)


def node(provider: MemoryProvider, *configs: Any, **settings: Any) -> Engine:
    """An engine on its own provider of *provider*'s silo, with membership (the default)."""
    # Not shorter: a loop stalled for 100 ms (two xdist workers on two CPUs)
    # would let a live node's record expire between two reads.
    options = {**FAST, "heartbeat_interval": 0.2, **settings}
    return Engine.from_settings(
        EngineSettings(
            applications=configs,
            persistence_provider=MemoryProvider(provider.silo),
            **options,
        )
    )


async def eventually(
    read: Callable[[], Awaitable[ClusterStatus]],
    check: Callable[[ClusterStatus], bool],
    *,
    timeout: float = 20.0,
) -> ClusterStatus:
    """Poll *read* until *check* holds; fail with the last status after *timeout*."""
    last: ClusterStatus | None = None
    with anyio.move_on_after(timeout):
        while True:
            last = await read()
            if check(last):
                return last
            await anyio.sleep(0.01)
    raise AssertionError(f"status never matched; last:\n{last and status_text(last)}")


async def test_two_nodes_are_listed_live_with_their_partitions_split_and_a_leaver_at_once() -> None:
    s = ch.setup()
    inner = silo()
    # Node IDs that rendezvous splits the 8 partitions between (1 random pair in 128 does not).
    one, two = (
        node(inner, s.config, partition_count=8, node_id=node_id)
        for node_id in ch.splitting_node_ids(8)
    )
    ids = {str(one.settings.node_id), str(two.settings.node_id)}
    async with anyio.create_task_group() as tg:
        scope_two = anyio.CancelScope()
        two_stopped = anyio.Event()

        async def run_two() -> None:
            with scope_two:
                await two.run()
            two_stopped.set()

        tg.start_soon(one.run)
        tg.start_soon(run_two)
        for i in range(20):
            executor = (one if i % 2 else two).executor_for(s.app)
            await executor.execute_command(ch.Deposit(f"a{i % 5}", 1, f"r{i}"))
        rt_one, rt_two = await one.runtime(ch.APP_KEY), await two.runtime(ch.APP_KEY)

        running: list[set[int]] = []

        def converged(st: ClusterStatus) -> bool:
            parts = st.application(ch.APP_KEY).partitions
            # What each engine runs, read with the status (a loaded machine may
            # still move partitions after the status first matches).
            running[:] = [set(rt_one.partitions), set(rt_two.partitions)]
            return (
                len(st.live_nodes) == 2
                and all(p.claimed_by == p.owner for p in parts)
                and sum(p.stream_end for p in parts) == 20
                and sum(p.inbox_backlog for p in parts) == 0
                and all(
                    {p.index for p in parts if p.owner == str(engine.settings.node_id)} == runs
                    for engine, runs in zip((one, two), running, strict=True)
                )
            )

        status = await eventually(one.status, converged)
        assert {n.node_id for n in status.nodes} == ids
        assert all(n.live and n.version == VERSION and n.role == "node" for n in status.nodes)
        app = status.application("testapp")
        assert (app.key, app.partition_count, len(app.partitions)) == (ch.APP_KEY, 8, 8)
        assert [p.index for p in status.partitions] == list(range(8))
        owners = {p.owner for p in app.partitions}
        assert owners == ids  # rendezvous split them between the two
        # The owners shown are the partitions each engine actually runs.
        assert {p.index for p in app.partitions if p.owner == str(one.settings.node_id)} == running[
            0
        ]
        assert {p.index for p in app.partitions if p.owner == str(two.settings.node_id)} == running[
            1
        ]
        # Both ends of the API agree on the data.
        data = (await two.status()).to_json()
        assert {n["node_id"] for n in data["nodes"]} == ids
        assert sum(p["stream_end"] for p in data["partitions"]) == 20
        # A client is listed as one, never among the nodes (it owns no partition).
        async with runkit.Client(
            runkit.with_application(s.config),
            runkit.with_persistence_provider(MemoryProvider(inner.silo)),
        ) as client:
            seen = await client.status()
        assert {n.node_id for n in seen.nodes} == ids
        assert [(c.role, c.live) for c in seen.clients] == [("client", True)]
        assert [c["role"] for c in seen.to_json()["clients"]] == ["client"]
        assert "1 live client(s)" in status_text(seen)

        # Node two leaves gracefully: the very next status shows node one owning everything.
        scope_two.cancel()
        await two_stopped.wait()
        after = await one.status()
        assert [n.node_id for n in after.nodes] == [str(one.settings.node_id)]
        assert {p.owner for p in after.partitions} == {str(one.settings.node_id)}
        tg.cancel_scope.cancel()


async def test_commands_accepted_while_no_node_runs_them_show_as_backlog() -> None:
    from runkit.engine.cluster.ownership import StaticOwnership

    s = ch.setup()
    provider = silo()
    engine = Engine.from_settings(
        EngineSettings(applications=(s.config,), persistence_provider=provider, **FAST)
    )
    engine.use_ownership(StaticOwnership())  # accepts, owns nothing, publishes no heartbeat
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        executor = engine.executor_for(s.app)
        for i in range(12):
            await executor.execute_command(ch.Deposit(f"a{i % 4}", 1, f"r{i}"))
        status = await engine.status()
        tg.cancel_scope.cancel()
    assert status.nodes == ()
    parts = status.application(ch.APP_KEY).partitions
    assert sum(p.inbox_backlog for p in parts) == 12
    assert sum(p.inbox_end for p in parts) == 12
    assert all(p.owner is None and p.claimed_by is None for p in parts)
    assert all(p.stream_end == 0 and p.processed == 0 for p in parts)
    # A node that runs them works the backlog off; status follows.
    runner = node(provider, s.config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.run)
        done = await eventually(
            runner.status,
            lambda st: (
                sum(p.inbox_backlog for p in st.partitions) == 0
                and sum(p.stream_end for p in st.partitions) == 12
            ),
        )
        assert {p.owner for p in done.partitions} == {str(runner.settings.node_id)}
        assert sum(p.processed for p in done.partitions) == 12
        tg.cancel_scope.cancel()


async def test_backlog_counts_the_commands_of_inbox_records_not_the_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from runkit.engine.cluster import status as status_module
    from runkit.engine.cluster.ownership import StaticOwnership

    s = ch.setup()
    provider = silo()
    engine = Engine.from_settings(
        EngineSettings(applications=(s.config,), persistence_provider=provider, **FAST)
    )
    engine.use_ownership(StaticOwnership())  # accepts, owns nothing
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        executor = engine.executor_for(s.app)
        # Concurrent callers of a partition share inbox records.
        async with anyio.create_task_group() as callers:
            for i in range(40):
                callers.start_soon(executor.execute_command, ch.Deposit(f"a{i % 4}", 1, f"r{i}"))
        status = await engine.status()
        # Records past the ones read count as one command each (a lower bound).
        monkeypatch.setattr(status_module, "BACKLOG_RECORDS_READ", 0)
        unread = await engine.status()
        tg.cancel_scope.cancel()
    parts = status.application(ch.APP_KEY).partitions
    assert sum(p.inbox_end for p in parts) < 40  # fewer records than commands
    assert sum(p.inbox_backlog for p in parts) == 40
    assert [p.inbox_backlog for p in unread.partitions] == [p.inbox_end for p in parts]


async def test_poisoned_commands_are_counted_per_partition() -> None:
    s = ch.setup()
    s.accounts.unexpected.update({"bug1", "bug2"})
    provider = silo()
    async with ch.running(provider, s.config) as engine:
        executor = engine.executor_for(s.app)
        for ref in ("ok1", "bug1", "ok2", "bug2"):
            await executor.execute_command(ch.Deposit(f"acct-{ref}", 1, ref))
        status = await eventually(
            engine.status, lambda st: sum(p.poisoned for p in st.partitions) == 2
        )
        # Each poisoned command is counted on the partition it was accepted on.
        from runkit.engine.commands.poison import list_poisoned

        poisoned = [p async for p in list_poisoned(provider, ch.APP_KEY, 4)]
        expected = {i: sum(1 for p in poisoned if p.partition == i) for i in range(4)}
        assert {p.index: p.poisoned for p in status.partitions} == expected
        assert "2 poisoned" in status_text(status)


def faults_config(provider: Provider, *, disabled: tuple[str, ...] = ()) -> Any:
    return fa.BankApp(provider, disabled=disabled).config()


async def test_consumers_behind_show_lag_until_they_catch_up() -> None:
    provider = silo()
    # Run with the process and projection disabled, so their events pile up.
    idle = faults_config(provider, disabled=("loyalty", "counter"))
    commands = [(f"k{i}", fa.Deposit(f"acct{i % 6}", 10)) for i in range(16)]
    async with fa.running(MemoryProvider(provider.silo), idle) as engine:
        await fa.execute_all(engine.executor_for(idle), commands, [])
        await eventually(engine.status, lambda st: sum(p.inbox_backlog for p in st.partitions) == 0)
    enabled = faults_config(provider)
    plan = FaultPlan()
    status = await read_status(FaultyProvider(provider, plan), [enabled], now=now())
    assert not set(plan.calls) & WRITE_OPS, plan.calls  # status only reads
    app = status.application(fa.APP_KEY)
    ends = {p.index: p.stream_end for p in app.partitions}
    assert sum(ends.values()) == 16
    kinds = {(c.handler, c.kind) for c in app.consumers}
    assert kinds == {("loyalty", "process"), ("counter", "projection")}
    assert len(app.consumers) == 2 * 4
    for c in app.consumers:
        assert (c.checkpoint, c.lag) == (0, ends[c.partition]), c
    lags = [c.lag for c in app.consumers if c.lag is not None]
    assert lags == sorted(lags, reverse=True)  # largest first
    assert lags[0] > 0
    text = status_text(status)
    assert "consumer lag (largest first):" in text
    idle_streams = sum(1 for c in app.consumers if ends[c.partition] == 0)
    assert f"{idle_streams} of 8 consumer(s) caught up" in text

    # With both enabled a node catches up; deadlines the process schedules show meanwhile.
    async with fa.running(MemoryProvider(provider.silo), enabled) as engine:
        seen = await eventually(
            engine.status, lambda st: any(p.pending_deadlines for p in st.partitions)
        )
        assert sum(p.pending_deadlines for p in seen.partitions) >= 1

        def caught_up(st: ClusterStatus) -> bool:
            return all(c.lag == 0 for c in st.consumers) and not any(
                p.pending_deadlines or p.inbox_backlog for p in st.partitions
            )

        done = await eventually(engine.status, caught_up, timeout=30)
        # The process executed commands (AddPoints, statements): the streams grew.
        assert sum(p.stream_end for p in done.partitions) > 16
        assert all(c.checkpoint == p_end(done, c.partition) for c in done.consumers)


def p_end(status: ClusterStatus, index: int) -> int:
    return next(p.stream_end for p in status.partitions if p.index == index)


async def test_read_status_creates_nothing_on_an_empty_store() -> None:
    s = ch.setup()
    provider = silo()
    provider.set_read_only()  # as runkit status opens it
    status = await read_status(provider, [s.config], now=now())
    assert status.nodes == ()
    app = status.application(ch.APP_KEY)
    assert (app.partition_count, app.partitions, app.consumers) == (None, (), ())
    assert "has never run on this store" in status_text(status)
    data = provider._silo  # the memory driver records a name when it creates it
    assert (data.journals, data.keyspaces, data.sets) == ({}, {}, {})


# -- the CLI -------------------------------------------------------------------------------


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = main(list(argv), out=out)
    return status, out.getvalue()


async def test_cli_json_shows_a_running_node_and_the_applications_it_reports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = ch.setup()
    provider = silo()
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", f"memory:///{provider.silo}")
    engine = node(
        provider,
        s.config,
        listen_address="127.0.0.1:0",
        advertise_address="node-a.internal:7000",
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        executor = engine.executor_for(s.app)
        for i in range(6):
            await executor.execute_command(ch.Deposit(f"a{i}", 1, f"r{i}"))
        await eventually(
            engine.status,
            lambda st: (
                sum(p.stream_end for p in st.partitions) == 6
                and all(p.claimed_by for p in st.partitions)
            ),
        )
        code, text = await anyio.to_thread.run_sync(lambda: run_cli("status", "--json"))
        tg.cancel_scope.cancel()
    assert code == 0
    data = json.loads(text)
    assert set(data) == {"read_at", "nodes", "clients", "applications", "partitions", "consumers"}
    (n,) = data["nodes"]
    assert n["node_id"] == str(engine.settings.node_id)
    assert (n["live"], n["version"], n["role"]) == (True, VERSION, "node")
    # The listen address as bound: port 0 was given one.
    advertised, listening = n["addresses"]
    assert advertised == "node-a.internal:7000"
    assert listening.startswith("127.0.0.1:")
    assert int(listening.rsplit(":", 1)[1]) > 0
    # Without MODULE:ATTR the application is found through the node's heartbeat.
    assert data["applications"] == [{"key": ch.APP_KEY, "name": ch.APP_KEY, "partition_count": 4}]
    assert [p["index"] for p in data["partitions"]] == [0, 1, 2, 3]
    assert {p["owner"] for p in data["partitions"]} == {str(engine.settings.node_id)}
    assert sum(p["stream_end"] for p in data["partitions"]) == 6
    assert data["consumers"] == []


async def test_cli_execute_in_a_nodes_environment_does_not_take_the_nodes_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `docker exec node-1 runkit execute ...` inherits the node's DOGMA_NODE_ID.
    import bank
    from runkit.config import build

    provider = silo()
    engine = node(provider, build(bank.app))
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", f"memory:///{provider.silo}")
    monkeypatch.setenv("DOGMA_NODE_ID", str(engine.settings.node_id))
    command = (
        '{"customer_id": "C1", "customer_name": "Ann", "account_id": "A1", "account_name": "S"}'
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await eventually(engine.status, lambda st: len(st.live_nodes) == 1)
        code, text = await anyio.to_thread.run_sync(
            lambda: run_cli("execute", "bank:app", "OpenAccountForNewCustomer", command)
        )
        status = await engine.status()
        tg.cancel_scope.cancel()
    assert (code, text) == (0, "executed customer C1 Ann is opening their first account A1 S\n")
    assert [n.node_id for n in status.live_nodes] == [str(engine.settings.node_id)]


def test_status_text_says_how_to_name_an_application_found_through_heartbeats() -> None:
    from runkit.engine.cluster.status import ApplicationStatus

    key = "5afe0000-0000-4000-8000-000000000001"
    named = ApplicationStatus(key=key, name="bank", partition_count=1)
    found = ApplicationStatus(key=key, name=key, partition_count=1)
    hint = "for its name and its consumers' lag, name it: runkit status MODULE:ATTR\n"

    def text(app: ApplicationStatus) -> str:
        return status_text(ClusterStatus(read_at=now(), nodes=(), applications=(app,)))

    assert hint not in text(named)
    assert f"application {key}: 1 partition(s)\n" in text(found)
    assert text(found).endswith(hint)


def test_cli_status_on_an_empty_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", f"memory:///status-{uuid.uuid4()}")
    code, text = run_cli("status")
    assert code == 0
    assert text.startswith("no nodes have heartbeat records in this store\n")
    assert "a memory:// store lives inside the process that opened it" in text
    code, text = run_cli("status", "--json")
    assert code == 0
    assert json.loads(text)["nodes"] == []


def test_cli_status_names_applications_that_never_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", f"memory:///status-{uuid.uuid4()}")
    code, text = run_cli("status", "bank:app", "--json")
    assert code == 0
    (app,) = json.loads(text)["applications"]
    assert (app["name"], app["partition_count"]) == ("bank", None)
    code, text = run_cli("status", "bank:app")
    assert code == 0
    assert f"application bank ({app['key']}): has never run on this store" in text


async def test_engine_status_before_run_reads_its_store_without_creating_anything() -> None:
    s = ch.setup()
    provider = silo()
    async with ch.running(provider, s.config) as engine:
        await engine.executor_for(s.app).execute_command(ch.Deposit("a", 1, "r"))
        await eventually(engine.status, lambda st: sum(p.stream_end for p in st.partitions) == 1)
    idle = Engine.from_settings(
        EngineSettings(applications=(s.config,), persistence_url=f"memory:///{provider.silo}")
    )
    status = await idle.status()
    assert status.nodes == ()  # the engine that ran left: its heartbeat is gone
    assert status.application(ch.APP_KEY).partition_count == 4
    assert sum(p.stream_end for p in status.partitions) == 1


async def test_engine_status_after_run_reads_its_store_although_run_closed_its_provider() -> None:
    s = ch.setup()
    provider = silo()
    engine = Engine.from_settings(
        EngineSettings(
            applications=(s.config,), persistence_url=f"memory:///{provider.silo}", **FAST
        )
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await engine.executor_for(s.app).execute_command(ch.Deposit("a", 1, "r"))
        await eventually(engine.status, lambda st: sum(p.stream_end for p in st.partitions) == 1)
        tg.cancel_scope.cancel()
    status = await engine.status()  # run() closed the provider it made from the URL
    assert status.nodes == ()
    assert sum(p.stream_end for p in status.partitions) == 1


async def test_a_client_without_applications_reads_the_status_of_those_nodes_run() -> None:
    # A client that only looks (a dashboard, a script) need not know the
    # applications: as `runkit status` without arguments, it reports those the
    # live nodes' heartbeats mention.
    s = ch.setup()
    provider = silo()
    async with ch.running(provider, s.config) as engine:
        await engine.executor_for(s.app).execute_command(ch.Deposit("a", 1, "r"))
        async with runkit.Client(runkit.with_persistence_provider(provider)) as client:
            status = await eventually(
                client.status, lambda st: sum(p.stream_end for p in st.partitions) == 1
            )
            with pytest.raises(ValueError, match="not an application registered"):
                client.executor_for(s.app)
    assert [a.key for a in status.applications] == [ch.APP_KEY]
    assert len(status.nodes) == 1


def test_cli_status_usage_errors_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DOGMA_PERSISTENCE_URL", raising=False)
    assert run_cli("status") == (2, "")
    assert "set DOGMA_PERSISTENCE_URL" in capsys.readouterr().err
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "memory:///x")
    assert run_cli("status", "--watch", "bank:app")[0] == 2
    assert "give MODULE:ATTR before --watch" in capsys.readouterr().err
    assert run_cli("status", "--watch=0")[0] == 2
    assert run_cli("status", "nosuchmodule_status:app")[0] == 2
    assert "cannot import module 'nosuchmodule_status'" in capsys.readouterr().err


# -- PostgreSQL, through a subprocess -------------------------------------------------------


def cli(*argv: str, url: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DOGMA_")}
    return subprocess.run(
        [sys.executable, "-m", "runkit.cli", *argv],
        capture_output=True,
        text=True,
        env={**environ, "DOGMA_PERSISTENCE_URL": url},
        timeout=timeout,
        check=False,
    )


async def test_subprocess_status_shows_a_postgres_cluster_and_a_mistyped_schema_exits_2(
    postgres_dsn: str, postgres_schema: str
) -> None:
    import psycopg

    from runkit.persistence import provider_from_url
    from runkit_postgres.testing import url_for

    s = ch.setup()
    url = url_for(postgres_dsn, schema=postgres_schema)
    provider = provider_from_url(url)
    engine = Engine.from_settings(
        EngineSettings(
            applications=(s.config,),
            persistence_provider=provider,
            heartbeat_interval=0.2,
            **FAST,
        )
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        executor = engine.executor_for(s.app)
        for i in range(5):
            await executor.execute_command(ch.Deposit(f"a{i}", 1, f"r{i}"))
        await eventually(
            engine.status,
            lambda st: (
                sum(p.stream_end for p in st.partitions) == 5
                and all(p.claimed_by for p in st.partitions)
            ),
        )
        shown = await anyio.to_thread.run_sync(lambda: cli("status", url=url))
        tg.cancel_scope.cancel()
    await provider.close()
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["node", "state", "role", "version", "address", "last", "heartbeat"]
    assert lines[1].split()[:4] == [str(engine.settings.node_id), "live", "node", VERSION]
    assert "1 live node(s), 0 expired" in lines
    assert f"application {ch.APP_KEY}: 4 partition(s)" in lines
    header = lines.index(f"application {ch.APP_KEY}: 4 partition(s)") + 1
    assert lines[header].split()[:2] == ["partition", "owner"]
    rows = [line.split() for line in lines[header + 1 : header + 5]]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    assert {r[1] for r in rows} == {str(engine.settings.node_id)}
    assert sum(int(r[4]) for r in rows) == 5  # stream end
    assert "backlog 0 command(s), 0 poisoned" in lines
    assert "password" not in shown.stderr.lower()

    # A mistyped schema: one plain message, exit 2, and nothing created.
    typo = f"{postgres_schema}_typo"
    wrong = await anyio.to_thread.run_sync(
        lambda: cli("status", url=url_for(postgres_dsn, schema=typo))
    )
    assert wrong.returncode == 2, (wrong.stdout, wrong.stderr)
    assert wrong.stderr.startswith("runkit status: ")
    assert typo in wrong.stderr
    assert "Traceback" not in wrong.stderr
    with psycopg.connect(postgres_dsn) as conn:
        found = conn.execute(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s", (typo,)
        ).fetchone()
    assert found == (0,)


def test_watch_goes_on_through_store_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A watch is most useful while the store has trouble: one failed read is
    # reported on stderr and the watch looks again.
    from runkit.engine.cluster import status as status_module
    from runkit.persistence import PersistenceError, StoreUnavailable

    calls = 0

    async def flaky(*args: Any, **kwargs: Any) -> ClusterStatus:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise PersistenceError("the store is away")
        if calls == 3:
            # A store waiting cannot cure still ends the watch (exit 2).
            raise StoreUnavailable("no such database")
        return await read_status(*args, **kwargs)

    monkeypatch.setattr(status_module, "read_status", flaky)
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", f"memory:///{silo().silo}")
    code, text = run_cli("status", "--json", "--watch", "0.01")
    assert code == 2
    assert calls == 3
    err = capsys.readouterr().err
    assert "reading the store failed" in err
    assert "no such database" in err
    assert set(json.loads(text.splitlines()[-1])) >= {"nodes", "partitions"}


@pytest.mark.parametrize("inherited", ["default", "sigint-ignored"])
def test_watch_refreshes_until_interrupted(inherited: str) -> None:
    # A background job of a non-interactive shell starts with SIGINT ignored:
    # Ctrl-C's signal (sent by the test) still ends --watch there.
    import signal

    environ = {k: v for k, v in os.environ.items() if not k.startswith("DOGMA_")}
    command = [sys.executable, "-m", "runkit.cli", "status", "--watch", "0.1"]
    if inherited == "sigint-ignored":
        command = ["sh", "-c", 'trap "" INT; exec "$0" "$@"', *command]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**environ, "DOGMA_PERSISTENCE_URL": f"memory:///watch-{uuid.uuid4()}"},
    )
    try:
        assert proc.stdout is not None
        snapshots = 0
        for line in proc.stdout:
            snapshots += line.startswith("--- ")  # not a terminal: no screen clearing
            if snapshots == 3:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()  # a failure here must not leak them into later tests
    assert snapshots == 3
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_a_heartbeat_written_while_the_status_was_read_is_not_negative_seconds_ago() -> None:
    # read_at is taken before the heartbeats are read: a node may write one in
    # between, a few milliseconds "after" it. "-0.0s ago" is what that showed.
    from datetime import UTC, datetime, timedelta

    from runkit.engine.cluster.status import ClusterStatus, NodeStatus

    read_at = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    node_status = NodeStatus(
        node_id=str(uuid.uuid4()),
        live=True,
        role="node",
        version="0.1.0",
        advertise_address="127.0.0.1:7401",
        listen_address="127.0.0.1:7401",
        started_at=read_at - timedelta(minutes=1),
        written_at=read_at + timedelta(milliseconds=30),
        expires_at=read_at + timedelta(seconds=3),
        heartbeat_interval=1.0,
    )
    text = status_text(ClusterStatus(read_at=read_at, nodes=(node_status,), applications=()))
    assert "  0.0s ago" in text
    assert "-0.0s" not in text
