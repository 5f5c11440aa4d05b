"""The provider contract: three kinds of store, opened by name.

Every method is a coroutine (anyio: asyncio and trio). Every write is one
conditional operation on one object; there are no cross-store transactions.
Handles are safe to share between tasks, and every acknowledged write is
visible to every other handle and provider on the same backend
(read-your-writes). Inputs are validated against ``Provider.limits`` before any
I/O. Returned ``bytes`` are always independent copies.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Generic, Self, TypeVar

from ._errors import PersistenceError
from ._types import Interval, Limits

__all__ = [
    "Handle",
    "Journal",
    "JournalStore",
    "Keyspace",
    "KeyspaceStore",
    "Provider",
    "Set",
    "SetStore",
    "Store",
]


class Handle(abc.ABC):
    """An open store. Use as an async context manager, or call ``close()``."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The name the store was opened with."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the handle. Idempotent; other handles of the name are unaffected."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Journal(Handle):
    """An append-only sequence of records at dense positions starting at 0.

    Positions are ``int`` in ``[0, 2**63-1]``. ``[begin, end)`` are live; those
    below ``begin`` were truncated.
    """

    @abc.abstractmethod
    async def bounds(self) -> Interval:
        """Return ``[begin, end)``, reflecting every write acknowledged before the call.

        A fresh journal gives ``[0, 0)``; after ``truncate(end)`` it gives ``[end, end)``.
        """

    @abc.abstractmethod
    async def get(self, pos: int) -> bytes:
        """Return the record at *pos*.

        Raises ``RecordNotFound`` if it was never written, was truncated, or
        *pos* is outside the valid range (never an overflow error).
        """

    @abc.abstractmethod
    def range(self, pos: int) -> AsyncIterator[tuple[int, bytes]]:
        """Iterate ``(position, record)`` from *pos* to the end, ascending, gap-free.

        Raises ``RecordNotFound`` on the first step if *pos* is not live
        (including on an empty journal), and if a truncation overtakes the
        iteration. Pages internally and holds no connection between pages, so
        the consumer may be slow or stop early.

        The iterator has ``aclose()`` (drivers normally write ``range`` as an
        async generator). A consumer that stops early closes it, for example
        with ``contextlib.aclosing``: trio warns about async generators that
        are garbage-collected unfinished.
        """

    @abc.abstractmethod
    async def append(self, pos: int, record: bytes) -> None:
        """Append *record* at *pos*, which must equal the journal's end.

        Raises ``Conflict`` (changing nothing) for any other position, including
        truncated positions and positions past the end. Empty records are allowed.
        """

    @abc.abstractmethod
    async def truncate(self, pos: int) -> None:
        """Remove every record below *pos*.

        Idempotent; a no-op when ``position <= begin``; ``ValueError`` when
        ``position > end``. After a normal return no handle can read a position
        below *pos*. After an error it may be partly applied; calling again
        completes it.
        """


class Keyspace(Handle):
    """A map from non-empty ``bytes`` keys to ``bytes`` values with per-key revisions.

    Revisions are opaque non-empty strings that never repeat for a key: not
    after a delete and re-insert, not when the same value is written again.
    A missing key has revision ``""``.
    """

    @abc.abstractmethod
    async def get(self, key: bytes) -> tuple[bytes, str]:
        """Return ``(value, revision)``; ``(b"", "")`` when the key is absent."""

    @abc.abstractmethod
    async def has(self, key: bytes) -> bool:
        """Return whether the key is present."""

    @abc.abstractmethod
    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        """Set *key* to *value* if its current revision is *revision*; return the new one.

        ``revision == ""`` means the key must be absent. An empty *value* deletes
        the key and returns ``""`` (deleting an absent key with ``""`` succeeds).
        A mismatch raises ``Conflict`` carrying the supplied revision.
        """

    @abc.abstractmethod
    async def set_unconditional(self, key: bytes, value: bytes) -> str:
        """Set *key* whatever its revision; return the new revision (``""`` on delete)."""

    @abc.abstractmethod
    def range(self) -> AsyncIterator[tuple[bytes, bytes, str]]:
        """Iterate ``(key, value, revision)`` for each live key once, in any order.

        Tolerates writes during iteration (the consumer may call get/has/set);
        keys written during iteration may or may not be seen. Like
        ``Journal.range``, the iterator has ``aclose()``, which a consumer that
        stops early calls.
        """


class Set(Handle):
    """A set of non-empty ``bytes`` members."""

    @abc.abstractmethod
    async def has(self, member: bytes) -> bool:
        """Return whether *member* is present."""

    @abc.abstractmethod
    async def add(self, member: bytes) -> None:
        """Add *member*; no error if it is present."""

    @abc.abstractmethod
    async def try_add(self, member: bytes) -> bool:
        """Add *member*; return ``True`` only if it was absent (exactly one racer wins)."""

    @abc.abstractmethod
    async def remove(self, member: bytes) -> None:
        """Remove *member*; no error if it is absent."""

    @abc.abstractmethod
    async def try_remove(self, member: bytes) -> bool:
        """Remove *member*; return ``True`` only if it was present (exactly one racer wins)."""

    @abc.abstractmethod
    def range(self) -> AsyncIterator[bytes]:
        """Iterate the members, in any order; tolerates writes during iteration.

        Like ``Journal.range``, the iterator has ``aclose()``, which a consumer
        that stops early calls.
        """


H_co = TypeVar("H_co", bound=Handle, covariant=True)


class Store(abc.ABC, Generic[H_co]):
    """Opens handles of one store kind by name."""

    @abc.abstractmethod
    async def open(self, name: str) -> H_co:
        """Open the store called *name* (any non-empty str within the name limit).

        Opening a name again, through any provider on the same backend, sees the
        same data. Provisions backend resources on first use if needed.
        """


class JournalStore(Store[Journal]):
    """Opens journals."""


class KeyspaceStore(Store[Keyspace]):
    """Opens keyspaces."""


class SetStore(Store[Set]):
    """Opens sets."""


class Provider(abc.ABC):
    """A persistence backend: journals, keyspaces and sets.

    Safe to share between tasks. Use as an async context manager, or call
    ``close()``.
    """

    @property
    @abc.abstractmethod
    def journals(self) -> JournalStore:
        """The journal store."""

    @property
    @abc.abstractmethod
    def keyspaces(self) -> KeyspaceStore:
        """The keyspace store."""

    @property
    @abc.abstractmethod
    def sets(self) -> SetStore:
        """The set store."""

    @property
    @abc.abstractmethod
    def limits(self) -> Limits:
        """The largest names, keys, values, records and members this provider accepts."""

    #: Set by ``set_read_only()``; drivers consult it.
    _read_only: bool = False

    @property
    def read_only(self) -> bool:
        """Whether ``set_read_only()`` was called."""
        return self._read_only

    def set_read_only(self) -> None:
        """Never create backend resources or write; call before first use.

        For inspection tools (``runkit nodes``, ``runkit poison list``) that
        must not change a store, least of all create one under a mistyped
        name. A driver that honours it raises ``StoreUnavailable`` naming the
        missing backend resources (schema, tables) instead of creating them,
        reads a store *name* that was never opened as empty, and refuses
        writes with ``PersistenceError``.

        This default only records the flag (``read_only``); every driver
        consults it, and must refuse writes with a ``PersistenceError`` ending
        "the provider is read-only" (the conformance suite checks it):
        ``refuse_if_read_only`` raises it.
        """
        self._read_only = True

    def refuse_if_read_only(self, what: str) -> None:
        """For drivers: raise the read-only ``PersistenceError`` for the write *what*.

        *what* names the store and the operation (``"keyspace 'x': set"``).
        """
        if self._read_only:
            raise PersistenceError(f"{what}: the provider is read-only")

    @abc.abstractmethod
    async def provision(self) -> None:
        """Create missing backend resources; idempotent and safe under concurrency.

        On a read-only provider, check that they exist instead (raising
        ``StoreUnavailable`` if not).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and worker threads. Idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
