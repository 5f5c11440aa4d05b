"""Hypothesis state machines that check each primitive against an in-memory model.

Hypothesis state machines are synchronous, so each machine runs in a worker
thread (``anyio.to_thread.run_sync``) and its rules call the async store through
``anyio.from_thread.run``; this works on asyncio and trio alike. Every example
uses fresh store names.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
import hypothesis
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from runkit.persistence import (
    MAX_POSITION,
    Conflict,
    Interval,
    Journal,
    Keyspace,
    Provider,
    RecordNotFound,
    Set,
)

from ._support import unique_name

__all__ = ["run_journal_machine", "run_keyspace_machine", "run_set_machine"]

T = TypeVar("T")

_records = st.binary(max_size=24)
# A small pool, so operations collide on the same keys and members often; it
# includes NUL and high bytes.
_keys = st.sampled_from([b"a", b"b", b"ab", b"\x00", b"a\x00", b"\xff\xfe", b"\x80"])
_values = st.binary(min_size=1, max_size=16)


def _call(fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    return anyio.from_thread.run(fn, *args)


async def _drain_journal(
    journal: Journal, position: int, stop: int | None
) -> list[tuple[int, bytes]]:
    items = []
    async with aclosing(journal.range(position)) as records:  # type: ignore[type-var]
        async for item in records:
            items.append(item)
            if stop is not None and len(items) >= stop:
                break
    return items


async def _drain(iterator_factory: Callable[[], Any]) -> list[Any]:
    return [item async for item in iterator_factory()]


async def _run(machine: type[RuleBasedStateMachine], settings: hypothesis.settings) -> None:
    def run() -> None:
        run_state_machine_as_test(machine, settings=settings)

    await anyio.to_thread.run_sync(run)


async def run_journal_machine(provider: Provider, settings: hypothesis.settings) -> None:
    """Check a journal against a model: bounds, get, range, append (incl. conflicts), truncate."""

    class JournalMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.journal = _call(provider.journals.open, unique_name("journal-model"))
            self.begin = 0
            self.records: list[bytes] = []  # every record ever appended, by position

        @property
        def end(self) -> int:
            return len(self.records)

        def teardown(self) -> None:
            _call(self.journal.close)

        @invariant()
        def bounds_match(self) -> None:
            assert _call(self.journal.bounds) == Interval(self.begin, self.end)

        @precondition(lambda self: self.begin < self.end)
        @rule(data=st.data())
        def get_live(self, data: st.DataObject) -> None:
            position = data.draw(st.integers(self.begin, self.end - 1), label="position")
            assert _call(self.journal.get, position) == self.records[position]

        @rule(data=st.data())
        def get_not_live(self, data: st.DataObject) -> None:
            position = data.draw(self._not_live(), label="position")
            with pytest.raises(RecordNotFound):
                _call(self.journal.get, position)

        @precondition(lambda self: self.begin < self.end)
        @rule(data=st.data())
        def range_from_live(self, data: st.DataObject) -> None:
            position = data.draw(st.integers(self.begin, self.end - 1), label="position")
            stop = data.draw(st.none() | st.integers(1, 3), label="stop after")
            expected = list(enumerate(self.records))[position:]
            if stop is not None:
                expected = expected[:stop]
            assert _call(_drain_journal, self.journal, position, stop) == expected

        @rule(data=st.data())
        def range_from_not_live(self, data: st.DataObject) -> None:
            position = data.draw(self._not_live(), label="position")
            with pytest.raises(RecordNotFound):
                _call(_drain_journal, self.journal, position, None)

        @rule(record=_records)
        def append(self, record: bytes) -> None:
            _call(self.journal.append, self.end, record)
            self.records.append(record)

        @precondition(lambda self: self.end > 0)
        @rule(data=st.data(), record=_records)
        def append_conflicts_below_end(self, data: st.DataObject, record: bytes) -> None:
            # Occupied and truncated positions alike.
            position = data.draw(st.integers(0, self.end - 1), label="position")
            with pytest.raises(Conflict):
                _call(self.journal.append, position, record)

        @rule(data=st.data(), record=_records)
        def append_conflicts_past_end(self, data: st.DataObject, record: bytes) -> None:
            position = data.draw(st.integers(self.end + 1, self.end + 3), label="position")
            with pytest.raises(Conflict):
                _call(self.journal.append, position, record)

        @rule(data=st.data())
        def truncate(self, data: st.DataObject) -> None:
            # Some, all, or already-truncated positions (a no-op).
            position = data.draw(st.integers(0, self.end), label="position")
            _call(self.journal.truncate, position)
            self.begin = max(self.begin, position)

        def _not_live(self) -> st.SearchStrategy[int]:
            options = [st.integers(self.end, self.end + 3), st.just(MAX_POSITION)]
            if self.begin > 0:
                options.append(st.integers(0, self.begin - 1))
            return st.one_of(options)

    await _run(JournalMachine, settings)


async def run_keyspace_machine(provider: Provider, settings: hypothesis.settings) -> None:
    """Check a keyspace against a model, including that revisions never repeat for a key."""

    class KeyspaceMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.keyspace: Keyspace = _call(provider.keyspaces.open, unique_name("keyspace-model"))
            self.pairs: dict[bytes, tuple[bytes, str]] = {}
            # Every revision ever returned, by key: they never repeat for a key,
            # but the contract lets different keys share one.
            self.revisions: dict[bytes, set[str]] = {}

        def teardown(self) -> None:
            _call(self.keyspace.close)

        def _new_revision(self, key: bytes, revision: str) -> None:
            assert revision, "a write of a non-empty value must return a non-empty revision"
            seen = self.revisions.setdefault(key, set())
            assert revision not in seen, f"revision {revision!r} repeated for key {key!r}"
            seen.add(revision)

        @rule(key=_keys)
        def get(self, key: bytes) -> None:
            assert _call(self.keyspace.get, key) == self.pairs.get(key, (b"", ""))

        @rule(key=_keys)
        def has(self, key: bytes) -> None:
            assert _call(self.keyspace.has, key) is (key in self.pairs)

        @rule(key=_keys, value=_values, same=st.booleans())
        def set_at_current_revision(self, key: bytes, value: bytes, same: bool) -> None:
            current = self.pairs.get(key, (b"", ""))
            if same and current[1]:
                value = current[0]  # the same value again still gets a new revision
            revision = _call(self.keyspace.set, key, value, current[1])
            self._new_revision(key, revision)
            self.pairs[key] = (value, revision)

        @rule(key=_keys)
        def delete_at_current_revision(self, key: bytes) -> None:
            current = self.pairs.pop(key, (b"", ""))
            assert _call(self.keyspace.set, key, b"", current[1]) == ""

        @rule(key=_keys, value=st.binary(max_size=16), data=st.data())
        def set_at_stale_revision_conflicts(
            self, key: bytes, value: bytes, data: st.DataObject
        ) -> None:
            current = self.pairs.get(key, (b"", ""))[1]
            # Any key's revision but this key's current one (another key's may equal it).
            stale = sorted({r for seen in self.revisions.values() for r in seen} - {current})
            if current:
                stale.append("")
            if not stale:
                stale.append("no-such-revision")
            revision = data.draw(st.sampled_from(stale), label="stale revision")
            with pytest.raises(Conflict) as info:
                _call(self.keyspace.set, key, value, revision)
            assert info.value.revision == revision
            assert info.value.key == key

        @rule(key=_keys, value=st.binary(max_size=16))
        def set_unconditional(self, key: bytes, value: bytes) -> None:
            revision = _call(self.keyspace.set_unconditional, key, value)
            if value:
                self._new_revision(key, revision)
                self.pairs[key] = (value, revision)
            else:
                assert revision == ""
                self.pairs.pop(key, None)

        @rule()
        def range(self) -> None:
            items = _call(_drain, self.keyspace.range)
            assert len(items) == len(self.pairs)
            assert {k: (v, r) for k, v, r in items} == self.pairs

    await _run(KeyspaceMachine, settings)


async def run_set_machine(provider: Provider, settings: hypothesis.settings) -> None:
    """Check a set against a model over all six operations."""

    class SetMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.set: Set = _call(provider.sets.open, unique_name("set-model"))
            self.members: set[bytes] = set()

        def teardown(self) -> None:
            _call(self.set.close)

        @rule(member=_keys)
        def has(self, member: bytes) -> None:
            assert _call(self.set.has, member) is (member in self.members)

        @rule(member=_keys)
        def add(self, member: bytes) -> None:
            _call(self.set.add, member)
            self.members.add(member)

        @rule(member=_keys)
        def try_add(self, member: bytes) -> None:
            assert _call(self.set.try_add, member) is (member not in self.members)
            self.members.add(member)

        @rule(member=_keys)
        def remove(self, member: bytes) -> None:
            _call(self.set.remove, member)
            self.members.discard(member)

        @rule(member=_keys)
        def try_remove(self, member: bytes) -> None:
            assert _call(self.set.try_remove, member) is (member in self.members)
            self.members.discard(member)

        @rule()
        def range(self) -> None:
            items = _call(_drain, self.set.range)
            assert len(items) == len(self.members)
            assert set(items) == self.members

    await _run(SetMachine, settings)
