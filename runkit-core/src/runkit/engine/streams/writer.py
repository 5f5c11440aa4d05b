"""The partition stream writer: ``StreamWriter`` and its queued ``Publication``s.

The writer's append is the commit point of a batch (ADR 0007). Only the
partition owner writes: a ``Conflict`` on the stream journal that is not our
own earlier (ambiguous) append means another node took the partition, and the
writer raises ``OwnershipLost``.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime

import anyio
import attrs
from anyio.abc import TaskStatus

from ...persistence import Conflict, Journal, PersistenceError, RecordNotFound
from ..backoff import backoff
from ..envelope import Envelope
from ..logs import RateLimitedLog, describe_error
from ..signals import event_maker
from .bus import EventBus
from .reading import PartitionStream
from .records import (
    EventLessCommand,
    OwnershipLost,
    ProcessStep,
    StreamRecord,
    _events_of,
    _text_bytes,
    encode_stream_record,
    envelope_size,
)
from .tail import StreamTail
from .unconfirmed import UnconfirmedAppend

__all__ = ["Publication", "StreamWriter"]

_log = logging.getLogger("runkit.engine.streams")
_retry_log = RateLimitedLog(_log)


@attrs.define(eq=False)
class Publication:
    """A handled command queued on a ``StreamWriter``: its events (maybe none).

    ``on_durable`` is called (in the writer's task, without awaiting) once the
    record holding it is durable, after ``offset`` and ``position`` are set;
    ``wait_settled`` waits for that (or for the writer's failure). A failed
    publication whose append may have landed has ``unconfirmed`` set.
    """

    command_id: str
    events: tuple[Envelope, ...]
    size: int
    on_durable: Callable[[Publication], None] | None = None
    error: BaseException | None = None
    #: On failure: the append that may hold it after all (cut short, unconfirmed).
    unconfirmed: UnconfirmedAppend | None = None
    #: An aggregate command's (handler key, instance ID), kept in the record
    #: when it recorded no events (``StreamRecord.event_less``).
    instance: tuple[str, str] | None = None
    offset: int = -1
    position: int = -1
    #: The publication's index among its record's commands (once durable).
    index: int = -1
    #: A poisoned command's inbox entry (position, command ID): the record
    #: lists it in ``poisoned``, not among the commands it commits.
    poisoned: tuple[int, str] | None = None
    #: Keep the record visible to takeover scans until ``StreamWriter.unpin``.
    pinned: bool = False
    #: A process step (ADR 0010): the record commits it in ``steps`` (not among
    #: its commands), and ``index`` is then its index among the record's steps.
    step: ProcessStep | None = None
    #: Durable, or failed (``error``).
    settled: bool = False
    # Made only for someone who waits: most publications are followed through
    # ``on_durable`` alone, and an event per command is measurable.
    _done: anyio.Event | None = attrs.field(default=None, init=False)

    async def wait_settled(self) -> None:
        """Wait until the publication is durable or has failed."""
        if not self.settled:
            if self._done is None:
                self._done = anyio.Event()
            await self._done.wait()

    def settle(self) -> None:
        """Mark the publication durable or failed (``error``) and wake its waiter."""
        self.settled = True
        if self._done is not None:
            self._done.set()


class StreamWriter:
    """The single writer of one partition's stream journal.

    ``publish`` queues a command's events and returns once they are durable;
    everything queued while an append is in flight goes into the next record.
    Durable events go to the ``PartitionStream`` tail and the ``EventBus``.
    """

    def __init__(
        self,
        journal: Journal,
        stream: PartitionStream,
        bus: EventBus,
        tail: StreamTail,
        *,
        clock: Callable[[], datetime],
        batch_limit: int,
        record_limit: int,
        progress_interval: float,
        retry_max_delay: float,
        watermark: Callable[[int], int] | None = None,
        dispatched: Callable[[int], int] | None = None,
    ) -> None:
        self._journal = journal
        self._watermark = watermark
        self._dispatched = dispatched
        self._stream = stream
        self._bus = bus
        self._clock = clock
        self._batch_limit = batch_limit
        self._max_record = record_limit
        self._record_limit = max(1024, record_limit * 9 // 10)
        self._progress_interval = progress_interval
        self._retry_max_delay = retry_max_delay
        self._writer = str(uuid.uuid4())
        self._position = tail.next_position
        self._offset = tail.next_offset
        self._written_progress = tail.inbox_position
        self._written_materialised = tail.materialised or 0
        self._progress = tail.inbox_position
        # Never below the previous owner's: see StreamTail.inbox_end.
        self._inbox_end = max(tail.inbox_position, tail.inbox_end)
        self._queue: deque[Publication] = deque()
        # Pinned command IDs -> the position of the record holding them; the
        # previous owner's unmarked commands are pinned at its scan floor.
        self._pinned: dict[str, int] = dict.fromkeys(
            tail.unmarked, tail.scan_from if tail.scan_from is not None else tail.next_position
        )
        self._new_event = event_maker()
        self._wake = self._new_event()
        self._item_added = self._new_event()
        self._failed: BaseException | None = None
        # The record being appended (batch, progress, record, bytes): an append
        # cut short (cancelled, or failed ambiguously) is retried with the same
        # bytes, so that _landed() recognises it if it did land.
        self._inflight: tuple[list[Publication], int, StreamRecord, bytes] | None = None

    @property
    def next_offset(self) -> int:
        """The stream offset the next durable event will get."""
        return self._offset

    @property
    def next_position(self) -> int:
        """The journal position of the next record."""
        return self._position

    @property
    def backlog(self) -> int:
        """Publications queued and not yet durable."""
        return len(self._queue)

    @property
    def written_progress(self) -> int:
        """The inbox position recorded in the last durable record."""
        return self._written_progress

    def unpin(self, command_id: str) -> None:
        """The pinned command's marker is written: scans need not find it any more."""
        self._pinned.pop(command_id, None)

    def set_progress(self, inbox_position: int, inbox_end: int) -> None:
        """Tell the writer how far the inbox is processed and read (monotonic)."""
        self._inbox_end = max(self._inbox_end, inbox_end)
        if inbox_position > self._progress:
            self._progress = inbox_position
            self._wake.set()

    async def publish(self, command_id: str, events: Sequence[Envelope]) -> int:
        """Append a command's events to the stream; return once they are durable.

        Returns the stream offset of the first event.

        Raises:
            OwnershipLost: another node wrote to the stream.
        """
        return await self.wait(self.enqueue(command_id, events))

    def enqueue(
        self,
        command_id: str,
        events: Sequence[Envelope],
        on_durable: Callable[[Publication], None] | None = None,
        *,
        pinned: bool = False,
        instance: tuple[str, str] | None = None,
    ) -> Publication:
        """Queue a handled command and its events for the stream (in call order).

        See ``wait``; *on_durable* is called once they are durable. *instance*
        is the (handler key, instance ID) of an aggregate command: the record
        names it if the command recorded no events.
        """
        if events:
            size = sum(envelope_size(e) for e in events) + 64
            instance = None
        else:
            size = 64 if instance is None else 96 + len(instance[0]) + _text_bytes(instance[1])
        return self._queued(
            Publication(
                command_id, tuple(events), size, on_durable, pinned=pinned, instance=instance
            )
        )

    def enqueue_poisoned(self, position: int, command_id: str) -> Publication:
        """Queue a note that the inbox entry at *position* was poisoned (it is done).

        Raises:
            OwnershipLost: the writer has stopped.
        """
        return self._queued(Publication(command_id, (), 64, poisoned=(position, command_id)))

    def enqueue_step(
        self, step: ProcessStep, on_durable: Callable[[Publication], None] | None = None
    ) -> Publication:
        """Queue a process step for the stream: the next record commits it (ADR 0010).

        Steps are queued in call order with commands; *on_durable* is called
        once the record holding the step is durable (or has failed), with
        ``position`` and ``index`` (the step's index among the record's steps)
        set.

        Raises:
            OwnershipLost: the writer has stopped.
        """
        return self._queued(Publication(step.instance_id, (), step.size(), on_durable, step=step))

    def _queued(self, item: Publication) -> Publication:
        if self._failed is not None:
            raise OwnershipLost("the partition stream writer has stopped") from self._failed
        self._queue.append(item)
        self._wake.set()
        self._item_added.set()
        return item

    async def wait(self, item: Publication) -> int:
        """Wait until *item*'s events are durable; return the offset of the first.

        Raises:
            OwnershipLost: another node wrote to the stream.
        """
        await item.wait_settled()
        if item.error is not None:
            raise OwnershipLost("the partition stream writer has stopped") from item.error
        return item.offset

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write queued events until cancelled; raises ``OwnershipLost`` on a foreign write."""
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = self._new_event()
                if self._queue:
                    # Progress rides along in these records' headers.
                    while self._queue:
                        await self._write_one()
                    continue
                # Only progress to record: wait a little, so that a burst of
                # event-less commands costs one write, but never delay events.
                self._item_added = self._new_event()
                with anyio.move_on_after(self._progress_interval):
                    await self._item_added.wait()
                if self._queue:
                    self._wake.set()
                elif self._progress > self._written_progress:
                    await self._write_one()
        except anyio.get_cancelled_exc_class():
            # Shutdown: keep the queue, so that flush() still writes what is
            # committed in memory (close() fails whatever remains after it).
            raise
        except BaseException as exc:
            self._fail(exc)
            raise

    async def claim(self) -> None:
        """Append a progress-only record before the partition takes work (a new owner).

        A previous owner that has not noticed the takeover yet may still
        commit, and flush as it stops, after this node read the tail. This node
        reads the journal only below the tail it read, so it would not see those
        events, nor fence them off until its own next append, which on a quiet
        partition may be long coming. After this record the previous owner's
        next append conflicts (its callers fall back to the inbox); or this one
        does, and the partition starts again from a fresh tail.
        """
        await self._write_one()

    async def flush(self) -> None:
        """Write everything queued and the latest progress (used at shutdown)."""
        await self._write_all()

    async def record_watermark(self, covered: int) -> None:
        """At shutdown, after the materialiser's flush: say how far it got.

        Every record's header carries the materialised watermark as of its
        writing, so the last records' aggregate events, written to their
        instance journals after it, would be read again by the next owner. If
        the materialiser has *covered* records the last header does not, one
        progress-only record says so.
        """
        if self._watermark is not None and not self._queue and covered > self._written_materialised:
            await self._write_one()

    def close(self, reason: BaseException | None = None) -> None:
        """Fail whatever is still queued; later ``enqueue`` calls raise ``OwnershipLost``."""
        self._fail(reason or OwnershipLost("the partition stream writer has stopped"))

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        if self._inflight is not None:
            # Its append was cut short or never confirmed: it may have landed.
            # Callers that spill these commands say where to look (ADR 0002).
            append = UnconfirmedAppend(position=self._position, writer=self._writer)
            for item in self._inflight[0]:
                item.unconfirmed = append
        self._inflight = None
        while self._queue:
            item = self._queue.popleft()
            item.error = exc
            if item.on_durable is not None:
                item.on_durable(item)  # it sees the error
            item.settle()

    async def _write_all(self) -> None:
        while self._queue or self._progress > self._written_progress:
            await self._write_one()

    async def _write_one(self) -> None:
        if self._inflight is None:
            self._inflight = self._build()
        batch, progress, record, data = self._inflight
        try:
            await self._append(data)
        except OwnershipLost:
            self._inflight = None  # another writer's record is there: ours did not land
            raise
        self._inflight = None
        self._after_append(batch, progress, record)

    def _build(self) -> tuple[list[Publication], int, StreamRecord, bytes]:
        batch: list[Publication] = []
        count = size = 0
        for item in self._queue:
            full = count + len(item.events) > self._batch_limit
            if batch and (full or size + item.size > self._record_limit):
                break
            batch.append(item)
            count += len(item.events)
            size += item.size
        progress = self._progress
        while True:
            record = self._record(batch, progress)
            data = encode_stream_record(record)
            if len(data) <= self._max_record or len(batch) == 1:
                return batch, progress, record, data
            # The size estimate fell short (very long instance IDs or other
            # envelope fields): fewer commands, or the store refuses the record
            # for ever.
            del batch[max(1, min(len(batch) - 1, len(batch) * self._max_record // len(data))) :]

    def _record(self, batch: list[Publication], progress: int) -> StreamRecord:
        unmarked = tuple(i.command_id for i in batch if i.pinned)
        floors = [*self._pinned.values(), *([self._position] if unmarked else [])]
        event_less: list[EventLessCommand] = []
        command_ids: list[str] = []
        poisoned: list[tuple[int, str]] = []
        steps: list[ProcessStep] = []
        offset = self._offset
        for item in batch:
            if item.poisoned is not None:
                poisoned.append(item.poisoned)
                continue
            if item.step is not None:
                steps.append(item.step)
                continue
            if item.instance is not None:
                event_less.append(EventLessCommand(len(command_ids), offset, *item.instance))
            command_ids.append(item.command_id)
            offset += len(item.events)
        return StreamRecord(
            first_offset=self._offset,
            inbox_position=progress,
            inbox_end=max(self._inbox_end, progress),
            written_at=self._clock(),
            writer=self._writer,
            # Event-less commands too: a command read again from the inbox after a
            # stop or crash before the inbox progress passed it would otherwise be
            # handled again (an integration's external call made twice).
            command_ids=tuple(command_ids),
            events=tuple(e for i in batch for e in i.events),
            materialised=None if self._watermark is None else self._watermark(self._position),
            unmarked=unmarked,
            scan_from=min(floors) if floors else None,
            event_less=tuple(event_less),
            poisoned=tuple(poisoned),
            steps=tuple(steps),
            dispatched=None if self._dispatched is None else self._dispatched(self._position),
        )

    def _after_append(self, batch: list[Publication], progress: int, record: StreamRecord) -> None:
        for _ in batch:
            self._queue.popleft()
        position = self._position
        self._position += 1
        self._offset += len(record.events)
        self._written_progress = progress
        if record.materialised is not None:
            self._written_materialised = record.materialised
        offset = record.first_offset
        index = step_index = 0
        for item in batch:
            item.offset = offset
            item.position = position
            if item.step is not None:
                item.index = step_index
                step_index += 1
            elif item.poisoned is None:
                item.index = index
                index += 1
            offset += len(item.events)
            if item.pinned:
                self._pinned.setdefault(item.command_id, position)
        events = _events_of(self._stream.stream_id, record)
        self._stream._publish(events)  # the writer feeds its stream's tail
        self._bus.publish(events)
        for item in batch:
            if item.on_durable is not None:
                item.on_durable(item)
            item.settle()

    async def _append(self, data: bytes) -> None:
        failures = 0
        while True:
            try:
                try:
                    await self._journal.append(self._position, data)
                    return
                except Conflict:
                    # Our own earlier attempt may have landed (an ambiguous
                    # error, or an append cut short: the same bytes are retried).
                    if await self._landed(data):
                        return
                    raise OwnershipLost(
                        f"stream {self._journal.name!r}: another writer appended at "
                        f"position {self._position}"
                    ) from None
            except PersistenceError as exc:  # the append, or the read that checks it
                failures += 1
                delay = backoff(failures, 0.02, self._retry_max_delay)
                _retry_log.warning(
                    self._journal.name,
                    "appending to stream %r at position %d failed, retrying in %.2fs: %s",
                    self._journal.name,
                    self._position,
                    delay,
                    describe_error(exc),
                )
                await anyio.sleep(delay)

    async def _landed(self, data: bytes) -> bool:
        try:
            return await self._journal.get(self._position) == data
        except RecordNotFound:
            return False
