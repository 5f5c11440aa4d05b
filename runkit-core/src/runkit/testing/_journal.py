"""Contract tests for ``Journal`` (the counterpart of persistencekit's journaltest)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from functools import partial
from typing import ClassVar

import anyio
import anyio.lowlevel
import pytest

from runkit.persistence import (
    MAX_POSITION,
    Conflict,
    Interval,
    Journal,
    PersistenceError,
    Provider,
    RecordNotFound,
    append_with_conflict_resolution,
)

from ._machines import run_journal_machine
from ._support import (
    RACERS,
    ROUNDS,
    SuiteBase,
    cancel_call,
    gather,
    landed_after_cancel,
    unique_name,
)
from .faults import AFTER, BEFORE, FaultPlan, FaultyProvider, InjectedFault

__all__ = ["JournalSuite"]


def _record(position: int) -> bytes:
    return f"<record-{position}>".encode()


async def _fill(journal: Journal, count: int, start: int = 0) -> None:
    for position in range(start, start + count):
        await journal.append(position, _record(position))


async def _collect(journal: Journal, position: int) -> list[tuple[int, bytes]]:
    return [item async for item in journal.range(position)]


async def _assert_range_is_exact(journal: Journal, start: int, end: int) -> None:
    """Check that ``range(start)`` yields each position of ``[start, end)`` once, in order."""
    items = await _collect(journal, start)
    positions = [position for position, _ in items]
    expected = list(range(start, end))
    if positions != expected:
        at = next(
            (i for i, (p, e) in enumerate(zip(positions, expected, strict=False)) if p != e),
            min(len(positions), len(expected)),
        )
        pytest.fail(
            f"range({start}) of a journal of {end} records yielded {len(positions)} "
            f"records; after {positions[max(0, at - 2) : at]} came {positions[at : at + 3]}, "
            f"not {expected[at : at + 3]}: a record was repeated or skipped where one page "
            "of the range ends and the next begins"
        )
    for position, record in items:
        assert record == _record(position), f"range({start}): wrong record at {position}"


class JournalSuite(SuiteBase):
    """Contract tests for journals: subclass and supply a ``provider`` fixture.

    An optional ``make_provider`` fixture enables the cross-provider tests.

    ``range_overtaking_records`` is how many records the truncation-overtakes-range
    test writes: more than one page of the driver's ``range``, so that the
    iterator must read the backend again after the truncation. The test first
    ranges over them whole, so that a page boundary that repeats or skips a
    record shows.
    """

    range_overtaking_records: ClassVar[int] = 520

    @pytest.fixture
    def journal_name(self) -> str:
        return unique_name("journal")

    @pytest.fixture
    async def journal(self, provider: Provider, journal_name: str) -> AsyncIterator[Journal]:
        async with await provider.journals.open(journal_name) as journal:
            yield journal

    # -- open ------------------------------------------------------------------------------

    async def test_journal_opened_twice_shares_data(
        self, provider: Provider, journal: Journal, journal_name: str
    ) -> None:
        async with await provider.journals.open(journal_name) as again:
            assert again.name == journal_name
            await journal.append(0, b"<first>")
            assert await again.get(0) == b"<first>"
            await again.append(1, b"<second>")
            assert await journal.get(1) == b"<second>"
            assert await journal.bounds() == Interval(0, 2)

    async def test_journal_handle_close_is_idempotent_and_leaves_others_usable(
        self, provider: Provider, journal: Journal, journal_name: str
    ) -> None:
        other = await provider.journals.open(journal_name)
        await other.close()
        await other.close()
        await journal.append(0, b"<still usable>")
        assert await journal.get(0) == b"<still usable>"

    # -- bounds ----------------------------------------------------------------------------

    async def test_journal_bounds_of_fresh_journal_are_empty_at_zero(
        self, journal: Journal
    ) -> None:
        bounds = await journal.bounds()
        assert bounds == Interval(0, 0)
        assert bounds.is_fresh
        assert bounds.is_empty

    async def test_journal_bounds_follow_appends_and_truncation(self, journal: Journal) -> None:
        await _fill(journal, 10)
        assert await journal.bounds() == Interval(0, 10)
        await journal.truncate(5)
        assert await journal.bounds() == Interval(5, 10)
        begin, end = await journal.bounds()
        assert (begin, end) == (5, 10)
        await journal.truncate(10)
        bounds = await journal.bounds()
        assert bounds == Interval(10, 10)
        assert bounds.is_empty
        assert not bounds.is_fresh

    async def test_journal_methods_take_pos_by_keyword(self, journal: Journal) -> None:
        # The contract names the parameter ``pos``: keyword calls must work.
        await journal.append(pos=0, record=b"<zero>")
        await journal.append(pos=1, record=b"<one>")
        assert await journal.get(pos=1) == b"<one>"
        assert [item async for item in journal.range(pos=0)] == [(0, b"<zero>"), (1, b"<one>")]
        await journal.truncate(pos=1)
        assert await journal.bounds() == Interval(1, 2)

    # -- get -------------------------------------------------------------------------------

    async def test_journal_get_unwritten_position_raises_record_not_found(
        self, journal: Journal, journal_name: str
    ) -> None:
        with pytest.raises(RecordNotFound) as info:
            await journal.get(1)
        assert str(info.value) == f"journal {journal_name!r}: no record at position 1"
        assert (info.value.name, info.value.position) == (journal_name, 1)
        await journal.append(0, b"<zero>")
        with pytest.raises(RecordNotFound):
            await journal.get(1)

    async def test_journal_get_returns_each_of_fifteen_records(self, journal: Journal) -> None:
        # More than ten, so a backend sorting positions as strings would fail.
        await _fill(journal, 15)
        for position in range(15):
            record = await journal.get(position)
            assert type(record) is bytes
            assert record == _record(position)

    @pytest.mark.parametrize("truncate_to", [3, 5], ids=["partial", "full"])
    async def test_journal_get_truncated_position_raises_record_not_found(
        self, journal: Journal, truncate_to: int
    ) -> None:
        await _fill(journal, 5)
        await journal.truncate(truncate_to)
        for position in range(truncate_to):
            with pytest.raises(RecordNotFound, match=rf"no record at position {position}$"):
                await journal.get(position)
        for position in range(truncate_to, 5):
            assert await journal.get(position) == _record(position)

    @pytest.mark.parametrize(
        "position", [-1, MAX_POSITION, 2**63, 2**64 - 1], ids=["-1", "max", "2^63", "2^64-1"]
    )
    async def test_journal_get_out_of_range_position_raises_record_not_found(
        self, journal: Journal, position: int
    ) -> None:
        await _fill(journal, 2)
        with pytest.raises(RecordNotFound, match=rf"no record at position {position}$"):
            await journal.get(position)

    # -- range -----------------------------------------------------------------------------

    async def test_journal_range_yields_records_from_position_to_end(
        self, journal: Journal
    ) -> None:
        await _fill(journal, 15)
        items = await _collect(journal, 10)
        assert items == [(p, _record(p)) for p in range(10, 15)]
        assert all(type(record) is bytes for _, record in items)
        assert await _collect(journal, 0) == [(p, _record(p)) for p in range(15)]

    async def test_journal_range_stops_when_consumer_breaks_and_journal_stays_usable(
        self, journal: Journal
    ) -> None:
        await _fill(journal, 10)
        seen = []
        async with aclosing(journal.range(2)) as records:  # type: ignore[type-var]
            async for position, _ in records:
                seen.append(position)
                if position == 4:
                    break
        assert seen == [2, 3, 4]
        await journal.append(10, b"<after break>")
        assert await journal.get(10) == b"<after break>"
        assert len(await _collect(journal, 0)) == 11

    async def test_journal_range_of_empty_journal_raises_record_not_found(
        self, journal: Journal, journal_name: str
    ) -> None:
        with pytest.raises(RecordNotFound) as info:
            await _collect(journal, 0)
        assert str(info.value) == f"journal {journal_name!r}: no record at position 0"

    async def test_journal_range_from_truncated_position_raises_record_not_found(
        self, journal: Journal
    ) -> None:
        await _fill(journal, 5)
        await journal.truncate(3)
        with pytest.raises(RecordNotFound, match=r"no record at position 2$"):
            await _collect(journal, 2)
        assert await _collect(journal, 3) == [(3, _record(3)), (4, _record(4))]

    @pytest.mark.parametrize(
        "position", [5, 6, MAX_POSITION, 2**64 - 1], ids=["end", "past-end", "max", "2^64-1"]
    )
    async def test_journal_range_from_position_not_yet_written_raises_record_not_found(
        self, journal: Journal, position: int
    ) -> None:
        await _fill(journal, 5)
        with pytest.raises(RecordNotFound, match=rf"no record at position {position}$"):
            await _collect(journal, position)

    async def test_journal_range_tolerates_appends_during_iteration(self, journal: Journal) -> None:
        await _fill(journal, 3)
        seen = []
        async for position, record in journal.range(0):
            seen.append((position, record))
            if position == 0:
                await journal.append(3, _record(3))
        # A record appended mid-range may or may not be seen, but the prefix is exact.
        assert seen[:3] == [(p, _record(p)) for p in range(3)]
        assert len(seen) in (3, 4)

    async def test_journal_range_overtaken_by_truncation_raises_record_not_found(
        self, journal: Journal
    ) -> None:
        # A truncation past the iteration's next position must surface as
        # RecordNotFound when the iterator next reads the backend: it must not
        # skip to the new begin (a gap) nor end quietly as if at the end.
        # Records already fetched in a page may still be yielded, so the journal
        # is longer than one page (see ``range_overtaking_records``).
        count = self.range_overtaking_records
        await _fill(journal, count)
        # First, on the same journal (filling it is slow on some backends), whole
        # ranges over several pages: one that repeats or skips a record where a
        # page ends and the next begins (an inclusive keyset bound, an
        # off-by-one offset) shows, from the start and from a position aligned
        # with no page size.
        for start in (0, count // 2 + 1, count - 1):
            await _assert_range_is_exact(journal, start, count)
        truncate_to = count - 2
        seen: list[int] = []

        async def consume() -> None:
            async with aclosing(journal.range(0)) as records:  # type: ignore[type-var]
                async for position, record in records:
                    assert position == len(seen), f"range skipped from {len(seen)} to {position}"
                    assert record == _record(position)
                    seen.append(position)
                    if position == 0:
                        await journal.truncate(truncate_to)

        with pytest.raises(RecordNotFound) as info:
            await consume()
        assert info.value.position == len(seen), (
            f"RecordNotFound names position {info.value.position}, "
            f"but the iteration stopped after {len(seen)} records"
        )
        assert len(seen) < truncate_to
        assert await _collect(journal, truncate_to) == [
            (p, _record(p)) for p in range(truncate_to, count)
        ]

    # -- append ----------------------------------------------------------------------------

    async def test_journal_append_at_end_succeeds(self, journal: Journal) -> None:
        await journal.append(0, b"<zero>")
        await journal.append(1, b"")  # empty records are allowed
        assert await journal.get(0) == b"<zero>"
        assert await journal.get(1) == b""
        assert await journal.bounds() == Interval(0, 2)

    async def test_journal_append_at_occupied_position_raises_conflict_and_keeps_original(
        self, journal: Journal, journal_name: str
    ) -> None:
        await _fill(journal, 2)
        with pytest.raises(Conflict) as info:
            await journal.append(1, b"<intruder>")
        assert str(info.value) == f"journal {journal_name!r}: conflict appending at position 1"
        assert (info.value.store, info.value.name, info.value.position) == (
            "journal",
            journal_name,
            1,
        )
        assert await journal.get(1) == _record(1)
        assert await journal.bounds() == Interval(0, 2)

    async def test_journal_append_at_truncated_position_raises_conflict(
        self, journal: Journal
    ) -> None:
        await _fill(journal, 3)
        await journal.truncate(3)
        for position in range(3):
            with pytest.raises(Conflict, match=rf"conflict appending at position {position}$"):
                await journal.append(position, b"<resurrected>")
            with pytest.raises(RecordNotFound):
                await journal.get(position)
        assert await journal.bounds() == Interval(3, 3)

    async def test_journal_append_past_end_raises_conflict(self, journal: Journal) -> None:
        await _fill(journal, 2)
        with pytest.raises(Conflict, match=r"conflict appending at position 3$"):
            await journal.append(3, b"<gap>")
        assert await journal.bounds() == Interval(0, 2)

    async def test_journal_records_are_stored_byte_for_byte(self, journal: Journal) -> None:
        # NUL, bytes that are not UTF-8, and empty records (the first of them at
        # the start of a range): a driver storing text or C strings mangles them.
        records = [b"", b"\x00", b"a\x00b", b"\xff\xfe\x80", b"", bytes(range(256)), b"a\x00"]
        for position, record in enumerate(records):
            await journal.append(position, record)
        for position, record in enumerate(records):
            assert await journal.get(position) == record
        assert await _collect(journal, 0) == list(enumerate(records))
        assert await _collect(journal, 4) == list(enumerate(records))[4:]

    async def test_journal_append_keeps_no_reference_to_callers_buffer(
        self, journal: Journal
    ) -> None:
        buffer = bytearray(b"<original>")
        await journal.append(0, buffer)  # type: ignore[arg-type]  # bytes-like is accepted
        buffer[:] = b"<mutated!>"
        record = await journal.get(0)
        assert record == b"<original>"
        assert type(record) is bytes

    async def test_journal_append_accepts_memoryview(self, journal: Journal) -> None:
        await journal.append(0, memoryview(b"<view>"))  # type: ignore[arg-type]
        assert await journal.get(0) == b"<view>"

    async def test_journal_records_of_different_journals_are_isolated(
        self, provider: Provider, journal: Journal
    ) -> None:
        async with await provider.journals.open(unique_name("journal")) as other:
            await journal.append(0, b"<mine>")
            assert await other.bounds() == Interval(0, 0)
            await other.append(0, b"<theirs>")
            assert await journal.get(0) == b"<mine>"
            assert await other.get(0) == b"<theirs>"

    @pytest.mark.parametrize("position", [-1, 2**63], ids=["negative", "2^63"])
    async def test_journal_append_at_invalid_position_raises_value_error(
        self, journal: Journal, position: int
    ) -> None:
        with pytest.raises(ValueError, match=rf"position {position} is outside \[0, 2\*\*63-1\]"):
            await journal.append(position, b"<x>")
        assert await journal.bounds() == Interval(0, 0)

    # -- truncate --------------------------------------------------------------------------

    async def test_journal_truncate_moves_begin(self, journal: Journal) -> None:
        await _fill(journal, 3)
        await journal.truncate(1)
        assert await journal.bounds() == Interval(1, 3)
        assert await _collect(journal, 1) == [(1, _record(1)), (2, _record(2))]

    async def test_journal_truncate_everything_then_again_is_harmless(
        self, journal: Journal
    ) -> None:
        await _fill(journal, 3)
        await journal.truncate(3)
        assert await journal.bounds() == Interval(3, 3)
        await journal.truncate(3)
        await journal.truncate(1)  # below begin: a no-op
        assert await journal.bounds() == Interval(3, 3)
        await journal.append(3, _record(3))
        assert await journal.bounds() == Interval(3, 4)
        assert await journal.get(3) == _record(3)

    async def test_journal_truncate_at_zero_on_fresh_journal_is_a_no_op(
        self, journal: Journal
    ) -> None:
        await journal.truncate(0)
        assert await journal.bounds() == Interval(0, 0)

    async def test_journal_truncate_past_end_raises_value_error_and_changes_nothing(
        self, journal: Journal
    ) -> None:
        await _fill(journal, 2)
        with pytest.raises(ValueError, match=r"\b3\b"):
            await journal.truncate(3)
        assert await journal.bounds() == Interval(0, 2)
        assert await journal.get(0) == _record(0)

    # -- visibility across handles and providers ------------------------------------------

    async def test_journal_writes_are_visible_to_other_provider(
        self, journal: Journal, journal_name: str, other_provider: Provider
    ) -> None:
        async with await other_provider.journals.open(journal_name) as other:
            assert await other.bounds() == Interval(0, 0)
            await _fill(journal, 4)
            assert await other.bounds() == Interval(0, 4)
            assert await other.get(3) == _record(3)
            assert await _collect(other, 1) == [(p, _record(p)) for p in range(1, 4)]
            await journal.truncate(2)
            assert await other.bounds() == Interval(2, 4)
            with pytest.raises(RecordNotFound):
                await other.get(1)
            with pytest.raises(RecordNotFound):
                await _collect(other, 1)
            with pytest.raises(Conflict):
                await other.append(1, b"<late>")
            await other.append(4, _record(4))
            assert await journal.get(4) == _record(4)
            await other.truncate(5)
            assert await journal.bounds() == Interval(5, 5)
            with pytest.raises(Conflict):
                await journal.append(4, b"<late>")

    async def test_journal_stale_handle_cannot_append_at_its_stale_end(
        self, provider: Provider, journal: Journal, journal_name: str, other_provider: Provider
    ) -> None:
        # Handle A learns the end; handle B (another provider) appends and
        # truncates everything. A's append at its stale end must conflict, and
        # every append A is told succeeded must be visible to B.
        await _fill(journal, 3)
        assert await journal.bounds() == Interval(0, 3)
        async with await other_provider.journals.open(journal_name) as other:
            await _fill(other, 4, start=3)
            await other.truncate(7)
            for stale in (2, 3, 6):
                with pytest.raises(Conflict):
                    await journal.append(stale, b"<stale>")
            assert await other.bounds() == Interval(7, 7)
            await journal.append(7, _record(7))
            assert await other.get(7) == _record(7)
            assert await _collect(other, 7) == [(7, _record(7))]

    # -- concurrency -----------------------------------------------------------------------

    async def test_journal_racing_appends_at_one_position_have_exactly_one_winner(
        self, journal: Journal, journal_name: str, racing_providers: list[Provider]
    ) -> None:
        # Handles of two providers if the driver has ``make_provider``, else of one.
        handles = [
            await p.journals.open(journal_name)
            for p in racing_providers
            for _ in range(RACERS // (2 * len(racing_providers)))
        ]
        try:
            for position in range(ROUNDS):
                writers = [journal, *handles] * 2

                results = await gather(
                    *(
                        partial(w.append, position, f"<{position}-{i}>".encode())
                        for i, w in enumerate(writers)
                    )
                )
                winners = [i for i, r in enumerate(results) if r is None]
                assert len(winners) == 1, results
                assert all(isinstance(r, Conflict) for r in results if r is not None), results
                assert await journal.get(position) == f"<{position}-{winners[0]}>".encode()
            assert await journal.bounds() == Interval(0, ROUNDS)
        finally:
            for handle in handles:
                await handle.close()

    async def test_journal_concurrent_truncate_and_append_leave_consistent_bounds(
        self, provider: Provider, journal: Journal, journal_name: str
    ) -> None:
        appended: list[int] = []

        async def append_many() -> None:
            async with await provider.journals.open(journal_name) as handle:
                for position in range(20):
                    await handle.append(position, _record(position))
                    appended.append(position)

        async def truncate_repeatedly() -> None:
            async with await provider.journals.open(journal_name) as handle:
                for _ in range(20):
                    bounds = await handle.bounds()
                    await handle.truncate(max(bounds.begin, bounds.end - 2))
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(append_many)
            tg.start_soon(truncate_repeatedly)
        bounds = await journal.bounds()
        assert appended == list(range(20))
        assert bounds.end == 20
        assert bounds.begin <= 18
        assert await _collect(journal, bounds.begin) == [
            (p, _record(p)) for p in range(bounds.begin, 20)
        ]

    # -- faults ----------------------------------------------------------------------------

    async def test_journal_append_after_ambiguous_failure_conflicts_and_reads_back_ours(
        self, provider: Provider, journal_name: str
    ) -> None:
        plan = FaultPlan()
        plan.fail(AFTER, ops={"append"}, nth=2)
        faulty = FaultyProvider(provider, plan)
        journal = await faulty.journals.open(journal_name)
        await journal.append(0, b"<zero>")
        with pytest.raises(InjectedFault) as info:
            await journal.append(1, b"<ours>")
        assert info.value.ambiguous
        assert not info.value.retryable
        with pytest.raises(Conflict):
            await journal.append(1, b"<ours>")
        assert await journal.get(1) == b"<ours>"

        async def resolve(position: int) -> int:
            # The caller's recovery: if the record there is ours, skip past it.
            if await journal.get(position) == b"<ours>":
                return position + 1
            raise AssertionError("unexpected record")  # pragma: no cover

        end = await append_with_conflict_resolution(journal, 1, b"<next>", resolve)
        assert end == 3
        assert await journal.get(2) == b"<next>"
        assert plan.injected_after == 1

    async def test_journal_write_failed_before_it_happens_changes_nothing(
        self, provider: Provider, journal_name: str
    ) -> None:
        plan = FaultPlan()
        plan.fail(BEFORE, ops={"append"}, nth=1)
        plan.fail(BEFORE, ops={"truncate"}, times=1)
        journal = await FaultyProvider(provider, plan).journals.open(journal_name)
        with pytest.raises(PersistenceError) as info:
            await journal.append(0, b"<zero>")
        assert info.value.retryable
        assert await journal.bounds() == Interval(0, 0)
        await journal.append(0, b"<zero>")  # the retry succeeds
        with pytest.raises(InjectedFault, match="before truncate"):
            await journal.truncate(1)
        assert await journal.bounds() == Interval(0, 1)

    async def test_journal_truncate_repeated_after_ambiguous_failure_completes(
        self, provider: Provider, journal_name: str
    ) -> None:
        plan = FaultPlan()
        plan.fail(AFTER, ops={"truncate"}, nth=1)
        journal = await FaultyProvider(provider, plan).journals.open(journal_name)
        await _fill(journal, 4)
        with pytest.raises(InjectedFault, match="after truncate"):
            await journal.truncate(3)
        await journal.truncate(3)
        assert await journal.bounds() == Interval(3, 4)
        with pytest.raises(RecordNotFound):
            await journal.get(2)

    # -- cancellation ----------------------------------------------------------------------

    @pytest.mark.parametrize("when", ["before", "in-flight"])
    async def test_journal_cancelled_append_lands_whole_or_not_at_all(
        self, provider: Provider, journal: Journal, journal_name: str, when: str
    ) -> None:
        # A caller's timeout (an anyio cancel scope) must leave neither a torn
        # record nor a handle or provider that no longer works.
        for position in range(3):
            record = _record(position) * 64
            cancelled = await cancel_call(when, partial(journal.append, position, record))
            bounds = await journal.bounds()
            assert bounds.end in (position, position + 1), bounds
            if bounds.end == position:
                assert cancelled, "append returned normally but its record is missing"
                try:
                    await journal.append(position, record)
                except Conflict:
                    pytest.fail(landed_after_cancel(f"append at position {position}"))
            assert await journal.get(position) == record
        assert await _collect(journal, 0) == [(p, _record(p) * 64) for p in range(3)]
        async with await provider.journals.open(journal_name) as again:
            assert await again.bounds() == Interval(0, 3)
            await again.append(3, _record(3))
        assert await journal.get(3) == _record(3)

    async def test_journal_cancelled_append_racing_others_never_lands_after_it_returned(
        self, provider: Provider
    ) -> None:
        # A driver may carry concurrent appends in one request (runkit-postgres
        # groups them into one statement). Cancelling one caller, while the
        # others are not, must not leave its append running on their behalf,
        # to land after its call returned. Half the callers are cancelled, at
        # times spread over a round of appends, so some are cancelled while
        # queued, some while another's request carries their append.
        size = min(provider.limits.max_record_bytes, 128 * 1024)
        journals = [await provider.journals.open(unique_name("journal")) for _ in range(RACERS)]

        def record(position: int) -> bytes:
            return _record(position) * (size // len(_record(position)))

        returned: dict[int, Interval] = {}  # victims' bounds when their call returned

        async def append(index: int, position: int) -> None:
            try:
                await journals[index].append(position, record(position))
            except PersistenceError as exc:  # carried by a cancelled caller's request
                if not exc.retryable:
                    raise

        async def victim(index: int, position: int, timeout: float) -> None:
            with anyio.move_on_after(timeout) as scope:
                await append(index, position)
            if scope.cancelled_caught:
                returned[index] = await journals[index].bounds()

        async def bystander(index: int, position: int, timeout: float) -> None:
            await append(index, position)

        try:
            started = anyio.current_time()
            for result in await gather(*[partial(j.append, 0, record(0)) for j in journals]):
                assert result is None, result
            duration = anyio.current_time() - started
            for position in range(1, ROUNDS + 1):
                returned.clear()
                async with anyio.create_task_group() as tg:
                    for index in range(RACERS):
                        call = victim if index % 2 else bystander
                        tg.start_soon(call, index, position, duration * index / RACERS)
                for index, bounds in returned.items():
                    assert bounds.end in (position, position + 1), bounds
                    if await journals[index].bounds() != bounds:
                        pytest.fail(landed_after_cancel(f"append at position {position}"))
                for journal in journals:  # every journal at the same end for the next round
                    if (await journal.bounds()).end == position:
                        await journal.append(position, record(position))
                    assert await journal.get(position) == record(position)
        finally:
            with anyio.CancelScope(shield=True):
                for journal in journals:
                    await journal.close()

    @pytest.mark.parametrize("when", ["before", "in-flight"])
    async def test_journal_cancelled_reads_leave_handle_usable(
        self, journal: Journal, when: str
    ) -> None:
        await _fill(journal, 3)

        async def first_of_range() -> None:
            async with aclosing(journal.range(1)) as records:  # type: ignore[type-var]
                async for _ in records:
                    await anyio.sleep(10)  # cancelled here if the fetch was not

        for _ in range(2):
            await cancel_call(when, journal.bounds)
            await cancel_call(when, partial(journal.get, 1))
            await cancel_call(when, first_of_range)
        assert await journal.bounds() == Interval(0, 3)
        assert await journal.get(1) == _record(1)
        assert await _collect(journal, 0) == [(p, _record(p)) for p in range(3)]
        await journal.append(3, _record(3))
        assert await journal.get(3) == _record(3)

    # -- closed ----------------------------------------------------------------------------

    async def test_journal_closed_handle_raises(
        self, provider: Provider, journal_name: str
    ) -> None:
        journal = await provider.journals.open(journal_name)
        await journal.append(0, b"<zero>")
        await journal.close()
        with pytest.raises(PersistenceError, match="closed"):
            await journal.bounds()
        with pytest.raises(PersistenceError, match="closed"):
            await journal.get(0)
        with pytest.raises(PersistenceError, match="closed"):
            await _collect(journal, 0)
        with pytest.raises(PersistenceError, match="closed"):
            await journal.append(1, b"<one>")
        with pytest.raises(PersistenceError, match="closed"):
            await journal.truncate(1)
        async with await provider.journals.open(journal_name) as again:
            assert await again.bounds() == Interval(0, 1)

    # -- model-based -----------------------------------------------------------------------

    async def test_journal_behaves_like_model(self, provider: Provider) -> None:
        await run_journal_machine(provider, self.hypothesis_settings)
