"""Cluster membership: heartbeats in ``cluster/nodes`` and rendezvous ownership.

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
- A node stops taking work ``2 x interval`` after the start of its last
  successful write, one interval before peers consider it gone, and resumes
  once a write succeeds again.
- ``leave()`` deletes the record (conditionally) so peers take over at their
  next read instead of waiting for expiry; ``run()`` calls it on the way out.
  ``joined()`` wraps a block of work (the engine's applications) so that the
  heartbeat outlives the block's wind-down and the node leaves after it.

Clock skew: expiry is judged by each reader's clock against the writer's
``expires_at``. The one interval of margin above absorbs skew below one
interval; more makes nodes flap in and out of peers' live sets (safe, because
of the OCC fence, but churny). A peer whose ``written_at`` is more than one
interval ahead of our clock *when the read returned* is logged as skewed (not
ahead of the time the beat started: a slow write or read in between would make
peers on the same host look skewed).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from datetime import datetime, timedelta
from typing import TypeVar

import anyio
import msgspec
from anyio.abc import TaskStatus

from ... import rendezvous
from ...persistence import Conflict, Keyspace, PersistenceError, Provider
from ..logs import describe_error
from ..settings import EngineSettings
from .nodes import (
    EXPIRY_INTERVALS,
    NODES_KEYSPACE,
    RECORD_VERSION,
    RUNKIT_VERSION,
    STOP_INTERVALS,
    Heartbeat,
    NodeIdInUse,
    NodeRecord,
    Progress,
    ProgressField,
    decode_node_record,
    describe_changes,
    describe_node,
)

__all__ = ["Membership"]

_log = logging.getLogger("runkit.engine.cluster.membership")

_T = TypeVar("_T")


class _Timeout(Exception):
    """A store call took longer than the membership allows (its outcome is unknown)."""


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
        self._role = role
        self._node_id = settings.node_id
        self._key = str(settings.node_id).encode("ascii")
        self._interval = settings.heartbeat_interval
        self._clock = settings.clock
        self._leave_timeout = settings.shutdown_timeout
        self._advertise_address = settings.advertise_address
        self._listen_address = settings.listen_address
        self._tls_fingerprint = tls_fingerprint
        self._progress = progress
        self._prune_after = timedelta(seconds=prune_after)
        # Store calls are abandoned after this, so a hung store cannot stall the view.
        # Two intervals: a slow store (a busy S3 or DynamoDB) may take over an
        # interval per call. Safe, because ownership is judged from when the last
        # successful write *started*, not when it finished.
        self._io_timeout = max(2 * self._interval, 1.0) if store_timeout is None else store_timeout
        self._incarnation = str(uuid.uuid4())
        self._started_at: datetime | None = None
        self._revision = ""
        self._valid_until: datetime | None = None
        self._last_written: datetime | None = None
        self._peers: dict[uuid.UUID, NodeRecord] = {}
        self._active = False
        self._was_active = False
        self._live: frozenset[uuid.UUID] = frozenset()
        self._winners: dict[str, bool] = {}
        self._generation = 0
        self._changed: anyio.Event | None = None
        self._state = "new"
        self._joined = False
        self._left = False
        self._loop_scope: anyio.CancelScope | None = None
        self._write_failing = False
        self._read_failing = False
        self._progress_failing = False
        self._oversized = False
        self._skew_logged: set[str] = set()

    # -- the Ownership protocol --

    @property
    def generation(self) -> int:
        """Increases whenever the live set or this node's ability to work changes."""
        return self._generation

    def owns(self, partition_id: str) -> bool:
        """Whether this node is the rendezvous winner of *partition_id* in its current view."""
        if not self._active or not self._fresh(self._clock()):
            return False
        owned = self._winners.get(partition_id)
        if owned is None:
            owned = self._winners[partition_id] = (
                rendezvous.winner(partition_id, self._live) == self._node_id
            )
        return owned

    async def wait_changed(self, generation: int) -> int:
        """Wait until the generation differs from *generation*; return the new one."""
        while self._generation == generation:
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()
        return self._generation

    # -- the view, for routing and operators --

    @property
    def node_id(self) -> uuid.UUID:
        """This node's UUID."""
        return self._node_id

    @property
    def active(self) -> bool:
        """Whether this node takes work: its heartbeat is fresh and it has not left."""
        return self._active and self._fresh(self._clock())

    def live_nodes(self) -> frozenset[str]:
        """The live node IDs (strings) in this node's view, itself included while active."""
        return frozenset(str(n) for n in self._live)

    def live_peers(self) -> dict[uuid.UUID, NodeRecord]:
        """The live records of the other nodes (addresses for the node transport)."""
        return {n: r for n, r in self._peers.items() if n in self._live}

    def live_members(self) -> dict[uuid.UUID, NodeRecord]:
        """Every other live record, clients included (for authenticating peers)."""
        now = self._clock()
        return {n: r for n, r in self._peers.items() if r.is_live(now)}

    # -- running --

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Heartbeat and follow the cluster until cancelled (or ``leave()``), then leave.

        Reports started once this node's record is written and the node set
        read. Raises ``NodeIdInUse`` if another process uses this node's ID.
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
            self._revision = ""  # the record is not ours: leave() must not delete it
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
        if not self._revision:
            return
        with anyio.move_on_after(self._leave_timeout, shield=True) as bound:
            try:
                async with await self._provider.keyspaces.open(NODES_KEYSPACE) as ks:
                    await self._delete(ks)
            except Exception:
                _log.warning(
                    "node %s could not delete its heartbeat; peers take over when it expires",
                    self._node_id,
                    exc_info=True,
                    extra=self._extra,
                )
        if bound.cancelled_caught:
            _log.warning(
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
        membership fails (``NodeIdInUse``), the block is cancelled and the
        error raised from here.
        """
        fatal: list[NodeIdInUse] = []
        failed: Exception | None = None
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def membership(*, task_status: TaskStatus[None]) -> None:
                with scope:
                    try:
                        await self.run(task_status=task_status)
                    except NodeIdInUse as exc:
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

    # -- internals --

    @property
    def _extra(self) -> dict[str, str]:
        return {"node_id": str(self._node_id)}

    def _fresh(self, now: datetime) -> bool:
        return self._valid_until is not None and now < self._valid_until

    async def _bounded(self, call: Awaitable[_T]) -> _T:
        with anyio.move_on_after(self._io_timeout) as scope:
            return await call
        assert scope.cancelled_caught
        raise _Timeout(f"a store call took longer than {self._io_timeout:.1f}s")

    async def _join(self, ks: Keyspace) -> None:
        # Take our key: wait out an unexpired record left by an earlier run,
        # unless it is refreshed meanwhile (then a live process has our ID).
        self._started_at = self._clock()
        watched: str | None = None
        while True:
            now = self._clock()
            try:
                value, revision = await self._bounded(ks.get(self._key))
            except (PersistenceError, _Timeout) as exc:
                self._report_failure("read its heartbeat record", exc)
                await anyio.sleep(self._interval)
                continue
            record = decode_node_record(self._key, value) if value else None
            if record is not None and record.incarnation == self._incarnation:
                record = None  # our own write, whose success we did not hear of
            if watched is not None and revision != watched:
                if not value:
                    watched = None  # deleted: the other process left
                else:
                    raise NodeIdInUse(
                        self._node_id, f"{describe_node(record)} while this node waited for it"
                    )
            if record is not None and record.is_live(now):
                if watched is None:
                    _log.warning(
                        "node %s: an unexpired heartbeat record for this node ID exists "
                        "(%s); waiting until it expires at %s to take it over "
                        "(if it is refreshed meanwhile, another process uses this ID)",
                        self._node_id,
                        describe_node(record),
                        record.expires_at.isoformat(),
                        extra=self._extra,
                    )
                watched = revision
                await anyio.sleep(self._interval)
                continue
            self._revision = revision  # absent (""), expired, or unreadable: take it over
            if not await self._write(ks, now):
                # Start again from a fresh read; leave() must not delete a record we never wrote.
                self._revision = ""
            elif await self._read(ks, now):
                self._update(now)
                _log.info(
                    "node %s joined the cluster: %d live node(s)",
                    self._node_id,
                    len(self._live),
                    extra=self._extra,
                )
                return
            await anyio.sleep(self._interval)

    async def _beat_forever(self, ks: Keyspace) -> None:
        next_beat = anyio.current_time()
        while True:
            next_beat += self._interval
            delay = next_beat - anyio.current_time()
            if delay < 0:
                next_beat -= delay  # fell behind (slow store): restart the schedule from now
            await anyio.sleep(max(0.0, delay))
            now = self._clock()
            await self._write(ks, now)
            await self._read(ks, now)
            self._update(self._clock())

    async def _watch(self) -> None:
        # Notices our own staleness and peers' expiry even while a store call hangs.
        period = min(self._interval / 4, 0.25)
        while True:
            await anyio.sleep(period)
            self._update(self._clock())

    def _record(self, now: datetime) -> bytes:
        assert self._started_at is not None
        progress: dict[str, dict[int, dict[str, int]]] = {}
        if self._progress is not None and not self._oversized:
            try:
                # Checked, so a bad value cannot make our record unreadable to peers.
                progress = msgspec.convert(self._progress(), ProgressField)
                self._progress_failing = False
            except Exception:
                if not self._progress_failing:
                    _log.exception(
                        "node %s: the progress callback failed; heartbeats go without progress",
                        self._node_id,
                        extra=self._extra,
                    )
                self._progress_failing = True
        beat = Heartbeat(
            version=RECORD_VERSION,
            node_id=str(self._node_id),
            incarnation=self._incarnation,
            started_at=self._started_at,
            written_at=now,
            expires_at=now + timedelta(seconds=EXPIRY_INTERVALS * self._interval),
            heartbeat_interval=self._interval,
            advertise_address=self._advertise_address,
            listen_address=self._listen_address,
            tls_fingerprint=self._tls_fingerprint,
            progress=progress,
            role=self._role,
            runkit_version=RUNKIT_VERSION,
        )
        value = msgspec.msgpack.encode(beat)
        if len(value) > self._provider.limits.max_value_bytes and progress:
            # Liveness matters more than progress: never let progress block the heartbeat.
            _log.warning(
                "node %s: heartbeat with progress is %d bytes, over the store's limit; "
                "publishing no progress from now on",
                self._node_id,
                len(value),
                extra=self._extra,
            )
            self._oversized = True
            value = msgspec.msgpack.encode(msgspec.structs.replace(beat, progress={}))
        return value

    async def _write(self, ks: Keyspace, now: datetime) -> bool:
        """Write our record at ``self._revision``; whether it succeeded."""
        value = self._record(now)
        for _ in range(3):
            try:
                self._revision = await self._bounded(ks.set(self._key, value, self._revision))
            except Conflict:
                # Our own earlier write (ambiguous or abandoned) may have landed; else fatal.
                if not await self._resolve(ks):
                    return False
                continue
            except (PersistenceError, _Timeout) as exc:
                self._report_failure("write its heartbeat", exc)
                return False
            self._valid_until = now + timedelta(seconds=STOP_INTERVALS * self._interval)
            self._last_written = now
            if self._write_failing:
                _log.info("node %s: heartbeat written again", self._node_id, extra=self._extra)
                self._write_failing = False
            return True
        return False

    async def _resolve(self, ks: Keyspace, *, deleting: bool = False) -> bool:
        """After a conflict on our key: adopt our own revision, or raise ``NodeIdInUse``.

        Returns ``False`` if the key could not be read (try again next beat).
        """
        try:
            value, revision = await self._bounded(ks.get(self._key))
        except (PersistenceError, _Timeout) as exc:
            self._report_failure("read its heartbeat record", exc)
            return False
        if not value:
            if self._revision and not deleting:
                _log.warning(
                    "node %s: its heartbeat record was deleted by someone else "
                    "(pruned after expiry, or by an operator); writing it again",
                    self._node_id,
                    extra=self._extra,
                )
            self._revision = ""
            return True
        record = decode_node_record(self._key, value)
        if record is not None and record.incarnation == self._incarnation:
            self._revision = revision
            return True
        raise NodeIdInUse(self._node_id, describe_node(record))

    async def _read(self, ks: Keyspace, now: datetime) -> bool:
        """Read every record into ``self._peers``; whether it succeeded."""
        peers: dict[uuid.UUID, NodeRecord] = {}
        stale: list[tuple[bytes, str]] = []
        try:
            with anyio.fail_after(self._io_timeout):
                async with aclosing(ks.range()) as items:  # type: ignore[type-var]
                    async for key, value, revision in items:
                        record = decode_node_record(key, value)
                        if record is None or record.node_id == self._node_id:
                            continue
                        if now >= record.expires_at + self._prune_after:
                            stale.append((key, revision))
                            continue
                        peers[record.node_id] = record
        except TimeoutError:
            timeout = _Timeout(f"reading took longer than {self._io_timeout:.1f}s")
            self._report_failure("read the node set", timeout, reading=True)
            return False
        except PersistenceError as exc:
            self._report_failure("read the node set", exc, reading=True)
            return False
        # Judged against the clock now, not at the start of the beat: every
        # record was written before we read it, however slow the store was.
        seen = self._clock()
        for record in peers.values():
            self._check_skew(record, seen)
        self._peers = peers
        if self._read_failing:
            _log.info("node %s: node set read again", self._node_id, extra=self._extra)
            self._read_failing = False
        for key, revision in stale:
            try:
                # Conditional: a record refreshed since we read it is kept.
                await self._bounded(ks.set(key, b"", revision))
                _log.info("pruned the heartbeat record of dead node %s", key.decode("ascii"))
            except (PersistenceError, _Timeout):
                pass  # another node pruned it, or it came back; either is fine
        return True

    def _check_skew(self, record: NodeRecord, seen: datetime) -> None:
        ahead = (record.written_at - seen).total_seconds()
        if ahead > self._interval and record.incarnation not in self._skew_logged:
            self._skew_logged.add(record.incarnation)
            _log.warning(
                "node %s's clock is at least %.1fs ahead of node %s's; "
                "skew near a heartbeat interval makes ownership flap",
                record.node_id,
                ahead,
                self._node_id,
                extra=self._extra,
            )

    def _report_failure(self, what: str, exc: BaseException, *, reading: bool = False) -> None:
        failing = self._read_failing if reading else self._write_failing
        if not failing:
            _log.warning(
                "node %s could not %s (will keep trying): %s",
                self._node_id,
                what,
                describe_error(exc),
                extra=self._extra,
            )
        if reading:
            self._read_failing = True
        else:
            self._write_failing = True

    def _update(self, now: datetime) -> None:
        """Recompute the live set at *now*; bump the generation if it changed."""
        active = not self._left and self._fresh(now)
        # Clients are members (for authentication) but never own partitions.
        live = {n for n, r in self._peers.items() if r.is_live(now) and r.role == "node"}
        if active and self._role == "node":
            live.add(self._node_id)
        live_set = frozenset(live)
        if active == self._active and live_set == self._live:
            return
        if active != self._active:
            self._log_activity(active)
        elif live_set != self._live:
            _log.info(
                "node %s: %s; %d live node%s",
                self._node_id,
                describe_changes(live_set - self._live, self._live - live_set),
                len(live_set),
                "" if len(live_set) == 1 else "s",
                extra=self._extra,
            )
        self._active = active
        self._live = live_set
        self._winners = {}
        self._generation += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _log_activity(self, active: bool) -> None:
        if active:
            if self._was_active:
                _log.warning(
                    "node %s takes work again: its heartbeat is fresh",
                    self._node_id,
                    extra=self._extra,
                )
            self._was_active = True
        elif self._left:
            _log.info("node %s is leaving: it owns nothing now", self._node_id, extra=self._extra)
        else:
            last = "never" if self._last_written is None else self._last_written.isoformat()
            _log.error(
                "node %s stops taking work: its heartbeat has not been written since %s "
                "and will expire (it owns nothing until a heartbeat write succeeds)",
                self._node_id,
                last,
                extra=self._extra,
            )

    async def _delete(self, ks: Keyspace) -> None:
        attempt = 0
        while True:
            try:
                await ks.set(self._key, b"", self._revision)
            except Conflict:
                try:
                    if await self._resolve(ks, deleting=True) and not self._revision:
                        return  # already gone
                except NodeIdInUse:
                    _log.warning(
                        "node %s: not deleting a heartbeat record another process wrote",
                        self._node_id,
                        extra=self._extra,
                    )
                    return
                continue
            except PersistenceError as exc:
                if not (exc.retryable or exc.ambiguous):
                    raise
                # An ambiguous delete that landed shows up as a conflict on the retry.
                attempt += 1
                await anyio.sleep(min(self._interval, 0.01 * 2.0 ** min(attempt, 10)))
                continue
            self._revision = ""
            _log.info("node %s left the cluster", self._node_id, extra=self._extra)
            return
