"""The schema layout and every statement the driver issues, rendered once per schema.

Layout (all names qualified by the configured schema)::

    layout          (version)                                 one row: the layout version
    journals        (id, name bytea unique, begin_pos, end_pos)
    journal_records (journal_id, position, record)            PK (journal_id, position)
    keyspaces       (id, name bytea unique)
    keyspace_pairs  (keyspace_id, key, value, revision uuid)  PK (keyspace_id, key)
    sets            (id, name bytea unique)
    set_members     (set_id, member)                          PK (set_id, member)

Store names are UTF-8 in ``bytea`` because ``text`` cannot hold NUL. Records
exist exactly for ``[begin_pos, end_pos)``: an append bumps ``end_pos`` and
inserts in one statement, a truncation raises ``begin_pos`` and deletes below
it in one transaction, and reads still filter on ``begin_pos`` so that no
record below it is ever visible.

Statements are rendered to ``bytes`` once, so psycopg's prepared-statement
cache keys on identical queries; every parameter uses the binary protocol
(``%b``), with ``int`` dumped as ``int8`` (see ``configure_connection``).
"""

from __future__ import annotations

import zlib

import attrs
from psycopg import Connection, sql
from psycopg.types.numeric import Int8BinaryDumper

__all__ = ["LAYOUT_VERSION", "Statements", "configure_connection", "configure_read_only_connection"]

#: Bumped when the layout changes incompatibly; a newer layout is refused.
LAYOUT_VERSION = 1

# First key of the two-int advisory lock that serialises provisioning; the
# second is a hash of the schema name.
_ADVISORY_LOCK_CLASS = 0x52554E4B  # "RUNK"

_DDL = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.journals (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name bytea NOT NULL UNIQUE,
    begin_pos bigint NOT NULL DEFAULT 0,
    end_pos bigint NOT NULL DEFAULT 0,
    CHECK (0 <= begin_pos AND begin_pos <= end_pos)
);
CREATE TABLE IF NOT EXISTS {schema}.journal_records (
    journal_id bigint NOT NULL,
    position bigint NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (journal_id, position)
);
CREATE TABLE IF NOT EXISTS {schema}.keyspaces (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name bytea NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS {schema}.keyspace_pairs (
    keyspace_id bigint NOT NULL,
    key bytea NOT NULL,
    value bytea NOT NULL,
    revision uuid NOT NULL,
    PRIMARY KEY (keyspace_id, key)
);
CREATE TABLE IF NOT EXISTS {schema}.sets (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name bytea NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS {schema}.set_members (
    set_id bigint NOT NULL,
    member bytea NOT NULL,
    PRIMARY KEY (set_id, member)
);
CREATE TABLE IF NOT EXISTS {schema}.layout (
    version integer PRIMARY KEY
);
INSERT INTO {schema}.layout (version) VALUES ({version}) ON CONFLICT DO NOTHING;
"""

# Opening a store is one round trip in the common case. If another session
# inserts the name after this statement's snapshot was taken, ON CONFLICT
# skips and neither branch sees the row: the caller repeats the statement.
_OPEN = """
WITH existing AS (
    SELECT id FROM {schema}.{table} WHERE name = %b
), inserted AS (
    INSERT INTO {schema}.{table} (name)
    SELECT %b WHERE NOT EXISTS (SELECT FROM existing)
    ON CONFLICT (name) DO NOTHING
    RETURNING id
)
SELECT id FROM existing UNION ALL SELECT id FROM inserted
"""

# A page of a range: the journal row (for begin/end, from the same snapshot)
# and up to N consecutive records from a position, cut off once the page holds
# at least the byte budget (so one huge record still forms a page of one).
_JOURNAL_PAGE = """
SELECT j.begin_pos, j.end_pos, p.position, p.record
FROM {schema}.journals AS j
LEFT JOIN LATERAL (
    SELECT position, record FROM (
        SELECT position, record,
               sum(octet_length(record)) OVER (ORDER BY position) - octet_length(record)
                   AS before
        FROM (
            SELECT position, record FROM {schema}.journal_records
            WHERE journal_id = j.id AND position >= %b
            ORDER BY position
            LIMIT %b
        ) AS candidates
    ) AS sized
    WHERE before < %b
) AS p ON true
WHERE j.id = %b
ORDER BY p.position
"""

_KEYSPACE_PAGE = """
SELECT key, value, revision FROM (
    SELECT key, value, revision,
           sum(octet_length(key) + octet_length(value)) OVER (ORDER BY key)
               - octet_length(key) - octet_length(value) AS before
    FROM (
        SELECT key, value, revision FROM {schema}.keyspace_pairs
        WHERE keyspace_id = %b AND key > %b
        ORDER BY key
        LIMIT %b
    ) AS candidates
) AS sized
WHERE before < %b
ORDER BY key
"""


def configure_connection(conn: Connection[tuple[object, ...]]) -> None:
    """Per-connection setup: dump every ``int`` parameter as ``int8``.

    Without it psycopg picks int2/int4/int8 by magnitude, which would give one
    prepared statement per combination of parameter types.
    """
    conn.adapters.register_dumper(int, Int8BinaryDumper)


def configure_read_only_connection(conn: Connection[tuple[object, ...]]) -> None:
    """``configure_connection``, and every transaction of the session read-only.

    The server then refuses any write or DDL, whatever path it comes from.
    """
    configure_connection(conn)
    conn.execute("SET default_transaction_read_only = on")


def _render(template: str, schema: str, **identifiers: str) -> bytes:
    names = {k: sql.Identifier(v) for k, v in identifiers.items()}
    query = sql.SQL(template.strip()).format(schema=sql.Identifier(schema), **names)
    return query.as_bytes(None)


@attrs.frozen
class Statements:
    """Every statement of the driver for one schema, rendered to bytes."""

    schema: str
    advisory_lock: bytes
    layout_table_exists: bytes
    layout_version: bytes
    ddl: bytes
    open_journal: bytes
    open_keyspace: bytes
    open_set: bytes
    find_journal: bytes
    find_keyspace: bytes
    find_set: bytes
    store_exists: bytes
    journal_bounds: bytes
    journal_get: bytes
    journal_page: bytes
    journal_append: bytes
    journal_append_many: bytes
    journal_raise_begin: bytes
    journal_delete_below: bytes
    keyspace_get: bytes
    keyspace_get_many: bytes
    keyspace_has: bytes
    keyspace_insert: bytes
    keyspace_update: bytes
    keyspace_set_many: bytes
    keyspace_delete: bytes
    keyspace_upsert: bytes
    keyspace_delete_any: bytes
    keyspace_page: bytes
    set_has: bytes
    set_add: bytes
    set_remove: bytes
    set_page: bytes

    @classmethod
    def for_schema(cls, schema: str) -> Statements:
        """Render every statement for *schema* (already validated as an identifier)."""

        def r(template: str, **identifiers: str) -> bytes:
            return _render(template, schema, **identifiers)

        lock_key = zlib.crc32(schema.encode()) - (1 << 31)  # fits int4
        ddl = sql.SQL(_DDL.strip()).format(
            schema=sql.Identifier(schema), version=sql.Literal(LAYOUT_VERSION)
        )
        return cls(
            schema=schema,
            advisory_lock=sql.SQL("SELECT pg_advisory_xact_lock({}, {})")
            .format(sql.Literal(_ADVISORY_LOCK_CLASS), sql.Literal(lock_key))
            .as_bytes(None),
            layout_table_exists=b"SELECT to_regclass(%b) IS NOT NULL",
            layout_version=r("SELECT max(version) FROM {schema}.layout"),
            ddl=ddl.as_bytes(None),
            open_journal=r(_OPEN, table="journals"),
            open_keyspace=r(_OPEN, table="keyspaces"),
            open_set=r(_OPEN, table="sets"),
            # Read-only opening: look the name up, never insert it.
            find_journal=r("SELECT id FROM {schema}.journals WHERE name = %b"),
            find_keyspace=r("SELECT id FROM {schema}.keyspaces WHERE name = %b"),
            find_set=r("SELECT id FROM {schema}.sets WHERE name = %b"),
            store_exists=(
                b"SELECT current_database(),"
                b" EXISTS (SELECT FROM pg_namespace WHERE nspname = %s),"
                b" to_regclass(%s) IS NOT NULL"
            ),
            journal_bounds=r("SELECT begin_pos, end_pos FROM {schema}.journals WHERE id = %b"),
            journal_get=r(
                "SELECT r.record FROM {schema}.journal_records AS r"
                " JOIN {schema}.journals AS j ON j.id = r.journal_id"
                " WHERE r.journal_id = %b AND r.position = %b AND r.position >= j.begin_pos"
            ),
            journal_page=r(_JOURNAL_PAGE),
            # One round trip: the UPDATE's row lock serialises appenders, and a
            # position other than the end (past, truncated or future) updates
            # nothing, so nothing is inserted: 0 rows means Conflict.
            journal_append=r(
                "WITH bumped AS ("
                " UPDATE {schema}.journals SET end_pos = end_pos + 1"
                " WHERE id = %b AND end_pos = %b RETURNING id)"
                " INSERT INTO {schema}.journal_records (journal_id, position, record)"
                " SELECT id, %b, %b FROM bumped"
            ),
            # The same for appends to several journals, one row each, sorted
            # by ID so concurrent statements lock journals in the same order.
            # Returns the IDs of the journals appended to; the others conflicted.
            journal_append_many=r(
                "WITH input AS ("
                " SELECT * FROM unnest(%b::int8[], %b::int8[], %b::bytea[]) AS t(id, pos, rec)),"
                " bumped AS ("
                " UPDATE {schema}.journals AS j SET end_pos = j.end_pos + 1 FROM input"
                " WHERE j.id = input.id AND j.end_pos = input.pos"
                " RETURNING j.id, input.pos, input.rec)"
                " INSERT INTO {schema}.journal_records (journal_id, position, record)"
                " SELECT id, pos, rec FROM bumped RETURNING journal_id"
            ),
            # Returns nothing when position <= begin (a no-op) or > end (an error).
            journal_raise_begin=r(
                "UPDATE {schema}.journals SET begin_pos = %b"
                " WHERE id = %b AND begin_pos < %b AND end_pos >= %b"
            ),
            journal_delete_below=r(
                "DELETE FROM {schema}.journal_records WHERE journal_id = %b AND position < %b"
            ),
            keyspace_get=r(
                "SELECT value, revision FROM {schema}.keyspace_pairs"
                " WHERE keyspace_id = %b AND key = %b"
            ),
            keyspace_get_many=r(
                "SELECT p.keyspace_id, p.key, p.value, p.revision"
                " FROM unnest(%b::int8[], %b::bytea[]) AS t(ks, k)"
                " JOIN {schema}.keyspace_pairs p ON p.keyspace_id = t.ks AND p.key = t.k"
            ),
            keyspace_has=r(
                "SELECT EXISTS (SELECT FROM {schema}.keyspace_pairs"
                " WHERE keyspace_id = %b AND key = %b)"
            ),
            keyspace_insert=r(
                "INSERT INTO {schema}.keyspace_pairs (keyspace_id, key, value, revision)"
                " VALUES (%b, %b, %b, %b) ON CONFLICT DO NOTHING"
            ),
            keyspace_update=r(
                "UPDATE {schema}.keyspace_pairs SET value = %b, revision = %b"
                " WHERE keyspace_id = %b AND key = %b AND revision = %b"
            ),
            # Several compare-and-sets of distinct keys: inserts (absent keys)
            # and updates (on a revision); returns the keys written.
            keyspace_set_many=r(
                "WITH input AS ("
                " SELECT * FROM unnest(%b::int8[], %b::bytea[], %b::bytea[], %b::uuid[],"
                " %b::uuid[], %b::bool[]) AS t(ks, k, v, rev, cur, ins)),"
                " inserted AS ("
                " INSERT INTO {schema}.keyspace_pairs (keyspace_id, key, value, revision)"
                " SELECT ks, k, v, rev FROM input WHERE ins"
                " ON CONFLICT DO NOTHING RETURNING keyspace_id, key),"
                " updated AS ("
                " UPDATE {schema}.keyspace_pairs AS p SET value = input.v, revision = input.rev"
                " FROM input WHERE NOT input.ins AND p.keyspace_id = input.ks"
                " AND p.key = input.k AND p.revision = input.cur"
                " RETURNING p.keyspace_id, p.key)"
                " SELECT keyspace_id, key FROM inserted"
                " UNION ALL SELECT keyspace_id, key FROM updated"
            ),
            keyspace_delete=r(
                "DELETE FROM {schema}.keyspace_pairs"
                " WHERE keyspace_id = %b AND key = %b AND revision = %b"
            ),
            keyspace_upsert=r(
                "INSERT INTO {schema}.keyspace_pairs (keyspace_id, key, value, revision)"
                " VALUES (%b, %b, %b, %b) ON CONFLICT (keyspace_id, key)"
                " DO UPDATE SET value = EXCLUDED.value, revision = EXCLUDED.revision"
            ),
            keyspace_delete_any=r(
                "DELETE FROM {schema}.keyspace_pairs WHERE keyspace_id = %b AND key = %b"
            ),
            keyspace_page=r(_KEYSPACE_PAGE),
            set_has=r(
                "SELECT EXISTS (SELECT FROM {schema}.set_members WHERE set_id = %b AND member = %b)"
            ),
            set_add=r(
                "INSERT INTO {schema}.set_members (set_id, member) VALUES (%b, %b)"
                " ON CONFLICT DO NOTHING"
            ),
            set_remove=r("DELETE FROM {schema}.set_members WHERE set_id = %b AND member = %b"),
            set_page=r(
                "SELECT member FROM {schema}.set_members WHERE set_id = %b AND member > %b"
                " ORDER BY member LIMIT %b"
            ),
        )

    @property
    def layout_table(self) -> str:
        """The qualified name of the layout table, as ``to_regclass`` wants it."""
        return sql.Identifier(self.schema, "layout").as_string(None)
