"""Derived process instance records, written behind the home partition's stream (ADR 0010).

With steps committed in the home partition's stream, the keyspace record
``<app>/process/<handler>/<instance>`` is derived state, as aggregate instance
journals are (ADR 0007, 0009). ``ProcessRecords`` keeps, per instance homed
on the partition, its latest *durable* state not yet written, writes it late
and coalesced (once it has waited ``delay``: a busy instance is written about
once per delay, whatever its rate of steps), and says how far the stream is
materialised (``watermark``: the position of the oldest step not yet written).

- **Monotonic.** A record is replaced only by one further through the stream
  (``ProcessRecord.through``): a read and a conditional ``set``; a conflict
  reads again. A stale owner never replaces a newer owner's record.
- **Loading** (``load``): an instance with an unwritten state gets it; others
  get the stored record. A record of the ADR 0006 design may hold an outbox:
  it is dispatched first (by *dispatch_outbox*), as that design's loads did.
- **Takeover** (``recover_from``): the steps in the stream from the
  materialised watermark on are folded over the stored records (the record's
  ``through`` tells which are in it already) before the partition takes any
  delivery, and the outboxes of the records from the ``dispatched``
  watermark on are returned, to be dispatched again. Every process's steps,
  whether this node runs it or not (disabled, or not in this version of the
  application during a rolling upgrade): a record needs no handler, and
  passing them over would move the watermark past state no record holds.
- **Bounded**: at ``QUEUE_LIMIT`` unwritten states the oldest are written at
  once, whatever their age; record revisions are remembered for the
  ``REVISIONS_KEPT`` most recently used instances; an instance ID the store
  cannot key (its steps were poisoned) gets no record.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import anyio
import attrs
import msgspec
from anyio.abc import TaskStatus

from ...persistence import (
    Conflict,
    Journal,
    Keyspace,
    LimitExceeded,
    PersistenceError,
    Provider,
)
from ..backoff import backoff
from ..envelope import closing_iter
from ..logs import RateLimitedLog, describe_error
from ..signals import event_maker
from ..streams import ProcessStep, decode_stream_record
from .process_instances import ProcessRecord
from .process_state import InstanceState
from .process_stores import process_store_name

__all__ = ["ProcessRecords", "RecoveredOutbox"]

_log = logging.getLogger("runkit.engine.events.process_records")
_retry_log = RateLimitedLog(_log, 10.0)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ProcessRecord)

#: Unwritten instances that make a round start at once.
QUEUE_LIMIT = 10_000
#: Record revisions remembered (most recently used), so that a write needs no
#: read first; a forgotten one costs a read. Bounded: most instances (a
#: transaction each) are written once and never again.
REVISIONS_KEPT = 10_000

_Key = tuple[str, str]


@attrs.define(eq=False)
class _Unwritten:
    state: InstanceState
    #: The stream position of the oldest step not yet written.
    first: int
    queued_at: float


@attrs.frozen
class RecoveredOutbox:
    """A committed step's outbox found at takeover, to dispatch again."""

    position: int
    step: ProcessStep


class ProcessRecords:
    """The derived keyspace records of one partition's process instances (module docstring)."""

    def __init__(
        self,
        provider: Provider,
        app_key: str,
        *,
        delay: float,
        retry_max_delay: float,
        dispatch_outbox: Callable[[str, str, ProcessRecord], Awaitable[None]] | None = None,
    ) -> None:
        self._provider = provider
        self._app_key = app_key
        self._delay = delay
        self._retry_max_delay = retry_max_delay
        self._dispatch_outbox = dispatch_outbox
        self._unwritten: OrderedDict[_Key, _Unwritten] = OrderedDict()
        # The least ``first`` of ``_unwritten`` (``None``: to be computed). Asked
        # for at every stream write; it only grows when a round writes records.
        self._first: int | None = None
        self._revisions: OrderedDict[_Key, str] = OrderedDict()
        self._stores: dict[str, Keyspace] = {}
        self._new_event = event_maker()
        self._wake = self._new_event()
        self.records_written = 0

    # -- what the home partition tells ---------------------------------------------

    def committed(
        self, handler_key: str, instance_id: str, state: InstanceState, position: int
    ) -> None:
        """A step of the instance at stream *position* is durable; *state* includes it."""
        key = (handler_key, instance_id)
        found = self._unwritten.get(key)
        if found is None:
            if len(instance_id.encode()) > self._provider.limits.max_key_bytes:
                # Its steps were poisoned (the store cannot key it): no record.
                return
            self._unwritten[key] = _Unwritten(state, position, anyio.current_time())
            if self._first is not None and position < self._first:
                self._first = position
            self._wake.set()
        else:
            found.state = state

    def watermark(self, next_position: int) -> int:
        """The stream position below which every process step is in its keyspace record."""
        if not self._unwritten:
            return next_position
        if self._first is None:
            self._first = min(u.first for u in self._unwritten.values())
        return self._first

    @property
    def backlog(self) -> int:
        """Instances whose latest durable state is not written yet."""
        return len(self._unwritten)

    # -- loading ------------------------------------------------------------------

    async def load(self, handler_key: str, instance_id: str) -> InstanceState:
        """The instance's committed state: unwritten, or as stored."""
        found = self._unwritten.get((handler_key, instance_id))
        if found is not None:
            return found.state
        record = await self._read(handler_key, instance_id)
        if record.has_outbox and self._dispatch_outbox is not None:
            # Written by the ADR 0006 design: perhaps never dispatched.
            await self._dispatch_outbox(handler_key, instance_id, record)
        return InstanceState.of_record(record)

    async def _read(self, handler_key: str, instance_id: str) -> ProcessRecord:
        store = await self._store(handler_key)
        data, revision = await store.get(instance_id.encode())
        self._remember((handler_key, instance_id), revision)
        return _decoder.decode(data) if data else ProcessRecord()

    def _remember(self, key: _Key, revision: str) -> None:
        self._revisions[key] = revision
        self._revisions.move_to_end(key)
        if len(self._revisions) > REVISIONS_KEPT:
            self._revisions.popitem(last=False)

    async def _store(self, handler_key: str) -> Keyspace:
        store = self._stores.get(handler_key)
        if store is None:
            name = process_store_name(self._app_key, handler_key)
            store = self._stores[handler_key] = await self._provider.keyspaces.open(name)
        return store

    # -- takeover -----------------------------------------------------------------

    async def recover_from(
        self, journal: Journal, *, materialised: int, dispatched: int | None, end: int
    ) -> list[RecoveredOutbox]:
        """Fold the steps of stream records from *materialised* to *end* over the stored records.

        Returns the outboxes of the steps in records from *dispatched* on (in
        stream order), which the previous owner may not have dispatched.
        """
        start = materialised if dispatched is None else min(materialised, dispatched)
        if start >= end:
            return []
        steps: dict[_Key, list[tuple[tuple[int, int], ProcessStep]]] = {}
        outboxes: list[RecoveredOutbox] = []
        begin = max(start, (await journal.bounds()).begin)
        async with closing_iter(journal.range(begin)) as records:
            async for position, data in records:
                if position >= end:
                    break
                record = decode_stream_record(data)
                for index, step in enumerate(record.steps):
                    if position >= materialised:
                        key = (step.handler_key, step.instance_id)
                        steps.setdefault(key, []).append(((position, index), step))
                    if dispatched is not None and position >= dispatched and step.has_outbox:
                        outboxes.append(RecoveredOutbox(position, step))
        now = anyio.current_time()
        for (handler_key, instance_id), found in steps.items():
            try:
                stored = await self._read(handler_key, instance_id)
            except LimitExceeded:
                continue  # an ID the store cannot key: its steps were poisoned, no record
            state = InstanceState.of_record(stored)
            for at, step in found:
                state = state.after(step, at)
            first = found[0][0][0]
            self._unwritten[(handler_key, instance_id)] = _Unwritten(state, first, now)
        self._first = None
        if steps:
            self._wake.set()
        return outboxes

    # -- writing ------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write unwritten states as they age, until cancelled."""
        task_status.started()
        try:
            while True:
                if not self._unwritten:
                    await self._wake.wait()
                    self._wake = self._new_event()
                    continue
                oldest = next(iter(self._unwritten.values()))
                wait = oldest.queued_at + self._delay - anyio.current_time()
                if wait > 0 and len(self._unwritten) < QUEUE_LIMIT:
                    await anyio.sleep(min(wait, self._delay))
                    continue
                # Due, or too many waiting: the oldest goes now whatever its age
                # (a round that wrote nothing would go round again at once).
                await self._round(max(anyio.current_time() - self._delay, oldest.queued_at))
        finally:
            await self._close()

    async def flush(self) -> None:
        """Write every unwritten state now (at shutdown)."""
        try:
            await self._round(math.inf)
        finally:
            await self._close()

    async def _round(self, queued_before: float) -> None:
        due = [(key, u) for key, u in self._unwritten.items() if u.queued_at <= queued_before]
        for key, unwritten in due:
            state = unwritten.state
            await self._write_retrying(key, state)
            self.records_written += 1
            if unwritten.state is state:
                del self._unwritten[key]
            else:
                # Steps came meanwhile: they are after the one written.
                assert state.through is not None
                unwritten.first = state.through[0]
                unwritten.queued_at = anyio.current_time()
                self._unwritten.move_to_end(key)
            self._first = None  # the entry went or moved up: computed when next asked

    async def _write_retrying(self, key: _Key, state: InstanceState) -> None:
        failures = 0
        while True:
            try:
                await self._write(key, state)
                return
            except LimitExceeded as exc:
                # The same on every attempt; the steps were checked against the
                # store's limits before they committed, so an estimate fell
                # short. Retrying would stop every record behind it for good.
                _log.error(
                    "process record %s/%r cannot be stored, so it is not written (a new "
                    "owner rebuilds the instance without the steps since its last "
                    "record): %s",
                    key[0],
                    key[1],
                    describe_error(exc),
                )
                return
            except PersistenceError as exc:
                failures += 1
                _retry_log.warning(
                    key,
                    "writing process record %s/%r failed; retrying: %s",
                    key[0],
                    key[1],
                    describe_error(exc),
                )
                await anyio.sleep(backoff(failures, 0.02, self._retry_max_delay))

    async def _write(self, key: _Key, state: InstanceState) -> None:
        """Store *state*'s record unless the stored one is as far through the stream."""
        store = await self._store(key[0])
        revision = self._revisions.get(key)
        while True:
            if revision is None:
                data, revision = await store.get(key[1].encode())
                stored = _decoder.decode(data) if data else None
                if (
                    stored is not None
                    and stored.through is not None
                    and state.through is not None
                    and stored.through >= state.through
                ):
                    self._remember(key, revision)
                    return  # a later owner wrote further
            try:
                written = await store.set(
                    key[1].encode(), _encoder.encode(state.record()), revision
                )
                self._remember(key, written)
                return
            except Conflict:
                revision = None
            except BaseException:
                self._revisions.pop(key, None)  # unknown whether it landed
                raise

    async def _close(self) -> None:
        stores, self._stores = self._stores, {}
        for store in stores.values():
            try:
                await store.close()
            except PersistenceError as exc:
                _log.debug("closing a process record store failed: %s", exc)
