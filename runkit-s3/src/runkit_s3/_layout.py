"""Object keys: how names, positions, keys and members map into one bucket.

Everything a provider stores lives under its key prefix ``P`` (``""`` or ending
in ``/``)::

    P j/<hex name>/m                 journal metadata: {"begin": ..., "token": ...}
    P j/<hex name>/r/<16 hex digits> the journal record at that position
    P k/<hex name>/<hex key>         keyspace entry: 1 version byte, 16-byte token, value
    P s/<hex name>/<hex member>      set member (empty body)

Names (UTF-8), keys and members are lowercase hex, so any bytes (NUL, ``/``,
``%``, non-UTF-8) are safe, no two names share a listing prefix (hex has no
``/``), and listing order is byte order. Positions are fixed-width so listing
order is position order. S3 keys are at most 1,024 bytes; names are capped at
``MAX_NAME_BYTES`` and keys and members get what is left.
"""

from __future__ import annotations

from typing import Final

import attrs

from runkit.persistence import Limits

__all__ = ["MAX_NAME_BYTES", "MAX_OBJECT_KEY_BYTES", "MAX_VALUE_BYTES", "Layout", "limits_for"]

#: S3's limit on the UTF-8 length of an object key.
MAX_OBJECT_KEY_BYTES: Final = 1024
#: Store names are hex-encoded into keys, so they cost twice their length.
MAX_NAME_BYTES: Final = 128
#: Records and values are held in memory whole; S3 itself allows 5 GB per PUT.
MAX_VALUE_BYTES: Final = 4 << 20
#: Longest store-kind overhead around the name and key: "k/" + hex name + "/".
_OVERHEAD: Final = len("k/") + 2 * MAX_NAME_BYTES + len("/")
_POSITION_DIGITS: Final = 16


def limits_for(prefix: str) -> Limits:
    """The limits of a provider whose keys start with *prefix*."""
    key_bytes = (MAX_OBJECT_KEY_BYTES - len(prefix.encode()) - _OVERHEAD) // 2
    return Limits(
        max_name_bytes=MAX_NAME_BYTES,
        max_key_bytes=key_bytes,
        max_value_bytes=MAX_VALUE_BYTES,
        max_record_bytes=MAX_VALUE_BYTES,
        max_member_bytes=key_bytes,
    )


def _hex_name(name: str) -> str:
    return name.encode("utf-8").hex()


@attrs.frozen
class JournalKeys:
    """The object keys of one journal."""

    meta: str
    records: str  # listing prefix of the record objects

    def record(self, position: int) -> str:
        """The key of the record at *position*."""
        return f"{self.records}{position:0{_POSITION_DIGITS}x}"

    def position(self, key: str) -> int:
        """The position of a record key returned by a listing."""
        return int(key[len(self.records) :], 16)


@attrs.frozen
class Layout:
    """Key construction for one provider prefix."""

    prefix: str

    def journal(self, name: str) -> JournalKeys:
        """The keys of journal *name*."""
        base = f"{self.prefix}j/{_hex_name(name)}/"
        return JournalKeys(meta=base + "m", records=base + "r/")

    def keyspace(self, name: str) -> str:
        """The listing prefix of keyspace *name*; an entry's key is this plus ``hex(key)``."""
        return f"{self.prefix}k/{_hex_name(name)}/"

    def set(self, name: str) -> str:
        """The listing prefix of set *name*; a member's key is this plus ``hex(member)``."""
        return f"{self.prefix}s/{_hex_name(name)}/"
