"""Journals on S3: one object per record, keyed by position, plus a metadata object.

Layout (see ``_layout``): ``m`` holds ``begin`` (the truncation point) and a
fresh token, and is only ever replaced with ``If-Match`` (or created with
``If-None-Match: *``); ``r/<position>`` holds the record, written once with
``If-None-Match: *``. ``end`` is not stored: it is one past the last record.

Invariants (``b`` = begin in ``m``, ``e`` = end):

1. ``b`` never decreases, and ``e`` never decreases.
2. Every position in ``[b, e)`` has a record object; no position ``>= e`` has one.
   Objects below ``b`` are garbage (truncated, or left by a failed write) that
   readers ignore and compaction deletes.

Append at ``pos`` (the protocol; ``docs/drivers/s3.md`` has the argument):

1. *Pre-read* ``m``: ``pos < b`` is a conflict, nothing written. Establish
   ``pos <= e`` (so step 2 can never write past the end and break invariant 2):
   ``pos == 0``, ``pos <= b``, ``pos <=`` a previously observed end (``e`` only
   grows), or ``r/<pos-1>`` exists (HEAD, in parallel with the pre-read).
2. PUT ``r/<pos>`` with ``If-None-Match: *``. 412/409 means ``pos < e``: conflict.
   Success means the object was absent, so ``pos == e`` -- unless compaction had
   deleted it, i.e. a truncation moved ``b`` past ``pos`` while we were not looking
   (the Go driver's lost append).
3. *Post-read* ``m``: ``b <= pos`` now means ``b <= pos`` at the PUT (``b`` only
   grows), so the record is live: acknowledged. ``b > pos`` means a truncation
   past ``pos`` raced this append; the record is garbage either way, so it is
   deleted and the outcome reported as ambiguous (it may have been appended and
   then truncated). A stale handle whose position was truncated *before* it
   called ``append`` always stops at step 1 with ``Conflict``.

Truncate: CAS ``m`` to the new ``begin`` (re-reading on 412/409), then compact:
list ``r/`` from the start and delete every key below ``begin``. Readers check
``begin`` themselves, so records are invisible as soon as the CAS lands, and a
retried truncate (or any later one) finishes a compaction that failed.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

import msgspec

from runkit.persistence import (
    MAX_POSITION,
    Conflict,
    Interval,
    Journal,
    PersistenceError,
    RecordNotFound,
    check_position,
)

from ._client import Blob, ConditionFailed, S3Objects, gather
from ._layout import JournalKeys

if TYPE_CHECKING:
    from ._provider import S3Provider

__all__ = ["JournalState", "S3Journal"]

#: ``range`` fetches up to this many records concurrently (batches grow 1, 2, 4, ...).
MAX_PREFETCH: Final = 32


class _Meta(msgspec.Struct, forbid_unknown_fields=False):
    """The body of a journal's metadata object."""

    begin: int
    token: str  # never repeats, so every write changes the ETag


_encode_meta = msgspec.json.Encoder().encode
_decode_meta = msgspec.json.Decoder(_Meta).decode


class JournalState:
    """What a provider has learned about one journal: lower bounds of begin and end.

    Both only ever grow on the backend, so any value once observed stays a
    valid lower bound forever; shared by every handle of the name in a provider.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._begin = 0
        self._end = 0

    def get(self) -> tuple[int, int]:
        """Return ``(begin, end)`` lower bounds."""
        with self._lock:
            return self._begin, self._end

    def observe(self, *, begin: int = 0, end: int = 0) -> None:
        """Record that begin was at least *begin* and end at least *end*."""
        with self._lock:
            self._begin = max(self._begin, begin)
            self._end = max(self._end, end, self._begin)


class S3Journal(Journal):
    """A journal handle; safe to share between tasks."""

    def __init__(
        self, provider: S3Provider, name: str, keys: JournalKeys, state: JournalState
    ) -> None:
        self._provider = provider
        self._name = name
        self._keys = keys
        self._state = state
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    async def close(self) -> None:
        self._closed = True

    def __repr__(self) -> str:
        state = " (closed)" if self._closed else ""
        return f"<s3 journal {self._name!r}{state}>"

    def _objects(self) -> S3Objects:
        if self._closed:
            raise PersistenceError(f"journal {self._name!r}: handle is closed")
        return self._provider._objects()

    def _writable(self, operation: str) -> S3Objects:
        """``_objects()``, refusing *operation* (a write) on a read-only provider."""
        objects = self._objects()
        self._provider.refuse_if_read_only(f"journal {self._name!r}: {operation}")
        return objects

    async def _read_meta(self, objects: S3Objects) -> tuple[int, str | None]:
        """Return ``(begin, etag)`` of the metadata object (``(0, None)`` if absent)."""
        blob = await objects.get(self._keys.meta)
        if blob is None:
            return 0, None
        try:
            begin = _decode_meta(blob.body).begin
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # malformed, or the wrong shape
            raise PersistenceError(
                f"journal {self._name!r}: corrupt metadata object {self._keys.meta!r}: {exc}"
            ) from None
        self._state.observe(begin=begin)
        return begin, blob.etag

    async def bounds(self) -> Interval:
        objects = self._objects()
        cached_begin, cached_end = self._state.get()
        start = max(cached_begin, cached_end)  # both are lower bounds of end
        (begin, _), last = await gather(
            functools.partial(self._read_meta, objects),
            functools.partial(self._last_position, objects, start),
        )
        # Records below begin may still be listed (compaction pending); they
        # never lie above the end, so they cannot inflate it.
        end = max(begin, start, last + 1)
        self._state.observe(begin=begin, end=end)
        return Interval(begin, end)

    async def _last_position(self, objects: S3Objects, start: int) -> int:
        """The highest position with an object at or above *start*, or -1."""
        after = self._keys.record(start - 1) if start > 0 else None
        last = -1
        token: str | None = None
        while True:
            keys, token = await objects.list(self._keys.records, start_after=after, token=token)
            if keys:
                last = self._keys.position(keys[-1])
            if token is None:
                return last

    async def get(self, pos: int) -> bytes:
        objects = self._objects()
        if not isinstance(pos, int) or isinstance(pos, bool):
            raise TypeError(f"position must be int, not {type(pos).__name__}")
        if not 0 <= pos <= MAX_POSITION or pos < self._state.get()[0]:
            raise RecordNotFound(self._name, pos)
        record = await objects.get(self._keys.record(pos))
        if record is None:
            raise RecordNotFound(self._name, pos)
        # Begin is read only now, as in ``range``: begin <= position after the GET
        # means it was so during the GET (begin only grows), so the object read was
        # live. Read in parallel, begin could predate a truncation and compaction
        # after which a stale writer's PUT re-created the object (deleted again by
        # that writer's step 3): a record never in the journal at this position.
        begin, _ = await self._read_meta(objects)
        if pos < begin:
            raise RecordNotFound(self._name, pos)
        self._state.observe(end=pos + 1)
        return record.body

    async def range(self, pos: int) -> AsyncIterator[tuple[int, bytes]]:
        objects = self._objects()
        if not isinstance(pos, int) or isinstance(pos, bool):
            raise TypeError(f"position must be int, not {type(pos).__name__}")
        if not 0 <= pos <= MAX_POSITION or pos < self._state.get()[0]:
            raise RecordNotFound(self._name, pos)
        batch = 1
        records = await self._fetch(objects, pos, batch)
        first = True
        while True:
            # Read begin *after* this batch's records (a record is live if it
            # existed and begin had not passed it by then), and meanwhile fetch
            # the next batch if this one reached no end.
            batch = min(batch * 2, MAX_PREFETCH)
            start = pos + len(records)
            more = records[-1] is not None and start <= MAX_POSITION
            begin, following = await self._begin_and_fetch(objects, start, batch if more else 0)
            if pos < begin or (first and records[0] is None):
                # Not live on the first step, or a truncation overtook us.
                raise RecordNotFound(self._name, pos)
            first = False
            for blob in records:
                if blob is None:
                    return  # the end
                self._state.observe(end=pos + 1)
                yield pos, blob.body
                pos += 1
            if not following:
                return  # position MAX_POSITION was the last
            records = following
            objects = self._objects()  # stop if the handle was closed meanwhile

    async def _begin_and_fetch(
        self, objects: S3Objects, start: int, count: int
    ) -> tuple[int, list[Blob | None]]:
        """Read begin and GET the records at ``[start, start + count)``, concurrently."""
        (begin, _), records = await gather(
            functools.partial(self._read_meta, objects),
            functools.partial(self._fetch, objects, start, count),
        )
        return begin, records

    async def _fetch(self, objects: S3Objects, start: int, count: int) -> list[Blob | None]:
        """GET the records at ``[start, start + count)`` concurrently (``None`` if absent)."""
        count = min(count, MAX_POSITION - start + 1)
        return await objects.get_many([self._keys.record(start + i) for i in range(count)])

    async def append(self, pos: int, record: bytes) -> None:
        pos = check_position(pos)
        record = self._provider.limits.check_record(record)
        objects = self._writable("append")
        cached_begin, cached_end = self._state.get()
        if pos < cached_begin:
            raise Conflict.journal(self._name, pos)  # truncated: begin only grows

        # Step 1: pre-read begin, and make sure position <= end.
        need_previous = pos > max(cached_begin, cached_end)
        if need_previous:
            (begin, _), previous = await gather(
                functools.partial(self._read_meta, objects),
                functools.partial(objects.head, self._keys.record(pos - 1)),
            )
            previous_exists = previous is not None
        else:
            begin, _ = await self._read_meta(objects)
            previous_exists = True
        if pos < begin:
            raise Conflict.journal(self._name, pos)
        if need_previous and not previous_exists and pos > begin:
            # position-1 is missing: past the end, or compacted since we read begin.
            begin, _ = await self._read_meta(objects)
            if pos != begin:
                raise Conflict.journal(self._name, pos)

        # Step 2: the write itself; exactly one writer can create the object.
        key = self._keys.record(pos)
        try:
            await objects.put(key, record, if_none_match=True)
        except ConditionFailed as exc:
            if exc.exists:  # 412: the record is there, so end > position (409 says less)
                self._state.observe(end=pos + 1)
            raise Conflict.journal(self._name, pos) from None

        # Step 3: post-read begin; the record is live only if begin has not passed it.
        try:
            begin, _ = await self._read_meta(objects)
        except PersistenceError as exc:
            raise PersistenceError(
                f"journal {self._name!r}: append at position {pos} was written but "
                f"could not be confirmed ({exc}); it may or may not be in the journal",
                ambiguous=True,
            ) from None
        if pos < begin:
            # Garbage either way (below begin). Readers already ignore it; delete
            # it now rather than at the next compaction, if we can.
            with contextlib.suppress(PersistenceError):
                await objects.delete(key)
            raise PersistenceError(
                f"journal {self._name!r}: append at position {pos} raced a truncation "
                f"to {begin}; the record may have been appended and then truncated",
                ambiguous=True,
            )
        self._state.observe(end=pos + 1)

    async def truncate(self, pos: int) -> None:
        pos = check_position(pos)
        objects = self._writable("truncate")
        while True:
            begin, etag = await self._read_meta(objects)
            if pos <= begin:
                break
            await self._check_not_past_end(objects, pos)
            body = _encode_meta(_Meta(begin=pos, token=uuid.uuid4().hex))
            try:
                if etag is None:
                    await objects.put(self._keys.meta, body, if_none_match=True)
                else:
                    await objects.put(self._keys.meta, body, if_match=etag)
            except ConditionFailed:
                continue  # another truncate got there first: re-read and re-check
            begin = pos
            self._state.observe(begin=begin)
            break
        await self._compact(objects, begin)

    async def _check_not_past_end(self, objects: S3Objects, position: int) -> None:
        cached_begin, cached_end = self._state.get()
        if position <= max(cached_begin, cached_end):
            return
        if await objects.head(self._keys.record(position - 1)) is not None:
            self._state.observe(end=position)
            return
        bounds = await self.bounds()
        if position > bounds.end:
            raise ValueError(
                f"journal {self._name!r}: cannot truncate to position {position}, "
                f"past the end ({bounds.end})"
            )

    async def _compact(self, objects: S3Objects, begin: int) -> None:
        """Delete every record object below *begin* (idempotent; sweeps leftovers too)."""
        limit = self._keys.record(begin)
        token: str | None = None
        while True:
            keys, token = await objects.list(self._keys.records, token=token)
            doomed = [k for k in keys if k < limit]
            if doomed:
                await objects.delete_many(doomed)
            if token is None or len(doomed) < len(keys):
                return
