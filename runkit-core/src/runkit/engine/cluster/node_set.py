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
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import aclosing
from datetime import datetime, timedelta

import anyio

from ...persistence import Keyspace, PersistenceError
from .nodes import NodeRecord, decode_node_record
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
    ) -> None:
        self._node_id = node_id
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
