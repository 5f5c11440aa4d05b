"""Contract tests for ``Set`` (the counterpart of persistencekit's settest)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from functools import partial

import anyio
import pytest

from runkit.persistence import PersistenceError, Provider, Set

from ._machines import run_set_machine
from ._support import (
    RACERS,
    ROUNDS,
    SuiteBase,
    cancel_call,
    gather,
    landed_after_cancel,
    unique_name,
)
from .faults import AFTER, FaultPlan, FaultyProvider, InjectedFault

__all__ = ["SetSuite"]


async def _members(set_: Set) -> list[bytes]:
    return [member async for member in set_.range()]


async def _first_member(set_: Set) -> None:
    async with aclosing(set_.range()) as members:  # type: ignore[type-var]
        async for _ in members:
            await anyio.sleep(10)  # cancelled here if the fetch was not


class SetSuite(SuiteBase):
    """Contract tests for sets: subclass and supply a ``provider`` fixture.

    An optional ``make_provider`` fixture enables the cross-provider tests.
    """

    @pytest.fixture
    def set_name(self) -> str:
        return unique_name("set")

    @pytest.fixture
    async def set_(self, provider: Provider, set_name: str) -> AsyncIterator[Set]:
        async with await provider.sets.open(set_name) as set_:
            yield set_

    async def test_set_opened_twice_shares_data(
        self, provider: Provider, set_: Set, set_name: str
    ) -> None:
        async with await provider.sets.open(set_name) as again:
            assert again.name == set_name
            await set_.add(b"<member>")
            assert await again.has(b"<member>")
            await again.remove(b"<member>")
            assert not await set_.has(b"<member>")

    async def test_set_has_reports_membership(self, set_: Set) -> None:
        assert not await set_.has(b"<m>")
        await set_.add(b"<m>")
        assert await set_.has(b"<m>")
        await set_.add(b"<other>")
        assert not await set_.has(b"<absent>")
        await set_.remove(b"<m>")
        assert not await set_.has(b"<m>")
        assert await set_.has(b"<other>")

    async def test_set_add_and_remove_are_idempotent(self, set_: Set) -> None:
        await set_.add(b"<m>")
        await set_.add(b"<m>")
        assert await _members(set_) == [b"<m>"]
        await set_.remove(b"<m>")
        await set_.remove(b"<m>")
        await set_.remove(b"<never>")
        assert await _members(set_) == []

    async def test_set_add_keeps_no_reference_to_callers_buffer(self, set_: Set) -> None:
        member = bytearray(b"<member>")
        await set_.add(member)  # type: ignore[arg-type]
        member[:] = b"<MEMBER>"
        assert await set_.has(b"<member>")
        assert not await set_.has(b"<MEMBER>")

    async def test_set_methods_take_member_by_keyword(self, set_: Set) -> None:
        # The contract names the parameter ``member``.
        await set_.add(member=b"<a>")
        assert await set_.try_add(member=b"<b>")
        assert await set_.has(member=b"<a>")
        await set_.remove(member=b"<a>")
        assert await set_.try_remove(member=b"<b>")
        assert await _members(set_) == []

    async def test_set_try_add_reports_whether_member_was_added(self, set_: Set) -> None:
        await set_.add(b"<other>")
        assert await set_.try_add(b"<m>") is True
        assert await set_.try_add(b"<m>") is False
        assert sorted(await _members(set_)) == [b"<m>", b"<other>"]

    async def test_set_try_remove_reports_whether_member_was_removed(self, set_: Set) -> None:
        await set_.add(b"<other>")
        assert await set_.try_remove(b"<m>") is False
        await set_.add(b"<m>")
        assert await set_.try_remove(b"<m>") is True
        assert await set_.try_remove(b"<m>") is False
        assert await _members(set_) == [b"<other>"]

    async def test_set_range_yields_each_member_once(self, set_: Set) -> None:
        assert await _members(set_) == []
        members = [b"a", b"a\x00", b"\x00", b"\xff\xfe", b"\x80a", b"A", b"a "]
        for member in members:
            await set_.add(member)
        await set_.add(b"<removed>")
        await set_.remove(b"<removed>")
        got = await _members(set_)
        assert sorted(got) == sorted(members)
        assert all(type(m) is bytes for m in got)

    async def test_set_range_yields_every_member_of_several_pages(self, set_: Set) -> None:
        # A range that stops after its first page, or repeats or skips a member at
        # a page boundary, shows; so do removed members on later pages.
        members = [f"<m{index:05}>".encode() for index in range(self.range_paging_items)]
        for start in range(0, len(members), RACERS):
            chunk = members[start : start + RACERS]
            results = await gather(*(partial(set_.add, member) for member in chunk))
            assert results == [None] * len(chunk), results
        for member in members[::97]:
            await set_.remove(member)
        got = await _members(set_)
        assert len(got) == len(set(got)), "range yielded a member twice"
        assert set(got) == set(members) - set(members[::97])

    async def test_set_range_stops_when_consumer_breaks_and_tolerates_writes(
        self, set_: Set
    ) -> None:
        # A member added during the iteration may or may not be yielded (a range
        # that reads in hash order, a page at a time, yields it if it sorts after
        # the members already yielded); no member is yielded twice.
        originals = {f"<m{index}>".encode() for index in range(5)}
        added = b"<added-during-range>"
        for member in originals:
            await set_.add(member)
        expected = set(originals)
        yielded: list[bytes] = []
        async with aclosing(set_.range()) as members:  # type: ignore[type-var]
            async for member in members:
                assert member not in yielded, f"range yielded {member!r} twice"
                assert member in originals | {added}, f"range yielded {member!r}, never added"
                yielded.append(member)
                await set_.remove(member)
                await set_.add(added)
                expected.discard(member)
                expected.add(added)
                if len(yielded) == 2:
                    break
        assert len(yielded) == 2
        assert sorted(await _members(set_)) == sorted(expected)

    async def test_set_members_of_different_sets_are_isolated(
        self, provider: Provider, set_: Set
    ) -> None:
        async with await provider.sets.open(unique_name("set")) as other:
            await set_.add(b"<m>")
            assert not await other.has(b"<m>")
            assert await other.try_add(b"<m>")
            await other.remove(b"<m>")
            assert await set_.has(b"<m>")

    async def test_set_writes_are_visible_to_other_provider(
        self, set_: Set, set_name: str, other_provider: Provider
    ) -> None:
        async with await other_provider.sets.open(set_name) as other:
            await set_.add(b"<a>")
            assert await other.has(b"<a>")
            assert await set_.try_add(b"<b>")
            assert await other.try_add(b"<b>") is False
            assert sorted(await _members(other)) == [b"<a>", b"<b>"]
            await other.remove(b"<a>")
            assert not await set_.has(b"<a>")
            assert await other.try_remove(b"<b>")
            assert await set_.try_remove(b"<b>") is False
            assert await _members(set_) == []

    async def test_set_racing_try_add_and_try_remove_have_exactly_one_winner(
        self, set_: Set, set_name: str, racing_providers: list[Provider]
    ) -> None:
        # Handles of two providers if the driver has ``make_provider``, else of one.
        handles = [
            await p.sets.open(set_name)
            for p in racing_providers
            for _ in range(RACERS // (2 * len(racing_providers)))
        ]
        try:
            racers = [set_, *handles] * 2
            for round_ in range(ROUNDS):
                member = f"<m{round_ % 2}>".encode()  # members are re-added in later rounds
                added = await gather(*[partial(h.try_add, member) for h in racers])
                assert added.count(True) == 1, added
                assert added.count(False) == len(racers) - 1, added
                removed = await gather(*[partial(h.try_remove, member) for h in racers])
                assert removed.count(True) == 1, removed
                assert removed.count(False) == len(racers) - 1, removed
                assert not await set_.has(member)
        finally:
            for handle in handles:
                await handle.close()

    @pytest.mark.parametrize("when", ["before", "in-flight"])
    async def test_set_cancelled_calls_land_whole_or_not_at_all(
        self, provider: Provider, set_: Set, set_name: str, when: str
    ) -> None:
        # Like a cancelled journal append: a cancelled write is done or not, and
        # every call leaves the handle and the provider working.
        for round_ in range(3):
            member = f"<m{round_}>".encode()
            cancelled = await cancel_call(when, partial(set_.try_add, member))
            if not await set_.has(member):
                assert cancelled, "try_add returned normally but its member is missing"
                assert await set_.try_add(member), landed_after_cancel("try_add")
            cancelled = await cancel_call(when, partial(set_.try_remove, member))
            if await set_.has(member):
                assert cancelled, "try_remove returned normally but its member is present"
                assert await set_.try_remove(member), landed_after_cancel("try_remove")
            await cancel_call(when, partial(set_.add, member))
            await cancel_call(when, partial(set_.remove, b"<absent>"))
            await cancel_call(when, partial(set_.has, member))
            await cancel_call(when, partial(_first_member, set_))
            await set_.add(member)
            assert await set_.has(member)
        async with await provider.sets.open(set_name) as again:
            assert sorted(await _members(again)) == [b"<m0>", b"<m1>", b"<m2>"]
            assert await again.try_remove(b"<m0>")
        assert sorted(await _members(set_)) == [b"<m1>", b"<m2>"]

    async def test_set_try_add_retried_after_ambiguous_failure_reports_not_added(
        self, provider: Provider, set_name: str
    ) -> None:
        plan = FaultPlan()
        rule = plan.fail(AFTER, ops={"try_add", "try_remove"}, every=2)
        set_ = await FaultyProvider(provider, plan).sets.open(set_name)
        assert await set_.try_add(b"<m>") is True
        with pytest.raises(InjectedFault, match="after try_add on set") as info:
            await set_.try_add(b"<p>")
        assert info.value.ambiguous
        assert await set_.try_add(b"<p>") is False  # the failed call did add it
        with pytest.raises(InjectedFault, match="after try_remove on set"):
            await set_.try_remove(b"<p>")
        assert await set_.try_remove(b"<p>") is False  # the failed call did remove it
        assert await _members(set_) == [b"<m>"]
        assert (rule.matched, rule.injected) == (5, 2)

    async def test_set_closed_handle_raises(self, provider: Provider, set_name: str) -> None:
        set_ = await provider.sets.open(set_name)
        await set_.add(b"<m>")
        await set_.close()
        with pytest.raises(PersistenceError, match="closed"):
            await set_.has(b"<m>")
        with pytest.raises(PersistenceError, match="closed"):
            await set_.add(b"<n>")
        with pytest.raises(PersistenceError, match="closed"):
            await set_.try_add(b"<n>")
        with pytest.raises(PersistenceError, match="closed"):
            await set_.remove(b"<m>")
        with pytest.raises(PersistenceError, match="closed"):
            await set_.try_remove(b"<m>")
        with pytest.raises(PersistenceError, match="closed"):
            await _members(set_)
        async with await provider.sets.open(set_name) as again:
            assert await _members(again) == [b"<m>"]

    async def test_set_behaves_like_model(self, provider: Provider) -> None:
        await run_set_machine(provider, self.hypothesis_settings)
