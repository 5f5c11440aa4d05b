"""The calling side of the cluster: offers, wake-ups and observations of peers.

``Router``, used by the engine's acceptance and executors and by
``runkit.Client``, ranks the live nodes for a partition by rendezvous hashing,
offers commands to the owner, and falls back to the inbox (plus a ``wake``)
when the owner does not answer in time; it follows the events of a chain on
the nodes that record them. The heartbeat store stays the only authority on
membership: a failed call is a hint, never a verdict. What a node serves in
return is in ``serving``; ``node_cluster`` runs both on the node transport.

Peers are authenticated by the fingerprint of their TLS certificate, which every
member (node or client) publishes in its heartbeat record (ADR 0005; ``trust``).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import (
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import (
    asynccontextmanager,
    contextmanager,
)
from datetime import UTC, datetime

import anyio
import attrs
import msgspec
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from ... import rendezvous
from ..._errors import ConfigurationError
from ..._validate import is_unspecified_address
from ...persistence import PersistenceError, Provider
from ...transport import (
    NodeTransport,
    PeerUnavailable,
    RemoteError,
    TlsIdentity,
    TransportError,
)
from ..commands.acceptance import OfferUnanswered, PartitionBusy, PartitionStopped
from ..commands.inbox import InboxEntry
from ..envelope import UNDECODABLE
from ..logs import RateLimitedLog
from ..partitions import partition_id
from ..settings import EngineSettings
from ..streams import CommandDone, Observed, Widen, end_subscriptions, fed_subscription
from .following import follow_chain
from .nodes import NodeRecord
from .serving import ClusterServer
from .trust import authenticator, make_identity
from .wire import (
    NOT_OWNER,
    OK,
    Observe,
    Offer,
    Wake,
    answer_decoder,
    encoder,
    events_decoder,
    from_wire,
)

__all__ = [
    "NodeCluster",
    "Router",
    "node_cluster",
]

#: Error codes of an offer the owner's handler ran (``RemoteError.code``): the
#: commands may be committed, so their fallback copies carry the offer's time.
_OFFER_RAN = frozenset({"handler_error", "response_too_large"})

_log = logging.getLogger("runkit.engine.cluster.routing")
#: Offers refused over an untrusted certificate, logged once per owner per interval.
_untrusted_log = RateLimitedLog(_log, 10.0)
#: Offers a peer did not take (an outage, a stopping owner): one line per peer and
#: interval, since every command for its partitions fails alike meanwhile.
_fallback_log = RateLimitedLog(_log, 10.0)

#: How long a gateway waits for the owner to take a command before using the inbox.
OFFER_TIMEOUT = 2.0

#: Callers' offers in flight to one peer at once; more wait here for a slot.
#: Below the transport's requests per connection (256 by default), which leaves
#: room for wake-ups and observation streams: past it the peer answers
#: "overloaded" and the command would go to the inbox, bypassing back-pressure.
OFFERS_PER_PEER = 192

#: Observe streams open to one peer at once. Each holds one of the peer's
#: requests per connection for as long as its observer waits; past this, an
#: observation reads that peer's partitions from the store instead, so that
#: waiting observers never take the room offers and wake-ups need.
OBSERVE_STREAMS_PER_PEER = 32

#: How often open observations subscribe to peers that joined or whose stream
#: broke, and open the streams of those whose offer was never answered.
RESUBSCRIBE_INTERVAL = 0.5


class Router:
    """Routes commands and observations to the nodes that own partitions.

    *members* returns the live heartbeat records of the other members (nodes and
    clients; only nodes own partitions, each those of the applications its
    record says it runs). *self_id* is this member's node ID (excluded from
    ranking when it is a client), and *self_apps* the keys of the applications
    it runs (``None``: every one). With *store*, the events of
    nodes that cannot be reached (no advertise address, or a connection that
    fails) are observed from their partitions' stream journals (``following``).
    """

    def __init__(
        self,
        transport: NodeTransport,
        members: Callable[[], Mapping[uuid.UUID, NodeRecord]],
        *,
        self_id: uuid.UUID,
        self_is_node: bool,
        self_apps: frozenset[str] | None = None,
        offer_timeout: float = OFFER_TIMEOUT,
        store: Provider | None = None,
    ) -> None:
        self._transport = transport
        self._store = store
        self._members = members
        self._self_id = self_id
        self._self_is_node = self_is_node
        self._self_apps = self_apps
        self._offer_timeout = offer_timeout
        self._tg: TaskGroup | None = None
        # Observations that may wait for an offer's answer, by correlation ID.
        self._awaiting: dict[str, list[_Observation]] = {}
        self._observations: set[_Observation] = set()
        self._streams_open: dict[uuid.UUID, int] = {}  # observe streams per peer
        # Slots for callers' offers in flight, per peer address (OFFERS_PER_PEER).
        self._offer_slots: dict[str, anyio.Semaphore] = {}

    def start(self, tg: TaskGroup) -> None:
        """Give the router a task group for wake-ups and observations' streams."""
        self._tg = tg
        tg.start_soon(self._keep_observing)

    def end(self, error: Callable[[], Exception]) -> None:
        """Tell every open observation that nothing more will come (``Stopped``).

        For a gateway that stops: the calls waiting on them raise ``error()``.
        """
        end_subscriptions([o.send for o in self._observations], error)

    def owner(self, partition_id: str, app_key: str | None = None) -> NodeRecord | None:
        """The owner of a partition in this member's view (``None``: this node, or nobody).

        With *app_key* (the partition's application), ranked among the nodes
        that run it, as their memberships rank them.
        """
        return self._owner(partition_id, self._nodes(app_key), app_key)

    def _nodes(self, app_key: str | None = None) -> dict[uuid.UUID, NodeRecord]:
        if app_key is None:
            return {n: r for n, r in self._members().items() if r.role == "node"}
        return {n: r for n, r in self._members().items() if r.runs(app_key)}

    def _owner(
        self,
        partition_id: str,
        nodes: Mapping[uuid.UUID, NodeRecord],
        app_key: str | None = None,
    ) -> NodeRecord | None:
        candidates = set(nodes)
        if self._self_is_node and (
            app_key is None or self._self_apps is None or app_key in self._self_apps
        ):
            candidates.add(self._self_id)
        if not candidates:
            return None
        winner = rendezvous.winner(uuid.UUID(partition_id), candidates)
        if winner is None or winner == self._self_id:
            return None
        return nodes.get(winner)

    async def offer(
        self,
        app_key: str,
        index: int,
        partition_id: str,
        entries: Sequence[InboxEntry],
        *,
        room_wait: float | None = None,
    ) -> bool:
        """Offer commands to the partition's owner; whether it took them (durably).

        Raises ``PartitionStopped`` naming the appends that may hold some of
        them, if the owner stopped with those unconfirmed, and those it did
        not commit, if it committed some (the caller spills those); and
        ``OfferUnanswered`` if the call failed after it may have reached the
        owner (the caller spills them marked as offered). With
        *room_wait* (a caller's commands) the owner waits for room in the
        partition's backlog for up to that long, at most the offer timeout
        (which the call's timeout then adds), and raises ``PartitionBusy`` if
        none came (the caller offers them again).
        """
        # Only the answer to a chain's first command (whose ID is the
        # correlation ID) settles the chain's observations. Marked answered by
        # another command of the chain (a process's, of an earlier run of a
        # keyed chain, say), an observation would not widen when its own
        # command's answer came without events, and would wait until the
        # caller's timeout. Nor does the owner send events nobody takes.
        awaiting = [
            (entry, waiting)
            for entry in entries
            if entry.envelope.message_id == entry.envelope.correlation_id
            for waiting in self._awaiting.get(entry.envelope.correlation_id, ())
        ]
        try:
            owner = self.owner(partition_id, app_key)
            if owner is None or owner.advertise_address is None:
                return False
            address = owner.advertise_address
            async with self._offer_slot(address, room_wait) as left:
                # The owner may hold a caller's commands for room (at most one
                # offer timeout): the call's timeout adds that wait, so that
                # the commit still gets a whole offer timeout once they are taken.
                hold = None if left is None else min(left, self._offer_timeout)
                offered_at = datetime.now(UTC)
                offer = Offer(
                    app_key=app_key,
                    partition=index,
                    entries=tuple(entries),
                    reply_events=bool(awaiting),
                    room_wait=hold,
                )
                try:
                    answer = await self._transport.call(
                        address,
                        "offer",
                        encoder.encode(offer),
                        timeout=self._offer_timeout + (hold or 0.0),
                        expect_fingerprint=owner.tls_fingerprint,
                    )
                except RemoteError as exc:
                    if hold is not None and exc.code == "overloaded":
                        # More requests than the peer serves at once (callers of
                        # an older gateway, or other requests): no room, as busy.
                        raise PartitionBusy(reason=f"node {owner.node_id}: {exc}") from None
                    self._log_fallback(owner, entries, index, exc)
                    if exc.code in _OFFER_RAN:
                        # The owner took the offer and failed part-way, or could
                        # not send its answer: some commands may be committed.
                        raise OfferUnanswered(offered_at) from None
                    return False
                except TransportError as exc:
                    self._log_fallback(owner, entries, index, exc)
                    if isinstance(exc, PeerUnavailable) and exc.untrusted:
                        return False  # refused in the handshake: never delivered
                    # A timeout or a connection lost in the call: the owner may
                    # have taken and committed them (ADR 0002's addendum).
                    raise OfferUnanswered(offered_at) from None
            if answer in (OK, NOT_OWNER):
                return answer == OK
            try:
                decoded = answer_decoder.decode(answer)
            except UNDECODABLE as exc:
                _log.info("node %s answered an offer with garbage: %s", owner.node_id, exc)
                return False
            if decoded.busy is not None:
                raise PartitionBusy(*decoded.busy)
            if decoded.unconfirmed or decoded.stopped is not None:
                raise PartitionStopped(decoded.unconfirmed, decoded.stopped)
            if decoded.accepted:
                _answered(awaiting, [from_wire(item) for item in decoded.events])
            return decoded.accepted
        finally:
            # Whatever the answer did not settle is observed the usual way.
            for _, waiting in awaiting:
                if not waiting.answered:
                    self._widen(waiting)

    @asynccontextmanager
    async def _offer_slot(
        self, address: str, room_wait: float | None
    ) -> AsyncIterator[float | None]:
        """Hold one of the peer's slots for a caller's offer; yields the room wait left.

        A caller's offer waits for a slot for up to *room_wait* seconds (then
        ``PartitionBusy``); a produced command's (*room_wait* ``None``) takes none.
        """
        if room_wait is None:
            yield None
            return
        slots = self._offer_slots.get(address)
        if slots is None:
            slots = self._offer_slots[address] = anyio.Semaphore(OFFERS_PER_PEER)
        started = anyio.current_time()
        try:
            slots.acquire_nowait()
        except anyio.WouldBlock:
            with anyio.move_on_after(room_wait) as waited:
                await slots.acquire()
            if waited.cancelled_caught:
                raise PartitionBusy(
                    reason=f"{OFFERS_PER_PEER} offers already in flight to {address}"
                ) from None
        try:
            yield max(0.0, room_wait - (anyio.current_time() - started))
        finally:
            slots.release()
            if slots.value == OFFERS_PER_PEER and self._offer_slots.get(address) is slots:
                # Unused: dropped, so that a long-lived client does not keep
                # one for every address a peer ever had.
                del self._offer_slots[address]

    def _log_fallback(
        self, owner: NodeRecord, entries: Sequence[InboxEntry], index: int, exc: TransportError
    ) -> None:
        # A certificate one side does not trust is a configuration fault that
        # no retry cures: say so (once per interval), as the inbox keeps
        # commands flowing, only slower, and hides it.
        failed = "offering %d command(s) for partition %d to node %s failed (%s); "
        if isinstance(exc, PeerUnavailable) and exc.untrusted:
            _untrusted_log.warning(
                owner.node_id,
                failed + "using the inbox, which is slower",
                len(entries),
                index,
                owner.node_id,
                exc,
            )
        else:
            _fallback_log.info(
                owner.node_id, failed + "using the inbox", len(entries), index, owner.node_id, exc
            )

    def _recorders(self, app_key: str, partition: int | None) -> list[NodeRecord]:
        """The peers that may record a chain's events (of *partition*, if given)."""
        nodes = self._nodes(app_key)
        if partition is None:
            return list(nodes.values())
        owner = self._owner(partition_id(app_key, partition), nodes, app_key)
        return [r for r in nodes.values() if r is owner or partition in r.progress.get(app_key, {})]

    def wake(self, app_key: str, index: int, partition_id: str, what: str = "inbox") -> None:
        """Tell the partition's owner to read its inbox or deadlines now (best effort)."""
        owner = self.owner(partition_id, app_key)
        if owner is None or owner.advertise_address is None or self._tg is None:
            return
        payload = encoder.encode(Wake(app_key=app_key, partition=index, what=what))
        self._tg.start_soon(self._call_quietly, owner, "wake", payload)

    async def _call_quietly(self, owner: NodeRecord, method: str, payload: bytes) -> None:
        assert owner.advertise_address is not None
        try:
            await self._transport.call(
                owner.advertise_address,
                method,
                payload,
                timeout=self._offer_timeout,
                expect_fingerprint=owner.tls_fingerprint,
            )
        except TransportError as exc:
            _log.debug("%s to node %s failed: %s", method, owner.node_id, exc)

    @asynccontextmanager
    async def observe(
        self,
        app_key: str,
        correlation_id: str,
        partition: int | None = None,
        widen: Widen | None = None,
    ) -> AsyncIterator[AsyncIterator[Observed]]:
        """Receive the chain's events recorded on every live node (see ``observation``)."""
        async with fed_subscription(
            lambda send: self.observation(app_key, correlation_id, send, partition, widen)
        ) as events:
            yield events

    @contextmanager
    def observation(
        self,
        app_key: str,
        correlation_id: str,
        send: MemoryObjectSendStream[Observed],
        partition: int | None = None,
        widen: Widen | None = None,
        *,
        since: datetime | None = None,
    ) -> Iterator[None]:
        """Deliver the chain's events recorded on the peers into *send* while inside.

        With *partition* (the index of the one partition a chain can reach),
        only from the nodes that may record its events: the owner in this
        member's view and any node whose heartbeat says it still runs the
        partition (a handoff in progress). None when that is only this node.

        With *widen* the streams wait until it is set. Meanwhile an ``offer``
        of the chain's command asks the owner for the chain's events in its
        answer (the events, then the command's done note): an answer with its
        conclusive note hands them over, and the caller sets *widen* only if
        processes may carry the chain on. An offer answered otherwise (the
        command went to the inbox, or waits there for a retry) sets it, and so
        does the offer timeout passing without any answer (the command was
        handled here, or the offer is slow): then the streams open and replay
        what the chain published.

        The streams are requested but not awaited: each starts with what the
        chain published on its node recently (``Observe``), so one that
        arrives after the command's events misses nothing. Nodes that join
        later, or whose stream breaks, are subscribed (again) within
        ``RESUBSCRIBE_INTERVAL``, with the same replay; the caller
        de-duplicates events by (stream, offset) (``UniqueEvents``). The
        streams run in the router's task group, so an observation costs no
        task until they open. The caller owns *send* and closes it after.

        The partitions of unreachable nodes are read from the store from
        about *since* (default: now), when the chain began to be observed.
        """
        if self._tg is None:
            raise RuntimeError("the router is not started (Router.start)")
        deadline = anyio.current_time() + self._offer_timeout + 0.5
        observation = _Observation(
            app_key, correlation_id, partition, send, deadline, since or datetime.now(UTC)
        )
        self._observations.add(observation)
        if widen is None:
            self._widen(observation)
        else:
            self._awaiting.setdefault(correlation_id, []).append(observation)
            widen.on_set(lambda: self._widen(observation))
        try:
            yield
        finally:
            observation.closed = True
            self._observations.discard(observation)
            _forget(self._awaiting, observation)
            for scope in (*observation.streams.values(), *observation.followed.values()):
                scope.cancel()

    def _widen(self, observation: _Observation) -> None:
        if not observation.closed and not observation.widened:
            observation.widened = True
            self._subscribe(observation)

    def _subscribe(self, observation: _Observation) -> None:
        """Open a stream at each peer that may record the chain and has none yet."""
        if self._tg is None:
            return  # stopping (see _keep_observing): its calls end with it
        for node in self._recorders(observation.app_key, observation.partition):
            if not node.advertise_address:
                self._follow_store(observation, node)
            elif node.node_id not in observation.streams:
                open_now = self._streams_open.get(node.node_id, 0)
                if open_now >= OBSERVE_STREAMS_PER_PEER:
                    self._follow_store(observation, node)
                    continue
                self._streams_open[node.node_id] = open_now + 1
                scope = observation.streams[node.node_id] = anyio.CancelScope()
                self._tg.start_soon(self._follow, observation, node, scope)

    def _follow_store(self, observation: _Observation, node: NodeRecord) -> None:
        """Read the chain's events of an unreachable node's partitions from the store."""
        if self._tg is None or self._store is None:
            return
        if observation.partition is not None:
            indexes: Iterable[int] = (observation.partition,)
        else:
            indexes = node.progress.get(observation.app_key, {})
        for index in indexes:
            if index not in observation.followed:
                scope = observation.followed[index] = anyio.CancelScope()
                self._tg.start_soon(self._follow_partition, observation, index, scope)

    async def _follow_partition(
        self, observation: _Observation, index: int, scope: anyio.CancelScope
    ) -> None:
        assert self._store is not None
        try:
            with scope:
                await follow_chain(
                    self._store,
                    observation.app_key,
                    index,
                    observation.correlation_id,
                    observation.send,
                    since=observation.started_at,
                )
        except PersistenceError as exc:
            _log.info("following partition %d in the store stopped: %s", index, exc)
        finally:
            if observation.followed.get(index) is scope:
                del observation.followed[index]

    async def _follow(
        self, observation: _Observation, node: NodeRecord, scope: anyio.CancelScope
    ) -> None:
        assert node.advertise_address is not None
        request = Observe(app_key=observation.app_key, correlation_id=observation.correlation_id)
        try:
            with scope:
                async with self._transport.stream(
                    node.advertise_address,
                    "observe",
                    encoder.encode(request),
                    timeout=math.inf,  # between events; opening is bounded by the call timeout
                    expect_fingerprint=node.tls_fingerprint,
                ) as items:
                    async for data in items:
                        for item in events_decoder.decode(data):
                            try:
                                observation.send.send_nowait(from_wire(item))
                            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                                # The caller has left (on trio a task woken
                                # with data runs on to its next checkpoint).
                                return
        except (TransportError, msgspec.DecodeError, ValueError) as exc:
            _log.info("observing on node %s stopped: %s", node.node_id, exc)
            if isinstance(exc, TransportError) and not observation.closed:
                # Cut off from the peer, not necessarily from the store: what
                # the peer records (a command that fell back to its inbox, say)
                # is read from its partitions' journals meanwhile. The stream
                # is still retried; both feed one de-duplicating receiver.
                self._follow_store(observation, node)
        finally:
            if observation.streams.get(node.node_id) is scope:
                del observation.streams[node.node_id]
            left = self._streams_open.pop(node.node_id, 1) - 1
            if left:
                self._streams_open[node.node_id] = left

    async def _keep_observing(self) -> None:
        """Open streams at peers that joined, and those whose answer never came."""
        try:
            while True:
                await anyio.sleep(RESUBSCRIBE_INTERVAL)
                now = anyio.current_time()
                for observation in list(self._observations):
                    if observation.widened:
                        self._subscribe(observation)
                    elif not observation.answered and now >= observation.deadline:
                        self._widen(observation)
        finally:
            # The task group is closing: a call still in flight (an offer failing
            # as the transport closes, say) must not start a task in it.
            self._tg = None


@attrs.define(eq=False)
class _Observation:
    """A chain observed on the peers: where its events go, and its streams so far."""

    app_key: str
    correlation_id: str
    partition: int | None
    send: MemoryObjectSendStream[Observed]
    #: When the streams open anyway if no answer has settled the chain (anyio time).
    deadline: float
    #: When the observation began (wall clock): where following the store starts.
    started_at: datetime
    #: The streams are open (or opening): the chain goes on, or nothing settled it.
    widened: bool = False
    #: An answer held the command's events and conclusive done note.
    answered: bool = False
    closed: bool = False
    #: A stream per peer, open or opening.
    streams: dict[uuid.UUID, anyio.CancelScope] = attrs.Factory(dict)
    #: A store follower per partition of unreachable peers (``following``).
    followed: dict[int, anyio.CancelScope] = attrs.Factory(dict)


def _answered(
    awaiting: Sequence[tuple[InboxEntry, _Observation]], events: Sequence[Observed]
) -> None:
    """Hand an offer answer's events to the observations it settles.

    *awaiting* pairs each chain's first command with the chain's
    observations (``offer``). Only an observation whose command's conclusive
    done note is in the answer takes them: then it has every event the
    command recorded, and decides from them whether the chain goes on.
    Otherwise it opens its streams, which replay the same events.
    """
    for entry, waiting in awaiting:
        command_id = entry.envelope.message_id
        if not any(
            isinstance(e, CommandDone) and e.command_id == command_id and e.conclusive
            for e in events
        ):
            continue
        try:
            for event in events:
                if _correlation(event) == waiting.correlation_id:
                    waiting.send.send_nowait(event)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            continue  # the caller has left
        waiting.answered = True


def _correlation(event: Observed) -> str:
    if isinstance(event, CommandDone):
        return event.correlation_id
    return event.envelope.correlation_id


def _forget(registry: dict[str, list[_Observation]], waiting: _Observation) -> None:
    others = registry.get(waiting.correlation_id, [])
    if waiting in others:
        others.remove(waiting)
    if not others:
        registry.pop(waiting.correlation_id, None)


@attrs.define(eq=False)
class NodeCluster:
    """A node's part in the cluster: its TLS identity, transport and router.

    ``advertise_address`` and ``listen_address`` (where it listens, its port
    bound) are ``None`` for a node without a listen address.
    """

    identity: TlsIdentity
    transport: NodeTransport
    router: Router
    advertise_address: str | None
    listen_address: str | None = None


@asynccontextmanager
async def node_cluster(
    *,
    settings: EngineSettings,
    provider: Provider,
    members: Callable[[], Mapping[uuid.UUID, NodeRecord]],
    server: ClusterServer,
) -> AsyncIterator[NodeCluster]:
    """The node's transport and router while inside.

    With ``settings.listen_address`` the node listens there and serves
    *server*'s methods. Without one it only calls out, as a client does: it
    offers commands to the owners and observes the chains on its peers, while
    peers reach its partitions through the store (the inbox, and ``following``
    for its events). Its certificate's fingerprint goes in its heartbeat either
    way, so peers accept its connections.

    Raises ``ConfigurationError`` when the node cannot be reached (a wildcard
    listen address and no advertise address) or its TLS files do not load.
    """
    identity = make_identity(
        str(settings.node_id), settings.tls_cert, settings.tls_key, settings.tls_ca
    )
    listen = settings.listen_address
    # Raised after the task group is left, so the caller gets the error itself
    # rather than an exception group around it.
    problem: ConfigurationError | None = None
    async with (
        NodeTransport(
            node_id=str(settings.node_id),
            identity=identity,
            authenticate=authenticator(
                provider, members, refresh_interval=settings.heartbeat_interval
            ),
            # Without a listen address nothing reaches these.
            unary=server.unary if listen else None,
            deferred=server.deferred if listen else None,
            streams=server.streams if listen else None,
        ) as transport,
        anyio.create_task_group() as tg,
    ):
        advertise = bound = None
        if listen is not None:
            try:
                bound = await tg.start(transport.serve, listen)
            except TransportError as exc:
                problem = ConfigurationError(
                    f"the node cannot listen on {listen}",
                    [
                        f"{exc}; set another with runkit.with_listen_address() "
                        "or DOGMA_LISTEN_ADDRESS"
                    ],
                )
            else:
                advertise = settings.advertise_address or bound
                if is_unspecified_address(advertise):
                    problem = ConfigurationError(
                        "the node cannot be reached by its peers",
                        [
                            f"it listens on {bound}: set an address peers can reach with "
                            "runkit.with_advertise_address() or DOGMA_ADVERTISE_ADDRESS"
                        ],
                    )
        if problem is not None:
            tg.cancel_scope.cancel()
        else:
            router = Router(
                transport,
                members,
                self_id=settings.node_id,
                self_is_node=True,
                self_apps=frozenset(a.identity.key for a in settings.applications),
                store=provider,
            )
            router.start(tg)
            try:
                yield NodeCluster(identity, transport, router, advertise, bound)
            finally:
                tg.cancel_scope.cancel()
    if problem is not None:
        raise problem
