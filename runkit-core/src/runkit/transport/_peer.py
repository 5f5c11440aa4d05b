"""Who is on the other end: peer info, addresses and the authentication hook."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable

import attrs

__all__ = ["Authenticate", "PeerInfo", "authenticated", "format_address", "parse_address"]

_log = logging.getLogger("runkit.transport")

#: Decides whether a certificate fingerprint (SHA-256, lowercase hex) belongs to
#: a node we talk to: a live node of the same store, for the engine.
Authenticate = Callable[[str], bool | Awaitable[bool]]


@attrs.frozen
class PeerInfo:
    """The authenticated peer of a connection, as handlers and callers see it.

    ``node_id`` is the ID the peer announced in its handshake, ``fingerprint``
    the SHA-256 of its certificate (the value it publishes in its heartbeat)
    and ``address`` its ``host:port`` as seen from here.
    """

    node_id: str
    fingerprint: str
    address: str


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6 address]:port``) into host and port.

    :raises ValueError: naming the expected form.
    """
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid address {address!r}; expected host:port, e.g. 10.0.0.5:7400")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    """Join *host* and *port*, bracketing IPv6 addresses."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def authenticated(authenticate: Authenticate, fingerprint: str) -> bool:
    """Ask *authenticate* about *fingerprint*; a failing authenticator refuses."""
    try:
        verdict = authenticate(fingerprint)
        if inspect.isawaitable(verdict):
            verdict = await verdict
    except Exception:
        _log.exception("the authenticator failed for certificate %s; refusing it", fingerprint)
        return False
    return bool(verdict)
