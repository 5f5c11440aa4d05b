"""runkit plugin hooks: ``s3://`` URLs resolve to an ``S3Provider``."""

from __future__ import annotations

from urllib.parse import urlsplit

from runkit import hookimpl
from runkit.persistence import Provider, parse_problems

from ._settings import SCHEME, parse_url

__all__ = [
    "runkit_persistence_provider",
    "runkit_persistence_schemes",
    "runkit_persistence_url_problems",
]


@hookimpl
def runkit_persistence_schemes() -> list[str]:
    """This plugin handles ``s3://`` URLs."""
    return [SCHEME]


@hookimpl
def runkit_persistence_provider(url: str) -> Provider | None:
    """Return an ``S3Provider`` for an ``s3://`` URL, ``None`` for other schemes."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        return None  # not ours to diagnose
    if scheme != SCHEME:
        return None
    from ._provider import S3Provider

    return S3Provider.from_url(url)


@hookimpl
def runkit_persistence_url_problems(url: str) -> list[str] | None:
    """Every problem with an ``s3://`` URL (no I/O); ``None`` for other schemes."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        return None  # not ours to diagnose
    if scheme != SCHEME:
        return None
    return parse_problems(parse_url, url)
