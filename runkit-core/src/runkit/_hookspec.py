"""Hook specifications that runkit plugins (persistence drivers) implement.

A driver distribution declares ``[project.entry-points.runkit] <name> = "<module>"``
and decorates functions in that module with ``@runkit.hookimpl``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .persistence import Provider

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]

#: The pluggy project name, which is also the entry-point group.
PROJECT_NAME = "runkit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def runkit_persistence_schemes() -> list[str]:  # type: ignore[empty-body]
    """Return the URL schemes this plugin opens, such as ``["s3"]``."""


@hookspec(firstresult=True)
def runkit_persistence_provider(url: str) -> Provider | None:
    """Return a provider for *url*, or ``None`` if its scheme is not this plugin's.

    Raise ``ValueError`` naming the fault (never echoing a password) if the
    scheme is this plugin's but the URL is malformed. Calling stops at the first
    non-``None`` result. The provider connects lazily: constructing it does no I/O.
    """


@hookspec(firstresult=True)
def runkit_persistence_url_problems(url: str) -> list[str] | None:
    """Check *url* without I/O: ``None`` if its scheme is not this plugin's, else its problems.

    Return every problem at once (an empty list for a valid URL), each a
    sentence naming the part or parameter, its value (never a password:
    use ``runkit.persistence.redact_url``) and what is expected. runkit calls
    this in ``with_persistence()`` and ``runkit env`` so mistakes surface before
    the engine starts. Optional: for a plugin without it, runkit calls
    ``runkit_persistence_provider`` there instead (which does no I/O), takes the
    ``ValueError`` it raises as the one problem, and discards the provider.
    """
