"""Partition event streams: the writer, ``PartitionStream`` readers and the ``EventBus``.

Each partition of an application has one event stream, stored in the journal
``<app>/stream/<p>``. One record holds the events of one or more commands (never
part of a command's events, so a handling's events become visible all at once),
and a header:

- ``first_offset``: the stream offset of the record's first event. Offsets are
  dense per stream and independent of journal positions; a record may hold no
  events at all (it then only records progress).
- ``inbox_position``: every command in inbox records below it is done (its
  events are in this or an earlier record, or it had none, or it was poisoned).
- ``inbox_end``: how far the writer's owner had read the inbox when it built the
  record; a new owner scans back only over records whose ``inbox_end`` is past
  the tail's ``inbox_position`` to learn which pending commands are published.
- ``command_ids``: the commands whose events the record publishes (it is the
  commit point of a batch, ADR 0007; commands that recorded no events commit
  nothing and are not listed).
- ``materialised``: every aggregate event in records below this journal
  position is in its instance journal (``None``: all of them, as in records
  written before instance journals became derived state).
- ``unmarked`` / ``scan_from``: keyed integration commands committed without
  passing through the inbox whose idempotency marker may not be written yet,
  and the oldest record holding one. A new owner's takeover scan reads back at
  least to ``scan_from``, so it learns of them (and writes their markers).

Only the partition owner writes: a ``Conflict`` on the stream journal that is
not our own earlier (ambiguous) append means another node took the partition,
and the writer raises ``OwnershipLost``.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from contextlib import aclosing, asynccontextmanager
from datetime import datetime

import anyio
import anyio.lowlevel
import attrs
import msgspec
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

import dogma

from ..persistence import Conflict, Journal, PersistenceError, RecordNotFound, search
from .backoff import backoff
from .envelope import Envelope, closing_iter, to_message
from .logs import RateLimitedLog, describe_error

__all__ = [
    "CommandDone",
    "EventBus",
    "Observed",
    "OwnershipLost",
    "PartitionStream",
    "Publication",
    "StreamEvent",
    "StreamRecord",
    "StreamTail",
    "StreamWriter",
    "UniqueEvents",
    "decode_stream_record",
    "encode_stream_record",
    "read_tail",
    "stream_name",
]

_log = logging.getLogger("runkit.engine.streams")
_retry_log = RateLimitedLog(_log)

#: A reader lets other tasks run after this many events, even when neither the
#: store nor its consumer ever suspends (a memory store and a read model in
#: memory): a long catch-up must not starve the heartbeat.
YIELD_EVERY = 256


def stream_name(app_key: str, index: int) -> str:
    """The name of partition *index*'s stream journal."""
    return f"{app_key}/stream/{index}"


class OwnershipLost(Exception):
    """Another node wrote to a journal this node believed it was the only writer of."""


class StreamRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One record of a partition stream journal (see the module docstring)."""

    first_offset: int
    inbox_position: int
    inbox_end: int
    written_at: datetime
    writer: str
    command_ids: tuple[str, ...] = ()
    events: tuple[Envelope, ...] = ()
    materialised: int | None = None
    unmarked: tuple[str, ...] = ()
    scan_from: int | None = None


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(StreamRecord)


def encode_stream_record(record: StreamRecord) -> bytes:
    """Encode a stream record as msgpack."""
    return _record_encoder.encode(record)


def decode_stream_record(data: bytes) -> StreamRecord:
    """Decode a stream record made by :func:`encode_stream_record`."""
    return _record_decoder.decode(data)


@attrs.frozen
class StreamEvent:
    """An event at an offset of a partition stream.

    Attributes:
        stream_id: The partition's UUID (what projections see as the stream ID).
        offset: The event's dense, zero-based offset in the stream.
        envelope: The event's envelope.
        recorded_at: When the handler recorded the event.
    """

    stream_id: str
    offset: int
    envelope: Envelope
    recorded_at: datetime

    def message(self) -> dogma.Event:
        """Decode the event: a fresh, re-validated copy on every call (ADR-32)."""
        message = to_message(self.envelope)
        if not isinstance(message, dogma.Event):
            raise TypeError(f"stream holds a non-event message: {self.envelope.description}")
        return message


def _events_of(stream_id: str, record: StreamRecord) -> list[StreamEvent]:
    return [
        StreamEvent(stream_id, record.first_offset + i, env, env.created_at)
        for i, env in enumerate(record.events)
    ]


def _compare_offset(offset: int) -> Callable[[int, bytes], int]:
    def compare(_: int, data: bytes) -> int:
        record = decode_stream_record(data)
        if offset < record.first_offset:
            return 1
        if offset >= record.first_offset + len(record.events):
            return -1
        return 0

    return compare


class PartitionStream:
    """A partition's event stream, readable from any offset.

    ``read`` catches up from the journal, then follows the writer's in-memory
    tail without polling. Only the partition owner has one; its readers are
    cancelled when the partition stops.
    """

    def __init__(self, stream_id: str, journal: Journal, *, next_offset: int, buffer: int = 4096):
        self.stream_id = stream_id
        self._journal = journal
        self._end = next_offset
        # The recent tail: events [self._base, self._end), trimmed to about
        # ``buffer`` events in amortised O(1), indexed by offset (no copies).
        self._buffer: list[StreamEvent] = []
        self._base = next_offset
        self._capacity = buffer
        self._changed = anyio.Event()

    async def end(self) -> int:
        """The next offset to be written."""
        return self._end

    def read(self, offset: int) -> AsyncIterator[StreamEvent]:
        """Iterate the events from *offset* on, in order; never ends until cancelled."""
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        return self._read(offset)

    async def _read(self, offset: int) -> AsyncGenerator[StreamEvent, None]:
        position = offset
        while True:
            if position >= self._end:
                changed = self._changed
                if position >= self._end:
                    await changed.wait()
                continue
            if position >= self._base:
                # Index by offset each time: the writer appends and trims
                # while we are suspended.
                while self._base <= position < self._end:
                    yield self._buffer[position - self._base]
                    position += 1
                    if not position % YIELD_EVERY:
                        await anyio.lowlevel.checkpoint()
                continue
            stop = self._base
            before = position
            async with aclosing(self._read_journal(position, stop)) as catch_up:
                async for event in catch_up:
                    yield event
                    position = event.offset + 1
                    if not position % YIELD_EVERY:
                        await anyio.lowlevel.checkpoint()
            if position == before:
                raise RecordNotFound(self._journal.name, position)

    async def _read_journal(self, offset: int, stop: int) -> AsyncGenerator[StreamEvent, None]:
        found = await search(self._journal, _compare_offset(offset))
        if found is None:
            return
        async with closing_iter(self._journal.range(found[0])) as records:
            async for _, data in records:
                record = decode_stream_record(data)
                for event in _events_of(self.stream_id, record):
                    if event.offset >= stop:
                        return
                    if event.offset >= offset:
                        yield event
                if record.first_offset + len(record.events) >= stop:
                    return

    async def events_at(self, offset: int, count: int) -> list[StreamEvent]:
        """The *count* events from *offset* on (all below ``end()``)."""
        if offset + count > self._end:
            raise ValueError(f"events [{offset}, {offset + count}) are not all written yet")
        events: list[StreamEvent] = []
        if count:
            async with aclosing(self._read(offset)) as reader:
                async for event in reader:
                    events.append(event)
                    if len(events) == count:
                        break
        return events

    def _publish(self, events: Sequence[StreamEvent]) -> None:
        # Called by the writer once the record holding *events* is durable.
        if not events:
            return
        self._buffer.extend(events)
        if len(self._buffer) > 2 * self._capacity:
            drop = len(self._buffer) - self._capacity
            del self._buffer[:drop]
            self._base += drop
        self._end = events[-1].offset + 1
        changed, self._changed = self._changed, anyio.Event()
        changed.set()


@attrs.frozen
class CommandDone:
    """A note on the ``EventBus``: a command of a chain is done on its owner.

    ``conclusive`` says that every event the command recorded was published on
    the bus before this note (handled just now, or re-delivered), so a
    subscriber that saw none knows it recorded none. A repeated command whose
    original events cannot be re-delivered is done but not conclusive.
    """

    correlation_id: str
    command_id: str
    conclusive: bool


#: What a subscription yields.
Observed = StreamEvent | CommandDone


class UniqueEvents:
    """A subscription's events, each stream event (stream ID, offset) at most once.

    The bus may publish an event again (a repeated command's original events are
    redelivered for observers that joined later), and a merged subscription gets
    the same event from several sources; a subscriber that has already seen it
    must not see it twice. Notes pass through.
    """

    def __init__(self, receive: AsyncIterator[Observed]) -> None:
        self._receive = receive
        self._seen: set[tuple[str, int]] = set()

    def __aiter__(self) -> UniqueEvents:
        return self

    def pending(self) -> int:
        """Events received from a memory stream and not yet taken (some may be repeats)."""
        if isinstance(self._receive, MemoryObjectReceiveStream):
            return self._receive.statistics().current_buffer_used
        return 0

    async def __anext__(self) -> Observed:
        while True:
            event = await self._receive.__anext__()
            if isinstance(event, CommandDone):
                return event
            key = (event.stream_id, event.offset)
            if key not in self._seen:
                self._seen.add(key)
                return event


#: Events and notes a node keeps after publishing them, for subscriptions that
#: start late (``subscribe(replay=True)``): a peer that subscribes after a
#: reconnect, or to a node that has just taken a partition over, still gets
#: what the chain recorded meanwhile. Bounded by count and by age.
RECENT_EVENTS = 10_000
RECENT_SECONDS = 60.0


class EventBus:
    """In-process fan-out of published events to subscribers, by correlation ID.

    The bus also keeps the most recent events and notes (``RECENT_EVENTS``,
    for at most ``RECENT_SECONDS``), so that a subscription made with
    ``replay=True`` starts with what its chain already published here.
    """

    def __init__(
        self,
        *,
        recent_events: int = RECENT_EVENTS,
        recent_seconds: float = RECENT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._subscribers: dict[str, set[MemoryObjectSendStream[Observed]]] = {}
        self._recent: dict[str, deque[Observed]] = {}
        # (when, correlation ID) per kept item, oldest first: the oldest entry
        # for an ID is always the head of that ID's deque.
        self._order: deque[tuple[float, str]] = deque()
        self._recent_events = recent_events
        self._recent_seconds = recent_seconds
        self._clock = clock

    @asynccontextmanager
    async def subscribe(
        self, correlation_id: str, *, replay: bool = False
    ) -> AsyncIterator[AsyncIterator[Observed]]:
        """Receive every event published after this call whose correlation ID matches.

        With *replay*, the subscription first receives the chain's events and
        notes this bus still keeps, in the order they were published. Each
        stream event is delivered once per subscription, even if published again.
        """
        send, receive = anyio.create_memory_object_stream[Observed](math.inf)
        subscribers = self._subscribers.setdefault(correlation_id, set())
        subscribers.add(send)
        if replay:
            self._expire(self._clock())
            for item in self._recent.get(correlation_id, ()):
                send.send_nowait(item)
        try:
            async with receive:
                yield UniqueEvents(receive)
        finally:
            subscribers.discard(send)
            if not subscribers:
                self._subscribers.pop(correlation_id, None)
            send.close()

    def has_subscribers(self, correlation_id: str) -> bool:
        """Whether anyone is subscribed to *correlation_id* now."""
        return correlation_id in self._subscribers

    def publish(self, events: Iterable[StreamEvent]) -> None:
        """Deliver *events* to the matching subscribers (never blocks), and keep them."""
        for event in events:
            self._deliver(event.envelope.correlation_id, event)

    def note(self, note: CommandDone) -> None:
        """Deliver a chain note to the subscribers of its correlation ID, and keep it."""
        self._deliver(note.correlation_id, note)

    def _deliver(self, correlation_id: str, item: Observed) -> None:
        now = self._clock()
        kept = self._recent.get(correlation_id)
        if kept is None:
            kept = self._recent[correlation_id] = deque()
        kept.append(item)
        self._order.append((now, correlation_id))
        self._expire(now)
        for send in self._subscribers.get(correlation_id, ()):
            send.send_nowait(item)

    def _expire(self, now: float) -> None:
        order, recent = self._order, self._recent
        while order and (
            len(order) > self._recent_events or now - order[0][0] > self._recent_seconds
        ):
            _, correlation_id = order.popleft()
            kept = recent[correlation_id]
            kept.popleft()
            if not kept:
                del recent[correlation_id]


@attrs.frozen
class StreamTail:
    """What a new partition owner learns from the end of the stream journal.

    Attributes:
        next_position: The journal position of the next record.
        next_offset: The stream offset of the next event.
        inbox_position: Inbox records below it are fully processed.
        published: IDs of commands at or after ``inbox_position`` whose events
            are already in the stream.
        materialised: The last record's materialised watermark (``None``:
            every aggregate event is in its instance journal).
        unmarked: Keyed commands found committed whose idempotency markers
            may be missing (the new owner writes them).
        scan_from: Where the scan had to read back to (the new owner's
            records keep it until it has written those markers).
    """

    next_position: int
    next_offset: int
    inbox_position: int
    published: frozenset[str]
    materialised: int | None = None
    unmarked: frozenset[str] = frozenset()
    scan_from: int | None = None


async def read_tail(journal: Journal) -> StreamTail:
    """Read the tail of a stream journal (see the module docstring)."""
    bounds = await journal.bounds()
    if bounds.is_empty:
        return StreamTail(bounds.end, 0, 0, frozenset())
    last = decode_stream_record(await journal.get(bounds.end - 1))
    inbox_position = last.inbox_position
    published: set[str] = set()
    unmarked: set[str] = set()
    floor = bounds.end if last.scan_from is None else last.scan_from
    position = bounds.end - 1
    record = last
    while True:
        if record.inbox_end <= inbox_position and position < floor:
            break
        published.update(record.command_ids)
        unmarked.update(record.unmarked)
        position -= 1
        if position < bounds.begin:
            break
        try:
            record = decode_stream_record(await journal.get(position))
        except RecordNotFound:
            break  # truncated below us: older records cannot hold pending commands
    return StreamTail(
        bounds.end,
        last.first_offset + len(last.events),
        inbox_position,
        frozenset(published),
        last.materialised,
        frozenset(unmarked),
        last.scan_from,
    )


@attrs.define(eq=False)
class Publication:
    """A handled command queued on a ``StreamWriter``: its events (maybe none).

    ``on_durable`` is called (in the writer's task, without awaiting) once the
    record holding it is durable, after ``offset`` and ``position`` are set.
    """

    command_id: str
    events: tuple[Envelope, ...]
    size: int
    on_durable: Callable[[Publication], None] | None = None
    done: anyio.Event = attrs.field(factory=anyio.Event)
    error: BaseException | None = None
    offset: int = -1
    position: int = -1
    #: Keep the record visible to takeover scans until ``StreamWriter.unpin``.
    pinned: bool = False


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
    ) -> None:
        self._journal = journal
        self._watermark = watermark
        self._stream = stream
        self._bus = bus
        self._clock = clock
        self._batch_limit = batch_limit
        self._record_limit = max(1024, record_limit * 9 // 10)
        self._progress_interval = progress_interval
        self._retry_max_delay = retry_max_delay
        self._writer = str(uuid.uuid4())
        self._position = tail.next_position
        self._offset = tail.next_offset
        self._written_progress = tail.inbox_position
        self._written_materialised = tail.materialised or 0
        self._progress = tail.inbox_position
        self._inbox_end = tail.inbox_position
        self._queue: deque[Publication] = deque()
        # Pinned command IDs -> the position of the record holding them; the
        # previous owner's unmarked commands are pinned at its scan floor.
        self._pinned: dict[str, int] = dict.fromkeys(
            tail.unmarked, tail.scan_from if tail.scan_from is not None else tail.next_position
        )
        self._wake = anyio.Event()
        self._item_added = anyio.Event()
        self._failed: BaseException | None = None

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
    ) -> Publication:
        """Queue a handled command and its events for the stream (in call order).

        See ``wait``; *on_durable* is called once they are durable.
        """
        if self._failed is not None:
            raise OwnershipLost("the partition stream writer has stopped") from self._failed
        size = sum(len(e.data) + len(e.description) + 256 for e in events) + 64
        item = Publication(command_id, tuple(events), size, on_durable, pinned=pinned)
        self._queue.append(item)
        self._wake.set()
        self._item_added.set()
        return item

    async def wait(self, item: Publication) -> int:
        """Wait until *item*'s events are durable; return the offset of the first.

        Raises:
            OwnershipLost: another node wrote to the stream.
        """
        await item.done.wait()
        if item.error is not None:
            raise OwnershipLost("the partition stream writer has stopped") from item.error
        return item.offset

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write queued events until cancelled; raises ``OwnershipLost`` on a foreign write."""
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                if self._queue:
                    # Progress rides along in these records' headers.
                    while self._queue:
                        await self._write_one()
                    continue
                # Only progress to record: wait a little, so that a burst of
                # event-less commands costs one write, but never delay events.
                self._item_added = anyio.Event()
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
        while self._queue:
            item = self._queue.popleft()
            item.error = exc
            if item.on_durable is not None:
                item.on_durable(item)  # it sees the error
            item.done.set()

    async def _write_all(self) -> None:
        while self._queue or self._progress > self._written_progress:
            await self._write_one()

    async def _write_one(self) -> None:
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
        unmarked = tuple(i.command_id for i in batch if i.pinned and i.events)
        floors = [*self._pinned.values(), *([self._position] if unmarked else [])]
        record = StreamRecord(
            first_offset=self._offset,
            inbox_position=progress,
            inbox_end=max(self._inbox_end, progress),
            written_at=self._clock(),
            writer=self._writer,
            command_ids=tuple(i.command_id for i in batch if i.events),
            events=tuple(e for i in batch for e in i.events),
            materialised=None if self._watermark is None else self._watermark(self._position),
            unmarked=unmarked,
            scan_from=min(floors) if floors else None,
        )
        await self._append(encode_stream_record(record))
        for _ in batch:
            self._queue.popleft()
        position = self._position
        self._position += 1
        self._offset += len(record.events)
        self._written_progress = progress
        if record.materialised is not None:
            self._written_materialised = record.materialised
        offset = record.first_offset
        for item in batch:
            item.offset = offset
            item.position = position
            offset += len(item.events)
            if item.pinned and item.events:
                self._pinned.setdefault(item.command_id, position)
        events = _events_of(self._stream.stream_id, record)
        self._stream._publish(events)  # the writer feeds its stream's tail
        self._bus.publish(events)
        for item in batch:
            if item.on_durable is not None:
                item.on_durable(item)
            item.done.set()

    async def _append(self, data: bytes) -> None:
        failures = 0
        while True:
            try:
                await self._journal.append(self._position, data)
                return
            except Conflict:
                # Our own earlier attempt may have landed (ambiguous error).
                if await self._landed(data):
                    return
                raise OwnershipLost(
                    f"stream {self._journal.name!r}: another writer appended at "
                    f"position {self._position}"
                ) from None
            except PersistenceError as exc:
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
