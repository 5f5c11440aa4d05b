"""``PostgresProvider``: journals, keyspaces and sets in one PostgreSQL schema.

The provider owns the pool, provisioning and opening store names; its stores
(``_stores``) hand out the handles (``_journal``, ``_keyspace``, ``_set``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import ClassVar, Final, TypeVar, cast

import anyio
import psycopg
import psycopg.errors

from runkit.persistence import (
    JournalStore,
    KeyspaceStore,
    Limits,
    PersistenceError,
    Provider,
    SetStore,
    StoreUnavailable,
)

from ._config import (
    DEFAULT_MAX_RECORD_BYTES,
    DEFAULT_MAX_VALUE_BYTES,
    DEFAULT_SCHEMA,
    Settings,
    describe_conninfo,
    parse_url,
    validate_conninfo,
)
from ._executor import Executor, Interrupt
from ._grouping import ReadGroup, WriteGroup
from ._handles import _ABSENT, Conn, _one
from ._journal import append_many, append_one
from ._keyspace import GetRow, get_many, get_one, set_many, set_one
from ._sql import LAYOUT_VERSION, Statements
from ._stores import _JournalStore, _KeyspaceStore, _SetStore

__all__ = ["PostgresProvider"]

T = TypeVar("T")

#: Keys and members sit in a btree primary key, whose entries are capped at
#: about 2.7 kB on 8 kB pages; 2000 bytes leaves room for the rest of the entry.
MAX_KEY_BYTES: Final = 2000
MAX_NAME_BYTES: Final = 1024

# Store names are opened at most this many times per call if another session
# creates the same name concurrently (see ``_sql._OPEN``).
_OPEN_ATTEMPTS: Final = 5
#: Statements in flight per kind of grouped write (journal appends, keyspace
#: compare-and-sets) and provider, at most half its connections: more writes
#: than that at once share statements (``_grouping``).
GROUP_STATEMENTS: Final = 4
_PROVISION_ATTEMPTS: Final = 5

# Errors concurrent DDL can still raise; the whole provisioning is repeated.
_DDL_RACES = (
    psycopg.errors.UniqueViolation,
    psycopg.errors.DuplicateTable,
    psycopg.errors.DuplicateSchema,
    psycopg.errors.DuplicateObject,
)


class PostgresProvider(Provider):
    """A persistence provider storing everything in one PostgreSQL schema.

    Construct it from a libpq connection string (``"host=db dbname=app"`` or a
    ``postgresql://`` URL without runkit's parameters), or with
    ``PostgresProvider.from_url()`` from a full runkit URL. Construction does no
    I/O: the pool opens, and the schema is provisioned, on first use (or with
    ``provision()``).

    Operations run synchronous psycopg in worker threads, at most
    ``pool_max_size`` at once; the provider works on asyncio and trio, and is
    safe to share between tasks of one event loop.

    The first operation opens one connection before the pool: a rejected
    password, a missing database or a refused permission raises a
    non-retryable ``StoreUnavailable`` with the server's reason at once, an
    unreachable server a retryable one. ``set_read_only()`` makes every
    session read-only and provisioning a check (see ``provision``).

    :param conninfo: libpq connection string or URL (passwords are never shown).
    :param schema: the schema holding the tables; several applications or
        clusters can share a database by using different schemas.
    :param pool_min_size: connections kept open when idle.
    :param pool_max_size: most connections (and worker threads) at once.
    :param pool_timeout: seconds to wait for a free connection before failing.
    :param max_record_bytes: largest journal record accepted.
    :param max_value_bytes: largest keyspace value accepted.
    :raises ValueError: for a malformed connection string or setting.
    """

    #: Most rows, and the byte budget, of one page of a ``range``.
    page_rows: ClassVar[int] = 500
    page_bytes: ClassVar[int] = 4 << 20

    def __init__(
        self,
        conninfo: str = "",
        *,
        schema: str = DEFAULT_SCHEMA,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        pool_timeout: float = 30.0,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        validate_conninfo(conninfo)
        self._settings = Settings(
            schema=schema,
            pool_min_size=pool_min_size,
            pool_max_size=pool_max_size,
            pool_timeout=pool_timeout,
            max_record_bytes=max_record_bytes,
            max_value_bytes=max_value_bytes,
        )
        self._display = describe_conninfo(conninfo)
        self._executor = Executor(conninfo, self._settings, display=self._display)
        self._sql = Statements.for_schema(schema)
        self._limits = Limits(
            max_name_bytes=MAX_NAME_BYTES,
            max_key_bytes=MAX_KEY_BYTES,
            max_value_bytes=max_value_bytes,
            max_record_bytes=max_record_bytes,
            max_member_bytes=MAX_KEY_BYTES,
        )
        self._provisioned = False
        self._provision_lock = anyio.Lock()
        # Each kind of single-row operation (appends, compare-and-sets, gets)
        # shares statements (``_grouping``), with up to half the pool per kind
        # in flight. Nothing holds a connection while it waits for another, and
        # the worker-thread limiter queues in order, so the kinds only wait for
        # each other (and for other reads), never deadlock.
        statements = max(1, min(GROUP_STATEMENTS, self._settings.pool_max_size // 2))
        self._appends: WriteGroup[int, tuple[int, bytes]] = WriteGroup(
            self._run_write,
            append_one(self._sql.journal_append),
            append_many(self._sql.journal_append_many),
            statements,
        )
        self._keyspace_writes: WriteGroup[
            tuple[int, bytes], tuple[bytes, uuid.UUID, uuid.UUID | None]
        ] = WriteGroup(
            self._run_write,
            set_one(self._sql.keyspace_insert, self._sql.keyspace_update),
            set_many(self._sql.keyspace_set_many),
            statements,
        )
        # Keyspace gets share statements too (an instance load, a process step's check).
        self._keyspace_reads: ReadGroup[tuple[int, bytes], GetRow] = ReadGroup(
            self._run_read,
            get_one(self._sql.keyspace_get),
            get_many(self._sql.keyspace_get_many),
            statements,
        )
        self._journals = _JournalStore(self)
        self._keyspaces = _KeyspaceStore(self)
        self._sets = _SetStore(self)

    @classmethod
    def from_url(cls, url: str) -> PostgresProvider:
        """Build a provider from a ``postgres://`` or ``postgresql://`` URL.

        libpq parameters pass through; runkit's own (``schema``,
        ``pool_min_size``, ``pool_max_size``, ``pool_timeout``,
        ``max_record_bytes``, ``max_value_bytes``) are taken out first.

        :raises ValueError: naming the parameter, for an unknown parameter or a
            malformed value.
        """
        conninfo, settings = parse_url(url)
        return cls(
            conninfo,
            schema=settings.schema,
            pool_min_size=settings.pool_min_size,
            pool_max_size=settings.pool_max_size,
            pool_timeout=settings.pool_timeout,
            max_record_bytes=settings.max_record_bytes,
            max_value_bytes=settings.max_value_bytes,
        )

    def __repr__(self) -> str:
        return f"PostgresProvider({self._display!r}, schema={self._settings.schema!r})"

    @property
    def settings(self) -> Settings:
        """The provider's validated settings (schema, pool sizing, limits)."""
        return self._settings

    @property
    def schema(self) -> str:
        """The schema holding this provider's tables."""
        return self._settings.schema

    @property
    def journals(self) -> JournalStore:
        """The journal store."""
        return self._journals

    @property
    def keyspaces(self) -> KeyspaceStore:
        """The keyspace store."""
        return self._keyspaces

    @property
    def sets(self) -> SetStore:
        """The set store."""
        return self._sets

    @property
    def limits(self) -> Limits:
        """Names up to 1024 bytes, keys and members up to 2000, records and values as configured."""
        return self._limits

    def set_read_only(self) -> None:
        """Never create the schema, its tables or store rows, and refuse writes.

        Every session runs with ``default_transaction_read_only``; opening a
        store of a missing schema raises ``StoreUnavailable`` ("schema ... does
        not exist in database ..."); a store name never opened before reads as
        empty. Call before the first operation.
        """
        self._executor.set_read_only()
        super().set_read_only()

    async def provision(self) -> None:
        """Create the schema and tables if missing; idempotent and safe under concurrency.

        When everything exists this only reads the catalog, so it needs no
        CREATE privilege. Otherwise it takes a transaction-scoped advisory lock
        (one per schema name), so concurrent provisioners wait for each other,
        and runs ``CREATE ... IF NOT EXISTS`` statements. A read-only provider
        only checks, raising ``StoreUnavailable`` if the schema or its tables
        are missing.
        """
        async with self._provision_lock:
            await self._executor.run(self._provision, what="provision", write=False)
            self._provisioned = True

    async def _ensure_provisioned(self) -> None:
        if not self._provisioned:
            async with self._provision_lock:
                if not self._provisioned:
                    await self._executor.run(self._provision, what="provision", write=False)
                    self._provisioned = True

    def _provision(self, conn: Conn) -> None:
        st = self._sql
        if self.read_only:
            self._check_provisioned(conn)
            return
        for attempt in range(1, _PROVISION_ATTEMPTS + 1):
            if self._layout_version(conn) is None:
                try:
                    with conn.transaction():
                        conn.execute(st.advisory_lock)
                        conn.execute(st.ddl)
                except _DDL_RACES:
                    # Only possible against DDL not serialised by our lock.
                    if attempt == _PROVISION_ATTEMPTS:
                        raise
                    continue
            version = self._layout_version(conn)
            if version != LAYOUT_VERSION:
                raise PersistenceError(
                    f"provision: schema {st.schema!r} has layout version {version}, "
                    f"but this runkit-postgres uses version {LAYOUT_VERSION}; "
                    "upgrade runkit-postgres or use another schema"
                )
            return

    def _check_provisioned(self, conn: Conn) -> None:
        """Read-only provisioning: raise ``StoreUnavailable`` unless the layout is there."""
        st = self._sql
        row = conn.execute(st.store_exists, (st.schema, st.layout_table)).fetchone()
        database, has_schema, has_layout = row if row else ("?", False, False)
        if not has_schema:
            raise StoreUnavailable(
                f"schema {st.schema!r} does not exist in database {database!r} "
                f"(on {self._display!r}); check the schema= parameter of the persistence "
                "URL (read-only commands never create it)"
            )
        if not has_layout:
            raise StoreUnavailable(
                f"schema {st.schema!r} in database {database!r} has no runkit tables; "
                "has a node ever run with this persistence URL? "
                "(read-only commands never create them)"
            )
        version = self._layout_version(conn)
        if version != LAYOUT_VERSION:
            raise PersistenceError(
                f"schema {st.schema!r} has layout version {version}, "
                f"but this runkit-postgres uses version {LAYOUT_VERSION}; "
                "use the runkit-postgres version that wrote it"
            )

    def _layout_version(self, conn: Conn) -> int | None:
        st = self._sql
        row = conn.execute(st.layout_table_exists, (st.layout_table,)).fetchone()
        if not row or not row[0]:
            return None
        row = conn.execute(st.layout_version).fetchone()
        return cast(int | None, row[0] if row else None)

    async def close(self) -> None:
        """Close the connection pool and its threads. Idempotent."""
        await self._executor.close()

    # -- used by stores and handles ------------------------------------------------------

    async def _run(self, operation: Callable[[Conn], T], *, what: str, write: bool) -> T:
        return await self._executor.run(operation, what=what, write=write)

    async def _run_write(
        self, operation: Callable[[Conn], T], what: str, /, *, interrupt: Interrupt | None = None
    ) -> T:
        return await self._executor.run(operation, what=what, write=True, interrupt=interrupt)

    async def _run_read(
        self, operation: Callable[[Conn], T], what: str, /, *, interrupt: Interrupt | None = None
    ) -> T:
        return await self._executor.run(operation, what=what, write=False, interrupt=interrupt)

    async def _open(self, kind: str, query: bytes, find: bytes, name: str) -> int:
        encoded = name.encode("utf-8")

        def operation(conn: Conn) -> int:
            if self.read_only:
                row = _one(conn, find, (encoded,))
                return _ABSENT if row is None else cast(int, row[0])
            for _ in range(_OPEN_ATTEMPTS):
                row = _one(conn, query, (encoded, encoded))
                if row is not None:
                    return cast(int, row[0])
            raise PersistenceError(f"{kind} {name!r}: could not open: its row keeps vanishing")

        await self._ensure_provisioned()
        # Opening is idempotent, so it may be retried like a read.
        return await self._run(operation, what=f"{kind} {name!r}: open", write=False)
