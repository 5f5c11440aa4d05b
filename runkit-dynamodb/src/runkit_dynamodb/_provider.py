"""The DynamoDB provider: journals, keyspaces and sets in three tables.

Layout (see docs/drivers/dynamodb.md): each store kind has a table
``<prefix>-journal``, ``<prefix>-keyspace``, ``<prefix>-set``, all with the
binary partition key ``n`` (the store name, UTF-8) and the binary sort key
``k``. Journal records are items ``{n, k=<position, 8 bytes big-endian>, r}``;
a truncated record keeps its item without ``r`` (a tombstone) and one metadata
item ``k=0xFF`` holds ``b`` (begin) and ``c`` (positions below ``c`` are
tombstoned). Keyspace items are ``{n, k=<key>, v, r=<revision>}``; set items
are ``{n, k=<member>}``.

Why appends are one request: journal items are never deleted, so "item p-1
exists" stays true once seen, and ``PutItem p IF attribute_not_exists(k)``
succeeds only while p is the end. A handle remembers the highest end it has
seen; it reads item p-1 (one consistent ``GetItem``) only when asked to append
beyond that, which is how positions past the end conflict.

All boto3 calls run in worker threads bounded by one ``CapacityLimiter`` per
provider; the client is created lazily, in a worker thread, on first use.
"""

from __future__ import annotations

import contextlib
import functools
import struct
import threading
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import anyio
import boto3
import botocore.exceptions
from anyio.lowlevel import checkpoint
from botocore.config import Config

from runkit.persistence import (
    MAX_POSITION,
    Conflict,
    Interval,
    Journal,
    JournalStore,
    Keyspace,
    KeyspaceStore,
    Limits,
    PersistenceError,
    Provider,
    RecordNotFound,
    Set,
    SetStore,
    StoreUnavailable,
    check_position,
)

from ._aws import (
    AmbiguousWrite,
    create_client,
    default_config,
    error_code,
    install_ambiguity_guard,
    map_error,
)
from ._url import TABLE_SUFFIXES, check_region, check_role_arn, check_table_prefix, parse_url

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

__all__ = ["DYNAMODB_LIMITS", "DynamoDBProvider"]

T = TypeVar("T")

#: What the driver accepts: records and values stay under DynamoDB's 400 KB item
#: limit with a maximal name and key; keys and members are sort keys (1,024
#: bytes); names are partition keys (2,048 bytes of UTF-8).
DYNAMODB_LIMITS: Final = Limits(
    max_name_bytes=2048,
    max_key_bytes=1024,
    max_value_bytes=390 * 1024,
    max_record_bytes=390 * 1024,
    max_member_bytes=1024,
)

_META: Final = b"\xff"  # sorts after every 8-byte position (their first byte is <= 0x7f)
_POSITION = struct.Struct(">Q")
_LAST_KEY: Final = _POSITION.pack(MAX_POSITION)
_TOMBSTONE_BATCH: Final = 25  # BatchWriteItem's maximum
_TOMBSTONE_WORKERS: Final = 4
_BATCH_ATTEMPTS: Final = 10  # for unprocessed items/keys of batch calls


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


# Refused by a read-only provider.
_WRITE_OPERATIONS = frozenset(
    {"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems"}
)


class DynamoDBProvider(Provider):
    """A provider that stores journals, keyspaces and sets in Amazon DynamoDB.

    Args:
        table_prefix: Tables are ``<prefix>-journal``, ``<prefix>-keyspace`` and
            ``<prefix>-set``: 1 to 246 characters of ``A-Za-z0-9_.-``. The
            prefix is the namespace: providers with the same prefix, region and
            account share data.
        client: A boto3 DynamoDB client to use as is (the provider does not
            close it). It gains one ``needs-retry`` event hook (see below).
            Excludes every other connection argument.
        session: A ``boto3.Session`` to build the client from (default: a new
            one, using the standard credential chain).
        region: The AWS region (default: the session's).
        endpoint_url: A custom endpoint, e.g. ``http://localhost:8000``.
        role_arn: Assume this IAM role through STS with the session's
            credentials; the role's credentials are refreshed before they expire.
        config: A ``botocore.config.Config`` merged over the driver's defaults
            (standard retry mode, 10 attempts, 5 s connect and 30 s read timeouts).
        max_concurrency: At most this many requests in flight (worker threads
            and pooled connections).
        page_size: Items per ``Query`` page when ranging.

    Tables are created (pay-per-request) by ``provision()``, or on first use of
    a missing table; after ``set_read_only()`` a missing table raises
    ``StoreUnavailable`` instead, and writes are refused. Reads are strongly
    consistent. Throttling is retried by botocore; a conditional write whose
    outcome is unknown (timeout or 5xx after sending) is never retried and
    raises ``PersistenceError`` with ``ambiguous=True``. Constructing a provider does no I/O.
    """

    def __init__(
        self,
        table_prefix: str,
        *,
        client: DynamoDBClient | None = None,
        session: boto3.session.Session | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        role_arn: str | None = None,
        config: Config | None = None,
        max_concurrency: int = 16,
        page_size: int = 250,
    ) -> None:
        self._prefix = check_table_prefix(table_prefix)
        if client is not None and any(
            x is not None for x in (session, region, endpoint_url, role_arn, config)
        ):
            raise ValueError(
                "DynamoDBProvider: pass either client=... or session/region/endpoint_url/"
                "role_arn/config, not both"
            )
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive int, not {max_concurrency!r}")
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, not {page_size!r}")
        self._region = check_region(region) if region is not None else None
        self._role_arn = check_role_arn(role_arn) if role_arn is not None else None
        self._endpoint_url = endpoint_url
        self._session = session
        self._config = config
        self._client: DynamoDBClient | None = client
        self._owns_client = client is None
        if client is not None:
            install_ambiguity_guard(client)
        self._client_lock = threading.Lock()
        self._max_concurrency = max_concurrency
        self._page_size = page_size
        self._limiter = anyio.CapacityLimiter(max_concurrency)
        self._tables = MappingProxyType(
            {kind: f"{self._prefix}{suffix}" for kind, suffix in TABLE_SUFFIXES.items()}
        )
        self._provision_locks = {kind: anyio.Lock() for kind in TABLE_SUFFIXES}
        self._provisioned = dict.fromkeys(TABLE_SUFFIXES, 0)  # generation per table
        self._closed = False
        self._journals = _JournalStore(self)
        self._keyspaces = _KeyspaceStore(self)
        self._sets = _SetStore(self)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> DynamoDBProvider:
        """Build a provider from a ``dynamodb://`` URL (see ``parse_url``).

        *kwargs* are further constructor arguments (``session``, ``config``, ...).
        """
        parts = parse_url(url)
        return cls(
            parts.table_prefix,
            endpoint_url=parts.endpoint_url,
            region=parts.region,
            role_arn=parts.role_arn,
            **kwargs,
        )

    @property
    def table_prefix(self) -> str:
        """The prefix of this provider's table names."""
        return self._prefix

    @property
    def tables(self) -> Mapping[str, str]:
        """The table name of each store kind (``journal``, ``keyspace``, ``set``)."""
        return self._tables

    @property
    def journals(self) -> JournalStore:
        return self._journals

    @property
    def keyspaces(self) -> KeyspaceStore:
        return self._keyspaces

    @property
    def sets(self) -> SetStore:
        return self._sets

    @property
    def limits(self) -> Limits:
        return DYNAMODB_LIMITS

    async def provision(self) -> None:
        """Create the three tables if missing and wait until they are active.

        Idempotent, and safe when several providers provision at once.
        """
        self._check_open()
        await _gather(*(functools.partial(self._ensure_table, kind) for kind in self._tables))

    async def close(self) -> None:
        """Close the client if this provider created it. Idempotent.

        Later calls through the provider or its handles raise ``PersistenceError``.
        """
        if self._closed:
            return
        self._closed = True
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None and self._owns_client:
            await anyio.to_thread.run_sync(client.close)

    def __repr__(self) -> str:
        state = " (closed)" if self._closed else ""
        where = f" at {self._endpoint_url}" if self._endpoint_url else ""
        return f"<DynamoDBProvider {self._prefix!r}{where}{state}>"

    # -- internals ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PersistenceError(f"{self!r} is closed")

    def _client_sync(self) -> DynamoDBClient:
        # Runs in a worker thread: building a client reads config files and models.
        with self._client_lock:
            if self._closed:
                raise PersistenceError(f"{self!r} is closed")
            if self._client is None:
                base = default_config(self._max_concurrency)
                config = base.merge(self._config) if self._config is not None else base
                client = create_client(
                    self._session, self._region, self._endpoint_url, self._role_arn, config
                )
                self._client = client
            return self._client

    def _invoke(self, call: Callable[[DynamoDBClient], T]) -> T:
        return call(self._client_sync())

    async def _call(
        self,
        kind: str,
        what: str,
        operation: str,
        call: Callable[[DynamoDBClient], T],
        *,
        write: bool = False,
    ) -> T:
        """Run one boto3 call in a worker thread and translate its failures.

        A conditional-check failure raises ``_ConditionFailed``; a missing table
        is provisioned and the call made once more (it cannot have taken effect).
        """
        if self.read_only and operation in _WRITE_OPERATIONS:
            raise PersistenceError(f"{what}: {operation}: the provider is read-only")
        for attempt in range(2):
            self._check_open()
            generation = self._provisioned[kind]
            try:
                return await anyio.to_thread.run_sync(self._invoke, call, limiter=self._limiter)
            except botocore.exceptions.ClientError as exc:
                code = error_code(exc)
                if code == "ConditionalCheckFailedException":
                    old = exc.response.get("Item")
                    raise _ConditionFailed(old if isinstance(old, Mapping) else None) from None
                if code == "ResourceNotFoundException" and attempt == 0:
                    await self._ensure_table(kind, seen=generation)
                    continue
                raise map_error(exc, what, operation, write=write) from exc
            except (botocore.exceptions.BotoCoreError, AmbiguousWrite) as exc:
                raise map_error(exc, what, operation, write=write) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _ensure_table(self, kind: str, *, seen: int | None = None) -> None:
        async with self._provision_locks[kind]:
            if seen is not None and self._provisioned[kind] != seen:
                return  # another task provisioned it while we waited for the lock
            what = f"table {self._tables[kind]!r}"
            try:
                await anyio.to_thread.run_sync(self._ensure_table_sync, kind, limiter=self._limiter)
            except botocore.exceptions.WaiterError as exc:
                raise PersistenceError(
                    f"{what}: did not become active: {exc}", retryable=True
                ) from exc
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                raise map_error(exc, what, "table provisioning", write=True) from exc
            self._provisioned[kind] += 1

    def _ensure_table_sync(self, kind: str) -> None:
        client = self._client_sync()
        name = self._tables[kind]
        try:
            table = client.describe_table(TableName=name)["Table"]
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
            if self.read_only:
                raise StoreUnavailable(
                    f"table {name!r} does not exist (region {client.meta.region_name!r}); "
                    "check the table prefix of the persistence URL (read-only commands "
                    "never create it)"
                ) from None
        else:
            keys = {(k["AttributeName"], k["KeyType"]) for k in table.get("KeySchema", [])}
            types = {
                (a["AttributeName"], a["AttributeType"])
                for a in table.get("AttributeDefinitions", [])
            }
            if keys != {("n", "HASH"), ("k", "RANGE")} or not {("n", "B"), ("k", "B")} <= types:
                raise PersistenceError(
                    f"table {name!r} exists but is not a runkit {kind} table: expected the "
                    "binary partition key 'n' and the binary sort key 'k'"
                )
            if table.get("TableStatus") == "ACTIVE":
                return
        try:
            client.create_table(
                TableName=name,
                KeySchema=[
                    {"AttributeName": "n", "KeyType": "HASH"},
                    {"AttributeName": "k", "KeyType": "RANGE"},
                ],
                AttributeDefinitions=[
                    {"AttributeName": "n", "AttributeType": "B"},
                    {"AttributeName": "k", "AttributeType": "B"},
                ],
                BillingMode="PAY_PER_REQUEST",
            )
        except botocore.exceptions.ClientError as exc:
            # Another provider is creating it (or it is being updated): just wait.
            if error_code(exc) != "ResourceInUseException":
                raise
        client.get_waiter("table_exists").wait(
            TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 300}
        )

    async def _query_pages(
        self, kind: str, what: str, request: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> AsyncGenerator[QueryOutputTypeDef, None]:
        """Yield Query pages until one has no ``LastEvaluatedKey``.

        Copes with both pagination behaviours: a ``LastEvaluatedKey`` followed by
        an empty page (AWS at an exact ``Limit``), and none at all (moto).
        """
        table = self._tables[kind]
        start: dict[str, Any] | None = None
        while True:
            kwargs = request({"TableName": table, "ConsistentRead": True, "Limit": self._page_size})
            if start is not None:
                kwargs["ExclusiveStartKey"] = start
            page: QueryOutputTypeDef = await self._call(kind, what, "Query", _query(kwargs))
            yield page
            start = page.get("LastEvaluatedKey")
            if start is None:
                return


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

    def _key(self, sort_key: bytes) -> dict[str, AttributeValueTypeDef]:
        return {"n": _b(self._pk), "k": _b(sort_key)}

    async def _call(
        self, operation: str, call: Callable[[DynamoDBClient], T], *, write: bool = False
    ) -> T:
        self._check_open()
        return await self._provider._call(self._kind, self._what, operation, call, write=write)

    def __repr__(self) -> str:
        state = " (closed)" if self._closed else ""
        return f"<dynamodb {self._kind} {self._name!r} in {self._table!r}{state}>"


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
        response = await self._call(
            "GetItem",
            lambda c: c.get_item(
                TableName=self._table,
                Key=self._key(_META),
                ConsistentRead=True,
                ProjectionExpression="b",
            ),
        )
        item = response.get("Item")
        return int(item["b"]["N"]) if item else 0

    async def bounds(self) -> Interval:
        self._check_open()
        begin, end, _ = await self._read_state()
        return Interval(begin, end)

    async def get(self, position: int) -> bytes:
        position = _check_read_position(position)
        self._check_open()
        if not 0 <= position <= MAX_POSITION:
            raise RecordNotFound(self._name, position)
        # One BatchGetItem reads the record and the metadata item, so a record
        # below a truncation that failed part-way is still reported as gone.
        keys = [self._key(_POSITION.pack(position)), self._key(_META)]
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
                    self._observe(position + 1)
                    if "r" in item:
                        record = item["r"]["B"]
            unprocessed = response.get("UnprocessedKeys", {}).get(self._table)
            keys = cast(list[Any], unprocessed["Keys"]) if unprocessed else []
            if not keys:
                break
            await anyio.sleep(0.05 * 2**attempt)
        else:
            raise PersistenceError(f"{self._what}: read throttled", retryable=True)
        if record is None or position < begin:
            raise RecordNotFound(self._name, position)
        return record

    async def range(self, position: int) -> AsyncIterator[tuple[int, bytes]]:
        position = _check_read_position(position)
        self._check_open()
        if not 0 <= position <= MAX_POSITION:
            raise RecordNotFound(self._name, position)
        page_size = self._provider._page_size
        expected = position

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
        if (
            position < begin
            or not items
            or _position_of(items[0]) != position
            or "r" not in items[0]
        ):
            raise RecordNotFound(self._name, position)
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
            page = await query()
            items = page.get("Items", [])

    async def append(self, position: int, record: bytes) -> None:
        position = check_position(position)
        record = self._provider.limits.check_record(record)
        self._check_open()
        if position < self._known_end:
            raise Conflict.journal(self._name, position)
        if position > self._known_end:
            # Beyond what this handle has seen: the end must be exactly here,
            # so the previous position must have an item.
            response = await self._call(
                "GetItem",
                lambda c: c.get_item(
                    TableName=self._table,
                    Key=self._key(_POSITION.pack(position - 1)),
                    ConsistentRead=True,
                    ProjectionExpression="k",
                ),
            )
            if "Item" not in response:
                raise Conflict.journal(self._name, position)
            self._observe(position)
        item = {**self._key(_POSITION.pack(position)), "r": _b(record)}
        try:
            await self._call(
                "PutItem",
                lambda c: c.put_item(
                    TableName=self._table,
                    Item=item,
                    ConditionExpression="attribute_not_exists(k)",
                ),
                write=True,
            )
        except _ConditionFailed:
            self._observe(position + 1)
            raise Conflict.journal(self._name, position) from None
        self._observe(position + 1)

    async def truncate(self, position: int) -> None:
        position = check_position(position)
        self._check_open()
        begin, end, compacted = await self._read_state()
        if position > end:
            raise ValueError(
                f"journal {self._name!r}: cannot truncate to position {position}, "
                f"past the end ({end})"
            )
        if position > begin:
            try:
                await self._call(
                    "UpdateItem",
                    lambda c: c.update_item(
                        TableName=self._table,
                        Key=self._key(_META),
                        UpdateExpression="SET b = :b",
                        ConditionExpression="attribute_not_exists(b) OR b < :b",
                        ExpressionAttributeValues={":b": _n(position)},
                        ReturnValuesOnConditionCheckFailure="ALL_OLD",
                    ),
                    write=True,
                )
                begin = position
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


class _DynamoKeyspace(_Handle, Keyspace):
    _kind = "keyspace"

    async def get(self, key: bytes) -> tuple[bytes, str]:
        key = self._provider.limits.check_key(key)
        response = await self._call(
            "GetItem",
            lambda c: c.get_item(
                TableName=self._table,
                Key=self._key(key),
                ConsistentRead=True,
                ProjectionExpression="v, r",
            ),
        )
        item = response.get("Item")
        if item is None:
            return b"", ""
        return item["v"]["B"], item["r"]["S"]

    async def has(self, key: bytes) -> bool:
        key = self._provider.limits.check_key(key)
        return await self._exists(key)

    async def _exists(self, key: bytes) -> bool:
        response = await self._call(
            "GetItem",
            lambda c: c.get_item(
                TableName=self._table,
                Key=self._key(key),
                ConsistentRead=True,
                ProjectionExpression="k",
            ),
        )
        return "Item" in response

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        limits = self._provider.limits
        key = limits.check_key(key)
        value = limits.check_value(value)
        if not isinstance(revision, str):
            raise TypeError(f"revision must be str, not {type(revision).__name__}")
        self._check_open()
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
            item = {**self._key(key), "v": _b(value), "r": {"S": new_revision}}
            if revision:
                await self._call(
                    "PutItem",
                    lambda c: c.put_item(
                        TableName=self._table,
                        Item=item,
                        ConditionExpression="r = :r",
                        ExpressionAttributeValues={":r": {"S": revision}},
                    ),
                    write=True,
                )
            else:
                await self._call(
                    "PutItem",
                    lambda c: c.put_item(
                        TableName=self._table,
                        Item=item,
                        ConditionExpression="attribute_not_exists(k)",
                    ),
                    write=True,
                )
            return new_revision
        except _ConditionFailed:
            raise Conflict.keyspace(self._name, key, revision) from None

    async def set_unconditional(self, key: bytes, value: bytes) -> str:
        limits = self._provider.limits
        key = limits.check_key(key)
        value = limits.check_value(value)
        if not value:
            await self._call(
                "DeleteItem",
                lambda c: c.delete_item(TableName=self._table, Key=self._key(key)),
                write=True,
            )
            return ""
        new_revision = uuid.uuid4().hex
        item = {**self._key(key), "v": _b(value), "r": {"S": new_revision}}
        await self._call(
            "PutItem", lambda c: c.put_item(TableName=self._table, Item=item), write=True
        )
        return new_revision

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


class _DynamoSet(_Handle, Set):
    _kind = "set"

    async def has(self, member: bytes) -> bool:
        member = self._provider.limits.check_member(member)
        response = await self._call(
            "GetItem",
            lambda c: c.get_item(
                TableName=self._table,
                Key=self._key(member),
                ConsistentRead=True,
                ProjectionExpression="k",
            ),
        )
        return "Item" in response

    async def add(self, member: bytes) -> None:
        member = self._provider.limits.check_member(member)
        await self._call(
            "PutItem",
            lambda c: c.put_item(TableName=self._table, Item=self._key(member)),
            write=True,
        )

    async def try_add(self, member: bytes) -> bool:
        member = self._provider.limits.check_member(member)
        try:
            await self._call(
                "PutItem",
                lambda c: c.put_item(
                    TableName=self._table,
                    Item=self._key(member),
                    ConditionExpression="attribute_not_exists(k)",
                ),
                write=True,
            )
        except _ConditionFailed:
            return False
        return True

    async def remove(self, member: bytes) -> None:
        member = self._provider.limits.check_member(member)
        await self._call(
            "DeleteItem",
            lambda c: c.delete_item(TableName=self._table, Key=self._key(member)),
            write=True,
        )

    async def try_remove(self, member: bytes) -> bool:
        member = self._provider.limits.check_member(member)
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


class _JournalStore(JournalStore):
    def __init__(self, provider: DynamoDBProvider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Journal:
        # No I/O: the table is created on first use if it is missing.
        name = self._provider.limits.check_name("journal", name)
        await checkpoint()
        self._provider._check_open()
        return _DynamoJournal(self._provider, name)


class _KeyspaceStore(KeyspaceStore):
    def __init__(self, provider: DynamoDBProvider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Keyspace:
        name = self._provider.limits.check_name("keyspace", name)
        await checkpoint()
        self._provider._check_open()
        return _DynamoKeyspace(self._provider, name)


class _SetStore(SetStore):
    def __init__(self, provider: DynamoDBProvider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Set:
        name = self._provider.limits.check_name("set", name)
        await checkpoint()
        self._provider._check_open()
        return _DynamoSet(self._provider, name)
