"""Instructions per command or deposit, counted by cachegrind: CPU cost without the noise.

Usage::

    uv run python benchmarks/instructions.py [--workloads bank,aggregate]
        [--small 1000] [--large 3000] [--backend asyncio|uvloop|trio] [--partitions 16]
        [--against REV]

Timed CPU figures on a shared two-CPU machine move by several percent from run
to run, which hides most single optimisations. This counts the instructions
the interpreter executes instead (``valgrind --tool=cachegrind --cache-sim=no``,
the whole process), which repeats within about 1%. Each workload runs twice
in a child process, for ``--small`` and for ``--large`` commands, and the
difference divided by the difference in commands takes start-up and shutdown
out:

- ``bank``: the bank on the memory driver (null projections), 64 callers over
  200 accounts executing ``Deposit`` commands; a deposit counts once its
  ``DepositApproved`` is published (three commands, four processes). Per
  *deposit*.
- ``aggregate``: the single-aggregate application of ``throughput.py`` on the
  memory driver, 64 callers over 1,000 accounts, each ``Deposit`` handled
  before the caller's next. Per *command*.
- ``observed``: ``aggregate`` with each caller also waiting for its
  ``Deposited`` through a ``dogma.observe`` observer (the path of an observed
  call on a lone node). Per *command*.

``--against REV`` also counts a git revision of ``runkit-core``,
``runkit-memory`` and ``dogma-api`` (their ``src`` trees, put in front of the
installed ones on ``PYTHONPATH``), and prints the ratio. The two sides run
side by side (valgrind uses one CPU each); instruction counts do not depend on
it. Wall-clock timing still matters for what it cannot see (see
``docs/benchmarks.md``: fewer instructions can come with smaller batches).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import Any

import anyio

import runkit
from runkit._backends import BACKENDS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCES = ("runkit-core/src", "runkit-memory/src", "dogma-api/src")
CALLERS = 64


# -- the child: one workload, N commands ----------------------------------------------


async def bank(n: int, partitions: int) -> None:
    sys.path.insert(0, str(HERE))
    import engine as eb
    import throughput as tp

    from bank import App
    from bank.messages import Deposit, OpenAccount
    from runkit_memory import MemoryProvider

    eb.PARTITIONS[0] = partitions
    with tempfile.TemporaryDirectory() as scratch:
        app = eb.null(App(Path(scratch) / "unused.sqlite3"))
        engine = eb.engine_for(app, MemoryProvider())
        approvals = eb.ApprovalProbe(engine)
        executor = engine.executor_for(app)
        ids = [f"A-{i:04}" for i in range(200)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            for account in ids:
                await executor.execute_command(
                    OpenAccount(customer_id="C-1", account_id=account, account_name=account)
                )
            rng = random.Random(7)

            async def deposit(item: int) -> None:
                await executor.execute_command(
                    Deposit(transaction_id=f"D-{item:08}", account_id=rng.choice(ids), amount=100)
                )

            await tp.run_callers(CALLERS, list(range(n)), deposit)
            # Polled (the probe is a plain counter): a few polls, negligible beside n deposits.
            while True:
                if len(approvals.times) >= n:
                    break
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()


async def aggregate(n: int, partitions: int, *, observe: bool = False) -> None:
    sys.path.insert(0, str(HERE))
    import throughput as tp

    import dogma
    from runkit.config import build
    from runkit_memory import MemoryProvider

    config = build(tp.BenchApp(), registry=tp.REGISTRY)
    engine = runkit.Engine(
        runkit.with_application(config),
        runkit.with_persistence_provider(MemoryProvider()),
        runkit.with_partition_count(partitions),
    )
    executor = engine.executor_for(config)
    names = [f"A-{i:05}" for i in range(1000)]
    rng = random.Random(7)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)

        async def open_account(name: str) -> None:
            await executor.execute_command(tp.OpenAccount(name))

        async def deposit(item: int) -> None:
            ref = f"D-{item}"

            async def mine(e: tp.Deposited) -> bool:
                return e.ref == ref

            observers = [dogma.observe(tp.Deposited, mine, registry=tp.REGISTRY)] if observe else []
            await executor.execute_command(
                tp.Deposit(rng.choice(names), 100, ref), observers=observers
            )

        await tp.run_callers(CALLERS, names, open_account)
        await tp.run_callers(CALLERS, list(range(n)), deposit)
        tg.cancel_scope.cancel()


async def observed(n: int, partitions: int) -> None:
    await aggregate(n, partitions, observe=True)


WORKLOADS = {"bank": bank, "aggregate": aggregate, "observed": observed}
UNITS = {"bank": "deposit", "aggregate": "command", "observed": "command"}


def child(workload: str, n: int, backend: str, partitions: int) -> None:
    from runkit._collector import tuned_collector

    try:
        from runkit._backends import run_arguments
    except ImportError:  # --against a revision from before the uvloop choice
        arguments: dict[str, Any] = {"backend": backend}
    else:
        arguments = run_arguments(backend)
    with tuned_collector():
        anyio.run(WORKLOADS[workload], n, partitions, **arguments)


# -- the parent: cachegrind, revisions, the table --------------------------------------


def count(workload: str, n: int, args: argparse.Namespace, pythonpath: str | None) -> int:
    """Instructions of one child process running *workload* for *n* commands."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--child",
        workload,
        str(n),
        "--backend",
        args.backend,
        "--partitions",
        str(args.partitions),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    match = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode != 0 or match is None:
        raise SystemExit(
            f"instructions.py: the {workload} child ({n}) failed (exit {done.returncode}):\n"
            + done.stderr[-2000:]
        )
    return int(match.group(1).replace(",", ""))


def export(rev: str, into: Path) -> str:
    """The ``src`` trees of *rev*, exported under *into*; returns their PYTHONPATH."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, *SOURCES],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise SystemExit(f"--against {rev}: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return os.pathsep.join(str(into / src) for src in SOURCES)


def per_command(workload: str, args: argparse.Namespace, pythonpath: str | None) -> float:
    small = count(workload, args.small, args, pythonpath)
    large = count(workload, args.large, args, pythonpath)
    commands: int = args.large - args.small
    return (large - small) / commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="bank,aggregate")
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=3000)
    parser.add_argument("--backend", choices=BACKENDS, default="asyncio")
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--against", metavar="REV")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.backend, args.partitions)
        return 0
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown or not workloads:
        parser.error(f"--workloads: unknown {', '.join(unknown)}; choose from bank, aggregate")
    try:
        runkit.with_partition_count(args.partitions)  # the engine's own check
    except ValueError as exc:
        parser.error(f"--partitions: {exc}")
    if not 0 < args.small < args.large:
        parser.error("--small and --large: expected 0 < small < large")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")

    with tempfile.TemporaryDirectory() as scratch:
        sides: list[tuple[str, str | None]] = [("working tree", None)]
        if args.against:
            sides.append((args.against, export(args.against, Path(scratch))))
        print(f"counting instructions ({args.small} and {args.large} per run, {args.backend})")
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = {
                (w, label): pool.submit(per_command, w, args, path)
                for w in workloads
                for label, path in sides
            }
            rows = {key: future.result() for key, future in results.items()}

    header = "| workload | instructions per | " + " | ".join(label for label, _ in sides)
    header += " | ratio |" if args.against else " |"
    print()
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for w in workloads:
        cells = [f"{rows[w, label]:,.0f}" for label, _ in sides]
        line = f"| {w} | {UNITS[w]} | " + " | ".join(cells)
        if args.against:
            line += f" | {rows[w, sides[0][0]] / rows[w, args.against]:.3f}"
        print(line + " |")
    footer = f"\n{args.partitions} partitions, {CALLERS} callers"
    if args.against:
        footer += f"; ratio = working tree ÷ {args.against}"
    print(footer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
