"""runkit plugin hooks: ``memory:///<silo>`` URLs resolve to a ``MemoryProvider``."""

from __future__ import annotations

from urllib.parse import urlsplit

from runkit import hookimpl
from runkit.persistence import Provider, query_params, redact_url

from ._provider import MemoryProvider

__all__ = ["parse_url", "runkit_persistence_provider", "runkit_persistence_schemes"]

SCHEME = "memory"


@hookimpl
def runkit_persistence_schemes() -> list[str]:
    """This plugin handles ``memory://`` URLs."""
    return [SCHEME]


@hookimpl
def runkit_persistence_provider(url: str) -> Provider | None:
    """Return a ``MemoryProvider`` for a ``memory:///<silo>`` URL, ``None`` for other schemes."""
    if urlsplit(url).scheme.lower() != SCHEME:
        return None
    return MemoryProvider(parse_url(url))


def parse_url(url: str) -> str:
    """Return the silo named by a ``memory:///<silo>`` URL.

    Raises ``ValueError`` naming the problem: a host (memory URLs have none, so
    ``memory://app`` is a likely typo of ``memory:///app``), a missing silo, a
    fragment, or any query parameter (none are defined).
    """
    parts = urlsplit(url)
    shown = redact_url(url)
    if parts.netloc:
        host = parts.netloc.rpartition("@")[2]
        raise ValueError(
            f"memory URL {shown!r} has a host ({host!r}); memory URLs have none: "
            f"use three slashes, e.g. 'memory:///{host}{parts.path}'"
        )
    query_params(url, frozenset())
    if parts.fragment:
        raise ValueError(f"memory URL {shown!r} has a fragment; expected 'memory:///<silo>'")
    silo = parts.path.removeprefix("/")
    if not silo:
        raise ValueError(f"memory URL {shown!r} names no silo; expected 'memory:///<silo>'")
    return silo
