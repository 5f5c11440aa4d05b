"""Throughput and latency of the engine running the bank, against the store's raw bound.

Usage::

    uv run python benchmarks/engine.py [--drivers memory,postgres] [--seconds N]
        [--callers 64] [--accounts 1000] [--backend asyncio|uvloop|trio] [--node-gc]
        [--partitions 16] [--collector-off]

For each driver (a ``benchmarks/targets`` module, as for ``persistence.py``:
the same provider, started the same way) it measures, in one run:

1. **raw bound**: ``--callers`` tasks each appending records of the size of an
   inbox record holding one ``Deposit`` to a journal of their own, through the
   same provider, for ``--seconds``: appends/s.
2. **live**: the bank on ``runkit.Engine`` (16 partitions, the engine's
   default, or ``--partitions``; both SQLite
   projections on a file in ``/dev/shm`` when there is one). After opening
   ``--accounts`` accounts (not timed), ``--callers`` callers execute
   ``Deposit`` commands on random accounts for ``--seconds``, each waiting for
   ``execute_command`` to return (durable acceptance) before the next.
   Reported: deposits accepted/s; deposits completed/s (``DepositApproved``
   published within the window; each deposit is three commands: ``Deposit``,
   ``CreditAccount`` and ``ApproveDeposit``, so commands handled/s is three
   times that); process CPU time per completed deposit (the whole process:
   engine, store and callers); p50/p99 of ``execute_command``; and p50/p99 end
   to end, from
   the call to the ledger projection having applied the deposit's
   ``AccountCredited`` (measured until it has applied every deposit accepted
   in the window, or 120 s).
3. **catch-up**: the engine is stopped; a new engine over the same store runs
   the bank with fresh projections (checkpoint 0), and the time until they
   have applied every event gives stream events/s. Twice: with in-memory
   ADR-26 projections that do nothing else (the engine's delivery bound), and
   with the bank's SQLite projections.

The engine's acceptance rate is also given as a ratio of the raw append rate
measured in the same run, which is its ceiling if every command cost one
append (it costs more: stream appends shared by a batch, process instance
commits, and aggregate journal appends written behind).

Store writes per deposit (journal appends and keyspace sets, counted through a
wrapped provider) are given in total and, in brackets, the commit points alone
(``COMMIT_KINDS``: stream, inbox, process instances, deadlines, idempotency
markers), as ``throughput.py`` does for one aggregate; the rest is aggregate
state written behind the stream (ADR 0009) and periodic consumer checkpoints.
The footer splits the total by store, and gives the collections CPython's
cyclic garbage collector made during the live window by generation (timed
with ``gc.callbacks``: profilers spread their cost over whatever allocated);
*collector % CPU* is their time as a share of the window's process CPU time.
``--collector-off`` switches the collector off for that window instead, an
upper bound on what collecting costs there (not a setting: cycles are not
freed meanwhile). Where the target can count them
(PostgreSQL), *backend write tx / deposit* gives the write transactions the
database itself committed in the same window: the driver runs concurrent
writes of one kind as one statement (``runkit_postgres._grouping``), so this is
what the disk sees, and it is at most the store writes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import attrs

from runkit._backends import BACKENDS, run_arguments

sys.path.insert(0, str(Path(__file__).resolve().parent))

import targets
from collector import CollectorTimer

import dogma
import runkit
from bank import App
from bank.demo import wait_for_projections
from bank.messages import AccountCredited, Deposit, DepositApproved, OpenAccount
from runkit._collector import tuned_collector
from runkit.engine.envelope import encode, new_envelope
from runkit.engine.streams import StreamEvent, decode_stream_record
from runkit.persistence import Provider

APP_KEY = "22028264-0bca-43e1-8d9d-cd094efb10b7"
DRAIN_TIMEOUT = 120.0


def percentile(values: list[float], q: float) -> float:
    """The *q*-quantile (0..1) of *values*, nearest rank; NaN if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@attrs.define
class Result:
    """Everything measured for one driver."""

    driver: str
    notes: str
    record_bytes: int = 0
    raw_appends: float = 0.0
    accepted: float = 0.0
    completed: float = 0.0
    cpu_us: float = float("nan")  # process CPU time per completed deposit
    sustained: float = float("nan")
    writes_per_deposit: float = float("nan")
    writes_by_store: dict[str, float] = attrs.field(factory=dict)  # per deposit
    # The backend's own write transactions per deposit (``Target.write_transactions``).
    db_transactions: float = float("nan")
    backlog: int = 0
    accept_p50: float = float("nan")
    accept_p99: float = float("nan")
    e2e_p50: float = float("nan")
    e2e_p99: float = float("nan")
    e2e_missing: int = 0
    stream_events: int = 0
    catch_up_null: float = 0.0
    catch_up_sqlite: float = 0.0
    # Collections during the live window (process CPU time is its denominator).
    collector: CollectorTimer = attrs.field(factory=CollectorTimer)
    live_cpu: float = float("nan")  # process CPU seconds of the live window

    @property
    def commit_writes_per_deposit(self) -> float:
        """The ``COMMIT_KINDS`` share of the writes per deposit."""
        return sum(n for k, n in self.writes_by_store.items() if k in COMMIT_KINDS)


# -- the raw bound --


def deposit_record_bytes() -> int:
    """The size of an inbox record holding one ``Deposit`` (envelope plus entry fields)."""
    envelope = new_envelope(
        Deposit(transaction_id=f"D-{uuid.uuid4()}", account_id="A-0999", amount=12_345),
        app_key=APP_KEY,
        site_key=None,
        created_at=datetime.now(UTC),
        message_id=str(uuid.uuid4()),
    )
    # + handler key, instance ID, flags and the record's batch ID.
    return len(encode(envelope)) + 100


async def raw_appends(provider: Provider, callers: int, seconds: float, size: int) -> float:
    """Appends/s of *callers* tasks, each appending *size*-byte records to its own journal."""
    record = os.urandom(size)
    run = uuid.uuid4().hex[:8]
    count = 0
    stop = time.perf_counter() + seconds

    async def caller(i: int) -> None:
        nonlocal count
        async with await provider.journals.open(f"bench-raw/{run}/{i}") as journal:
            position = 0
            while time.perf_counter() < stop:
                await journal.append(position, record)
                position += 1
                count += 1

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(callers):
            tg.start_soon(caller, i)
    return count / (time.perf_counter() - started)


# -- instrumented bank --


class NullProjection(dogma.NoCompactBehavior):
    """Keeps only ADR-26 checkpoints, in memory: the engine's delivery bound."""

    def __init__(self, original: Any) -> None:
        self._original = original
        self._checkpoints: dict[str, int] = {}

    def configure(self, c: dogma.ProjectionConfigurer) -> None:
        self._original.configure(c)  # the same identity and routes

    async def handle_event(self, scope: dogma.ProjectionEventScope, event: dogma.Event) -> int:
        current = self._checkpoints.get(scope.stream_id, 0)
        if current != scope.checkpoint_offset:
            return current
        self._checkpoints[scope.stream_id] = scope.offset + 1
        return scope.offset + 1

    async def checkpoint_offset(self, stream_id: str) -> int:
        return self._checkpoints.get(stream_id, 0)

    async def reset(self, scope: dogma.ProjectionResetScope) -> None:
        self._checkpoints.clear()


class LedgerProbe:
    """Wraps the ledger projection: when each deposit's credit is applied."""

    def __init__(self, app: App) -> None:
        self.started: dict[str, float] = {}
        self.applied: dict[str, float] = {}
        ledger = app.ledger
        self.disabled = isinstance(ledger, NullProjection)
        original = ledger.handle_event

        async def handle_event(scope: dogma.ProjectionEventScope, event: dogma.Event) -> int:
            result = await original(scope, event)
            if isinstance(event, AccountCredited) and result == scope.offset + 1:
                self.applied.setdefault(event.transaction_id, time.perf_counter())
            return result

        ledger.handle_event = handle_event  # type: ignore[method-assign]


class ApprovalProbe:
    """Counts ``DepositApproved`` events as the stream writers publish them."""

    def __init__(self, engine: runkit.Engine) -> None:
        self.times: list[float] = []
        bus = engine.bus
        publish = bus.publish
        registered = dogma.registry.of(DepositApproved)
        assert registered is not None  # importing bank.messages registers it
        approved = registered.id

        def counting(events: Iterable[StreamEvent]) -> None:
            events = list(events)
            now = time.perf_counter()
            self.times.extend(now for e in events if e.envelope.type_id == approved)
            publish(events)

        bus.publish = counting  # type: ignore[method-assign]


STORE_KINDS = (
    "stream",
    "inbox",
    "aggregate",
    "snapshot",
    "process",
    "idempotency",
    "deadline",
    "checkpoints",
    "cluster",
)
#: Stores whose writes are commit points of a deposit's chain (the stream
#: records of its three commands, the process instance commits, inbox and
#: deadline appends, idempotency markers); the rest is derived state written
#: behind (aggregate journals, snapshots: ADR 0009) and periodic progress
#: (consumer checkpoints, heartbeats).
COMMIT_KINDS = frozenset({"stream", "inbox", "process", "idempotency", "deadline"})


def store_kind(name: str) -> str:
    """The kind of store a journal, keyspace or set name belongs to."""
    if name.startswith("cluster/"):
        return "cluster"
    for kind in STORE_KINDS:
        if f"/{kind}" in name:
            return kind
    return "other"


class WriteCounter:
    """Counts the store writes (journal appends, keyspace sets) made through a provider."""

    def __init__(self, provider: Provider) -> None:
        self.writes = 0
        self.by_store: Counter[str] = Counter()
        self.enabled = False
        for store, methods in (
            (provider.journals, ("append",)),
            (provider.keyspaces, ("set", "set_unconditional")),
        ):
            store.open = self._opener(store.open, methods)  # type: ignore[method-assign]

    def _opener(self, open_: Any, methods: tuple[str, ...]) -> Any:
        async def opened(name: str) -> Any:
            handle = await open_(name)
            kind = store_kind(name)
            for method in methods:
                setattr(handle, method, self._counted(getattr(handle, method), kind))
            return handle

        return opened

    def _counted(self, write: Any, kind: str) -> Any:
        async def counted(*args: Any) -> Any:
            if self.enabled:
                self.writes += 1
                self.by_store[kind] += 1
            return await write(*args)

        return counted


def null(app: App) -> App:
    """*app* with both projections replaced by ``NullProjection``."""
    app.ledger = NullProjection(app.ledger)  # type: ignore[assignment]
    app.customers = NullProjection(app.customers)  # type: ignore[assignment]
    return app


HEARTBEAT: list[float] = []  # --heartbeat-interval, if given
PARTITIONS: list[int] = [16]  # --partitions


def engine_for(app: App, provider: Provider) -> runkit.Engine:
    return runkit.Engine(
        runkit.with_application(app),
        runkit.with_persistence_provider(provider),
        runkit.with_partition_count(PARTITIONS[0]),
        *(runkit.with_heartbeat_interval(s) for s in HEARTBEAT),
    )


async def run_live(
    provider: Provider,
    db: Path,
    result: Result,
    *,
    callers: int,
    accounts: int,
    seconds: float,
    null_projections: bool,
    write_transactions: Callable[[], Awaitable[int]] | None = None,
    collector_off: bool = False,
) -> None:
    app = App(db)
    if null_projections:
        null(app)
    counter = WriteCounter(provider)
    probe = LedgerProbe(app)
    engine = engine_for(app, provider)
    approvals = ApprovalProbe(engine)
    executor = engine.executor_for(app)
    ids = [f"A-{i:04}" for i in range(accounts)]
    latencies: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)

        async def open_accounts(worker: int) -> None:
            for account in ids[worker::callers]:
                await executor.execute_command(
                    OpenAccount(customer_id="C-1", account_id=account, account_name=account)
                )

        async with anyio.create_task_group() as setup:
            for worker in range(callers):
                setup.start_soon(open_accounts, worker)
        await wait_for_projections(engine, app, timeout=DRAIN_TIMEOUT)
        print(f"  {accounts} accounts open; {callers} callers deposit for {seconds:g} s")

        sequence = 0
        stop = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal sequence
            rng = random.Random()
            while time.perf_counter() < stop:
                sequence += 1
                tx = f"D-{sequence:08}"
                command = Deposit(transaction_id=tx, account_id=rng.choice(ids), amount=100)
                started = probe.started[tx] = time.perf_counter()
                await executor.execute_command(command)
                latencies.append(time.perf_counter() - started)

        first = len(approvals.times)
        counter.enabled = True
        db_before = await write_transactions() if write_transactions else 0
        window_start = time.perf_counter()
        cpu_start = time.process_time()
        with result.collector.measuring(disable=collector_off):
            async with anyio.create_task_group() as load:
                for _ in range(callers):
                    load.start_soon(caller)
        window = time.perf_counter() - window_start
        cpu = result.live_cpu = time.process_time() - cpu_start
        completed = [t for t in approvals.times[first:] if t <= window_start + window]
        result.cpu_us = 1e6 * cpu / max(1, len(completed))
        result.accepted = len(latencies) / window
        result.completed = len(completed) / window
        result.backlog = len(latencies) - len(completed)
        result.accept_p50 = percentile(latencies, 0.5)
        result.accept_p99 = percentile(latencies, 0.99)

        accepted = len(latencies)
        with anyio.move_on_after(DRAIN_TIMEOUT):
            # Polled: the probes are plain counters.
            while True:
                if len(approvals.times) - first >= accepted and (
                    len(probe.applied) >= len(probe.started) or probe.disabled
                ):
                    break
                await anyio.sleep(0.02)
        counter.enabled = False
        if write_transactions is not None:
            result.db_transactions = (await write_transactions() - db_before) / accepted
        result.writes_per_deposit = counter.writes / accepted
        result.writes_by_store = {k: n / accepted for k, n in counter.by_store.items()}
        if len(approvals.times) - first >= accepted:
            result.sustained = accepted / (approvals.times[first + accepted - 1] - window_start)
        e2e = [probe.applied[tx] - t for tx, t in probe.started.items() if tx in probe.applied]
        result.e2e_p50 = percentile(e2e, 0.5)
        result.e2e_p99 = percentile(e2e, 0.99)
        result.e2e_missing = len(probe.started) - len(e2e)
        tg.cancel_scope.cancel()


async def count_stream_events(provider: Provider, partitions: int) -> int:
    total = 0
    for index in range(partitions):
        async with await provider.journals.open(f"{APP_KEY}/stream/{index}") as journal:
            bounds = await journal.bounds()
            if bounds.begin == bounds.end:
                continue
            async for _, data in journal.range(bounds.begin):
                total += len(decode_stream_record(data).events)
    return total


async def catch_up(provider: Provider, app: App) -> float:
    """Seconds for a fresh engine's projections of *app* to apply the whole store."""
    engine = engine_for(app, provider)
    async with anyio.create_task_group() as tg:
        started = time.perf_counter()
        tg.start_soon(engine.run)
        await wait_for_projections(engine, app, timeout=600, interval=0.005)
        elapsed = time.perf_counter() - started
        tg.cancel_scope.cancel()
    return elapsed


async def run_driver(name: str, args: argparse.Namespace, scratch: Path) -> Result:
    module = targets.load(name)
    async with module.open_target() as target:
        result = Result(driver=name, notes=target.notes)
        provider = target.provider
        result.record_bytes = deposit_record_bytes()
        print(f"{name}: raw appends ({result.record_bytes} B records, {args.callers} tasks)")
        result.raw_appends = await raw_appends(
            provider, args.callers, args.seconds, result.record_bytes
        )
        print(f"{name}: the bank on the engine")
        await run_live(
            provider,
            scratch / f"{name}-live.sqlite3",
            result,
            callers=args.callers,
            accounts=args.accounts,
            seconds=args.seconds,
            null_projections=args.live_projections == "null",
            write_transactions=target.write_transactions,
            collector_off=args.collector_off,
        )
        result.stream_events = await count_stream_events(provider, PARTITIONS[0])
        print(f"{name}: catch-up of {result.stream_events} stream events")
        null_app = null(App(scratch / f"{name}-unused.sqlite3"))
        result.catch_up_null = result.stream_events / await catch_up(provider, null_app)
        sqlite_app = App(scratch / f"{name}-catch-up.sqlite3")
        result.catch_up_sqlite = result.stream_events / await catch_up(provider, sqlite_app)
    return result


def machine_line(backend: str) -> str:
    """The interpreter, event loop, CPUs and load average, for a report's footer."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.python_implementation()} {platform.python_version()}, {backend}, "
        f"{os.cpu_count()} CPUs, load average {load}"
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str], fill: str = " ") -> str:
        return (
            "| " + " | ".join(c.rjust(w, fill) for c, w in zip(cells, widths, strict=True)) + " |"
        )

    out = [line(header), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def report(results: list[Result], args: argparse.Namespace) -> str:
    header = [
        "driver",
        "raw appends/s",
        "accepted/s",
        "accepted / raw",
        "completed deposits/s",
        "commands handled/s",
        "sustained commands/s",
        "CPU µs / deposit",
        "collector % CPU",
        "store writes / deposit (commit)",
        "backend write tx / deposit",
        "backlog",
        "accept p50 ms",
        "accept p99 ms",
        "e2e p50 ms",
        "e2e p99 ms",
        "catch-up ev/s (null)",
        "catch-up ev/s (SQLite)",
    ]
    rows = [
        [
            r.driver,
            f"{r.raw_appends:,.0f}",
            f"{r.accepted:,.0f}",
            f"{r.accepted / r.raw_appends:.2f}",
            f"{r.completed:,.0f}",
            f"{3 * r.completed:,.0f}",
            f"{3 * r.sustained:,.0f}",
            f"{r.cpu_us:,.0f}",
            f"{100 * r.collector.total / r.live_cpu:.1f}",
            f"{r.writes_per_deposit:.1f} ({r.commit_writes_per_deposit:.2f})",
            "n/a" if r.db_transactions != r.db_transactions else f"{r.db_transactions:.2f}",
            f"{r.backlog:,}",
            ms(r.accept_p50),
            ms(r.accept_p99),
            ms(r.e2e_p50),
            ms(r.e2e_p99) + (f" ({r.e2e_missing} not applied)" if r.e2e_missing else ""),
            f"{r.catch_up_null:,.0f}",
            f"{r.catch_up_sqlite:,.0f}",
        ]
        for r in results
    ]
    machine = machine_line(args.backend)
    notes = "\n".join(
        f"- {r.driver}: {r.notes}; {r.stream_events:,} stream events; writes per deposit by "
        "store: "
        + ", ".join(
            f"{k} {n:.2f}" for k, n in sorted(r.writes_by_store.items(), key=lambda kv: -kv[1])
        )
        + f"; collections in the live window: {r.collector.describe()}"
        for r in results
    )
    return (
        f"{table(rows, header)}\n\n{machine}; {args.callers} callers, {args.accounts} accounts, "
        f"{args.partitions} partitions, {args.seconds:g} s per phase, heartbeat interval "
        f"{args.heartbeat_interval or 'default'}, "
        f"{'the collector tuned as `runkit run` does' if args.node_gc else 'default collector'}"
        f"{' (off in the live window: an upper bound)' if args.collector_off else ''}"
        f"\n{notes}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drivers", default="memory,postgres")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--backend", choices=BACKENDS, default="asyncio")
    parser.add_argument(
        "--live-projections",
        choices=("sqlite", "null"),
        default="sqlite",
        help="projections during the live phase (null: no end-to-end latency)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        help="membership heartbeat interval in seconds (default: the engine's)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=16,
        help="the bank's partition count (the engine's default is 16)",
    )
    parser.add_argument(
        "--node-gc",
        action="store_true",
        help="tune the garbage collector as `runkit run` does for a node process",
    )
    parser.add_argument(
        "--collector-off",
        action="store_true",
        help="switch the garbage collector off for the live window (an upper bound on "
        "what collecting costs; cycles are not freed meanwhile)",
    )
    args = parser.parse_args(argv)
    if args.heartbeat_interval is not None:
        HEARTBEAT.append(args.heartbeat_interval)
    try:
        runkit.with_partition_count(args.partitions)  # the engine's own check
    except ValueError as exc:
        parser.error(f"--partitions: {exc}")
    PARTITIONS[0] = args.partitions
    names = [n.strip() for n in args.drivers.split(",") if n.strip()]
    for name in names:
        targets.load(name)  # unknown names fail before anything runs
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(
        prefix="runkit-engine-bench-", dir=shm if shm.is_dir() else None
    ) as tmp:

        async def run_all() -> list[Result]:
            return [await run_driver(name, args, Path(tmp)) for name in names]

        with tuned_collector() if args.node_gc else contextlib.nullcontext():
            results = anyio.run(run_all, **run_arguments(args.backend))
    print()
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
