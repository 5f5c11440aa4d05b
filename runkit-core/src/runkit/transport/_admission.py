"""Which accepted connections may hold a handshake slot, and for how long.

Each connection in its handshake costs a socket and a partial ``Hello`` (up
to 64 KiB), so they are bounded: in total, and per remote host. Refusing the
newcomer at a bound let anyone who opened that many connections and sent
nothing lock every member out for the whole handshake timeout. Instead:

- a connection that has sent nothing gets ``FIRST_BYTE_TIMEOUT``, not the
  full handshake timeout (a member's TLS ``ClientHello`` follows its connect
  at once);
- at a bound, the oldest connection that has sent nothing makes way for the
  newcomer; only if every slot has heard from its peer is the newcomer
  refused;
- one host holds at most ``MAX_PER_HOST`` slots, so a host that sends a byte
  and stalls still leaves the rest to others.

Silent connections thus cannot keep out one that talks, and a stalling host
holds no more than its share.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

__all__ = ["FIRST_BYTE_TIMEOUT", "MAX_PER_HOST", "Handshakes", "Slot", "Watched", "remote_host"]

#: Seconds an accepted connection may stay silent before it is dropped.
FIRST_BYTE_TIMEOUT = 2.0
#: Handshakes one remote host (IP address) may have in progress at once.
MAX_PER_HOST = 8


class Slot:
    """One handshake in progress: its deadline, and whether its peer has sent anything."""

    __slots__ = ("_handshakes", "evicted", "heard", "host", "scope", "started", "timeout")

    def __init__(self, handshakes: Handshakes, host: str, timeout: float) -> None:
        self._handshakes = handshakes
        self.host = host
        self.timeout = timeout
        self.started = anyio.current_time()
        self.heard = False
        self.evicted = False
        # The handshake runs in this scope: silent, it has the shorter deadline.
        self.scope = anyio.CancelScope(deadline=self.started + min(FIRST_BYTE_TIMEOUT, timeout))

    def hear(self) -> None:
        """The peer sent its first bytes: it gets the full handshake timeout."""
        if not self.heard:
            self.heard = True
            self.scope.deadline = self.started + self.timeout

    def release(self) -> None:
        """The handshake is over (done, failed or dropped): free the slot."""
        self._handshakes.release(self)

    def why_dropped(self) -> str:
        """Why the handshake scope was cancelled, for the log."""
        if self.evicted:
            return (
                f"it sent nothing in {anyio.current_time() - self.started:.1f} s and its "
                "handshake slot went to a newer connection"
            )
        if not self.heard and self.timeout > FIRST_BYTE_TIMEOUT:
            return f"it sent nothing within {FIRST_BYTE_TIMEOUT:g} s"
        return f"no handshake within {self.timeout:g} s"


class Handshakes:
    """The handshakes in progress on one server, bounded in total and per host."""

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit = limit
        self.timeout = timeout
        self._slots: dict[Slot, None] = {}  # oldest first

    def __len__(self) -> int:
        return len(self._slots)

    def admit(self, host: str) -> Slot | str:
        """Give a connection from *host* a slot, or say why not.

        At a bound, the oldest silent handshake in its scope (the host's, or
        all) is dropped to make room.
        """
        from_host = [slot for slot in self._slots if slot.host == host]
        if len(from_host) >= MAX_PER_HOST and not self._evict(from_host):
            return f"{len(from_host)} handshakes from {host} already in progress"
        if len(self._slots) >= self.limit and not self._evict(list(self._slots)):
            return f"{len(self._slots)} handshakes already in progress"
        slot = Slot(self, host, self.timeout)
        self._slots[slot] = None
        return slot

    def _evict(self, slots: list[Slot]) -> bool:
        for slot in slots:  # oldest first
            if not slot.heard:
                slot.evicted = True
                slot.scope.cancel()
                self.release(slot)
                return True
        return False

    def release(self, slot: Slot) -> None:
        self._slots.pop(slot, None)


class Watched(anyio.abc.ByteStream):
    """An accepted TCP stream that tells its handshake slot when the peer first sends."""

    def __init__(self, stream: anyio.abc.SocketStream, slot: Slot) -> None:
        self._stream = stream
        self._slot: Slot | None = slot

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self._stream.receive(max_bytes)
        if self._slot is not None:
            self._slot.hear()
            self._slot = None
        return data

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._stream.extra_attributes


def remote_host(tcp: anyio.abc.SocketStream) -> str:
    """The IP address of *tcp*'s peer, the unit of the per-host bound."""
    address = tcp.extra(SocketAttribute.remote_address, None)  # noqa: S610 - anyio, not Django
    if address is None:
        return "?"  # reset already: its handshake fails at once
    return address if isinstance(address, str) else str(address[0])
