"""Values shared by every provider: journal intervals and declared limits."""

from __future__ import annotations

from collections.abc import Iterator

import attrs

from ._errors import LimitExceeded

__all__ = ["MAX_POSITION", "Interval", "Limits"]

#: Journal positions are integers in ``[0, MAX_POSITION]``; reads outside are not found.
MAX_POSITION = 2**63 - 1


@attrs.frozen
class Interval:
    """The half-open range ``[begin, end)`` of a journal's live positions.

    It unpacks as a pair, ``begin, end = await journal.bounds()``; ``len()``
    and ``in`` are about the live positions it spans.
    """

    begin: int
    end: int

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.begin <= self.end:
            raise ValueError(f"invalid interval [{self.begin}, {self.end})")

    def __iter__(self) -> Iterator[int]:
        """Yield ``begin`` then ``end``, so an interval unpacks as a pair."""
        yield self.begin
        yield self.end

    def __len__(self) -> int:
        return self.end - self.begin

    def __contains__(self, position: object) -> bool:
        return isinstance(position, int) and self.begin <= position < self.end

    @property
    def is_empty(self) -> bool:
        """True when no position is live (including a fresh journal)."""
        return self.begin == self.end

    @property
    def is_fresh(self) -> bool:
        """True when nothing was ever appended."""
        return self.end == 0


def _as_bytes(what: str, value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"{what} must be bytes, not {type(value).__name__}")


@attrs.frozen
class Limits:
    """The largest inputs a provider accepts, in bytes.

    The ``check_*`` methods validate an input before any I/O, return it as an
    independent ``bytes`` copy, and raise ``LimitExceeded`` (over a limit),
    ``ValueError`` (empty where not allowed, unencodable name) or ``TypeError``.
    """

    max_name_bytes: int = 1024
    max_key_bytes: int = 1024
    max_value_bytes: int = 1 << 20
    max_record_bytes: int = 1 << 20
    max_member_bytes: int = 1024

    def check_name(self, kind: str, name: object) -> str:
        """Validate a store name: a non-empty ``str`` encodable as UTF-8, within the limit."""
        if not isinstance(name, str):
            raise TypeError(f"{kind} name must be str, not {type(name).__name__}")
        if not name:
            raise ValueError(f"{kind} name must not be empty")
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise ValueError(f"{kind} name {name!r} is not valid Unicode: {exc.reason}") from None
        if size > self.max_name_bytes:
            raise LimitExceeded(f"{kind} name", size, self.max_name_bytes)
        return name

    def check_key(self, key: object) -> bytes:
        """Validate a keyspace key: non-empty bytes within ``max_key_bytes``."""
        data = _as_bytes("key", key)
        if not data:
            raise ValueError("key must not be empty")
        if len(data) > self.max_key_bytes:
            raise LimitExceeded("key", len(data), self.max_key_bytes)
        return data

    def check_value(self, value: object) -> bytes:
        """Validate a keyspace value (empty means delete) within ``max_value_bytes``."""
        data = _as_bytes("value", value)
        if len(data) > self.max_value_bytes:
            raise LimitExceeded("value", len(data), self.max_value_bytes)
        return data

    def check_record(self, record: object) -> bytes:
        """Validate a journal record (may be empty) within ``max_record_bytes``."""
        data = _as_bytes("record", record)
        if len(data) > self.max_record_bytes:
            raise LimitExceeded("record", len(data), self.max_record_bytes)
        return data

    def check_member(self, member: object) -> bytes:
        """Validate a set member: non-empty bytes within ``max_member_bytes``."""
        data = _as_bytes("member", member)
        if not data:
            raise ValueError("member must not be empty")
        if len(data) > self.max_member_bytes:
            raise LimitExceeded("member", len(data), self.max_member_bytes)
        return data


def check_position(position: object) -> int:
    """Validate a journal position for a write: an ``int`` in ``[0, MAX_POSITION]``."""
    if not isinstance(position, int) or isinstance(position, bool):
        raise TypeError(f"position must be int, not {type(position).__name__}")
    if not 0 <= position <= MAX_POSITION:
        raise ValueError(f"position {position} is outside [0, 2**63-1]")
    return position
