"""runkit plugin hooks: ``dynamodb://`` URLs resolve to a ``DynamoDBProvider``."""

from __future__ import annotations

from urllib.parse import urlsplit

from runkit import hookimpl
from runkit.persistence import Provider, parse_problems

from ._url import SCHEME, parse_url

__all__ = [
    "runkit_persistence_provider",
    "runkit_persistence_schemes",
    "runkit_persistence_url_problems",
]


@hookimpl
def runkit_persistence_schemes() -> list[str]:
    """This plugin handles ``dynamodb://`` URLs."""
    return [SCHEME]


@hookimpl
def runkit_persistence_provider(url: str) -> Provider | None:
    """Return a ``DynamoDBProvider`` for a ``dynamodb://`` URL, ``None`` for other schemes.

    Raises ``ValueError`` naming the problem for a malformed ``dynamodb://`` URL.
    """
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        return None  # not ours to judge
    if scheme != SCHEME:
        return None
    from ._provider import DynamoDBProvider

    return DynamoDBProvider.from_url(url)


@hookimpl
def runkit_persistence_url_problems(url: str) -> list[str] | None:
    """Every problem with a ``dynamodb://`` URL (no I/O); ``None`` for other schemes."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        return None  # not ours to judge
    if scheme != SCHEME:
        return None
    return parse_problems(parse_url, url)
