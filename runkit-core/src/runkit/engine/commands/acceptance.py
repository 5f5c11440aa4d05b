"""Commands: acceptance, command IDs and idempotency markers.

Acceptance (``Acceptor``) finds the command's handler and routes it to a
partition (aggregate: handler key + instance ID; integration preferring minimal
concurrency: handler key; other integrations: command ID). When this node runs
that partition, an aggregate command goes straight to its batch processor
(``batches.PartitionCommands``) and is durable once its batch is committed to
the partition stream (or, if its handler fails, once it is in the inbox);
otherwise it is offered to the partition's owner, or appended to the
partition's inbox (group commit). An integration command always goes to the
inbox (ADR 0011): in a batch it would be durable only once its handler had
returned, so whoever executed it would wait for an external call. Commands from
callers wait while the partition's backlog is over the limit, whichever node
owns it (an owner holds a caller's offer while full, and answers busy if no
room comes within the offer's wait: ``PartitionBusy``, offered again);
commands produced by handlers never wait (they drain the backlog).

Idempotency markers (``<app>/idempotency``) are written only for keyed
integration commands: an aggregate instance's recent command IDs prove that an
aggregate command was handled (ADR 0007).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Protocol

import anyio
import msgspec

import dogma

from ...config import ApplicationConfig, HandlerConfig, HandlerKind
from ...persistence import Conflict, Limits, PersistenceError, Provider
from ..backoff import backoff
from ..envelope import Envelope, RoutedMessages, closing_iter, to_message
from ..ids import derived_id
from ..partitions import instance_workload, partition_of
from ..streams import UnconfirmedAppend
from .inbox import InboxEntry, InboxWriter
from .instance_records import aggregate_name

__all__ = [
    "Acceptor",
    "Backlogged",
    "IdempotencyMarker",
    "LocalPartition",
    "OfferUnanswered",
    "PartitionBusy",
    "PartitionStopped",
    "command_id_for",
    "enabled_command_handler",
    "idempotency_name",
    "marker_decoder",
    "marker_encoder",
    "prune_idempotency",
]

_log = logging.getLogger("runkit.engine.commands.acceptance")


class Backlogged(RuntimeError):
    """A partition's backlog stayed over the limit for longer than the caller may wait."""


class PartitionBusy(Exception):
    """No room for a caller's command at the partition's owner, on another node.

    The owner's backlog stayed at its limit (*backlog* and *limit* say how
    full), or no offer could be in flight to it (*reason*). Raised by an offer
    (``Acceptor``'s *remote*); acceptance offers again until the caller's
    backlog timeout, then raises ``Backlogged``. It never falls back to the
    inbox, which would bypass the limit.
    """

    def __init__(
        self, backlog: int | None = None, limit: int | None = None, *, reason: str | None = None
    ) -> None:
        self.backlog = backlog
        self.limit = limit
        self.reason = reason
        super().__init__(reason or f"the partition has {backlog} commands waiting (limit {limit})")


class OfferUnanswered(Exception):
    """An offer's answer never came: the owner may have committed the commands.

    Raised by an offer (``Acceptor``'s *remote*) that failed after it may have
    been delivered (a timeout, a connection lost in the call). Acceptance
    spills the commands to the inbox marked with *offered_at*, the time the
    offer was made, so that an owner that does not know them looks for them
    in the stream records written since (ADR 0002's addendum).
    """

    def __init__(self, offered_at: datetime) -> None:
        super().__init__("the owner did not answer the offer")
        self.offered_at = offered_at

    def spilled(self, entries: Sequence[InboxEntry]) -> list[InboxEntry]:
        """*entries* as the inbox takes them: marked as offered."""
        return [msgspec.structs.replace(e, offered_at=self.offered_at) for e in entries]


class PartitionStopped(Exception):
    """The local partition stopped before the command was committed: use the inbox.

    ``unconfirmed`` maps the IDs of commands whose stream append was cut short
    or never confirmed to that append: it may have landed, so their inbox
    entries carry it (``InboxEntry.unconfirmed``). ``commands`` holds the IDs
    of the caller's commands that were not committed (``None``: all of them);
    the others are, and must not be spilled: the next owner would handle one
    that recorded no event again.
    """

    def __init__(
        self,
        unconfirmed: Mapping[str, UnconfirmedAppend] | None = None,
        commands: Iterable[str] | None = None,
    ) -> None:
        super().__init__("the partition stopped before the command was committed")
        self.unconfirmed: dict[str, UnconfirmedAppend] = dict(unconfirmed or {})
        self.commands: set[str] | None = None if commands is None else set(commands)

    def covers(self, entries: Sequence[InboxEntry]) -> bool:
        """Whether none of *entries* was committed."""
        return self.commands is None or all(e.envelope.message_id in self.commands for e in entries)

    def spilled(self, entries: Sequence[InboxEntry]) -> list[InboxEntry]:
        """The *entries* not committed, as the inbox takes them: with the append each may be in."""
        return [
            entry
            if (append := self.unconfirmed.get(entry.envelope.message_id)) is None
            else msgspec.structs.replace(entry, unconfirmed=append)
            for entry in entries
            if self.commands is None or entry.envelope.message_id in self.commands
        ]


class LocalPartition(Protocol):
    """What acceptance needs of a partition this node runs (``batches.PartitionCommands``)."""

    @property
    def backlog(self) -> int:
        """Commands accepted and not yet done."""
        ...

    @property
    def backlog_limit(self) -> int:
        """The most commands waiting in the partition before callers wait."""
        ...

    def has_room(self) -> bool:
        """Whether a caller may go ahead now: backlog below the limit, nobody waiting."""
        ...

    async def wait_for_room(self, *, take: bool = True) -> None:
        """Return once the backlog is below the limit, after the callers already waiting.

        With *take*, the caller takes its slot (``execute_local``) at once;
        without, the slot passes on (the command goes through the inbox).
        """
        ...

    async def execute_local(self, entries: Sequence[InboxEntry]) -> None:
        """Handle *entries* in the next batch; return once they are durable.

        Raises ``PartitionStopped`` if the partition stopped first.
        """
        ...


def idempotency_name(app_key: str) -> str:
    """The name of the application's idempotency marker keyspace."""
    return f"{app_key}/idempotency"


def command_id_for(app_key: str, idempotency_key: str) -> str:
    """The command ID derived from an idempotency key: ``uuid5(app_key, key)``."""
    return derived_id(app_key, idempotency_key)


class IdempotencyMarker(msgspec.Struct, frozen=True, kw_only=True):
    """Written under the command ID once a keyed command's effects are committed.

    ``first_offset``/``count`` locate the command's events on its partition
    stream (``None``/0 if it recorded none or they are unknown), so observers of
    a repeated submission can be given the original events.
    """

    completed_at: datetime
    partition: int
    first_offset: int | None = None
    count: int = 0


marker_decoder = msgspec.msgpack.Decoder(IdempotencyMarker)


async def prune_idempotency(provider: Provider, app_key: str, older_than: datetime) -> int:
    """Delete idempotency markers completed before *older_than*; return how many.

    After this, a command re-submitted with one of those keys may execute
    again: the retention period bounds how late a caller may safely retry.
    """
    pruned = 0
    ks = await provider.keyspaces.open(idempotency_name(app_key))
    async with ks, closing_iter(ks.range()) as markers:
        async for key, value, revision in markers:
            if marker_decoder.decode(value).completed_at >= older_than:
                continue
            try:
                await ks.set(key, b"", revision)
                pruned += 1
            except Conflict:
                pass  # re-marked meanwhile: keep it
    return pruned


marker_encoder = msgspec.msgpack.Encoder()


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _leaf_flags(group: BaseExceptionGroup[BaseException], flag: str) -> list[bool]:
    # The flag (retryable/ambiguous) of every leaf exception in a nested group.
    flags: list[bool] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            flags.extend(_leaf_flags(exc, flag))
        else:
            flags.append(bool(getattr(exc, flag, False)))
    return flags


def enabled_command_handler(app: ApplicationConfig, command_type: type) -> HandlerConfig:
    """The enabled handler of *command_type* in *app*; ``ValueError`` if there is none."""
    handler = app.command_handler(command_type)
    if handler is None or handler.disabled:
        raise ValueError(
            f"no handler of application {app.identity} consumes "
            f"{command_type.__module__}.{command_type.__qualname__}"
            + (f" ({handler.describe()} is disabled)" if handler is not None else "")
        )
    return handler


class Acceptor:
    """Routes commands to their partitions and makes them durable there."""

    def __init__(
        self,
        app: ApplicationConfig,
        partition_count: int,
        writers: Sequence[InboxWriter],
        *,
        local: Callable[[int], LocalPartition | None] = lambda _: None,
        remote: Callable[[int, list[InboxEntry], float | None], Awaitable[bool]] | None = None,
        wake: Callable[[int], None] | None = None,
        backlog_timeout: float = 30.0,
        routed: RoutedMessages | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.app = app
        # The longest aggregate instance ID, in bytes, whose journal name and
        # snapshot key the store takes, for every aggregate (None: not checked).
        self._id_room: int | None = None
        aggregates = app.enabled_handlers(HandlerKind.AGGREGATE)
        if limits is not None and aggregates:
            prefix = max(
                len(aggregate_name(app.identity.key, h.identity.key, "").encode())
                for h in aggregates
            )
            self._id_room = min(limits.max_name_bytes - prefix, limits.max_key_bytes)
        # Where routed aggregate commands wait for their handling on this node
        # (None: nothing is handled here, as in a client).
        self._routed = routed
        self.partition_count = partition_count
        self.writers = writers
        self._local = local
        self._remote = remote
        self._wake = wake
        self._backlog_timeout = backlog_timeout

    def handler_for(self, command_type: type) -> HandlerConfig:
        """The enabled handler of *command_type*; ``ValueError`` if there is none."""
        return enabled_command_handler(self.app, command_type)

    def route(self, envelope: Envelope, *, keyed: bool) -> tuple[int, InboxEntry]:
        """Return the partition and inbox entry of a command envelope.

        Aggregate routing is given its own decoded copy of the command (ADR-32),
        which the aggregate's handling takes if it runs on this node (Dogma
        hands routing and handling one message). Raises ``ValueError`` for a
        command no handler consumes or an empty instance ID, and whatever
        ``route_command_to_instance`` raises.
        """
        command = to_message(envelope)
        handler = self.handler_for(type(command))
        instance_id: str | None = None
        if handler.kind is HandlerKind.AGGREGATE:
            instance_id = handler.handler.route_command_to_instance(command)  # type: ignore[attr-defined]
            if not isinstance(instance_id, str) or not instance_id:
                raise ValueError(
                    f"{handler.describe()} routed {envelope.description!r} to instance "
                    f"{instance_id!r}; instance IDs must be non-empty strings"
                )
            # (A character is at most 4 bytes: most IDs need no encoding to pass.)
            if self._id_room is not None and len(instance_id) * 4 > self._id_room:
                self._check_fits(handler, envelope, instance_id, self._id_room)
            workload = instance_workload(handler.identity.key, instance_id)
            if self._routed is not None:
                self._routed.keep(envelope, command)
        elif handler.concurrency is dogma.ConcurrencyPreference.MINIMIZE:
            workload = handler.identity.key
        else:
            workload = envelope.message_id
        entry = InboxEntry(
            envelope=envelope,
            handler_key=handler.identity.key,
            instance_id=instance_id,
            keyed=keyed,
        )
        return partition_of(workload, self.partition_count), entry

    def _check_fits(
        self, handler: HandlerConfig, envelope: Envelope, instance_id: str, room: int
    ) -> None:
        """Refuse an instance ID whose journal name or snapshot key the store cannot take.

        Checked here, before anything is durable: found later, the store's
        refusal would be the same on every attempt, and the command would hold
        up its instance for good.
        """
        size = len(instance_id.encode())
        if size > room:
            raise ValueError(
                f"{handler.describe()} routed {envelope.description!r} to an instance ID of "
                f"{size} bytes; this store takes aggregate instance IDs of at most {room} "
                "bytes (the instance's journal name and snapshot key must fit its limits)"
            )

    async def accept(
        self, routed: Sequence[tuple[int, InboxEntry]], *, produced: bool = False
    ) -> bool:
        """Make routed commands durable; returns once every partition has them.

        Unless *produced* (commands from handlers), waits while a partition's
        backlog is over the limit, and raises ``Backlogged`` after
        ``backlog_timeout`` seconds. Returns whether any of them went to an
        inbox (to be handled by whoever owns the partition, soon or later)
        rather than into a batch that is now committed.
        """
        by_partition: dict[int, list[InboxEntry]] = {}
        for index, entry in routed:
            by_partition.setdefault(index, []).append(entry)
        if len(by_partition) == 1:
            [(index, entries)] = by_partition.items()
            return await self._accept_one(index, entries, produced=produced)
        queued: list[bool] = []

        async def one(index: int, entries: list[InboxEntry]) -> None:
            queued.append(await self._accept_one(index, entries, produced))

        try:
            async with anyio.create_task_group() as tg:
                for index, entries in by_partition.items():
                    tg.start_soon(one, index, entries)
        except ExceptionGroup as group:
            # Callers handle storage failures by type (a process outbox retries
            # them for ever, a handler error it would poison): when every
            # partition failed on storage, raise one PersistenceError, not a group.
            rest = group.subgroup(lambda e: not isinstance(e, PersistenceError | ExceptionGroup))
            if rest is not None:
                raise
            first = _first_leaf(group)
            raise PersistenceError(
                f"accepting commands on {len(by_partition)} partitions failed: {first}",
                retryable=all(_leaf_flags(group, "retryable")),
                ambiguous=any(_leaf_flags(group, "ambiguous")),
            ) from group
        return any(queued)

    async def _accept_one(self, index: int, entries: list[InboxEntry], produced: bool) -> bool:
        """Make *entries* durable on partition *index*; whether through its inbox."""
        local = self._local(index)
        if any(e.instance_id is None for e in entries):
            # An integration command is durable in a batch only once its
            # handle_command has returned, which may take as long as a call to
            # the outside world: a caller would wait for it (and deadlock if
            # the handler waits for something the caller does next), and a
            # process instance, locked while its outbox is sent, could not
            # handle its timeouts meanwhile. Integration commands are made
            # durable in the inbox instead (ADR 0011), whoever executes them.
            # A caller still waits for room on a partition this node runs
            # (its command takes a slot once the partition reads it back); one
            # for another node's partition does not (the owner holds it until
            # there is room, ADR 0011).
            if not produced and local is not None:
                await self._wait_for_room(index, local, take=False)
            await self._to_inbox(index, [e for e in entries if e.instance_id is None])
            rest = [e for e in entries if e.instance_id is not None]
            if rest:
                await self._accept_one(index, rest, produced)
            return True
        if local is not None:
            if not produced:
                await self._wait_for_room(index, local)
            try:
                await local.execute_local(entries)
                return False
            except PartitionStopped as stopped:
                # Ownership moved or the node is stopping: the inbox takes
                # those it did not commit.
                entries = stopped.spilled(entries)
        elif self._remote is not None:
            try:
                accepted = await self._offer(index, entries, produced)
            except PartitionStopped as stopped:  # the owner stopped: as above
                accepted, entries = False, stopped.spilled(entries)
            except OfferUnanswered as unanswered:  # the owner may have them
                accepted, entries = False, unanswered.spilled(entries)
            if accepted:
                # The owner took them into its batch and they are durable; it
                # handled them, so nothing here will take what routing kept.
                if self._routed is not None:
                    for entry in entries:
                        self._routed.discard(entry.envelope)
                return False
        if not entries:
            return False  # every one committed after all
        await self._to_inbox(index, entries)
        return True

    async def _offer(self, index: int, entries: list[InboxEntry], produced: bool) -> bool:
        """Offer *entries* to the partition's owner; whether it took them.

        A caller's commands wait for room there as they would here: the owner
        holds them while its backlog is at the limit and, if no room comes
        within the wait the offer allows, refuses them (``PartitionBusy``);
        they are offered again until ``backlog_timeout`` has passed.
        """
        assert self._remote is not None
        if produced:
            return await self._remote(index, entries, None)
        failures = 0
        deadline = anyio.current_time() + self._backlog_timeout
        while True:
            try:
                left = max(0.0, deadline - anyio.current_time())
                return await self._remote(index, entries, left)
            except PartitionBusy as busy:
                left = deadline - anyio.current_time()
                if left <= 0:
                    raise self._backlogged_remote(index, busy) from None
                failures += 1
                await anyio.sleep(min(left, backoff(failures, 0.005, 0.1)))

    def _backlogged_remote(self, index: int, busy: PartitionBusy) -> Backlogged:
        if busy.backlog is not None and busy.limit is not None:
            return self._backlogged(index, busy.backlog, busy.limit)
        return Backlogged(
            f"partition {index} of application {self.app.identity}: its owner had no room "
            f"for the command ({busy.reason}); waited {self._backlog_timeout:g} s"
        )

    def _backlogged(self, index: int, backlog: int, limit: int) -> Backlogged:
        return Backlogged(
            f"partition {index} of application {self.app.identity} has {backlog} "
            f"commands waiting (backlog limit {limit}, set by with_backlog_limit() or "
            f"DOGMA_BACKLOG_LIMIT); waited {self._backlog_timeout:g} s for room"
        )

    async def _to_inbox(self, index: int, entries: list[InboxEntry]) -> None:
        await self.writers[index].submit(entries)
        if self._wake is not None:
            self._wake(index)  # the owner reads its inbox now, not at its next poll

    async def _wait_for_room(self, index: int, local: LocalPartition, *, take: bool = True) -> None:
        if local.has_room():
            return
        with anyio.move_on_after(self._backlog_timeout) as waited:
            await local.wait_for_room(take=take)
        if waited.cancelled_caught:
            raise self._backlogged(index, local.backlog, local.backlog_limit)

    async def accept_envelopes(self, envelopes: Sequence[Envelope]) -> None:
        """Accept commands produced by handlers (``PartitionContext.accept``).

        Their IDs are deterministic, so they are deduplicated like keyed
        commands; they never wait for backlog room.
        """
        await self.accept([self.route(env, keyed=True) for env in envelopes], produced=True)
