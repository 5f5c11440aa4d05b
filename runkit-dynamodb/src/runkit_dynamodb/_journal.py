"""``_DynamoJournal``: a journal handle of ``DynamoDBProvider``.

Why appends are one request: journal items are never deleted, so "item p-1
exists" stays true once seen, and ``PutItem p IF attribute_not_exists(k)``
succeeds only while p is the end. A handle remembers the highest end it has
seen; it reads item p-1 (one consistent ``GetItem``) only when asked to append
beyond that, which is how positions past the end conflict.

A truncation moves begin in the metadata item, then replaces the records below
it by tombstones in batches and records how far that got (``c``).
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, cast

import anyio

from runkit.persistence import (
    MAX_POSITION,
    Conflict,
    Interval,
    Journal,
    PersistenceError,
    RecordNotFound,
    check_position,
)

from ._handles import _b, _batch_get, _batch_write, _ConditionFailed, _gather, _Handle, _n, _query

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.type_defs import (
        KeysAndAttributesTypeDef,
        QueryOutputTypeDef,
        WriteRequestTypeDef,
    )

    from ._provider import DynamoDBProvider

__all__ = ["_DynamoJournal"]

_META: Final = b"\xff"  # sorts after every 8-byte position (their first byte is <= 0x7f)
_POSITION = struct.Struct(">Q")
_LAST_KEY: Final = _POSITION.pack(MAX_POSITION)
_TOMBSTONE_BATCH: Final = 25  # BatchWriteItem's maximum
_TOMBSTONE_WORKERS: Final = 4
_BATCH_ATTEMPTS: Final = 10  # for unprocessed items/keys of batch calls


def _position_of(item: Mapping[str, Any]) -> int:
    value: int = _POSITION.unpack(item["k"]["B"])[0]
    return value


def _check_read_position(position: object) -> int:
    if not isinstance(position, int) or isinstance(position, bool):
        raise TypeError(f"position must be int, not {type(position).__name__}")
    return position


class _DynamoJournal(_Handle, Journal):
    _kind = "journal"

    def __init__(self, provider: DynamoDBProvider, name: str) -> None:
        super().__init__(provider, name)
        # Every position below this is known to have an item (record or tombstone).
        # Items are never deleted, so this only grows and is never wrong.
        self._known_end = 0

    def _observe(self, end: int) -> None:
        self._known_end = max(self._known_end, end)

    async def _read_state(self) -> tuple[int, int, int]:
        """Return ``(begin, end, compacted)`` from one strongly consistent Query."""
        for _ in range(5):
            page = await self._call(
                "Query",
                lambda c: c.query(
                    TableName=self._table,
                    KeyConditionExpression="n = :n",
                    ExpressionAttributeValues={":n": _b(self._pk)},
                    # The metadata item sorts last and the end record just before it.
                    ScanIndexForward=False,
                    Limit=2,
                    ConsistentRead=True,
                    ProjectionExpression="k, b, c",
                ),
            )
            begin = compacted = end = 0
            for item in page.get("Items", []):
                if item["k"]["B"] == _META:
                    begin = int(item["b"]["N"])
                    compacted = int(item["c"]["N"]) if "c" in item else 0
                else:
                    end = _position_of(item) + 1
                    break
            if begin <= end:
                self._observe(end)
                return begin, end, compacted
            # The two items were read at slightly different times while another
            # handle appended and truncated; read again.
        raise PersistenceError(f"{self._what}: could not read consistent bounds", retryable=True)

    async def _read_begin(self) -> int:
        item = await self._get_item(_META, "b")
        return int(item["b"]["N"]) if item else 0

    async def bounds(self) -> Interval:
        self._check_open()
        begin, end, _ = await self._read_state()
        return Interval(begin, end)

    async def get(self, pos: int) -> bytes:
        pos = _check_read_position(pos)
        self._check_open()
        if not 0 <= pos <= MAX_POSITION:
            raise RecordNotFound(self._name, pos)
        # One BatchGetItem reads the record and the metadata item, so a record
        # below a truncation that failed part-way is still reported as gone.
        keys = [self._key(_POSITION.pack(pos)), self._key(_META)]
        record: bytes | None = None
        begin = 0
        for attempt in range(_BATCH_ATTEMPTS):
            request: dict[str, KeysAndAttributesTypeDef] = {
                self._table: {
                    "Keys": keys,
                    "ConsistentRead": True,
                    "ProjectionExpression": "k, r, b",
                }
            }
            response = await self._call("BatchGetItem", _batch_get(request))
            for item in response.get("Responses", {}).get(self._table, []):
                if item["k"]["B"] == _META:
                    begin = int(item["b"]["N"])
                else:
                    self._observe(pos + 1)
                    if "r" in item:
                        record = item["r"]["B"]
            unprocessed = response.get("UnprocessedKeys", {}).get(self._table)
            keys = cast(list[Any], unprocessed["Keys"]) if unprocessed else []
            if not keys:
                break
            await anyio.sleep(0.05 * 2**attempt)
        else:
            raise PersistenceError(f"{self._what}: read throttled", retryable=True)
        if record is None or pos < begin:
            raise RecordNotFound(self._name, pos)
        return record

    async def range(self, pos: int) -> AsyncIterator[tuple[int, bytes]]:
        pos = _check_read_position(pos)
        self._check_open()
        if not 0 <= pos <= MAX_POSITION:
            raise RecordNotFound(self._name, pos)
        page_size = self._provider._page_size
        expected = pos

        async def query() -> QueryOutputTypeDef:
            # Restarting the key condition at the next position (rather than
            # passing LastEvaluatedKey) lets a page start wherever the last one
            # stopped, whatever the pagination behaviour.
            kwargs: dict[str, Any] = {
                "TableName": self._table,
                "KeyConditionExpression": "n = :n AND k BETWEEN :lo AND :hi",
                "ExpressionAttributeValues": {
                    ":n": _b(self._pk),
                    ":lo": _b(_POSITION.pack(expected)),
                    ":hi": _b(_LAST_KEY),
                },
                "ConsistentRead": True,
                "Limit": page_size,
            }
            result: QueryOutputTypeDef = await self._call("Query", _query(kwargs))
            return result

        # The first page and the metadata item are read at once: a position below
        # begin is not live even if a failed truncation left its record in place.
        page, begin = await _gather(query, self._read_begin)
        items = page.get("Items", [])
        if pos < begin or not items or _position_of(items[0]) != pos or "r" not in items[0]:
            raise RecordNotFound(self._name, pos)
        while True:
            for item in items:
                if _position_of(item) != expected or "r" not in item:
                    # A tombstone: a truncation overtook this iteration.
                    raise RecordNotFound(self._name, expected)
                record = item["r"]["B"]
                self._observe(expected + 1)
                yield expected, record
                expected += 1
            # Both pagination behaviours end here: an empty page after a
            # LastEvaluatedKey (AWS at an exact Limit), or no LastEvaluatedKey (moto).
            if not items or "LastEvaluatedKey" not in page or expected > MAX_POSITION:
                return
            # Each page with begin, as the first: a truncation whose tombstones
            # were not all written still ends this iteration.
            page, begin = await _gather(query, self._read_begin)
            items = page.get("Items", [])
            if expected < begin:
                raise RecordNotFound(self._name, expected)

    async def append(self, pos: int, record: bytes) -> None:
        pos = check_position(pos)
        record = self._provider.limits.check_record(record)
        self._writable("append")
        if pos < self._known_end:
            raise Conflict.journal(self._name, pos)
        if pos > self._known_end:
            # Beyond what this handle has seen: the end must be exactly here,
            # so the previous position must have an item.
            if await self._get_item(_POSITION.pack(pos - 1), "k") is None:
                raise Conflict.journal(self._name, pos)
            self._observe(pos)
        item = {**self._key(_POSITION.pack(pos)), "r": _b(record)}
        try:
            await self._put(item, "attribute_not_exists(k)")
        except _ConditionFailed:
            self._observe(pos + 1)
            raise Conflict.journal(self._name, pos) from None
        self._observe(pos + 1)

    async def truncate(self, pos: int) -> None:
        pos = check_position(pos)
        self._writable("truncate")
        begin, end, compacted = await self._read_state()
        if pos > end:
            raise ValueError(
                f"journal {self._name!r}: cannot truncate to position {pos}, past the end ({end})"
            )
        if pos > begin:
            try:
                await self._call(
                    "UpdateItem",
                    lambda c: c.update_item(
                        TableName=self._table,
                        Key=self._key(_META),
                        UpdateExpression="SET b = :b",
                        ConditionExpression="attribute_not_exists(b) OR b < :b",
                        ExpressionAttributeValues={":b": _n(pos)},
                        ReturnValuesOnConditionCheckFailure="ALL_OLD",
                    ),
                    write=True,
                )
                begin = pos
            except _ConditionFailed as exc:
                # Another truncation moved begin further: compact up to there.
                begin = int(exc.item["b"]["N"]) if exc.item else await self._read_begin()
        # Also completes what an earlier, failed truncation left undone.
        if compacted < begin:
            await self._tombstone(compacted, begin)
            # A failed condition means another truncation recorded a later point.
            with contextlib.suppress(_ConditionFailed):
                await self._call(
                    "UpdateItem",
                    lambda c: c.update_item(
                        TableName=self._table,
                        Key=self._key(_META),
                        UpdateExpression="SET c = :c",
                        ConditionExpression="attribute_not_exists(c) OR c < :c",
                        ExpressionAttributeValues={":c": _n(begin)},
                    ),
                    write=True,
                )

    async def _tombstone(self, low: int, high: int) -> None:
        """Replace the items of ``[low, high)`` by tombstones (items without ``r``).

        Every position below begin <= end has an item, so unconditional puts
        cannot create a stray one; rewriting a tombstone is harmless.
        """
        chunks: Iterator[range] = (
            range(start, min(start + _TOMBSTONE_BATCH, high))
            for start in range(low, high, _TOMBSTONE_BATCH)
        )
        errors: list[Exception] = []

        async def worker() -> None:
            for chunk in chunks:  # workers share the iterator
                if errors:
                    return
                try:
                    await self._write_batch(
                        [{"PutRequest": {"Item": self._key(_POSITION.pack(p))}} for p in chunk]
                    )
                except Exception as exc:  # re-raised below, unwrapped
                    errors.append(exc)
                    return

        async with anyio.create_task_group() as tg:
            for _ in range(_TOMBSTONE_WORKERS):
                tg.start_soon(worker)
        if errors:
            raise errors[0]

    async def _write_batch(self, requests: list[WriteRequestTypeDef]) -> None:
        for attempt in range(_BATCH_ATTEMPTS):
            response = await self._call(
                "BatchWriteItem", _batch_write({self._table: requests}), write=True
            )
            requests = cast(
                "list[WriteRequestTypeDef]",
                response.get("UnprocessedItems", {}).get(self._table, []),
            )
            if not requests:
                return
            await anyio.sleep(0.05 * 2**attempt)
        raise PersistenceError(f"{self._what}: truncation throttled", retryable=True)
