"""The in-memory provider: the reference implementation of the persistence contract.

Data lives in *silos*. Providers built with the same silo name in one process
share data through a process-wide registry, which is how ``memory:///<silo>``
URLs resolve; a provider built without a name gets a private silo.

Every operation does all its work inside a short ``threading.Lock`` critical
section with no awaits, after yielding to the scheduler (a checkpoint, where a
cancelled caller stops): journal operations on every call, keyspace and set
operations once in ``_YIELD_EVERY`` calls. Calls that do not yield complete
without scheduling, as an in-flight write of any driver may; a task looping
over them still lets others run and, if cancelled, stops within that many
calls. A yield per keyspace call cost a loop round trip (or, checking for
cancellation alone, a walk up the caller's cancel scopes on asyncio) for each
of a process instance's reads and writes: about a tenth of the engine's CPU on
the bank workload. Journal calls keep theirs, opens and reads included: the
stream writer's appends and the materialiser's journal calls are where the
batch loop gathers the next record's work, and without those yields the
single-aggregate workload's records got smaller and its CPU per command rose
by a tenth or more. A thread lock rather than an ``anyio.Lock`` because a silo
may be shared by event loops in several threads (an ``anyio.Lock`` belongs to
one loop), and because nothing awaits while holding it. Inputs are copied in
and out, so callers never share buffers with the store.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Final

import attrs
from anyio.lowlevel import checkpoint

from runkit.persistence import (
    Conflict,
    Interval,
    Journal,
    JournalStore,
    Keyspace,
    KeyspaceStore,
    Limits,
    PersistenceError,
    Provider,
    RecordNotFound,
    Set,
    SetStore,
    check_position,
)

__all__ = ["MemoryProvider"]

#: Journal ``range`` copies at most this many records per critical section, so a
#: long iteration never holds the lock for long and sees later truncations.
_PAGE_SIZE: Final = 64


#: Keyspace and set operations between two yields to the scheduler (see the module docstring).
_YIELD_EVERY: Final = 16

# ``next`` on a count is atomic under the GIL; silos may be shared across threads.
_operations = itertools.count()


async def _enter() -> None:
    """Yield to the scheduler (a checkpoint) once in ``_YIELD_EVERY`` calls (keyspaces, sets)."""
    if not next(_operations) % _YIELD_EVERY:
        await checkpoint()


# A random prefix per process and a counter: revisions never repeat, across
# deletes and identical values alike (silos live in one process), and cost no
# CSPRNG read per write.
_REVISION_PREFIX: Final = uuid.uuid4().hex[:16]
_revisions = itertools.count(1)


def _new_revision() -> str:
    return f"{_REVISION_PREFIX}{next(_revisions):x}"


@attrs.define(eq=False)
class _JournalData:
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    begin: int = 0
    records: list[bytes] = attrs.field(factory=list)  # records[i] is at begin + i

    @property
    def end(self) -> int:
        return self.begin + len(self.records)


@attrs.define(eq=False)
class _KeyspaceData:
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    pairs: dict[bytes, tuple[bytes, str]] = attrs.field(factory=dict)


@attrs.define(eq=False)
class _SetData:
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    members: set[bytes] = attrs.field(factory=set)


@attrs.define(eq=False)
class _Silo:
    """All the stores of one silo, created on first open."""

    lock: threading.Lock = attrs.field(factory=threading.Lock)
    journals: dict[str, _JournalData] = attrs.field(factory=dict)
    keyspaces: dict[str, _KeyspaceData] = attrs.field(factory=dict)
    sets: dict[str, _SetData] = attrs.field(factory=dict)


_registry_lock = threading.Lock()
_registry: dict[str, _Silo] = {}


def _silo(name: str | None) -> _Silo:
    if name is None:
        return _Silo()
    with _registry_lock:
        silo = _registry.get(name)
        if silo is None:
            silo = _registry[name] = _Silo()
        return silo


_StoreData = _JournalData | _KeyspaceData | _SetData


class _Closable:
    """Shared closed-state checks for handles (a handle is also closed with its provider).

    A read-only provider's handle of a name not in the silo holds an empty,
    unregistered placeholder (``_unresolved`` is the silo's stores of that
    kind). Every operation calls ``_check_open`` before it touches ``_data``,
    which then looks the name up again: once a writable provider has created
    the store, the handle reads it, as a handle of any provider must see every
    acknowledged write.
    """

    _kind: str
    _name: str
    _provider: MemoryProvider
    _closed: bool
    _data: _StoreData
    _unresolved: Mapping[str, _StoreData] | None = None

    @property
    def name(self) -> str:
        return self._name

    async def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise PersistenceError(f"{self._kind} {self._name!r}: handle is closed")
        self._provider._check_open()
        if self._unresolved is not None:
            self._resolve(self._unresolved)

    def _resolve(self, stores: Mapping[str, _StoreData]) -> None:
        with self._provider._silo.lock:
            data = stores.get(self._name)
        if data is not None:
            self._data = data
            self._unresolved = None

    def _check_writable(self, operation: str) -> None:
        """``_check_open``, and refuse *operation* (a write) on a read-only provider."""
        self._check_open()
        self._provider.refuse_if_read_only(f"{self._kind} {self._name!r}: {operation}")

    def __repr__(self) -> str:
        state = " (closed)" if self._closed else ""
        return f"<memory {self._kind} {self._name!r}{state}>"


class _MemoryJournal(_Closable, Journal):
    _kind = "journal"

    _data: _JournalData

    def __init__(
        self,
        provider: MemoryProvider,
        name: str,
        data: _JournalData,
        unresolved: Mapping[str, _JournalData] | None = None,
    ) -> None:
        self._provider = provider
        self._name = name
        self._data = data
        self._closed = False
        self._unresolved = unresolved

    async def bounds(self) -> Interval:
        await checkpoint()
        self._check_open()
        d = self._data
        with d.lock:
            return Interval(d.begin, d.end)

    async def get(self, pos: int) -> bytes:
        await checkpoint()
        self._check_open()
        d = self._data
        with d.lock:
            if d.begin <= pos < d.end:
                return d.records[pos - d.begin]  # bytes are immutable: no copy needed
        raise RecordNotFound(self._name, pos)

    async def range(self, pos: int) -> AsyncIterator[tuple[int, bytes]]:
        await checkpoint()
        self._check_open()
        d = self._data
        first = True
        while True:
            with d.lock:
                if not d.begin <= pos < d.end:
                    # Not live: an error on the first step or if truncation overtook
                    # us; otherwise we reached the end.
                    if first or pos < d.begin:
                        raise RecordNotFound(self._name, pos)
                    return
                offset = pos - d.begin
                page = d.records[offset : offset + _PAGE_SIZE]
            first = False
            for record in page:
                yield pos, record
                pos += 1
            self._check_open()

    async def append(self, pos: int, record: bytes) -> None:
        pos = check_position(pos)
        record = self._provider.limits.check_record(record)
        await checkpoint()
        self._check_writable("append")
        d = self._data
        with d.lock:
            if pos != d.end:
                raise Conflict.journal(self._name, pos)
            d.records.append(record)

    async def truncate(self, pos: int) -> None:
        pos = check_position(pos)
        await checkpoint()
        self._check_writable("truncate")
        d = self._data
        with d.lock:
            if pos > d.end:
                raise ValueError(
                    f"journal {self._name!r}: cannot truncate to position {pos}, "
                    f"past the end ({d.end})"
                )
            if pos > d.begin:
                del d.records[: pos - d.begin]
                d.begin = pos


class _MemoryKeyspace(_Closable, Keyspace):
    _kind = "keyspace"

    _data: _KeyspaceData

    def __init__(
        self,
        provider: MemoryProvider,
        name: str,
        data: _KeyspaceData,
        unresolved: Mapping[str, _KeyspaceData] | None = None,
    ) -> None:
        self._provider = provider
        self._name = name
        self._data = data
        self._closed = False
        self._unresolved = unresolved

    async def get(self, key: bytes) -> tuple[bytes, str]:
        key = self._provider.limits.check_key(key)
        await _enter()
        self._check_open()
        d = self._data
        with d.lock:
            return d.pairs.get(key, (b"", ""))

    async def has(self, key: bytes) -> bool:
        key = self._provider.limits.check_key(key)
        await _enter()
        self._check_open()
        d = self._data
        with d.lock:
            return key in d.pairs

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        limits = self._provider.limits
        key = limits.check_key(key)
        value = limits.check_value(value)
        if not isinstance(revision, str):
            raise TypeError(f"revision must be str, not {type(revision).__name__}")
        await _enter()
        self._check_writable("set")
        d = self._data
        with d.lock:
            current = d.pairs.get(key, (b"", ""))[1]
            if revision != current:
                raise Conflict.keyspace(self._name, key, revision)
            return self._store(key, value)

    async def set_unconditional(self, key: bytes, value: bytes) -> str:
        limits = self._provider.limits
        key = limits.check_key(key)
        value = limits.check_value(value)
        await _enter()
        self._check_writable("set_unconditional")
        with self._data.lock:
            return self._store(key, value)

    def _store(self, key: bytes, value: bytes) -> str:
        # Called with the lock held.
        if not value:
            self._data.pairs.pop(key, None)
            return ""
        revision = _new_revision()
        self._data.pairs[key] = (value, revision)
        return revision

    async def range(self) -> AsyncIterator[tuple[bytes, bytes, str]]:
        await _enter()
        self._check_open()
        with self._data.lock:
            snapshot = list(self._data.pairs.items())
        for key, (value, revision) in snapshot:
            yield key, value, revision
            self._check_open()


class _MemorySet(_Closable, Set):
    _kind = "set"

    _data: _SetData

    def __init__(
        self,
        provider: MemoryProvider,
        name: str,
        data: _SetData,
        unresolved: Mapping[str, _SetData] | None = None,
    ) -> None:
        self._provider = provider
        self._name = name
        self._data = data
        self._closed = False
        self._unresolved = unresolved

    async def has(self, member: bytes) -> bool:
        member = self._provider.limits.check_member(member)
        await _enter()
        self._check_open()
        with self._data.lock:
            return member in self._data.members

    async def add(self, member: bytes) -> None:
        await self._try_add(member, "add")

    async def try_add(self, member: bytes) -> bool:
        return await self._try_add(member, "try_add")

    async def _try_add(self, member: bytes, operation: str) -> bool:
        member = self._provider.limits.check_member(member)
        await _enter()
        self._check_writable(operation)
        members = self._data.members
        with self._data.lock:
            if member in members:
                return False
            members.add(member)
            return True

    async def remove(self, member: bytes) -> None:
        await self._try_remove(member, "remove")

    async def try_remove(self, member: bytes) -> bool:
        return await self._try_remove(member, "try_remove")

    async def _try_remove(self, member: bytes, operation: str) -> bool:
        member = self._provider.limits.check_member(member)
        await _enter()
        self._check_writable(operation)
        members = self._data.members
        with self._data.lock:
            if member not in members:
                return False
            members.remove(member)
            return True

    async def range(self) -> AsyncIterator[bytes]:
        await _enter()
        self._check_open()
        with self._data.lock:
            snapshot = list(self._data.members)
        for member in snapshot:
            yield member
            self._check_open()


class _MemoryJournalStore(JournalStore):
    def __init__(self, provider: MemoryProvider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Journal:
        name = self._provider.limits.check_name("journal", name)
        await checkpoint()
        self._provider._check_open()
        silo = self._provider._silo
        with silo.lock:
            data = silo.journals.get(name)
            if data is None:
                data = _JournalData()
                if self._provider.read_only:
                    # An inspection tool: a name never opened reads as empty and is
                    # not created; the handle looks it up again on every call.
                    return _MemoryJournal(self._provider, name, data, silo.journals)
                silo.journals[name] = data
        return _MemoryJournal(self._provider, name, data)


class _MemoryKeyspaceStore(KeyspaceStore):
    def __init__(self, provider: MemoryProvider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Keyspace:
        name = self._provider.limits.check_name("keyspace", name)
        await _enter()
        self._provider._check_open()
        silo = self._provider._silo
        with silo.lock:
            data = silo.keyspaces.get(name)
            if data is None:
                data = _KeyspaceData()
                if self._provider.read_only:
                    # An inspection tool: a name never opened reads as empty and is
                    # not created; the handle looks it up again on every call.
                    return _MemoryKeyspace(self._provider, name, data, silo.keyspaces)
                silo.keyspaces[name] = data
        return _MemoryKeyspace(self._provider, name, data)


class _MemorySetStore(SetStore):
    def __init__(self, provider: MemoryProvider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Set:
        name = self._provider.limits.check_name("set", name)
        await _enter()
        self._provider._check_open()
        silo = self._provider._silo
        with silo.lock:
            data = silo.sets.get(name)
            if data is None:
                data = _SetData()
                if self._provider.read_only:
                    # An inspection tool: a name never opened reads as empty and is
                    # not created; the handle looks it up again on every call.
                    return _MemorySet(self._provider, name, data, silo.sets)
                silo.sets[name] = data
        return _MemorySet(self._provider, name, data)


class MemoryProvider(Provider):
    """A provider that keeps everything in this process's memory.

    Args:
        silo: Providers constructed with the same silo name share data
            (``memory:///<silo>`` URLs use this). ``None`` gives a private silo
            that no other provider can reach.
        limits: The sizes this provider accepts; the defaults suit tests of the
            engine. Inputs over a limit raise ``LimitExceeded`` before anything
            is changed.

    After ``close()`` every operation, through this provider or any handle it
    opened, raises ``PersistenceError``; the silo's data stays for other
    providers.
    After ``set_read_only()`` every write raises ``PersistenceError`` and a
    name never opened reads as empty without being created; its handle reads
    the store once another provider of the silo creates it.
    """

    def __init__(self, silo: str | None = None, *, limits: Limits | None = None) -> None:
        if silo is not None and (not isinstance(silo, str) or not silo):
            raise ValueError(f"memory silo name must be a non-empty str, not {silo!r}")
        self._silo_name = silo
        self._silo = _silo(silo)
        self._limits = limits if limits is not None else Limits()
        self._closed = False
        self._journals = _MemoryJournalStore(self)
        self._keyspaces = _MemoryKeyspaceStore(self)
        self._sets = _MemorySetStore(self)

    @property
    def silo(self) -> str | None:
        """The silo name, or ``None`` for a private silo."""
        return self._silo_name

    @property
    def journals(self) -> JournalStore:
        return self._journals

    @property
    def keyspaces(self) -> KeyspaceStore:
        return self._keyspaces

    @property
    def sets(self) -> SetStore:
        return self._sets

    @property
    def limits(self) -> Limits:
        return self._limits

    async def provision(self) -> None:
        # Nothing to create; still honour cancellation and the closed state.
        await _enter()
        self._check_open()

    async def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise PersistenceError(f"{self!r} is closed")

    def __repr__(self) -> str:
        where = f"memory:///{self._silo_name}" if self._silo_name else "private silo"
        return f"<MemoryProvider {where}>"
