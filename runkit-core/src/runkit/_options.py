"""Engine options: ``runkit.with_*`` functions and ``from_environment()``.

Each function validates its arguments at the call (``ValueError``/``TypeError``
naming the bad value) and returns an opaque ``Option``. ``resolve_options``
turns a sequence of options into ``EngineSettings``; explicit options beat
environment variables whatever their order.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from . import config
from ._environment import ENVIRONMENT, ENVIRONMENT_FIELDS, EnvironmentValues
from ._errors import ConfigurationError
from ._validate import (
    KNOBS,
    check_readable_file,
    check_retry_delays,
    parse_address,
    parse_node_id,
    parse_site,
)
from .engine.settings import EngineSettings
from .persistence import Provider, redact_url, url_problems

__all__ = [
    "Option",
    "from_environment",
    "resolve_options",
    "tuning_options",
    "with_advertise_address",
    "with_application",
    "with_backlog_limit",
    "with_heartbeat_interval",
    "with_listen_address",
    "with_node_id",
    "with_partition_count",
    "with_persistence",
    "with_persistence_provider",
    "with_retry_policy",
    "with_site",
    "with_start_timeout",
    "with_tls",
]

_KNOBS = {k.field: k for k in KNOBS}


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

    *app* may also be a configuration already built with
    ``runkit.config.build(app, registry=...)`` (an application whose messages
    are registered on a registry of its own). Raises ``TypeError`` for ``None``
    and ``runkit.ConfigurationError`` listing every problem in the
    application's configuration.
    """
    if app is None:
        raise TypeError("with_application(None): pass a Dogma application object")
    if isinstance(app, config.ApplicationConfig):
        return Option(
            "with_application", "application", app, f"with_application({app.identity.name!r})"
        )
    if isinstance(app, type):
        raise TypeError(
            f"with_application({app.__qualname__}): pass an application object, "
            f"e.g. {app.__qualname__}(), not the class"
        )
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


def with_node_id(id: uuid.UUID | str) -> Option:  # api.md names the parameter ``id``
    """Set this node's UUID (canonical RFC 9562 string); random if unset."""
    parsed = parse_node_id(id, what="with_node_id(): node ID")
    return Option("with_node_id", "node_id", parsed, f"with_node_id({str(parsed)!r})")


def with_site(name: str, key: uuid.UUID | str) -> Option:
    """Set the site identity (a Dogma name and UUID key), stamped in every envelope."""
    try:
        site = parse_site(name, key)
    except TypeError as exc:
        raise TypeError(f"with_site(): {exc}") from None
    except ValueError as exc:
        raise ValueError(f"with_site(): {exc}") from None
    return Option("with_site", "site", site, f"with_site({site.name!r}, {site.key!r})")


def with_persistence(url: str) -> Option:
    """Persist through the driver plugin that handles *url*'s scheme.

    The URL is checked now, without I/O: the scheme against the installed
    drivers (the error lists them, and names the package for a first-party
    scheme), the rest by the driver. Raises ``runkit.ConfigurationError`` (a
    ``ValueError``) listing every problem. Passwords never appear in errors or reprs.
    """
    if not isinstance(url, str):
        raise TypeError(f"with_persistence() takes a URL str, not {type(url).__name__}")
    shown = redact_url(url)
    problems = url_problems(url)
    if problems:
        raise ConfigurationError(f"with_persistence({shown!r}): invalid persistence URL", problems)
    return Option("with_persistence", "persistence_url", url, f"with_persistence({shown!r})")


def with_persistence_provider(p: Provider) -> Option:
    """Persist through the provider *p*; the engine does not close a provider it was given."""
    if not isinstance(p, Provider):
        raise TypeError(
            "with_persistence_provider() takes a runkit.persistence.Provider, "
            f"not {type(p).__name__}"
        )
    return Option(
        "with_persistence_provider",
        "persistence_provider",
        p,
        f"with_persistence_provider({type(p).__name__})",
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


def _knob(field: str, value: object) -> Option:
    knob = _KNOBS[field]
    number = knob.check(value, what=f"{knob.option}()")
    return Option(knob.option, field, number, f"{knob.option}({number!r})")


def with_partition_count(n: int) -> Option:
    """Partitions per application when it first starts (default 16, 1 to 4096); fixed afterwards.

    Also ``DOGMA_PARTITION_COUNT`` and ``runkit run --partition-count``.
    """
    return _knob("partition_count", n)


def with_heartbeat_interval(seconds: float) -> Option:
    """Seconds between membership heartbeats (default 1, 0.05 to 60); records expire after 3.

    Also ``DOGMA_HEARTBEAT_INTERVAL`` and ``runkit run --heartbeat-interval``.
    """
    return _knob("heartbeat_interval", seconds)


def with_backlog_limit(n: int) -> Option:
    """The most commands waiting in one partition (default 1000); then ``execute_command`` waits.

    Also ``DOGMA_BACKLOG_LIMIT`` and ``runkit run --backlog-limit``.
    """
    return _knob("backlog_limit", n)


def with_start_timeout(seconds: float) -> Option:
    """Seconds start-up keeps retrying an unreachable store before giving up (default 60).

    Also ``DOGMA_START_TIMEOUT`` and ``runkit run --start-timeout``.
    """
    return _knob("start_timeout", seconds)


# with_retry_policy()'s argument for each retry field.
_RETRY_ARGUMENTS = {
    "max_attempts": "max_attempts",
    "retry_base_delay": "base_delay",
    "retry_max_delay": "max_delay",
}


def tuning_options(values: Mapping[str, int | float]) -> list[Option]:
    """The options that set the given ``EngineSettings`` knob fields (``runkit run``'s flags).

    Keys are fields of ``runkit._validate.KNOBS``; the retry fields become one
    ``with_retry_policy()``.
    """
    options = [_knob(f, v) for f, v in values.items() if f not in _RETRY_ARGUMENTS]
    retry: dict[str, Any] = {
        _RETRY_ARGUMENTS[f]: v for f, v in values.items() if f in _RETRY_ARGUMENTS
    }
    if retry:
        options.append(with_retry_policy(**retry))
    return options


def with_retry_policy(
    *,
    max_attempts: int | None = None,
    base_delay: float | None = None,
    max_delay: float | None = None,
) -> Option:
    """Retry failing handlers with capped exponential backoff and jitter.

    After *max_attempts* consecutive failures (default 5) a command goes to the
    poison store; the first retry waits *base_delay* seconds (default 0.1), each
    further one twice as long, up to *max_delay* (default 30). An argument left
    out keeps its ``DOGMA_MAX_ATTEMPTS`` / ``DOGMA_RETRY_BASE_DELAY`` /
    ``DOGMA_RETRY_MAX_DELAY`` value, else the default.
    """
    given = {"max_attempts": max_attempts, "base_delay": base_delay, "max_delay": max_delay}
    values: dict[str, int | float] = {}
    for field, name in _RETRY_ARGUMENTS.items():
        if given[name] is not None:
            what = f"with_retry_policy({name}=...)"
            values[field] = _KNOBS[field].check(given[name], what=what)
    if base_delay is not None and max_delay is not None:
        check_retry_delays(
            values["retry_base_delay"],
            values["retry_max_delay"],
            sources=("with_retry_policy(base_delay)", "with_retry_policy(max_delay)"),
        )
    shown = ", ".join(f"{name}={value!r}" for name, value in given.items() if value is not None)
    return Option("with_retry_policy", "retry_policy", values, f"with_retry_policy({shown})")


def with_tls(
    *,
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    ca: str | os.PathLike[str] | None = None,
) -> Option:
    """Secure node-to-node traffic with this node's certificate and key (PEM files).

    With *ca*, peers' certificates must chain to that CA bundle; without it they
    are trusted by the fingerprint each node publishes in its heartbeat. Without
    ``with_tls`` at all, each node makes a self-signed certificate at start-up.
    The files are checked now (they exist, are readable and are PEM); the
    engine refuses at start a certificate that has expired or is not valid
    yet, and logs a warning if it expires within 30 days. Also
    ``DOGMA_TLS_CERT``/``DOGMA_TLS_KEY``/``DOGMA_TLS_CA`` and the ``runkit run``
    flags ``--tls-cert``/``--tls-key``/``--tls-ca``.
    """
    values = {
        "tls_cert": check_readable_file(cert, what="with_tls(): cert"),
        "tls_key": check_readable_file(key, what="with_tls(): key"),
        "tls_ca": None if ca is None else check_readable_file(ca, what="with_tls(): ca"),
    }
    shown = f"cert={values['tls_cert']!r}, key={values['tls_key']!r}"
    if values["tls_ca"] is not None:
        shown += f", ca={values['tls_ca']!r}"
    return Option("with_tls", "tls", values, f"with_tls({shown})")


def from_environment() -> Option:
    """Read the ``DOGMA_*`` variables now (see ``runkit.ENVIRONMENT``).

    Raises ``runkit.ConfigurationError`` naming every invalid variable. Explicit
    options take precedence over the environment whatever their order.
    """
    values = ENVIRONMENT.load()
    return Option("from_environment", "environment", values, "from_environment()")


#: Settings that mean nothing to a ``runkit.Client`` (it reads the partition count
#: from the store).
_NODE_ONLY = ("listen_address", "advertise_address", "partition_count", "backlog_limit")


def resolve_options(options: Iterable[Option], *, client: bool = False) -> EngineSettings:
    """Combine *options* into ``EngineSettings``.

    Raises ``TypeError`` for something that is not an ``Option``,
    ``ConfigurationError`` (a ``ValueError``) for two applications with one
    identity key, and ``ValueError`` for an option given twice, both
    ``with_persistence`` and ``with_persistence_provider``, a retry max delay
    below the base delay, or an advertise address without a listen address
    (for a node).

    For a *client* (``runkit.Client``) the node ID comes only from
    ``with_node_id``, else it is random: ``DOGMA_NODE_ID`` is the ID of the
    node in whose environment a client may run, and a member with it would
    collide with that node. A client refuses (``ValueError``) the options that
    only nodes use: listen and advertise addresses, partition count, backlog limit.
    """
    explicit: dict[str, Any] = {}
    given_by: dict[str, str] = {}
    apps: list[config.ApplicationConfig] = []
    env = EnvironmentValues()
    for option in options:
        if not isinstance(option, Option):
            raise TypeError(
                f"{'Client' if client else 'Engine'}() takes options made by runkit.with_*() "
                f"and runkit.from_environment(), not {type(option).__name__}"
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
    if client:
        # Said in code, these would be silently ignored: refuse them (from the
        # environment they are fine: a client may run in a node's environment).
        ignored = [given_by[f] for f in _NODE_ONLY if f in explicit]
        if ignored:
            raise ValueError(
                f"Client() does not take {', '.join(f'{name}()' for name in ignored)}: a client "
                "neither listens for peers nor runs partitions, so "
                f"{'it applies' if len(ignored) == 1 else 'they apply'} to nodes "
                "(runkit.Engine) only"
            )
    if "persistence_url" in explicit and "persistence_provider" in explicit:
        raise ValueError(
            "both with_persistence() and with_persistence_provider() are given; choose one"
        )
    seen: dict[str, config.ApplicationConfig] = {}
    for app in apps:
        other = seen.get(app.identity.key)
        if other is not None:
            raise ConfigurationError(
                f"applications {other.identity.name!r} and {app.identity.name!r} share the "
                f"identity key {app.identity.key!r}; each application needs its own key"
            )
        seen[app.identity.key] = app
    # Options that set several fields at once replace all of them: with_tls()
    # replaces the environment's whole TLS configuration.
    if "tls" in explicit:
        env = attrs.evolve(env, tls_cert=None, tls_key=None, tls_ca=None)
    # Where each retry delay comes from, for the message if they contradict.
    retry = explicit.get("retry_policy", {})
    delay_sources = (
        _delay_source("retry_base_delay", retry, env),
        _delay_source("retry_max_delay", retry, env),
    )
    for group in ("retry_policy", "tls"):
        explicit.update(explicit.pop(group, {}))
    settings: dict[str, Any] = {"applications": tuple(apps)}
    if client:
        env = attrs.evolve(env, node_id=None)
    for field in ENVIRONMENT_FIELDS:
        value = explicit.get(field, getattr(env, field))
        if value is not None:
            settings[field] = value
    if not client and "advertise_address" in settings and "listen_address" not in settings:
        # Peers would be told to call an address nothing listens on.
        given = (
            "with_advertise_address()"
            if "advertise_address" in explicit
            else "DOGMA_ADVERTISE_ADDRESS"
        )
        raise ValueError(
            f"{given} is set ({settings['advertise_address']}) but no listen address is: "
            "a node listens for peers only with with_listen_address() or "
            "DOGMA_LISTEN_ADDRESS; set one too, or drop the advertise address"
        )
    # An explicit provider beats a URL from the environment.
    if "persistence_provider" in explicit:
        settings.pop("persistence_url", None)
        settings["persistence_provider"] = explicit["persistence_provider"]
    resolved = EngineSettings(**settings)
    check_retry_delays(resolved.retry_base_delay, resolved.retry_max_delay, sources=delay_sources)
    return resolved


def _delay_source(field: str, explicit: Mapping[str, object], env: EnvironmentValues) -> str | None:
    """What set a retry delay: the ``with_retry_policy()`` argument, its variable, else ``None``."""
    if field in explicit:
        return f"with_retry_policy({_RETRY_ARGUMENTS[field]})"
    return _KNOBS[field].variable if getattr(env, field) is not None else None
