"""Helpers built on the ``Journal`` primitive, usable with any driver."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ._errors import Conflict, RecordNotFound
from ._stores import Journal

__all__ = ["append_with_conflict_resolution", "first_record", "last_record", "search"]


async def first_record(journal: Journal) -> tuple[int, bytes] | None:
    """Return the first live ``(position, record)``, or ``None`` if the journal is empty.

    Reads the bounds, then the record; if a concurrent truncation removed it in
    between, starts again, so the answer is always a record that was live.
    """
    while True:
        bounds = await journal.bounds()
        if bounds.is_empty:
            return None
        try:
            return bounds.begin, await journal.get(bounds.begin)
        except RecordNotFound:
            continue  # truncated under us: the new begin is further on


async def last_record(journal: Journal) -> tuple[int, bytes] | None:
    """Return the last live ``(position, record)``, or ``None`` if the journal is empty.

    Like ``first_record``, retries if a concurrent truncation removed the
    record between reading the bounds and reading it.
    """
    while True:
        bounds = await journal.bounds()
        if bounds.is_empty:
            return None
        try:
            return bounds.end - 1, await journal.get(bounds.end - 1)
        except RecordNotFound:
            continue


async def append_with_conflict_resolution(
    journal: Journal,
    position: int,
    record: bytes,
    resolve: Callable[[int], Awaitable[int]],
) -> int:
    """Append *record* at *position*, asking *resolve* where to try next after each conflict.

    *resolve* receives the position that conflicted and returns the next one to
    try, typically after reading the records in between to check that the
    append is still wanted (or that an earlier, ambiguous attempt already wrote
    it). To give up it raises, and that exception propagates.

    Returns the position *after* the appended record: the journal's new end as
    far as this caller knows. Errors other than ``Conflict`` propagate as they are.
    """
    while True:
        try:
            await journal.append(position, record)
        except Conflict:
            position = await resolve(position)
        else:
            return position + 1


async def search(
    journal: Journal,
    compare: Callable[[int, bytes], int],
    *,
    begin: int | None = None,
    end: int | None = None,
) -> tuple[int, bytes] | None:
    """Binary-search ``[begin, end)`` for the record *compare* calls equal; ``None`` if none.

    ``compare(position, record)`` is negative when the record sorts before the
    wanted datum, positive when after, and zero on a match; records must be
    ordered accordingly. *begin* and *end* default to the journal's bounds.
    Reads ``O(log n)`` records; raises ``RecordNotFound`` if one of them is
    truncated during the search.
    """
    if begin is None or end is None:
        bounds = await journal.bounds()
        begin = bounds.begin if begin is None else begin
        end = bounds.end if end is None else end
    while begin < end:
        middle = (begin + end) // 2
        record = await journal.get(middle)
        order = compare(middle, record)
        if order > 0:
            end = middle
        elif order < 0:
            begin = middle + 1
        else:
            return middle, record
    return None
