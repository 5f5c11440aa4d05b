"""Following a chain's events in a partition's stream journal, for nodes that cannot be reached.

A member observes a chain on the nodes that record it, over the node transport
(``cluster.routing``). A node without a listen address cannot be reached, and
one whose connection fails (a network split that leaves the store reachable)
may not be, so the events it records are read from the store instead: the
partition's stream journal, from shortly before the observation began, polled
until the observation ends. That costs a read per poll and up to a poll interval of
latency, but nothing recorded is missed.

Each record yields the chain's events, then a conclusive ``CommandDone`` for
each command of the chain it holds events of (a record never holds part of a
command's events). Commands that recorded no event are not listed in records,
so they give no note: an observer then waits for its events or its timeout
rather than being told early that nothing can follow.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from ...persistence import Journal, Provider, RecordNotFound
from ..envelope import closing_iter
from ..partitions import partition_id
from ..streams import (
    CommandDone,
    Observed,
    StreamEvent,
    StreamRecord,
    decode_stream_record,
    stream_name,
)

__all__ = ["FOLLOW_POLL_INTERVAL", "follow_chain"]

#: How often a followed stream journal is read for new records, in seconds.
FOLLOW_POLL_INTERVAL = 0.1
#: Records written this long before the observation began are read too: the
#: writers' clocks may differ from the observer's.
CLOCK_MARGIN = timedelta(seconds=5)
#: At most this many records are read back to find where to start.
MAX_LOOKBACK = 1_000


async def follow_chain(
    provider: Provider,
    app_key: str,
    index: int,
    correlation_id: str,
    send: MemoryObjectSendStream[Observed],
    *,
    since: datetime,
    poll_interval: float = FOLLOW_POLL_INTERVAL,
) -> None:
    """Send the chain's events recorded in partition *index* since about *since*, until cancelled.

    Returns when *send* is closed (the observer has left).
    """
    stream_id = partition_id(app_key, index)
    async with await provider.journals.open(stream_name(app_key, index)) as journal:
        position = await _start(journal, since - CLOCK_MARGIN)
        while True:
            bounds = await journal.bounds()
            position = max(position, bounds.begin)
            if position < bounds.end:
                # Closed here, not left to the collector: the observation may
                # end (or be cancelled) part-way through a driver's range.
                async with closing_iter(journal.range(position)) as records:
                    async for at, data in records:
                        if not _send(stream_id, correlation_id, decode_stream_record(data), send):
                            return
                        position = at + 1
            await anyio.sleep(poll_interval)


async def _start(journal: Journal, since: datetime) -> int:
    """The position of the first record written at or after *since* (within the lookback).

    Found by bisection (records are written in time order, give or take the
    owners' clocks, which ``CLOCK_MARGIN`` allows for): about ten reads
    where a walk back read up to ``MAX_LOOKBACK``, for every observation
    that follows a partition.
    """
    bounds = await journal.bounds()
    low, high = max(bounds.begin, bounds.end - MAX_LOOKBACK), bounds.end
    while low < high:
        middle = (low + high) // 2
        try:
            written_at = decode_stream_record(await journal.get(middle)).written_at
        except RecordNotFound:
            low = middle + 1  # truncated under us: what is left is later
            continue
        if written_at < since:
            low = middle + 1
        else:
            high = middle
    return low


def _send(
    stream_id: str,
    correlation_id: str,
    record: StreamRecord,
    send: MemoryObjectSendStream[Observed],
) -> bool:
    """Send the chain's part of *record*; ``False`` once the observer has left."""
    events = [
        StreamEvent(stream_id, record.first_offset + i, env, env.created_at)
        for i, env in enumerate(record.events)
        if env.correlation_id == correlation_id
    ]
    if not events:
        return True
    causes = {e.envelope.causation_id for e in events}
    items: list[Observed] = [*events]
    items += (
        CommandDone(correlation_id, command_id, conclusive=True)
        for command_id in record.command_ids
        if command_id in causes
    )
    try:
        for item in items:
            send.send_nowait(item)
    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
        return False
    return True
