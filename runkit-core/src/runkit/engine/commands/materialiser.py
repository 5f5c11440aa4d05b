"""The materialiser: derived aggregate state written behind the partition stream.

Once a stream record is durable, the aggregate commands it commits are copied
into their instance journals with their events (those that recorded none too,
named in the record's ``event_less``, so that a rebuilt instance knows their
IDs); a snapshot the batch loop captured with a command is
written after the record holding that command.
Nothing here is a commit point (the stream is, ADR 0007), so every write may be
repeated or lost:

- An instance's commands carry where they are in stream order (offset, and for
  event-less ones the stream position and index too: ``instance_records.follows``);
  a command is appended only if it follows the journal's last one. Two owners
  (or an ambiguous append followed by a retry) therefore never write it twice.
- Each stream record header carries the *materialised watermark*: the stream
  journal position below which every aggregate command is in its instance
  journal. A new owner reads the stream from there (``recover``) and writes
  what is missing, and its instances are rebuilt from snapshot + journal + those
  records meanwhile.
- A snapshot records the instance journal position it covers, and replaces
  only one covering less (read, then a conditional write): a stale owner's
  older snapshot never replaces a newer one below which the journal may
  already be truncated.

Writes are late and coalesced (ADR 0009): a record is written once it has been
queued for ``delay`` seconds (sooner when ``QUEUE_LIMIT`` records are queued),
and with it every later durable record of the same instance, as *one* journal
record (``InstanceRecord.more``), split only after a command that carries a
snapshot and where a record would exceed ``GROUP_LIMIT`` commands or the
driver's record size. A busy instance therefore costs about one append per
``delay``, not one per command. Rounds follow the records' ages, so the writes
flow steadily rather than in a burst per ``delay``. The price is a materialised
watermark that trails the stream by about ``delay``, which a new owner reads
back at takeover.

Instances are written concurrently by a fixed pool of workers (started by
``run`` and ``flush``: no task per round or per instance), each instance in stream order,
one round at a time: a round takes every durable record queued so far.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

from ...config import ApplicationConfig
from ...persistence import (
    Conflict,
    Journal,
    LimitExceeded,
    PersistenceError,
    Provider,
    RecordNotFound,
)
from ..backoff import backoff
from ..envelope import UNDECODABLE, closing_iter
from ..logs import RateLimitedLog, describe_error
from ..signals import event_maker
from .aggregates import AggregateInstances
from .instance_records import (
    Committed,
    InstanceCommand,
    InstanceRecord,
    Mark,
    SnapshotRecord,
    aggregate_name,
    follows,
    instance_decoder,
    instance_encoder,
    mark,
    snapshot_decoder,
)

if TYPE_CHECKING:
    from ..streams import StreamRecord

__all__ = ["Materialiser"]

_log = logging.getLogger("runkit.engine.commands.materialiser")
_retry_log = RateLimitedLog(_log)

_Key = tuple[str, str]  # (handler key, instance ID)

#: Instance journals written at once.
CONCURRENCY = 32
#: Queued records that start a round without waiting for the delay.
QUEUE_LIMIT = 10_000
#: Rounds per ``delay`` at most (under steady load, each takes what aged since the last).
ROUNDS_PER_DELAY = 10
#: Most commands in one instance journal record.
GROUP_LIMIT = 256
#: Instance journal handles kept open (with their known end).
OPEN_JOURNALS = 1024
#: Reads of an instance's stored snapshot before one is written (others write it too).
SNAPSHOT_ATTEMPTS = 3


class Materialiser:
    """Writes one partition's committed aggregate records to their instance journals."""

    def __init__(
        self,
        provider: Provider,
        app: ApplicationConfig,
        aggregates: AggregateInstances,
        *,
        truncate: bool,
        retry_base_delay: float,
        retry_max_delay: float,
        delay: float = 0.0,
    ) -> None:
        self._provider = provider
        self._app = app
        self._app_key = app.identity.key
        self._aggregates = aggregates
        self._truncate = truncate
        self._delay = delay
        self._max_record_bytes = provider.limits.max_record_bytes
        self._retry_base_delay = retry_base_delay
        self._retry_max_delay = retry_max_delay
        self._queue: deque[tuple[_Key, Committed]] = deque()
        # Per instance, its queued records not written yet (in order).
        self._unwritten: dict[_Key, deque[Committed]] = {}
        self._new_event = event_maker()
        self._wake = self._new_event()
        self._full = self._new_event()  # set when QUEUE_LIMIT records are queued
        self._room = self._new_event()  # set when a full queue falls below QUEUE_LIMIT
        # Open instance journals: (handle, end, mark of the last command).
        self._journals: OrderedDict[_Key, tuple[Journal, int, Mark | None]] = OrderedDict()
        self.records_written = 0
        # The stream position below which every record this materialiser was
        # given (live or recovered) is written: what a final stream record may
        # claim as materialised.
        self.covered = 0
        # The current round's instances, shared by the workers run() starts.
        self._work: deque[tuple[_Key, list[Committed]]] = deque()
        self._idle: deque[anyio.Event] = deque()  # one per waiting worker
        self._unfinished = 0
        self._round_done = self._new_event()

    def add(self, key: _Key, record: Committed) -> None:
        """Queue a record (in commit order); it is written once ``record.durable`` is set."""
        record.queued_at = anyio.current_time()
        self._queue.append((key, record))
        self._unwritten.setdefault(key, deque()).append(record)
        if len(self._queue) >= QUEUE_LIMIT:
            self._full.set()

    def wake(self) -> None:
        """Records became durable: start a round."""
        self._wake.set()

    @property
    def has_room(self) -> bool:
        """Fewer than ``QUEUE_LIMIT`` records are queued: commit more (``wait_for_room``)."""
        return len(self._queue) < QUEUE_LIMIT

    async def wait_for_room(self) -> None:
        """Wait until the queue is below ``QUEUE_LIMIT`` again.

        The partition's loop waits here before handling more aggregate
        commands, so a slow instance-journal store holds commits back (and,
        through the backlog, callers) instead of growing the queue, and with it
        memory and a new owner's re-read of the stream tail, without bound.
        """
        while not self.has_room:
            if self._room.is_set():
                self._room = self._new_event()
            await self._room.wait()

    def watermark(self, next_position: int) -> int:
        """The stream position below which every aggregate command is materialised.

        *next_position* is the position of the stream record being built:
        records queued but not durable yet will be at or after it.
        """
        if self._queue and self._queue[0][1].durable:
            return min(next_position, self._queue[0][1].stream_position)
        return next_position

    def recover(self, position: int, record: StreamRecord) -> None:
        """Queue the aggregate commands of a durable stream record found at takeover."""
        index_of = {cid: i for i, cid in enumerate(record.command_ids)}
        found: list[tuple[_Key, Committed]] = []
        current: tuple[_Key, Committed] | None = None
        for i, env in enumerate(record.events):
            # Every aggregate's, whether or not this version of the application
            # has its handler: the watermark is about to pass the record, and an
            # application that has the handler again (a rollback, an old node
            # of a rolling upgrade) must find these events in the journal.
            # Only aggregates record events with an instance.
            handler_key = env.source_handler
            if not handler_key or env.source_instance is None:
                current = None
                continue
            key = (handler_key, env.source_instance)
            if (
                current is not None
                and current[0] == key
                and (current[1].command_id == env.causation_id)
            ):
                current[1].events = (*current[1].events, env)
                continue
            committed = Committed(
                env.causation_id,
                (env,),
                durable=True,
                stream_offset=record.first_offset + i,
                stream_position=position,
                stream_index=index_of.get(env.causation_id, -1),
            )
            current = (key, committed)
            found.append(current)
        for quiet in record.event_less:
            if quiet.handler_key and 0 <= quiet.index < len(record.command_ids):
                committed = Committed(
                    record.command_ids[quiet.index],
                    (),
                    durable=True,
                    stream_offset=quiet.offset,
                    stream_position=position,
                    stream_index=quiet.index,
                )
                found.append(((quiet.handler_key, quiet.instance_id), committed))
        if record.event_less:
            # In commit order, so that each instance's records are in stream order.
            found.sort(key=lambda item: item[1].stream_index)
        now = anyio.current_time()
        for key, committed in found:
            committed.queued_at = now
            self._aggregates.recovered(key[0], key[1], committed)
            self._queue.append((key, committed))
            self._unwritten.setdefault(key, deque()).append(committed)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write durable records until cancelled."""
        task_status.started()
        last_round = -math.inf
        try:
            async with self._workers():
                while True:
                    if not (self._queue and self._queue[0][1].durable):
                        await self._wake.wait()
                        self._wake = self._new_event()
                        continue
                    if len(self._queue) < QUEUE_LIMIT:
                        # Let the oldest record's instance commit more first,
                        # and gather ROUNDS_PER_DELAY rounds' worth at least:
                        # under steady load every record ages right after the
                        # one before, and a round per record costs more than
                        # the writes it saves.
                        now = anyio.current_time()
                        wait = (
                            max(
                                self._queue[0][1].queued_at + self._delay,
                                last_round + self._delay / ROUNDS_PER_DELAY,
                            )
                            - now
                        )
                        if wait > 0:
                            with anyio.move_on_after(wait):
                                await self._full.wait()
                    last_round = anyio.current_time()
                    await self._round(self._delay if len(self._queue) < QUEUE_LIMIT else 0.0)
                    if len(self._queue) < QUEUE_LIMIT:
                        self._full = self._new_event()
        finally:
            await self._close_journals()

    async def flush(self) -> None:
        """Write every durable record queued (at shutdown), then close the journals."""
        try:
            async with self._workers():
                while self._queue and self._queue[0][1].durable:
                    await self._round()
        finally:
            await self._close_journals()

    @asynccontextmanager
    async def _workers(self) -> AsyncIterator[None]:
        """The pool that writes a round's instances, for the duration of the block."""
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(CONCURRENCY):
                    tg.start_soon(self._worker)
                yield
                tg.cancel_scope.cancel()
        finally:
            self._work.clear()
            self._idle.clear()

    async def _close_journals(self) -> None:
        with anyio.CancelScope(shield=True):
            for journal, _, _ in self._journals.values():
                await journal.close()
            self._journals.clear()

    async def _round(self, delay: float = 0.0) -> None:
        """Write records queued *delay* ago or more (durable), with their instances' later ones."""
        # Records leave the queue only once written, and only from its front
        # (the watermark is the front's position): a round cut short (by
        # shutdown) is repeated in full by flush(), and repeating is harmless.
        cutoff = anyio.current_time() - delay
        groups: dict[_Key, list[Committed]] = {}
        taken = 0
        for key, record in self._queue:
            if not record.durable or record.queued_at > cutoff:
                break
            taken += 1
            if not record.written and key not in groups:
                # With it go the instance's younger durable records: one append.
                group = groups[key] = []
                for later in self._unwritten[key]:
                    if not later.durable:
                        break
                    group.append(later)
        if groups:
            # Hand the instances to the workers and wait until all are written.
            self._work.extend(groups.items())
            self._unfinished = len(groups)
            self._round_done = self._new_event()
            for _ in range(min(len(groups), len(self._idle))):
                self._idle.popleft().set()  # wake only the workers needed
            await self._round_done.wait()
        for _ in range(taken):
            _, done = self._queue.popleft()
            self.covered = max(self.covered, done.stream_position + 1)
        if self.has_room:
            self._room.set()

    async def _worker(self) -> None:
        while True:
            if not self._work:
                idle = self._new_event()
                self._idle.append(idle)
                await idle.wait()
                continue
            key, records = self._work.popleft()
            await self._write_instance(key, records)
            self._unfinished -= 1
            if not self._unfinished:
                self._round_done.set()

    async def _write_instance(self, key: _Key, records: list[Committed]) -> None:
        failures = 0
        done = 0
        while done < len(records):
            group = _group(records, done)
            try:
                await self._write(key, group)
                done += len(group)
                failures = 0
            except PersistenceError as exc:
                failures += 1
                self._forget(key)
                delay = backoff(failures, self._retry_base_delay, self._retry_max_delay)
                _retry_log.warning(
                    key[0],
                    "writing aggregate instance %r of handler %s failed, retrying in %.2fs: %s",
                    key[1],
                    key[0],
                    delay,
                    describe_error(exc),
                )
                await anyio.sleep(delay)
        for record in records:
            record.written = True
        unwritten = self._unwritten[key]
        while unwritten and unwritten[0].written:
            unwritten.popleft()
        if not unwritten:
            del self._unwritten[key]
        self._aggregates.written(key[0], key[1], records)

    async def _write(self, key: _Key, group: list[Committed]) -> None:
        """Append the commands of *group* the journal lacks, in as few records as fit."""
        journal, end, last = await self._journal(key)
        while True:
            # Only commands after the journal's last one: an earlier owner or
            # an ambiguous append may have written some of them already.
            fresh = [r for r in group if follows(mark(r), last)]
            if not fresh:
                break
            data = self._encode(fresh)
            while len(data) > self._max_record_bytes and len(fresh) > 1:
                fresh = fresh[: len(fresh) // 2]
                data = self._encode(fresh)
            try:
                await journal.append(end, data)
                self.records_written += 1
                end, last = end + 1, mark(fresh[-1])
            except Conflict:
                end = (await journal.bounds()).end
                last = await _last_mark(journal, end)
            self._journals[key] = (journal, end, last)
        snapshot = group[-1].snapshot
        # The snapshot covers the journal below ``end`` only if its command is
        # the journal's last one: another owner may have appended past it.
        if snapshot is not None and last == mark(group[-1]):
            await self._write_snapshot(key, journal, end, snapshot)

    @staticmethod
    def _encode(records: list[Committed]) -> bytes:
        first = records[0]
        return instance_encoder.encode(
            InstanceRecord(
                command_id=first.command_id,
                events=first.events,
                inbox_position=first.inbox_position,
                stream_offset=first.stream_offset,
                stream_position=first.stream_position,
                stream_index=first.stream_index,
                more=tuple(
                    InstanceCommand(
                        r.command_id,
                        r.events,
                        r.inbox_position,
                        r.stream_offset,
                        r.stream_position,
                        r.stream_index,
                    )
                    for r in records[1:]
                ),
            )
        )

    async def _write_snapshot(
        self, key: _Key, journal: Journal, position: int, snapshot: tuple[bytes, tuple[str, ...]]
    ) -> None:
        data, recent = snapshot
        ks = await self._aggregates.snapshot_keyspace(key[0])
        name = key[1].encode()
        value = instance_encoder.encode(
            SnapshotRecord(position=position, data=data, recent=tuple((cid, -1) for cid in recent))
        )
        try:
            # Never replace a snapshot covering as much or more: another owner
            # (this one may be stale) may have truncated the journal below it,
            # and an older one would then leave the instance unloadable.
            for _ in range(SNAPSHOT_ATTEMPTS):
                stored, revision = await ks.get(name)
                if stored and _snapshot_position(stored) >= position:
                    break
                try:
                    await ks.set(name, value, revision)
                    break
                except Conflict:
                    continue  # written meanwhile: look again
            else:
                # Other owners keep writing it. A snapshot only saves replay:
                # go on without this one (and keep the journal whole).
                _retry_log.warning(
                    key[0],
                    "not snapshotting aggregate instance %r of handler %s: "
                    "its snapshot kept changing",
                    key[1],
                    key[0],
                )
                return
        except LimitExceeded as exc:
            # The same on every attempt: retried, it would stop every instance
            # journal of the partition. A snapshot only saves replay, so the
            # instance goes on without it (and its journal is not truncated).
            _retry_log.warning(
                key[0],
                "not snapshotting aggregate instance %r of handler %s: %s",
                key[1],
                key[0],
                describe_error(exc),
            )
            return
        if self._truncate and position > 1:
            # The stored snapshot is ours or one at or above ``position``, and
            # from now on it is only ever replaced by one further up: either
            # way it covers everything below ``position`` (and the recent
            # command IDs travel with it). The last record stays: its stream
            # offset tells a later materialiser what is already written.
            await journal.truncate(position - 1)

    async def _journal(self, key: _Key) -> tuple[Journal, int, Mark | None]:
        found = self._journals.get(key)
        if found is None:
            found = self._aggregates.take_journal(key)  # a rebuild just opened it
            if found is not None:
                await self._keep(key, found)
        if found is not None and found[1] >= 0:
            self._journals.move_to_end(key)
            return found
        journal = (
            found[0]
            if found is not None
            else await self._provider.journals.open(aggregate_name(self._app_key, *key))
        )
        try:
            end = (await journal.bounds()).end
            last = await _last_mark(journal, end)
        except BaseException:
            # Closed, so it must not stay known: the next attempt opens afresh.
            self._journals.pop(key, None)
            with anyio.CancelScope(shield=True):
                await journal.close()
            raise
        await self._keep(key, (journal, end, last))
        return journal, end, last

    async def _keep(self, key: _Key, opened: tuple[Journal, int, Mark | None]) -> None:
        self._journals[key] = opened
        self._journals.move_to_end(key)
        while len(self._journals) > OPEN_JOURNALS:
            _, (old, _, _) = self._journals.popitem(last=False)
            await old.close()

    async def recover_from(self, journal: Journal, start: int, end: int) -> int:
        """Queue the aggregate records of stream records ``[start, end)`` (takeover).

        Returns how many stream records were read.
        """
        from ..streams import decode_stream_record

        if start >= end:
            return 0
        begin = max(start, (await journal.bounds()).begin)
        count = 0
        async with closing_iter(journal.range(begin)) as records:
            async for position, data in records:
                if position >= end:
                    break
                self.recover(position, decode_stream_record(data))
                count += 1
        return count

    def _forget(self, key: _Key) -> None:
        # After a fault the known end may be wrong: re-read it next time.
        found = self._journals.get(key)
        if found is not None:
            self._journals[key] = (found[0], -1, None)


async def _last_mark(journal: Journal, end: int) -> Mark | None:
    """The mark of the journal's last command before *end* (None: empty/unknown)."""
    if end == 0:
        return None
    try:
        data = await journal.get(end - 1)
    except RecordNotFound:
        return None  # truncated to the end: only a snapshot-covered past
    return instance_decoder.decode(data).last_mark


def _snapshot_position(stored: bytes) -> int:
    """The journal position a stored snapshot covers (-1: unreadable, so replaceable)."""
    try:
        return snapshot_decoder.decode(stored).position
    except UNDECODABLE:
        return -1


def _group(records: list[Committed], start: int) -> list[Committed]:
    """The records from *start* that go into one journal record.

    A group ends with a record that carries a snapshot (the snapshot covers the
    journal up to and including that command, so nothing after it may share
    its record) or at ``GROUP_LIMIT`` commands.
    """
    group: list[Committed] = []
    for record in records[start : start + GROUP_LIMIT]:
        group.append(record)
        if record.snapshot is not None:
            break
    return group
