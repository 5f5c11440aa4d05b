"""runkit plugin hooks: ``memory:///<silo>`` URLs resolve to a ``MemoryProvider``."""

from __future__ import annotations

from urllib.parse import urlsplit

from runkit import hookimpl
from runkit.persistence import Provider, URLProblems, parse_problems, query_params, redact_url

from ._provider import MemoryProvider

__all__ = [
    "parse_url",
    "runkit_persistence_provider",
    "runkit_persistence_schemes",
    "runkit_persistence_url_problems",
]

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


@hookimpl
def runkit_persistence_url_problems(url: str) -> list[str] | None:
    """Every problem with a ``memory://`` URL (no I/O); ``None`` for other schemes."""
    if urlsplit(url).scheme.lower() != SCHEME:
        return None
    return parse_problems(parse_url, url)


def parse_url(url: str) -> str:
    """Return the silo named by a ``memory:///<silo>`` URL.

    Raises ``runkit.persistence.InvalidURL`` (a ``ValueError``) listing every
    problem: a host (memory URLs have none, so ``memory://app`` is a likely typo
    of ``memory:///app``), a missing silo, a fragment, and each query parameter
    (none are defined).
    """
    parts = urlsplit(url)
    shown = redact_url(url)
    problems = URLProblems(url)
    if parts.netloc:
        host = parts.netloc.rpartition("@")[2]
        problems.add(
            f"memory URL {shown!r} has a host ({host!r}); memory URLs have none: "
            f"use three slashes, e.g. 'memory:///{host}{parts.path}'"
        )
    query_params(url, frozenset(), problems)
    if parts.fragment:
        problems.add(f"memory URL {shown!r} has a fragment; expected 'memory:///<silo>'")
    silo = parts.path.removeprefix("/")
    if not silo and not parts.netloc:
        problems.add(f"memory URL {shown!r} names no silo; expected 'memory:///<silo>'")
    problems.raise_if_any()
    return silo
