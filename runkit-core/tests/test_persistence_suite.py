"""The conformance suites catch broken drivers (a suite that cannot fail proves nothing).

Each test builds a provider with one classic bug, by wrapping the memory driver,
and checks that the suite test aimed at that bug fails on it while passing on
the correct driver.
"""

import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, ClassVar, TypeVar

import anyio
import pytest
from anyio.lowlevel import checkpoint

import runkit.testing
import runkit.testing.faults
from runkit.engine.cluster.nodes import NODES_KEYSPACE
from runkit.engine.commands.acceptance import idempotency_name
from runkit.engine.commands.inbox import inbox_name
from runkit.engine.commands.instance_records import aggregate_name, snapshot_name
from runkit.engine.commands.poison import poison_name
from runkit.engine.events.deadlines import deadline_journal_name
from runkit.engine.events.process_stores import (
    checkpoints_store_name,
    event_poison_store_name,
    process_store_name,
)
from runkit.engine.meta import meta_name
from runkit.engine.streams.records import stream_name
from runkit.persistence import (
    MAX_POSITION,
    Conflict,
    Interval,
    Journal,
    Keyspace,
    Limits,
    PersistenceError,
    Provider,
    RecordNotFound,
)
from runkit.testing import ConformanceSuite, JournalSuite, KeyspaceSuite, ProviderSuite
from runkit.testing.faults import FaultyProvider
from runkit.testing.faults import _FaultyJournal as _WrappedJournal
from runkit.testing.faults import _FaultyJournalStore as _WrappedJournalStore
from runkit.testing.faults import _FaultyKeyspace as _WrappedKeyspace
from runkit.testing.faults import _FaultyKeyspaceStore as _WrappedKeyspaceStore
from runkit.testing.faults import _FaultySet as _WrappedSet
from runkit.testing.faults import _FaultySetStore as _WrappedSetStore
from runkit_memory import MemoryProvider

SuiteFailed = (AssertionError, pytest.fail.Exception)
T = TypeVar("T")


class AbaKeyspace(_WrappedKeyspace):
    """Revisions are generation counters that restart at "1" after a delete."""

    generations: dict[bytes, int] = {}

    async def get(self, key: bytes) -> tuple[bytes, str]:
        value, revision = await self._inner.get(key)
        return value, str(self.generations[key]) if revision else ""

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        _, current = await self._inner.get(key)
        if revision != (str(self.generations[key]) if current else ""):
            raise Conflict.keyspace(self.name, key, revision)
        await self._inner.set(key, value, current)
        if not value:
            del self.generations[key]
            return ""
        self.generations[key] = self.generations.get(key, 0) + 1
        return str(self.generations[key])


class PerKeyCounterKeyspace(_WrappedKeyspace):
    """Correct: a revision counts its key's writes ("1", "2"...) across deletes.

    Revisions then never repeat for a key, as the contract asks, but different
    keys share them.
    """

    def __init__(self, inner: Keyspace, plan: runkit.testing.faults.FaultPlan) -> None:
        super().__init__(inner, plan)
        self.writes: dict[bytes, int] = {}
        self.ours: dict[str, str] = {}  # the memory driver's revision -> ours
        self.theirs: dict[tuple[bytes, str], str] = {}  # (key, ours) -> the driver's

    def _revision(self, key: bytes, theirs: str) -> str:
        if not theirs:
            return ""
        self.writes[key] = self.writes.get(key, 0) + 1
        ours = str(self.writes[key])
        self.ours[theirs] = ours
        self.theirs[key, ours] = theirs
        return ours

    async def get(self, key: bytes) -> tuple[bytes, str]:
        value, theirs = await self._inner.get(key)
        return value, self.ours.get(theirs, "")

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        key = bytes(key)
        theirs = self.theirs.get((key, revision), "<stale>") if revision else ""
        try:
            return self._revision(key, await self._inner.set(key, value, theirs))
        except Conflict:
            raise Conflict.keyspace(self.name, key, revision) from None

    async def set_unconditional(self, key: bytes, value: bytes) -> str:
        key = bytes(key)
        return self._revision(key, await self._inner.set_unconditional(key, value))

    async def range(self) -> AsyncIterator[tuple[bytes, bytes, str]]:
        async for key, value, theirs in self._inner.range():
            yield key, value, self.ours[theirs]


class BlindDeleteKeyspace(_WrappedKeyspace):
    """Deletes a present key whatever the revision (a delete without its condition)."""

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        if not value and await self._inner.has(key):
            return await self._inner.set_unconditional(key, value)
        return await self._inner.set(key, value, revision)


class CStringJournal(_WrappedJournal):
    """Stores records as C strings: each is cut at its first NUL."""

    async def append(self, pos: int, record: bytes) -> None:
        await self._inner.append(pos, bytes(record).split(b"\x00")[0])


class ChunkSwappingJournal(_WrappedJournal):
    """Stores records over 128 KiB in 64 KiB chunks, and reassembles the first two swapped."""

    async def append(self, pos: int, record: bytes) -> None:
        chunk = 64 << 10
        if len(record) > 2 * chunk:
            record = record[chunk : 2 * chunk] + record[:chunk] + record[2 * chunk :]
        await self._inner.append(pos, record)


class TextKeyspace(_WrappedKeyspace):
    """Stores values as UTF-8 text: bytes that are not UTF-8 are replaced."""

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        text = bytes(value).decode("utf-8", "replace").encode()
        return await self._inner.set(key, text, revision)


class FirstPageKeyspace(_WrappedKeyspace):
    """A ``range`` that never fetches past its first page of 1,000 keys."""

    async def range(self) -> AsyncIterator[tuple[bytes, bytes, str]]:
        count = 0
        async with aclosing(self._inner.range()) as items:  # type: ignore[type-var]
            async for item in items:
                count += 1
                if count > 1000:
                    return
                yield item


class ResurrectingJournal(_WrappedJournal):
    """Acknowledges appends at truncated positions without storing them (a lost write)."""

    async def append(self, pos: int, record: bytes) -> None:
        if pos < (await self._inner.bounds()).begin:
            return
        await self._inner.append(pos, record)


class LateCheckingJournal(_WrappedJournal):
    """Talks to the backend before validating its input."""

    async def append(self, pos: int, record: bytes) -> None:
        await checkpoint()  # stands in for a request
        await self._inner.append(pos, record)


class _PagingJournal(_WrappedJournal):
    """A ``range`` that reads pages of four records, re-reading the bounds per page."""

    def _overtaken(self, position: int, begin: int) -> int | None:
        """Where to carry on from once a truncation passed *position* (``None``: stop)."""
        raise RecordNotFound(self.name, position)  # what the contract says

    async def range(self, pos: int) -> AsyncIterator[tuple[int, bytes]]:
        first = True
        while True:
            bounds = await self._inner.bounds()
            if first and not bounds.begin <= pos < bounds.end:
                raise RecordNotFound(self.name, pos)
            first = False
            if pos < bounds.begin:
                carry_on = self._overtaken(pos, bounds.begin)
                if carry_on is None:
                    return
                pos = carry_on
            if pos >= bounds.end:
                return
            page = [(p, await self._inner.get(p)) for p in range(pos, min(pos + 4, bounds.end))]
            for item in page:
                yield item
            pos = page[-1][0] + 1


class PageBoundaryJournal(_WrappedJournal):
    """A ``range`` reading pages of four records, each next one ``shift`` off where it should start.

    ``shift = -1`` repeats the last record of each page (an inclusive keyset
    bound); ``shift = 1`` skips the first record of each next page.
    """

    shift: ClassVar[int]

    async def range(self, pos: int) -> AsyncIterator[tuple[int, bytes]]:
        bounds = await self._inner.bounds()
        if not bounds.begin <= pos < bounds.end:
            raise RecordNotFound(self.name, pos)
        while pos < bounds.end:
            page = [(p, await self._inner.get(p)) for p in range(pos, min(pos + 4, bounds.end))]
            for item in page:
                yield item
            if len(page) < 4:
                return
            pos = page[-1][0] + 1 + self.shift


class RepeatingPageJournal(PageBoundaryJournal):
    shift = -1


class SkippingPageJournal(PageBoundaryJournal):
    shift = 1


class CheckThenAppendJournal(_WrappedJournal):
    """Checks the end, awaits (the write request), then writes without a condition."""

    async def append(self, pos: int, record: bytes) -> None:
        if pos != (await self._inner.bounds()).end:
            raise Conflict.journal(self.name, pos)
        await anyio.sleep(0.01)  # the request; a racer that checked meanwhile also wins
        with contextlib.suppress(Conflict):  # an unconditional write overwrites: acknowledged
            await self._inner.append(pos, record)


class PerProviderRevisionKeyspace(_WrappedKeyspace):
    """Revisions from a counter per provider ("1", "2"...): two providers hand out the same."""

    counters: ClassVar[dict[int, int]] = {}
    ours: ClassVar[dict[str, str]] = {}  # the memory driver's revision -> ours
    theirs: ClassVar[dict[tuple[bytes, str], str]] = {}  # (key, ours) -> the driver's

    def _revision(self, key: bytes, theirs: str) -> str:
        if not theirs:
            return ""
        counter = self.counters[id(self._plan)] = self.counters.get(id(self._plan), 0) + 1
        self.ours[theirs] = str(counter)
        self.theirs[key, str(counter)] = theirs
        return str(counter)

    async def get(self, key: bytes) -> tuple[bytes, str]:
        value, theirs = await self._inner.get(key)
        return value, self.ours.get(theirs, "")

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        key = bytes(key)
        theirs = self.theirs.get((key, revision), "<stale>") if revision else ""
        try:
            return self._revision(key, await self._inner.set(key, value, theirs))
        except Conflict:
            raise Conflict.keyspace(self.name, key, revision) from None


class DetachedReadOnlyProvider(FaultyProvider):
    """Read-only: a journal empty when opened is read from an empty copy of its own for ever."""

    def __init__(self, inner: Provider) -> None:
        super().__init__(inner)
        provider = self

        class Journals(_WrappedJournalStore):
            async def open(self, name: str) -> Journal:
                handle = await self._inner.open(name)
                if provider.read_only and (await handle.bounds()).is_fresh:
                    await handle.close()
                    handle = await MemoryProvider().journals.open(name)
                return _WrappedJournal(handle, self._plan)

        self._journals = Journals(inner.journals, self.plan)


def _md5(member: bytes) -> bytes:
    return hashlib.md5(member).digest()


class HashOrderedSet(_WrappedSet):
    """Correct: ``range`` reads one member at a time in MD5 order, reading the set each time."""

    async def range(self) -> AsyncIterator[bytes]:
        last: bytes | None = None
        while True:
            later = [m async for m in self._inner.range() if last is None or _md5(m) > last]
            if not later:
                return
            member = min(later, key=_md5)
            yield member
            last = _md5(member)


class SkippingJournal(_PagingJournal):
    """When a truncation overtakes its ``range``, carries on from the new begin (a gap)."""

    def _overtaken(self, position: int, begin: int) -> int | None:
        return begin


class QuietlyEndingJournal(_PagingJournal):
    """When a truncation overtakes its ``range``, stops as if it had reached the end."""

    def _overtaken(self, position: int, begin: int) -> int | None:
        return None


class CancelPoisonedJournal(_WrappedJournal):
    """Marks its "connection" busy around each call and leaves it so when cancelled."""

    busy = False

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        if self.busy:
            raise PersistenceError("journal: connection is busy with an abandoned request")
        self.busy = True
        await anyio.sleep(0.3)  # stands in for a request; no try/finally: the bug
        result = await call()
        self.busy = False
        return result

    async def bounds(self) -> Interval:
        return await self._call(self._inner.bounds)

    async def get(self, pos: int) -> bytes:
        return await self._call(lambda: self._inner.get(pos))

    async def append(self, pos: int, record: bytes) -> None:
        await self._call(lambda: self._inner.append(pos, record))


class TornKeyspace(_WrappedKeyspace):
    """Replaces a value in two requests, delete then insert: a cancel between loses both."""

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        if not (revision and value):
            return await self._inner.set(key, value, revision)
        await self._inner.set(key, b"", revision)
        await anyio.sleep(0.3)  # the second request's round trip
        return await self._inner.set(key, value, "")


class _RenamedJournal(_WrappedJournal):
    def __init__(self, inner: Journal, plan: runkit.testing.faults.FaultPlan, name: str) -> None:
        super().__init__(inner, plan)
        self._name = name

    @property
    def name(self) -> str:
        return self._name


class UnderscoreNamesProvider(FaultyProvider):
    """Stores journal names with "/" made "_" (as a table name must), so "a/b" is "a_b"."""

    def __init__(self, inner: Provider) -> None:
        super().__init__(inner)

        class Journals(_WrappedJournalStore):
            async def open(self, name: str) -> Journal:
                inner = await self._inner.open(name.replace("/", "_"))
                return _RenamedJournal(inner, self._plan, name)

        self._journals = Journals(inner.journals, self.plan)


class CancelWrappingSet(_WrappedSet):
    """Wraps every error of ``try_add`` in ``PersistenceError``, cancellation too."""

    async def try_add(self, member: bytes) -> bool:
        try:
            await anyio.sleep(0.3)  # stands in for a request
            return await self._inner.try_add(member)
        except BaseException as exc:  # the bug: a cancellation is not the backend's error
            raise PersistenceError(f"set {self.name!r}: try_add failed") from exc


class _LateLanding:
    """A cancelled write goes on in the background (a worker thread started with
    ``abandon_on_cancel=True``) and lands just after the caller's next read."""

    pending: Callable[[], Awaitable[object]] | None = None

    async def _late(self, write: Callable[[], Awaitable[T]]) -> T:
        await self._land()
        try:
            await anyio.sleep(0.3)  # stands in for the request
        except anyio.get_cancelled_exc_class():
            self.pending = write
            raise
        return await write()

    async def _land(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            await pending()


class LateLandingJournal(_LateLanding, _WrappedJournal):
    async def append(self, pos: int, record: bytes) -> None:
        await self._late(lambda: self._inner.append(pos, record))

    async def bounds(self) -> Interval:
        bounds = await self._inner.bounds()
        await self._land()
        return bounds


class LateLandingKeyspace(_LateLanding, _WrappedKeyspace):
    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        return await self._late(lambda: self._inner.set(key, value, revision))

    async def get(self, key: bytes) -> tuple[bytes, str]:
        pair = await self._inner.get(key)
        await self._land()
        return pair


class LateLandingSet(_LateLanding, _WrappedSet):
    async def try_add(self, member: bytes) -> bool:
        return await self._late(lambda: self._inner.try_add(member))

    async def try_remove(self, member: bytes) -> bool:
        return await self._late(lambda: self._inner.try_remove(member))

    async def has(self, member: bytes) -> bool:
        present = await self._inner.has(member)
        await self._land()
        return present


class ForgivingSet(_WrappedSet):
    """Reads any error of ``try_remove`` as "absent", a closed provider's included."""

    async def try_remove(self, member: bytes) -> bool:
        try:
            return await self._inner.try_remove(member)
        except PersistenceError:
            return False


class StuckProvisioningProvider(FaultyProvider):
    """Provisions on first use behind an event that a cancelled first use never sets."""

    def __init__(self, inner: Provider) -> None:
        super().__init__(inner)
        self._started = False
        self._done = anyio.Event()
        self._journals = _ensuring(_WrappedJournalStore, inner.journals, self)
        self._keyspaces = _ensuring(_WrappedKeyspaceStore, inner.keyspaces, self)
        self._sets = _ensuring(_WrappedSetStore, inner.sets, self)

    async def provision(self) -> None:
        if self._started:
            await self._done.wait()  # the bug: for ever, if the first one was cancelled
            return
        self._started = True
        await anyio.sleep(0.3)  # creating the tables
        await self.inner.provision()
        self._done.set()


def _ensuring(base: type, inner: object, provider: Provider) -> Any:
    """A *base* store over *inner* whose ``open`` provisions *provider* first."""

    class Store(base):  # type: ignore[misc]
        async def open(self, name: str) -> object:
            await provider.provision()
            return await super().open(name)

    return Store(inner, provider.plan)  # type: ignore[attr-defined]


class BrokenProvider(FaultyProvider):
    """The memory driver with one broken handle class."""

    def __init__(
        self,
        inner: Provider,
        *,
        journal: type | None = None,
        keyspace: type | None = None,
        set_: type | None = None,
    ):
        super().__init__(inner)
        if journal is not None:
            self._journals = _opening(_WrappedJournalStore, journal, inner.journals, self.plan)
        if keyspace is not None:
            self._keyspaces = _opening(_WrappedKeyspaceStore, keyspace, inner.keyspaces, self.plan)
        if set_ is not None:
            self._sets = _opening(_WrappedSetStore, set_, inner.sets, self.plan)


def _opening(base: type, handle: type, inner: object, plan: object) -> Any:
    """A *base* store over *inner* whose ``open`` wraps each handle in *handle*."""

    class Store(base):  # type: ignore[misc]
        async def open(self, name: str) -> object:
            return handle(await self._inner.open(name), plan)

    return Store(inner, plan)


@pytest.fixture
async def memory() -> AsyncIterator[Provider]:
    async with MemoryProvider() as provider:
        yield provider


async def _fails(call: Callable[[], Awaitable[None]]) -> str:
    with pytest.raises(SuiteFailed) as info:
        await call()
    return str(info.value)


async def test_keyspace_suite_catches_revisions_that_repeat_after_delete(
    memory: Provider,
) -> None:
    suite = KeyspaceSuite()
    async with await memory.keyspaces.open("good") as good:
        await suite.test_keyspace_stale_revision_from_before_delete_is_rejected(good)
    AbaKeyspace.generations.clear()
    broken = BrokenProvider(memory, keyspace=AbaKeyspace)
    async with await broken.keyspaces.open("aba") as aba:
        message = await _fails(
            lambda: suite.test_keyspace_stale_revision_from_before_delete_is_rejected(aba)
        )
    assert message.startswith(
        "revision '1' came back after the key was deleted and inserted again (a set at the "
        "revision from before the delete succeeded): revisions must never repeat for a key. "
        "A generation counter that restarts after a delete"
    ), message
    AbaKeyspace.generations.clear()
    async with await broken.keyspaces.open("aba-reinsert") as aba:
        message = await _fails(
            lambda: suite.test_keyspace_reinsert_after_delete_gets_fresh_revision(aba)
        )
    assert message.startswith(
        "revision '1' came back after the key was deleted and inserted again: "
    ), message


async def test_keyspace_model_accepts_revisions_shared_by_different_keys(
    memory: Provider,
) -> None:
    # Revisions never repeat for a key; the contract lets two keys share one.
    broken = BrokenProvider(memory, keyspace=PerKeyCounterKeyspace)
    await KeyspaceSuite().test_keyspace_behaves_like_model(broken)


@pytest.mark.parametrize("revision", ["", "<wrong>"])
async def test_keyspace_suite_catches_deletes_that_ignore_the_revision(
    memory: Provider, revision: str
) -> None:
    suite = KeyspaceSuite()
    test = suite.test_keyspace_set_existing_key_at_wrong_revision_raises_conflict
    async with await memory.keyspaces.open("good") as good:
        await test(good, "good", revision, b"")
    broken = BrokenProvider(memory, keyspace=BlindDeleteKeyspace)
    async with await broken.keyspaces.open("blind") as blind:
        message = await _fails(lambda: test(blind, "blind", revision, b""))
    assert "DID NOT RAISE" in message


async def test_journal_suite_catches_acknowledged_appends_that_are_invisible(
    memory: Provider,
) -> None:
    suite = JournalSuite()
    async with await memory.journals.open("good") as good:
        await suite.test_journal_append_at_truncated_position_raises_conflict(good)
    broken = BrokenProvider(memory, journal=ResurrectingJournal)
    async with await broken.journals.open("lossy") as lossy:
        await _fails(lambda: suite.test_journal_append_at_truncated_position_raises_conflict(lossy))
    other = BrokenProvider(memory, journal=ResurrectingJournal)
    async with await broken.journals.open("stale") as stale:
        await _fails(
            lambda: suite.test_journal_stale_handle_cannot_append_at_its_stale_end(
                broken, stale, "stale", other
            )
        )


async def test_suites_catch_records_and_values_not_stored_byte_for_byte(
    memory: Provider,
) -> None:
    journals, keyspaces = JournalSuite(), KeyspaceSuite()
    async with await memory.journals.open("good") as good:
        await journals.test_journal_records_are_stored_byte_for_byte(good)
    async with await memory.keyspaces.open("good") as good_keyspace:
        await keyspaces.test_keyspace_values_are_stored_byte_for_byte(good_keyspace)
    await ProviderSuite().test_provider_record_at_limit_is_stored_and_one_byte_more_raises(memory)
    broken = BrokenProvider(memory, journal=CStringJournal, keyspace=TextKeyspace)
    async with await broken.journals.open("cut") as cut:
        await _fails(lambda: journals.test_journal_records_are_stored_byte_for_byte(cut))
    async with await broken.keyspaces.open("text") as text:
        await _fails(lambda: keyspaces.test_keyspace_values_are_stored_byte_for_byte(text))
    swapping = BrokenProvider(memory, journal=ChunkSwappingJournal)
    await _fails(
        lambda: ProviderSuite().test_provider_record_at_limit_is_stored_and_one_byte_more_raises(
            swapping
        )
    )


async def test_keyspace_suite_catches_range_that_stops_after_one_page(memory: Provider) -> None:
    test = KeyspaceSuite().test_keyspace_range_yields_every_key_of_several_pages
    async with await memory.keyspaces.open("good") as good:
        await test(good)
    broken = BrokenProvider(memory, keyspace=FirstPageKeyspace)
    async with await broken.keyspaces.open("paged") as paged:
        await _fails(lambda: test(paged))


class _SmallJournalSuite(JournalSuite):
    # The planted bugs page by four records; the memory driver by 64.
    range_overtaking_records: ClassVar[int] = 70


@pytest.mark.parametrize("bug", [SkippingJournal, QuietlyEndingJournal])
async def test_journal_suite_catches_range_that_ignores_an_overtaking_truncation(
    memory: Provider, bug: type[_WrappedJournal]
) -> None:
    suite = _SmallJournalSuite()
    test = suite.test_journal_range_overtaken_by_truncation_raises_record_not_found
    async with await memory.journals.open("good") as good:
        await test(good)
    broken = BrokenProvider(memory, journal=bug)
    async with await broken.journals.open("overtaken") as overtaken:
        message = await _fails(lambda: test(overtaken))
    expected = "range skipped from 4 to 68" if bug is SkippingJournal else "DID NOT RAISE"
    assert expected in message


@pytest.mark.parametrize(
    ("bug", "shown"),
    [
        (RepeatingPageJournal, "after [2, 3] came [3, 4, 5]"),
        (SkippingPageJournal, "after [2, 3] came [5, 6, 7]"),
    ],
)
async def test_journal_suite_catches_range_that_repeats_or_skips_at_a_page_boundary(
    memory: Provider, bug: type[_WrappedJournal], shown: str
) -> None:
    test = _SmallJournalSuite().test_journal_range_overtaken_by_truncation_raises_record_not_found
    broken = BrokenProvider(memory, journal=bug)
    async with await broken.journals.open("paged") as paged:
        message = await _fails(lambda: test(paged))
    assert message.startswith("range(0) of a journal of 70 records yielded"), message
    assert shown in message, message
    assert "repeated or skipped where one page of the range ends and the next begins" in message


async def test_journal_suite_catches_a_racy_append_without_a_second_provider(
    memory: Provider,
) -> None:
    # Without make_provider the race runs between handles of the one provider.
    test = JournalSuite().test_journal_racing_appends_at_one_position_have_exactly_one_winner
    async with await memory.journals.open("good") as good:
        await test(good, "good", [memory])
    broken = BrokenProvider(memory, journal=CheckThenAppendJournal)
    async with await broken.journals.open("racy") as racy:
        message = await _fails(lambda: test(racy, "racy", [broken]))
    assert "assert 18 == 1" in message, message


async def test_keyspace_suite_catches_revisions_counted_per_provider(memory: Provider) -> None:
    test = (
        KeyspaceSuite().test_keyspace_revision_is_stale_after_another_provider_deletes_and_reinserts
    )
    async with await memory.keyspaces.open("good") as good:
        await test(good, "good", memory)
    PerProviderRevisionKeyspace.counters.clear()
    a = BrokenProvider(memory, keyspace=PerProviderRevisionKeyspace)
    b = BrokenProvider(memory, keyspace=PerProviderRevisionKeyspace)
    async with await a.keyspaces.open("counted") as counted:
        message = await _fails(lambda: test(counted, "counted", b))
    assert message.startswith(
        "revision '1' came back from another provider after the key was deleted and "
        "inserted again: revisions must never repeat for a key. A generation counter that "
        "restarts after a delete, a counter kept per provider (per process"
    ), message


async def test_provider_suite_catches_a_read_only_handle_detached_from_its_store() -> None:
    test = ProviderSuite().test_provider_read_only_handle_sees_a_store_created_after_it_was_opened
    silo = runkit.testing.unique_name("silo")
    async with MemoryProvider(silo) as provider:
        await test(provider, lambda: MemoryProvider(silo))
        message = await _fails(
            lambda: test(provider, lambda: DetachedReadOnlyProvider(MemoryProvider(silo)))
        )
    assert message.startswith(
        "a read-only provider's handles of a journal opened before the store was first "
        "written do not see the writes of another provider"
    ), message


async def test_set_suite_accepts_a_range_that_yields_a_member_added_during_it(
    memory: Provider,
) -> None:
    # The contract lets a range yield members written during the iteration.
    broken = BrokenProvider(memory, set_=HashOrderedSet)
    test = runkit.testing.SetSuite().test_set_range_stops_when_consumer_breaks_and_tolerates_writes
    async with await broken.sets.open("hashed") as hashed:
        await test(hashed)
        # It did yield the added member second (removing it, then adding it back).
        assert len([m async for m in hashed.range()]) == 5


@pytest.mark.parametrize("when", ["before", "in-flight"])
async def test_journal_suite_catches_handles_poisoned_by_cancellation(
    memory: Provider, when: str
) -> None:
    suite = JournalSuite()
    async with await memory.journals.open("good") as good:
        await suite.test_journal_cancelled_append_lands_whole_or_not_at_all(
            memory, good, "good", when
        )
    async with await memory.journals.open("good-reads") as good:
        await suite.test_journal_cancelled_reads_leave_handle_usable(good, when)
    broken = BrokenProvider(memory, journal=CancelPoisonedJournal)
    async with await broken.journals.open("poisoned") as poisoned:
        with pytest.raises(PersistenceError, match="busy with an abandoned request"):
            await suite.test_journal_cancelled_append_lands_whole_or_not_at_all(
                broken, poisoned, "poisoned", when
            )
    async with await broken.journals.open("poisoned-reads") as poisoned:
        with pytest.raises(PersistenceError, match="busy with an abandoned request"):
            await suite.test_journal_cancelled_reads_leave_handle_usable(poisoned, when)


@pytest.mark.parametrize("when", ["before", "in-flight"])
async def test_set_suite_catches_cancellation_turned_into_an_error(
    memory: Provider, when: str
) -> None:
    test = runkit.testing.SetSuite().test_set_cancelled_calls_land_whole_or_not_at_all
    async with await memory.sets.open("good") as good:
        await test(memory, good, "good", when)
    broken = BrokenProvider(memory, set_=CancelWrappingSet)
    async with await broken.sets.open("wrapping") as wrapping:
        with pytest.raises(PersistenceError, match="try_add failed"):
            await test(broken, wrapping, "wrapping", when)


async def test_keyspace_suite_catches_a_set_torn_by_cancellation(memory: Provider) -> None:
    suite = KeyspaceSuite()
    test = suite.test_keyspace_cancelled_set_lands_whole_or_not_at_all
    async with await memory.keyspaces.open("good") as good:
        await test(memory, good, "good", "in-flight")
    broken = BrokenProvider(memory, keyspace=TornKeyspace)
    async with await broken.keyspaces.open("torn") as torn:
        message = await _fails(lambda: test(broken, torn, "torn", "in-flight"))
    assert "(b'', '') == (b'<value-0>" in message


@pytest.mark.parametrize("when", ["before", "in-flight"])
@pytest.mark.parametrize("kind", ["journal", "keyspace", "set"])
async def test_suites_explain_a_cancelled_write_that_lands_after_the_call_returned(
    memory: Provider, kind: str, when: str
) -> None:
    if kind == "journal":
        journal_test = JournalSuite().test_journal_cancelled_append_lands_whole_or_not_at_all
        broken = BrokenProvider(memory, journal=LateLandingJournal)
        async with await broken.journals.open("late") as journal:
            message = await _fails(lambda: journal_test(broken, journal, "late", when))
        write = "append at position 0"
    elif kind == "keyspace":
        keyspace_test = KeyspaceSuite().test_keyspace_cancelled_set_lands_whole_or_not_at_all
        broken = BrokenProvider(memory, keyspace=LateLandingKeyspace)
        async with await broken.keyspaces.open("late") as keyspace:
            message = await _fails(lambda: keyspace_test(broken, keyspace, "late", when))
        write = "set"
    else:
        set_test = runkit.testing.SetSuite().test_set_cancelled_calls_land_whole_or_not_at_all
        broken = BrokenProvider(memory, set_=LateLandingSet)
        async with await broken.sets.open("late") as set_:
            message = await _fails(lambda: set_test(broken, set_, "late", when))
        write = "try_add"
    assert message.startswith(
        f"a cancelled {write} had not taken effect when the call returned, but did afterwards"
    ), message
    assert "abandon_on_cancel=True" in message


@pytest.mark.parametrize("when", ["before", "in-flight"])
async def test_provider_suite_catches_provisioning_stuck_after_a_cancelled_first_open(
    monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    monkeypatch.setattr(runkit.testing._provider, "_PROVISION_SECONDS", 2)
    test = ProviderSuite().test_provider_cancelled_first_open_and_provision_leave_it_usable
    await test(lambda: MemoryProvider("good"), "journal", when)
    message = await _fails(
        lambda: test(lambda: StuckProvisioningProvider(MemoryProvider("stuck")), "journal", when)
    )
    assert message.startswith(
        "after a cancelled first journals.open() and a cancelled provision(), opening, "
        "writing and provisioning did not finish within 2 s: the cancellation left the "
        "provider waiting for a provisioning that will never end"
    ), message


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (
            Limits(max_name_bytes=119),
            "max_name_bytes is 119: the engine opens stores named up to 120",
        ),
        (Limits(max_key_bytes=98), "max_key_bytes is 98: the engine writes keyspace keys up to 99"),
    ],
)
async def test_provider_suite_catches_limits_too_small_for_the_engine(
    limits: Limits, message: str
) -> None:
    test = ProviderSuite().test_provider_limits_are_declared
    await test(MemoryProvider(limits=Limits(max_name_bytes=120, max_key_bytes=99)))
    assert (await _fails(lambda: test(MemoryProvider(limits=limits)))).startswith(message)


def test_engine_names_and_keys_fit_the_limits_the_suite_requires() -> None:
    uuid = "6ba7b810-9dad-41d1-80b4-00c04fd430c8"
    longest_name = aggregate_name(uuid, uuid, uuid)
    assert len(longest_name.encode()) == runkit.testing._provider.ENGINE_NAME_BYTES
    for name in (
        meta_name(uuid),
        stream_name(uuid, 1023),
        inbox_name(uuid, 1023),
        poison_name(uuid, 1023),
        snapshot_name(uuid, uuid),
        idempotency_name(uuid),
        process_store_name(uuid, uuid),
        checkpoints_store_name(uuid),
        event_poison_store_name(uuid, 1023),
        deadline_journal_name(uuid, 1023),
        NODES_KEYSPACE,
    ):
        assert len(name.encode()) <= len(longest_name.encode()), name
    longest_key = f"{uuid}/event/{uuid}/{MAX_POSITION}"
    assert len(longest_key.encode()) == runkit.testing._provider.ENGINE_KEY_BYTES
    for key in (f"{uuid}/{uuid}", f"{uuid}/deadline/{uuid}", f"{uuid}/outbox/{uuid}"):
        assert len(key) <= len(longest_key), key


async def test_provider_suite_catches_a_handle_operation_that_works_after_close() -> None:
    test = ProviderSuite().test_provider_closed_provider_and_its_handles_raise
    await test(lambda: MemoryProvider("good"))
    message = await _fails(
        lambda: test(lambda: BrokenProvider(MemoryProvider(), set_=ForgivingSet))
    )
    assert message.startswith(
        "set try_remove after the provider was closed returned normally: every operation "
        "of a closed provider and of its handles must raise PersistenceError saying what is closed"
    ), message


async def test_provider_suite_catches_names_that_collide_once_mapped(memory: Provider) -> None:
    test = ProviderSuite().test_provider_unusual_names_are_distinct_and_shared
    await test(memory, memory, "journal")
    broken = UnderscoreNamesProvider(memory)
    with pytest.raises(Conflict, match=r":a_b': conflict appending at position 0$"):
        await test(broken, broken, "journal")


async def test_provider_suite_catches_input_checks_after_io(memory: Provider) -> None:
    suite = ProviderSuite()
    await suite.test_provider_inputs_are_checked_before_any_io(memory)
    broken = BrokenProvider(memory, journal=LateCheckingJournal)
    message = await _fails(lambda: suite.test_provider_inputs_are_checked_before_any_io(broken))
    assert message.startswith(
        "append with an invalid input must raise before its first await (before any I/O)"
    )
    async with await broken.journals.open("j") as journal:
        assert await journal.bounds() == Interval(0, 0)


def test_suites_are_not_collected_directly_and_compose() -> None:
    assert not ConformanceSuite.__name__.startswith("Test")
    for suite in (JournalSuite, KeyspaceSuite, runkit.testing.SetSuite, ProviderSuite):
        assert issubclass(ConformanceSuite, suite)
    names = [n for n in dir(ConformanceSuite) if n.startswith("test_")]
    assert len(names) == len(set(names))
    assert len(names) > 80


@pytest.mark.parametrize("module", [runkit.testing, runkit.testing.faults])
def test_public_names_exist_and_are_documented(module: object) -> None:
    for name in module.__all__:  # type: ignore[attr-defined]
        obj = getattr(module, name)
        if callable(obj):
            assert obj.__doc__, f"{module.__name__}.{name} has no docstring"  # type: ignore[attr-defined]
