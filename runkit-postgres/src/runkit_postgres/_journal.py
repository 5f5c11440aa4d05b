"""``_Journal``: a journal handle of ``PostgresProvider``.

Reads are one statement each and a truncation one transaction; appends go
through the provider's append group (``_grouping``), which shares statements
between concurrent appends to different journals (built by ``append_one`` and
``append_many`` below).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import cast

from runkit.persistence import (
    MAX_POSITION,
    Conflict,
    Interval,
    Journal,
    PersistenceError,
    RecordNotFound,
    check_position,
)

from ._handles import _ABSENT, Conn, Rows, _all, _Handle, _one, _Pages, _rowcount

__all__ = ["AppendRow", "_Journal", "append_many", "append_one"]


class _Journal(_Handle, Journal):
    _kind = "journal"

    async def bounds(self) -> Interval:
        """Return ``[begin, end)`` as of the call."""
        self._check_open()
        await self._resolve()
        query, params = self._sql.journal_bounds, (self._id,)

        def operation(conn: Conn) -> tuple[object, ...] | None:
            return _one(conn, query, params)

        row = await self._read(operation, "bounds")
        if row is None:
            if self._id == _ABSENT:
                return Interval(0, 0)
            raise self._missing()
        return Interval(cast(int, row[0]), cast(int, row[1]))

    async def get(self, pos: int) -> bytes:
        """Return the record at *pos*, or raise ``RecordNotFound``."""
        self._check_open()
        if not isinstance(pos, int) or isinstance(pos, bool):
            raise TypeError(f"position must be int, not {type(pos).__name__}")
        if not 0 <= pos <= MAX_POSITION:
            raise RecordNotFound(self._name, pos)
        await self._resolve()
        query, params = self._sql.journal_get, (self._id, pos)

        def operation(conn: Conn) -> tuple[object, ...] | None:
            return _one(conn, query, params)

        row = await self._read(operation, f"get position {pos}")
        if row is None:
            raise RecordNotFound(self._name, pos)
        return cast(bytes, row[0])

    def range(self, pos: int) -> AsyncIterator[tuple[int, bytes]]:
        """Iterate ``(position, record)`` to the end, one page per round trip."""
        self._check_open()
        if not isinstance(pos, int) or isinstance(pos, bool):
            raise TypeError(f"position must be int, not {type(pos).__name__}")
        query = self._sql.journal_page
        rows_per_page, bytes_per_page = self._provider.page_rows, self._provider.page_bytes
        first = True

        async def fetch() -> tuple[list[tuple[int, bytes]], bool]:
            nonlocal pos, first
            if not 0 <= pos <= MAX_POSITION:
                raise RecordNotFound(self._name, pos)
            await self._resolve()
            params = (pos, rows_per_page, bytes_per_page, self._id)

            def operation(conn: Conn) -> Rows:
                return _all(conn, query, params)

            rows = await self._read(operation, f"range from position {pos}")
            if not rows:
                if self._id == _ABSENT:
                    raise RecordNotFound(self._name, pos)
                raise self._missing()
            begin, end = cast(int, rows[0][0]), cast(int, rows[0][1])
            if pos < begin or (first and pos >= end):
                # Not live: never written, or truncated (before or during iteration).
                raise RecordNotFound(self._name, pos)
            first = False
            page: list[tuple[int, bytes]] = []
            for _, _, found, record in rows:
                if found != pos:  # records are dense in [begin, end)
                    if page:
                        break  # report the gap when the consumer gets there
                    raise RecordNotFound(self._name, pos)
                page.append((pos, cast(bytes, record)))
                pos += 1
            return page, pos >= end

        return _Pages(fetch)

    async def append(self, pos: int, record: bytes) -> None:
        """Append *record* at *pos* (the end), or raise ``Conflict``.

        Concurrent appends to other journals of the provider may share the
        statement (``_grouping``); the outcome is this journal's alone.
        """
        self._check_open()
        pos = check_position(pos)
        data = self._provider.limits.check_record(record)
        what = self._writable(f"append at position {pos}")
        row = (pos, data)
        if not await self._provider._appends.write(self._id, row, len(data), what):
            raise Conflict.journal(self._name, pos)

    async def truncate(self, pos: int) -> None:
        """Remove the records below *pos*, atomically."""
        self._check_open()
        pos = check_position(pos)
        st = self._sql

        def operation(conn: Conn) -> tuple[object, ...] | None:
            with conn.transaction():
                params = (pos, self._id, pos, pos)
                if _rowcount(conn, st.journal_raise_begin, params):
                    # A new statement, so a new snapshot: it sees every record
                    # appended before the UPDATE took the journal's row lock.
                    _rowcount(conn, st.journal_delete_below, (self._id, pos))
                    return None
                return _one(conn, st.journal_bounds, (self._id,))

        bounds = await self._write(operation, f"truncate to position {pos}")
        if bounds is not None and pos > cast(int, bounds[1]):
            raise ValueError(
                f"journal {self._name!r}: cannot truncate to position {pos}, "
                f"past the end ({bounds[1]})"
            )

    def _missing(self) -> PersistenceError:
        return PersistenceError(
            f"journal {self._name!r}: its row is missing from schema "
            f"{self._provider.schema!r} (dropped while in use?)"
        )


# -- appends, for the provider's write group (``_grouping``) ---------------------------

#: One append: (journal ID, (position, record)).
AppendRow = tuple[int, tuple[int, bytes]]


def append_one(statement: bytes) -> Callable[[list[AppendRow]], Callable[[Conn], set[int]]]:
    """Build the operation for one append (``Statements.journal_append``)."""

    def build(rows: list[AppendRow]) -> Callable[[Conn], set[int]]:
        [(journal_id, (position, data))] = rows
        params = (journal_id, position, position, data)

        def operation(conn: Conn) -> set[int]:
            count = conn.execute(statement, params, prepare=True, binary=True).rowcount
            return {journal_id} if count else set()

        return operation

    return build


def append_many(statement: bytes) -> Callable[[list[AppendRow]], Callable[[Conn], set[int]]]:
    """Build the operation for several appends (``Statements.journal_append_many``)."""

    def build(rows: list[AppendRow]) -> Callable[[Conn], set[int]]:
        params = (
            [journal_id for journal_id, _ in rows],
            [position for _, (position, _) in rows],
            [data for _, (_, data) in rows],
        )

        def operation(conn: Conn) -> set[int]:
            result = conn.execute(statement, params, prepare=True, binary=True).fetchall()
            return {cast(int, row[0]) for row in result}

        return operation

    return build
