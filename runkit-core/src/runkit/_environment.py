"""The engine's environment variables (``DOGMA_*``), documented and validated.

``ENVIRONMENT`` is the registry: it lists every variable with its description,
type, default and example, and validates a mapping (``os.environ`` by default),
reporting every problem at once in a ``ConfigurationError``. Parsing is done
with environs in non-eager mode so that all errors are collected. A persistence
URL is checked by its driver (without I/O), so ``runkit env`` reports every bad
parameter too.
"""

from __future__ import annotations

import difflib
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
import environs

from ._errors import ConfigurationError
from ._validate import (
    KNOBS,
    check_readable_file,
    check_retry_delays,
    parse_address,
    parse_node_id,
    parse_site,
)
from .engine.settings import EngineSettings, Site
from .engine.settings import _redacted as _redacted_url
from .persistence import redact_url, url_problems

_log = logging.getLogger("runkit.environment")

__all__ = [
    "ENVIRONMENT",
    "ENVIRONMENT_FIELDS",
    "EnvironmentRegistry",
    "EnvironmentValues",
    "Variable",
]


@attrs.frozen
class Variable:
    """One documented environment variable."""

    name: str
    type: str
    description: str
    example: str
    default: str | None = None
    #: Parses and validates the raw string; raises ValueError explaining what's wrong.
    parse: Callable[[str], Any] = attrs.field(default=str, repr=False)
    #: Never echo the value (it may hold a password); errors show a redacted form.
    sensitive: bool = False


@attrs.frozen
class EnvironmentValues:
    """The engine settings found in the environment (``None`` where unset)."""

    site: Site | None = None
    node_id: uuid.UUID | None = None
    # Its repr hides the password, as EngineSettings' does.
    persistence_url: str | None = attrs.field(default=None, repr=_redacted_url)
    listen_address: str | None = None
    advertise_address: str | None = None
    partition_count: int | None = None
    heartbeat_interval: float | None = None
    backlog_limit: int | None = None
    start_timeout: float | None = None
    max_attempts: int | None = None
    retry_base_delay: float | None = None
    retry_max_delay: float | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None


#: The ``EngineSettings`` fields the environment can set (``EnvironmentValues`` uses their names).
ENVIRONMENT_FIELDS = tuple(a.name for a in attrs.fields(EnvironmentValues))

# The variable that sets each field (the site takes two, DOGMA_SITE_NAME and _KEY).
_FIELD_VARIABLES = {
    "node_id": "DOGMA_NODE_ID",
    "persistence_url": "DOGMA_PERSISTENCE_URL",
    "listen_address": "DOGMA_LISTEN_ADDRESS",
    "advertise_address": "DOGMA_ADVERTISE_ADDRESS",
    **{k.field: k.variable for k in KNOBS},
    "tls_cert": "DOGMA_TLS_CERT",
    "tls_key": "DOGMA_TLS_KEY",
    "tls_ca": "DOGMA_TLS_CA",
}


def _persistence_url(value: str) -> str:
    from urllib.parse import urlsplit

    try:
        scheme = urlsplit(value).scheme
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if not scheme:
        raise ValueError("the URL has no scheme")
    # Every problem the driver finds, without I/O; each becomes its own line.
    problems = url_problems(value)
    if problems:
        raise ConfigurationError("invalid persistence URL", problems)
    return value


class _MappingEnv(environs.Env):
    """An environs ``Env`` that reads a given mapping instead of ``os.environ``."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        super().__init__(eager=False)
        self._mapping = environ

    def _get_value(self, env_key: str, default: Any) -> Any:
        return self._mapping.get(env_key, default)


class EnvironmentRegistry:
    """The documented ``DOGMA_*`` variables, in a stable order.

    Iterating yields each ``Variable``; ``registry[name]`` looks one up by name
    and ``name in registry`` tells whether there is one.
    """

    def __init__(self, variables: tuple[Variable, ...]) -> None:
        self._variables = {v.name: v for v in variables}

    def __iter__(self) -> Iterator[Variable]:
        return iter(self._variables.values())

    def __len__(self) -> int:
        return len(self._variables)

    def __getitem__(self, name: str) -> Variable:
        return self._variables[name]

    def __contains__(self, item: object) -> bool:
        # By name, as [] looks up; iteration yields Variables, which `in` would compare.
        if isinstance(item, Variable):
            return self._variables.get(item.name) == item
        return isinstance(item, str) and item in self._variables

    def describe(self) -> str:
        """Return a plain-text description of every variable, for people."""
        blocks = []
        for v in self:
            lines = [f"{v.name} ({v.type})", f"    {v.description}"]
            lines.append(f"    default: {v.default}" if v.default else "    default: (none)")
            lines.append(f"    example: {v.name}={v.example}")
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)

    def _misspelt(self, source: Mapping[str, str]) -> list[str]:
        """Problems for ``DOGMA_*`` names that look like a typo of one of ours.

        A misspelt variable would be ignored silently (a misspelt persistence
        URL means the memory driver: state lost at exit). Other unknown
        ``DOGMA_*`` names may belong to other tools: they are only logged.
        """
        problems = []
        for name in sorted(n for n in source if n.startswith("DOGMA_")):
            if name in self._variables:
                continue
            close = difflib.get_close_matches(name, self._variables, n=1, cutoff=0.85)
            if close:
                problems.append(f"{name} is not a runkit variable: did you mean {close[0]}?")
            else:
                _log.warning("ignoring %s: runkit has no such variable (see `runkit env`)", name)
        return problems

    def load(self, environ: Mapping[str, str] | None = None) -> EnvironmentValues:
        """Validate *environ* (default ``os.environ``) and return the values it sets.

        Raises ``ConfigurationError`` naming every invalid variable, its value
        (redacted where sensitive), what is expected and an example.
        """
        source = os.environ if environ is None else environ
        env = _MappingEnv(source)
        # Variables whose problems say what is expected already (a driver's URL check).
        explained: set[str] = set()
        for v in self:
            env.add_parser(_parser_name(v.name), _wrap(v.name, v.parse, explained))
        values: dict[str, Any] = {}
        for v in self:
            raw = source.get(v.name)
            if raw is None or raw == "":
                values[v.name] = None
                continue
            values[v.name] = getattr(env, _parser_name(v.name))(v.name)
        problems = self._misspelt(source)
        try:
            env.seal()
        except environs.EnvValidationError as exc:
            messages: dict[str, list[str]] = exc.error_messages  # type: ignore[assignment]
            for name in self._variables:
                for i, message in enumerate(messages.get(name, [])):
                    # Further problems with one value (a URL's parameters) skip the
                    # value, already shown on the first line.
                    if i > 0:
                        problems.append(f"{name}: {message}")
                    else:
                        raw = source.get(name, "")
                        problems.append(self._problem(name, raw, message, name not in explained))
        for first, second in (
            ("DOGMA_SITE_NAME", "DOGMA_SITE_KEY"),
            ("DOGMA_TLS_CERT", "DOGMA_TLS_KEY"),
        ):
            problem = self._together(source, first, second)
            if problem is not None:
                problems.append(problem)
        if source.get("DOGMA_TLS_CA") and not (
            source.get("DOGMA_TLS_CERT") or source.get("DOGMA_TLS_KEY")
        ):
            # Alone it would be ignored: peers trusted by fingerprint, not by the CA.
            problems.append(
                "DOGMA_TLS_CA is set but DOGMA_TLS_CERT and DOGMA_TLS_KEY are not: a CA "
                "needs this node's certificate and key, e.g. "
                f"DOGMA_TLS_CERT={self['DOGMA_TLS_CERT'].example} and "
                f"DOGMA_TLS_KEY={self['DOGMA_TLS_KEY'].example}"
            )
        site: Site | None = None
        if values["DOGMA_SITE_NAME"] and values["DOGMA_SITE_KEY"]:
            site = Site(values["DOGMA_SITE_NAME"], values["DOGMA_SITE_KEY"])
        base, top = values["DOGMA_RETRY_BASE_DELAY"], values["DOGMA_RETRY_MAX_DELAY"]
        if base is not None or top is not None:
            # One of them alone is checked against the other's default.
            defaults = EngineSettings()
            try:
                check_retry_delays(
                    defaults.retry_base_delay if base is None else base,
                    defaults.retry_max_delay if top is None else top,
                    sources=(
                        None if base is None else "DOGMA_RETRY_BASE_DELAY",
                        None if top is None else "DOGMA_RETRY_MAX_DELAY",
                    ),
                )
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            noun = "problem" if len(problems) == 1 else "problems"
            raise ConfigurationError(
                f"{len(problems)} {noun} with the DOGMA_* environment variables", problems
            )
        return EnvironmentValues(
            site=site, **{field: values[name] for field, name in _FIELD_VARIABLES.items()}
        )

    def _together(self, source: Mapping[str, str], first: str, second: str) -> str | None:
        """The problem if exactly one of two variables that go together is set."""
        if bool(source.get(first)) == bool(source.get(second)):
            return None
        missing, present = (second, first) if source.get(first) else (first, second)
        return (
            f"{missing} is not set but {present} is: the two are required together, "
            f"e.g. {missing}={self[missing].example}"
        )

    def _problem(self, name: str, raw: str, message: str, hint: bool = True) -> str:
        v = self[name]
        shown = redact_url(raw) if v.sensitive else raw
        problem = f"{name}={shown!r}: {message}"
        return f"{problem}; expected {v.type}, e.g. {name}={v.example}" if hint else problem


def _parser_name(name: str) -> str:
    return "parse_" + name.lower()


def _wrap(name: str, parse: Callable[[str], Any], explained: set[str]) -> Callable[[str], Any]:
    def parser(value: str) -> Any:
        try:
            return parse(value)
        except ConfigurationError as exc:
            # Several problems with one value: environs keeps each as a message.
            explained.add(name)
            raise environs.ValidationError(list(exc.problems) or [str(exc)]) from None
        except (ValueError, TypeError) as exc:
            raise environs.EnvError(str(exc)) from None

    return parser


def _call(option: str) -> str:
    return option if "(" in option else f"{option}()"


def _site_name(value: str) -> str:
    return parse_site(value, "00000000-0000-4000-8000-000000000001").name


def _site_key(value: str) -> str:
    return parse_site("site", value).key


ENVIRONMENT = EnvironmentRegistry(
    (
        Variable(
            "DOGMA_SITE_NAME",
            "Dogma identity name",
            "The site's name. Required together with DOGMA_SITE_KEY; stamped in every envelope.",
            "eu-west",
            parse=_site_name,
        ),
        Variable(
            "DOGMA_SITE_KEY",
            "UUID",
            "The site's key. Required together with DOGMA_SITE_NAME. Sites that share a "
            "database must use separate persistence namespaces.",
            "3e0c5e1a-8f7b-4a52-9d1c-0f4b6a2d7e91",
            parse=_site_key,
        ),
        Variable(
            "DOGMA_NODE_ID",
            "UUID",
            "This node's ID. Keep it stable across restarts so the node gets its "
            "partitions (and warm caches) back; never share it between running nodes. "
            "A runkit.Client (and runkit execute) ignores it and joins under a random ID.",
            "6f1a8e5c-2b1d-4c3e-9f4a-1b2c3d4e5f60",
            default="a random UUID at each start",
            parse=lambda v: parse_node_id(v, what="node ID"),
        ),
        Variable(
            "DOGMA_PERSISTENCE_URL",
            "URL",
            "Where the engine stores everything; the scheme picks the installed driver "
            "(memory, postgres/postgresql, dynamodb, s3).",
            "postgresql://runkit@db.internal/bank?schema=runkit",
            default="none (runkit run falls back to memory:///runkit, which keeps nothing "
            "after the process exits)",
            parse=_persistence_url,
            sensitive=True,
        ),
        Variable(
            "DOGMA_LISTEN_ADDRESS",
            "host:port",
            "Where the node listens for its peers.",
            "0.0.0.0:7000",
            parse=lambda v: parse_address(v, what="listen address", advertise=False),
        ),
        Variable(
            "DOGMA_ADVERTISE_ADDRESS",
            "host:port",
            "The address peers use to reach this node; must be routable (no 0.0.0.0, no port 0).",
            "node-1.internal:7000",
            default="the address it listens on (required when that is a wildcard such as 0.0.0.0)",
            parse=lambda v: parse_address(v, what="advertise address", advertise=True),
        ),
        *(
            Variable(
                k.variable,
                f"{'integer' if k.kind is int else 'number'}, {k.expected}",
                f"{k.description} Also {_call(k.option)} and runkit run {k.flag}.",
                k.example,
                default=k.default,
                parse=k.parse,
            )
            for k in KNOBS
        ),
        Variable(
            "DOGMA_TLS_CERT",
            "PEM file path",
            "This node's certificate for node-to-node TLS; required together with "
            "DOGMA_TLS_KEY. Also with_tls(cert=...) and runkit run --tls-cert.",
            "/etc/runkit/node.crt",
            default="a self-signed certificate made at start-up, trusted by its "
            "fingerprint in the node's heartbeat",
            parse=lambda v: check_readable_file(v, what="certificate"),
        ),
        Variable(
            "DOGMA_TLS_KEY",
            "PEM file path",
            "The private key of DOGMA_TLS_CERT. Also with_tls(key=...) and runkit run --tls-key.",
            "/etc/runkit/node.key",
            parse=lambda v: check_readable_file(v, what="key"),
        ),
        Variable(
            "DOGMA_TLS_CA",
            "PEM file path",
            "A CA bundle peers' certificates must chain to; needs DOGMA_TLS_CERT and "
            "DOGMA_TLS_KEY. Also with_tls(ca=...) and runkit run --tls-ca.",
            "/etc/runkit/ca.crt",
            default="trust each peer by the fingerprint in its heartbeat",
            parse=lambda v: check_readable_file(v, what="CA bundle"),
        ),
    )
)
