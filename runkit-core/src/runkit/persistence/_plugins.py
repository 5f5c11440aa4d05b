"""Driver discovery: the pluggy plugin manager and URL resolution."""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from typing import cast
from urllib.parse import urlsplit

import attrs
import pluggy

from .. import _hookspec
from ._stores import Provider
from ._urls import InvalidURL, redact_url

__all__ = [
    "BrokenDriver",
    "broken_drivers",
    "check_url",
    "driver_package",
    "installed_schemes",
    "plugin_manager",
    "provider_from_url",
    "url_problems",
]

# Which distribution adds a scheme, for the "install it" hint.
_KNOWN_PACKAGES = {
    "memory": "runkit-memory",
    "postgres": "runkit-postgres",
    "postgresql": "runkit-postgres",
    "dynamodb": "runkit-dynamodb",
    "s3": "runkit-s3",
}


def driver_package(scheme: str) -> str | None:
    """The first-party distribution that adds *scheme*, for "install it" hints."""
    return _KNOWN_PACKAGES.get(scheme.lower())


_log = logging.getLogger("runkit.persistence")


@attrs.frozen
class BrokenDriver:
    """A ``runkit`` entry point that failed to load; its driver is left out."""

    #: The entry point's (plugin's) name.
    name: str
    #: The distribution that declares it, with its version.
    distribution: str
    #: The module the entry point names.
    module: str
    #: Why it failed: the exception's type and message.
    error: str


_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None
_broken: tuple[BrokenDriver, ...] = ()


def plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, loading ``runkit`` entry points once.

    An entry point that fails to load (a third-party driver whose import
    raises, say) is logged as a warning and left out, see ``broken_drivers``.
    Tests and applications may ``register()`` further plugins on it at run time.
    """
    global _manager, _broken  # noqa: PLW0603 - one manager per process, created lazily
    with _lock:
        if _manager is None:
            pm = pluggy.PluginManager(_hookspec.PROJECT_NAME)
            pm.add_hookspecs(_hookspec)
            _broken = _load_entry_points(pm)
            pm.check_pending()
            _manager = pm
        return _manager


def _load_entry_points(pm: pluggy.PluginManager) -> tuple[BrokenDriver, ...]:
    """Load each ``runkit`` entry point on its own; return those that failed.

    One broken driver must not take down the others, nor every command that
    looks a driver up (``runkit env``, ``with_persistence("memory:///x")``).
    """
    broken: list[BrokenDriver] = []
    tried: set[str] = set()
    for ep in importlib.metadata.entry_points(group=_hookspec.PROJECT_NAME):
        if ep.name in tried:
            continue  # pluggy loads the first of several with one name, as before
        tried.add(ep.name)
        try:
            # pluggy's loader, one name at a time: it also records the distribution.
            pm.load_setuptools_entrypoints(_hookspec.PROJECT_NAME, name=ep.name)
        except Exception as exc:  # whatever a third party's import raises
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "an unknown distribution"
            found = BrokenDriver(ep.name, dist, ep.value, f"{type(exc).__name__}: {exc}")
            broken.append(found)
            _log.warning(
                "skipping the persistence driver %r of %s: importing %s failed: %s",
                found.name,
                found.distribution,
                found.module,
                found.error,
            )
    return tuple(broken)


def broken_drivers() -> tuple[BrokenDriver, ...]:
    """The ``runkit`` entry points that failed to load (their drivers are missing)."""
    plugin_manager()
    return _broken


def installed_schemes() -> dict[str, str]:
    """Map each scheme the installed plugins handle to the plugin's name."""
    pm = plugin_manager()
    schemes: dict[str, str] = {}
    for impl in pm.hook.runkit_persistence_schemes.get_hookimpls():
        names = cast(list[str], impl.function())
        for scheme in names:
            schemes.setdefault(scheme.lower(), impl.plugin_name)
    return schemes


def _scheme(url: str) -> str:
    """The URL's scheme, lowercased; ``ValueError`` if it is malformed or has none."""
    if not isinstance(url, str):
        raise TypeError(f"persistence URL must be str, not {type(url).__name__}")
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:
        raise ValueError(f"malformed persistence URL {redact_url(url)!r}: {exc}") from None
    if not scheme:
        raise ValueError(
            f"persistence URL {redact_url(url)!r} has no scheme; "
            "expected e.g. 'memory:///app' or 'postgresql://host/db'"
        )
    return scheme


def _unknown_scheme(url: str, scheme: str, known: dict[str, str]) -> str:
    if not url[len(scheme) + 1 :].startswith("//"):
        # 'db.internal:5432/app' parses with the host for a scheme: the scheme is missing.
        return (
            f"persistence URL {redact_url(url)!r} does not start with a scheme "
            f"({scheme!r} is not one); expected e.g. 'memory:///app' or "
            f"'postgresql://host/db' (installed schemes: {', '.join(sorted(known)) or 'none'})"
        )
    # Only first-party package names are suggested: an invented "runkit-<scheme>"
    # would invite installing whatever a squatter publishes under that name.
    package = driver_package(scheme)
    hint = (
        f"install the driver: pip install {package}"
        if package
        else "install a runkit driver plugin that handles it"
    )
    # The scheme may be a broken driver's: say why that one is missing.
    for broken in _broken:
        hint += (
            f"; the driver {broken.name!r} of {broken.distribution} failed to load: {broken.error}"
        )
    return (
        f"no persistence driver handles {scheme!r} URLs "
        f"(installed schemes: {', '.join(sorted(known)) or 'none'}); {hint}"
    )


def url_problems(url: str) -> list[str]:
    """Every problem with persistence *url* found without I/O (empty if none).

    Checks the scheme against the installed drivers, then asks the driver
    (hook ``runkit_persistence_url_problems``) to check the rest. A driver
    without that hook is asked for a provider instead (constructing one does
    no I/O, by the hook's contract), and the ``ValueError`` it raises for a
    malformed URL is the problem. Problems never show a password.
    """
    try:
        scheme = _scheme(url)
    except ValueError as exc:
        return [str(exc)]
    known = installed_schemes()
    if scheme not in known:
        return [_unknown_scheme(url, scheme, known)]
    try:
        found = plugin_manager().hook.runkit_persistence_url_problems(url=url)
    except InvalidURL as exc:
        return list(exc.problems)
    except ValueError as exc:  # a driver that raises instead of returning problems
        return [str(exc)]
    if found is not None:
        return [str(p) for p in found]
    try:
        plugin_manager().hook.runkit_persistence_provider(url=url)
    except ValueError as exc:
        return [str(exc)]
    return []


def check_url(url: str) -> None:
    """Raise ``InvalidURL`` (a ``ValueError``) listing every problem with *url*; no I/O.

    See ``url_problems``. Raises ``TypeError`` if *url* is not a str.
    """
    problems = url_problems(url)
    if problems:
        raise InvalidURL(url, problems)


def provider_from_url(url: str) -> Provider:
    """Resolve a persistence URL to a provider through the installed driver plugins.

    Raises ``ValueError`` for a malformed URL (naming the bad part) or a scheme no
    installed driver handles (listing installed schemes and, for first-party
    drivers, the package to install). Passwords never appear in the error messages.
    """
    scheme = _scheme(url)
    known = installed_schemes()
    if scheme not in known:
        raise ValueError(_unknown_scheme(url, scheme, known))
    provider = plugin_manager().hook.runkit_persistence_provider(url=url)
    if provider is None:
        raise ValueError(
            f"the {known[scheme]!r} plugin lists scheme {scheme!r} "
            f"but returned no provider for {redact_url(url)!r}"
        )
    return cast(Provider, provider)
