"""Reading a partition stream: ``PartitionStream`` (journal catch-up, then the live tail)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing

import anyio
import anyio.lowlevel

from ...persistence import Journal, RecordNotFound, search
from ..envelope import closing_iter
from ..signals import event_maker
from .records import StreamEvent, _events_of, decode_stream_record

__all__ = ["YIELD_EVERY", "PartitionStream"]

#: A reader lets other tasks run after this many events, even when neither the
#: store nor its consumer ever suspends (a memory store and a read model in
#: memory): a long catch-up must not starve the heartbeat.
YIELD_EVERY = 256


def _compare_offset(offset: int) -> Callable[[int, bytes], int]:
    def compare(_: int, data: bytes) -> int:
        record = decode_stream_record(data)
        if offset < record.first_offset:
            return 1
        if offset >= record.first_offset + len(record.events):
            return -1
        return 0

    return compare


class _Waiter:
    """A filtered reader waiting at the end of the stream (see ``PartitionStream.read``)."""

    __slots__ = ("on_skip", "position", "types", "woken")

    def __init__(
        self,
        types: frozenset[str],
        position: int,
        on_skip: Callable[[int], None] | None,
        woken: anyio.Event,
    ) -> None:
        self.types = types
        self.position = position
        self.woken = woken
        self.on_skip = on_skip


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
        self._new_event = event_maker()
        self._changed = self._new_event()
        # Filtered readers waiting for an event of their types; see ``read``.
        self._waiters: list[_Waiter] = []

    @property
    def journal(self) -> Journal:
        """The stream's journal."""
        return self._journal

    async def end(self) -> int:
        """The next offset to be written."""
        return self._end

    def read(
        self,
        offset: int,
        *,
        types: frozenset[str] | None = None,
        on_skip: Callable[[int], None] | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Iterate the events from *offset* on, in order; never ends until cancelled.

        With *types* (message type IDs), only events of those types are
        yielded, and a reader waiting at the end of the stream is woken only
        when an event of one of them is published: a consumer that handles
        few of the stream's types costs nothing for the rest. *on_skip* is
        then called with an offset once every event before it has been
        yielded or skipped, while the consumer waits for its next event (it
        has nothing in hand): when the reader reaches the end, as it sleeps
        through events of other types, and every ``YIELD_EVERY`` events of a
        long read. So the consumer can let its checkpoint pass events it
        never sees. It may run in the writer's task (as the writer
        publishes): it must neither block nor raise.
        """
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        return self._read(offset, types, on_skip)

    async def _read(
        self,
        offset: int,
        types: frozenset[str] | None = None,
        on_skip: Callable[[int], None] | None = None,
    ) -> AsyncGenerator[StreamEvent, None]:
        position = offset
        while True:
            if position >= self._end:
                if types is None:
                    changed = self._changed
                    if position >= self._end:
                        await changed.wait()
                    continue
                position = await self._wait_for(types, position, on_skip)
                continue
            if position >= self._base:
                # Index by offset each time: the writer appends and trims
                # while we are suspended.
                while self._base <= position < self._end:
                    event = self._buffer[position - self._base]
                    position += 1
                    if types is None or event.envelope.type_id in types:
                        yield event
                    if not position % YIELD_EVERY:
                        if on_skip is not None:
                            on_skip(position)
                        await anyio.lowlevel.checkpoint()
                continue
            stop = self._base
            before = position
            async with aclosing(self._read_journal(position, stop)) as catch_up:
                async for event in catch_up:
                    position = event.offset + 1
                    if types is None or event.envelope.type_id in types:
                        yield event
                    if not position % YIELD_EVERY:
                        if on_skip is not None:
                            on_skip(position)
                        await anyio.lowlevel.checkpoint()
            if position == before:
                raise RecordNotFound(self._journal.name, position)

    async def _wait_for(
        self, types: frozenset[str], position: int, on_skip: Callable[[int], None] | None
    ) -> int:
        """Wait at the end for an event of *types*; the offset to read on from."""
        if on_skip is not None:
            on_skip(position)
        waiter = _Waiter(types, position, on_skip, self._new_event())
        self._waiters.append(waiter)
        try:
            await waiter.woken.wait()
        finally:
            if not waiter.woken.is_set():  # cancelled while waiting
                self._waiters.remove(waiter)
        # Everything between where it started waiting and waiter.position was
        # of other types (``_publish`` moved it on without waking it).
        return waiter.position

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
        changed, self._changed = self._changed, self._new_event()
        changed.set()
        if self._waiters:
            self._wake_filtered(events)

    def _wake_filtered(self, events: Sequence[StreamEvent]) -> None:
        published = {e.envelope.type_id for e in events}
        waiting: list[_Waiter] = []
        for waiter in self._waiters:
            if waiter.types.isdisjoint(published):
                # Nothing for it: it stays asleep, as if it had read them (never
                # moved back: a reader may have started past the end).
                waiter.position = max(waiter.position, self._end)
                if waiter.on_skip is not None:
                    waiter.on_skip(waiter.position)
                waiting.append(waiter)
            else:
                waiter.woken.set()
        self._waiters = waiting
