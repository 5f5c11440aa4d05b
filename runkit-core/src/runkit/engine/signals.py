"""Making ``anyio.Event``s without looking up the event loop each time.

``anyio.Event()`` finds the running backend (through sniffio) on every call:
about 1.5 µs, which the partition loop, its stream writer and reader and the
local callers pay several times per command. A component takes an
``event_maker()`` once, in the event loop it runs in, and makes its events
with it from then on.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

__all__ = ["EventMaker", "event_maker"]

EventMaker = Callable[[], anyio.Event]


def event_maker() -> EventMaker:
    """A constructor of ``anyio.Event`` for the current event loop's backend.

    Returns the backend's event class when it can be constructed directly (as
    anyio's asyncio and trio events can), else ``anyio.Event`` itself. Outside
    an event loop it returns anyio's adapter class, whose events bind to the
    loop they are first used in: events made with it are always correct, and
    only the ones made in the loop skip the lookup.
    """
    cls = type(anyio.Event())
    if cls.__new__ is anyio.Event.__new__:  # constructing it would look up the backend anyway
        return anyio.Event
    return cls
