"""Settings of a PostgreSQL provider, and parsing of ``postgres://`` URLs.

libpq understands most of a URL by itself; runkit adds a few query parameters
of its own (the schema, pool sizing, limits), which are validated and removed
before the rest is handed to psycopg. Passwords never appear in messages.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any, Final
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import attrs
import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

from runkit.persistence import InvalidURL, URLProblems, has_unencoded_password, redact_url

from ._schemes import SCHEMES

__all__ = [
    "DEFAULT_MAX_RECORD_BYTES",
    "DEFAULT_MAX_VALUE_BYTES",
    "DEFAULT_SCHEMA",
    "SCHEMES",
    "Settings",
    "describe_conninfo",
    "parse_url",
    "scrub",
    "validate_conninfo",
    "validate_schema",
]

#: The schema (namespace) used when none is given.
DEFAULT_SCHEMA = "runkit"

#: Default largest record / value: big enough for aggregate snapshots and event
#: batches, small enough that a page of a range stays a bounded allocation.
DEFAULT_MAX_RECORD_BYTES = 16 << 20
DEFAULT_MAX_VALUE_BYTES = 16 << 20

#: bytea is capped at 1 GiB by PostgreSQL; stay well below it.
_HARD_MAX_BYTES = 256 << 20

# Unquoted-identifier shape, at most NAMEDATALEN - 1 bytes; "pg_" is reserved
# for system schemas by PostgreSQL itself.
_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def validate_schema(schema: object) -> str:
    """Return *schema* if it is a usable schema name, else raise ``ValueError``/``TypeError``."""
    if not isinstance(schema, str):
        raise TypeError(f"schema must be str, not {type(schema).__name__}")
    if not _SCHEMA_RE.fullmatch(schema):
        raise ValueError(
            f"invalid schema name {schema!r}: expected 1-63 ASCII letters, digits and "
            "underscores, not starting with a digit"
        )
    if schema.lower().startswith("pg_"):
        raise ValueError(f"invalid schema name {schema!r}: the prefix 'pg_' is reserved")
    return schema


def _check_int(name: str, value: object, *, minimum: int, maximum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be at least {minimum}{upper}, not {value}")
    return value


def _check_seconds(name: str, value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


@attrs.frozen
class Settings:
    """Validated provider settings other than the libpq connection string."""

    schema: str = attrs.field(default=DEFAULT_SCHEMA)
    pool_min_size: int = 1
    pool_max_size: int = 10
    pool_timeout: float = 30.0
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES

    def __attrs_post_init__(self) -> None:
        for name, check in _FIELD_CHECKS.items():
            check(getattr(self, name))
        _check_pool_sizes(self.pool_min_size, self.pool_max_size)


# Each setting's own rule; the rule relating two of them is _check_pool_sizes.
_FIELD_CHECKS: dict[str, Callable[[object], object]] = {
    "schema": validate_schema,
    "pool_min_size": lambda v: _check_int("pool_min_size", v, minimum=0),
    "pool_max_size": lambda v: _check_int("pool_max_size", v, minimum=1),
    "pool_timeout": lambda v: _check_seconds("pool_timeout", v),
    "max_record_bytes": lambda v: _check_int(
        "max_record_bytes", v, minimum=1, maximum=_HARD_MAX_BYTES
    ),
    "max_value_bytes": lambda v: _check_int(
        "max_value_bytes", v, minimum=1, maximum=_HARD_MAX_BYTES
    ),
}


def _check_pool_sizes(minimum: int, maximum: int) -> None:
    if maximum < minimum:
        raise ValueError(
            f"pool_max_size ({maximum}) must not be less than pool_min_size ({minimum})"
        )


# runkit's own URL parameters and how to parse each from its string form.
_INT_PARAMS = ("pool_min_size", "pool_max_size", "max_record_bytes", "max_value_bytes")
_FLOAT_PARAMS = ("pool_timeout",)
OWN_PARAMS = frozenset({"schema", *_INT_PARAMS, *_FLOAT_PARAMS})

#: libpq parameters with a fixed set of values, and those that take an integer:
#: libpq checks them only when it connects, where a typo would look like an
#: outage (retried until the start timeout) instead of a configuration error.
LIBPQ_CHOICES: Final[Mapping[str, frozenset[str]]] = {
    "sslmode": frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}),
    "target_session_attrs": frozenset(
        {"any", "read-write", "read-only", "primary", "standby", "prefer-standby"}
    ),
    "gssencmode": frozenset({"disable", "prefer", "require"}),
    "channel_binding": frozenset({"disable", "prefer", "require"}),
    "load_balance_hosts": frozenset({"disable", "random"}),
    "ssl_min_protocol_version": frozenset({"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"}),
    "ssl_max_protocol_version": frozenset({"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"}),
}
LIBPQ_INTEGERS: Final = frozenset(
    {
        "connect_timeout",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
    }
)


@cache
def libpq_parameters() -> frozenset[str]:
    """The connection parameters the installed libpq understands."""
    return frozenset(option.keyword.decode() for option in pq.Conninfo.get_defaults())


def _query_pairs(query: str) -> list[tuple[str, str]]:
    """A URL query's parameters as libpq decodes them: ``%XX`` only, ``+`` stays a plus.

    (``parse_qsl`` alone follows HTML forms, where ``+`` means a space.)
    """
    return parse_qsl(query.replace("+", "%2B"), keep_blank_values=True)


def _passwords(conninfo: str) -> list[str]:
    """Every password-like secret in *conninfo*, raw and decoded, to scrub from messages."""
    secrets: list[str] = []
    try:
        parts = urlsplit(conninfo)
        if parts.scheme and parts.password:
            secrets.append(parts.password)
        if parts.scheme:
            secrets += [v for k, v in _query_pairs(parts.query) if k in _SECRET_KEYS]
            secrets += re.findall(r"(?:^|&)(?:ssl)?password=([^&]*)", parts.query)
    except ValueError:
        pass
    secrets += re.findall(r"(?:^|\s)(?:ssl)?password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", conninfo)
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error:
        params = {}
    secrets += [str(params[k]) for k in ("password", "sslpassword") if params.get(k)]
    expanded = set(secrets) | {s.strip("'") for s in secrets}
    # Longest first, so a secret containing another is replaced whole.
    return sorted((s for s in expanded if s), key=len, reverse=True)


def scrub(message: str, conninfo: str) -> str:
    """Replace any password of *conninfo* that appears in *message* with ``***``.

    Only where a password stands as a value: after ``user:`` up to '@', after
    ``password=`` (or ``sslpassword=``), or as a whole quoted token (libpq
    quotes the token it cannot parse). Anywhere else a short password would
    garble the message (``p`` in ``postgresql``) without hiding anything.
    """
    for secret in _passwords(conninfo):
        s = re.escape(secret)
        message = re.sub(
            rf"(?<=:){s}(?=@)|(?<=\"){s}(?=\")|(?P<key>(?i:password)\s*=\s*'?){s}",
            lambda m: f"{m['key'] or ''}***",
            message,
        )
    return message


# One ``keyword = value`` pair of a libpq key/value string; values are bare
# (backslash escapes allowed) or single-quoted.
_KV_PAIR = re.compile(r"\s*(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|(?:[^\s'\\]|\\.)*)")
_SECRET_KEYS = frozenset({"password", "sslpassword"})


def _join_url(scheme: str, netloc: str, path: str, query: str, fragment: str = "") -> str:
    # urlunsplit() would turn "postgres:///db" (empty host) into "postgres:/db".
    url = f"{scheme}://{netloc}{path}"
    if query:
        url += f"?{query}"
    if fragment:
        url += f"#{fragment}"
    return url


def describe_conninfo(conninfo: str) -> str:
    """A human-readable form of *conninfo* with every password replaced by ``***``."""
    try:
        is_url = bool(urlsplit(conninfo).scheme)
        if is_url:
            return scrub(redact_url(conninfo), conninfo)
    except ValueError:
        return "<malformed connection string>"
    pairs = []
    position = 0
    while position < len(conninfo.rstrip()):
        match = _KV_PAIR.match(conninfo, position)
        if match is None or match.end() == position:
            return "<malformed connection string>"
        key, value = match.groups()
        pairs.append(f"{key}={'***' if key in _SECRET_KEYS else value}")
        position = match.end()
    return scrub(" ".join(pairs), conninfo) or "<libpq defaults>"


def _misencoded_user_info(url: str) -> str | None:
    """The problem with *url*'s user info if libpq would read it differently, else ``None``.

    libpq ends the user info at the first '@', and the host part at the first
    '/', '?' or '#': an unencoded one in the password would make the rest of it
    a host name (looked up in DNS), a port or a path, quoted in libpq's errors.
    """
    if has_unencoded_password(url):
        # Every character to encode at once, '@' included: fixing one at a
        # time would take as many attempts.
        rest = url.partition("://")[2]
        secret = rest[rest.find(":") + 1 : rest.rfind("@")]
        found = [c for c in "/?#@" if c in secret] or ["/", "?", "#"]
        names = " and ".join(", ".join(f"'{c}'" for c in found).rsplit(", ", 1))
        codes = ", ".join(f"%{ord(c):02X}" for c in found)
        them = "them" if len(found) > 1 else "it"
        return (
            f"the password in PostgreSQL URL {redact_url(url)!r} contains {names}: "
            f"percent-encode {them} ({codes})"
        )
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return None  # malformed otherwise: the caller's parsing reports it
    if netloc.count("@") > 1:
        return (
            f"the user name or password in PostgreSQL URL {redact_url(url)!r} contains "
            "'@': percent-encode it (%40)"
        )
    return None


def _cut_password_parameter(url: str) -> str | None:
    """The problem if an unencoded '&' or '#' cut a password parameter short, else ``None``.

    The rest of the password would be shown as a parameter name (a part without
    '=' right after it) or as the fragment, and quoted in libpq's errors, so
    the message shows the URL only up to the cut.
    """
    head, _, fragment = url.partition("#")
    before, _, query = head.partition("?")
    start = len(before) + 1
    segments = query.split("&")
    for i in range(1, len(segments)):
        key = segments[i - 1].partition("=")[0]
        if key in _SECRET_KEYS and "=" not in segments[i]:
            head = url[: start + len("&".join(segments[:i]))]
            return (
                f"the {key} parameter of PostgreSQL URL {describe_conninfo(head)!r} "
                "contains '&': percent-encode it (%26)"
            )
    key = segments[-1].partition("=")[0]
    if fragment and key in _SECRET_KEYS:
        return (
            f"the {key} parameter of PostgreSQL URL {describe_conninfo(url.partition('#')[0])!r} "
            "contains '#': percent-encode it (%23)"
        )
    return None


def validate_conninfo(conninfo: str) -> dict[str, Any]:
    """Parse *conninfo* as libpq would, without I/O.

    :raises ValueError: if it is malformed; the message never contains a password.
    """
    if not isinstance(conninfo, str):
        raise TypeError(f"conninfo must be str, not {type(conninfo).__name__}")
    is_url = conninfo.partition("://")[0].lower() in SCHEMES
    if is_url and (problem := _misencoded_user_info(conninfo) or _cut_password_parameter(conninfo)):
        raise ValueError(problem)
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        detail = scrub(str(exc).strip(), conninfo)
        raise ValueError(
            f"malformed PostgreSQL connection string {describe_conninfo(conninfo)!r}: {detail}"
        ) from None
    # libpq only checks the port when connecting; a typo should fail at once.
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(
                f"malformed PostgreSQL connection string {describe_conninfo(conninfo)!r}: "
                f"invalid port {port!r}"
            )
    return params


def parse_url(url: str) -> tuple[str, Settings]:
    """Split a ``postgres://`` / ``postgresql://`` URL into a libpq conninfo and settings.

    Query parameters are either runkit's own (``schema``, ``pool_min_size``,
    ``pool_max_size``, ``pool_timeout``, ``max_record_bytes``,
    ``max_value_bytes``), which are validated and removed, or libpq connection
    parameters, which pass through. Anything else, a repeated parameter or a
    malformed value is a problem naming the parameter; every problem is
    reported at once in a ``runkit.persistence.InvalidURL`` (a ``ValueError``).
    No I/O: libpq only parses the connection string.
    """
    if not isinstance(url, str):
        raise TypeError(f"persistence URL must be str, not {type(url).__name__}")
    if (problem := _misencoded_user_info(url)) is not None:
        raise InvalidURL(url, [problem])
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"malformed PostgreSQL URL {redact_url(url)!r}: {exc}") from None
    if (problem := _cut_password_parameter(url)) is not None:
        raise InvalidURL(url, [problem])
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"not a PostgreSQL URL (expected postgres:// or postgresql://): {scheme!r}"
        )
    problems = URLProblems(url)
    if not url[len(parts.scheme) + 1 :].startswith("//"):
        # Else 'postgresql:/host/db' means a database named 'host/db' on the local socket.
        problems.add(
            f"PostgreSQL URL {redact_url(url)!r} must start with '{parts.scheme}://' "
            "(two slashes), e.g. 'postgresql://user@host/db'"
        )
    if parts.fragment:
        problems.add(f"PostgreSQL URL {describe_conninfo(url)!r} must not have a fragment")
    own: dict[str, str] = {}
    passed: list[tuple[str, str]] = []
    seen: set[str] = set()
    known = libpq_parameters()
    for key, value in _query_pairs(parts.query):
        if key in seen:
            problems.add(f"{scheme}:// URL repeats parameter {key!r}")
            continue
        seen.add(key)
        if key in OWN_PARAMS:
            own[key] = value
        elif key in known:
            _check_libpq_value(scheme, key, value, problems)
            passed.append((key, value))
        else:
            problems.add(
                f"{scheme}:// URL has unknown parameter {key!r}: it is neither a libpq "
                f"connection parameter nor one of runkit's ({', '.join(sorted(OWN_PARAMS))})"
            )
    settings = _settings_from_params(scheme, own, problems)
    conninfo = _join_url(parts.scheme, parts.netloc, parts.path, urlencode(passed, quote_via=quote))
    with problems.check():
        validate_conninfo(conninfo)
    problems.raise_if_any()
    assert settings is not None
    return conninfo, settings


def _check_libpq_value(scheme: str, key: str, value: str, problems: URLProblems) -> None:
    choices = LIBPQ_CHOICES.get(key)
    if choices is not None and value not in choices:
        problems.add(
            f"{scheme}:// URL parameter {key!r} must be one of "
            f"{', '.join(sorted(choices))}, not {value!r}"
        )
    elif key in LIBPQ_INTEGERS and not value.lstrip("-").isdigit():
        problems.add(f"{scheme}:// URL parameter {key!r} must be an integer, not {value!r}")


def _settings_from_params(
    scheme: str, params: Mapping[str, str], problems: URLProblems
) -> Settings | None:
    """The settings the URL's own parameters give, or ``None`` after recording problems."""
    values: dict[str, Any] = {}
    for key, raw in params.items():
        value: object = raw
        if key in _INT_PARAMS:
            try:
                value = int(raw, 10)
            except ValueError:
                problems.add(f"{scheme}:// URL parameter {key!r} must be an integer, not {raw!r}")
                continue
        elif key in _FLOAT_PARAMS:
            try:
                value = float(raw)
            except ValueError:
                problems.add(
                    f"{scheme}:// URL parameter {key!r} must be a number of seconds, not {raw!r}"
                )
                continue
        try:
            _FIELD_CHECKS[key](value)
        except ValueError as exc:
            problems.add(f"{scheme}:// URL: {exc}")
            continue
        values[key] = value
    if problems:
        return None
    try:
        return Settings(**values)
    except ValueError as exc:  # the rule relating two values (min <= max)
        problems.add(f"{scheme}:// URL: {exc}")
        return None
