"""Where following a partition's stream journal starts (``cluster.following``)."""

from __future__ import annotations

import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from runkit.engine.cluster import following
from runkit.engine.streams import StreamRecord, encode_stream_record
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import Deposited, setup

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class _CountingGets:
    """A journal that counts its ``get`` calls."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.gets = 0

    async def get(self, position: int) -> bytes:
        self.gets += 1
        return bytes(await self._inner.get(position))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def _journal(count: int, *, truncate_to: int = 0) -> Any:
    journal = await MemoryProvider(f"following-{uuid.uuid4()}").journals.open("stream")
    for i in range(count):
        record = StreamRecord(
            first_offset=0,
            inbox_position=0,
            inbox_end=0,
            written_at=T0 + timedelta(seconds=i),
            writer="w",
        )
        await journal.append(i, encode_stream_record(record))
    if truncate_to:
        await journal.truncate(truncate_to)
    return _CountingGets(journal)


@pytest.mark.parametrize(
    ("count", "since", "start"),
    [
        (0, 5, 0),  # empty
        (10, 0, 0),  # everything is recent
        (10, 4, 4),
        (10, 9, 9),
        (10, 10, 10),  # nothing is
        (5_000, 4_500, 4_500),
        (5_000, 100, 4_000),  # no further back than MAX_LOOKBACK
    ],
)
async def test_following_starts_at_the_first_record_written_since(
    count: int, since: int, start: int
) -> None:
    journal = await _journal(count)
    assert await following._start(journal, T0 + timedelta(seconds=since)) == start
    # By bisection: it read the records back one by one (up to 1,000 reads).
    assert journal.gets <= 11


async def test_following_starts_within_what_truncation_left() -> None:
    journal = await _journal(20, truncate_to=12)
    assert await following._start(journal, T0) == 12
    assert await following._start(journal, T0 + timedelta(seconds=15)) == 15


async def test_following_closes_the_journal_range_when_the_observer_leaves() -> None:
    # A range left to the collector part-way (the observer gone) was finalised
    # outside its task: on trio, "Exception ignored in: <async_generator
    # _DynamoJournal.range>" failed a cluster test on DynamoDB.
    import anyio

    from runkit.engine.cluster.following import follow_chain
    from runkit.engine.envelope import new_envelope, register_types

    register_types(setup().config.message_types())
    closed: list[bool] = []
    inner = (await _journal(0))._inner
    record = StreamRecord(
        first_offset=0,
        inbox_position=0,
        inbox_end=0,
        written_at=datetime.now(UTC),
        writer="w",
        events=(
            new_envelope(
                Deposited("acc", 1, 1),
                app_key="c0000000-0000-4000-8000-000000000001",
                site_key=None,
                created_at=datetime.now(UTC),
            ),
        ),
        command_ids=(),
    )
    for i in range(3):
        await inner.append(i, encode_stream_record(record))

    class Journal:
        async def __aenter__(self) -> Journal:
            return self

        async def __aexit__(self, *exc: object) -> None:
            pass

        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        async def range(self, position: int) -> Any:
            records = inner.range(position)
            try:
                async for item in records:
                    yield item
            finally:
                closed.append(True)
                await records.aclose()

    class Journals:
        async def open(self, name: str) -> Journal:
            return Journal()

    class Provider:
        journals = Journals()

    send, receive = anyio.create_memory_object_stream[Any](0)
    receive.close()  # the observer has left: the first event ends following
    correlation = record.events[0].correlation_id
    with send, anyio.fail_after(5):
        await follow_chain(
            Provider(),  # type: ignore[arg-type]
            "c0000000-0000-4000-8000-000000000001",
            0,
            correlation,
            send,
            since=datetime.now(UTC) - timedelta(minutes=1),
        )
    assert closed == [True]
