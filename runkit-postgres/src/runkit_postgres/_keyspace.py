"""``_Keyspace``: a keyspace handle of ``PostgresProvider``.

A revision is a random UUID written with the value (shown as 32 hex digits), so
compare-and-set is one conditional statement; a revision this driver never
issued (``_ForeignRevision``) matches nothing and conflicts. Compare-and-sets
that write a value go through the provider's set group (``_grouping``), which
shares statements between concurrent writes of different keys (built by
``set_one`` and ``set_many`` below); deletes are single statements.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import cast

from runkit.persistence import Conflict, Keyspace

from ._handles import Conn, Rows, _all, _Handle, _one, _Pages, _rowcount

__all__ = ["GetRow", "SetRow", "_Keyspace", "get_many", "get_one", "set_many", "set_one"]


def _parse_revision(revision: object) -> uuid.UUID | None:
    """The UUID a revision string stands for; ``None`` for ``""``; raise if not ours."""
    if not isinstance(revision, str):
        raise TypeError(f"revision must be str, not {type(revision).__name__}")
    if not revision:
        return None
    if len(revision) != 32 or revision.strip("0123456789abcdef"):
        raise _ForeignRevision
    return uuid.UUID(hex=revision)


class _ForeignRevision(Exception):
    """A revision this driver never issued: it matches no key, so the write conflicts."""


class _Keyspace(_Handle, Keyspace):
    _kind = "keyspace"

    async def get(self, key: bytes) -> tuple[bytes, str]:
        """Return ``(value, revision)``, or ``(b"", "")`` when absent."""
        self._check_open()
        k = self._provider.limits.check_key(key)
        await self._resolve()
        # Concurrent gets of other keys may share the statement (``_grouping``).
        row = await self._provider._keyspace_reads.read((self._id, k), self._what("get"))
        if row is None:
            return b"", ""
        return row[0], row[1].hex

    async def has(self, key: bytes) -> bool:
        """Return whether *key* is present."""
        self._check_open()
        k = self._provider.limits.check_key(key)
        await self._resolve()
        query, params = self._sql.keyspace_has, (self._id, k)

        def operation(conn: Conn) -> bool:
            row = _one(conn, query, params)
            return bool(row and row[0])

        return await self._read(operation, "has")

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        """Compare-and-set *key* on its revision; an empty *value* deletes."""
        self._check_open()
        limits = self._provider.limits
        k, v = limits.check_key(key), limits.check_value(value)
        try:
            current = _parse_revision(revision)
        except _ForeignRevision:
            raise Conflict.keyspace(self._name, k, revision) from None
        if v:
            # Concurrent inserts and updates of other keys may share the
            # statement (``_grouping``); the outcome is this key's alone.
            new = uuid.uuid4()
            what = self._writable("set")
            row = (v, new, current)
            if not await self._provider._keyspace_writes.write(
                (self._id, k), row, len(k) + len(v), what
            ):
                raise Conflict.keyspace(self._name, k, revision)
            return new.hex
        self._writable("set")  # a read-only provider refuses even a delete of an absent key
        st = self._sql
        params: tuple[object, ...]
        if current is None:
            query, params = st.keyspace_has, (self._id, k)
        else:
            query, params = st.keyspace_delete, (self._id, k, current)

        def operation(conn: Conn) -> bool:
            cursor = conn.execute(query, params, prepare=True, binary=True)
            if query is st.keyspace_has:  # deleting an absent key: it must be absent
                row = cursor.fetchone()
                return not (row and row[0])
            return cursor.rowcount == 1

        # Deleting an absent key only reads, so it may be retried like a read.
        run = self._read if query is st.keyspace_has else self._write
        if not await run(operation, "set"):
            raise Conflict.keyspace(self._name, k, revision)
        return ""

    async def set_unconditional(self, key: bytes, value: bytes) -> str:
        """Set *key* whatever its revision; an empty *value* deletes."""
        self._check_open()
        limits = self._provider.limits
        k, v = limits.check_key(key), limits.check_value(value)
        new = uuid.uuid4() if v else None
        params: tuple[object, ...]
        if v:
            query, params = self._sql.keyspace_upsert, (self._id, k, v, new)
        else:
            query, params = self._sql.keyspace_delete_any, (self._id, k)

        def operation(conn: Conn) -> int:
            return _rowcount(conn, query, params)

        await self._write(operation, "set unconditionally")
        return new.hex if new else ""

    def range(self) -> AsyncIterator[tuple[bytes, bytes, str]]:
        """Iterate ``(key, value, revision)`` in key order, one page per round trip."""
        self._check_open()
        query = self._sql.keyspace_page
        rows_per_page, bytes_per_page = self._provider.page_rows, self._provider.page_bytes
        after = b""  # every key is non-empty, so greater than b""

        async def fetch() -> tuple[list[tuple[bytes, bytes, str]], bool]:
            nonlocal after
            await self._resolve()
            params = (self._id, after, rows_per_page, bytes_per_page)

            def operation(conn: Conn) -> Rows:
                return _all(conn, query, params)

            rows = await self._read(operation, "range")
            page = [(cast(bytes, k), cast(bytes, v), cast(uuid.UUID, r).hex) for k, v, r in rows]
            if page:
                after = page[-1][0]
            # A page cut short by its byte budget holds at least the budget.
            size = sum(len(k) + len(v) for k, v, _ in page)
            return page, len(page) < rows_per_page and size < bytes_per_page

        return _Pages(fetch)


# -- compare-and-sets, for the provider's write group (``_grouping``) -----------------

#: One write: ((keyspace ID, key), (value, new revision, current revision or None)).
SetRow = tuple[tuple[int, bytes], tuple[bytes, uuid.UUID, "uuid.UUID | None"]]
_Keys = set[tuple[int, bytes]]


def set_one(insert: bytes, update: bytes) -> Callable[[list[SetRow]], Callable[[Conn], _Keys]]:
    """Build the operation for one write (``keyspace_insert`` or ``keyspace_update``)."""

    def build(rows: list[SetRow]) -> Callable[[Conn], _Keys]:
        [(key, (value, new, current))] = rows
        keyspace_id, k = key
        query, params = (
            (insert, (keyspace_id, k, value, new))
            if current is None
            else (update, (value, new, keyspace_id, k, current))
        )

        def operation(conn: Conn) -> _Keys:
            count = conn.execute(query, params, prepare=True, binary=True).rowcount
            return {key} if count == 1 else set()

        return operation

    return build


def set_many(statement: bytes) -> Callable[[list[SetRow]], Callable[[Conn], _Keys]]:
    """Build the operation for several writes (``Statements.keyspace_set_many``)."""
    nil = uuid.UUID(int=0)  # an insert's "current revision": unused, but never NULL

    def build(rows: list[SetRow]) -> Callable[[Conn], _Keys]:
        params = (
            [keyspace_id for (keyspace_id, _), _ in rows],
            [k for (_, k), _ in rows],
            [value for _, (value, _, _) in rows],
            [new for _, (_, new, _) in rows],
            [current or nil for _, (_, _, current) in rows],
            [current is None for _, (_, _, current) in rows],
        )

        def operation(conn: Conn) -> _Keys:
            result = conn.execute(statement, params, prepare=True, binary=True).fetchall()
            return {(cast(int, row[0]), cast(bytes, row[1])) for row in result}

        return operation

    return build


#: What a get finds: the value and its revision.
GetRow = tuple[bytes, uuid.UUID]
_Found = dict[tuple[int, bytes], GetRow]


def get_one(
    query: bytes,
) -> Callable[[list[tuple[tuple[int, bytes], None]]], Callable[[Conn], _Found]]:
    """Build the operation for one get (``keyspace_get``)."""

    def build(rows: list[tuple[tuple[int, bytes], None]]) -> Callable[[Conn], _Found]:
        [(key, _)] = rows

        def operation(conn: Conn) -> _Found:
            row = _one(conn, query, key)
            if row is None:
                return {}
            return {key: (cast(bytes, row[0]), cast(uuid.UUID, row[1]))}

        return operation

    return build


def get_many(
    query: bytes,
) -> Callable[[list[tuple[tuple[int, bytes], None]]], Callable[[Conn], _Found]]:
    """Build the operation for several gets (``keyspace_get_many``)."""

    def build(rows: list[tuple[tuple[int, bytes], None]]) -> Callable[[Conn], _Found]:
        params = ([keyspace_id for (keyspace_id, _), _ in rows], [k for (_, k), _ in rows])

        def operation(conn: Conn) -> _Found:
            return {
                (cast(int, row[0]), cast(bytes, row[1])): (
                    cast(bytes, row[2]),
                    cast(uuid.UUID, row[3]),
                )
                for row in _all(conn, query, params)
            }

        return operation

    return build
