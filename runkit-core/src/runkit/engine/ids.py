"""New random identifiers: message, batch and writer IDs.

``str(uuid.uuid4())`` costs about 2.2 µs, most of it building a ``UUID``
object only to format it, and each call reads the operating system's CSPRNG.
:func:`new_id` reads ``os.urandom`` once per 128 IDs and formats them straight
into the canonical text, in about 0.6 µs per ID.
"""

from __future__ import annotations

import os
from collections import deque

__all__ = ["new_id"]

# The variant field (RFC 9562 §4.1) keeps a random hex digit's low two bits: 8, 9, a or b.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}
#: IDs made per read of the CSPRNG.
_BATCH = 128

# Ready IDs. ``deque.popleft`` and ``extend`` are atomic, so threads never share
# an ID; each ID is taken once.
_ready: deque[str] = deque()


def new_id() -> str:
    """Return a new random UUID (version 4) as a canonical lowercase RFC 9562 string.

    Equivalent to ``str(uuid.uuid4())``: 122 random bits from the operating
    system's CSPRNG, so IDs are unique across processes and hosts without
    coordination, and safe to generate after ``fork()`` (a child forgets the
    parent's unused IDs).
    """
    try:
        return _ready.popleft()
    except IndexError:
        _refill()
        return _ready.popleft()


def _refill() -> None:
    h = os.urandom(16 * _BATCH).hex()
    # The version digit replaces h[12]; the variant digit keeps 2 of h[16]'s bits.
    _ready.extend(
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-4{h[i + 13 : i + 16]}-"
        f"{_VARIANT[h[i + 16]]}{h[i + 17 : i + 20]}-{h[i + 20 : i + 32]}"
        for i in range(0, 32 * _BATCH, 32)
    )


def _forget_after_fork() -> None:
    _ready.clear()


# A forked child must not hand out the IDs its parent may still use.
os.register_at_fork(after_in_child=_forget_after_fork)
