"""Journal helpers: first_record, last_record, append_with_conflict_resolution, search."""

from collections.abc import AsyncIterator, Callable

import pytest

from runkit.persistence import (
    Conflict,
    Interval,
    Journal,
    RecordNotFound,
    append_with_conflict_resolution,
    first_record,
    last_record,
    search,
)
from runkit_memory import MemoryProvider


@pytest.fixture
async def journal() -> AsyncIterator[Journal]:
    async with MemoryProvider() as provider, await provider.journals.open("j") as journal:
        yield journal


class TruncatingJournal(Journal):
    """Truncates its inner journal to *to* just before the first ``get``: a lost race."""

    def __init__(self, inner: Journal, to: int) -> None:
        self.inner = inner
        self.to = to
        self.gets = 0

    @property
    def name(self) -> str:
        return self.inner.name

    async def close(self) -> None:
        await self.inner.close()

    async def bounds(self) -> Interval:
        return await self.inner.bounds()

    async def get(self, pos: int) -> bytes:
        self.gets += 1
        if self.gets == 1:
            await self.inner.truncate(self.to)
        return await self.inner.get(pos)

    def range(self, pos: int) -> AsyncIterator[tuple[int, bytes]]:
        return self.inner.range(pos)

    async def append(self, pos: int, record: bytes) -> None:
        await self.inner.append(pos, record)

    async def truncate(self, pos: int) -> None:
        await self.inner.truncate(pos)


async def _fill(journal: Journal, records: list[bytes]) -> None:
    for position, record in enumerate(records):
        await journal.append(position, record)


async def test_first_and_last_record_of_empty_journal_are_none(journal: Journal) -> None:
    assert await first_record(journal) is None
    assert await last_record(journal) is None
    await _fill(journal, [b"a"])
    await journal.truncate(1)
    assert await first_record(journal) is None
    assert await last_record(journal) is None


async def test_first_and_last_record_follow_truncation(journal: Journal) -> None:
    await _fill(journal, [b"a", b"b", b"c"])
    assert await first_record(journal) == (0, b"a")
    assert await last_record(journal) == (2, b"c")
    await journal.truncate(2)
    assert await first_record(journal) == (2, b"c")
    assert await last_record(journal) == (2, b"c")


async def test_first_record_retries_when_truncated_under_it(journal: Journal) -> None:
    await _fill(journal, [b"a", b"b", b"c"])
    racing = TruncatingJournal(journal, to=1)
    assert await first_record(racing) == (1, b"b")
    assert racing.gets == 2


async def test_last_record_retries_when_everything_is_truncated_under_it(
    journal: Journal,
) -> None:
    await _fill(journal, [b"a", b"b"])
    racing = TruncatingJournal(journal, to=2)
    assert await last_record(racing) is None
    assert racing.gets == 1


async def test_append_with_conflict_resolution_without_conflict(journal: Journal) -> None:
    async def resolve(position: int) -> int:
        raise AssertionError("no conflict expected")

    assert await append_with_conflict_resolution(journal, 0, b"a", resolve) == 1
    assert await journal.get(0) == b"a"


async def test_append_with_conflict_resolution_retries_where_resolver_says(
    journal: Journal,
) -> None:
    await _fill(journal, [b"x", b"y"])
    conflicts: list[int] = []

    async def resolve(position: int) -> int:
        conflicts.append(position)
        return position + 1

    assert await append_with_conflict_resolution(journal, 0, b"z", resolve) == 3
    assert conflicts == [0, 1]
    assert await journal.get(2) == b"z"


async def test_append_with_conflict_resolution_gives_up_when_resolver_raises(
    journal: Journal,
) -> None:
    await _fill(journal, [b"x"])

    async def resolve(position: int) -> int:
        raise Conflict.journal(journal.name, position)

    with pytest.raises(Conflict, match=r"^journal 'j': conflict appending at position 0$"):
        await append_with_conflict_resolution(journal, 0, b"z", resolve)
    assert await journal.bounds() == Interval(0, 1)


async def test_search_finds_matching_record_in_logarithmic_reads(journal: Journal) -> None:
    await _fill(journal, [bytes([value]) for value in range(0, 200, 2)])
    reads: list[int] = []

    def compare_to(target: int) -> Callable[[int, bytes], int]:
        def compare(position: int, record: bytes) -> int:
            reads.append(position)
            return record[0] - target

        return compare

    assert await search(journal, compare_to(84)) == (42, bytes([84]))
    assert len(reads) <= 7
    assert await search(journal, compare_to(0)) == (0, b"\x00")
    assert await search(journal, compare_to(198)) == (99, bytes([198]))
    assert await search(journal, compare_to(85)) is None
    assert await search(journal, compare_to(84), begin=50) is None
    assert await search(journal, compare_to(84), begin=10, end=43) == (42, bytes([84]))


async def test_search_of_empty_journal_is_none(journal: Journal) -> None:
    assert await search(journal, lambda position, record: 0) is None


async def test_search_below_begin_raises_record_not_found(journal: Journal) -> None:
    await _fill(journal, [b"a", b"b", b"c", b"d"])
    await journal.truncate(2)
    with pytest.raises(RecordNotFound):
        await search(journal, lambda position, record: 1, begin=0, end=2)


def test_interval_unpacks_as_begin_then_end() -> None:
    begin, end = Interval(3, 7)
    assert (begin, end) == (3, 7)
    assert tuple(Interval(0, 0)) == (0, 0)
    interval = Interval(3, 7)
    assert (interval.begin, interval.end) == (3, 7)
    assert interval == Interval(3, 7)
    assert interval != Interval(3, 8)
    assert len(interval) == 4
    assert 3 in interval
    assert 7 not in interval


async def test_bounds_unpack(journal: Journal) -> None:
    await _fill(journal, [b"a", b"b", b"c"])
    await journal.truncate(1)
    begin, end = await journal.bounds()
    assert (begin, end) == (1, 3)
