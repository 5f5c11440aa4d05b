"""``PostgresProvider``: journals, keyspaces and sets in one PostgreSQL schema."""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import ClassVar, Final, TypeVar, cast

import anyio
import psycopg
import psycopg.errors
from psycopg import Connection

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

from ._config import (
    DEFAULT_MAX_RECORD_BYTES,
    DEFAULT_MAX_VALUE_BYTES,
    DEFAULT_SCHEMA,
    Settings,
    describe_conninfo,
    parse_url,
    validate_conninfo,
)
from ._executor import Executor
from ._group_append import GroupAppender
from ._sql import LAYOUT_VERSION, Statements

__all__ = ["PostgresProvider"]

Conn = Connection[tuple[object, ...]]
T = TypeVar("T")
Rows = list[tuple[object, ...]]

#: Keys and members sit in a btree primary key, whose entries are capped at
#: about 2.7 kB on 8 kB pages; 2000 bytes leaves room for the rest of the entry.
MAX_KEY_BYTES: Final = 2000
MAX_NAME_BYTES: Final = 1024

# Store names are opened at most this many times per call if another session
# creates the same name concurrently (see ``_sql._OPEN``).
_OPEN_ATTEMPTS: Final = 5
#: Append statements in flight per provider (at most half its connections):
#: more appends than that at once share statements (``_group_append``).
APPEND_STATEMENTS: Final = 4
_PROVISION_ATTEMPTS: Final = 5
# The row id of a store a read-only provider found no row for: identity
# columns start at 1, so it matches nothing and the store reads as empty.
_ABSENT: Final = 0

# Errors concurrent DDL can still raise; the whole provisioning is repeated.
_DDL_RACES = (
    psycopg.errors.UniqueViolation,
    psycopg.errors.DuplicateTable,
    psycopg.errors.DuplicateSchema,
    psycopg.errors.DuplicateObject,
)


def _one(conn: Conn, query: bytes, params: tuple[object, ...]) -> tuple[object, ...] | None:
    return conn.execute(query, params, prepare=True, binary=True).fetchone()


def _all(conn: Conn, query: bytes, params: tuple[object, ...]) -> list[tuple[object, ...]]:
    return conn.execute(query, params, prepare=True, binary=True).fetchall()


def _rowcount(conn: Conn, query: bytes, params: tuple[object, ...]) -> int:
    return conn.execute(query, params, prepare=True, binary=True).rowcount


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
        self._appends = GroupAppender(
            lambda operation, what: self._run(operation, what=what, write=True),
            self._sql.journal_append,
            self._sql.journal_append_many,
            max_statements=max(1, min(APPEND_STATEMENTS, self._settings.pool_max_size // 2)),
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


class _Pages(AsyncIterator[T]):
    """An async iterator over pages fetched one round trip at a time.

    A plain iterator rather than an async generator: it holds no connection or
    other resource between pages, so a consumer may stop early without closing
    it (trio warns about unfinished async generators). ``aclose()`` exists so
    that ``contextlib.aclosing`` works as it does for generators.
    """

    __slots__ = ("_done", "_fetch", "_items")

    def __init__(self, fetch: Callable[[], Awaitable[tuple[list[T], bool]]]) -> None:
        self._fetch = fetch
        self._items: deque[T] = deque()
        self._done = False

    def __aiter__(self) -> _Pages[T]:
        return self

    async def __anext__(self) -> T:
        while not self._items:
            if self._done:
                raise StopAsyncIteration
            page, self._done = await self._fetch()
            self._items.extend(page)
        return self._items.popleft()

    async def aclose(self) -> None:
        """Stop the iteration; later steps raise ``StopAsyncIteration``."""
        self._done = True
        self._items.clear()


class _JournalStore(JournalStore):
    def __init__(self, provider: PostgresProvider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Journal:
        p = self._provider
        name = p.limits.check_name("journal", name)
        journal_id = await p._open("journal", p._sql.open_journal, p._sql.find_journal, name)
        return _Journal(p, name, journal_id)


class _KeyspaceStore(KeyspaceStore):
    def __init__(self, provider: PostgresProvider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Keyspace:
        p = self._provider
        name = p.limits.check_name("keyspace", name)
        keyspace_id = await p._open("keyspace", p._sql.open_keyspace, p._sql.find_keyspace, name)
        return _Keyspace(p, name, keyspace_id)


class _SetStore(SetStore):
    def __init__(self, provider: PostgresProvider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Set:
        p = self._provider
        name = p.limits.check_name("set", name)
        set_id = await p._open("set", p._sql.open_set, p._sql.find_set, name)
        return _Set(p, name, set_id)


class _Handle:
    """What the three handle kinds share: the provider, the row id, closing."""

    _kind: ClassVar[str]

    def __init__(self, provider: PostgresProvider, name: str, store_id: int) -> None:
        self._provider = provider
        self._name = name
        self._id = store_id
        self._closed = False
        self._sql = provider._sql

    @property
    def name(self) -> str:
        """The name the store was opened with."""
        return self._name

    async def close(self) -> None:
        """Release the handle. Idempotent; other handles of the name are unaffected."""
        self._closed = True

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name!r} of {self._provider!r}>"

    def _check_open(self) -> None:
        if self._closed:
            raise PersistenceError(f"{self._kind} {self._name!r}: the handle is closed")

    def _what(self, action: str) -> str:
        return f"{self._kind} {self._name!r}: {action}"

    async def _read(self, operation: Callable[[Conn], T], action: str) -> T:
        self._check_open()
        return await self._provider._run(operation, what=self._what(action), write=False)

    def _writable(self, action: str) -> str:
        """Check that the handle may write; return the description of *action*."""
        self._check_open()
        what = self._what(action)
        if self._provider.read_only:
            raise PersistenceError(f"{what}: the provider is read-only")
        return what

    async def _write(self, operation: Callable[[Conn], T], action: str) -> T:
        what = self._writable(action)
        return await self._provider._run(operation, what=what, write=True)


class _Journal(_Handle, Journal):
    _kind = "journal"

    async def bounds(self) -> Interval:
        """Return ``[begin, end)`` as of the call."""
        query, params = self._sql.journal_bounds, (self._id,)

        def operation(conn: Conn) -> tuple[object, ...] | None:
            return _one(conn, query, params)

        row = await self._read(operation, "bounds")
        if row is None:
            if self._id == _ABSENT:
                return Interval(0, 0)
            raise self._missing()
        return Interval(cast(int, row[0]), cast(int, row[1]))

    async def get(self, position: int) -> bytes:
        """Return the record at *position*, or raise ``RecordNotFound``."""
        self._check_open()
        if not isinstance(position, int) or isinstance(position, bool):
            raise TypeError(f"position must be int, not {type(position).__name__}")
        if not 0 <= position <= MAX_POSITION:
            raise RecordNotFound(self._name, position)
        query, params = self._sql.journal_get, (self._id, position)

        def operation(conn: Conn) -> tuple[object, ...] | None:
            return _one(conn, query, params)

        row = await self._read(operation, f"get position {position}")
        if row is None:
            raise RecordNotFound(self._name, position)
        return cast(bytes, row[0])

    def range(self, position: int) -> AsyncIterator[tuple[int, bytes]]:
        """Iterate ``(position, record)`` to the end, one page per round trip."""
        self._check_open()
        if not isinstance(position, int) or isinstance(position, bool):
            raise TypeError(f"position must be int, not {type(position).__name__}")
        query = self._sql.journal_page
        rows_per_page, bytes_per_page = self._provider.page_rows, self._provider.page_bytes
        first = True

        async def fetch() -> tuple[list[tuple[int, bytes]], bool]:
            nonlocal position, first
            if not 0 <= position <= MAX_POSITION:
                raise RecordNotFound(self._name, position)
            params = (position, rows_per_page, bytes_per_page, self._id)

            def operation(conn: Conn) -> Rows:
                return _all(conn, query, params)

            rows = await self._read(operation, f"range from position {position}")
            if not rows:
                if self._id == _ABSENT:
                    raise RecordNotFound(self._name, position)
                raise self._missing()
            begin, end = cast(int, rows[0][0]), cast(int, rows[0][1])
            if position < begin or (first and position >= end):
                # Not live: never written, or truncated (before or during iteration).
                raise RecordNotFound(self._name, position)
            first = False
            page: list[tuple[int, bytes]] = []
            for _, _, found, record in rows:
                if found != position:  # records are dense in [begin, end)
                    if page:
                        break  # report the gap when the consumer gets there
                    raise RecordNotFound(self._name, position)
                page.append((position, cast(bytes, record)))
                position += 1
            return page, position >= end

        return _Pages(fetch)

    async def append(self, position: int, record: bytes) -> None:
        """Append *record* at *position* (the end), or raise ``Conflict``.

        Concurrent appends to other journals of the provider may share the
        statement (``_group_append``); the outcome is this journal's alone.
        """
        self._check_open()
        position = check_position(position)
        data = self._provider.limits.check_record(record)
        what = self._writable(f"append at position {position}")
        if not await self._provider._appends.append(self._id, position, data, what):
            raise Conflict.journal(self._name, position)

    async def truncate(self, position: int) -> None:
        """Remove the records below *position*, atomically."""
        self._check_open()
        position = check_position(position)
        st = self._sql

        def operation(conn: Conn) -> tuple[object, ...] | None:
            with conn.transaction():
                params = (position, self._id, position, position)
                if _rowcount(conn, st.journal_raise_begin, params):
                    # A new statement, so a new snapshot: it sees every record
                    # appended before the UPDATE took the journal's row lock.
                    _rowcount(conn, st.journal_delete_below, (self._id, position))
                    return None
                return _one(conn, st.journal_bounds, (self._id,))

        bounds = await self._write(operation, f"truncate to position {position}")
        if bounds is not None and position > cast(int, bounds[1]):
            raise ValueError(
                f"journal {self._name!r}: cannot truncate to position {position}, "
                f"past the end ({bounds[1]})"
            )

    def _missing(self) -> PersistenceError:
        return PersistenceError(
            f"journal {self._name!r}: its row is missing from schema "
            f"{self._provider.schema!r} (dropped while in use?)"
        )


def _parse_revision(revision: object) -> uuid.UUID | None:
    """The UUID a revision string stands for; ``None`` for ``""``; raise if not ours."""
    if not isinstance(revision, str):
        raise TypeError(f"revision must be str, not {type(revision).__name__}")
    if not revision:
        return None
    if len(revision) != 32 or revision.strip("0123456789abcdef"):
        raise _ForeignRevision
    return uuid.UUID(hex=revision)


class _ForeignRevision(Exception):
    """A revision this driver never issued: it matches no key, so the write conflicts."""


class _Keyspace(_Handle, Keyspace):
    _kind = "keyspace"

    async def get(self, key: bytes) -> tuple[bytes, str]:
        """Return ``(value, revision)``, or ``(b"", "")`` when absent."""
        self._check_open()
        k = self._provider.limits.check_key(key)
        query, params = self._sql.keyspace_get, (self._id, k)

        def operation(conn: Conn) -> tuple[object, ...] | None:
            return _one(conn, query, params)

        row = await self._read(operation, "get")
        if row is None:
            return b"", ""
        return cast(bytes, row[0]), cast(uuid.UUID, row[1]).hex

    async def has(self, key: bytes) -> bool:
        """Return whether *key* is present."""
        self._check_open()
        k = self._provider.limits.check_key(key)
        query, params = self._sql.keyspace_has, (self._id, k)

        def operation(conn: Conn) -> bool:
            row = _one(conn, query, params)
            return bool(row and row[0])

        return await self._read(operation, "has")

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        """Compare-and-set *key* on its revision; an empty *value* deletes."""
        self._check_open()
        limits = self._provider.limits
        k, v = limits.check_key(key), limits.check_value(value)
        try:
            current = _parse_revision(revision)
        except _ForeignRevision:
            raise Conflict.keyspace(self._name, k, revision) from None
        st = self._sql
        new = uuid.uuid4() if v else None
        params: tuple[object, ...]
        if v and current is None:
            query, params = st.keyspace_insert, (self._id, k, v, new)
        elif v:
            query, params = st.keyspace_update, (v, new, self._id, k, current)
        elif current is None:
            query, params = st.keyspace_has, (self._id, k)
        else:
            query, params = st.keyspace_delete, (self._id, k, current)

        def operation(conn: Conn) -> bool:
            cursor = conn.execute(query, params, prepare=True, binary=True)
            if query is st.keyspace_has:  # deleting an absent key: it must be absent
                row = cursor.fetchone()
                return not (row and row[0])
            return cursor.rowcount == 1

        # Deleting an absent key only reads, so it may be retried like a read.
        run = self._read if query is st.keyspace_has else self._write
        if not await run(operation, "set"):
            raise Conflict.keyspace(self._name, k, revision)
        return new.hex if new else ""

    async def set_unconditional(self, key: bytes, value: bytes) -> str:
        """Set *key* whatever its revision; an empty *value* deletes."""
        self._check_open()
        limits = self._provider.limits
        k, v = limits.check_key(key), limits.check_value(value)
        new = uuid.uuid4() if v else None
        params: tuple[object, ...]
        if v:
            query, params = self._sql.keyspace_upsert, (self._id, k, v, new)
        else:
            query, params = self._sql.keyspace_delete_any, (self._id, k)

        def operation(conn: Conn) -> int:
            return _rowcount(conn, query, params)

        await self._write(operation, "set unconditionally")
        return new.hex if new else ""

    def range(self) -> AsyncIterator[tuple[bytes, bytes, str]]:
        """Iterate ``(key, value, revision)`` in key order, one page per round trip."""
        self._check_open()
        query = self._sql.keyspace_page
        rows_per_page, bytes_per_page = self._provider.page_rows, self._provider.page_bytes
        after = b""  # every key is non-empty, so greater than b""

        async def fetch() -> tuple[list[tuple[bytes, bytes, str]], bool]:
            nonlocal after
            params = (self._id, after, rows_per_page, bytes_per_page)

            def operation(conn: Conn) -> Rows:
                return _all(conn, query, params)

            rows = await self._read(operation, "range")
            page = [(cast(bytes, k), cast(bytes, v), cast(uuid.UUID, r).hex) for k, v, r in rows]
            if page:
                after = page[-1][0]
            # A page cut short by its byte budget holds at least the budget.
            size = sum(len(k) + len(v) for k, v, _ in page)
            return page, len(page) < rows_per_page and size < bytes_per_page

        return _Pages(fetch)


class _Set(_Handle, Set):
    _kind = "set"

    async def has(self, member: bytes) -> bool:
        """Return whether *member* is present."""
        self._check_open()
        m = self._provider.limits.check_member(member)
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
            params = (self._id, after, rows_per_page)

            def operation(conn: Conn) -> Rows:
                return _all(conn, query, params)

            page = [cast(bytes, m) for (m,) in await self._read(operation, "range")]
            if page:
                after = page[-1]
            return page, len(page) < rows_per_page

        return _Pages(fetch)
