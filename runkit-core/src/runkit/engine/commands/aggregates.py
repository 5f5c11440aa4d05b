"""Aggregate instances on the partition owner: cached roots, handling, rebuilding.

The partition stream is the commit point of aggregate state (ADR 0007): the
owner handles a command against the instance's cached root, and the command's
events are committed when the stream record holding them is appended. The
instance journals ``<app>/aggregate/<handler>/<instance>`` and the snapshots in
``<app>/snapshot/<handler>`` are *derived* state, written in the background by
the ``Materialiser`` (``materialiser.py``) after the stream commit.

A root is rebuilt (cache miss, or after a handler failure left it half
changed) from its snapshot, its instance journal after the snapshot, and the
committed records the materialiser has not written yet (kept here, per
instance, until they are in the journal; a new owner collects them from the
stream tail after the materialised watermark). Deduplication by command ID uses
the instance's recent command IDs, which cover every command the rebuilt state
includes.

Handling is synchronous (aggregate handlers are), so the partition's batch
loop calls ``handle`` for a cached instance without a task or an await; only a
cache miss needs I/O (``load``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import anyio
import attrs

import dogma

from ...config import HandlerConfig
from ...persistence import Journal, Keyspace, PersistenceError, Provider, RecordNotFound
from ..envelope import Envelope, RoutedMessages, closing_iter, to_message
from ..streams import max_command_bytes
from ._handling import EventRecorder, handler_log
from .inbox import InboxEntry
from .instance_records import (
    Committed,
    Mark,
    aggregate_name,
    follows,
    instance_decoder,
    mark,
    snapshot_decoder,
    snapshot_name,
)
from .poison import HandlerBug

__all__ = ["AggregateInstances", "Instance"]

_log = logging.getLogger("runkit.engine.commands.aggregates")

#: Command IDs kept with each snapshot (and in memory) for deduplication.
RECENT_COMMANDS = 1000

#: Reads of an instance's journal bounds and snapshot before a rebuild gives up
#: (for a retry) because the materialiser kept writing the instance meanwhile.
_SNAPSHOT_RACES = 3

#: Journals a rebuild opened, kept for the materialiser's next write to them.
HANDED_JOURNALS = 256

#: An open instance journal with its end and the ``Mark`` of its last command
#: (end -1: unknown; last ``None``: empty or unknown).
OpenJournal = tuple[Journal, int, "Mark | None"]


@attrs.define(eq=False)
class Instance:
    """A cached aggregate root and what deduplication needs."""

    handler: HandlerConfig
    instance_id: str
    root: Any
    #: Recent command IDs -> where their events are on the stream (first offset,
    #: count), when known: a repeated command's observers get them again.
    recent: OrderedDict[str, tuple[int, int] | None]
    since_snapshot: int = 0
    snapshots: bool = True

    def remember(self, command_id: str, location: tuple[int, int] | None = None) -> None:
        self.recent[command_id] = location
        if len(self.recent) > RECENT_COMMANDS:
            self.recent.popitem(last=False)


class _Scope:
    """The ``dogma.AggregateCommandScope`` given to ``handle_command``."""

    def __init__(self, recorder: EventRecorder, root: Any) -> None:
        self._recorder = recorder
        self._root = root

    @property
    def instance_id(self) -> str:
        assert self._recorder.instance_id is not None
        return self._recorder.instance_id

    def now(self) -> datetime:
        return self._recorder.clock()

    def log(self, fmt: str, *args: object) -> None:
        r = self._recorder
        handler_log(r.handler, r.command, r.instance_id, fmt, args)

    def record_event(self, event: dogma.Event) -> None:
        env = self._recorder.record(event)
        # Apply an independent copy (ADR-32): the handler keeps its object.
        self._root.apply_event(to_message(env))


#: ``handle``'s answer for a command the instance has already handled.
DUPLICATE: tuple[Envelope, ...] | None = None


class AggregateInstances:
    """The aggregate instances of one partition, cached while the partition is owned."""

    def __init__(
        self,
        provider: Provider,
        app_key: str,
        *,
        site_key: str | None,
        clock: Callable[[], datetime],
        snapshot_every: int,
        cache_size: int,
        routed: RoutedMessages | None = None,
    ) -> None:
        self._provider = provider
        # Commands routed on this node: the handling takes the routed object.
        self._routed = routed if routed is not None else RoutedMessages()
        self._app_key = app_key
        self._site_key = site_key
        self._clock = clock
        self._snapshot_every = snapshot_every
        self._cache_size = cache_size
        self._max_event_bytes = max_command_bytes(provider.limits.max_record_bytes)
        self._cache: OrderedDict[tuple[str, str], Instance] = OrderedDict()
        # Committed records not yet in their instance journal, per instance.
        self._unwritten: dict[tuple[str, str], deque[Committed]] = {}
        self._snapshots: dict[str, Keyspace] = {}
        # Journals rebuilds opened: a rebuilt instance is usually written next,
        # and its journal's end is known, so the materialiser need not open it
        # and read its bounds again (two store calls per new instance).
        self._opened: OrderedDict[tuple[str, str], OpenJournal] = OrderedDict()

    async def close(self) -> None:
        """Close store handles and forget every cached instance."""
        self._cache.clear()
        for ks in self._snapshots.values():
            await ks.close()
        self._snapshots.clear()
        while self._opened:
            _, (journal, _, _) = self._opened.popitem()
            await journal.close()

    def take_journal(self, key: tuple[str, str]) -> OpenJournal | None:
        """The instance journal a rebuild left open (the caller closes it), or ``None``."""
        return self._opened.pop(key, None)

    # -- the batch loop's side -------------------------------------------------

    def cached(self, handler: HandlerConfig, instance_id: str) -> Instance | None:
        """The cached instance, or ``None`` (then ``load`` it)."""
        key = (handler.identity.key, instance_id)
        inst = self._cache.get(key)
        if inst is not None:
            self._cache.move_to_end(key)
        return inst

    def handle(self, inst: Instance, entry: InboxEntry) -> tuple[Envelope, ...] | None:
        """Handle *entry* on *inst*'s root; return its events, or ``None`` for a duplicate.

        The caller must commit the events (``committed``) before handling the
        next command of the instance, or ``drop`` the instance. Raises
        ``HandlerBug`` for bugs and whatever the handler raised; the root may
        then be half changed, so the instance is dropped from the cache.
        """
        command_id = entry.envelope.message_id
        if command_id in inst.recent:
            return DUPLICATE
        handler = inst.handler
        recorder = EventRecorder(
            handler,
            entry.envelope,
            instance_id=inst.instance_id,
            site_key=self._site_key,
            clock=self._clock,
            max_bytes=self._max_event_bytes,
        )
        agg: Any = handler.handler
        try:
            command = self._routed.take(entry.envelope)
            agg.handle_command(inst.root, _Scope(recorder, inst.root), command)
            recorder.check()
        except dogma.UnexpectedMessage as exc:
            self.drop(handler, inst.instance_id)
            raise HandlerBug(f"{handler.describe()} raised UnexpectedMessage: {exc}") from exc
        except Exception as exc:
            self.drop(handler, inst.instance_id)
            failure = recorder.failure(exc)
            if failure is exc:
                raise
            raise failure from exc
        except BaseException:
            self.drop(handler, inst.instance_id)
            raise
        return tuple(recorder.events)

    def committed(
        self,
        inst: Instance,
        entry: InboxEntry,
        events: tuple[Envelope, ...],
        *,
        inbox_position: int,
    ) -> Committed:
        """Record that *entry* was handled on *inst* with *events* (queued for the stream).

        Returns the record the materialiser must write once it is durable: a
        command that recorded no events too, or a rebuilt instance would not
        know its ID, and the command, retried, would be handled again.
        """
        command_id = entry.envelope.message_id
        inst.remember(command_id)
        record = Committed(command_id, events, inbox_position)
        # A command without events counts as one: an instance that mostly
        # refuses commands must still be snapshotted (and its journal truncated).
        inst.since_snapshot += len(events) or 1
        if inst.snapshots and inst.since_snapshot >= self._snapshot_every:
            record.snapshot = self._snapshot_of(inst)
        key = (inst.handler.identity.key, inst.instance_id)
        self._unwritten.setdefault(key, deque()).append(record)
        return record

    def recovered(self, handler_key: str, instance_id: str, record: Committed) -> None:
        """Add a durable record a new owner found in the stream tail, not yet written."""
        self._unwritten.setdefault((handler_key, instance_id), deque()).append(record)

    def written(self, handler_key: str, instance_id: str, records: list[Committed]) -> None:
        """The materialiser wrote *records* (the oldest unwritten ones) of an instance."""
        key = (handler_key, instance_id)
        queue = self._unwritten.get(key)
        if queue is None:
            return
        done = {id(r) for r in records}
        while queue and id(queue[0]) in done:
            queue.popleft()
        if not queue:
            del self._unwritten[key]

    def located(self, key: tuple[str, str], command_id: str, location: tuple[int, int]) -> None:
        """A command's events on this instance are durable at *location* (for redelivery)."""
        inst = self._cache.get(key)
        if inst is not None and command_id in inst.recent:
            inst.recent[command_id] = location

    def location(self, key: tuple[str, str], command_id: str) -> tuple[int, int] | None:
        """Where a recent command's events are on the stream, if the cached instance knows."""
        inst = self._cache.get(key)
        return None if inst is None else inst.recent.get(command_id)

    def drop(self, handler: HandlerConfig, instance_id: str) -> None:
        """Forget a cached root (it is rebuilt on next use)."""
        self._cache.pop((handler.identity.key, instance_id), None)

    def _snapshot_of(self, inst: Instance) -> tuple[bytes, tuple[str, ...]] | None:
        try:
            data = inst.root.marshal_binary()
        except (dogma.NotSupported, AttributeError):
            inst.snapshots = False
            return None
        except Exception:
            _log.warning(
                "aggregate root snapshot of %s instance %s failed; its history will be "
                "replayed instead",
                inst.handler.identity.name,
                inst.instance_id,
                exc_info=True,
            )
            inst.since_snapshot = 0
            return None
        inst.since_snapshot = 0
        return bytes(data), tuple(inst.recent)

    # -- loading -----------------------------------------------------------------

    async def load(self, handler: HandlerConfig, instance_id: str) -> Instance:
        """Return the instance, rebuilding it if it is not cached."""
        inst = self.cached(handler, instance_id)
        if inst is not None:
            return inst
        key = (handler.identity.key, instance_id)
        # Take the unwritten records before reading the journal: a record the
        # materialiser writes meanwhile is then seen in one or the other (or
        # both, and deduplicated by command ID), never in neither.
        unwritten = list(self._unwritten.get(key, ()))
        inst, journaled = await self._rebuild(handler, instance_id)
        for record in unwritten:
            # In the journal already: by stream order, not only by the
            # recent IDs, which keep the last 1,000 (a backlog of more would
            # be applied twice, its older part deduplicated by nothing).
            if record.durable and journaled is not None and not follows(mark(record), journaled):
                continue
            if record.command_id in inst.recent:
                continue
            for env in record.events:
                inst.root.apply_event(to_message(env))
            inst.remember(record.command_id, _location(record.stream_offset, record.events))
            inst.since_snapshot += len(record.events) or 1
        existing = self._cache.get(key)
        if existing is not None:
            return existing  # loaded concurrently; keep the first
        self._cache[key] = inst
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return inst

    async def snapshot_keyspace(self, handler_key: str) -> Keyspace:
        """The handler's snapshot keyspace (opened once per partition)."""
        ks = self._snapshots.get(handler_key)
        if ks is None:
            ks = await self._provider.keyspaces.open(snapshot_name(self._app_key, handler_key))
            self._snapshots[handler_key] = ks
        return ks

    async def _rebuild(
        self, handler: HandlerConfig, instance_id: str
    ) -> tuple[Instance, Mark | None]:
        """The instance from its snapshot and journal, and its journal's last command's mark.

        The mark is ``None`` for an empty journal or one whose records do
        not know their offsets (written before stream offsets were recorded).
        """
        journal = await self._provider.journals.open(
            aggregate_name(self._app_key, handler.identity.key, instance_id)
        )
        try:
            inst, opened = await self._replay(journal, handler, instance_id)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await journal.close()
            raise
        key = (handler.identity.key, instance_id)
        stale = self._opened.pop(key, None)
        self._opened[key] = opened
        while len(self._opened) > HANDED_JOURNALS:
            _, (oldest, _, _) = self._opened.popitem(last=False)
            await oldest.close()
        if stale is not None:
            await stale[0].close()
        last = opened[2]
        return inst, last if last is not None and last[0] >= 0 else None

    async def _replay(
        self, journal: Journal, handler: HandlerConfig, instance_id: str
    ) -> tuple[Instance, OpenJournal]:
        for _ in range(_SNAPSHOT_RACES):
            bounds = await journal.bounds()
            value = b""
            if bounds.end > 0:
                # A snapshot is written only after a journal record, and
                # truncation keeps the last record: an empty journal has none.
                ks = await self.snapshot_keyspace(handler.identity.key)
                value, _ = await ks.get(instance_id.encode())
            # The bounds come first: truncation follows the snapshot it keeps,
            # so the snapshot read is never below them. One past their end was
            # written (after its append) since they were read: read both again.
            if not value or snapshot_decoder.decode(value).position <= bounds.end:
                break
        else:
            raise PersistenceError(
                f"aggregate instance {instance_id} of {handler.describe()}: its journal "
                "kept moving while it was read (retrying)",
                retryable=True,
            )
        root = _new_root(handler)
        start = bounds.begin
        recent: OrderedDict[str, tuple[int, int] | None] = OrderedDict()
        snapshots, restored = True, False
        if value:
            snap = snapshot_decoder.decode(value)
            if bounds.begin <= snap.position <= bounds.end:
                try:
                    root.unmarshal_binary(snap.data)
                    restored = True
                    start = snap.position
                    recent.update((cid, None) for cid, _ in snap.recent)
                except (dogma.NotSupported, AttributeError):
                    root, snapshots = _new_root(handler), False
                except Exception:
                    _log.warning(
                        "aggregate snapshot of %s instance %s did not load; replaying "
                        "the history instead",
                        handler.identity.name,
                        instance_id,
                        exc_info=True,
                    )
                    root = _new_root(handler)
        if start == bounds.begin and bounds.begin > 0 and not restored:
            raise RuntimeError(
                f"aggregate instance {instance_id} of {handler.describe()}: journal "
                f"truncated below {bounds.begin} and no usable snapshot"
            )
        inst = Instance(handler, instance_id, root, recent, snapshots=snapshots)
        # The journal's end and its last record's stream offset, for the
        # materialiser: known if empty or read to the end here.
        end = 0 if bounds.end == 0 else -1
        last: Mark | None = None
        if start == bounds.end > 0:
            # The snapshot covers the whole journal: its last record (which
            # truncation keeps) still says how far the journal goes.
            try:
                end = bounds.end
                last = instance_decoder.decode(await journal.get(end - 1)).last_mark
            except RecordNotFound:
                end = -1
        elif start < bounds.end:
            async with closing_iter(journal.range(start)) as records:
                async for position, data in records:
                    record = instance_decoder.decode(data)
                    for command in record.commands():
                        replay(inst, command.events)
                        if not command.events:
                            inst.since_snapshot += 1
                        inst.remember(
                            command.command_id, _location(command.stream_offset, command.events)
                        )
                    end, last = position + 1, record.last_mark
        return inst, (journal, end, last)


def _location(offset: int, events: tuple[Envelope, ...]) -> tuple[int, int] | None:
    return (offset, len(events)) if offset >= 0 else None


def replay(inst: Instance, events: Iterable[Envelope]) -> None:
    """Apply stored events to a root being rebuilt."""
    for env in events:
        inst.root.apply_event(to_message(env))
        inst.since_snapshot += 1


def _new_root(handler: HandlerConfig) -> Any:
    root = handler.handler.new()  # type: ignore[attr-defined]
    if root is None:
        raise HandlerBug(f"{handler.describe()}: new() returned None")
    return root
