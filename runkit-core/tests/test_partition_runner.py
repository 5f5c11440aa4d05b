"""``PartitionRunner``: one run per owned partition, following ownership changes."""

from __future__ import annotations

import logging

import anyio
import pytest

from runkit.engine.cluster.ownership import StaticOwnership
from runkit.engine.partitions import PartitionRunner, partition_id

APP = "c0000000-0000-4000-8000-0000000000aa"
WIND_DOWN = 0.2


async def test_a_partition_owned_again_starts_after_its_last_run_has_wound_down() -> None:
    # A run that is cancelled flushes what it committed (shielded). Ownership
    # lost and regained meanwhile (a heartbeat stale for a moment) must not
    # start a second run beside it: the two would write the same stream.
    ownership = StaticOwnership()
    log: list[str] = []
    runs = 0
    started = {1: anyio.Event(), 2: anyio.Event()}

    async def run_one(index: int) -> None:
        nonlocal runs
        runs += 1
        run = runs
        log.append(f"start {run}")
        started[run].set()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(WIND_DOWN)
            log.append(f"end {run}")

    async def wait_started(run: int) -> None:
        with anyio.fail_after(10):
            await started[run].wait()

    runner = PartitionRunner(APP, 1, ownership, run_one)
    owned = {partition_id(APP, 0)}
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.run)
        ownership.assign(owned)
        await wait_started(1)
        ownership.assign(set())
        await anyio.sleep(0.01)  # the runner cancels run 1, which starts winding down
        ownership.assign(owned)
        await anyio.sleep(0.01)
        ownership.assign(set())  # cancelled while it waits: run 3 waits for run 1 too
        await anyio.sleep(0.01)
        ownership.assign(owned)
        await wait_started(2)
        tg.cancel_scope.cancel()
    assert log == ["start 1", "end 1", "start 2", "end 2"]


async def test_a_partition_this_node_no_longer_owns_is_logged_as_released(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Its taking is logged (run_owned_partition); a node's log must also say
    # when it stops running one, or a rebalance is invisible in it.
    ownership = StaticOwnership()
    started = anyio.Event()

    async def run_one(index: int) -> None:
        started.set()
        await anyio.sleep_forever()

    runner = PartitionRunner(APP, 2, ownership, run_one, name="bank")
    with caplog.at_level(logging.INFO, logger="runkit"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run)
            ownership.assign({partition_id(APP, 0), partition_id(APP, 1)})
            with anyio.fail_after(10):
                await started.wait()
            ownership.assign({partition_id(APP, 0)})
            await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    [record] = [r for r in caplog.records if "releasing" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        "application bank: releasing partition 1: this node no longer owns it"
    )
    assert record.partition == 1  # type: ignore[attr-defined]
