"""Back-pressure under overload, then catch-up into a no-op projection.

Usage::

    uv run python benchmarks/overload.py [--targets memory,postgres] [--seconds 60]
        [--callers 4096] [--backlog-limit 100] [--accounts 1000] [--backend asyncio|uvloop|trio]
        [--stop-timeout 600]

The single-aggregate workload of ``throughput.py`` (one ``Account`` aggregate,
one ``Deposited`` per ``Deposit``), plus a projection that records every
deposit's reference. For each target (a fresh store):

1. **overload**: ``--callers`` tasks (far more than the engine can serve at
   once) execute deposits back to back for ``--seconds`` on an engine with
   ``with_backlog_limit(--backlog-limit)`` and 16 partitions. Each call returns
   once its command is committed, waits for room while its partition is full,
   or raises ``runkit.Backlogged`` after the engine's 30 s wait. Every 50 ms the
   largest partition backlog (``Engine.progress()``'s ``pending``) is sampled.
   Reported: accepted/s, acceptance p50/p99/max, ``Backlogged`` errors, the
   largest backlog seen against the limit.
2. **nothing lost**: after the load stops, the projection must have seen every
   accepted reference exactly once (ADR-26 checkpoints make it idempotent; a
   reference seen twice or missing fails the run) within 120 s.
3. **catch-up**: the engine stops gracefully, given ``--stop-timeout`` seconds
   (default 600: all the time it needs) to write its aggregate instance
   journals (*stop s*; an engine's default is 5 s, leaving the rest to the next
   owner). A short ``--stop-timeout`` (say 0.01) stops it nearly as abruptly as
   a crash: the materialiser's backlog is left for the new engine to write
   before its instances are rebuilt. Then a new engine over the same store
   runs a no-op projection from checkpoint 0 (nothing but in-memory
   checkpoints); events/s from the first event applied to the last, and the
   engine's start-up (to the first event applied) apart.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import attrs

from runkit._backends import BACKENDS, run_arguments

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import machine_line, percentile, table
from throughput import (
    REGISTRY,
    AccountHandler,
    Deposit,
    Deposited,
    OpenAccount,
    open_target,
)

import dogma
import runkit
from runkit.config import build
from runkit.engine.engine import Engine
from runkit.engine.settings import EngineSettings
from runkit.persistence import Provider

PARTITIONS = 16


class RefsProjection(dogma.NoCompactBehavior):
    """Records each ``Deposited`` reference once per stream offset (ADR-26 OCC)."""

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.checkpoints: dict[str, int] = {}
        self.refs: Counter[str] = Counter()
        self.applied = 0
        self.first_at = 0.0  # when the first event was applied

    def configure(self, c: dogma.ProjectionConfigurer) -> None:
        c.identity("refs", "7f1c0a52-5b0e-4c39-9d1e-3a1f6b2c0030")
        c.routes(dogma.handles_event(Deposited, registry=REGISTRY))

    async def handle_event(self, scope: dogma.ProjectionEventScope, event: dogma.Event) -> int:
        current = self.checkpoints.get(scope.stream_id, 0)
        if current != scope.checkpoint_offset:
            return current
        self.checkpoints[scope.stream_id] = scope.offset + 1
        self.applied += 1
        if self.applied == 1:
            self.first_at = time.perf_counter()
        if self.keep:
            assert isinstance(event, Deposited)
            self.refs[event.ref] += 1
        return scope.offset + 1

    async def checkpoint_offset(self, stream_id: str) -> int:
        return self.checkpoints.get(stream_id, 0)

    async def reset(self, scope: dogma.ProjectionResetScope) -> None:
        self.checkpoints.clear()
        self.refs.clear()


class OverloadApp:
    """The throughput benchmark's account aggregate and a references projection."""

    def __init__(self, projection: RefsProjection) -> None:
        self.account = AccountHandler()
        self.refs = projection

    def configure(self, c: dogma.ApplicationConfigurer) -> None:
        c.identity("throughput", "7f1c0a52-5b0e-4c39-9d1e-3a1f6b2c0020")
        c.routes(dogma.via_aggregate(self.account), dogma.via_projection(self.refs))


@attrs.frozen
class Result:
    target: str
    accepted_per_s: float
    p50: float
    p99: float
    worst: float
    backlogged: int
    max_backlog: int
    limit: int
    accepted: int
    recorded: int
    duplicates: int
    missing: int
    drain_s: float
    flush_s: float
    caught_up: int
    catch_up_per_s: float
    catch_up_start_s: float
    cpu_us_per_command: float


def engine_for(
    app: OverloadApp, provider: Provider, limit: int = 1000, *, shutdown_timeout: float = 5.0
) -> runkit.Engine:
    # EngineSettings (not options) for the shutdown timeout: the overload engine
    # may flush its materialiser for as long as it needs, so that catch-up
    # measures delivery, not the next owner re-materialising a large tail.
    return Engine.from_settings(
        EngineSettings(
            applications=(build(app, registry=REGISTRY),),
            persistence_provider=provider,
            partition_count=PARTITIONS,
            backlog_limit=limit,
            shutdown_timeout=shutdown_timeout,
        )
    )


async def overload(provider: Provider, args: argparse.Namespace) -> dict[str, Any]:
    projection = RefsProjection()
    app = OverloadApp(projection)
    engine = engine_for(app, provider, args.backlog_limit, shutdown_timeout=args.stop_timeout)
    executor = engine.executor_for(build(app, registry=REGISTRY))
    names = [f"A-{i:05}" for i in range(args.accounts)]
    accepted: list[str] = []
    latencies: list[float] = []
    backlogged = 0
    max_backlog = 0
    sequence = iter(range(10**12))

    async def sample(stop: anyio.Event) -> None:
        nonlocal max_backlog
        while not stop.is_set():
            for partitions in engine.progress().values():
                for p in partitions.values():
                    max_backlog = max(max_backlog, p["pending"])
            await anyio.sleep(0.05)

    async def caller(deadline: float) -> None:
        nonlocal backlogged
        while time.perf_counter() < deadline:
            n = next(sequence)
            ref = f"D-{n}"
            started = time.perf_counter()
            try:
                await executor.execute_command(Deposit(names[n % len(names)], 1, ref))
            except runkit.Backlogged:
                backlogged += 1
                continue
            latencies.append(time.perf_counter() - started)
            accepted.append(ref)

    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        async with anyio.create_task_group() as openers:
            for name in names:
                openers.start_soon(executor.execute_command, OpenAccount(name))
        # Start the load once this node runs every partition and has handled
        # the openings (they may have gone to the inboxes before it did).
        # Commands accepted while no node runs their partition wait in its
        # inbox, which the limit does not bound (see docs/benchmarks.md).
        with anyio.fail_after(120):
            while True:
                [partitions] = engine.progress().values() or [{}]
                if len(partitions) == PARTITIONS and not any(
                    p["pending"] for p in partitions.values()
                ):
                    break
                await anyio.sleep(0.05)
        stop = anyio.Event()
        tg.start_soon(sample, stop)
        cpu = time.process_time()
        started = time.perf_counter()
        deadline = started + args.seconds
        async with anyio.create_task_group() as callers:
            for _ in range(args.callers):
                callers.start_soon(caller, deadline)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        stop.set()
        # Nothing lost: the projection sees every accepted deposit, once.
        drained = time.perf_counter()
        want = set(accepted)
        with anyio.move_on_after(120):
            while not want <= projection.refs.keys():  # noqa: ASYNC110 (polling)
                await anyio.sleep(0.1)
        drain_s = time.perf_counter() - drained
        tg.cancel_scope.cancel()
        stopping = time.perf_counter()
    flush_s = time.perf_counter() - stopping  # the graceful stop's materialiser flush
    return {
        "accepted_per_s": len(accepted) / elapsed,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "worst": max(latencies, default=float("nan")),
        "backlogged": backlogged,
        "max_backlog": max_backlog,
        "accepted": len(accepted),
        "recorded": sum(projection.refs.values()),
        "duplicates": sum(n - 1 for n in projection.refs.values() if n > 1),
        "missing": len(want - projection.refs.keys()),
        "drain_s": drain_s,
        "flush_s": flush_s,
        "cpu_us_per_command": cpu / max(1, len(accepted)) * 1e6,
    }


async def catch_up(provider: Provider, expected: int) -> tuple[int, float, float]:
    """A fresh engine's no-op projection from checkpoint 0.

    Returns (events, events/s from the first event applied, seconds from the
    engine's start to the first event applied).
    """
    projection = RefsProjection(keep=False)
    engine = engine_for(OverloadApp(projection), provider)
    async with anyio.create_task_group() as tg:
        started = time.perf_counter()
        tg.start_soon(engine.run)
        with anyio.move_on_after(600):
            while projection.applied < expected:  # noqa: ASYNC110 (polling)
                await anyio.sleep(0.001)
        # From the first event applied: start-up (taking 16 partitions) excluded.
        elapsed = time.perf_counter() - projection.first_at
        tg.cancel_scope.cancel()
    return (
        projection.applied,
        (projection.applied - 1) / elapsed,
        projection.first_at - started,
    )


async def run_target(name: str, args: argparse.Namespace) -> Result:
    async with open_target(name) as target, target.store() as store:
        print(f"{name}: overload for {args.seconds:g} s with {args.callers} callers", flush=True)
        o = await overload(store.provider, args)
        print(f"{name}: catch-up of {o['recorded']:,} events", flush=True)
        events, rate, start_s = await catch_up(store.provider, o["recorded"])
    return Result(
        target=name,
        limit=args.backlog_limit,
        caught_up=events,
        catch_up_per_s=rate,
        catch_up_start_s=start_s,
        **o,
    )


def report(results: list[Result], args: argparse.Namespace) -> str:
    header = [
        "target",
        "accepted/s",
        "accept p50/p99/max ms",
        "Backlogged",
        "max backlog / limit",
        "accepted",
        "recorded (dup, missing)",
        "drain s",
        "stop s",
        "CPU µs/command",
        "catch-up events",
        "catch-up ev/s",
        "start-up s",
    ]
    rows = [
        [
            r.target,
            f"{r.accepted_per_s:,.0f}",
            f"{r.p50 * 1e3:.0f} / {r.p99 * 1e3:.0f} / {r.worst * 1e3:.0f}",
            str(r.backlogged),
            f"{r.max_backlog} / {r.limit}",
            f"{r.accepted:,}",
            f"{r.recorded:,} ({r.duplicates}, {r.missing})",
            f"{r.drain_s:.1f}",
            f"{r.flush_s:.1f}",
            f"{r.cpu_us_per_command:,.0f}",
            f"{r.caught_up:,}",
            f"{r.catch_up_per_s:,.0f}",
            f"{r.catch_up_start_s:.2f}",
        ]
        for r in results
    ]
    machine = machine_line(args.backend)
    return (
        f"{table(rows, header)}\n\n{machine}; {args.callers} callers for {args.seconds:g} s, "
        f"{PARTITIONS} partitions, backlog limit {args.backlog_limit}, "
        f"{args.accounts:,} accounts, stop timeout {args.stop_timeout:g} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="memory,postgres")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--callers", type=int, default=4096)
    parser.add_argument("--backlog-limit", type=int, default=100)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--backend", choices=BACKENDS, default="asyncio")
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=600.0,
        help="seconds the loaded engine's graceful stop may take (short: a near-abrupt stop)",
    )
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    results: list[Result] = []

    async def run_all() -> None:
        for name in targets:
            results.append(await run_target(name, args))

    anyio.run(run_all, **run_arguments(args.backend))
    print()
    print(report(results, args))
    bad = [r.target for r in results if r.duplicates or r.missing or r.max_backlog > r.limit]
    if bad:
        print(f"\nFAILED on {', '.join(bad)}: duplicates, missing deposits or backlog over limit")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
