"""The live set and what this node owns in it (rendezvous over the live nodes).

``LiveView`` is the ``Ownership`` side of the membership: it is told the peers'
records and whether this node may work, recomputes the live set, answers
``owns`` from a per-view cache of rendezvous winners, and bumps its generation
(waking ``wait_changed``) whenever the live set or this node's activity changes.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime

from ... import rendezvous
from .nodes import NodeRecord, describe_changes
from .ownership import Generation
from .store_calls import MEMBERSHIP_LOG

__all__ = ["LiveView"]


class LiveView:
    """One node's view of the live nodes and of the partitions it wins."""

    def __init__(self, node_id: uuid.UUID, *, role: str) -> None:
        self._node_id = node_id
        self._role = role
        self._extra = {"node_id": str(node_id)}
        self.active = False
        self._was_active = False
        self._live: frozenset[uuid.UUID] = frozenset()
        # The applications each live peer runs (None: every one, an older writer).
        self._apps: dict[uuid.UUID, frozenset[str] | None] = {}
        self._winners: dict[str, bool] = {}
        self._generation = Generation()

    @property
    def generation(self) -> int:
        """Increases whenever the live set or this node's activity changes."""
        return self._generation.value

    @property
    def live(self) -> frozenset[uuid.UUID]:
        """The live nodes (owners of partitions), this one included while active."""
        return self._live

    def wins(self, partition_id: str, app_key: str | None = None) -> bool:
        """Whether this node is the rendezvous winner of *partition_id* in the live set.

        With *app_key* (the application whose partition it is) only the live
        nodes that run that application take part: a node of another
        application sharing the store would win partitions it cannot run.
        """
        owned = self._winners.get(partition_id)
        if owned is None:
            owned = self._winners[partition_id] = (
                rendezvous.winner(partition_id, self.running(app_key)) == self._node_id
            )
        return owned

    def running(self, app_key: str | None) -> frozenset[uuid.UUID]:
        """The live nodes that run *app_key* (all of them for ``None``)."""
        if app_key is None:
            return self._live
        return frozenset(
            n for n in self._live if (apps := self._apps.get(n)) is None or app_key in apps
        )

    async def wait_changed(self, generation: int) -> int:
        """Wait until the generation differs from *generation*; return the new one."""
        return await self._generation.wait_changed(generation)

    def update(
        self,
        now: datetime,
        peers: Mapping[uuid.UUID, NodeRecord],
        *,
        active: bool,
        left: bool,
        last_written: datetime | None,
        last_read: datetime | None = None,
    ) -> None:
        """Recompute the live set at *now*; bump the generation if it changed.

        *last_read* is given when the node is inactive because it cannot read
        the node set (its heartbeat is fresh): the last successful read.
        """
        # Clients are members (for authentication) but never own partitions.
        apps = {n: r.apps for n, r in peers.items() if r.is_live(now) and r.role == "node"}
        live = set(apps)
        if active and self._role == "node":
            live.add(self._node_id)
        live_set = frozenset(live)
        if active == self.active and live_set == self._live:
            if apps != self._apps:  # a peer restarted with other applications
                self._apps = apps
                self._winners = {}
                self._generation.bump()
            return
        if active != self.active:
            self._log_activity(active, left, last_written, last_read)
        elif live_set != self._live:
            MEMBERSHIP_LOG.info(
                "%s %s: %s; %d live node%s",
                self._role,
                self._node_id,
                describe_changes(live_set - self._live, self._live - live_set),
                len(live_set),
                "" if len(live_set) == 1 else "s",
                extra=self._extra,
            )
        self.active = active
        self._live = live_set
        self._apps = apps
        self._winners = {}
        self._generation.bump()

    def _log_activity(
        self,
        active: bool,
        left: bool,
        last_written: datetime | None,
        last_read: datetime | None,
    ) -> None:
        if active:
            if self._was_active:
                again = "takes work again" if self._role == "node" else "is trusted again"
                MEMBERSHIP_LOG.warning(
                    "%s %s %s: its heartbeat is fresh",
                    self._role,
                    self._node_id,
                    again,
                    extra=self._extra,
                )
            self._was_active = True
        elif left:
            MEMBERSHIP_LOG.info(
                "%s %s is leaving%s",
                self._role,
                self._node_id,
                ": it owns nothing now" if self._role == "node" else "",
                extra=self._extra,
            )
        elif last_read is not None:
            MEMBERSHIP_LOG.error(
                "%s %s stops taking work: it has not read the node set since %s, though "
                "its heartbeat writes succeed (a failing or slow range read of the store?); "
                "it owns nothing, and stops refreshing its heartbeat so that peers take its "
                "partitions, until a read succeeds",
                self._role,
                self._node_id,
                last_read.isoformat(),
                extra=self._extra,
            )
        else:
            last = "never" if last_written is None else last_written.isoformat()
            if self._role == "node":
                MEMBERSHIP_LOG.error(
                    "node %s stops taking work: its heartbeat has not been written since %s "
                    "and will expire (it owns nothing until a heartbeat write succeeds)",
                    self._node_id,
                    last,
                    extra=self._extra,
                )
            else:
                # A client owns nothing: what it loses is its peers' trust.
                MEMBERSHIP_LOG.error(
                    "%s %s: its heartbeat has not been written since %s and will expire "
                    "(nodes then refuse its new connections, so its commands may go to inboxes)",
                    self._role,
                    self._node_id,
                    last,
                    extra=self._extra,
                )
