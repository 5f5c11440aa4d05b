"""``_Set``: a set handle of ``PostgresProvider``.

Each change is one statement whose row count tells whether it changed
anything (what ``try_add`` and ``try_remove`` report).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

from runkit.persistence import Set

from ._handles import Conn, Rows, _all, _Handle, _one, _Pages, _rowcount

__all__ = ["_Set"]


class _Set(_Handle, Set):
    _kind = "set"

    async def has(self, member: bytes) -> bool:
        """Return whether *member* is present."""
        self._check_open()
        m = self._provider.limits.check_member(member)
        await self._resolve()
        query, params = self._sql.set_has, (self._id, m)

        def operation(conn: Conn) -> bool:
            row = _one(conn, query, params)
            return bool(row and row[0])

        return await self._read(operation, "has")

    async def _change(self, query: bytes, member: bytes, action: str) -> bool:
        self._check_open()
        m = self._provider.limits.check_member(member)
        params = (self._id, m)

        def operation(conn: Conn) -> bool:
            return _rowcount(conn, query, params) == 1

        return await self._write(operation, action)

    async def add(self, member: bytes) -> None:
        """Add *member* (no error if present)."""
        await self._change(self._sql.set_add, member, "add")

    async def try_add(self, member: bytes) -> bool:
        """Add *member*; ``True`` only if this call added it."""
        return await self._change(self._sql.set_add, member, "add")

    async def remove(self, member: bytes) -> None:
        """Remove *member* (no error if absent)."""
        await self._change(self._sql.set_remove, member, "remove")

    async def try_remove(self, member: bytes) -> bool:
        """Remove *member*; ``True`` only if this call removed it."""
        return await self._change(self._sql.set_remove, member, "remove")

    def range(self) -> AsyncIterator[bytes]:
        """Iterate the members in byte order, one page per round trip."""
        self._check_open()
        query = self._sql.set_page
        rows_per_page = max(self._provider.page_rows, 1000)
        after = b""

        async def fetch() -> tuple[list[bytes], bool]:
            nonlocal after
            await self._resolve()
            params = (self._id, after, rows_per_page)

            def operation(conn: Conn) -> Rows:
                return _all(conn, query, params)

            page = [cast(bytes, m) for (m,) in await self._read(operation, "range")]
            if page:
                after = page[-1]
            return page, len(page) < rows_per_page

        return _Pages(fetch)
