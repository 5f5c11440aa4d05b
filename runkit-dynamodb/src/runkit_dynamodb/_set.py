"""``_DynamoSet``: a set handle of ``DynamoDBProvider``.

A member is an item ``{n, k=<member>}``; ``try_add`` and ``try_remove`` are
conditional writes whose failed condition means nothing changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from runkit.persistence import Set

from ._handles import _b, _ConditionFailed, _Handle

__all__ = ["_DynamoSet"]


class _DynamoSet(_Handle, Set):
    _kind = "set"

    async def has(self, member: bytes) -> bool:
        member = self._provider.limits.check_member(member)
        return await self._get_item(member, "k") is not None

    async def add(self, member: bytes) -> None:
        member = self._provider.limits.check_member(member)
        self._writable("add")
        await self._put(self._key(member))

    async def try_add(self, member: bytes) -> bool:
        member = self._provider.limits.check_member(member)
        self._writable("try_add")
        try:
            await self._put(self._key(member), "attribute_not_exists(k)")
        except _ConditionFailed:
            return False
        return True

    async def remove(self, member: bytes) -> None:
        member = self._provider.limits.check_member(member)
        self._writable("remove")
        await self._call(
            "DeleteItem",
            lambda c: c.delete_item(TableName=self._table, Key=self._key(member)),
            write=True,
        )

    async def try_remove(self, member: bytes) -> bool:
        member = self._provider.limits.check_member(member)
        self._writable("try_remove")
        try:
            await self._call(
                "DeleteItem",
                lambda c: c.delete_item(
                    TableName=self._table,
                    Key=self._key(member),
                    ConditionExpression="attribute_exists(k)",
                ),
                write=True,
            )
        except _ConditionFailed:
            return False
        return True

    async def range(self) -> AsyncIterator[bytes]:
        self._check_open()

        def request(kwargs: dict[str, Any]) -> dict[str, Any]:
            return {
                **kwargs,
                "KeyConditionExpression": "n = :n",
                "ExpressionAttributeValues": {":n": _b(self._pk)},
                "ProjectionExpression": "k",
            }

        # aclosing: a consumer that stops early closes this generator, which must
        # close the inner one too (an unclosed one is finalized by the GC).
        pages = self._provider._query_pages(self._kind, self._what, request)
        async with contextlib.aclosing(pages):
            async for page in pages:
                for item in page.get("Items", []):
                    yield item["k"]["B"]
                self._check_open()
