"""Observing chains while alone: the bus only, routed once peers join.

A node without a listen address that sees no live peer observes a chain on its
own ``EventBus`` alone: nothing else records events, and a routed observation
costs about a quarter more CPU per observed command. A node that joins during
such a call may take the chain's partition over and record the rest of it, so
``LoneSubscriptions.watch`` routes every open bus-only subscription through
``Router.observation`` (from when it began: a joiner's stream replays what it
published, and an unreachable joiner's partitions are read from the store
from then) as soon as live peers appear. Per call that costs a set add and
discard; the routing itself runs only when membership changes.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractContextManager, asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

import anyio
import attrs
from anyio.streams.memory import MemoryObjectSendStream

from ..streams import EventBus, Observed, UniqueEvents

if TYPE_CHECKING:
    from .routing import Router

__all__ = ["LoneSubscriptions", "PeerView"]


class PeerView(Protocol):
    """The part of the membership view that tells when peers appear (``Membership``)."""

    @property
    def generation(self) -> int:
        """Increases whenever the live set changes."""
        ...

    async def wait_changed(self, generation: int) -> int:
        """Wait until the generation differs from *generation*; return the new one."""
        ...

    def live_peers(self) -> Mapping[uuid.UUID, object]:
        """The other live nodes."""
        ...


@attrs.define(eq=False)
class _Lone:
    """An open bus-only subscription, and its routed observation once there is one."""

    app_key: str
    correlation_id: str
    partition: int | None
    send: MemoryObjectSendStream[Observed]
    since: float  # time.time(): made into a datetime only if routed
    routed: AbstractContextManager[None] | None = None


class LoneSubscriptions:
    """Bus-only subscriptions of a lone node, routed to the peers when some appear."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._open: set[_Lone] = set()

    @asynccontextmanager
    async def subscribe(
        self, app_key: str, correlation_id: str, partition: int | None
    ) -> AsyncIterator[UniqueEvents]:
        """The chain's events published on this node's bus, and on the peers once routed.

        *partition* is the only partition the chain can reach, if there is one.
        """
        send, receive = anyio.create_memory_object_stream[Observed](math.inf)
        lone = _Lone(app_key, correlation_id, partition, send, time.time())
        with send, receive, self._bus.attached(correlation_id, send):
            self._open.add(lone)
            try:
                yield UniqueEvents(receive)
            finally:
                self._open.discard(lone)
                # Left before the stream closes, so nothing delivers into it after.
                if lone.routed is not None:
                    lone.routed.__exit__(None, None, None)

    def route(self, router: Router) -> None:
        """Observe every open subscription's chain on the peers too (once each).

        Widened at once: the command may have been handled here already, so no
        offer's answer will settle the chain. Events both sources deliver are
        passed once (``UniqueEvents``).
        """
        for lone in [lone for lone in self._open if lone.routed is None]:
            routed = router.observation(
                lone.app_key,
                lone.correlation_id,
                lone.send,
                lone.partition,
                since=datetime.fromtimestamp(lone.since, UTC),
            )
            routed.__enter__()
            lone.routed = routed

    async def watch(self, view: PeerView, router: Router) -> None:
        """Route the open subscriptions whenever live peers appear, until cancelled."""
        generation = view.generation
        while True:
            if view.live_peers():
                self.route(router)
            generation = await view.wait_changed(generation)
