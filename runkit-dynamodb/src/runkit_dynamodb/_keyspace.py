"""``_DynamoKeyspace``: a keyspace handle of ``DynamoDBProvider``.

A key is an item ``{n, k=<key>, v, r=<revision>}``; a revision is a random UUID
(32 hex digits) written with the value, so compare-and-set is one conditional
``PutItem`` or ``DeleteItem`` (deleting a key expected absent is one consistent
read). A revision is written at most once: ``set_unconditional`` sends a new
one, never the same request again, after a failure that may have landed.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio

from runkit.persistence import Conflict, Keyspace, PersistenceError

from ._aws import MAX_ATTEMPTS
from ._handles import _b, _ConditionFailed, _Handle

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.type_defs import AttributeValueTypeDef

__all__ = ["_DynamoKeyspace"]


class _DynamoKeyspace(_Handle, Keyspace):
    _kind = "keyspace"

    async def get(self, key: bytes) -> tuple[bytes, str]:
        key = self._provider.limits.check_key(key)
        item = await self._get_item(key, "v, r")
        if item is None:
            return b"", ""
        return item["v"]["B"], item["r"]["S"]

    async def has(self, key: bytes) -> bool:
        key = self._provider.limits.check_key(key)
        return await self._exists(key)

    async def _exists(self, key: bytes) -> bool:
        return await self._get_item(key, "k") is not None

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        limits = self._provider.limits
        key = limits.check_key(key)
        value = limits.check_value(value)
        if not isinstance(revision, str):
            raise TypeError(f"revision must be str, not {type(revision).__name__}")
        self._writable("set")
        try:
            if not value:
                if not revision:
                    # "Delete if absent" changes nothing: a strongly consistent
                    # read decides it, and costs less than a conditional write.
                    if await self._exists(key):
                        raise Conflict.keyspace(self._name, key, revision)
                    return ""
                await self._call(
                    "DeleteItem",
                    lambda c: c.delete_item(
                        TableName=self._table,
                        Key=self._key(key),
                        ConditionExpression="r = :r",
                        ExpressionAttributeValues={":r": {"S": revision}},
                    ),
                    write=True,
                )
                return ""
            new_revision = uuid.uuid4().hex
            item: dict[str, AttributeValueTypeDef] = {
                **self._key(key),
                "v": _b(value),
                "r": {"S": new_revision},
            }
            if revision:
                await self._put(item, "r = :r", {":r": {"S": revision}})
            else:
                await self._put(item, "attribute_not_exists(k)")
            return new_revision
        except _ConditionFailed:
            raise Conflict.keyspace(self._name, key, revision) from None

    async def set_unconditional(self, key: bytes, value: bytes) -> str:
        limits = self._provider.limits
        key = limits.check_key(key)
        value = limits.check_value(value)
        self._writable("set_unconditional")
        if not value:
            await self._call(  # idempotent: botocore may resend it
                "DeleteItem",
                lambda c: c.delete_item(TableName=self._table, Key=self._key(key)),
                write=True,
            )
            return ""
        # A fresh revision for every attempt: botocore must not resend one that
        # may have landed, as another write may have replaced it meanwhile.
        for attempt in range(1, MAX_ATTEMPTS + 1):
            new_revision = uuid.uuid4().hex
            try:
                await self._put(
                    {**self._key(key), "v": _b(value), "r": {"S": new_revision}}, resend=False
                )
                return new_revision
            except PersistenceError as exc:
                # Only the guard's error (ambiguous, not retried by botocore) calls
                # for another attempt; botocore spent its own on the others.
                if not exc.ambiguous or exc.retryable:
                    raise
                if attempt == MAX_ATTEMPTS:
                    # Calling again, with a new revision, is as safe as these attempts were.
                    raise PersistenceError(str(exc), retryable=True, ambiguous=True) from None
            await anyio.sleep(min(1.0, 0.05 * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def range(self) -> AsyncIterator[tuple[bytes, bytes, str]]:
        self._check_open()

        def request(kwargs: dict[str, Any]) -> dict[str, Any]:
            return {
                **kwargs,
                "KeyConditionExpression": "n = :n",
                "ExpressionAttributeValues": {":n": _b(self._pk)},
                "ProjectionExpression": "k, v, r",
            }

        # aclosing: a consumer that stops early closes this generator, which must
        # close the inner one too (an unclosed one is finalized by the GC).
        pages = self._provider._query_pages(self._kind, self._what, request)
        async with contextlib.aclosing(pages):
            async for page in pages:
                for item in page.get("Items", []):
                    yield item["k"]["B"], item["v"]["B"], item["r"]["S"]
                self._check_open()
