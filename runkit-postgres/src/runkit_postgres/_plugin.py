"""runkit plugin hooks: ``postgres://`` and ``postgresql://`` URLs."""

from __future__ import annotations

from urllib.parse import urlsplit

from runkit import hookimpl
from runkit.persistence import Provider, parse_problems

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


@hookimpl
def runkit_persistence_url_problems(url: str) -> list[str] | None:
    """Every problem with a PostgreSQL URL (parsed by libpq, no I/O); ``None`` for other schemes."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        return None  # not ours to judge; the resolver reports malformed URLs
    if scheme not in SCHEMES:
        return None
    from ._config import parse_url  # imports psycopg, so only when asked

    return parse_problems(parse_url, url)
