"""The takeover scan (``read_tail``) reads the stream backwards in growing pages.

It must find exactly what a scan reading one record per round trip finds (the
reference below), on any journal, and read a long stretch in a few calls.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

import pytest

from runkit.engine.streams import (
    StreamRecord,
    StreamTail,
    decode_stream_record,
    encode_stream_record,
    read_tail,
)
from runkit.persistence import Journal, RecordNotFound
from runkit_memory import MemoryProvider


async def _reference(journal: Journal) -> StreamTail:
    """The scan as a record-per-call loop (the specification of ``read_tail``)."""
    bounds = await journal.bounds()
    if bounds.is_empty:
        return StreamTail(bounds.end, 0, 0, frozenset())
    last = decode_stream_record(await journal.get(bounds.end - 1))
    published: set[str] = set()
    unmarked: set[str] = set()
    poisoned: set[tuple[int, str]] = set()
    floor = bounds.end if last.scan_from is None else last.scan_from
    position, record, above = bounds.end - 1, last, None
    while True:
        if record.inbox_end <= last.inbox_position and position < floor:
            if record.writer != above:
                published.update(record.command_ids)
                poisoned.update(record.poisoned)
            break
        published.update(record.command_ids)
        poisoned.update(record.poisoned)
        unmarked.update(record.unmarked)
        above = record.writer
        position -= 1
        if position < bounds.begin:
            break
        try:
            record = decode_stream_record(await journal.get(position))
        except RecordNotFound:
            break
    return StreamTail(
        bounds.end,
        last.first_offset + len(last.events),
        last.inbox_position,
        frozenset(published),
        last.materialised,
        frozenset(unmarked),
        last.scan_from,
        last.inbox_end,
        frozenset(poisoned),
    )


class _Counting:
    """A journal that counts the calls made to it."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self.calls: Counter[str] = Counter()
        self.name = journal.name

    async def bounds(self) -> Any:
        self.calls["bounds"] += 1
        return await self._journal.bounds()

    async def get(self, position: int) -> bytes:
        self.calls["get"] += 1
        return await self._journal.get(position)

    async def range(self, position: int) -> AsyncIterator[tuple[int, bytes]]:
        self.calls["range"] += 1
        async with aclosing(self._journal.range(position)) as records:  # type: ignore[type-var]
            async for item in records:
                yield item


async def _journal(records: list[StreamRecord], *, truncate: int = 0) -> Journal:
    journal = await MemoryProvider(f"tail-{uuid.uuid4()}").journals.open("stream")
    for position, record in enumerate(records):
        await journal.append(position, encode_stream_record(record))
    if truncate:
        await journal.truncate(truncate)
    return journal


def _records(rng: random.Random, count: int) -> list[StreamRecord]:
    records = []
    inbox_position = inbox_end = 0
    writer = "w0"
    for i in range(count):
        if rng.random() < 0.1:
            writer = f"w{i}"
        inbox_end = max(0, inbox_end + rng.randint(-2, 4))  # not always monotone
        inbox_position = min(inbox_end, inbox_position + rng.randint(0, 3))
        records.append(
            StreamRecord(
                first_offset=0,
                inbox_position=inbox_position,
                inbox_end=inbox_end,
                written_at=datetime.now(UTC),
                writer=writer,
                command_ids=tuple(f"c{i}-{j}" for j in range(rng.randint(0, 2))),
                unmarked=(f"u{i}",) if rng.random() < 0.1 else (),
                scan_from=rng.randint(0, i) if rng.random() < 0.2 else None,
                poisoned=((inbox_position, f"p{i}"),) if rng.random() < 0.1 else (),
            )
        )
    return records


@pytest.mark.parametrize("seed", range(40))
async def test_the_scan_finds_what_a_record_by_record_scan_finds(seed: int) -> None:
    rng = random.Random(seed)
    count = rng.randint(1, 120)
    records = _records(rng, count)
    truncate = rng.randint(0, count - 1) if rng.random() < 0.3 else 0
    journal = await _journal(records, truncate=truncate)
    assert await read_tail(journal) == await _reference(journal)
    await journal.close()


def _one_command_records(inbox_position: int, inbox_ends: list[int]) -> list[StreamRecord]:
    """Records of one command each (``c<i>``), with the given ``inbox_end``s."""
    return [
        StreamRecord(
            first_offset=0,
            inbox_position=inbox_position,
            inbox_end=end,
            written_at=datetime.now(UTC),
            writer="w",
            command_ids=(f"c{i}",),
        )
        for i, end in enumerate(inbox_ends)
    ]


async def _scan(records: list[StreamRecord]) -> tuple[StreamTail, Counter[str]]:
    """``read_tail`` over a journal of *records*, and the calls it made."""
    inner = await _journal(records)
    journal = _Counting(inner)
    tail = await read_tail(journal)  # type: ignore[arg-type]
    await inner.close()
    return tail, journal.calls


async def test_a_long_scan_reads_in_few_calls() -> None:
    # An inbox command at 0 stays pending while 3,000 records are committed.
    tail, calls = await _scan(_one_command_records(0, list(range(1, 3001))))
    assert tail.published == {f"c{i}" for i in range(3000)}
    # The last record, four more one by one, then pages of 8, 16, ... 256.
    assert calls["get"] == 5
    assert calls["range"] <= 16, calls


async def test_a_scan_of_a_few_records_reads_them_one_by_one() -> None:
    # Most scans stop within a record or two: a page would read more than that.
    tail, calls = await _scan(_one_command_records(5, [5] * 97 + [6] * 3))
    assert tail.published == {"c97", "c98", "c99"}
    assert calls["get"] == 4
    assert calls["range"] == 0


async def test_a_short_scan_reads_one_record() -> None:
    tail, calls = await _scan(_one_command_records(5, [5] * 100))
    assert tail.published == {"c99"}
    assert calls["get"] == 1
    assert calls["range"] == 0
