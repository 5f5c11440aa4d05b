"""The cluster's status for operators: ``Engine.status()``, ``Client.status()``, ``runkit status``.

``read_status`` only reads: the heartbeat records in ``cluster/nodes``, each
application's partition count (``<app>/meta``) and, per partition, the inbox
bounds, the stream tail, the poison keyspace, the deadline journal and the
process consumers' checkpoints. It writes nothing, and opens per-partition
stores only for an application that has run (``<app>/meta`` exists). Give it
a read-only provider (``Provider.set_read_only()``, as ``runkit status`` does)
to be sure no driver records even an empty store name.

Where the numbers come from:

- **owner**: the rendezvous winner of the partition over the nodes live at
  ``now`` that run its application (the same rule the nodes use), so a node
  that left or expired stops being shown as owner at once, not a heartbeat
  later. ``claimed_by`` is the live node whose last heartbeat says it runs the
  partition; the two differ
  for up to a heartbeat interval around a change.
- **inbox backlog**: the commands in the inbox records after the position the
  stream says is fully processed. When the claiming node's heartbeat is at least as recent as
  the stream (same stream end and processed position), its count of commands
  in memory is taken if larger: it includes commands accepted on the owner
  itself, which never pass through the inbox.
- **consumer lag**: stream end minus the consumer's checkpoint. Process
  checkpoints are the ones the engine saves every ``checkpoint_interval`` (so
  the lag may read up to an interval's worth high). Projections keep their own
  checkpoints (Dogma ADR-26): the handler's ``checkpoint_offset()`` is asked,
  in the calling process; its checkpoint only moves on events it handles, so
  the lag counts every event after it, handled or not (an upper bound).
- **pending deadlines**: records in the partition's deadline journal not yet
  fired and truncated (each holds the deadlines one process outbox scheduled).
- **poisoned**: commands in the partition's poison keyspace (``runkit poison``);
  ``poisoned_events``: events and deadlines a process gave up on.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, cast

import anyio
import attrs
import msgspec

from ... import rendezvous
from ...config import ApplicationConfig, HandlerConfig, HandlerKind
from ...persistence import Journal, Provider
from ..commands.inbox import decode_inbox_record, inbox_name
from ..commands.poison import poison_name
from ..envelope import closing_iter
from ..events.deadlines import deadline_journal_name
from ..events.process_stores import checkpoint_key, checkpoints_store_name, event_poison_store_name
from ..logs import describe_error
from ..meta import read_partition_count
from ..partitions import partition_id
from ..streams import read_tail, stream_name
from .nodes import NodeRecord, list_nodes

if TYPE_CHECKING:
    from attrs import AttrsInstance

__all__ = [
    "ApplicationStatus",
    "ClusterStatus",
    "ConsumerStatus",
    "NodeStatus",
    "PartitionStatus",
    "read_status",
]

_log = logging.getLogger("runkit.engine.cluster.status")

#: How long a projection's ``checkpoint_offset()`` may take before its lag shows as unknown.
PROJECTION_TIMEOUT = 5.0
# Partitions read at once: enough to hide store latency, few enough to spare its pool.
_CONCURRENCY = 8


@attrs.frozen(kw_only=True)
class NodeStatus:
    """One node's heartbeat record, judged at the time of the read.

    Attributes:
        node_id: The node's UUID, as a canonical string (as ``with_node_id`` takes it).
        live: Whether its record had not expired when read.
        role: ``"node"`` (owns partitions) or ``"client"`` (a ``runkit.Client``).
        version: The node's runkit-core version (``None`` if it did not say).
        advertise_address: ``host:port`` peers use to reach it, if any.
        listen_address: ``host:port`` it listens on, if any.
        started_at: When the node's process joined (its clock).
        written_at: When it last wrote its heartbeat (its clock).
        expires_at: When the record stops counting as live.
        heartbeat_interval: Its heartbeat interval, in seconds.
    """

    node_id: str
    live: bool
    role: str
    version: str | None
    advertise_address: str | None
    listen_address: str | None
    started_at: datetime
    written_at: datetime
    expires_at: datetime
    heartbeat_interval: float

    @property
    def addresses(self) -> tuple[str, ...]:
        """The node's addresses: the advertised one first, then the listen address."""
        found = (self.advertise_address, self.listen_address)
        return tuple(dict.fromkeys(a for a in found if a))


@attrs.frozen(kw_only=True)
class PartitionStatus:
    """One partition of one application.

    Attributes:
        app_key: The application's identity key.
        app_name: The application's name (its key when it was not configured).
        index: The partition index.
        partition_id: The partition's UUID (also its stream ID).
        owner: The ID of the node that owns it by the live set at the time of
            the read (``None``: no live node).
        claimed_by: The ID of the live node whose last heartbeat says it runs it.
        inbox_end: The inbox journal's end position.
        processed: Inbox records below this position are fully processed.
        inbox_backlog: Commands accepted and not yet handled (see the module docstring).
        stream_end: The offset of the partition stream's next event (its event count).
        pending_deadlines: Deadline journal records not yet fired.
        poisoned: Poisoned commands.
        poisoned_events: Events and deadlines a process gave up on.
    """

    app_key: str
    app_name: str
    index: int
    partition_id: str
    owner: str | None
    claimed_by: str | None
    inbox_end: int
    processed: int
    inbox_backlog: int
    stream_end: int
    pending_deadlines: int
    poisoned: int
    poisoned_events: int


@attrs.frozen(kw_only=True)
class ConsumerStatus:
    """How far one event consumer (process or projection) is behind on one partition.

    Attributes:
        app_key: The application's identity key.
        handler: The handler's name.
        handler_key: The handler's identity key.
        kind: ``"process"`` or ``"projection"``.
        partition: The partition index.
        checkpoint: The stream offset the consumer reads next (``None``:
            unknown, e.g. the projection's ``checkpoint_offset()`` failed).
        lag: Stream end minus checkpoint (``None`` when the checkpoint is unknown).
    """

    app_key: str
    handler: str
    handler_key: str
    kind: str
    partition: int
    checkpoint: int | None
    lag: int | None


@attrs.frozen(kw_only=True)
class ApplicationStatus:
    """One application's partitions and consumers.

    Attributes:
        key: The application's identity key.
        name: Its name (its key when it was found through heartbeats only).
        partition_count: ``None`` if it has never run on this store.
        partitions: One entry per partition, by index.
        consumers: One entry per (consumer, partition); largest lag first.
    """

    key: str
    name: str
    partition_count: int | None
    partitions: tuple[PartitionStatus, ...] = ()
    consumers: tuple[ConsumerStatus, ...] = ()


@attrs.frozen(kw_only=True)
class ClusterStatus:
    """A snapshot of the cluster: what ``runkit status`` shows and ``--json`` prints.

    Attributes:
        read_at: The reader's clock when the snapshot was taken (liveness is judged at it).
        nodes: Every node's heartbeat record, live or expired, by node ID.
        clients: Every ``runkit.Client``'s heartbeat record, likewise: clients
            never own partitions, so they are not nodes.
        applications: The applications asked about (and, for ``runkit status``
            without arguments, those found in heartbeats), by key.
    """

    read_at: datetime
    nodes: tuple[NodeStatus, ...]
    applications: tuple[ApplicationStatus, ...]
    clients: tuple[NodeStatus, ...] = ()

    @property
    def live_nodes(self) -> tuple[NodeStatus, ...]:
        """The nodes whose records had not expired."""
        return tuple(n for n in self.nodes if n.live)

    @property
    def partitions(self) -> tuple[PartitionStatus, ...]:
        """Every application's partitions, application by application."""
        return tuple(p for a in self.applications for p in a.partitions)

    @property
    def consumers(self) -> tuple[ConsumerStatus, ...]:
        """Every application's consumers, application by application."""
        return tuple(c for a in self.applications for c in a.consumers)

    def application(self, key_or_name: str) -> ApplicationStatus:
        """The application with this identity key or name; ``KeyError`` if absent."""
        for app in self.applications:
            if key_or_name.lower() in (app.key.lower(), app.name.lower()):
                return app
        raise KeyError(key_or_name)

    def to_json(self) -> dict[str, Any]:
        """The snapshot as JSON-ready builtins (what ``runkit status --json`` prints).

        ``{"read_at", "nodes": [...], "clients": [...], "applications": [{"key",
        "name", "partition_count"}], "partitions": [...], "consumers": [...]}``:
        node IDs as strings, times as ISO 8601, each entry with the attributes of
        its class (a node also with ``addresses``).
        """
        nodes, clients = (
            [{**_fields(n), "addresses": list(n.addresses)} for n in found]
            for found in (self.nodes, self.clients)
        )
        apps = [
            {"key": a.key, "name": a.name, "partition_count": a.partition_count}
            for a in self.applications
        ]
        value = {
            "read_at": self.read_at,
            "nodes": nodes,
            "clients": clients,
            "applications": apps,
            "partitions": [_fields(p) for p in self.partitions],
            "consumers": [_fields(c) for c in self.consumers],
        }
        return cast(dict[str, Any], msgspec.to_builtins(value))


def _fields(value: AttrsInstance) -> dict[str, Any]:
    return attrs.asdict(value, recurse=False)


class _Projection(Protocol):
    def checkpoint_offset(self, stream_id: str) -> Awaitable[int]: ...


@attrs.frozen
class _App:
    """What ``read_status`` needs to know about an application."""

    key: str
    name: str
    processes: tuple[HandlerConfig, ...] = ()
    projections: tuple[HandlerConfig, ...] = ()
    # Found through heartbeats only: which handlers it has is unknown.
    configured: bool = True


async def read_status(
    provider: Provider,
    applications: Sequence[ApplicationConfig],
    *,
    now: datetime,
    discover: bool = False,
) -> ClusterStatus:
    """Read the cluster's status from *provider*; writes nothing (see the module docstring).

    Args:
        provider: The store the nodes use (read-only is best).
        applications: The applications to report on, with their handlers.
        now: The reader's clock, against which heartbeat expiry is judged.
        discover: Also report applications that live nodes' heartbeats
            mention but *applications* does not (partitions only: without the
            configuration their consumers are unknown).
    """
    records = await list_nodes(provider)
    live = [r for r in records if r.is_live(now) and r.role == "node"]
    apps = [
        _App(
            a.identity.key,
            a.identity.name,
            a.enabled_handlers(HandlerKind.PROCESS),
            a.enabled_handlers(HandlerKind.PROJECTION),
        )
        for a in applications
    ]
    if discover:
        known = {a.key.lower() for a in apps}
        found = sorted({k for r in live for k in r.progress if k.lower() not in known})
        apps += [_App(k, k, configured=False) for k in found]
    statuses = [await _read_application(provider, app, live) for app in apps]
    return ClusterStatus(
        read_at=now,
        nodes=tuple(_node_status(r, now) for r in records if r.role != "client"),
        clients=tuple(_node_status(r, now) for r in records if r.role == "client"),
        applications=tuple(sorted(statuses, key=lambda a: (a.name, a.key))),
    )


def _node_status(record: NodeRecord, now: datetime) -> NodeStatus:
    return NodeStatus(
        node_id=str(record.node_id),
        live=record.is_live(now),
        role=record.role,
        version=record.runkit_version,
        advertise_address=record.advertise_address,
        listen_address=record.listen_address,
        started_at=record.started_at,
        written_at=record.written_at,
        expires_at=record.expires_at,
        heartbeat_interval=record.heartbeat_interval,
    )


async def _read_application(
    provider: Provider, app: _App, live: Sequence[NodeRecord]
) -> ApplicationStatus:
    count = await read_partition_count(provider, app.key)
    if count is None:
        # Never ran here: opening its stores would only create them.
        return ApplicationStatus(key=app.key, name=app.name, partition_count=None)
    partitions: list[PartitionStatus | None] = [None] * count
    consumers: list[ConsumerStatus] = []
    limiter = anyio.CapacityLimiter(_CONCURRENCY)

    async def read(index: int) -> None:
        async with limiter:
            part = await _read_partition(provider, app, index, live)
            partitions[index] = part
            consumers.extend(await _read_consumers(provider, app, part))

    async with anyio.create_task_group() as tg:
        for index in range(count):
            tg.start_soon(read, index)
    return ApplicationStatus(
        key=app.key,
        name=app.name,
        partition_count=count,
        partitions=tuple(p for p in partitions if p is not None),
        consumers=tuple(sorted(consumers, key=_by_lag)),
    )


def _by_lag(c: ConsumerStatus) -> tuple[int, str, int]:
    # Largest lag first; unknown lags after known ones.
    return (-(c.lag if c.lag is not None else -1), c.handler, c.partition)


async def _read_partition(
    provider: Provider, app: _App, index: int, live: Sequence[NodeRecord]
) -> PartitionStatus:
    pid = partition_id(app.key, index)
    async with await provider.journals.open(stream_name(app.key, index)) as stream:
        tail = await read_tail(stream)
    processed = tail.inbox_position
    async with await provider.journals.open(inbox_name(app.key, index)) as inbox:
        inbox_end = (await inbox.bounds()).end
        backlog = await _commands_in(inbox, processed, inbox_end)
    poisoned = await _count_keys(provider, poison_name(app.key, index))
    pending_deadlines = poisoned_events = 0
    if app.processes or not app.configured:
        async with await provider.journals.open(deadline_journal_name(app.key, index)) as j:
            pending_deadlines = len(await j.bounds())
    if app.processes:
        poisoned_events = await _count_keys(provider, event_poison_store_name(app.key, index))
    owner = rendezvous.winner(pid, (r.node_id for r in live if r.runs(app.key)))
    claimant, progress = _claim(live, app.key, index)
    if progress.get("stream_end", -1) >= tail.next_offset and (
        progress.get("inbox_position", -1) >= processed
    ):
        # The heartbeat is at least as recent as the stream: add what the owner holds in memory.
        backlog = max(backlog, progress.get("pending", 0))
    return PartitionStatus(
        app_key=app.key,
        app_name=app.name,
        index=index,
        partition_id=pid,
        owner=None if owner is None else str(owner),
        claimed_by=None if claimant is None else str(claimant),
        inbox_end=inbox_end,
        processed=processed,
        inbox_backlog=backlog,
        stream_end=tail.next_offset,
        pending_deadlines=pending_deadlines,
        poisoned=poisoned,
        poisoned_events=poisoned_events,
    )


def _claim(
    live: Iterable[NodeRecord], app_key: str, index: int
) -> tuple[uuid.UUID | None, Mapping[str, int]]:
    """The live node that last said it runs the partition, and the progress it published."""
    best: NodeRecord | None = None
    for record in live:
        claims = index in record.progress.get(app_key, {})
        if claims and (best is None or record.written_at > best.written_at):
            best = record
    if best is None:
        return None, {}
    return best.node_id, best.progress[app_key][index]


#: Inbox records read to count a partition's backlog; past them, one command each.
BACKLOG_RECORDS_READ = 1_000


async def _commands_in(inbox: Journal, begin: int, end: int) -> int:
    """The commands in the inbox records at positions ``[begin, end)``.

    A record holds every command its writer accepted together (a busy
    partition's callers share one), so the records alone would undercount.
    Only the first ``BACKLOG_RECORDS_READ`` are read (a backlog built up during
    an outage can be long, and that is when operators watch): each record
    after them counts as one command, so a long backlog is a lower bound.
    """
    count = 0
    last = min(end, begin + BACKLOG_RECORDS_READ)
    if begin < last:
        async with closing_iter(inbox.range(begin)) as records:
            async for position, data in records:
                if position >= last:
                    break
                count += len(decode_inbox_record(data).entries)
    return count + max(0, end - last)


async def _count_keys(provider: Provider, name: str) -> int:
    count = 0
    async with await provider.keyspaces.open(name) as ks:
        async for _ in ks.range():
            count += 1
    return count


async def _read_consumers(
    provider: Provider, app: _App, part: PartitionStatus
) -> list[ConsumerStatus]:
    found: list[ConsumerStatus] = []

    def add(config: HandlerConfig, kind: str, checkpoint: int | None) -> None:
        lag = None if checkpoint is None else max(0, part.stream_end - checkpoint)
        found.append(
            ConsumerStatus(
                app_key=app.key,
                handler=config.identity.name,
                handler_key=config.identity.key,
                kind=kind,
                partition=part.index,
                checkpoint=checkpoint,
                lag=lag,
            )
        )

    if app.processes:
        async with await provider.keyspaces.open(checkpoints_store_name(app.key)) as ks:
            for config in app.processes:
                data, _ = await ks.get(checkpoint_key(config.identity.key, part.partition_id))
                add(config, "process", msgspec.msgpack.decode(data, type=int) if data else 0)
    for config in app.projections:
        handler = cast(_Projection, config.handler)
        checkpoint = await _ask(
            config, functools.partial(handler.checkpoint_offset, part.partition_id)
        )
        add(config, "projection", checkpoint)
    return found


async def _ask(config: HandlerConfig, call: Callable[[], Awaitable[int]]) -> int | None:
    """A projection's checkpoint, or ``None`` if it fails or takes too long (it is user code)."""
    with anyio.move_on_after(PROJECTION_TIMEOUT):
        try:
            value = await call()
        except Exception as exc:
            _log.warning(
                "status: checkpoint_offset() of %s failed; its lag shows as unknown: %s",
                config.describe(),
                describe_error(exc),
            )
            return None
        if isinstance(value, int) and value >= 0:
            return value
        _log.warning(
            "status: checkpoint_offset() of %s returned %r, not an offset", config.describe(), value
        )
        return None
    _log.warning(
        "status: checkpoint_offset() of %s took over %.0fs; its lag shows as unknown",
        config.describe(),
        PROJECTION_TIMEOUT,
    )
    return None
