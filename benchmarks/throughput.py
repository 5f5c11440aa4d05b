"""Handled deposits/s of runkit against the ``eventsourcing`` library, on the same store.

Usage::

    uv run python benchmarks/throughput.py [--targets memory,postgres] [--callers 1,8,64]
        [--accounts 1000] [--deposits 10000] [--repeat 1] [--raw-seconds 3]
        [--backend asyncio|uvloop|trio] [--node-gc] [--side-projections K] [--partitions 16]
        [--quick]

The workload of issue 8: one ``Account`` aggregate, ``OpenAccount`` then
``Deposit`` commands, one ``Deposited`` event per deposit. For each target
(``memory``, ``postgres``) and each number of concurrent callers C, in one run:

1. **runkit**: a minimal Dogma application on ``runkit.Engine`` (one node, 16
   partitions, the default; ``--partitions``). ``--accounts`` accounts are
   opened by C callers (timed: opens/s), then C callers execute ``--deposits``
   deposits spread uniformly over the accounts, each waiting until its own
   ``Deposited`` is recorded (that is "handled": on the owning node
   ``execute_command`` returns once the command's batch is committed; with
   ``--observe`` the caller also waits for the event through a
   ``dogma.observe`` observer) before the next. Reported: handled/s, p50/p99
   latency, process CPU time per deposit (``time.process_time``, all threads),
   and store writes and reads per deposit (counted by
   ``runkit.testing.faults.FaultyProvider`` with an empty plan); *(commit)* is
   the writes made before callers are answered: stream and inbox appends; the
   rest (aggregate journals, snapshots) is background materialisation. On
   PostgreSQL, *db write tx* is the write transactions the server committed
   meanwhile (``targets.postgres.WriteTransactions``), for runkit and for
   eventsourcing: the driver runs concurrent writes as shared statements, so
   it is what the disk sees. With ``--side-projections K`` the application
   also has K in-memory projections of ``AccountOpened`` only: consumers on
   every partition that the deposits' events do not concern (what they cost is
   the price of an application's other handlers).
2. **eventsourcing** (9.5): an ``Aggregate`` with a ``deposit`` event on an
   ``Application`` using ``eventsourcing.postgres`` (a fresh schema on the same
   server, a pool of 8 connections like the driver's) or ``eventsourcing.popo``.
   Each deposit is ``repository.get`` + ``save`` in a worker thread (C at
   once); a version conflict between two callers on one account is retried
   (counted).
3. **raw bound**: C tasks appending inbox-sized records for ``--raw-seconds``
   through the driver's journal (``provider.journals``) and, for PostgreSQL,
   as single-row INSERTs through psycopg directly (``RawPostgres``, the
   driver's own SQL without the driver). runkit's handled/s is given as a
   ratio of the raw INSERT bound (PostgreSQL) or of the driver's appends
   (memory).

Each (target, C) cell gets a fresh store (memory silo, PostgreSQL schemas).
With ``--repeat N`` the repetitions are interleaved (every cell once, then
again, alternating which system goes first) and medians are reported.
PostgreSQL is a throwaway server with durable settings, as for
``benchmarks/engine.py`` (``RUNKIT_BENCH_PG_FAST=1``: fsync off).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.to_thread
import attrs
import psycopg
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import IntegrityError
from psycopg import sql

from runkit._backends import BACKENDS, run_arguments

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import (
    STORE_KINDS,
    NullProjection,
    deposit_record_bytes,
    machine_line,
    ms,
    percentile,
    raw_appends,
    store_kind,
    table,
)
from targets import BaselineJournal
from targets.postgres import RawPostgres, WriteTransactions

import dogma
import runkit
from runkit._collector import tuned_collector
from runkit.config import build
from runkit.persistence import Provider
from runkit.testing.faults import WRITE_OPS, FaultPlan, FaultyProvider, Timing
from runkit_memory import MemoryProvider
from runkit_postgres import PostgresProvider
from runkit_postgres.testing import PostgresServer, drop_schema

PHASE_TIMEOUT = 900.0  # a stuck engine fails the run instead of hanging it
NOT_COUNTED = frozenset({"open", "close", "provision"})  # neither reads nor writes

# -- the runkit application --------------------------------------------------------------

REGISTRY = dogma.MessageTypeRegistry()


@dogma.register_command("7f1c0a52-5b0e-4c39-9d1e-3a1f6b2c0001", registry=REGISTRY)
@attrs.frozen
class OpenAccount(dogma.Command):
    account: str


@dogma.register_event("7f1c0a52-5b0e-4c39-9d1e-3a1f6b2c0002", registry=REGISTRY)
@attrs.frozen
class AccountOpened(dogma.Event):
    account: str


@dogma.register_command("7f1c0a52-5b0e-4c39-9d1e-3a1f6b2c0003", registry=REGISTRY)
@attrs.frozen
class Deposit(dogma.Command):
    account: str
    amount: int
    ref: str


@dogma.register_event("7f1c0a52-5b0e-4c39-9d1e-3a1f6b2c0004", registry=REGISTRY)
@attrs.frozen
class Deposited(dogma.Event):
    account: str
    amount: int
    ref: str


@attrs.define
class AccountRoot(dogma.NoSnapshotBehavior):
    """One account: whether it is open, and its balance."""

    opened: bool = False
    balance: int = 0

    def apply_event(self, event: dogma.Event) -> None:
        if isinstance(event, AccountOpened):
            self.opened = True
        elif isinstance(event, Deposited):
            self.balance += event.amount


class AccountHandler:
    """The ``Account`` aggregate: opening, and one ``Deposited`` per deposit."""

    def configure(self, c: dogma.AggregateConfigurer) -> None:
        c.identity("account", "7f1c0a52-5b0e-4c39-9d1e-3a1f6b2c0010")
        c.routes(
            dogma.handles_command(OpenAccount, registry=REGISTRY),
            dogma.handles_command(Deposit, registry=REGISTRY),
            dogma.records_event(AccountOpened, registry=REGISTRY),
            dogma.records_event(Deposited, registry=REGISTRY),
        )

    def new(self) -> AccountRoot:
        return AccountRoot()

    def route_command_to_instance(self, command: dogma.Command) -> str:
        assert isinstance(command, OpenAccount | Deposit)
        return command.account

    def handle_command(
        self,
        root: AccountRoot,
        scope: dogma.AggregateCommandScope[AccountRoot],
        command: dogma.Command,
    ) -> None:
        match command:
            case OpenAccount():
                if not root.opened:
                    scope.record_event(AccountOpened(command.account))
            case Deposit():
                scope.record_event(Deposited(command.account, command.amount, command.ref))
            case _:
                raise dogma.UnexpectedMessage(command)


class OpenedAccounts:
    """The routes of a projection of ``AccountOpened`` only (``--side-projections``).

    Run as ``engine.NullProjection``: in-memory ADR-26 checkpoints, nothing else.
    """

    def __init__(self, index: int) -> None:
        self.index = index

    def configure(self, c: dogma.ProjectionConfigurer) -> None:
        c.identity(f"opened-{self.index}", f"7f1c0a52-5b0e-4c39-9d1e-3a1f6b2c1{self.index:03}")
        c.routes(dogma.handles_event(AccountOpened, registry=REGISTRY))


class BenchApp:
    """The benchmark's application: the account aggregate, and *side* projections of openings."""

    def __init__(self, side: int = 0) -> None:
        self.account = AccountHandler()
        self.side = [NullProjection(OpenedAccounts(i)) for i in range(side)]

    def configure(self, c: dogma.ApplicationConfigurer) -> None:
        c.identity("throughput", "7f1c0a52-5b0e-4c39-9d1e-3a1f6b2c0020")
        c.routes(dogma.via_aggregate(self.account), *map(dogma.via_projection, self.side))


# -- the eventsourcing application ---------------------------------------------------------


class EsAccount(Aggregate):
    """The same account in ``eventsourcing``: created, then one event per deposit."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.balance = 0

    @event("Deposited")
    def deposit(self, amount: int) -> None:
        self.balance += amount


class EsBank(Application[uuid.UUID]):
    """One ``repository.get`` + ``save`` per deposit; conflicts are retried."""

    name = "ThroughputBank"

    def open_account(self, name: str) -> uuid.UUID:
        account = EsAccount(name)
        self.save(account)
        return account.id

    def deposit(self, account_id: uuid.UUID, amount: int) -> int:
        """Deposit; returns how many times a concurrent save conflicted."""
        conflicts = 0
        while True:
            account = cast(EsAccount, self.repository.get(account_id))
            account.deposit(amount)
            try:
                self.save(account)
            except IntegrityError:
                conflicts += 1  # another caller saved this account in between
            else:
                return conflicts


# -- stores --------------------------------------------------------------------------------


@attrs.frozen
class Store:
    """One cell's fresh store: the runkit provider, its raw baseline, eventsourcing's env."""

    provider: Provider
    baseline: RawPostgres | None
    es_env: dict[str, str]
    # The server's write transactions so far (PostgreSQL), for both systems.
    write_transactions: Callable[[], Awaitable[int]] | None = None


class Target:
    """A running backend that makes a fresh ``Store`` per cell."""

    name: str
    notes: str

    def store(self) -> Any:  # an async context manager yielding Store
        raise NotImplementedError


class MemoryTarget(Target):
    name = "memory"
    notes = "runkit memory driver; eventsourcing POPO (in-process) recorders"

    @asynccontextmanager
    async def store(self) -> AsyncIterator[Store]:
        async with MemoryProvider(f"throughput-{uuid.uuid4().hex}") as provider:
            yield Store(provider, None, {"PERSISTENCE_MODULE": "eventsourcing.popo"})


class PostgresTarget(Target):
    name = "postgres"

    def __init__(self, server: PostgresServer, version: str, pool_size: int) -> None:
        self.server = server
        self.write_transactions = WriteTransactions(server.dsn)
        self.pool_size = pool_size
        settings = ", ".join(f"{k}={v}" for k, v in server.settings.items())
        self.notes = (
            f"{version.split(' on ', 1)[0]}; {'external server' if server.external else settings}; "
            f"pool {pool_size} connections (driver, raw INSERTs and eventsourcing)"
        )

    @asynccontextmanager
    async def store(self) -> AsyncIterator[Store]:
        dsn = self.server.dsn
        schema, es_schema = (f"{p}_{uuid.uuid4().hex[:12]}" for p in ("tp", "tp_es"))
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        await anyio.to_thread.run_sync(create_schema, dsn, es_schema)
        provider = PostgresProvider(
            dsn, schema=schema, pool_min_size=self.pool_size, pool_max_size=self.pool_size
        )
        baseline: RawPostgres | None = None
        try:
            await provider.provision()
            baseline = await anyio.to_thread.run_sync(RawPostgres, dsn, schema, self.pool_size)
            yield Store(
                provider,
                baseline,
                {
                    "PERSISTENCE_MODULE": "eventsourcing.postgres",
                    "POSTGRES_DBNAME": str(params.get("dbname", "postgres")),
                    "POSTGRES_HOST": str(params.get("host", "127.0.0.1")),
                    "POSTGRES_PORT": str(params.get("port", "5432")),
                    "POSTGRES_USER": str(params.get("user", "postgres")),
                    "POSTGRES_PASSWORD": str(params.get("password", "")),
                    "POSTGRES_SCHEMA": es_schema,
                    "POSTGRES_POOL_SIZE": str(self.pool_size),
                    "POSTGRES_MAX_OVERFLOW": "0",
                    "CREATE_TABLE": "y",
                },
                self.write_transactions,
            )
        finally:
            await provider.close()
            if baseline is not None:
                await anyio.to_thread.run_sync(baseline.close)
            for name in (schema, es_schema):
                await anyio.to_thread.run_sync(drop_schema, dsn, name)


def create_schema(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))


@asynccontextmanager
async def open_target(name: str) -> AsyncIterator[Target]:
    if name == "memory":
        yield MemoryTarget()
    elif name == "postgres":
        fast = os.environ.get("RUNKIT_BENCH_PG_FAST") == "1"
        pool_size = int(os.environ.get("RUNKIT_BENCH_PG_POOL", "8"))
        with PostgresServer(durable=not fast) as server:
            version = await anyio.to_thread.run_sync(server.version)
            target = PostgresTarget(server, version, pool_size)
            try:
                yield target
            finally:
                await anyio.to_thread.run_sync(target.write_transactions.close)
    else:
        raise ValueError(f"unknown target {name!r}; available: memory, postgres")


# -- measurements --------------------------------------------------------------------------


@attrs.frozen
class Measured:
    """One system's figures in one cell (one target, one C, one repetition)."""

    opens_per_s: float = float("nan")
    handled_per_s: float = float("nan")
    p50: float = float("nan")
    p99: float = float("nan")
    writes_per_deposit: float = float("nan")
    commit_writes_per_deposit: float = float("nan")  # stream and inbox appends
    # Write transactions the database committed (PostgreSQL), either system.
    db_transactions_per_deposit: float = float("nan")
    reads_per_deposit: float = float("nan")
    cpu_us_per_deposit: float = float("nan")  # process CPU time / deposits
    # Per deposit, by store kind and "write"/"read" (runkit only).
    by_store: dict[tuple[str, str], float] = attrs.field(factory=dict)
    conflicts: int = 0
    appends_per_s: float = float("nan")  # raw bound: the driver's journal appends
    inserts_per_s: float = float("nan")  # raw bound: psycopg single-row INSERTs


@attrs.frozen
class Workload:
    accounts: int
    deposits: int
    callers: int
    raw_seconds: float
    observe: bool = False
    side_projections: int = 0
    partitions: int = 16

    def schedule(self) -> list[int]:
        """Account indexes of the deposits: each account equally often, in random order."""
        order = [i % self.accounts for i in range(self.deposits)]
        random.Random(8).shuffle(order)  # the same order for both systems
        return order


async def run_callers(
    callers: int, items: Sequence[Any], work: Callable[[Any], Awaitable[None]]
) -> tuple[float, list[float]]:
    """*callers* tasks taking *items* in turn; returns (items/s, per-item latencies)."""
    latencies: list[float] = []
    queue = iter(items)

    async def caller() -> None:
        for item in queue:  # shared: each item goes to exactly one caller
            started = time.perf_counter()
            await work(item)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with anyio.fail_after(PHASE_TIMEOUT):
        async with anyio.create_task_group() as tg:
            for _ in range(callers):
                tg.start_soon(caller)
    return len(items) / (time.perf_counter() - started), latencies


class CountingPlan(FaultPlan):
    """An empty fault plan that also counts the writes that commit a batch.

    A command is answered once its partition's stream record (or, after a
    handler failure, its inbox record) is durable; aggregate journals,
    snapshots and process records are written after that, in the background.
    """

    def __init__(self) -> None:
        super().__init__()
        self.commit_writes = 0
        self.by_store: Counter[tuple[str, str]] = Counter()

    def decide(self, op: str, kind: str, name: str) -> Timing | None:
        store = store_kind(name)
        if op in WRITE_OPS:
            self.by_store[store, "write"] += 1
            if store in ("stream", "inbox"):
                self.commit_writes += 1
        elif op not in NOT_COUNTED:
            self.by_store[store, "read"] += 1
        return super().decide(op, kind, name)


def counts(provider: FaultyProvider) -> tuple[int, int, int]:
    """(writes, commit writes, reads) through *provider* so far."""
    plan = cast(CountingPlan, provider.plan)
    calls = plan.calls
    writes = sum(n for op, n in calls.items() if op in WRITE_OPS)
    reads = sum(n for op, n in calls.items() if op not in WRITE_OPS and op not in NOT_COUNTED)
    return writes, plan.commit_writes, reads


async def transactions(store: Store) -> float:
    """The server's write transactions so far; NaN where the store cannot count them."""
    if store.write_transactions is None:
        return float("nan")
    return await store.write_transactions()


async def measure_runkit(store: Store, w: Workload) -> Measured:
    app = BenchApp(w.side_projections)
    config = build(app, registry=REGISTRY)
    provider = FaultyProvider(store.provider, CountingPlan())  # no faults: only counts
    engine = runkit.Engine(
        runkit.with_application(config),
        runkit.with_persistence_provider(provider),
        runkit.with_partition_count(w.partitions),
    )
    executor = engine.executor_for(config)
    names = [f"A-{i:05}" for i in range(w.accounts)]

    async def opened(e: AccountOpened) -> bool:
        return True

    async def open_account(name: str) -> None:
        await executor.execute_command(
            OpenAccount(name), observers=[dogma.observe(AccountOpened, opened, registry=REGISTRY)]
        )

    async def deposit(item: tuple[int, int]) -> None:
        sequence, index = item
        ref = f"D-{sequence}"

        async def mine(e: Deposited) -> bool:
            return e.ref == ref

        # On the owning node execute_command returns once the command's batch,
        # its event included, is committed: the deposit is handled. --observe
        # also waits, through an observer, for the Deposited to be published.
        observers = [dogma.observe(Deposited, mine, registry=REGISTRY)] if w.observe else []
        await executor.execute_command(Deposit(names[index], 100, ref), observers=observers)

    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        opens, _ = await run_callers(w.callers, names, open_account)
        writes, commits, reads = counts(provider)
        stores = Counter(cast(CountingPlan, provider.plan).by_store)
        db = await transactions(store)
        cpu = time.process_time()
        handled, latencies = await run_callers(w.callers, list(enumerate(w.schedule())), deposit)
        cpu = time.process_time() - cpu
        db = await transactions(store) - db
        writes_after, commits_after, reads_after = counts(provider)
        stores = cast(CountingPlan, provider.plan).by_store - stores
        tg.cancel_scope.cancel()
    return Measured(
        opens_per_s=opens,
        handled_per_s=handled,
        p50=percentile(latencies, 0.5),
        p99=percentile(latencies, 0.99),
        writes_per_deposit=(writes_after - writes) / w.deposits,
        commit_writes_per_deposit=(commits_after - commits) / w.deposits,
        reads_per_deposit=(reads_after - reads) / w.deposits,
        cpu_us_per_deposit=cpu / w.deposits * 1e6,
        by_store={key: n / w.deposits for key, n in stores.items()},
        db_transactions_per_deposit=db / w.deposits,
    )


async def measure_eventsourcing(store: Store, w: Workload) -> Measured:
    limiter = anyio.CapacityLimiter(w.callers)
    bank = await anyio.to_thread.run_sync(lambda: EsBank(env=store.es_env))
    try:
        ids: list[uuid.UUID] = []

        async def open_account(name: str) -> None:
            ids.append(await anyio.to_thread.run_sync(bank.open_account, name, limiter=limiter))

        opens, _ = await run_callers(
            w.callers, [f"A-{i:05}" for i in range(w.accounts)], open_account
        )
        conflicts = 0

        async def deposit(index: int) -> None:
            nonlocal conflicts
            conflicts += await anyio.to_thread.run_sync(
                bank.deposit, ids[index], 100, limiter=limiter
            )

        db = await transactions(store)
        cpu = time.process_time()
        handled, latencies = await run_callers(w.callers, w.schedule(), deposit)
        cpu = time.process_time() - cpu
        db = await transactions(store) - db
        total = sum(
            cast(EsAccount, bank.repository.get(i)).balance for i in ids
        )  # a check that every deposit landed, not a measurement
        if total != 100 * w.deposits:
            raise RuntimeError(f"eventsourcing lost deposits: {total} != {100 * w.deposits}")
    finally:
        await anyio.to_thread.run_sync(bank.close)
    return Measured(
        opens_per_s=opens,
        handled_per_s=handled,
        p50=percentile(latencies, 0.5),
        p99=percentile(latencies, 0.99),
        conflicts=conflicts,
        cpu_us_per_deposit=cpu / w.deposits * 1e6,
        db_transactions_per_deposit=db / w.deposits,
    )


async def measure_raw(store: Store, w: Workload) -> Measured:
    size = deposit_record_bytes()
    appends = await raw_appends(store.provider, w.callers, w.raw_seconds, size)
    inserts = float("nan")
    if store.baseline is not None:
        inserts = await raw_appends(
            cast(Provider, ScopedJournals(store.baseline)), w.callers, w.raw_seconds, size
        )
    return Measured(appends_per_s=appends, inserts_per_s=inserts)


class ScopedJournals:
    """``raw_appends`` for ``RawPostgres``: its journals, usable in ``async with``."""

    def __init__(self, baseline: RawPostgres) -> None:
        self.journals = self
        self._baseline = baseline

    async def open(self, name: str) -> contextlib.AbstractAsyncContextManager[BaselineJournal]:
        return contextlib.nullcontext(await self._baseline.journals.open(name))


SYSTEMS: dict[str, Callable[[Store, Workload], Awaitable[Measured]]] = {
    "runkit": measure_runkit,
    "eventsourcing": measure_eventsourcing,
    "raw": measure_raw,
}


# -- the report ----------------------------------------------------------------------------

Cell = tuple[str, int]  # (target, callers)


def median(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return statistics.median(finite) if finite else float("nan")


def combine(runs: list[Measured]) -> Measured:
    """Field-wise medians of repetitions."""
    fields: dict[str, Any] = {
        f.name: median([getattr(r, f.name) for r in runs])
        for f in attrs.fields(Measured)
        if f.name != "by_store"
    }
    fields["conflicts"] = round(fields["conflicts"])
    keys = {key for r in runs for key in r.by_store}
    fields["by_store"] = {key: median([r.by_store.get(key, 0.0) for r in runs]) for key in keys}
    return Measured(**cast(Any, fields))


def db_transactions(rk: Measured, es: Measured) -> str:
    """The database's write transactions per deposit of both systems, or "n/a"."""
    if rk.db_transactions_per_deposit != rk.db_transactions_per_deposit:
        return "n/a"
    return f"{rk.db_transactions_per_deposit:.2f} / {es.db_transactions_per_deposit:.2f}"


def report(
    results: dict[Cell, dict[str, list[Measured]]],
    notes: dict[str, str],
    args: argparse.Namespace,
) -> str:
    header = [
        "target",
        "C",
        "runkit opens/s",
        "es opens/s",
        "runkit handled/s",
        "es handled/s",
        "runkit ÷ es",
        "runkit p50/p99 ms",
        "es p50/p99 ms",
        "raw bound/s",
        "runkit ÷ raw",
        "driver appends/s",
        "runkit CPU µs/deposit",
        "es CPU µs/deposit",
        "writes/deposit (commit)",
        "db write tx/deposit (runkit / es)",
        "reads/deposit",
        "es conflicts",
    ]
    rows = []
    for (target, callers), systems in results.items():
        rk, es, raw = (combine(systems[s]) for s in ("runkit", "eventsourcing", "raw"))
        bound = raw.inserts_per_s if raw.inserts_per_s == raw.inserts_per_s else raw.appends_per_s
        rows.append(
            [
                target,
                str(callers),
                f"{rk.opens_per_s:,.0f}",
                f"{es.opens_per_s:,.0f}",
                f"{rk.handled_per_s:,.0f}",
                f"{es.handled_per_s:,.0f}",
                f"{rk.handled_per_s / es.handled_per_s:.2f}×",  # noqa: RUF001
                f"{ms(rk.p50)} / {ms(rk.p99)}",
                f"{ms(es.p50)} / {ms(es.p99)}",
                f"{bound:,.0f}",
                f"{100 * rk.handled_per_s / bound:.1f}%",
                f"{raw.appends_per_s:,.0f}",
                f"{rk.cpu_us_per_deposit:,.0f}",
                f"{es.cpu_us_per_deposit:,.0f}",
                f"{rk.writes_per_deposit:.2f} ({rk.commit_writes_per_deposit:.2f})",
                db_transactions(rk, es),
                f"{rk.reads_per_deposit:.2f}",
                str(es.conflicts),
            ]
        )
    kinds = [*STORE_KINDS, "other"]
    store_rows = []
    for (target, callers), systems in results.items():
        by_store = combine(systems["runkit"]).by_store
        store_rows.append(
            [
                target,
                str(callers),
                *(
                    f"{by_store.get((k, 'write'), 0.0):.2f} / {by_store.get((k, 'read'), 0.0):.2f}"
                    for k in kinds
                ),
            ]
        )
    machine = machine_line(args.backend)
    return (
        f"{table(rows, header)}\n\nrunkit's writes / reads per deposit by store:\n\n"
        f"{table(store_rows, ['target', 'C', *kinds])}\n\n{machine}; {args.accounts:,} accounts, "
        f"{args.deposits:,} deposits per cell, raw bound over {args.raw_seconds:g} s, "
        f"medians of {args.repeat} interleaved repetition(s); runkit on "
        f"{args.partitions} partitions, callers "
        f"{'observe their Deposited' if args.observe else 'return on commit'}; "
        + (
            f"{args.side_projections} projections of AccountOpened beside the aggregate; "
            if args.side_projections
            else ""
        )
        + f"{'the collector tuned as `runkit run` does' if args.node_gc else 'default collector'}\n"
        "raw bound: single-row INSERTs through psycopg (PostgreSQL) or the driver's "
        "journal appends (memory)\n"
        + "\n".join(f"- {name}: {text}" for name, text in notes.items())
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="memory,postgres")
    parser.add_argument("--callers", default="1,8,64", help="comma-separated values of C")
    parser.add_argument("--accounts", type=int)
    parser.add_argument("--deposits", type=int)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--raw-seconds", type=float)
    parser.add_argument("--backend", choices=BACKENDS, default="asyncio")
    parser.add_argument(
        "--observe",
        action="store_true",
        help="runkit callers also wait for their Deposited through a dogma.observe observer",
    )
    parser.add_argument(
        "--side-projections",
        type=int,
        default=0,
        metavar="K",
        help="runkit runs K projections of AccountOpened beside the aggregate: consumers "
        "that the deposits' events do not concern",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=16,
        help="runkit's partition count (the engine's default is 16): fewer partitions "
        "gather more of C's commands into each batch commit",
    )
    parser.add_argument(
        "--node-gc",
        action="store_true",
        help="the garbage-collector settings of `runkit run` for the whole run (both systems)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smaller run (about a minute): 200 accounts, 1,000 deposits, 1 s raw bound",
    )
    args = parser.parse_args(argv)
    defaults = (200, 1_000, 1.0) if args.quick else (1_000, 10_000, 3.0)
    for name, default in zip(("accounts", "deposits", "raw_seconds"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.callers = [int(c) for c in args.callers.split(",") if c.strip()]
    if unknown := set(args.targets) - {"memory", "postgres"}:
        parser.error(f"unknown target(s) {', '.join(sorted(unknown))}; available: memory, postgres")
    if args.side_projections < 0 or args.side_projections > 999:
        parser.error("--side-projections must be between 0 and 999")
    if args.accounts < 1 or args.deposits < 1 or args.repeat < 1 or min(args.callers) < 1:
        parser.error("--accounts, --deposits, --repeat and --callers must be positive")
    try:
        runkit.with_partition_count(args.partitions)  # the engine's own check
    except ValueError as exc:
        parser.error(f"--partitions: {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[Cell, dict[str, list[Measured]]] = {}
    notes: dict[str, str] = {}

    async def run_all() -> None:
        for target_name in args.targets:
            async with open_target(target_name) as target:
                notes[target.name] = target.notes
                for rep in range(args.repeat):
                    # Alternate which system goes first, so drift hits both alike.
                    order = [*("runkit", "eventsourcing")[:: -1 if rep % 2 else 1], "raw"]
                    for callers in args.callers:
                        w = Workload(
                            args.accounts,
                            args.deposits,
                            callers,
                            args.raw_seconds,
                            args.observe,
                            args.side_projections,
                            args.partitions,
                        )
                        cell = results.setdefault((target.name, callers), {})
                        for system in order:
                            print(f"{target.name} C={callers} #{rep + 1}: {system}", flush=True)
                            async with target.store() as store:
                                measured = await SYSTEMS[system](store, w)
                            cell.setdefault(system, []).append(measured)

    with tuned_collector() if args.node_gc else contextlib.nullcontext():
        anyio.run(run_all, **run_arguments(args.backend))
    print()
    print(report(results, notes, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
