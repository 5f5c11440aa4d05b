"""Cluster membership: heartbeats in ``cluster/nodes`` and rendezvous ownership.

``Membership`` runs the protocol; its parts each do one job: ``heartbeat``
(this node's own record), ``node_set`` (reading the others'), ``live_view``
(the live set and rendezvous ownership) and ``store_calls`` (time bounds and
failure logging for their store calls).

Every node keeps one record in the keyspace ``cluster/nodes``, under its node
UUID string, and rewrites it every ``heartbeat_interval`` conditional on the
revision it last wrote, with ``expires_at = now + 3 x interval``. Every
interval it also reads the whole keyspace: the *live set* is the records that
have not expired by the engine clock. A node owns partition ``p`` when
``rendezvous.winner(p, live set)`` is the node itself, so membership changes move
only the partitions whose winner changed.

Safety rules (OCC on the partition journals is the fence; these keep double
ownership short and rare):

- A ``Conflict`` on our own key that is not our own earlier write (each process
  stamps a random *incarnation* in its record) means another process uses the
  same node ID: ``NodeIdInUse``, fatal.
- On start, an unexpired record for our ID is waited out while watching it: if
  it is refreshed, another live process has the ID (``NodeIdInUse``); if it
  expires untouched (a crashed earlier run), we take it over.
- A node joins only if no live node of its applications writes another
  engine protocol (``IncompatibleNodes``, fatal: the two would commit process
  state in different places); one that appears later is left out of the live
  set and logged (``node_set``).
- A node stops taking work ``2 x interval`` after the start of its last
  successful write, one interval before peers consider it gone, and resumes
  once a write succeeds again. It also stops ``2 x interval`` after its last
  successful read of the node set: judged against a moving clock, its old copy
  of the peers' records would expire and it would claim their partitions.
- ``leave()`` deletes the record (conditionally) so peers take over at their
  next read instead of waiting for expiry; ``run()`` calls it on the way out.
  ``joined()`` wraps a block of work (the engine's applications) so that the
  heartbeat outlives the block's wind-down and the node leaves after it.

Clock skew: expiry is judged by each reader's clock against the writer's
``expires_at``; the one interval of margin above absorbs skew below one
interval (see ``node_set`` for what more does and how it is reported).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import anyio
from anyio.abc import TaskStatus

from ...persistence import Keyspace, Provider
from ..settings import EngineSettings
from .heartbeat import HeartbeatWriter
from .live_view import LiveView
from .node_set import NodeSetReader
from .nodes import (
    NODES_KEYSPACE,
    IncompatibleNodes,
    MembershipRefused,
    NodeIdInUse,
    NodeRecord,
    Progress,
    describe_node,
)
from .store_calls import MEMBERSHIP_LOG, StoreCalls

__all__ = ["AppOwnership", "Membership"]


class Membership:
    """This node's heartbeat and its view of the cluster; an ``Ownership``.

    Run ``run()`` in a task group (``await tg.start(membership.run)``) before
    anything asks ``owns()``: until the first heartbeat is written and the
    node set read, and whenever the node cannot keep its heartbeat fresh, it
    owns nothing.

    Args:
        provider: Where ``cluster/nodes`` lives.
        settings: The node's settings: ``node_id``, ``heartbeat_interval``,
            ``advertise_address``, ``listen_address``, ``clock``, and
            ``shutdown_timeout`` (the bound on ``leave()``).
        progress: Called at every heartbeat for the progress to publish
            (keep it cheap; it runs on the heartbeat path). If it raises, the
            heartbeat goes out without progress.
        tls_fingerprint: The node's TLS public-key fingerprint, for the
            transport's peer checks.
        prune_after: Seconds after expiry when any node deletes a dead node's
            record (until then operators still see it in ``list_nodes``).
        store_timeout: Seconds after which a heartbeat read or write is
            abandoned (default: ``max(2 * heartbeat_interval, 1.0)``); an abandoned
            write that lands later is recognised as our own.
    """

    def __init__(
        self,
        provider: Provider,
        settings: EngineSettings,
        *,
        progress: Callable[[], Progress] | None = None,
        tls_fingerprint: str | None = None,
        prune_after: float = 3600.0,
        store_timeout: float | None = None,
        role: str = "node",
    ) -> None:
        self._provider = provider
        self._node_id = settings.node_id
        self._interval = settings.heartbeat_interval
        self._clock = settings.clock
        self._leave_timeout = settings.shutdown_timeout
        self._extra = {"node_id": str(settings.node_id)}
        # Store calls are abandoned after this, so a hung store cannot stall the view.
        # Two intervals: a slow store (a busy S3 or DynamoDB) may take over an
        # interval per call. Safe, because ownership is judged from when the last
        # successful write *started*, not when it finished.
        io_timeout = max(2 * self._interval, 1.0) if store_timeout is None else store_timeout
        calls = StoreCalls(settings.node_id, io_timeout)
        self._heartbeat = HeartbeatWriter(
            settings,
            calls=calls,
            max_value_bytes=provider.limits.max_value_bytes,
            progress=progress,
            tls_fingerprint=tls_fingerprint,
            role=role,
        )
        self._node_set = NodeSetReader(
            settings.node_id,
            interval=self._interval,
            clock=self._clock,
            prune_after=timedelta(seconds=prune_after),
            calls=calls,
            # A client commits nothing: it may run beside nodes of any protocol.
            apps=(
                frozenset(app.identity.key for app in settings.applications)
                if role == "node"
                else None
            ),
        )
        self._view = LiveView(settings.node_id, role=role)
        self._role = role
        self._peers: dict[uuid.UUID, NodeRecord] = {}
        self._state = "new"
        self._joined = False
        self._left = False
        self._loop_scope: anyio.CancelScope | None = None
        self._read_valid_until: datetime | None = None
        self._last_read: datetime | None = None
        self._joined_at = 0.0  # anyio time the joining write began (``_join``)

    # -- the Ownership protocol --

    @property
    def generation(self) -> int:
        """Increases whenever the live set or this node's ability to work changes."""
        return self._view.generation

    def owns(self, partition_id: str) -> bool:
        """Whether this node is the rendezvous winner of *partition_id* in its current view.

        Changes only together with ``generation``: callers reconcile on its
        changes alone (see ``active``).
        """
        return self._view.active and self._view.wins(partition_id)

    def for_app(self, app_key: str) -> AppOwnership:
        """The ownership of application *app_key*'s partitions (what its runtime uses).

        Rendezvous over the live nodes that run the application: nodes of
        other applications may share the store (and this membership), and one
        must never win a partition it has no runtime for.
        """
        return AppOwnership(self, app_key)

    async def wait_changed(self, generation: int) -> int:
        """Wait until the generation differs from *generation*; return the new one."""
        return await self._view.wait_changed(generation)

    # -- the view, for routing and operators --

    @property
    def node_id(self) -> uuid.UUID:
        """This node's UUID."""
        return self._node_id

    @property
    def active(self) -> bool:
        """Whether this node takes work: its heartbeat is fresh and it has not left.

        As of the view's last update, not the clock's latest tick: the watchdog
        updates it when the heartbeat goes stale (at that moment, or within a
        quarter interval), bumping ``generation``. Reading the clock here let
        ``owns()`` turn false part-way through a runner's pass with no
        generation change to make it look again: the partitions it stopped
        stayed stopped until the next membership change.
        """
        return self._view.active

    def live_nodes(self, app_key: str | None = None) -> frozenset[str]:
        """The live node IDs (strings) in this node's view, itself included while active.

        With *app_key*, only the nodes that run that application.
        """
        return frozenset(str(n) for n in self._view.running(app_key))

    def wins(self, partition_id: str, app_key: str) -> bool:
        """Whether this node owns *partition_id* of application *app_key* (see ``for_app``)."""
        return self._view.active and self._view.wins(partition_id, app_key)

    def live_peers(self) -> dict[uuid.UUID, NodeRecord]:
        """The live records of the other nodes (addresses for the node transport)."""
        live = self._view.live
        return {n: r for n, r in self._peers.items() if n in live}

    def live_members(self) -> dict[uuid.UUID, NodeRecord]:
        """Every other live record, clients included (for authenticating peers)."""
        now = self._clock()
        return {n: r for n, r in self._peers.items() if r.is_live(now)}

    # -- running --

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Heartbeat and follow the cluster until cancelled (or ``leave()``), then leave.

        Reports started once this node's record is written and the node set
        read. Raises ``NodeIdInUse`` if another process uses this node's ID, and
        ``IncompatibleNodes`` if live nodes of its applications run an engine of
        another protocol (both before it owns anything).
        """
        if self._state != "new":
            raise RuntimeError("Membership.run() may be called only once")
        self._state = "running"
        try:
            with anyio.CancelScope() as self._loop_scope:
                if self._left:
                    return
                async with await self._provider.keyspaces.open(NODES_KEYSPACE) as ks:
                    await self._join(ks)
                    self._joined = True
                    task_status.started()
                    fatal: NodeIdInUse | None = None
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._watch)
                        try:
                            await self._beat_forever(ks)
                        except NodeIdInUse as exc:
                            # Raised as is, not wrapped in the task group's ExceptionGroup.
                            fatal = exc
                            tg.cancel_scope.cancel()
                    if fatal is not None:
                        raise fatal
        except NodeIdInUse:
            self._heartbeat.revision = ""  # the record is not ours: leave() must not delete it
            raise
        finally:
            self._state = "stopped"
            await self.leave()

    async def leave(self) -> None:
        """Stop owning, and delete this node's record so peers take over at once.

        Conditional on our revision, shielded from cancellation and bounded by
        ``shutdown_timeout``; if the record cannot be deleted, peers take over
        when it expires. Ends ``run()``. Idempotent.
        """
        if self._left:
            return
        self._left = True
        if self._loop_scope is not None:
            self._loop_scope.cancel()
        self._update(self._clock())
        if not self._heartbeat.revision:
            return
        with anyio.move_on_after(self._leave_timeout, shield=True) as bound:
            try:
                async with await self._provider.keyspaces.open(NODES_KEYSPACE) as ks:
                    await self._heartbeat.delete(ks)
            except Exception:
                MEMBERSHIP_LOG.warning(
                    "node %s could not delete its heartbeat; peers take over when it expires",
                    self._node_id,
                    exc_info=True,
                    extra=self._extra,
                )
        if bound.cancelled_caught:
            MEMBERSHIP_LOG.warning(
                "node %s could not delete its heartbeat within %.1fs; "
                "peers take over when it expires",
                self._node_id,
                self._leave_timeout,
                extra=self._extra,
            )

    @asynccontextmanager
    async def joined(self) -> AsyncIterator[Membership]:
        """Run the membership around a block of work: join, run the block, then leave.

        Enters once this node has joined (as ``run()`` reports started). When
        the block is cancelled, heartbeats go on while it winds down (flushes
        what it committed) and the node leaves only when the block has exited,
        so peers never take a partition that is still being flushed. If the
        membership fails (``MembershipRefused``), the block is cancelled and the
        error raised from here.
        """
        fatal: list[MembershipRefused] = []
        failed: Exception | None = None
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def membership(*, task_status: TaskStatus[None]) -> None:
                with scope:
                    try:
                        await self.run(task_status=task_status)
                    except MembershipRefused as exc:
                        # Raised below, after the task group, so it is not wrapped in a group.
                        fatal.append(exc)
                        tg.cancel_scope.cancel()
                        if not self._joined:
                            task_status.started()

            await tg.start(membership)
            if not fatal:
                # Outlive the caller's cancellation until the block has exited.
                scope.shield = True
                try:
                    yield self
                except Exception as exc:
                    failed = exc  # re-raised below, unwrapped by the task group
                finally:
                    scope.cancel()
        if fatal:
            raise fatal[0]
        if failed is not None:
            raise failed

    # -- the protocol --

    async def _join(self, ks: Keyspace) -> None:
        # Take our key: wait out an unexpired record left by an earlier run,
        # unless it is refreshed meanwhile (then a live process has our ID).
        self._heartbeat.started_at = self._clock()
        watched: str | None = None
        while True:
            now = self._clock()
            own = await self._heartbeat.read_own(ks)
            if own is None:
                await anyio.sleep(self._interval)
                continue
            record = own.record
            if watched is not None and own.revision != watched:
                if not own.present or own.ours:
                    # Deleted (the other process left), or rewritten by us: our
                    # take-over landed but the read after it failed.
                    watched = None
                else:
                    raise NodeIdInUse(
                        self._node_id, f"{describe_node(record)} while this node waited for it"
                    )
            if record is not None and record.is_live(now):
                if watched is None:
                    MEMBERSHIP_LOG.warning(
                        "node %s: an unexpired heartbeat record for this node ID exists "
                        "(%s); waiting until it expires at %s to take it over "
                        "(if it is refreshed meanwhile, another process uses this ID)",
                        self._node_id,
                        describe_node(record),
                        record.expires_at.isoformat(),
                        extra=self._extra,
                    )
                watched = own.revision
                await anyio.sleep(self._interval)
                continue
            # Absent (""), expired, unreadable, or our own: take it over.
            # Times from the write's start on: the reads before it may have been
            # slow, and the beats keep to the write's schedule (``_beat_forever``).
            self._heartbeat.revision = own.revision
            self._joined_at = anyio.current_time()
            now = self._clock()
            if not await self._heartbeat.write(ks, now):
                # Start again from a fresh read; leave() must not delete a record we never wrote.
                self._heartbeat.revision = ""
            elif await self._read(ks, self._clock()):
                if self._node_set.incompatible:
                    # Before owning anything; run() leaves (deletes our record).
                    raise IncompatibleNodes(
                        self._node_id, list(self._node_set.incompatible.values())
                    )
                self._update(self._clock())
                MEMBERSHIP_LOG.info(
                    "%s %s joined the cluster: %d live node(s)",
                    self._role,  # a client says so: it owns nothing and is not counted
                    self._node_id,
                    len(self._view.live),
                    extra=self._extra,
                )
                return
            await anyio.sleep(self._interval)

    async def _beat_forever(self, ks: Keyspace) -> None:
        # An interval after the joining write began, not after the join ended:
        # with a slow store (calls of over a third of an interval) the join's
        # write and read would otherwise go stale before the first beat.
        next_beat = self._joined_at
        while True:
            next_beat += self._interval
            delay = next_beat - anyio.current_time()
            if delay < 0:
                next_beat -= delay  # fell behind (slow store): restart the schedule from now
            await anyio.sleep(max(0.0, delay))
            now = self._clock()
            # The write and the read go together: one after the other, a store
            # answering in half an interval left this node blind (no read within
            # two intervals) and so inactive, while peers, seeing its record
            # refreshed, still counted it as the owner of its partitions.
            fatal: list[NodeIdInUse] = []
            async with anyio.create_task_group() as tg:
                if self._can_see(now):
                    tg.start_soon(self._write, ks, now, fatal)
                # Else blind: not read for two intervals, so inactive. A refreshed
                # record would make peers wait for it to expire before taking our
                # partitions, which would meanwhile have no owner at all.
                tg.start_soon(self._read, ks, now)
                tg.start_soon(self._node_set.prune, ks)  # what the last read found
            if fatal:
                raise fatal[0]  # as is, not in the task group's ExceptionGroup
            self._update(self._clock())

    async def _write(self, ks: Keyspace, now: datetime, fatal: list[NodeIdInUse]) -> None:
        try:
            await self._heartbeat.write(ks, now)
        except NodeIdInUse as exc:
            fatal.append(exc)

    async def _watch(self) -> None:
        # Notices our own staleness and peers' expiry even while a store call
        # hangs; our own staleness at the moment it begins, when that is sooner.
        period = min(self._interval / 4, 0.25)
        while True:
            delay = period
            stale_at = self._heartbeat.valid_until
            if stale_at is not None and self._view.active:
                delay = min(period, max(0.0, (stale_at - self._clock()).total_seconds()))
            await anyio.sleep(delay)
            self._update(self._clock())

    async def _read(self, ks: Keyspace, now: datetime) -> bool:
        """Read the node set into ``self._peers``; whether it succeeded."""
        peers = await self._node_set.read(ks, now)
        if peers is None:
            return False
        self._peers = peers
        self._read_valid_until = now + timedelta(seconds=2 * self._interval)
        self._last_read = now
        return True

    def _can_see(self, now: datetime) -> bool:
        """Whether the node set was read successfully recently enough to act on."""
        return self._read_valid_until is not None and now < self._read_valid_until

    def _update(self, now: datetime) -> None:
        """Recompute the live set at *now* (see ``LiveView.update``)."""
        fresh, sees = self._heartbeat.fresh(now), self._can_see(now)
        self._view.update(
            now,
            self._peers,
            active=not self._left and fresh and sees,
            left=self._left,
            last_written=self._heartbeat.last_written,
            last_read=self._last_read if fresh and not sees else None,
        )


class AppOwnership:
    """One application's view of a ``Membership``: an ``Ownership`` of its partitions.

    A partition of the application is owned by the rendezvous winner among the
    live nodes whose heartbeat says they run it (``NodeRecord.runs``).
    """

    def __init__(self, membership: Membership, app_key: str) -> None:
        self._membership = membership
        self._app_key = app_key

    @property
    def generation(self) -> int:
        """The membership's generation (it also changes with the peers' applications)."""
        return self._membership.generation

    def owns(self, partition_id: str) -> bool:
        """Whether this node owns the application's partition *partition_id* now."""
        return self._membership.wins(partition_id, self._app_key)

    async def wait_changed(self, generation: int) -> int:
        """Wait until the generation differs from *generation*; return the new one."""
        return await self._membership.wait_changed(generation)

    def live_nodes(self) -> frozenset[str]:
        """The live nodes that run the application (for spreading its node work)."""
        return self._membership.live_nodes(self._app_key)
