"""Contract tests for ``Keyspace`` (the counterpart of persistencekit's kvtest)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from functools import partial

import anyio
import pytest

from runkit.persistence import Conflict, Keyspace, PersistenceError, Provider

from ._machines import run_keyspace_machine
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

__all__ = ["KeyspaceSuite"]


async def _items(keyspace: Keyspace) -> dict[bytes, tuple[bytes, str]]:
    items: dict[bytes, tuple[bytes, str]] = {}
    async for key, value, revision in keyspace.range():
        assert key not in items, f"range yielded {key!r} twice"
        items[key] = (value, revision)
    return items


async def _first_key(keyspace: Keyspace) -> None:
    async with aclosing(keyspace.range()) as pairs:  # type: ignore[type-var]
        async for _ in pairs:
            await anyio.sleep(10)  # cancelled here if the fetch was not


def _repeated(revision: str, when: str) -> str:
    return (
        f"revision {revision!r} came back {when}: revisions must never repeat for a key. "
        "A generation counter that restarts after a delete, a counter kept per provider "
        "(per process: another node hands out the same ones), or a hash of the value "
        "(such as an S3 ETag), repeats; store a random token (uuid.uuid4().hex) with the value"
    )


class _Revisions:
    """The revisions one key was given, each checked to be new."""

    def __init__(self, how: str = "") -> None:
        self._seen: set[str] = set()
        self._how = how

    def new(self, revision: str, when: str = "") -> str:
        assert revision, "a write of a non-empty value returned the empty revision"
        when = when or " ".join(filter(None, ["after other writes of the key", self._how]))
        assert revision not in self._seen, _repeated(revision, when)
        self._seen.add(revision)
        return revision


async def _conflicts(call: Awaitable[object]) -> bool:
    """Whether *call* raises ``Conflict``."""
    try:
        await call
    except Conflict:
        return True
    return False


class KeyspaceSuite(SuiteBase):
    """Contract tests for keyspaces: subclass and supply a ``provider`` fixture.

    An optional ``make_provider`` fixture enables the cross-provider tests.
    """

    @pytest.fixture
    def keyspace_name(self) -> str:
        return unique_name("keyspace")

    @pytest.fixture
    async def keyspace(self, provider: Provider, keyspace_name: str) -> AsyncIterator[Keyspace]:
        async with await provider.keyspaces.open(keyspace_name) as keyspace:
            yield keyspace

    # -- get / has -------------------------------------------------------------------------

    async def test_keyspace_opened_twice_shares_data(
        self, provider: Provider, keyspace: Keyspace, keyspace_name: str
    ) -> None:
        async with await provider.keyspaces.open(keyspace_name) as again:
            assert again.name == keyspace_name
            revision = await keyspace.set(b"<key>", b"<value>", "")
            assert await again.get(b"<key>") == (b"<value>", revision)

    async def test_keyspace_get_missing_key_returns_empty_value_and_revision(
        self, keyspace: Keyspace
    ) -> None:
        assert await keyspace.get(b"<missing>") == (b"", "")

    async def test_keyspace_get_returns_value_and_revision(self, keyspace: Keyspace) -> None:
        revision = await keyspace.set(b"<key>", b"<value>", "")
        assert isinstance(revision, str)
        assert revision
        value, got = await keyspace.get(b"<key>")
        assert type(value) is bytes
        assert (value, got) == (b"<value>", revision)

    async def test_keyspace_get_deleted_key_returns_empty_value_and_revision(
        self, keyspace: Keyspace
    ) -> None:
        revision = await keyspace.set(b"<key>", b"<value>", "")
        assert await keyspace.set(b"<key>", b"", revision) == ""
        assert await keyspace.get(b"<key>") == (b"", "")

    async def test_keyspace_has_reports_presence(self, keyspace: Keyspace) -> None:
        assert not await keyspace.has(b"<key>")
        revision = await keyspace.set(b"<key>", b"<value>", "")
        assert await keyspace.has(b"<key>")
        assert not await keyspace.has(b"<other>")
        await keyspace.set(b"<key>", b"", revision)
        assert not await keyspace.has(b"<key>")

    async def test_keyspace_methods_take_their_parameters_by_keyword(
        self, keyspace: Keyspace
    ) -> None:
        # The contract names the parameters ``key``, ``value`` and ``revision``.
        revision = await keyspace.set(key=b"<key>", value=b"<value>", revision="")
        assert await keyspace.get(key=b"<key>") == (b"<value>", revision)
        assert await keyspace.has(key=b"<key>")
        revision = await keyspace.set_unconditional(key=b"<key>", value=b"<other>")
        assert await keyspace.set(key=b"<key>", value=b"", revision=revision) == ""
        assert not await keyspace.has(key=b"<key>")

    # -- set -------------------------------------------------------------------------------

    @pytest.mark.parametrize("value", [b"<other>", b""], ids=["update", "delete"])
    @pytest.mark.parametrize("revision", ["", "<wrong>"], ids=["empty", "wrong"])
    async def test_keyspace_set_existing_key_at_wrong_revision_raises_conflict(
        self, keyspace: Keyspace, keyspace_name: str, revision: str, value: bytes
    ) -> None:
        # A delete (an empty value) is as conditional as an update.
        current = await keyspace.set(b"<key>", b"<value>", "")
        with pytest.raises(Conflict) as info:
            await keyspace.set(b"<key>", value, revision)
        assert str(info.value) == (
            f"keyspace {keyspace_name!r}: conflict setting key b'<key>' "
            f"at revision {revision!r} (not the key's current revision)"
        )
        assert (info.value.store, info.value.name, info.value.key, info.value.revision) == (
            "keyspace",
            keyspace_name,
            b"<key>",
            revision,
        )
        assert await keyspace.get(b"<key>") == (b"<value>", current)

    async def test_keyspace_set_missing_key_with_revision_raises_conflict(
        self, keyspace: Keyspace
    ) -> None:
        with pytest.raises(Conflict, match=r"at revision '<made-up>'"):
            await keyspace.set(b"<key>", b"<value>", "<made-up>")
        with pytest.raises(Conflict, match=r"at revision '<made-up>'"):
            await keyspace.set(b"<key>", b"", "<made-up>")
        assert not await keyspace.has(b"<key>")

    async def test_keyspace_delete_of_missing_key_with_empty_revision_succeeds(
        self, keyspace: Keyspace
    ) -> None:
        assert await keyspace.set(b"<key>", b"", "") == ""
        assert await keyspace.get(b"<key>") == (b"", "")

    async def test_keyspace_reinsert_after_delete_gets_fresh_revision(
        self, keyspace: Keyspace
    ) -> None:
        first = await keyspace.set(b"<key>", b"<value>", "")
        await keyspace.set(b"<key>", b"", first)
        second = await keyspace.set(b"<key>", b"<value>", "")
        assert second
        assert second != first, _repeated(first, "after the key was deleted and inserted again")
        assert await keyspace.get(b"<key>") == (b"<value>", second)

    async def test_keyspace_stale_revision_from_before_delete_is_rejected(
        self, keyspace: Keyspace
    ) -> None:
        # The ABA hazard: a revision must not come back after delete and re-insert.
        stale = await keyspace.set(b"<key>", b"<value>", "")
        await keyspace.set(b"<key>", b"", stale)
        with pytest.raises(Conflict):
            await keyspace.set(b"<key>", b"<value>", stale)
        current = await keyspace.set(b"<key>", b"<value>", "")
        if not await _conflicts(keyspace.set(b"<key>", b"<other>", stale)):
            pytest.fail(
                _repeated(
                    stale,
                    "after the key was deleted and inserted again (a set at the revision "
                    "from before the delete succeeded)",
                )
            )
        assert await keyspace.get(b"<key>") == (b"<value>", current)

    async def test_keyspace_writing_same_value_changes_revision(self, keyspace: Keyspace) -> None:
        first = await keyspace.set(b"<key>", b"<value>", "")
        second = await keyspace.set(b"<key>", b"<value>", first)
        assert second != first, _repeated(first, "when the same value was written again")
        with pytest.raises(Conflict):
            await keyspace.set(b"<key>", b"<value>", first)
        assert await keyspace.get(b"<key>") == (b"<value>", second)

    async def test_keyspace_revisions_never_repeat(self, keyspace: Keyspace) -> None:
        seen: set[str] = set()
        revision = ""
        for round_ in range(10):
            for value in (b"<a>", b"<a>", b"<b>"):
                revision = await keyspace.set(b"<key>", value, revision)
                assert revision not in seen, _repeated(revision, "after other writes of the key")
                seen.add(revision)
            if round_ % 2:
                revision = await keyspace.set(b"<key>", b"", revision)
            else:
                revision = await keyspace.set_unconditional(b"<key>", b"<c>")
                assert revision not in seen, _repeated(revision, "after other writes of the key")
                seen.add(revision)
        assert len(seen) == 35

    async def test_keyspace_set_keeps_no_reference_to_callers_buffers(
        self, keyspace: Keyspace
    ) -> None:
        key = bytearray(b"<key>")
        value = bytearray(b"<value>")
        revision = await keyspace.set(key, value, "")  # type: ignore[arg-type]
        key[:] = b"<KEY>"
        value[:] = b"<VALUE>"
        assert await keyspace.get(b"<key>") == (b"<value>", revision)
        assert not await keyspace.has(b"<KEY>")

    async def test_keyspace_set_unconditional_changes_value_and_revision_every_time(
        self, keyspace: Keyspace
    ) -> None:
        first = await keyspace.set_unconditional(b"<key>", b"<value>")
        assert first
        assert await keyspace.get(b"<key>") == (b"<value>", first)
        second = await keyspace.set_unconditional(b"<key>", b"<value>")
        assert second, "set_unconditional of a non-empty value returned the empty revision"
        assert second != first, _repeated(first, "when the same value was written again")
        third = await keyspace.set_unconditional(b"<key>", b"<other>")
        assert third not in ("", first, second)
        assert await keyspace.get(b"<key>") == (b"<other>", third)

    async def test_keyspace_set_unconditional_with_empty_value_deletes(
        self, keyspace: Keyspace
    ) -> None:
        await keyspace.set_unconditional(b"<key>", b"<value>")
        assert await keyspace.set_unconditional(b"<key>", b"") == ""
        assert await keyspace.get(b"<key>") == (b"", "")
        assert await keyspace.set_unconditional(b"<key>", b"") == ""

    async def test_keyspace_keys_with_nul_and_high_bytes_are_distinct(
        self, keyspace: Keyspace
    ) -> None:
        # b"a " too: a backend that ignores trailing spaces (a PAD SPACE collation) collides.
        keys = [b"a", b"a\x00", b"\x00a", b"\x00", b"\xff", b"\xff\xfe\x80", b"A", b"a\x00b", b"a "]
        revisions = {}
        for index, key in enumerate(keys):
            revisions[key] = await keyspace.set(key, bytes([index + 1]) * 3, "")
        for index, key in enumerate(keys):
            assert await keyspace.get(key) == (bytes([index + 1]) * 3, revisions[key])
        assert await _items(keyspace) == {
            key: (bytes([index + 1]) * 3, revisions[key]) for index, key in enumerate(keys)
        }

    async def test_keyspace_values_are_stored_byte_for_byte(self, keyspace: Keyspace) -> None:
        # NUL and bytes that are not UTF-8: a driver storing text or C strings mangles them.
        values = [b"\x00", b"a\x00b", b"\xff\xfe\x80", bytes(range(256)), b"a\x00"]
        expected = {}
        for index, value in enumerate(values):
            key = f"<k{index}>".encode()
            expected[key] = (value, await keyspace.set(key, value, ""))
        for key, pair in expected.items():
            assert await keyspace.get(key) == pair
        assert await _items(keyspace) == expected

    async def test_keyspace_keys_of_different_keyspaces_are_isolated(
        self, provider: Provider, keyspace: Keyspace
    ) -> None:
        async with await provider.keyspaces.open(unique_name("keyspace")) as other:
            await keyspace.set(b"<key>", b"<mine>", "")
            assert await other.get(b"<key>") == (b"", "")
            await other.set(b"<key>", b"<theirs>", "")
            assert (await keyspace.get(b"<key>"))[0] == b"<mine>"

    # -- range -----------------------------------------------------------------------------

    async def test_keyspace_range_yields_live_pairs_with_revisions(
        self, keyspace: Keyspace
    ) -> None:
        assert await _items(keyspace) == {}
        r1 = await keyspace.set(b"<k1>", b"<v1>", "")
        r2 = await keyspace.set(b"<k2>", b"<v2>", "")
        r3 = await keyspace.set(b"<k3>", b"<v3>", "")
        await keyspace.set(b"<k3>", b"", r3)
        items = await _items(keyspace)
        assert items == {b"<k1>": (b"<v1>", r1), b"<k2>": (b"<v2>", r2)}
        assert all(type(k) is bytes and type(v) is bytes for k, (v, _) in items.items())

    async def test_keyspace_range_yields_every_key_of_several_pages(
        self, keyspace: Keyspace
    ) -> None:
        # A range that stops after its first page, or repeats or skips a key at a
        # page boundary, shows; so do deleted keys on later pages.
        keys = [f"<k{index:05}>".encode() for index in range(self.range_paging_items)]
        expected: dict[bytes, tuple[bytes, str]] = {}
        for start in range(0, len(keys), RACERS):
            chunk = keys[start : start + RACERS]
            revisions = await gather(*(partial(keyspace.set, key, key, "") for key in chunk))
            for key, revision in zip(chunk, revisions, strict=True):
                assert isinstance(revision, str), revision
                expected[key] = (key, revision)
        for key in keys[::97]:
            await keyspace.set(key, b"", expected.pop(key)[1])
        assert await _items(keyspace) == expected

    async def test_keyspace_range_stops_when_consumer_breaks(self, keyspace: Keyspace) -> None:
        for index in range(5):
            await keyspace.set(f"<k{index}>".encode(), b"<v>", "")
        count = 0
        async with aclosing(keyspace.range()) as pairs:  # type: ignore[type-var]
            async for _ in pairs:
                count += 1
                if count == 2:
                    break
        assert count == 2
        await keyspace.set(b"<after>", b"<v>", "")
        assert len(await _items(keyspace)) == 6

    async def test_keyspace_range_allows_reads_and_writes_in_the_loop(
        self, keyspace: Keyspace
    ) -> None:
        for index in range(5):
            await keyspace.set(f"<k{index}>".encode(), b"<v>", "")
        async for key, value, revision in keyspace.range():
            assert await keyspace.get(key) == (value, revision)
            assert await keyspace.has(key)
            await keyspace.set(key, b"<updated>", revision)
        items = await _items(keyspace)
        assert {k: v for k, (v, _) in items.items()} == {
            f"<k{index}>".encode(): b"<updated>" for index in range(5)
        }

    # -- visibility ------------------------------------------------------------------------

    async def test_keyspace_writes_are_visible_to_other_provider(
        self, keyspace: Keyspace, keyspace_name: str, other_provider: Provider
    ) -> None:
        seen = _Revisions("through two providers")
        async with await other_provider.keyspaces.open(keyspace_name) as other:
            revision = seen.new(await keyspace.set(b"<key>", b"<value>", ""))
            assert await other.get(b"<key>") == (b"<value>", revision)
            assert await other.has(b"<key>")
            assert await _items(other) == {b"<key>": (b"<value>", revision)}
            revision = seen.new(await other.set(b"<key>", b"<theirs>", revision))
            assert await keyspace.get(b"<key>") == (b"<theirs>", revision)
            revision = seen.new(await keyspace.set_unconditional(b"<key>", b"<forced>"))
            assert await other.get(b"<key>") == (b"<forced>", revision)
            await other.set(b"<key>", b"", revision)
            assert not await keyspace.has(b"<key>")
            assert await _items(keyspace) == {}
            revision = seen.new(await other.set(b"<key>", b"<value>", ""))
            assert await keyspace.get(b"<key>") == (b"<value>", revision)

    async def test_keyspace_revision_is_stale_after_another_provider_deletes_and_reinserts(
        self, keyspace: Keyspace, keyspace_name: str, other_provider: Provider
    ) -> None:
        # Two nodes: A reads a revision, B deletes the key and inserts it again.
        # Revisions from a counter kept per provider (per process) come back on
        # the other provider, and then A's stale write would succeed.
        seen = _Revisions("through two providers")
        async with await other_provider.keyspaces.open(keyspace_name) as other:
            stale = seen.new(await keyspace.set(b"<key>", b"<value>", ""))
            await other.set(b"<key>", b"", stale)
            current = seen.new(
                await other.set(b"<key>", b"<value>", ""),
                "from another provider after the key was deleted and inserted again",
            )
            if not await _conflicts(keyspace.set(b"<key>", b"<stale>", stale)):
                pytest.fail(
                    _repeated(
                        stale,
                        "on another provider after it deleted the key and inserted it again "
                        "(a set at the revision from before the delete succeeded)",
                    )
                )
            assert await other.get(b"<key>") == (b"<value>", current)
            # Writes alternating between the providers, the same value each time.
            for round_ in range(6):
                writer = (keyspace, other)[round_ % 2]
                if round_ == 3:
                    current = seen.new(await writer.set_unconditional(b"<key>", b"<value>"))
                else:
                    current = seen.new(await writer.set(b"<key>", b"<value>", current))
            assert await keyspace.get(b"<key>") == (b"<value>", current)

    # -- concurrency -----------------------------------------------------------------------

    async def test_keyspace_racing_sets_at_one_revision_have_exactly_one_winner(
        self, keyspace: Keyspace, keyspace_name: str, racing_providers: list[Provider]
    ) -> None:
        # Handles of two providers if the driver has ``make_provider``, else of one.
        handles = [
            await p.keyspaces.open(keyspace_name)
            for p in racing_providers
            for _ in range(RACERS // (2 * len(racing_providers)))
        ]
        seen = _Revisions("racing through several handles")
        try:
            revision = ""  # the first round races to create the key
            for round_ in range(ROUNDS):
                writers = [keyspace, *handles] * 2
                calls = [
                    partial(w.set, b"<k>", f"<{round_}-{i}>".encode(), revision)
                    for i, w in enumerate(writers)
                ]
                results = await gather(*calls)
                winners = [(i, r) for i, r in enumerate(results) if isinstance(r, str)]
                assert len(winners) == 1, results
                assert all(isinstance(r, Conflict) for r in results if not isinstance(r, str))
                index, revision = winners[0]
                seen.new(revision)
                assert await keyspace.get(b"<k>") == (f"<{round_}-{index}>".encode(), revision)
        finally:
            for handle in handles:
                await handle.close()

    async def test_keyspace_racing_deletes_at_one_revision_have_exactly_one_winner(
        self, keyspace: Keyspace
    ) -> None:
        seen = _Revisions()
        for _ in range(ROUNDS):
            revision = seen.new(await keyspace.set(b"<k>", b"<v>", ""))
            results = await gather(
                *[partial(keyspace.set, b"<k>", b"", revision) for _ in range(RACERS)]
            )
            assert results.count("") == 1, results
            assert all(isinstance(r, Conflict) for r in results if r != "")
            assert not await keyspace.has(b"<k>")

    # -- cancellation ----------------------------------------------------------------------

    @pytest.mark.parametrize("when", ["before", "in-flight"])
    async def test_keyspace_cancelled_set_lands_whole_or_not_at_all(
        self, provider: Provider, keyspace: Keyspace, keyspace_name: str, when: str
    ) -> None:
        # Like a cancelled journal append: the old value and revision, or the
        # new ones, never a mixture; and the handle and provider keep working.
        value, revision = b"", ""
        for round_ in range(3):
            new = f"<value-{round_}>".encode() * 64
            cancelled = await cancel_call(when, partial(keyspace.set, b"<key>", new, revision))
            current, current_revision = await keyspace.get(b"<key>")
            if current == new:
                assert current_revision not in ("", revision)
            else:
                assert cancelled, "set returned normally but its value is missing"
                assert (current, current_revision) == (value, revision)
                try:
                    current_revision = await keyspace.set(b"<key>", new, revision)
                except Conflict:
                    pytest.fail(landed_after_cancel("set"))
            value, revision = new, current_revision
            await cancel_call(when, partial(keyspace.get, b"<key>"))
            await cancel_call(when, partial(keyspace.has, b"<key>"))
            await cancel_call(when, partial(_first_key, keyspace))
            assert await keyspace.get(b"<key>") == (value, revision)
        async with await provider.keyspaces.open(keyspace_name) as again:
            assert await again.get(b"<key>") == (value, revision)
            assert await again.set(b"<key>", b"", revision) == ""
        assert not await keyspace.has(b"<key>")

    # -- faults ----------------------------------------------------------------------------

    async def test_keyspace_set_retried_after_ambiguous_failure_conflicts_and_reads_ours(
        self, provider: Provider, keyspace_name: str
    ) -> None:
        plan = FaultPlan()
        plan.fail(AFTER, ops={"set"}, nth=1)
        keyspace = await FaultyProvider(provider, plan).keyspaces.open(keyspace_name)
        with pytest.raises(InjectedFault, match="after set on keyspace") as info:
            await keyspace.set(b"<key>", b"<ours>", "")
        assert info.value.ambiguous
        with pytest.raises(Conflict):
            await keyspace.set(b"<key>", b"<ours>", "")
        value, revision = await keyspace.get(b"<key>")
        assert value == b"<ours>"
        assert revision

    async def test_keyspace_set_failed_before_it_happens_changes_nothing(
        self, provider: Provider, keyspace_name: str
    ) -> None:
        plan = FaultPlan()
        plan.fail(BEFORE, ops={"set", "set_unconditional"}, kinds={"keyspace"}, times=2)
        keyspace = await FaultyProvider(provider, plan).keyspaces.open(keyspace_name)
        with pytest.raises(InjectedFault, match="before set on keyspace"):
            await keyspace.set(b"<key>", b"<value>", "")
        with pytest.raises(InjectedFault, match="before set_unconditional on keyspace"):
            await keyspace.set_unconditional(b"<key>", b"<value>")
        assert await keyspace.get(b"<key>") == (b"", "")
        assert await keyspace.set(b"<key>", b"<value>", "")
        assert plan.injected_before == 2

    # -- closed ----------------------------------------------------------------------------

    async def test_keyspace_closed_handle_raises(
        self, provider: Provider, keyspace_name: str
    ) -> None:
        keyspace = await provider.keyspaces.open(keyspace_name)
        revision = await keyspace.set(b"<key>", b"<value>", "")
        await keyspace.close()
        with pytest.raises(PersistenceError, match="closed"):
            await keyspace.get(b"<key>")
        with pytest.raises(PersistenceError, match="closed"):
            await keyspace.has(b"<key>")
        with pytest.raises(PersistenceError, match="closed"):
            await keyspace.set(b"<key>", b"<other>", revision)
        with pytest.raises(PersistenceError, match="closed"):
            await keyspace.set_unconditional(b"<key>", b"<other>")
        with pytest.raises(PersistenceError, match="closed"):
            await _items(keyspace)
        async with await provider.keyspaces.open(keyspace_name) as again:
            assert await again.get(b"<key>") == (b"<value>", revision)

    # -- model-based -----------------------------------------------------------------------

    async def test_keyspace_behaves_like_model(self, provider: Provider) -> None:
        await run_keyspace_machine(provider, self.hypothesis_settings)
