"""Reading the node set: every heartbeat record in ``cluster/nodes`` but our own.

Also prunes records that expired long ago (any node may; the delete is
conditional, so a record refreshed meanwhile is kept) and warns once per
process about a peer whose clock runs ahead of ours.

Clock skew: expiry is judged by each reader's clock against the writer's
``expires_at``. The membership's one interval of margin absorbs skew below one
interval; more makes nodes flap in and out of peers' live sets (safe, because
of the OCC fence on the partition journals, but churny). A peer whose
``written_at`` is more than one interval ahead of our clock *when the read
returned* is logged as skewed (not ahead of the time the beat started: a slow
write or read in between would make peers on the same host look skewed).

Protocols: a live node that may own partitions of one of our applications but
writes another ``ENGINE_PROTOCOL`` is left out of the peers (it never wins a
partition in our view), kept in ``incompatible`` (a joining node refuses to
start beside one: ``IncompatibleNodes``) and logged once per incarnation as an
error. Clients, which commit nothing, skip the check.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import aclosing
from datetime import datetime, timedelta

import anyio

from ...persistence import Keyspace, PersistenceError
from .nodes import ENGINE_PROTOCOL, NodeRecord, decode_node_record
from .store_calls import MEMBERSHIP_LOG, StoreCalls, StoreTimeout

__all__ = ["NodeSetReader"]


class NodeSetReader:
    """Reads the other members' records for one node's membership."""

    def __init__(
        self,
        node_id: uuid.UUID,
        *,
        interval: float,
        clock: Callable[[], datetime],
        prune_after: timedelta,
        calls: StoreCalls,
        apps: frozenset[str] | None = None,
    ) -> None:
        self._node_id = node_id
        # Our applications' keys (``None``: a client, which checks no protocol).
        self._apps = apps
        #: Live nodes of another protocol the last read left out of the peers.
        self.incompatible: dict[uuid.UUID, NodeRecord] = {}
        self._incompatible_logged: set[str] = set()
        self._interval = interval
        self._clock = clock
        self._prune_after = prune_after
        self._calls = calls
        self._extra = {"node_id": str(node_id)}
        self._skew_logged: set[str] = set()
        self._stale: list[tuple[bytes, str]] = []

    async def read(self, ks: Keyspace, now: datetime) -> dict[uuid.UUID, NodeRecord] | None:
        """The other members' records (expired ones too, until pruned); ``None`` on failure.

        Records expired for longer than ``prune_after`` are left out and
        remembered for ``prune``.
        """
        peers: dict[uuid.UUID, NodeRecord] = {}
        stale: list[tuple[bytes, str]] = []
        try:
            with anyio.fail_after(self._calls.timeout):
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
            timeout = StoreTimeout(f"reading took longer than {self._calls.timeout:.1f}s")
            self._calls.failed("read the node set", timeout, reading=True)
            return None
        except PersistenceError as exc:
            self._calls.failed("read the node set", exc, reading=True)
            return None
        self.incompatible = self._leave_out_incompatible(peers, now)
        # Judged against the clock now, not at the start of the beat: every
        # record was written before we read it, however slow the store was.
        seen = self._clock()
        for record in peers.values():
            self._check_skew(record, seen)
        if self._calls.recovered(reading=True):
            MEMBERSHIP_LOG.info("node %s: node set read again", self._node_id, extra=self._extra)
        self._stale = stale
        return peers

    async def prune(self, ks: Keyspace) -> None:
        """Delete one of the long-expired records the last ``read`` found.

        One per beat (the next read finds the others again), beside the beat's
        write and read: deleting many one after another, in the read, made a
        beat with a slow store outlast the read's freshness.
        """
        stale, self._stale = self._stale[:1], []
        for key, revision in stale:
            try:
                # Conditional: a record refreshed since we read it is kept.
                await self._calls.bounded(ks.set(key, b"", revision))
                MEMBERSHIP_LOG.info(
                    "pruned the heartbeat record of dead node %s", key.decode("ascii")
                )
            except (PersistenceError, StoreTimeout):
                pass  # another node pruned it, or it came back; either is fine

    def _leave_out_incompatible(
        self, peers: dict[uuid.UUID, NodeRecord], now: datetime
    ) -> dict[uuid.UUID, NodeRecord]:
        """Take live nodes of another protocol that share an application out of *peers*."""
        if self._apps is None:
            return {}
        found = {
            node_id: record
            for node_id, record in peers.items()
            if record.protocol != ENGINE_PROTOCOL
            and record.is_live(now)
            and record.shares_an_app(self._apps)
        }
        for node_id, record in found.items():
            del peers[node_id]
            if record.incarnation not in self._incompatible_logged:
                self._incompatible_logged.add(record.incarnation)
                MEMBERSHIP_LOG.error(
                    "node %s runs an engine of protocol %d (runkit-core %s) beside node %s "
                    "(protocol %d) on the same application: it is not counted as an owner "
                    "here, but it still commits process state its own way; stop it and "
                    "run every node on one runkit-core version (docs/running.md, 'Upgrading')",
                    node_id,
                    record.protocol,
                    record.runkit_version or "unknown",
                    self._node_id,
                    ENGINE_PROTOCOL,
                    extra=self._extra,
                )
        return found

    def _check_skew(self, record: NodeRecord, seen: datetime) -> None:
        ahead = (record.written_at - seen).total_seconds()
        if ahead > self._interval and record.incarnation not in self._skew_logged:
            self._skew_logged.add(record.incarnation)
            MEMBERSHIP_LOG.warning(
                "node %s's clock is at least %.1fs ahead of node %s's; "
                "skew near a heartbeat interval makes ownership flap",
                record.node_id,
                ahead,
                self._node_id,
                extra=self._extra,
            )
