"""What the journal, keyspace and set handles share.

``_Handle`` (the provider, the store's row id, closing and the read-only
check), ``_Pages`` (the iterator every ``range`` returns) and the one-statement
query helpers. The provider imports this module and the handle modules; they
name ``PostgresProvider`` for type checking only, so nothing imports back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, ClassVar, Final, TypeVar

from psycopg import Connection

from runkit.persistence import PersistenceError

if TYPE_CHECKING:
    from ._provider import PostgresProvider

__all__ = ["_ABSENT", "Conn", "Rows", "_Handle", "_Pages", "_all", "_one", "_rowcount"]

Conn = Connection[tuple[object, ...]]
T = TypeVar("T")
Rows = list[tuple[object, ...]]

# The row id of a store a read-only provider found no row for: identity
# columns start at 1, so it matches nothing and the store reads as empty.
_ABSENT: Final = 0


def _one(conn: Conn, query: bytes, params: tuple[object, ...]) -> tuple[object, ...] | None:
    return conn.execute(query, params, prepare=True, binary=True).fetchone()


def _all(conn: Conn, query: bytes, params: tuple[object, ...]) -> list[tuple[object, ...]]:
    return conn.execute(query, params, prepare=True, binary=True).fetchall()


def _rowcount(conn: Conn, query: bytes, params: tuple[object, ...]) -> int:
    return conn.execute(query, params, prepare=True, binary=True).rowcount


class _Pages(AsyncIterator[T]):
    """An async iterator over pages fetched one round trip at a time.

    A plain iterator rather than an async generator: it holds no connection or
    other resource between pages, so a consumer may stop early without closing
    it (trio warns about unfinished async generators). ``aclose()`` exists so
    that ``contextlib.aclosing`` works as it does for generators.
    """

    __slots__ = ("_done", "_fetch", "_items")

    def __init__(self, fetch: Callable[[], Awaitable[tuple[list[T], bool]]]) -> None:
        self._fetch = fetch
        self._items: deque[T] = deque()
        self._done = False

    def __aiter__(self) -> _Pages[T]:
        return self

    async def __anext__(self) -> T:
        while not self._items:
            if self._done:
                raise StopAsyncIteration
            page, self._done = await self._fetch()
            self._items.extend(page)
        return self._items.popleft()

    async def aclose(self) -> None:
        """Stop the iteration; later steps raise ``StopAsyncIteration``."""
        self._done = True
        self._items.clear()


class _Handle:
    """What the three handle kinds share: the provider, the row id, closing."""

    _kind: ClassVar[str]

    def __init__(self, provider: PostgresProvider, name: str, store_id: int) -> None:
        self._provider = provider
        self._name = name
        self._id = store_id
        self._closed = False
        self._sql = provider._sql

    @property
    def name(self) -> str:
        """The name the store was opened with."""
        return self._name

    async def close(self) -> None:
        """Release the handle. Idempotent; other handles of the name are unaffected."""
        self._closed = True

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name!r} of {self._provider!r}>"

    def _check_open(self) -> None:
        if self._closed:
            raise PersistenceError(f"{self._kind} {self._name!r}: the handle is closed")

    def _what(self, action: str) -> str:
        return f"{self._kind} {self._name!r}: {action}"

    async def _resolve(self) -> None:
        """Look the store up again if it did not exist when the handle was opened.

        Only a read-only provider opens a name without creating its row
        (``_ABSENT``); a store created since, by another provider, must be
        visible through this handle as through any other.
        """
        if self._id == _ABSENT:
            find: bytes = getattr(self._sql, f"find_{self._kind}")
            self._id = await self._provider._open(self._kind, b"", find, self._name)

    async def _read(self, operation: Callable[[Conn], T], action: str) -> T:
        self._check_open()
        return await self._provider._run(operation, what=self._what(action), write=False)

    def _writable(self, action: str) -> str:
        """Check that the handle may write; return the description of *action*."""
        self._check_open()
        what = self._what(action)
        self._provider.refuse_if_read_only(what)
        return what

    async def _write(self, operation: Callable[[Conn], T], action: str) -> T:
        what = self._writable(action)
        return await self._provider._run(operation, what=what, write=True)
