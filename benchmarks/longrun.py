"""The bank over a longer run: throughput, CPU and the collector's heap, window by window.

Usage::

    uv run python benchmarks/longrun.py [--target postgres] [--windows 6] [--seconds 20]
        [--callers 64] [--accounts 1000] [--collector tuned|default|off]
        [--backend asyncio|uvloop|trio]

The bank of ``engine.py`` (null projections) runs in this process on one
target (a ``benchmarks/targets`` module) for ``--windows`` windows of
``--seconds``, with ``--callers`` depositing throughout each window. After each
window the chains are given a few seconds to finish, then a full collection is
timed and the collector's tracked objects are counted by type. Per window the
table gives deposits/s executed, process CPU per deposit (worker threads
included), resident memory, tracked objects, the full collection's pause, the
collector's own full collections during the window (how many, the longest
pause: what callers wait through; the census's is forced) and the types that
grew most since the window before: what a node keeps as it runs, and whether it
stops growing once its bounded structures (stream tails, instance caches) are
full.

``--collector``: ``tuned`` as ``runkit run`` sets it (the default), ``default``
as Python starts, ``off`` disabled during the windows (each census still
collects).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio

from runkit._backends import BACKENDS, run_arguments
from runkit._collector import tuned_collector

sys.path.insert(0, str(Path(__file__).resolve().parent))

import targets
from engine import engine_for, machine_line, null, table

from bank import App
from bank.messages import Deposit, OpenAccount

#: Time given to the chains started in a window before the census.
SETTLE_SECONDS = 3.0


def resident_mib() -> int:
    """This process's resident memory (Linux), in MiB; 0 where unknown."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


class Pauses:
    """The pauses of the collector's own (automatic) collections of the oldest
    generation while installed: what a node's callers wait through mid-run."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._started = 0.0
        self.paused = False  # the census's forced collection is not counted

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if self.paused or info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.durations.append((time.perf_counter() - self._started) * 1000)

    def take(self) -> list[float]:
        durations, self.durations = self.durations, []
        return durations


PAUSES = Pauses()


def census() -> tuple[collections.Counter[str], float]:
    """The tracked objects by type after a full collection, and its pause in ms."""
    PAUSES.paused = True
    try:
        started = time.perf_counter()
        gc.collect()
        pause = (time.perf_counter() - started) * 1000
        return collections.Counter(type(o).__qualname__ for o in gc.get_objects()), pause
    finally:
        PAUSES.paused = False


@contextlib.contextmanager
def collector(mode: str) -> Iterator[None]:
    if mode == "tuned":
        with tuned_collector():
            yield
    elif mode == "off":
        gc.disable()
        try:
            yield
        finally:
            gc.enable()
    else:
        yield


async def run(args: argparse.Namespace) -> list[list[str]]:
    rows: list[list[str]] = []
    async with targets.load(args.target).open_target() as target:
        with tempfile.TemporaryDirectory() as scratch:
            app = null(App(Path(scratch) / "unused.sqlite3"))
            engine = engine_for(app, target.provider)
            executor = engine.executor_for(app)
            ids = [f"A-{i:04}" for i in range(args.accounts)]
            async with anyio.create_task_group() as tg:
                tg.start_soon(engine.run)
                for account in ids:
                    await executor.execute_command(
                        OpenAccount(customer_id="C-1", account_id=account, account_name=account)
                    )
                sequence = 0
                before, _ = census()
                for window in range(args.windows):
                    stop = time.perf_counter() + args.seconds
                    done = 0

                    async def caller(until: float) -> None:
                        nonlocal sequence, done
                        rng = random.Random()
                        while time.perf_counter() < until:
                            sequence += 1
                            await executor.execute_command(
                                Deposit(
                                    transaction_id=f"D-{sequence:09}",
                                    account_id=rng.choice(ids),
                                    amount=100,
                                )
                            )
                            done += 1

                    cpu = time.process_time()
                    async with anyio.create_task_group() as load:
                        for _ in range(args.callers):
                            load.start_soon(caller, stop)
                    cpu = time.process_time() - cpu
                    await anyio.sleep(SETTLE_SECONDS)
                    automatic = PAUSES.take()
                    counts, pause = census()
                    grew = (counts - before).most_common(3)
                    before = counts
                    rows.append(
                        [
                            str(window + 1),
                            f"{done / args.seconds:,.0f}",
                            f"{1e6 * cpu / max(1, done):,.0f}",
                            f"{resident_mib():,}",
                            f"{sum(counts.values()):,}",
                            f"{pause:,.0f}",
                            f"{len(automatic)}, {max(automatic, default=0):,.0f}",
                            ", ".join(f"{name} +{n:,}" for name, n in grew) or "-",
                        ]
                    )
                    print(f"  window {window + 1}: {rows[-1][1]} deposits/s", flush=True)
                tg.cancel_scope.cancel()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="postgres")
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--collector", choices=("tuned", "default", "off"), default="tuned")
    parser.add_argument("--backend", choices=BACKENDS, default="asyncio")
    args = parser.parse_args(argv)
    print(f"{args.target}: the bank, {args.windows} windows of {args.seconds:g} s")
    gc.callbacks.append(PAUSES)
    try:
        with collector(args.collector):
            rows = anyio.run(run, args, **run_arguments(args.backend))
    finally:
        gc.callbacks.remove(PAUSES)
    header = [
        "window",
        "deposits/s",
        "CPU µs / deposit",
        "resident MiB",
        "tracked objects",
        "full collection ms",
        "automatic full collections: count, longest ms",
        "grew most",
    ]
    print()
    print(table(rows, header))
    print()
    print(
        f"{machine_line(args.backend)}; {args.callers} callers, {args.accounts} accounts, "
        f"collector {args.collector}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
