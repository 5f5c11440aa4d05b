"""runkit plugin hooks: ``postgres://`` and ``postgresql://`` URLs."""

from __future__ import annotations

from urllib.parse import urlsplit

from runkit import hookimpl
from runkit.persistence import Provider

from ._schemes import SCHEMES


@hookimpl
def runkit_persistence_schemes() -> list[str]:
    """The URL schemes this driver opens."""
    return list(SCHEMES)


@hookimpl
def runkit_persistence_provider(url: str) -> Provider | None:
    """A ``PostgresProvider`` for a PostgreSQL URL; ``None`` for other schemes."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        return None  # not ours to judge; the resolver reports malformed URLs
    if scheme not in SCHEMES:
        return None
    from ._provider import PostgresProvider

    return PostgresProvider.from_url(url)
