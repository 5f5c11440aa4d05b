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
    assert "lost partition 0" in caplog.text
    [record] = errors()
    assert record.exc_info is not None
    error = record.exc_info[1]
    assert error is not None
    assert [type(e) for e in _leaves(error)] == [KeyError]
