"""Benchmark target: the DynamoDB driver against moto, with a raw boto3 baseline.

Starts its own serialized moto server (``runkit.testing.moto.MotoServer``), so
the figures are for spotting regressions in the driver, not for predicting AWS
throughput: moto serves a few hundred requests per second and is the
bottleneck. Concurrency is ``RUNKIT_BENCH_DDB_CONCURRENCY`` (default 16),
the same for the driver and the baseline.

The baseline issues the driver's own requests (same items, conditions and
strongly consistent reads) with one boto3 client in worker threads under the
same limiter size, but none of the driver's work around them: no input
validation, ambiguity guard, error mapping, end tracking or truncation checks.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
import boto3
import botocore.exceptions

from runkit.persistence import MAX_POSITION, Conflict, RecordNotFound
from runkit.testing.moto import MotoServer
from runkit_dynamodb import DynamoDBProvider

from . import Target

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

NAME = "dynamodb"

T = TypeVar("T")
_POSITION = struct.Struct(">Q")
_META = b"\xff"


class _Raw:
    def __init__(self, client: DynamoDBClient, prefix: str, concurrency: int) -> None:
        self.client = client
        self.prefix = prefix
        self.limiter = anyio.CapacityLimiter(concurrency)

    async def run(self, fn: Callable[[DynamoDBClient], T]) -> T:
        return await anyio.to_thread.run_sync(fn, self.client, limiter=self.limiter)


def _failed(exc: botocore.exceptions.ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


class _RawJournal:
    def __init__(self, raw: _Raw, name: str) -> None:
        self._raw, self._name, self._pk = raw, name, name.encode()
        self._table = f"{raw.prefix}-journal"

    async def append(self, position: int, record: bytes) -> None:
        item: Any = {"n": {"B": self._pk}, "k": {"B": _POSITION.pack(position)}, "r": {"B": record}}
        try:
            await self._raw.run(
                lambda c: c.put_item(
                    TableName=self._table, Item=item, ConditionExpression="attribute_not_exists(k)"
                )
            )
        except botocore.exceptions.ClientError as exc:
            if _failed(exc):
                raise Conflict.journal(self._name, position) from None
            raise

    async def get(self, position: int) -> bytes:
        keys: Any = [
            {"n": {"B": self._pk}, "k": {"B": _POSITION.pack(position)}},
            {"n": {"B": self._pk}, "k": {"B": _META}},
        ]
        request: Any = {self._table: {"Keys": keys, "ConsistentRead": True}}
        response = await self._raw.run(lambda c: c.batch_get_item(RequestItems=request))
        for item in response["Responses"][self._table]:
            if item["k"]["B"] != _META and "r" in item:
                return item["r"]["B"]
        raise RecordNotFound(self._name, position)

    async def range(self, position: int) -> AsyncIterator[tuple[int, bytes]]:
        while True:
            values: Any = {
                ":n": {"B": self._pk},
                ":lo": {"B": _POSITION.pack(position)},
                ":hi": {"B": _POSITION.pack(MAX_POSITION)},
            }
            page = await self._raw.run(_query(self._table, values))
            for item in page["Items"]:
                yield position, item["r"]["B"]
                position += 1
            if not page["Items"] or "LastEvaluatedKey" not in page:
                return


def _query(table: str, values: Any) -> Callable[[DynamoDBClient], Any]:
    return lambda c: c.query(
        TableName=table,
        KeyConditionExpression="n = :n AND k BETWEEN :lo AND :hi",
        ExpressionAttributeValues=values,
        ConsistentRead=True,
        Limit=250,
    )


class _RawKeyspace:
    def __init__(self, raw: _Raw, name: str) -> None:
        self._raw, self._pk = raw, name.encode()
        self._table = f"{raw.prefix}-keyspace"

    async def get(self, key: bytes) -> tuple[bytes, str]:
        k: Any = {"n": {"B": self._pk}, "k": {"B": key}}
        response = await self._raw.run(
            lambda c: c.get_item(TableName=self._table, Key=k, ConsistentRead=True)
        )
        item = response.get("Item")
        return (item["v"]["B"], item["r"]["S"]) if item else (b"", "")

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        new = uuid.uuid4().hex
        item: Any = {"n": {"B": self._pk}, "k": {"B": key}, "v": {"B": value}, "r": {"S": new}}
        condition: dict[str, Any] = (
            {"ConditionExpression": "r = :r", "ExpressionAttributeValues": {":r": {"S": revision}}}
            if revision
            else {"ConditionExpression": "attribute_not_exists(k)"}
        )
        try:
            await self._raw.run(lambda c: c.put_item(TableName=self._table, Item=item, **condition))
        except botocore.exceptions.ClientError as exc:
            if _failed(exc):
                raise Conflict.keyspace("raw", key, revision) from None
            raise
        return new


class _RawSet:
    def __init__(self, raw: _Raw, name: str) -> None:
        self._raw, self._pk = raw, name.encode()
        self._table = f"{raw.prefix}-set"

    async def add(self, member: bytes) -> None:
        item: Any = {"n": {"B": self._pk}, "k": {"B": member}}
        await self._raw.run(lambda c: c.put_item(TableName=self._table, Item=item))


class _RawStore:
    def __init__(self, make: Callable[[str], Any]) -> None:
        self._make = make

    async def open(self, name: str) -> Any:
        return self._make(name)


class RawDynamoDB:
    """The baseline: the driver's requests issued with boto3 directly."""

    def __init__(self, client: DynamoDBClient, prefix: str, concurrency: int) -> None:
        raw = _Raw(client, prefix, concurrency)
        self.journals = _RawStore(lambda n: _RawJournal(raw, n))
        self.keyspaces = _RawStore(lambda n: _RawKeyspace(raw, n))
        self.sets = _RawStore(lambda n: _RawSet(raw, n))


@asynccontextmanager
async def open_target() -> AsyncIterator[Target]:
    """Start moto; yield the driver and the raw baseline on one fresh table prefix."""
    concurrency = int(os.environ.get("RUNKIT_BENCH_DDB_CONCURRENCY", "16"))
    prefix = f"bench-{uuid.uuid4().hex[:12]}"
    with MotoServer() as moto:
        kwargs: Any = moto.client_kwargs()
        endpoint = kwargs.pop("endpoint_url")
        session = boto3.session.Session(**kwargs)
        provider = DynamoDBProvider(
            prefix, session=session, endpoint_url=endpoint, max_concurrency=concurrency
        )
        await provider.provision()
        client = await anyio.to_thread.run_sync(
            lambda: session.client("dynamodb", endpoint_url=endpoint)
        )
        notes = (
            f"moto {_moto_version()} (server mode, serialized), boto3 {boto3.__version__}; "
            f"{concurrency} requests in flight (driver and baseline); for regressions only"
        )
        try:
            yield Target(
                provider=provider,
                baseline=RawDynamoDB(client, prefix, concurrency),
                notes=notes,
            )
        finally:
            await provider.close()
            client.close()


def _moto_version() -> str:
    from importlib.metadata import version

    return version("moto")
