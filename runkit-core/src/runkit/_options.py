"""Engine options: ``runkit.with_*`` functions and ``from_environment()``.

Each function validates its arguments at the call (``ValueError``/``TypeError``
naming the bad value) and returns an opaque ``Option``. ``resolve_options``
turns a sequence of options into ``EngineSettings``; explicit options beat
environment variables whatever their order.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import attrs

from . import config
from ._environment import ENVIRONMENT, EnvironmentValues
from ._validate import parse_address, parse_node_id, parse_site
from .engine.settings import EngineSettings
from .persistence import Provider, driver_package, installed_schemes, redact_url

__all__ = [
    "Option",
    "from_environment",
    "resolve_options",
    "with_advertise_address",
    "with_application",
    "with_heartbeat_interval",
    "with_listen_address",
    "with_node_id",
    "with_partition_count",
    "with_persistence",
    "with_persistence_provider",
    "with_retry_policy",
    "with_site",
]


@attrs.frozen(repr=False)
class Option:
    """A configuration option for ``runkit.Engine``, made by a ``runkit.with_*`` function."""

    name: str
    #: The EngineSettings field this option sets, or "application"/"environment".
    field: str
    value: Any = attrs.field(eq=False)
    #: How the option prints: never shows a password.
    shown: str = attrs.field(eq=False)

    def __repr__(self) -> str:
        return self.shown


def with_application(app: object) -> Option:
    """Register a Dogma application; its configuration is built and validated now.

    Raises ``TypeError`` for ``None`` and ``runkit.ConfigurationError`` listing
    every problem in the application's configuration.
    """
    if app is None:
        raise TypeError("with_application(None): pass a Dogma application object")
    if not callable(getattr(app, "configure", None)):
        raise TypeError(
            f"with_application({type(app).__name__} object): a Dogma application must "
            "have a configure(c) method"
        )
    built = config.build(app)
    return Option(
        "with_application",
        "application",
        built,
        f"with_application({built.identity.name!r})",
    )


def with_node_id(node_id: uuid.UUID | str) -> Option:
    """Set this node's UUID (canonical RFC 9562 string); random if unset."""
    parsed = parse_node_id(node_id, what="with_node_id(): node ID")
    return Option("with_node_id", "node_id", parsed, f"with_node_id({str(parsed)!r})")


def with_site(name: str, key: str) -> Option:
    """Set the site identity (a Dogma name and UUID key), stamped in every envelope."""
    try:
        site = parse_site(name, key)
    except ValueError as exc:
        raise ValueError(f"with_site(): {exc}") from None
    return Option("with_site", "site", site, f"with_site({site.name!r}, {site.key!r})")


def with_persistence(url: str) -> Option:
    """Persist through the driver plugin that handles *url*'s scheme.

    The scheme is checked now against the installed drivers (the error lists
    them and names the package to install); the driver parses the rest of the
    URL when the engine starts. Passwords never appear in errors or reprs.
    """
    if not isinstance(url, str):
        raise TypeError(f"with_persistence() takes a URL str, not {type(url).__name__}")
    shown = redact_url(url)
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:
        raise ValueError(f"with_persistence({shown!r}): malformed URL: {exc}") from None
    if not scheme:
        raise ValueError(
            f"with_persistence({shown!r}): the URL has no scheme; "
            "e.g. 'memory:///bank' or 'postgresql://db.internal/bank'"
        )
    known = installed_schemes()
    if scheme not in known:
        package = driver_package(scheme) or f"runkit-{scheme}"
        raise ValueError(
            f"with_persistence({shown!r}): no installed driver handles {scheme!r} URLs "
            f"(installed schemes: {', '.join(sorted(known)) or 'none'}); "
            f"install one, e.g. pip install {package}"
        )
    return Option("with_persistence", "persistence_url", url, f"with_persistence({shown!r})")


def with_persistence_provider(provider: Provider) -> Option:
    """Persist through *provider*; the engine does not close a provider it was given."""
    if not isinstance(provider, Provider):
        raise TypeError(
            "with_persistence_provider() takes a runkit.persistence.Provider, "
            f"not {type(provider).__name__}"
        )
    return Option(
        "with_persistence_provider",
        "persistence_provider",
        provider,
        f"with_persistence_provider({type(provider).__name__})",
    )


def with_listen_address(address: str) -> Option:
    """Listen for peers on ``host:port`` (a wildcard host or port 0 is allowed)."""
    value = parse_address(address, what="with_listen_address()", advertise=False)
    return Option("with_listen_address", "listen_address", value, f"with_listen_address({value!r})")


def with_advertise_address(address: str) -> Option:
    """Tell peers to reach this node at ``host:port``; must be routable."""
    value = parse_address(address, what="with_advertise_address()", advertise=True)
    return Option(
        "with_advertise_address", "advertise_address", value, f"with_advertise_address({value!r})"
    )


def with_partition_count(count: int) -> Option:
    """Partitions per application when it first starts (default 16); fixed afterwards."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"with_partition_count() takes an int, not {type(count).__name__}")
    if not 1 <= count <= 4096:
        raise ValueError(f"with_partition_count({count}): expected 1 to 4096")
    return Option(
        "with_partition_count", "partition_count", count, f"with_partition_count({count})"
    )


def with_heartbeat_interval(seconds: float) -> Option:
    """Seconds between membership heartbeats (default 1); records expire after 3 intervals."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"with_heartbeat_interval() takes seconds, not {type(seconds).__name__}")
    if not 0.05 <= seconds <= 60:
        raise ValueError(f"with_heartbeat_interval({seconds}): expected 0.05 to 60 seconds")
    return Option(
        "with_heartbeat_interval",
        "heartbeat_interval",
        float(seconds),
        f"with_heartbeat_interval({seconds})",
    )


def with_retry_policy(
    *, max_attempts: int = 5, base_delay: float = 0.1, max_delay: float = 30.0
) -> Option:
    """Retry failing handlers with capped exponential backoff and jitter.

    After *max_attempts* consecutive failures a command goes to the poison store.
    """
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"with_retry_policy(max_attempts={max_attempts!r}): expected an int >= 1")
    for name, value in (("base_delay", base_delay), ("max_delay", max_delay)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"with_retry_policy({name}={value!r}): expected seconds > 0")
    if max_delay < base_delay:
        raise ValueError(
            f"with_retry_policy(): max_delay ({max_delay}) is below base_delay ({base_delay})"
        )
    values = {
        "max_attempts": max_attempts,
        "retry_base_delay": float(base_delay),
        "retry_max_delay": float(max_delay),
    }
    return Option(
        "with_retry_policy",
        "retry_policy",
        values,
        f"with_retry_policy(max_attempts={max_attempts}, base_delay={base_delay}, "
        f"max_delay={max_delay})",
    )


def from_environment() -> Option:
    """Read the ``DOGMA_*`` variables now (see ``runkit.ENVIRONMENT``).

    Raises ``runkit.ConfigurationError`` naming every invalid variable. Explicit
    options take precedence over the environment whatever their order.
    """
    values = ENVIRONMENT.load()
    return Option("from_environment", "environment", values, "from_environment()")


_ENV_FIELDS = ("site", "node_id", "persistence_url", "listen_address", "advertise_address")


def resolve_options(options: Iterable[Option]) -> EngineSettings:
    """Combine *options* into ``EngineSettings``.

    Raises ``TypeError`` for something that is not an ``Option`` and
    ``ValueError`` for an option given twice, two applications with one
    identity key, or both ``with_persistence`` and ``with_persistence_provider``.
    """
    explicit: dict[str, Any] = {}
    given_by: dict[str, str] = {}
    apps: list[config.ApplicationConfig] = []
    env = EnvironmentValues()
    for option in options:
        if not isinstance(option, Option):
            raise TypeError(
                "Engine() takes options made by runkit.with_*() and runkit.from_environment(), "
                f"not {type(option).__name__}"
            )
        if option.field == "application":
            apps.append(option.value)
        elif option.field == "environment":
            env = option.value
        elif option.field in explicit:
            raise ValueError(f"{option.name}() is given twice; give it once")
        else:
            explicit[option.field] = option.value
            given_by[option.field] = option.name
    if "persistence_url" in explicit and "persistence_provider" in explicit:
        raise ValueError(
            "both with_persistence() and with_persistence_provider() are given; choose one"
        )
    seen: dict[str, config.ApplicationConfig] = {}
    for app in apps:
        other = seen.get(app.identity.key)
        if other is not None:
            raise ValueError(
                f"applications {other.identity.name!r} and {app.identity.name!r} share the "
                f"identity key {app.identity.key!r}; each application needs its own key"
            )
        seen[app.identity.key] = app
    settings: dict[str, Any] = {"applications": tuple(apps)}
    for field in _ENV_FIELDS:
        value = explicit.get(field, getattr(env, field))
        if value is not None:
            settings[field] = value
    # An explicit provider beats a URL from the environment.
    if "persistence_provider" in explicit:
        settings.pop("persistence_url", None)
        settings["persistence_provider"] = explicit["persistence_provider"]
    for field in ("partition_count", "heartbeat_interval"):
        if field in explicit:
            settings[field] = explicit[field]
    if "retry_policy" in explicit:
        settings.update(explicit["retry_policy"])
    return EngineSettings(**settings)
