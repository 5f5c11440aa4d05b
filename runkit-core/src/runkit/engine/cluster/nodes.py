"""The heartbeat records in ``cluster/nodes``: their encoding, reading them, describing them.

One record per node (or client), keyed by its UUID, written by its
``Membership`` every heartbeat interval; everyone else only reads them
(``list_nodes``: for membership, routing and ``runkit status``/``nodes``).
"""

from __future__ import annotations

import importlib.metadata
import uuid
from collections.abc import Iterable, Mapping
from contextlib import aclosing
from datetime import datetime
from typing import Annotated

import attrs
import msgspec

from ...persistence import Provider

__all__ = [
    "EXPIRY_INTERVALS",
    "NODES_KEYSPACE",
    "RECORD_VERSION",
    "RUNKIT_VERSION",
    "STOP_INTERVALS",
    "Heartbeat",
    "IncompatibleNodes",
    "MembershipRefused",
    "NodeIdInUse",
    "NodeRecord",
    "Progress",
    "ProgressField",
    "decode_node_record",
    "describe_changes",
    "describe_node",
    "heartbeat_decoder",
    "list_nodes",
]


#: The keyspace holding one heartbeat record per node, keyed by node UUID string.
NODES_KEYSPACE = "cluster/nodes"
#: The heartbeat record encoding version written by this code.
RECORD_VERSION = 1
#: What nodes of one application must agree on to share a store: where state
#: is committed and in which formats. 2 since ADR 0010 (process steps commit in
#: the instance's home partition stream; ADR 0006 nodes commit them in keyspace
#: records, and one instance with both kinds of writer loses effects). Records
#: from writers before the field count as 1. A node refuses to join beside a
#: live node of another protocol, and never ranks one as an owner.
ENGINE_PROTOCOL = 2
#: A record expires this many heartbeat intervals after it was written.
EXPIRY_INTERVALS = 3
#: A node stops taking work this many intervals after its last successful write.
STOP_INTERVALS = 2

#: Per-application, per-partition progress counters published with the heartbeat:
#: ``{app_key: {partition_index: {"stream_end": 42, "inbox_position": 7}}}``.
Progress = Mapping[str, Mapping[int, Mapping[str, int]]]


def _runkit_version() -> str | None:
    try:
        return importlib.metadata.version("runkit-core")
    except importlib.metadata.PackageNotFoundError:
        return None


#: The runkit-core version this process publishes in its heartbeat (for ``runkit status``).
RUNKIT_VERSION = _runkit_version()


class MembershipRefused(RuntimeError):
    """This node must not take part in the cluster: running would corrupt state (fatal)."""


class NodeIdInUse(MembershipRefused):
    """Another live process uses this node's ID: running both would corrupt ownership."""

    def __init__(self, node_id: uuid.UUID, detail: str) -> None:
        super().__init__(
            f"node ID {node_id} is in use by another process: {detail}. "
            "Give every node its own ID (runkit.with_node_id() or DOGMA_NODE_ID), "
            "or stop the other process before starting this one."
        )
        self.node_id = node_id


class IncompatibleNodes(MembershipRefused):
    """Live nodes of one of this node's applications run an engine of another protocol."""

    def __init__(self, node_id: uuid.UUID, others: list[NodeRecord]) -> None:
        listed = "; ".join(
            f"{r.node_id} (runkit-core {r.runkit_version or 'unknown'}, protocol {r.protocol}"
            f", {r.advertise_address or r.listen_address or 'no address'})"
            for r in others
        )
        super().__init__(
            f"node {node_id} (protocol {ENGINE_PROTOCOL}) cannot join: live nodes of the "
            f"same application run an engine of another protocol: {listed}. Nodes of two "
            "protocols commit process state in different places, so they must not run "
            "together: stop those nodes (a graceful stop flushes what they committed), "
            "then start this one; start every other node with the same runkit-core "
            "version. See docs/running.md, 'Upgrading'."
        )
        self.node_id = node_id
        self.others = others


#: A time with its offset: a record with a naive one is unreadable (and ignored),
#: since comparing it with the reader's aware clock would raise.
AwareTime = Annotated[datetime, msgspec.Meta(tz=True)]


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """The stored heartbeat record (msgpack). Readers ignore fields they do not know."""

    version: int
    node_id: str
    incarnation: str
    started_at: AwareTime
    written_at: AwareTime
    expires_at: AwareTime
    heartbeat_interval: float
    advertise_address: str | None = None
    listen_address: str | None = None
    tls_fingerprint: str | None = None
    progress: dict[str, dict[int, dict[str, int]]] = msgspec.field(default_factory=dict)
    role: str = "node"
    runkit_version: str | None = None
    #: The keys of the applications the node runs (``None`` from older writers: all).
    apps: list[str] | None = None
    #: The writer's ``ENGINE_PROTOCOL`` (absent from writers before the field: 1).
    protocol: int = 1


heartbeat_decoder = msgspec.msgpack.Decoder(Heartbeat)
ProgressField = dict[str, dict[int, dict[str, int]]]


@attrs.frozen(kw_only=True)
class NodeRecord:
    """One node's heartbeat, as read from ``cluster/nodes``.

    Attributes:
        node_id: The node's UUID.
        incarnation: A random ID of the process that wrote the record; it
            changes when the node restarts.
        started_at: When that process started its membership (its clock).
        written_at: When the record was written (the writer's clock).
        expires_at: When the record stops counting as live.
        heartbeat_interval: The writer's heartbeat interval, in seconds.
        advertise_address: ``host:port`` peers use to reach the node, if any.
        listen_address: ``host:port`` the node listens on, if any.
        tls_fingerprint: The node's TLS public-key fingerprint, if any.
        progress: Per-application, per-partition progress counters (see
            ``Progress``), as the node last published them.
        role: ``"node"`` (owns partitions) or ``"client"`` (a ``runkit.Client``:
            a member for authentication only, never an owner).
        runkit_version: The writer's runkit-core version (``None`` from older writers).
        apps: The keys of the applications the node runs; ``None`` (from older
            writers) counts as every application.
        protocol: The writer's engine protocol (``ENGINE_PROTOCOL``; 1 from
            writers before the field).
    """

    node_id: uuid.UUID
    incarnation: str
    started_at: datetime
    written_at: datetime
    expires_at: datetime
    heartbeat_interval: float
    advertise_address: str | None = None
    listen_address: str | None = None
    tls_fingerprint: str | None = None
    progress: Progress = attrs.field(factory=dict)
    role: str = "node"
    runkit_version: str | None = None
    apps: frozenset[str] | None = None
    protocol: int = 1

    def is_live(self, now: datetime) -> bool:
        """Whether the record has not expired at *now*."""
        return now < self.expires_at

    def runs(self, app_key: str) -> bool:
        """Whether the node runs the application *app_key* (may own its partitions)."""
        return self.role == "node" and (self.apps is None or app_key in self.apps)

    def shares_an_app(self, app_keys: frozenset[str]) -> bool:
        """Whether the node may own partitions of any of *app_keys*."""
        return self.role == "node" and (self.apps is None or not self.apps.isdisjoint(app_keys))


def decode_node_record(key: bytes, value: bytes) -> NodeRecord | None:
    # Records that are not ours to understand (corrupt, or a foreign key) count as absent.
    try:
        node_id = uuid.UUID(key.decode("ascii"))
        beat = heartbeat_decoder.decode(value)
    except (ValueError, UnicodeDecodeError, msgspec.DecodeError):
        return None
    return NodeRecord(
        node_id=node_id,
        incarnation=beat.incarnation,
        started_at=beat.started_at,
        written_at=beat.written_at,
        expires_at=beat.expires_at,
        heartbeat_interval=beat.heartbeat_interval,
        advertise_address=beat.advertise_address,
        listen_address=beat.listen_address,
        tls_fingerprint=beat.tls_fingerprint,
        progress=beat.progress,
        role=beat.role,
        runkit_version=beat.runkit_version,
        apps=None if beat.apps is None else frozenset(beat.apps),
        protocol=beat.protocol,
    )


async def list_nodes(provider: Provider) -> list[NodeRecord]:
    """Every readable heartbeat record, live or expired, ordered by node ID.

    For operators: use ``NodeRecord.is_live(now)`` to tell live nodes from
    crashed ones whose records have not been pruned yet.
    """
    records: list[NodeRecord] = []
    async with (
        await provider.keyspaces.open(NODES_KEYSPACE) as ks,
        aclosing(ks.range()) as items,  # type: ignore[type-var]
    ):
        async for key, value, _ in items:
            record = decode_node_record(key, value)
            if record is not None:
                records.append(record)
    return sorted(records, key=lambda r: r.node_id.int)


def describe_node(record: NodeRecord | None) -> str:
    if record is None:
        return "its heartbeat record was rewritten by another process"
    where = record.advertise_address or record.listen_address or "no address"
    return (
        f"process {record.incarnation} ({where}, started at {record.started_at.isoformat()}) "
        f"wrote its heartbeat record at {record.written_at.isoformat()}"
    )


def describe_changes(joined: Iterable[uuid.UUID], gone: Iterable[uuid.UUID]) -> str:
    """``node a joined, node b left`` for a change of the live set."""
    parts = []
    for verb, nodes in (("joined", joined), ("left or expired", gone)):
        names = sorted(str(n) for n in nodes)
        if names:
            noun = "node" if len(names) == 1 else "nodes"
            parts.append(f"{noun} {', '.join(names)} {verb}")
    return ", ".join(parts)
