"""Throughput and latency of the persistence drivers, and of raw baselines.

Usage::

    uv run python benchmarks/persistence.py [--drivers memory,postgres] [--seconds N]
        [--rounds R] [--concurrency 1,16] [--backend asyncio|uvloop|trio] [--markdown]

For each driver it runs these workloads at each concurrency (tasks sharing one
provider) for ``--seconds`` in total, split into ``--rounds`` rounds (each after
a short warm-up), and prints operations per second and p50/p99 latency over
all rounds:

=============  ==========================================================
append         each task appends 100-byte records to its own journal
get            random reads from a 1,000-record journal
range          full scans of a 1,000-record journal; ops are *records*,
               latency is per whole scan
kv set         each task compare-and-sets its own key (revision chained)
kv get         random reads of 1,000 keys
set add        each task adds new 16-byte members
=============  ==========================================================

Drivers are modules in ``benchmarks/targets/`` (see that package's docstring
for the interface: a module defines ``NAME`` and ``open_target()``). When a
target supplies a *baseline* (the same backend requests issued without the
driver), each workload runs on it too, alternating with the driver round by
round (so that drifting background load hits both alike), and the report gives
the driver/baseline throughput ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import attrs

from runkit._backends import BACKENDS, run_arguments

sys.path.insert(0, str(Path(__file__).resolve().parent))

import targets
from targets import BaselineJournal, BaselineProvider, Target

RECORD = b"r" * 100
READ_SET = 1000
WARMUP_SECONDS = 0.5

#: One task's loop body: does one unit of work and returns how many ops it counted.
Step = Callable[[], Awaitable[int]]


@attrs.frozen
class Result:
    """One workload at one concurrency on one provider."""

    ops: int
    seconds: float
    latencies: list[float]
    cpu_seconds: float = 0.0  # of this (client) process, all threads

    def __add__(self, other: Result) -> Result:
        return Result(
            self.ops + other.ops,
            self.seconds + other.seconds,
            self.latencies + other.latencies,
            self.cpu_seconds + other.cpu_seconds,
        )

    @property
    def cpu_per_op(self) -> float:
        """Client CPU time per operation, in microseconds (server time excluded)."""
        return 1e6 * self.cpu_seconds / self.ops if self.ops else float("nan")

    @property
    def rate(self) -> float:
        """Operations per second."""
        return self.ops / self.seconds

    def percentile(self, fraction: float) -> float:
        """Latency at *fraction* (0..1), in milliseconds."""
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure(steps: list[Step], seconds: float) -> Result:
    """Run each step in its own task, in a loop, for *seconds*; count and time them."""
    latencies: list[float] = []
    counted = 0
    deadline = 0.0

    async def worker(step: Step) -> None:
        nonlocal counted
        while True:
            started = time.perf_counter()
            if started >= deadline:
                return
            n = await step()
            latencies.append(time.perf_counter() - started)
            counted += n

    for phase in ("warm-up", "measure"):
        latencies.clear()
        counted = 0
        begin, cpu_begin = time.perf_counter(), time.process_time()
        deadline = begin + (WARMUP_SECONDS if phase == "warm-up" else seconds)
        async with anyio.create_task_group() as tg:
            for step in steps:
                tg.start_soon(worker, step)
        elapsed, cpu = time.perf_counter() - begin, time.process_time() - cpu_begin
    return Result(ops=counted, seconds=elapsed, latencies=list(latencies), cpu_seconds=cpu)


class Workloads:
    """Builds each workload's per-task steps on a provider (driver or baseline)."""

    def __init__(self, provider: BaselineProvider, tag: str) -> None:
        self.p = provider
        self.tag = tag  # keeps the stores of runs apart

    async def prepare(self) -> None:
        """Fill the journal and keyspace the read workloads use."""
        journal = await self.p.journals.open("bench-read")
        keyspace = await self.p.keyspaces.open("bench-read")
        try:
            await journal.get(READ_SET - 1)
            return  # filled by an earlier run on this backend
        except LookupError:
            pass
        for i in range(READ_SET):
            await journal.append(i, RECORD)
            await keyspace.set(f"key-{i}".encode(), RECORD, "")

    async def append(self, tasks: int) -> list[Step]:
        steps: list[Step] = []
        for t in range(tasks):
            journal = await self.p.journals.open(f"bench-append-{self.tag}-{t}")
            position = [0]

            async def step(
                journal: BaselineJournal = journal, position: list[int] = position
            ) -> int:
                await journal.append(position[0], RECORD)
                position[0] += 1
                return 1

            steps.append(step)
        return steps

    async def get(self, tasks: int) -> list[Step]:
        journal = await self.p.journals.open("bench-read")

        async def step() -> int:
            await journal.get(random.randrange(READ_SET))
            return 1

        return [step] * tasks

    async def range(self, tasks: int) -> list[Step]:
        journal = await self.p.journals.open("bench-read")

        async def step() -> int:
            n = 0
            async for _ in journal.range(0):
                n += 1
            assert n == READ_SET
            return n

        return [step] * tasks

    async def kv_set(self, tasks: int) -> list[Step]:
        keyspace = await self.p.keyspaces.open(f"bench-kv-{self.tag}")
        steps: list[Step] = []
        for t in range(tasks):
            key = f"key-{t}".encode()
            revision = [await keyspace.set(key, RECORD, "")]

            async def step(key: bytes = key, revision: list[str] = revision) -> int:
                revision[0] = await keyspace.set(key, RECORD, revision[0])
                return 1

            steps.append(step)
        return steps

    async def kv_get(self, tasks: int) -> list[Step]:
        keyspace = await self.p.keyspaces.open("bench-read")

        async def step() -> int:
            await keyspace.get(f"key-{random.randrange(READ_SET)}".encode())
            return 1

        return [step] * tasks

    async def set_add(self, tasks: int) -> list[Step]:
        set_ = await self.p.sets.open(f"bench-set-{self.tag}")
        steps: list[Step] = []
        for t in range(tasks):
            counter = [0]

            async def step(t: int = t, counter: list[int] = counter) -> int:
                counter[0] += 1
                await set_.add(f"{t:04}-{counter[0]:011}".encode())
                return 1

            steps.append(step)
        return steps


WORKLOADS = {
    "append": Workloads.append,
    "get": Workloads.get,
    "range": Workloads.range,
    "kv set": Workloads.kv_set,
    "kv get": Workloads.kv_get,
    "set add": Workloads.set_add,
}


@attrs.frozen
class Row:
    """A line of the report."""

    driver: str
    workload: str
    concurrency: int
    result: Result
    baseline: Result | None


async def run_driver(
    name: str, concurrencies: list[int], seconds: float, rounds: int, rows: list[Row]
) -> str:
    """Run every workload on one driver (and its baseline); return the target's notes."""
    module = targets.load(name)
    target: Target
    async with module.open_target() as target:
        runs = 0
        subjects: list[tuple[str, BaselineProvider]] = [("driver", target.provider)]
        if target.baseline is not None:
            subjects.append(("baseline", target.baseline))
        await Workloads(target.provider, "prep").prepare()
        for workload, build in WORKLOADS.items():
            for concurrency in concurrencies:
                results: dict[str, Result] = {}
                for _ in range(rounds):
                    for label, provider in subjects:
                        runs += 1
                        steps = await build(Workloads(provider, f"{runs}"), concurrency)
                        result = await measure(steps, seconds / rounds)
                        results[label] = results[label] + result if label in results else result
                row = Row(name, workload, concurrency, results["driver"], results.get("baseline"))
                rows.append(row)
                print(format_row(row), flush=True)
        return target.notes


def format_row(row: Row) -> str:
    """One line of the plain-text report."""
    r = row.result
    line = (
        f"{row.driver:10} {row.workload:8} c={row.concurrency:<3} {r.rate:10,.0f} ops/s"
        f"  p50 {r.percentile(0.5):7.3f} ms  p99 {r.percentile(0.99):7.3f} ms"
        f"  cpu {r.cpu_per_op:6.1f} us/op"
    )
    if row.baseline is not None:
        b = row.baseline
        line += (
            f"   | raw {b.rate:10,.0f} ops/s  p50 {b.percentile(0.5):7.3f} ms"
            f"  p99 {b.percentile(0.99):7.3f} ms  cpu {b.cpu_per_op:6.1f} us/op"
            f"  ratio {r.rate / b.rate:5.0%}"
        )
    return line


def markdown(rows: list[Row]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| driver | workload | tasks | ops/s | p50 ms | p99 ms | client CPU µs/op "
        "| raw ops/s | raw p50 ms | raw p99 ms | raw CPU µs/op | driver/raw ops/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        r, b = row.result, row.baseline
        cells = [
            row.driver,
            row.workload + (" (records)" if row.workload == "range" else ""),
            str(row.concurrency),
            f"{r.rate:,.0f}",
            f"{r.percentile(0.5):.3f}",
            f"{r.percentile(0.99):.3f}",
            f"{r.cpu_per_op:.1f}",
        ]
        if b is not None:
            cells += [
                f"{b.rate:,.0f}",
                f"{b.percentile(0.5):.3f}",
                f"{b.percentile(0.99):.3f}",
                f"{b.cpu_per_op:.1f}",
                f"{r.rate / b.rate:.0%}",
            ]
        else:
            cells += ["", "", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    """A description of this machine for the report."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; load average {load}"
    )


async def main(args: argparse.Namespace) -> None:
    rows: list[Row] = []
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    print(
        f"machine: {machine()}; backend {args.backend}; {args.seconds:g}s per cell"
        f" in {args.rounds} rounds",
        flush=True,
    )
    notes = {}
    for name in args.drivers.split(","):
        notes[name] = await run_driver(name, concurrencies, args.seconds, args.rounds, rows)
    for name, text in notes.items():
        print(f"{name}: {text}")
    print(f"after: {machine()}")
    if args.markdown:
        print()
        print(markdown(rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--drivers",
        default="memory,postgres",
        help=f"comma-separated targets (available: {', '.join(targets.available())})",
    )
    parser.add_argument(
        "--seconds", type=float, default=6.0, help="per workload, concurrency and subject"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternations of driver and raw")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated task counts")
    parser.add_argument("--backend", default="asyncio", choices=BACKENDS)
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    anyio.run(main, arguments, **run_arguments(arguments.backend))
