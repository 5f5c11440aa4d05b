"""Aggregate instances: load (cache, snapshot, replay), handle, commit, deduplicate.

Each instance has a journal ``<app>/aggregate/<handler>/<instance>`` with one
``InstanceRecord`` per command that recorded events: the command ID and the
event envelopes. Appending it at the expected position is the commit point of a
handling; a ``Conflict`` means someone else committed first (or our own
ambiguous append landed), so the cached instance is dropped, reloaded and the
command tried again, where deduplication by command ID catches the second case.

Snapshots (``<app>/snapshot/<handler>``, keyed by instance ID) hold the root's
``marshal_binary()``, the journal position they cover and the IDs of the most
recent commands, so deduplication still works for commands the snapshot covers.
They are written every ``snapshot_every`` events, after the commit, and never
needed for correctness: a root that raises ``dogma.NotSupported`` (or whose
snapshot fails to load) is rebuilt by replaying its whole journal.

The caller (``commands``) guarantees one command at a time per instance.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any

import attrs
import msgspec
from anyio.abc import TaskGroup

import dogma

from ..config import HandlerConfig
from ..persistence import (
    Conflict,
    Journal,
    Keyspace,
    PersistenceError,
    Provider,
    RecordNotFound,
)
from ._handling import EventRecorder, handler_log
from .envelope import Envelope, to_message
from .inbox import InboxEntry
from .poison import HandlerBug

__all__ = [
    "AggregateInstances",
    "InstanceRecord",
    "SnapshotRecord",
    "aggregate_name",
    "snapshot_name",
]

_log = logging.getLogger("runkit.engine.aggregates")

#: Command IDs kept with each snapshot (and in memory) for deduplication.
RECENT_COMMANDS = 1000


def aggregate_name(app_key: str, handler_key: str, instance_id: str) -> str:
    """The name of an aggregate instance's journal."""
    return f"{app_key}/aggregate/{handler_key}/{instance_id}"


def snapshot_name(app_key: str, handler_key: str) -> str:
    """The name of an aggregate handler's snapshot keyspace."""
    return f"{app_key}/snapshot/{handler_key}"


class InstanceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The events one command recorded on an aggregate instance.

    ``inbox_position`` is where the command was accepted in its partition inbox
    (-1 if unknown); truncation uses it to tell that a record's command is done.
    """

    command_id: str
    events: tuple[Envelope, ...]
    inbox_position: int = -1


class SnapshotRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An aggregate root snapshot covering journal positions below ``position``.

    ``inbox_max`` is the highest inbox position of the commands it covers (-1 if
    unknown): once the partition has fully processed past it, the journal below
    ``position`` may be truncated.
    """

    position: int
    data: bytes
    recent: tuple[tuple[str, int], ...] = ()
    inbox_max: int = -1


_instance_encoder = msgspec.msgpack.Encoder()
_instance_decoder = msgspec.msgpack.Decoder(InstanceRecord)
_snapshot_decoder = msgspec.msgpack.Decoder(SnapshotRecord)


@attrs.define
class _Instance:
    handler: HandlerConfig
    instance_id: str
    journal: Journal
    root: Any
    next_position: int
    recent: OrderedDict[str, int]
    since_snapshot: int
    snapshot_revision: str
    begin: int = 0
    inbox_max: int = -1
    # Durable snapshots not yet truncated below: (position, inbox_max), oldest first.
    truncatable: list[tuple[int, int]] = attrs.Factory(list)
    snapshots: bool = True
    snapshot_pending: bool = False


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
        background: TaskGroup,
        truncate_before: Callable[[], int] | None = None,
    ) -> None:
        self._provider = provider
        self._app_key = app_key
        self._site_key = site_key
        self._clock = clock
        self._snapshot_every = snapshot_every
        self._cache_size = cache_size
        self._background = background
        # Inbox position below which every command is done (durably); None
        # disables truncation of instance journals.
        self._truncate_before = truncate_before
        self._cache: OrderedDict[tuple[str, str], _Instance] = OrderedDict()
        self._snapshots: dict[str, Keyspace] = {}

    async def close(self) -> None:
        """Close every open store handle and forget every cached instance."""
        for inst in self._cache.values():
            await inst.journal.close()
        self._cache.clear()
        for ks in self._snapshots.values():
            await ks.close()
        self._snapshots.clear()

    async def execute(
        self, handler: HandlerConfig, entry: InboxEntry, *, inbox_position: int = -1
    ) -> tuple[Envelope, ...]:
        """Handle *entry* on its instance unless already done; return its committed events.

        Returns the events the command recorded, now or in an earlier handling
        found in the instance's history (deduplication); empty if it recorded
        none, or if its record was truncated (then it is done and published).
        Raises ``HandlerBug`` for bugs, ``PersistenceError`` for storage faults,
        and whatever the handler raised.
        """
        instance_id = entry.instance_id
        if not instance_id:
            raise HandlerBug(f"{handler.describe()} routed a command to an empty instance ID")
        command_id = entry.envelope.message_id
        while True:
            inst = await self._load(handler, instance_id)
            previous = inst.recent.get(command_id)
            if previous is not None:
                if previous < inst.begin:
                    return ()  # truncated: only ever below fully processed commands
                try:
                    data = await inst.journal.get(previous)
                except RecordNotFound:
                    await self._drop(handler, instance_id)  # truncated elsewhere: reload
                    continue
                return _instance_decoder.decode(data).events
            recorder = EventRecorder(
                handler,
                entry.envelope,
                instance_id=instance_id,
                site_key=self._site_key,
                clock=self._clock,
            )
            command = to_message(entry.envelope)
            agg: Any = handler.handler
            try:
                agg.handle_command(inst.root, _Scope(recorder, inst.root), command)
                recorder.check()
            except dogma.UnexpectedMessage as exc:
                await self._drop(handler, instance_id)
                raise HandlerBug(f"{handler.describe()} raised UnexpectedMessage: {exc}") from exc
            except BaseException:
                # The root may be half-changed by recorded events: rebuild it next time.
                await self._drop(handler, instance_id)
                raise
            if not recorder.events:
                return ()
            events = tuple(recorder.events)
            data = _instance_encoder.encode(
                InstanceRecord(command_id=command_id, events=events, inbox_position=inbox_position)
            )
            try:
                await inst.journal.append(inst.next_position, data)
            except Conflict:
                _log.info(
                    "aggregate instance changed concurrently; reloading",
                    extra={"handler": handler.identity.name, "instance": instance_id},
                )
                await self._drop(handler, instance_id)
                continue
            except BaseException:
                await self._drop(handler, instance_id)
                raise
            self._committed(inst, command_id, len(events), inbox_position)
            return events

    def _committed(self, inst: _Instance, command_id: str, count: int, inbox: int) -> None:
        inst.inbox_max = -2 if inbox < 0 or inst.inbox_max == -2 else max(inst.inbox_max, inbox)
        inst.recent[command_id] = inst.next_position
        while len(inst.recent) > RECENT_COMMANDS:
            inst.recent.popitem(last=False)
        inst.next_position += 1
        inst.since_snapshot += count
        self._maybe_truncate(inst)
        due = inst.since_snapshot >= self._snapshot_every
        if due and inst.snapshots and not inst.snapshot_pending:
            self._snapshot(inst)

    def _snapshot(self, inst: _Instance) -> None:
        try:
            data = inst.root.marshal_binary()
        except (dogma.NotSupported, AttributeError):
            inst.snapshots = False
            return
        except Exception:
            _log.warning(
                "aggregate root snapshot failed; its history will be replayed instead",
                exc_info=True,
                extra={"handler": inst.handler.identity.name, "instance": inst.instance_id},
            )
            inst.since_snapshot = 0
            return
        record = SnapshotRecord(
            position=inst.next_position,
            data=bytes(data),
            recent=tuple(inst.recent.items()),
            inbox_max=inst.inbox_max,
        )
        inst.snapshot_pending = True
        inst.since_snapshot = 0
        self._background.start_soon(self._write_snapshot, inst, record)

    async def _write_snapshot(self, inst: _Instance, record: SnapshotRecord) -> None:
        try:
            ks = await self._snapshot_keyspace(inst.handler.identity.key)
            inst.snapshot_revision = await ks.set(
                inst.instance_id.encode(), _instance_encoder.encode(record), inst.snapshot_revision
            )
            inst.truncatable = [*inst.truncatable[-3:], (record.position, record.inbox_max)]
        except Conflict:
            # Someone else wrote one (a previous owner); learn its revision next load.
            await self._drop(inst.handler, inst.instance_id, close=False)
        except PersistenceError as exc:
            _log.warning(
                "writing an aggregate snapshot failed: %s",
                exc,
                extra={"handler": inst.handler.identity.name, "instance": inst.instance_id},
            )
        finally:
            await self._background_done(inst)

    def _maybe_truncate(self, inst: _Instance) -> None:
        # Truncate below the durable snapshot once every command it covers is
        # done: the partition's durable progress is past all their inbox
        # positions, so they are published (and marked, if keyed) and nothing
        # will look their records up again. -2 means "some position unknown".
        if self._truncate_before is None or inst.snapshot_pending or not inst.truncatable:
            return
        done = self._truncate_before()
        # Snapshots that any later one covers too; the newest whose commands are all done.
        ready = [p for p, inbox_max in inst.truncatable if 0 <= inbox_max < done]
        if not ready or ready[-1] <= inst.begin:
            return
        position = ready[-1]
        inst.truncatable = [t for t in inst.truncatable if t[0] > position]
        inst.snapshot_pending = True  # also keeps the journal handle open meanwhile
        self._background.start_soon(self._truncate, inst, position)

    async def _truncate(self, inst: _Instance, position: int) -> None:
        try:
            await inst.journal.truncate(position)
            inst.begin = position
        except PersistenceError as exc:
            _log.warning(
                "truncating an aggregate journal failed: %s",
                exc,
                extra={"handler": inst.handler.identity.name, "instance": inst.instance_id},
            )
        finally:
            await self._background_done(inst)

    async def _background_done(self, inst: _Instance) -> None:
        inst.snapshot_pending = False
        if self._cache.get((inst.handler.identity.key, inst.instance_id)) is not inst:
            await inst.journal.close()  # evicted or dropped meanwhile

    async def _snapshot_keyspace(self, handler_key: str) -> Keyspace:
        ks = self._snapshots.get(handler_key)
        if ks is None:
            ks = await self._provider.keyspaces.open(snapshot_name(self._app_key, handler_key))
            self._snapshots[handler_key] = ks
        return ks

    async def _drop(self, handler: HandlerConfig, instance_id: str, *, close: bool = True) -> None:
        inst = self._cache.pop((handler.identity.key, instance_id), None)
        if inst is not None and close and not inst.snapshot_pending:
            await inst.journal.close()

    async def _load(self, handler: HandlerConfig, instance_id: str) -> _Instance:
        key = (handler.identity.key, instance_id)
        inst = self._cache.get(key)
        if inst is not None:
            self._cache.move_to_end(key)
            return inst
        journal = await self._provider.journals.open(
            aggregate_name(self._app_key, handler.identity.key, instance_id)
        )
        try:
            inst = await self._rebuild(handler, instance_id, journal)
        except BaseException:
            await journal.close()
            raise
        self._cache[key] = inst
        while len(self._cache) > self._cache_size:
            _, old = self._cache.popitem(last=False)
            if not old.snapshot_pending:
                await old.journal.close()
        return inst

    async def _rebuild(
        self, handler: HandlerConfig, instance_id: str, journal: Journal
    ) -> _Instance:
        bounds = await journal.bounds()
        ks = await self._snapshot_keyspace(handler.identity.key)
        value, revision = await ks.get(instance_id.encode())
        root = _new_root(handler)
        start = bounds.begin
        recent: OrderedDict[str, int] = OrderedDict()
        snapshots = True
        inbox_max = -1 if bounds.begin == 0 else -2
        truncatable: list[tuple[int, int]] = []
        restored = False
        if value:
            snap = _snapshot_decoder.decode(value)
            truncatable.append((snap.position, snap.inbox_max))
            if bounds.begin <= snap.position <= bounds.end:
                try:
                    root.unmarshal_binary(snap.data)
                    restored = True
                    start = snap.position
                    recent.update(snap.recent)
                    inbox_max = snap.inbox_max
                except (dogma.NotSupported, AttributeError):
                    root, snapshots = _new_root(handler), False
                except Exception:
                    _log.warning(
                        "aggregate snapshot did not load; replaying the history instead",
                        exc_info=True,
                        extra={"handler": handler.identity.name, "instance": instance_id},
                    )
                    root = _new_root(handler)
        if start == bounds.begin and bounds.begin > 0 and not restored:
            raise RuntimeError(
                f"aggregate instance {instance_id} of {handler.describe()}: journal truncated "
                f"below {bounds.begin} and no usable snapshot"
            )
        since = 0
        next_position = start
        if start < bounds.end:
            async for position, data in journal.range(start):
                next_position = position + 1
                record = _instance_decoder.decode(data)
                if record.inbox_position < 0 or inbox_max == -2:
                    inbox_max = -2
                else:
                    inbox_max = max(inbox_max, record.inbox_position)
                for env in record.events:
                    root.apply_event(to_message(env))
                since += len(record.events)
                recent[record.command_id] = position
                if len(recent) > RECENT_COMMANDS:
                    recent.popitem(last=False)
        return _Instance(
            handler=handler,
            instance_id=instance_id,
            journal=journal,
            root=root,
            next_position=next_position,
            recent=recent,
            since_snapshot=since,
            snapshot_revision=revision,
            begin=bounds.begin,
            inbox_max=inbox_max,
            truncatable=truncatable,
            snapshots=snapshots,
        )


def _new_root(handler: HandlerConfig) -> Any:
    root = handler.handler.new()  # type: ignore[attr-defined]
    if root is None:
        raise HandlerBug(f"{handler.describe()}: new() returned None")
    return root
