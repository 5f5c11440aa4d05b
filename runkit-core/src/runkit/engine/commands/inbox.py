"""Partition inboxes: durable acceptance of commands with group commit.

``<app>/inbox/<p>`` is a journal of ``InboxRecord``s, each holding every command
that arrived while the previous append to that inbox was in flight. A command is
accepted once the record holding it is durable. An append that fails ambiguously
is resolved by reading back the position (each record carries a random batch
ID), so our own retries never append a batch twice.

The inbox is never deduplicated at acceptance: the same command ID may appear
more than once (a caller retrying with an idempotency key), and deduplication
happens where effects commit (see ``commands``).
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from datetime import datetime

import anyio
import anyio.lowlevel
import attrs
import msgspec
from anyio.abc import TaskStatus

from ...persistence import Conflict, Journal, LimitExceeded, PersistenceError, RecordNotFound
from ..backoff import backoff
from ..envelope import Envelope, closing_iter
from ..ids import delivery_id, new_id
from ..logs import RateLimitedLog, describe_error
from ..streams import UnconfirmedAppend, envelope_size

__all__ = [
    "EngineStopped",
    "InboxEntry",
    "InboxRecord",
    "InboxWriter",
    "append_to_inbox",
    "decode_inbox_record",
    "encode_inbox_record",
    "inbox_name",
    "read_inbox",
]

_log = logging.getLogger("runkit.engine.commands.inbox")
_retry_log = RateLimitedLog(_log)


class EngineStopped(RuntimeError):
    """The engine stopped, or the client was left, before an operation could complete.

    Raised by ``execute_command`` (of an engine's executor or a ``Client``)
    when the engine's ``run()`` ends, or the client's ``async with`` block is
    left, while the call waits to be accepted or for its observers; and by a
    client used after it was left. Whether a command accepted before that
    takes effect is not known to the caller: retry it with the same
    idempotency key.
    """


_STOPPED = "the engine stopped before the command was accepted"


def inbox_name(app_key: str, index: int) -> str:
    """The name of partition *index*'s inbox journal."""
    return f"{app_key}/inbox/{index}"


class InboxEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One accepted command.

    Attributes:
        envelope: The command.
        handler_key: The aggregate or integration that handles it.
        instance_id: The aggregate instance (``None`` for integrations).
        keyed: The command ID is derived (from an idempotency key or from its
            cause), so the same ID may be submitted again: once its effects
            commit, a marker goes into ``<app>/idempotency``.
        unconfirmed: Set on a command spilled here after its owner stopped
            with the stream append holding it unconfirmed: that append may
            have landed. Whoever reads the entry looks there before handling
            it (ADR 0002).
        offered_at: Set on a command spilled here after an offer to the
            partition's owner went unanswered (made at this time): the owner
            may have committed it. An owner that does not know the command
            looks for it in the stream records written since (ADR 0002).
        source: Set on a process *delivery* (ADR 0010), not a command: the
            event ``envelope`` at this (stream ID, offset), for the process
            instance ``instance_id`` of ``handler_key``, homed on this
            partition. It is named by ``ids.delivery_id``, not by the event's
            ID, and handled by the partition's process steps.
    """

    envelope: Envelope
    handler_key: str
    instance_id: str | None = None
    keyed: bool = False
    unconfirmed: UnconfirmedAppend | None = None
    offered_at: datetime | None = None
    source: tuple[str, int] | None = None

    @property
    def entry_id(self) -> str:
        """What stream records and the poison store name the entry by.

        The command's ID; for a delivery, the delivery ID (one event may be
        delivered to several processes homed on one partition).
        """
        if self.source is not None:
            return delivery_id(self.envelope.message_id, self.handler_key)
        return self.envelope.message_id


class InboxRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One inbox journal record: a group of commands accepted together."""

    batch_id: str
    entries: tuple[InboxEntry, ...]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(InboxRecord)


def encode_inbox_record(record: InboxRecord) -> bytes:
    """Encode an inbox record as msgpack."""
    return _encoder.encode(record)


def decode_inbox_record(data: bytes) -> InboxRecord:
    """Decode an inbox record."""
    return _decoder.decode(data)


async def append_to_inbox(
    journal: Journal,
    entries: Sequence[InboxEntry],
    *,
    position: int | None = None,
    max_attempts: int = 8,
    retry_max_delay: float = 5.0,
) -> int:
    """Append one record holding *entries* at the inbox's end; return its position.

    Safe to call from any node (the fallback path): a ``Conflict`` moves to the
    new end, unless the conflicting record is our own earlier attempt.
    Transient errors are retried up to *max_attempts* times.
    """
    record = InboxRecord(batch_id=new_id(), entries=tuple(entries))
    data = encode_inbox_record(record)
    if position is None:
        position = (await journal.bounds()).end
    failures = 0
    conflicted = False  # the last append conflicted: whose record is there?
    while True:
        try:
            if conflicted:
                # Read here, so that a failed read is retried like an append.
                try:
                    if await journal.get(position) == data:
                        return position  # an earlier, ambiguous attempt landed
                except RecordNotFound:
                    pass
                position = (await journal.bounds()).end
                conflicted = False
            await journal.append(position, data)
            return position
        except Conflict:
            conflicted = True
        except LimitExceeded:
            raise
        except PersistenceError as exc:
            failures += 1
            if failures >= max_attempts:
                raise
            delay = backoff(failures, 0.02, retry_max_delay)
            _retry_log.warning(
                journal.name,
                "appending to inbox %r at position %d failed, retrying in %.2fs: %s",
                journal.name,
                position,
                delay,
                describe_error(exc),
            )
            await anyio.sleep(delay)


async def read_inbox(
    journal: Journal, position: int
) -> AsyncGenerator[tuple[int, InboxRecord], None]:
    """Iterate the inbox records from *position* to the current end."""
    bounds = await journal.bounds()
    if position >= bounds.end:
        return
    async with closing_iter(journal.range(max(position, bounds.begin))) as records:
        async for pos, data in records:
            yield pos, decode_inbox_record(data)


@attrs.define
class _Waiter:
    entries: Sequence[InboxEntry]
    size: int
    done: anyio.Event = attrs.field(factory=anyio.Event)
    error: BaseException | None = None
    position: int = -1
    until_landed: bool = False


class InboxWriter:
    """Group commit into one partition inbox.

    ``submit`` returns once the submitted commands are durable; everything
    submitted while an append is in flight goes into the next record (up to the
    batch limits). ``listener`` (the partition's command processor, when this
    node runs it) is told of every record appended.
    """

    def __init__(
        self,
        journal: Journal,
        *,
        batch_limit: int,
        record_limit: int,
        max_attempts: int,
        retry_max_delay: float,
    ) -> None:
        self.journal = journal
        self.listener: Callable[[int, InboxRecord], None] | None = None
        self._batch_limit = batch_limit
        self._record_limit = max(1024, record_limit * 9 // 10)
        self._max_attempts = max_attempts
        self._retry_max_delay = retry_max_delay
        self._queue: deque[_Waiter] = deque()
        self._wake = anyio.Event()
        self._end: int | None = None
        self._stopped = False
        self.records_written = 0

    async def submit(self, entries: Sequence[InboxEntry], *, until_landed: bool = False) -> int:
        """Make *entries* durable in this inbox; return the position of their record.

        Storage faults are retried ``max_attempts`` times, then raised: an
        attempt may have landed all the same. With *until_landed* they are
        retried until the append is known to have landed (or the writer
        stops), for a caller that must know where its entries are.
        """
        if self._stopped:
            # Nothing would ever take it: a caller that fell back to the inbox
            # while the engine (or client) stopped must not wait for ever. A
            # caller cancelled along with the engine sees its cancellation.
            await anyio.lowlevel.checkpoint_if_cancelled()
            raise EngineStopped(_STOPPED)
        # Descriptions and IDs are free-length text too: all of it counts.
        size = sum(
            envelope_size(e.envelope) + len(e.handler_key) + len(e.instance_id or "")
            for e in entries
        )
        waiter = _Waiter(entries, size, until_landed=until_landed)
        self._queue.append(waiter)
        self._wake.set()
        await waiter.done.wait()
        if waiter.error is not None:
            # A caller cancelled along with the engine sees its cancellation.
            await anyio.lowlevel.checkpoint_if_cancelled()
            raise waiter.error
        return waiter.position

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Append submitted commands until cancelled; later submits fail at once."""
        self._stopped = False
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                while self._queue:
                    await self._write_one()
        finally:
            self._stopped = True
            error = EngineStopped(_STOPPED)
            while self._queue:
                waiter = self._queue.popleft()
                waiter.error = error
                waiter.done.set()

    async def _write_one(self) -> None:
        batch: list[_Waiter] = []
        count = size = 0
        for waiter in self._queue:
            full = count + len(waiter.entries) > self._batch_limit
            if batch and (full or size + waiter.size > self._record_limit):
                break
            batch.append(waiter)
            count += len(waiter.entries)
            size += waiter.size
        await self._append(batch)

    async def _append(self, batch: list[_Waiter]) -> None:
        """Append the commands of *batch* (the front of the queue) in one record."""
        entries = [e for w in batch for e in w.entries]
        attempts = sys.maxsize if any(w.until_landed for w in batch) else self._max_attempts
        try:
            position = await append_to_inbox(
                self.journal,
                entries,
                position=self._end,
                max_attempts=attempts,
                retry_max_delay=self._retry_max_delay,
            )
        except LimitExceeded as exc:
            if len(batch) == 1:
                self._fail(batch, exc)
                return
            # The store counts more than the estimate: each caller's commands
            # fit alone, so the group is split rather than refused as one.
            half = len(batch) // 2
            await self._append(batch[:half])
            await self._append(batch[half:])
            return
        except Exception as exc:
            self._fail(batch, exc)
            return
        self._end = position + 1
        self.records_written += 1
        if self.listener is not None:
            self.listener(position, InboxRecord(batch_id="", entries=tuple(entries)))
        for _ in batch:
            done = self._queue.popleft()
            done.position = position
            done.done.set()

    def _fail(self, batch: list[_Waiter], exc: Exception) -> None:
        self._end = None
        for _ in batch:
            waiter = self._queue.popleft()
            waiter.error = exc
            waiter.done.set()
