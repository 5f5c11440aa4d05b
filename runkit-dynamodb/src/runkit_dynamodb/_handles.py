"""What the journal, keyspace and set handles share.

``_Handle`` (the provider, the store name as partition key, closing, and calls
through the provider), ``_ConditionFailed`` (what ``DynamoDBProvider._call``
raises for a failed condition), attribute values (``_b``, ``_n``), request
factories and ``_gather``. The provider imports this module and the handle
modules; they name ``DynamoDBProvider`` for type checking only, so nothing
imports back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from runkit.persistence import PersistenceError

from ._aws import once

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient
    from mypy_boto3_dynamodb.type_defs import (
        AttributeValueTypeDef,
        BatchGetItemOutputTypeDef,
        BatchWriteItemOutputTypeDef,
        KeysAndAttributesTypeDef,
        QueryOutputTypeDef,
        WriteRequestTypeDef,
    )

    from ._provider import DynamoDBProvider

__all__ = [
    "_ConditionFailed",
    "_Handle",
    "_b",
    "_batch_get",
    "_batch_write",
    "_gather",
    "_n",
    "_query",
]

T = TypeVar("T")


class _ConditionFailed(Exception):
    """A ``ConditionalCheckFailedException``; ``item`` is the old item if one was returned."""

    def __init__(self, item: Mapping[str, Any] | None) -> None:
        super().__init__("conditional check failed")
        self.item = item


def _b(data: bytes) -> AttributeValueTypeDef:
    return {"B": data}


def _n(number: int) -> AttributeValueTypeDef:
    return {"N": str(number)}


# Factories bind their argument, so a call made later never sees a rebound variable.
def _query(kwargs: dict[str, Any]) -> Callable[[DynamoDBClient], QueryOutputTypeDef]:
    return lambda c: c.query(**kwargs)


def _batch_get(
    request: dict[str, KeysAndAttributesTypeDef],
) -> Callable[[DynamoDBClient], BatchGetItemOutputTypeDef]:
    return lambda c: c.batch_get_item(RequestItems=request)


def _batch_write(
    request: dict[str, list[WriteRequestTypeDef]],
) -> Callable[[DynamoDBClient], BatchWriteItemOutputTypeDef]:
    return lambda c: c.batch_write_item(RequestItems=request)


async def _gather(*calls: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Run *calls* concurrently; raise the first failure itself, not an ExceptionGroup."""
    results: list[Any] = [None] * len(calls)
    errors: list[Exception] = []

    async def run(index: int, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            results[index] = await call()
        except Exception as exc:  # re-raised below, unwrapped
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for index, call in enumerate(calls):
            tg.start_soon(run, index, call)
    if errors:
        raise errors[0]
    return results


class _Handle:
    _kind: str
    _table: str

    def __init__(self, provider: DynamoDBProvider, name: str) -> None:
        self._provider = provider
        self._name = name
        self._pk = name.encode("utf-8")
        self._what = f"{self._kind} {name!r}"
        self._table = provider.tables[self._kind]
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    async def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise PersistenceError(f"{self._what}: handle is closed")
        self._provider._check_open()

    def _writable(self, operation: str) -> None:
        """``_check_open()``, refusing *operation* (a write) on a read-only provider.

        Every write calls it first, also those a read decides without writing.
        """
        self._check_open()
        self._provider.refuse_if_read_only(f"{self._what}: {operation}")

    def _key(self, sort_key: bytes) -> dict[str, AttributeValueTypeDef]:
        return {"n": _b(self._pk), "k": _b(sort_key)}

    async def _call(
        self, operation: str, call: Callable[[DynamoDBClient], T], *, write: bool = False
    ) -> T:
        self._check_open()
        return await self._provider._call(self._kind, self._what, operation, call, write=write)

    async def _put(
        self,
        item: dict[str, AttributeValueTypeDef],
        condition: str | None = None,
        values: dict[str, AttributeValueTypeDef] | None = None,
        *,
        resend: bool = True,
    ) -> None:
        """Write *item*; with *condition*, only if it holds (else ``_ConditionFailed``).

        Without *resend* (or with a condition), botocore does not send the request
        again once it may have reached DynamoDB (see ``_aws``).
        """
        request: dict[str, Any] = {"TableName": self._table, "Item": item}
        if condition is not None:
            request["ConditionExpression"] = condition
        if values is not None:
            request["ExpressionAttributeValues"] = values

        def put(client: DynamoDBClient) -> object:
            return client.put_item(**request)

        await self._call("PutItem", put if resend else once(put), write=True)

    async def _get_item(
        self, sort_key: bytes, projection: str
    ) -> dict[str, AttributeValueTypeDef] | None:
        """The item at *sort_key* (only the *projection* attributes), read consistently."""
        response = await self._call(
            "GetItem",
            lambda c: c.get_item(
                TableName=self._table,
                Key=self._key(sort_key),
                ConsistentRead=True,
                ProjectionExpression=projection,
            ),
        )
        return response.get("Item")

    def __repr__(self) -> str:
        state = " (closed)" if self._closed else ""
        return f"<dynamodb {self._kind} {self._name!r} in {self._table!r}{state}>"
