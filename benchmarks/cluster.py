"""Three node processes on one PostgreSQL: routing latency, deadlines across nodes, failover.

Usage::

    uv run python benchmarks/cluster.py [--commands 400] [--callers 4]
        [--reminders 60] [--heartbeat-interval 0.25] [--throughput-seconds 10]
        [--throughput-callers 64] [--overload-seconds 10] [--overload-callers 4096]
        [--backlog-limit 100] [--backend asyncio|uvloop|trio] [--node-gc]

Starts a throwaway PostgreSQL server with durable settings and three ``runkit``
node processes on it (membership, the node transport with mutual TLS,
16 partitions), running a small application: an ``Account`` aggregate
(``Deposit`` records ``Deposited``) and a ``Reminders`` process that schedules
a deadline for each ``ReminderRequested`` and, when it falls due, executes
``RecordReminder`` (the aggregate records ``ReminderRecorded``). This process
also runs a ``runkit.Client`` (no partitions, no handlers). Then, in one run:

1. **Routing latency.** Every node and the client execute ``--commands``
   deposits on random accounts, ``--callers`` at a time, all at once, each
   call waiting until its observer has seen the deposit's ``Deposited``. A
   node classifies each call by whether it owns the account's partition (the
   command is committed locally) or not (it is offered to the owner over the
   transport). The first 10% of each caller's calls are a warm-up (peer
   connections open lazily) and are not counted. Reported: p50/p99 per class,
   the non-owner's excess over the owner, and the nodes' event-loop lag
   meanwhile (how late a 1 ms sleep wakes: what each hop through a busy node
   waits on top of its work).
2. **Deadlines across nodes.** Every node requests ``--reminders`` reminders
   due 1-3 s ahead and observes each ``ReminderRecorded``; lateness is the
   time from the due time to the observer seeing the event (an upper bound on
   the recording delay), classified by whether the process instance's home
   partition is owned by the requesting node.
3. **Failover and handoff.** kill -9 of one node, then SIGTERM of another:
   right after the signal, the client deposits into one account of every
   partition the node owned; reported is the time from the signal until each
   deposit is *handled* (its ``Deposited`` observed), max and median over the
   partitions.

4. **Throughput, three nodes and one.** Before the latency phase, the client
   alone executes deposits from ``--throughput-callers`` callers for
   ``--throughput-seconds`` (each call returns once the owner has committed the
   command); after the failover phase, with one node left on the same store,
   the same again. Reported: commands/s and p50/p99 of the call.
5. **Overload through the client.** After the deadline phase, the client
   executes deposits from ``--overload-callers`` callers (far above what the
   nodes handle) for ``--overload-seconds``, each with an idempotency key, the
   nodes' backlog limit at ``--backlog-limit`` (``--overload-seconds 0`` skips
   the phase). Every command the client executes is offered to its
   partition's owner, which refuses a caller's command while the partition is
   full; the client offers it again until there is room or its backlog timeout
   passes (``runkit.Backlogged``). Reported: accepted and refused calls, the
   accepted calls' p50/p99, the largest backlog each node's partitions reached
   and the most inbox commands one held waiting for room (sampled every 5 ms in
   the nodes), and a check of the streams afterwards: every accepted deposit
   handled once, no refused one handled.

``--node-gc`` runs the node processes with the collector tuned as ``runkit run``
tunes it (the start-up heap frozen, a higher first threshold); without it they
keep Python's defaults, and their full collections, which then walk the
start-up heap, show in the p99 figures.

Not a test: nothing here asserts a time. Use ``--keep`` to keep the nodes' logs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs

import dogma
import runkit
from runkit._backends import BACKENDS, run_arguments
from runkit._collector import tuned_collector
from runkit.config import ApplicationConfig, build
from runkit.engine.cluster.nodes import list_nodes
from runkit.engine.cluster.status import read_status
from runkit.engine.commands.acceptance import command_id_for
from runkit.engine.partitions import instance_workload, partition_id, partition_of
from runkit.engine.streams import decode_stream_record, stream_name
from runkit_postgres import PostgresProvider
from runkit_postgres.testing import PostgresServer

REGISTRY = dogma.MessageTypeRegistry()
APP_KEY = "b5a1c000-0000-4000-8000-000000000001"
ACCOUNT_KEY = "b5a1c000-0000-4000-8000-000000000002"
REMINDERS_KEY = "b5a1c000-0000-4000-8000-000000000003"
PARTITIONS = 16
SCHEMA = "clusterbench"


@dogma.register_command("b5a1c100-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Deposit(dogma.Command):
    account: str
    amount: int
    ref: str


@dogma.register_event("b5a1c100-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class Deposited(dogma.Event):
    account: str
    amount: int
    ref: str


@dogma.register_command("b5a1c100-0000-4000-8000-000000000003", registry=REGISTRY)
@attrs.frozen
class RequestReminder(dogma.Command):
    account: str
    ref: str
    due_at: datetime


@dogma.register_event("b5a1c100-0000-4000-8000-000000000004", registry=REGISTRY)
@attrs.frozen
class ReminderRequested(dogma.Event):
    account: str
    ref: str
    due_at: datetime


@dogma.register_deadline("b5a1c100-0000-4000-8000-000000000005", registry=REGISTRY)
@attrs.frozen
class ReminderDue(dogma.Deadline):
    account: str
    ref: str


@dogma.register_command("b5a1c100-0000-4000-8000-000000000006", registry=REGISTRY)
@attrs.frozen
class RecordReminder(dogma.Command):
    account: str
    ref: str


@dogma.register_event("b5a1c100-0000-4000-8000-000000000007", registry=REGISTRY)
@attrs.frozen
class ReminderRecorded(dogma.Event):
    account: str
    ref: str


@attrs.define
class Balance:
    amount: int = 0

    def apply_event(self, event: dogma.Event) -> None:
        if isinstance(event, Deposited):
            self.amount += event.amount

    def marshal_binary(self) -> bytes:
        return str(self.amount).encode()

    def unmarshal_binary(self, data: bytes) -> None:
        self.amount = int(data)


class Account:
    def configure(self, c: Any) -> None:
        c.identity("account", ACCOUNT_KEY)
        c.routes(
            dogma.handles_command(Deposit, registry=REGISTRY),
            dogma.handles_command(RequestReminder, registry=REGISTRY),
            dogma.handles_command(RecordReminder, registry=REGISTRY),
            dogma.records_event(Deposited, registry=REGISTRY),
            dogma.records_event(ReminderRequested, registry=REGISTRY),
            dogma.records_event(ReminderRecorded, registry=REGISTRY),
        )

    def new(self) -> Balance:
        return Balance()

    def route_command_to_instance(self, command: dogma.Command) -> str:
        assert isinstance(command, Deposit | RequestReminder | RecordReminder)
        return command.account

    def handle_command(self, root: Balance, scope: Any, command: dogma.Command) -> None:
        match command:
            case Deposit(account, amount, ref):
                scope.record_event(Deposited(account, amount, ref))
            case RequestReminder(account, ref, due_at):
                scope.record_event(ReminderRequested(account, ref, due_at))
            case RecordReminder(account, ref):
                scope.record_event(ReminderRecorded(account, ref))
            case _:
                raise dogma.UnexpectedMessage(command)


@attrs.define
class Pending:
    account: str = ""

    def marshal_binary(self) -> bytes:
        return self.account.encode()

    def unmarshal_binary(self, data: bytes) -> None:
        self.account = data.decode()


class Reminders:
    def configure(self, c: Any) -> None:
        c.identity("reminders", REMINDERS_KEY)
        c.routes(
            dogma.handles_event(ReminderRequested, registry=REGISTRY),
            dogma.executes_command(RecordReminder, registry=REGISTRY),
            dogma.schedules_deadline(ReminderDue, registry=REGISTRY),
        )

    def new(self) -> Pending:
        return Pending()

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        assert isinstance(event, ReminderRequested)
        return event.ref

    async def handle_event(self, root: Pending, scope: Any, event: dogma.Event) -> None:
        assert isinstance(event, ReminderRequested)
        root.account = event.account
        scope.schedule_deadline(ReminderDue(event.account, event.ref), event.due_at)

    async def handle_deadline(self, root: Pending, scope: Any, deadline: dogma.Deadline) -> None:
        assert isinstance(deadline, ReminderDue)
        scope.execute_command(RecordReminder(deadline.account, deadline.ref))
        scope.end()


class App:
    def configure(self, c: Any) -> None:
        c.identity("clusterbench", APP_KEY)
        c.routes(
            dogma.via_aggregate(Account()),
            dogma.via_process(Reminders()),
        )


def config() -> ApplicationConfig:
    return build(App(), registry=REGISTRY)


def partition(handler_key: str, instance: str) -> int:
    return partition_of(instance_workload(handler_key, instance), PARTITIONS)


# --- measuring (in the nodes and in the client) -----------------------------------


async def deposit(executor: Any, account: str) -> float:
    """Execute one deposit and wait until it is handled; the seconds it took."""
    ref = uuid.uuid4().hex
    seen = anyio.Event()

    async def observe(event: Deposited) -> bool:
        if event.ref == ref:
            seen.set()
            return True
        return False

    started = time.perf_counter()
    with anyio.fail_after(60):
        await executor.execute_command(
            Deposit(account, 1, ref),
            observers=[dogma.observe(Deposited, observe, registry=REGISTRY)],
        )
    return time.perf_counter() - started


async def remind(executor: Any, account: str, due_at: datetime) -> float:
    """Request a reminder; the seconds from *due_at* until its event is observed."""
    ref = uuid.uuid4().hex
    seen_at = 0.0

    async def observe(event: ReminderRecorded) -> bool:
        nonlocal seen_at
        if event.ref == ref:
            seen_at = time.time()
            return True
        return False

    with anyio.fail_after(60):
        await executor.execute_command(
            RequestReminder(account, ref, due_at),
            observers=[dogma.observe(ReminderRecorded, observe, registry=REGISTRY)],
        )
    return seen_at - due_at.timestamp()


async def latencies(
    executor: Any, commands: int, callers: int, owned: Callable[[str], bool]
) -> list[tuple[float, bool]]:
    """``commands`` deposits from ``callers`` callers; (seconds, owned) after warm-up."""
    results: list[tuple[float, bool]] = []
    per_caller = max(1, commands // callers)
    warm_up = max(1, per_caller // 10)

    async def caller(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(per_caller):
            account = f"acc-{rng.randrange(1000)}"
            seconds = await deposit(executor, account)
            if i >= warm_up:
                results.append((seconds, owned(account)))

    async with anyio.create_task_group() as tg:
        for n in range(callers):
            tg.start_soon(caller, hash((os.getpid(), n)))
    return results


@contextlib.asynccontextmanager
async def loop_lag() -> AsyncIterator[list[float]]:
    """How late a 1 ms sleep wakes, sampled while inside (seconds): the wait every
    hop through this process's event loop pays on top of its own work."""
    lags: list[float] = []

    async def sample() -> None:
        while True:
            started = time.perf_counter()
            await anyio.sleep(0.001)
            lags.append(time.perf_counter() - started - 0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        yield lags
        tg.cancel_scope.cancel()


async def throughput(executor: Any, seconds: float, callers: int) -> tuple[float, float, float]:
    """Deposits from *callers* callers for *seconds*, each call returning once its
    command is committed by the owner: (commands/s, p50 s, p99 s)."""
    done: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller(seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            with anyio.fail_after(60):
                await executor.execute_command(
                    Deposit(f"acc-{rng.randrange(1000)}", 1, uuid.uuid4().hex)
                )
            done.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for n in range(callers):
            tg.start_soon(caller, n)
    return len(done) / (time.perf_counter() - started), _pct(done, 0.5), _pct(done, 0.99)


@attrs.define
class Overload:
    """What an overload run saw: idempotency keys accepted and refused, call seconds."""

    accepted: list[str] = attrs.Factory(list)
    refused: list[str] = attrs.Factory(list)
    seconds: list[float] = attrs.Factory(list)


async def overloaded(executor: Any, seconds: float, callers: int) -> Overload:
    """Deposits from *callers* callers for *seconds*, each with an idempotency key;
    a call the owner's full backlog refused for its whole backlog timeout raises
    ``runkit.Backlogged`` and counts as refused."""
    seen = Overload()
    deadline = time.perf_counter() + seconds

    async def caller(seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            key = uuid.uuid4().hex
            started = time.perf_counter()
            try:
                with anyio.fail_after(120):
                    await executor.execute_command(
                        Deposit(f"acc-{rng.randrange(1000)}", 1, key), idempotency_key=key
                    )
            except runkit.Backlogged:
                seen.refused.append(key)
                continue
            seen.seconds.append(time.perf_counter() - started)
            seen.accepted.append(key)

    async with anyio.create_task_group() as tg:
        for n in range(callers):
            tg.start_soon(caller, n)
    return seen


async def _handled_commands(pg: PostgresProvider) -> dict[str, int]:
    """How many stream records of the application commit each command (by ID)."""
    counts: dict[str, int] = {}
    for index in range(PARTITIONS):
        async with await pg.journals.open(stream_name(APP_KEY, index)) as journal:
            bounds = await journal.bounds()
            async for _, data in journal.range(bounds.begin):
                for command_id in decode_stream_record(data).command_ids:
                    counts[command_id] = counts.get(command_id, 0) + 1
    return counts


async def reminders(
    executor: Any, count: int, owned: Callable[[str], bool]
) -> list[tuple[float, bool]]:
    """``count`` reminders due 1-3 s ahead, all at once; (lateness, home owned)."""
    results: list[tuple[float, bool]] = []
    now = datetime.now(UTC)

    async def one(i: int) -> None:
        account = f"acc-{i}"
        due = now + timedelta(seconds=1 + 2 * i / max(1, count))
        lateness = await remind(executor, account, due)
        results.append((lateness, owned(account)))

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i)
    return results


async def until(condition: Callable[[], Awaitable[bool]], interval: float = 0.05) -> None:
    """Poll *condition* until it holds (files and the store have nothing to wait on)."""
    while not await condition():  # noqa: ASYNC110
        await anyio.sleep(interval)


async def wait_for(path: Path) -> Any:
    """The JSON value published at *path*, once it is there."""
    file = anyio.Path(path)
    await until(file.exists, 0.02)
    return json.loads(await file.read_text())


def publish(path: Path, value: object) -> None:
    """Write *value* as JSON to *path* whole (renamed into place)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


# --- a node process ---------------------------------------------------------------


async def node(settings: dict[str, Any]) -> None:
    work = Path(settings["work"])
    index = settings["index"]
    app = config()
    async with PostgresProvider(settings["dsn"], schema=SCHEMA) as provider:
        engine = runkit.Engine(
            runkit.with_application(app),
            runkit.with_persistence_provider(provider),
            runkit.with_node_id(settings["node_id"]),
            runkit.with_listen_address(settings["listen"]),
            runkit.with_heartbeat_interval(settings["heartbeat"]),
            runkit.with_partition_count(PARTITIONS),
            runkit.with_backlog_limit(settings["backlog_limit"]),
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            runtime = await engine.runtime(APP_KEY)
            publish(work / f"ready-{index}", {})

            async def sample_backlog() -> None:
                await wait_for(work / "go-overload")
                largest = largest_held = 0
                end = anyio.Path(work / "end-overload")
                while not await end.exists():
                    for _ in range(20):
                        partitions = list(runtime.partitions.values())
                        largest = max(largest, *(p.backlog for p in partitions), 0)
                        largest_held = max(largest_held, *(p.held for p in partitions), 0)
                        await anyio.sleep(0.005)
                publish(
                    work / f"overload-{index}",
                    {"largest_backlog": largest, "largest_held": largest_held},
                )

            tg.start_soon(sample_backlog)
            executor = engine.executor_for(app)

            def owns(handler_key: str) -> Callable[[str], bool]:
                return lambda instance: runtime.ownership.owns(
                    partition_id(APP_KEY, partition(handler_key, instance))
                )

            async def phases() -> None:
                plan = await wait_for(work / "go-latency")
                async with loop_lag() as lag:
                    result = await latencies(
                        executor, plan["commands"], plan["callers"], owns(ACCOUNT_KEY)
                    )
                publish(work / f"latency-{index}", {"calls": result, "lag": lag})
                plan = await wait_for(work / "go-reminders")
                result = await reminders(executor, plan["reminders"], owns(REMINDERS_KEY))
                publish(work / f"reminders-{index}", result)

            tg.start_soon(phases)
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break


# --- the orchestrator -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pids: Sequence[int]) -> float:
    """User and system CPU time the processes have used (Linux ``/proc``)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            # Fields after the command name (which may hold spaces): utime and
            # stime are the 12th and 13th.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(value: float) -> str:
    return f"{value * 1000:,.1f}"


async def _owners(pg: PostgresProvider, app: ApplicationConfig) -> dict[int, uuid.UUID | None]:
    status = await read_status(pg, (app,), now=datetime.now(UTC))
    return {
        p.index: None if p.claimed_by is None else uuid.UUID(p.claimed_by)
        for p in status.partitions
    }


async def _settled(pg: PostgresProvider, app: ApplicationConfig, nodes: set[uuid.UUID]) -> None:
    """Wait until every partition is run by one of *nodes*, and all of them run some."""
    with anyio.fail_after(120):
        while True:
            owners = await _owners(pg, app)
            claimed = set(owners.values())
            if len(owners) == PARTITIONS and claimed == nodes:
                return
            await anyio.sleep(0.1)


async def _failover(
    pg: PostgresProvider,
    app: ApplicationConfig,
    executor: Any,
    process: anyio.abc.Process,
    node_id: uuid.UUID,
    sig: signal.Signals,
) -> tuple[list[float], float]:
    """Signal a node; per partition it ran, seconds until a deposit there is handled."""
    owners = await _owners(pg, app)
    ran = [index for index, owner in owners.items() if owner == node_id]
    accounts: dict[int, str] = {}
    n = 0
    while len(accounts) < len(ran):
        account = f"acc-{n}"
        index = partition(ACCOUNT_KEY, account)
        if index in ran and index not in accounts:
            accounts[index] = account
        n += 1
    handled: list[float] = []
    started = time.perf_counter()
    process.send_signal(sig)

    async def one(account: str) -> None:
        await deposit(executor, account)
        handled.append(time.perf_counter() - started)

    async with anyio.create_task_group() as tg:
        for account in accounts.values():
            tg.start_soon(one, account)
    await process.wait()
    # The claims (heartbeats) follow: until no partition names the node.

    async def released() -> bool:
        return all(owner != node_id for owner in (await _owners(pg, app)).values())

    await until(released)
    return handled, time.perf_counter() - started


async def main(args: argparse.Namespace) -> None:
    app = config()
    work = Path(tempfile.mkdtemp(prefix="clusterbench-"))
    processes: list[anyio.abc.Process] = []
    node_ids = [uuid.uuid4() for _ in range(3)]
    with PostgresServer(durable=True) as server:
        try:
            for index, node_id in enumerate(node_ids):
                settings = {
                    "dsn": server.dsn,
                    "node_id": str(node_id),
                    "listen": f"127.0.0.1:{_free_port()}",
                    "heartbeat": args.heartbeat_interval,
                    "work": str(work),
                    "index": index,
                    "node_gc": args.node_gc,
                    "backlog_limit": args.backlog_limit,
                }
                with (work / f"node-{index}.log").open("wb") as log:
                    processes.append(
                        await anyio.open_process(
                            [
                                sys.executable,
                                __file__,
                                "--backend",
                                args.backend,
                                "--node",
                                json.dumps(settings),
                            ],
                            stdin=None,
                            stdout=log,
                            stderr=log,
                        )
                    )
            for index in range(3):
                with anyio.fail_after(60):
                    while not (work / f"ready-{index}").exists():
                        if processes[index].returncode is not None:
                            raise SystemExit(f"node {index} died: see {work}/node-{index}.log")
                        await anyio.sleep(0.05)
            async with PostgresProvider(server.dsn, schema=SCHEMA) as pg:

                async def joined() -> bool:
                    return len([n for n in await list_nodes(pg) if n.role == "node"]) >= 3

                with anyio.fail_after(30):
                    await until(joined)
                await _settled(pg, app, set(node_ids))
                async with runkit.Client(
                    runkit.with_application(app),
                    runkit.with_persistence_provider(pg),
                    runkit.with_heartbeat_interval(args.heartbeat_interval),
                ) as client:
                    executor = client.executor_for(app)
                    print(f"3 nodes up on PostgreSQL ({PARTITIONS} partitions); measuring ...")
                    report = await _measure(args, work, pg, app, executor, processes, node_ids)
        finally:
            for process in processes:
                if process.returncode is None:
                    process.kill()
                with anyio.CancelScope(shield=True):
                    await process.wait()
                    await process.aclose()
    print(report)
    if args.keep:
        print(f"logs: {work}")


async def _overload_phase(
    args: argparse.Namespace,
    work: Path,
    pg: Any,
    app: Any,
    executor: Any,
    node_ids: list[uuid.UUID],
) -> list[str]:
    """Overload through the client; return its report lines."""
    publish(work / "go-overload", {})
    overload = await overloaded(executor, args.overload_seconds, args.overload_callers)
    publish(work / "end-overload", {})
    samples = [await wait_for(work / f"overload-{i}") for i in range(3)]
    largest = [int(sample["largest_backlog"]) for sample in samples]
    held = [int(sample["largest_held"]) for sample in samples]
    accepted_ids = [command_id_for(APP_KEY, key) for key in overload.accepted]
    for _ in range(60):  # those that went to an inbox may still be on their way
        handled = await _handled_commands(pg)
        lost = sum(1 for c in accepted_ids if handled.get(c, 0) == 0)
        if not lost:
            break
        await anyio.sleep(0.5)
    twice = sum(1 for c in accepted_ids if handled.get(c, 0) > 1)
    refused_handled = sum(1 for k in overload.refused if command_id_for(APP_KEY, k) in handled)
    await _settled(pg, app, set(node_ids))
    await anyio.sleep(2)  # what the overload left behind (materialisation) winds down
    return [
        f"| overload through the client: {args.overload_callers} callers, "
        f"{args.overload_seconds:g} s, backlog limit {args.backlog_limit} | value |",
        "|---|---:|",
        f"| accepted calls (per second) | {len(overload.accepted):,} "
        f"({len(overload.accepted) / args.overload_seconds:,.0f}/s) |",
        f"| refused calls (`Backlogged`) | {len(overload.refused):,} |",
        f"| accepted call p50 / p99 ms | {_ms(_pct(overload.seconds, 0.5))} / "
        f"{_ms(_pct(overload.seconds, 0.99))} |",
        f"| largest partition backlog per node | {', '.join(map(str, largest))} |",
        f"| most inbox commands held for room per node | {', '.join(map(str, held))} |",
        f"| accepted and never handled / handled twice / refused and handled | "
        f"{lost} / {twice} / {refused_handled} |",
        "",
    ]


async def _measure(
    args: argparse.Namespace,
    work: Path,
    pg: PostgresProvider,
    app: ApplicationConfig,
    executor: Any,
    processes: list[anyio.abc.Process],
    node_ids: list[uuid.UUID],
) -> str:
    # Idle: what the nodes spend with nothing to do (heartbeats, polls, timers).
    pids = [p.pid for p in processes]
    idle_before, idle_started = _cpu_seconds(pids), time.perf_counter()
    await anyio.sleep(3)
    idle = (_cpu_seconds(pids) - idle_before) / (time.perf_counter() - idle_started) / 3

    # 0. Throughput through the client, three nodes (again with one, below).
    three = await throughput(executor, args.throughput_seconds, args.throughput_callers)

    # 1. Routing latency: the nodes and the client at once.
    cpu_before = _cpu_seconds(pids), time.process_time()
    publish(work / "go-latency", {"commands": args.commands, "callers": args.callers})
    client_results = await latencies(executor, args.commands, args.callers, lambda _: False)
    rows: list[tuple[float, bool]] = []
    lag: list[float] = []
    for index in range(3):
        published = await wait_for(work / f"latency-{index}")
        rows += [(float(s), bool(o)) for s, o in published["calls"]]
        lag += [float(s) for s in published["lag"]]
    # CPU per call of the phase (4 x --commands calls): the nodes' (as gateways,
    # owners and background work) and this process's (the client's).
    calls = 4 * args.commands
    node_cpu = (_cpu_seconds(pids) - cpu_before[0]) / calls
    client_cpu = (time.process_time() - cpu_before[1]) / calls
    owner = [s for s, o in rows if o]
    other = [s for s, o in rows if not o]
    client = [s for s, _ in client_results]

    # 2. Deadlines.
    publish(work / "go-reminders", {"reminders": args.reminders})
    late: list[tuple[float, bool]] = []
    for index in range(3):
        late += [(float(s), bool(o)) for s, o in await wait_for(work / f"reminders-{index}")]
    home_local = [s for s, o in late if o]
    home_remote = [s for s, o in late if not o]

    # 2b. Overload through the client (back-pressure across nodes): after the
    # latency and deadline phases, whose figures its leftovers would disturb.
    overload_lines: list[str] = []
    if args.overload_seconds > 0:
        overload_lines = await _overload_phase(args, work, pg, app, executor, node_ids)
    else:
        publish(work / "go-overload", {})
        publish(work / "end-overload", {})

    # 3. Failover (kill -9) and handoff (SIGTERM).
    killed, killed_claims = await _failover(
        pg, app, executor, processes[0], node_ids[0], signal.SIGKILL
    )
    await _settled(pg, app, set(node_ids[1:]))
    stopped, stopped_claims = await _failover(
        pg, app, executor, processes[1], node_ids[1], signal.SIGTERM
    )
    await _settled(pg, app, {node_ids[2]})
    one = await throughput(executor, args.throughput_seconds, args.throughput_callers)

    lines = [
        "",
        f"heartbeat interval {args.heartbeat_interval} s, backend {args.backend}, "
        f"{args.callers} callers per process, "
        + ("nodes' collector tuned as `runkit run` does" if args.node_gc else "default collector"),
        "",
        f"| client deposits, {args.throughput_callers} callers, {args.throughput_seconds:g} s "
        "| commands/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
        f"| three nodes | {three[0]:,.0f} | {_ms(three[1])} | {_ms(three[2])} |",
        f"| one node (same store, after the others stopped) | {one[0]:,.0f} | {_ms(one[1])} | "
        f"{_ms(one[2])} |",
        "",
        *overload_lines,
        "| deposit, call to event observed | calls | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
        f"| node, owner of the partition | {len(owner)} | {_ms(_pct(owner, 0.5))} | "
        f"{_ms(_pct(owner, 0.99))} |",
        f"| node, not the owner (offered) | {len(other)} | {_ms(_pct(other, 0.5))} | "
        f"{_ms(_pct(other, 0.99))} |",
        f"| client (never the owner) | {len(client)} | {_ms(_pct(client, 0.5))} | "
        f"{_ms(_pct(client, 0.99))} |",
        "",
        f"non-owner - owner: p50 {_ms(_pct(other, 0.5) - _pct(owner, 0.5))} ms, "
        f"p99 {_ms(_pct(other, 0.99) - _pct(owner, 0.99))} ms",
        f"event-loop lag in the nodes meanwhile (lateness of a 1 ms sleep): "
        f"p50 {_ms(_pct(lag, 0.5))} ms, p90 {_ms(_pct(lag, 0.9))} ms, "
        f"p99 {_ms(_pct(lag, 0.99))} ms",
        f"CPU per call meanwhile: nodes {_ms(node_cpu)} ms, client {_ms(client_cpu)} ms; "
        f"an idle node uses {idle:.1%} of a CPU",
        "",
        "| reminder, due to event observed | reminders | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
        f"| home partition on the requesting node | {len(home_local)} | "
        f"{_ms(_pct(home_local, 0.5))} | {_ms(_pct(home_local, 0.99))} | "
        f"{_ms(max(home_local, default=float('nan')))} |",
        f"| home partition on another node | {len(home_remote)} | "
        f"{_ms(_pct(home_remote, 0.5))} | {_ms(_pct(home_remote, 0.99))} | "
        f"{_ms(max(home_remote, default=float('nan')))} |",
        "",
        "| signal | partitions | first handled s | median s | last handled s | claims moved s |",
        "|---|---:|---:|---:|---:|---:|",
        f"| kill -9 | {len(killed)} | {min(killed):.2f} | {statistics.median(killed):.2f} | "
        f"{max(killed):.2f} | {killed_claims:.2f} |",
        f"| SIGTERM | {len(stopped)} | {min(stopped):.2f} | {statistics.median(stopped):.2f} | "
        f"{max(stopped):.2f} | {stopped_claims:.2f} |",
    ]
    return "\n".join(lines)


def _parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=400, help="deposits per process")
    parser.add_argument("--callers", type=int, default=4, help="concurrent callers per process")
    parser.add_argument("--reminders", type=int, default=60, help="reminders per node")
    parser.add_argument("--heartbeat-interval", type=float, default=0.25)
    parser.add_argument("--throughput-seconds", type=float, default=10.0)
    parser.add_argument("--throughput-callers", type=int, default=64)
    parser.add_argument("--overload-seconds", type=float, default=10.0)
    parser.add_argument("--overload-callers", type=int, default=4096)
    parser.add_argument(
        "--backlog-limit", type=int, default=100, help="the nodes' with_backlog_limit()"
    )
    parser.add_argument("--backend", choices=BACKENDS, default="asyncio")
    parser.add_argument(
        "--node-gc",
        action="store_true",
        help="tune the node processes' collector as `runkit run` does",
    )
    parser.add_argument("--keep", action="store_true", help="print the logs' folder")
    parser.add_argument("--node", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = _parse()
    if arguments.node:
        node_settings = json.loads(arguments.node)
        with tuned_collector() if node_settings["node_gc"] else contextlib.nullcontext():
            anyio.run(node, node_settings, **run_arguments(arguments.backend))
    else:
        anyio.run(main, arguments, **run_arguments(arguments.backend))
