"""The engine's environment variables (``DOGMA_*``), documented and validated.

``ENVIRONMENT`` is the registry: it lists every variable with its description,
type, default and example, and validates a mapping (``os.environ`` by default),
reporting every problem at once in a ``ConfigurationError``. Parsing is done
with environs in non-eager mode so that all errors are collected.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
import environs

from ._errors import ConfigurationError
from ._validate import parse_address, parse_node_id, parse_site
from .engine.settings import Site
from .persistence import redact_url

__all__ = ["ENVIRONMENT", "EnvironmentRegistry", "EnvironmentValues", "Variable"]


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
    persistence_url: str | None = None
    listen_address: str | None = None
    advertise_address: str | None = None


def _persistence_url(value: str) -> str:
    from urllib.parse import urlsplit

    try:
        scheme = urlsplit(value).scheme
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if not scheme:
        raise ValueError("the URL has no scheme")
    return value


class _MappingEnv(environs.Env):
    """An environs ``Env`` that reads a given mapping instead of ``os.environ``."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        super().__init__(eager=False)
        self._mapping = environ

    def _get_value(self, env_key: str, default: Any) -> Any:
        return self._mapping.get(env_key, default)


class EnvironmentRegistry:
    """The documented ``DOGMA_*`` variables, in a stable order."""

    def __init__(self, variables: tuple[Variable, ...]) -> None:
        self._variables = {v.name: v for v in variables}

    def __iter__(self) -> Iterator[Variable]:
        return iter(self._variables.values())

    def __len__(self) -> int:
        return len(self._variables)

    def __getitem__(self, name: str) -> Variable:
        return self._variables[name]

    def describe(self) -> str:
        """Return a plain-text description of every variable, for people."""
        blocks = []
        for v in self:
            lines = [f"{v.name} ({v.type})", f"    {v.description}"]
            lines.append(f"    default: {v.default}" if v.default else "    default: (none)")
            lines.append(f"    example: {v.name}={v.example}")
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)

    def load(self, environ: Mapping[str, str] | None = None) -> EnvironmentValues:
        """Validate *environ* (default ``os.environ``) and return the values it sets.

        Raises ``ConfigurationError`` naming every invalid variable, its value
        (redacted where sensitive), what is expected and an example.
        """
        source = os.environ if environ is None else environ
        env = _MappingEnv(source)
        for v in self:
            env.add_parser(_parser_name(v.name), _wrap(v.parse))
        values: dict[str, Any] = {}
        for v in self:
            raw = source.get(v.name)
            if raw is None or raw == "":
                values[v.name] = None
                continue
            values[v.name] = getattr(env, _parser_name(v.name))(v.name)
        problems: list[str] = []
        try:
            env.seal()
        except environs.EnvValidationError as exc:
            messages: dict[str, list[str]] = exc.error_messages  # type: ignore[assignment]
            for name in self._variables:
                for message in messages.get(name, []):
                    problems.append(self._problem(name, source.get(name, ""), message))
        site_name, site_key = source.get("DOGMA_SITE_NAME"), source.get("DOGMA_SITE_KEY")
        site: Site | None = None
        if bool(site_name) != bool(site_key):
            missing = "DOGMA_SITE_KEY" if site_name else "DOGMA_SITE_NAME"
            present = "DOGMA_SITE_NAME" if site_name else "DOGMA_SITE_KEY"
            problems.append(
                f"{missing} is not set but {present} is: the two are required together, "
                f"e.g. {missing}={self[missing].example}"
            )
        elif site_name and site_key and values["DOGMA_SITE_NAME"] and values["DOGMA_SITE_KEY"]:
            site = Site(values["DOGMA_SITE_NAME"], values["DOGMA_SITE_KEY"])
        if problems:
            raise ConfigurationError(f"{len(problems)} invalid environment variable(s)", problems)
        return EnvironmentValues(
            site=site,
            node_id=values["DOGMA_NODE_ID"],
            persistence_url=values["DOGMA_PERSISTENCE_URL"],
            listen_address=values["DOGMA_LISTEN_ADDRESS"],
            advertise_address=values["DOGMA_ADVERTISE_ADDRESS"],
        )

    def _problem(self, name: str, raw: str, message: str) -> str:
        v = self[name]
        shown = redact_url(raw) if v.sensitive else raw
        return f"{name}={shown!r}: {message}; expected {v.type}, e.g. {name}={v.example}"


def _parser_name(name: str) -> str:
    return "parse_" + name.lower()


def _wrap(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parser(value: str) -> Any:
        try:
            return parse(value)
        except (ValueError, TypeError) as exc:
            raise environs.EnvError(str(exc)) from None

    return parser


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
            "partitions (and warm caches) back; never share it between running nodes.",
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
            default="none (runkit run falls back to memory:///)",
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
            default="derived from the listen address and host name",
            parse=lambda v: parse_address(v, what="advertise address", advertise=True),
        ),
    )
)
