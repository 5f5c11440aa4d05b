"""ADR 0010: the partition stream writer commits process steps with the batch.

A step rides in the next record beside the batch's commands and events, the
record's size bound counts it, ``on_durable`` tells where it landed, and each
header carries the ``dispatched`` watermark.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import anyio
import pytest

from runkit.engine.streams import (
    EventBus,
    PartitionStream,
    ProcessStep,
    Publication,
    StreamTail,
    StreamWriter,
    decode_stream_record,
)
from runkit.persistence import Journal
from runkit_memory import MemoryProvider

pytestmark = pytest.mark.anyio

H = "5b0c5a3e-4c1e-4b8e-9d43-0f0a3c2e9b10"


async def stream_writer(
    *, record_limit: int = 1 << 20, dispatched: int | None = None
) -> tuple[Journal, StreamWriter]:
    journal = await MemoryProvider(f"steps-{uuid.uuid4()}").journals.open("stream")
    writer = StreamWriter(
        journal,
        PartitionStream("s", journal, next_offset=0),
        EventBus(),
        StreamTail(0, 0, 0, frozenset()),
        clock=lambda: datetime.now(UTC),
        batch_limit=100,
        record_limit=record_limit,
        progress_interval=0.05,
        retry_max_delay=1.0,
        dispatched=None if dispatched is None else (lambda _position: dispatched),
    )
    return journal, writer


def step(instance: str, *, root: bytes | None = None) -> ProcessStep:
    return ProcessStep(
        handler_key=H,
        instance_id=instance,
        deliveries=(str(uuid.uuid4()),),
        positions=(("stream-a", 1),),
        root=root,
    )


async def test_steps_commit_in_the_next_record_beside_commands() -> None:
    journal, writer = await stream_writer(dispatched=0)
    landed: list[tuple[str, int, int]] = []

    def durable(item: Publication) -> None:
        assert item.error is None
        landed.append((item.command_id, item.position, item.index))

    writer.enqueue("c1", (), durable)
    s1 = writer.enqueue_step(step("i1"), durable)
    writer.enqueue("c2", (), durable)
    s2 = writer.enqueue_step(step("i2", root=b"r"), durable)
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        with anyio.fail_after(5):
            await s2.wait_settled()
        tg.cancel_scope.cancel()
    assert s1.settled
    record = decode_stream_record(await journal.get(0))
    assert record.command_ids == ("c1", "c2")
    assert [s.instance_id for s in record.steps] == ["i1", "i2"]
    assert record.steps[1].root == b"r"
    assert record.dispatched == 0
    assert landed == [("c1", 0, 0), ("i1", 0, 0), ("c2", 0, 1), ("i2", 0, 1)]


async def test_the_record_bound_counts_steps() -> None:
    journal, writer = await stream_writer(record_limit=8_000)
    big = [writer.enqueue_step(step(f"i{i}", root=b"x" * 3_000)) for i in range(4)]
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        with anyio.fail_after(5):
            await big[-1].wait_settled()
        tg.cancel_scope.cancel()
    positions = [p.position for p in big]
    assert positions == sorted(positions)
    assert len(set(positions)) >= 2  # split: no record over the limit
    for position in set(positions):
        data = await journal.get(position)
        assert len(data) <= 8_000
        assert decode_stream_record(data).steps


async def test_records_carry_no_dispatched_watermark_without_a_dispatcher() -> None:
    journal, writer = await stream_writer()
    item = writer.enqueue_step(step("i1"))
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        with anyio.fail_after(5):
            await item.wait_settled()
        tg.cancel_scope.cancel()
    assert decode_stream_record(await journal.get(0)).dispatched is None
