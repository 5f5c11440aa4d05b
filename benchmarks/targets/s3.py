"""Benchmark target: the S3 driver against moto (server mode), with a raw boto3 baseline.

For regressions only: moto serves a few hundred requests per second on one
core, so the absolute numbers say nothing about AWS (where a request takes
10-30 ms and throughput scales with concurrency and key prefixes).

Starts its own serialized moto server (``runkit.testing.moto.MotoServer``) and
uses a fresh bucket. ``RUNKIT_BENCH_S3_CONCURRENCY`` (default 16) bounds the
requests in flight, the same for the driver and the baseline.

The baseline issues the driver's own requests, on the driver's object layout
(``runkit_s3._layout``), with plain boto3 in worker threads: an append is GET
metadata, ``PutObject If-None-Match``, GET metadata; a get is the record and
the metadata in parallel; a range GETs batches of 1, 2, 4, ... 32 records then
the metadata. None of the driver's work around them: no validation, caches,
error mapping or retry policy.
"""

from __future__ import annotations

import functools
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from runkit.persistence import Conflict, RecordNotFound
from runkit.testing.moto import MotoServer
from runkit_s3 import S3Provider
from runkit_s3._layout import JournalKeys, Layout

from . import Target

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

NAME = "s3"

T = TypeVar("T")
_MAX_BATCH = 32


class _Raw:
    """The client, the limiter and the bucket, shared by the baseline's handles."""

    def __init__(self, moto: MotoServer, bucket: str, concurrency: int) -> None:
        config = Config(
            retries={"mode": "standard", "max_attempts": 5},
            max_pool_connections=concurrency,
            s3={"addressing_style": "path"},
        )
        self.client: S3Client = boto3.client("s3", config=config, **moto.client_kwargs())  # type: ignore[call-overload]
        self.bucket = bucket
        self.limiter = anyio.CapacityLimiter(concurrency)
        self.layout = Layout("")

    async def run(self, fn: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(fn, limiter=self.limiter)

    async def get(self, key: str) -> bytes | None:
        def call() -> bytes | None:
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                    return None
                raise
            with response["Body"] as body:
                return body.read()

        return await self.run(call)

    async def put(self, key: str, body: bytes, **conditions: Any) -> str:
        def call() -> str:
            try:
                response = self.client.put_object(
                    Bucket=self.bucket, Key=key, Body=body, **conditions
                )
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in {409, 412}:
                    raise Conflict("raw", key, position=0) from None
                raise
            return response["ETag"].strip('"')

        return await self.run(call)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        results: list[bytes | None] = [None] * len(keys)

        async def fetch(i: int) -> None:
            results[i] = await self.get(keys[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(keys)):
                tg.start_soon(fetch, i)
        return results


class _RawJournal:
    def __init__(self, raw: _Raw, name: str) -> None:
        self._raw, self._name = raw, name
        self._keys: JournalKeys = raw.layout.journal(name)

    async def append(self, position: int, record: bytes) -> None:
        await self._raw.get(self._keys.meta)
        try:
            await self._raw.put(self._keys.record(position), record, IfNoneMatch="*")
        except Conflict:
            raise Conflict.journal(self._name, position) from None
        await self._raw.get(self._keys.meta)

    async def get(self, position: int) -> bytes:
        record, _ = await self._raw.get_many([self._keys.record(position), self._keys.meta])
        if record is None:
            raise RecordNotFound(self._name, position)
        return record

    async def range(self, position: int) -> AsyncIterator[tuple[int, bytes]]:
        batch = 1
        while True:
            keys = [self._keys.record(position + i) for i in range(batch)]
            records = await self._raw.get_many(keys)
            await self._raw.get(self._keys.meta)
            for record in records:
                if record is None:
                    return
                yield position, record
                position += 1
            batch = min(2 * batch, _MAX_BATCH)


class _RawKeyspace:
    def __init__(self, raw: _Raw, name: str) -> None:
        self._raw, self._prefix = raw, raw.layout.keyspace(name)

    async def get(self, key: bytes) -> tuple[bytes, str]:
        body = await self._raw.get(self._prefix + key.hex())
        return (b"", "") if body is None else (body[17:], "?")

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        body = b"\x01" + secrets.token_bytes(16) + value
        condition = {"IfMatch": f'"{revision}"'} if revision else {"IfNoneMatch": "*"}
        try:
            return await self._raw.put(self._prefix + key.hex(), body, **condition)
        except Conflict:
            raise Conflict.keyspace("raw", key, revision) from None


class _RawSet:
    def __init__(self, raw: _Raw, name: str) -> None:
        self._raw, self._prefix = raw, raw.layout.set(name)

    async def add(self, member: bytes) -> None:
        await self._raw.put(self._prefix + member.hex(), b"")


class _RawStore:
    def __init__(self, make: Callable[[str], Any]) -> None:
        self._make = make

    async def open(self, name: str) -> Any:
        return self._make(name)


class RawS3:
    """The baseline: the driver's requests issued with boto3 directly."""

    def __init__(self, moto: MotoServer, bucket: str, concurrency: int) -> None:
        self._raw = raw = _Raw(moto, bucket, concurrency)
        self.journals = _RawStore(functools.partial(_RawJournal, raw))
        self.keyspaces = _RawStore(functools.partial(_RawKeyspace, raw))
        self.sets = _RawStore(functools.partial(_RawSet, raw))

    def close(self) -> None:
        self._raw.client.close()


@asynccontextmanager
async def open_target() -> AsyncIterator[Target]:
    """Start moto; yield the driver and the raw baseline on one fresh bucket."""
    concurrency = int(os.environ.get("RUNKIT_BENCH_S3_CONCURRENCY", "16"))
    bucket = f"bench-{uuid.uuid4().hex[:16]}"
    with MotoServer() as moto:
        kwargs = moto.client_kwargs()
        session = boto3.Session(
            aws_access_key_id=kwargs["aws_access_key_id"],
            aws_secret_access_key=kwargs["aws_secret_access_key"],
            aws_session_token=kwargs["aws_session_token"],
            region_name=kwargs["region_name"],
        )
        provider = S3Provider(
            bucket, endpoint_url=moto.endpoint, session=session, max_concurrency=concurrency
        )
        await provider.provision()
        raw = await anyio.to_thread.run_sync(RawS3, moto, bucket, concurrency)
        notes = (
            f"moto {version('moto')} server mode (requests serialized), "
            f"{concurrency} requests in flight at most (driver and baseline); "
            "regression signal only, not AWS performance"
        )
        try:
            yield Target(provider=provider, baseline=raw, notes=notes)
        finally:
            await provider.close()
            await anyio.to_thread.run_sync(raw.close)
