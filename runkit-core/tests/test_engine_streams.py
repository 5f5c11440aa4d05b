"""Reading a partition stream filtered by message type (``PartitionStream.read(types=...)``).

Real stream writers on the memory driver (the events harness). A filtered
reader yields only its types, from the live tail and from the journal, and
while it waits at the end it is not woken by events of other types: it is
moved past them and told so through ``on_skip``.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs

import dogma
from runkit.engine.envelope import closing_iter
from runkit.engine.streams import PartitionStream, StreamEvent

sys.path.insert(0, str(Path(__file__).parent))
from engine_events_harness import Harness, harness, wait_until

REGISTRY = dogma.MessageTypeRegistry()
WANTED_ID = "e3000000-0000-4000-8000-000000000001"


@dogma.register_event(WANTED_ID, registry=REGISTRY)
@attrs.frozen
class Wanted(dogma.Event):
    n: int


@dogma.register_event("e3000000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class Other(dogma.Event):
    n: int


class Projection:
    """Only here so the harness has an application; never run."""

    def configure(self, c: Any) -> None:
        c.identity("proj", "b3000000-0000-4000-8000-000000000001")
        c.routes(dogma.handles_event(Wanted, registry=REGISTRY))

    async def handle_event(self, scope: dogma.ProjectionEventScope, event: dogma.Event) -> int:
        return scope.offset + 1

    async def checkpoint_offset(self, stream_id: str) -> int:
        return 0

    async def compact(self, scope: Any) -> None:
        pass

    async def reset(self, scope: Any) -> None:
        pass


class App:
    def configure(self, c: Any) -> None:
        c.identity("streams", "a3000000-0000-4000-8000-000000000001")
        c.routes(dogma.via_projection(Projection()))


WANTED = frozenset({WANTED_ID})


async def _take(stream: PartitionStream, offset: int, count: int, **kwargs: Any) -> list[int]:
    """The offsets of the first *count* events a reader from *offset* yields."""
    seen: list[int] = []
    with anyio.fail_after(5):
        async with closing_iter(stream.read(offset, **kwargs)) as events:
            async for event in events:
                seen.append(event.offset)
                if len(seen) == count:
                    break
    return seen


@asynccontextmanager
async def _reopened(h: Harness, stream: PartitionStream) -> AsyncIterator[PartitionStream]:
    """The stream opened afresh over its journal: no tail in memory, all read back."""
    async with await h.provider.journals.open(f"{h.app.identity.key}/stream/0") as journal:
        yield PartitionStream(stream.stream_id, journal, next_offset=await stream.end())


async def test_a_filtered_reader_yields_only_its_types_from_the_tail_and_the_journal() -> None:
    async with harness(App(), registry=REGISTRY, partitions=1) as h:
        await h.publish(Other(0), Wanted(1), Other(2))
        await h.publish(Other(3), Other(4))
        await h.publish(Wanted(5))
        stream = h.streams[0]
        assert await _take(stream, 0, 2, types=WANTED) == [1, 5]
        assert await _take(stream, 2, 1, types=WANTED) == [5]
        # Opened afresh, everything before its end is read back from the journal.
        async with _reopened(h, stream) as fresh:
            assert await _take(fresh, 0, 2, types=WANTED) == [1, 5]
            # Unfiltered readers are unchanged.
            assert await _take(fresh, 0, 6) == [0, 1, 2, 3, 4, 5]


async def test_a_long_read_reports_its_progress_through_other_types() -> None:
    # 600 events of another type, then one of its own: the reader tells the
    # consumer how far it got every YIELD_EVERY events, from the journal
    # and from the tail, before it yields anything.
    async with harness(App(), registry=REGISTRY, partitions=1) as h:
        for n in range(6):
            await h.publish(*(Other(100 * n + i) for i in range(100)))
        await h.publish(Wanted(600))
        stream = h.streams[0]
        async with _reopened(h, stream) as fresh:
            for reader in (stream, fresh):
                skipped: list[int] = []
                assert await _take(reader, 0, 1, types=WANTED, on_skip=skipped.append) == [600]
                assert skipped == [256, 512]


async def test_a_waiting_filtered_reader_sleeps_through_other_types() -> None:
    async with harness(App(), registry=REGISTRY, partitions=1) as h:
        stream = h.streams[0]
        skipped: list[int] = []
        yielded: list[StreamEvent] = []

        async def read() -> None:
            async with closing_iter(stream.read(0, types=WANTED, on_skip=skipped.append)) as events:
                async for event in events:
                    yielded.append(event)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await wait_until(lambda: len(stream._waiters) == 1)
            assert skipped == [0]
            waiter = stream._waiters[0]
            await h.publish(Other(0), Other(1))
            await h.publish(Other(2))
            # Still the same sleeper, moved past them, told each time.
            assert stream._waiters == [waiter]
            assert skipped == [0, 2, 3]
            assert yielded == []
            await h.publish(Other(3), Wanted(4))
            await wait_until(lambda: len(yielded) == 1)
            assert yielded[0].offset == 4
            # It read from where it slept, skipping offset 3 without a yield.
            await wait_until(lambda: len(stream._waiters) == 1)
            assert skipped == [0, 2, 3, 5]
            tg.cancel_scope.cancel()
        # A reader cancelled while it waits leaves no waiter behind.
        assert stream._waiters == []
        await h.publish(Other(5))


async def test_a_filtered_reader_woken_for_its_type_does_not_report_a_skip_past_it() -> None:
    # on_skip is only called while the reader waits with nothing in hand:
    # never with an offset past an event it is about to yield.
    async with harness(App(), registry=REGISTRY, partitions=1) as h:
        stream = h.streams[0]
        skipped: list[int] = []
        yielded: list[int] = []
        gate = anyio.Event()

        async def read() -> None:
            async with closing_iter(stream.read(0, types=WANTED, on_skip=skipped.append)) as events:
                async for event in events:
                    yielded.append(event.offset)
                    await gate.wait()  # the consumer is busy with it

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await wait_until(lambda: len(stream._waiters) == 1)
            await h.publish(Wanted(0))
            await wait_until(lambda: yielded == [0])
            await h.publish(Other(1), Other(2))  # while the consumer is busy
            assert skipped == [0]
            gate.set()
            await wait_until(lambda: len(stream._waiters) == 1)
            assert skipped == [0, 3]
            tg.cancel_scope.cancel()


async def test_a_filtered_reader_from_past_the_end_yields_nothing_before_its_offset() -> None:
    # A consumer may start past the end (a projection's checkpoint ahead of
    # the stream): sleeping through other types must not move it back.
    async with harness(App(), registry=REGISTRY, partitions=1) as h:
        stream = h.streams[0]
        skipped: list[int] = []
        yielded: list[int] = []

        async def read() -> None:
            async with closing_iter(stream.read(3, types=WANTED, on_skip=skipped.append)) as events:
                async for event in events:
                    yielded.append(event.offset)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await wait_until(lambda: len(stream._waiters) == 1)
            await h.publish(Other(0))
            await h.publish(Wanted(1), Wanted(2), Wanted(3))
            await wait_until(lambda: yielded != [])
            assert yielded == [3]
            assert skipped == sorted(skipped), "on_skip went back"
            tg.cancel_scope.cancel()
