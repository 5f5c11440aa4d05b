"""The DynamoDB provider: journals, keyspaces and sets in three tables.

Layout (see docs/drivers/dynamodb.md): each store kind has a table
``<prefix>-journal``, ``<prefix>-keyspace``, ``<prefix>-set``, all with the
binary partition key ``n`` (the store name, UTF-8) and the binary sort key
``k``. Journal records are items ``{n, k=<position, 8 bytes big-endian>, r}``;
a truncated record keeps its item without ``r`` (a tombstone) and one metadata
item ``k=0xFF`` holds ``b`` (begin) and ``c`` (positions below ``c`` are
tombstoned). Keyspace items are ``{n, k=<key>, v, r=<revision>}``; set items
are ``{n, k=<member>}``.

All boto3 calls run in worker threads bounded by one ``CapacityLimiter`` per
provider; the client is created lazily, in a worker thread, on first use.

The provider owns the client, its calls (``_call``, which maps errors and
provisions a missing table through ``_tables``) and ``Query`` pagination; its
stores (``_stores``) hand out the handles (``_journal``, ``_keyspace``, ``_set``).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import AsyncGenerator, Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio
import boto3
import botocore.exceptions
from botocore.config import Config

from runkit.persistence import (
    JournalStore,
    KeyspaceStore,
    Limits,
    PersistenceError,
    Provider,
    SetStore,
    check_endpoint_url,
)

from ._aws import (
    AmbiguousWrite,
    create_client,
    default_config,
    error_code,
    install_ambiguity_guard,
    map_error,
)
from ._handles import _ConditionFailed, _gather, _query
from ._stores import _JournalStore, _KeyspaceStore, _SetStore
from ._tables import ensure_table_sync
from ._url import TABLE_SUFFIXES, check_region, check_role_arn, check_table_prefix, parse_url

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient
    from mypy_boto3_dynamodb.type_defs import QueryOutputTypeDef

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
        endpoint_url: A custom endpoint, ``http(s)://host[:port]``, e.g.
            ``http://localhost:8000``; never with credentials (``ValueError``).
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
        # Validated here: it is shown in repr() and errors, and botocore refuses
        # a malformed one only at the first request.
        self._endpoint_url = (
            check_endpoint_url(endpoint_url, "dynamodb") if endpoint_url is not None else None
        )
        self._session = session
        self._config = config
        self._client: DynamoDBClient | None = client
        self._owns_client = client is None
        if client is not None:
            install_ambiguity_guard(client)
        # ``_lock`` guards ``_client`` and ``_closed`` and is never held across slow
        # work, so the event loop may take it (in close()); ``_create_lock``
        # serialises client creation (about half a second, in a worker thread).
        self._lock = threading.Lock()
        self._create_lock = threading.Lock()
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
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None and self._owns_client:
            # Synchronous, so a cancelled caller cannot skip it: it only closes the
            # pool's idle sockets (connections in use close when their call ends).
            client.close()

    def __repr__(self) -> str:
        state = " (closed)" if self._closed else ""
        where = f" at {self._endpoint_url}" if self._endpoint_url else ""
        return f"<DynamoDBProvider {self._prefix!r}{where}{state}>"

    # -- internals ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PersistenceError(f"{self!r} is closed")

    def _current_client(self) -> DynamoDBClient | None:
        with self._lock:
            self._check_open()
            return self._client

    def _client_sync(self) -> DynamoDBClient:
        # Runs in a worker thread: building a client reads config files and models.
        client = self._current_client()
        if client is not None:
            return client
        with self._create_lock:
            client = self._current_client()  # another thread may have made it
            if client is not None:
                return client
            base = default_config(self._max_concurrency)
            config = base.merge(self._config) if self._config is not None else base
            client = create_client(
                self._session, self._region, self._endpoint_url, self._role_arn, config
            )
            with self._lock:
                closed = self._closed
                if not closed:
                    self._client = client
            if closed:  # close() ran while it was being made
                client.close()
                raise PersistenceError(f"{self!r} is closed")
            return client

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
        ensure_table_sync(self, kind)

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
