"""``run_owned_partition``: how an owned partition's run ends when its work fails."""

from __future__ import annotations

import logging
import sys
import uuid
from pathlib import Path

import anyio
import pytest
from anyio.abc import TaskStatus

from runkit.engine.events import consumers as consumers_module
from runkit.engine.events.consumers import EventConsumers
from runkit.engine.partitions import PartitionContext
from runkit.engine.streams import OwnershipLost
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import running, setup, wait_until


class FailingOnce(EventConsumers):
    """The events side, whose first partition run fails with a lost stream and a bug at once."""

    runs = 0

    async def run_partition(
        self, ctx: PartitionContext, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        FailingOnce.runs += 1
        if FailingOnce.runs == 1:
            task_status.started()
            raise ExceptionGroup(
                "consumers",
                [OwnershipLost("test: another node wrote the stream"), KeyError("bug")],
            )
        await super().run_partition(ctx, task_status=task_status)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


async def test_a_bug_beside_a_lost_partition_is_raised_not_swallowed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The loss is honoured (logged as such), and the bug takes the path of any
    # error: the runner logs it with its traceback and restarts the partition.
    monkeypatch.setattr(FailingOnce, "runs", 0)
    monkeypatch.setattr(consumers_module, "partition_consumers", FailingOnce)
    caplog.set_level(logging.INFO, logger="runkit.engine")
    s = setup()
    async with running(MemoryProvider(str(uuid.uuid4())), s.config, partition_count=1):

        def errors() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]

        await wait_until(lambda: FailingOnce.runs >= 2 and bool(errors()))
    assert "partition 0: another node appended to its stream" in caplog.text
    [record] = errors()
    assert record.exc_info is not None
    error = record.exc_info[1]
    assert error is not None
    assert [type(e) for e in _leaves(error)] == [KeyError]


async def test_a_new_owner_fences_off_the_previous_one_before_taking_work() -> None:
    # The previous owner has not noticed the takeover yet and commits once more
    # after the new owner read the stream's tail. On a quiet partition the new
    # owner would neither see that commit (it reads the journal only below the
    # tail it read) nor fence it off until its own next append. Its claim
    # record makes the late commit conflict: the command goes to the inbox,
    # and the new owner handles it.
    from engine_commands_harness import APP_KEY, Deposit, one_partition_engine

    from runkit.engine.partitions import partition_id

    s = setup()
    silo = str(uuid.uuid4())
    a, a_owns = one_partition_engine(s.config, MemoryProvider(silo))
    b, b_owns = one_partition_engine(s.config, MemoryProvider(silo))
    pid = partition_id(APP_KEY, 0)
    a_owns.assign({pid})
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run)
        on_a = a.executor_for(s.config)
        await on_a.execute_command(Deposit("x", 1, "r1"))
        tg.start_soon(b.run)
        runtime_b = await b.runtime(APP_KEY)
        b_owns.assign({pid})  # b takes the partition; a has not noticed yet
        await wait_until(lambda: 0 in runtime_b.partitions)
        await on_a.execute_command(Deposit("x", 2, "r2"))
        a_owns.assign(set())
        stream = runtime_b.partitions[0]._stream
        seen: list[str] = []

        async def read() -> None:
            async for event in stream.read(0):
                seen.append(event.envelope.description)

        tg.start_soon(read)
        await wait_until(lambda: len(seen) == 2)
        tg.cancel_scope.cancel()
    assert "r2" in [ref for _, ref, _ in s.accounts.calls]
