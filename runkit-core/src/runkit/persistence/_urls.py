"""Helpers for drivers that parse persistence URLs."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from .._errors import ConfigurationError

__all__ = [
    "InvalidURL",
    "URLProblems",
    "check_endpoint_url",
    "empty_store_hint",
    "has_unencoded_password",
    "parse_bool",
    "parse_problems",
    "query_params",
    "redact_url",
]


# "user:password@" anywhere, for strings urlsplit cannot take apart (no scheme, ...).
_USERINFO = re.compile(r"([^:/@?#\s]*):[^@/?#\s]*@")
# libpq keyword/value form: password=... (quoted, or up to unescaped whitespace).
_KEYWORD_PASSWORD = re.compile(
    r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|(?:[^\s'\\]|\\.)*)", re.IGNORECASE
)


def _scrub(text: str) -> str:
    text = _USERINFO.sub(r"\1:***@", text)
    # In a URL '&' ends a value and _redact_query has hidden the password
    # parameters; in the keyword/value form it is part of the value.
    return text if "://" in text else _KEYWORD_PASSWORD.sub(r"\1***", text)


def _redact_query(url: str) -> str:
    """Hide the value of every ``*password*=`` query parameter of *url*.

    The query is split on '&' as a URL parser would, so a value with spaces,
    '%' or non-ASCII text is hidden whole. A later part without '=' (or a
    fragment after the last parameter) is most likely the rest of a password
    holding an unencoded '&' (or '#'): then everything from the password
    parameter on goes. Hiding too much is harmless.
    """
    head, hash_sign, fragment = url.partition("#")
    base, question_mark, query = head.partition("?")
    if not question_mark:
        return url
    parts = query.split("&")
    for i, part in enumerate(parts):
        key, equals, _ = part.partition("=")
        if not (equals and "password" in unquote(key).lower()):
            continue
        parts[i] = f"{key}=***"
        rest = parts[i + 1 :]
        if any("=" not in p for p in rest) or (not rest and hash_sign):
            return f"{base}?{'&'.join(parts[: i + 1])}"
    return f"{base}?{'&'.join(parts)}{hash_sign}{fragment}"


def _hide_misplaced_password(url: str) -> str:
    """Hide a password that holds an unencoded '/', '?' or '#' (urlsplit cannot see it).

    In ``scheme://user:pa/ss@host/...`` the authority seems to end at the
    '/', so the password's tail looks like a path. Everything from the first
    ':' of the authority to the last '@' goes, unless the ':' starts a port
    (only digits up to the end of the authority). Hiding too much is harmless.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    colon = rest.find(":")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    at = rest.rfind("@")
    if "@" in rest[:end] or colon < 0 or colon > end or at < colon:
        return url  # no password, or one urlsplit finds
    if rest[colon + 1 : end].isdigit():
        return url  # a port
    return f"{scheme}://{rest[:colon]}:***{rest[at:]}"


def has_unencoded_password(url: str) -> bool:
    """Whether *url*'s password holds an unencoded '/', '?' or '#' (see ``redact_url``).

    A driver should refuse such a URL before parsing it, without echoing any
    part of it: what looks like its port or path is a piece of the password.
    """
    return _hide_misplaced_password(url) != url


def redact_url(url: str) -> str:
    """Return *url* with any password replaced by ``***``, safe to log or show.

    Also hides the values of ``password=`` (and ``sslpassword=`` ...) query
    parameters, libpq ``password=`` keywords, and ``user:password@`` in
    strings that are not well-formed URLs.
    """
    url = _redact_query(_hide_misplaced_password(url))
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return _scrub(url)
    if password is None or not parts.scheme:
        return _scrub(url)
    # Replace only the password; keep the host part verbatim (libpq allows
    # several hosts, "h1:5432,h2:5433", which urlsplit cannot parse as a port).
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    netloc = f"{user}:***@{hostport}"
    return _scrub(urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)))


def check_endpoint_url(endpoint_url: object, service: str) -> str:
    """Validate a custom endpoint (``https://host[:port]``) of an AWS service or emulator.

    Returns it without a trailing ``/``; *service* names it in messages.
    Refuses, with a ``ValueError`` naming *service* and showing the URL through
    ``redact_url``: another scheme, no host, a bad port, credentials (they
    belong in the service's credential chain, and would be shown wherever the
    endpoint is), and a path, query or fragment. A ``TypeError`` if it is not a
    string.
    """
    if not isinstance(endpoint_url, str):
        raise TypeError(f"{service} endpoint URL must be str, not {type(endpoint_url).__name__}")
    shown = redact_url(endpoint_url)
    try:
        parts = urlsplit(endpoint_url)
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise ValueError(f"invalid {service} endpoint URL {shown!r}: {exc}") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(
            f"invalid {service} endpoint URL {shown!r}: "
            "expected 'https://host[:port]' or 'http://host[:port]'"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"invalid {service} endpoint URL {shown!r}: credentials do not "
            "belong in the URL; use the standard AWS credential chain"
        )
    if parts.path not in {"", "/"} or parts.query or parts.fragment:
        raise ValueError(
            f"invalid {service} endpoint URL {shown!r}: expected no path, query or fragment"
        )
    return endpoint_url.rstrip("/")


class InvalidURL(ConfigurationError):
    """A persistence URL with one or more problems, every one listed in ``problems``.

    With a single problem the message is that problem; with several it is a
    summary line followed by one line per problem. Never shows a password.
    """

    def __init__(self, url: str, problems: Iterable[str]) -> None:
        listed = tuple(problems)
        count = len(listed)
        super().__init__(
            f"persistence URL {redact_url(url)!r} has {count} problem{'s' if count != 1 else ''}",
            listed,
        )
        if count == 1:
            self.args = listed


class URLProblems:
    """Collects every problem with one persistence URL, for drivers' URL parsers.

    A parser checks each part inside ``with problems.check():`` (a ``ValueError``
    or ``TypeError`` there is recorded and parsing goes on) or calls ``add()``,
    then calls ``raise_if_any()`` so the user sees every problem at once.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.problems: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.problems)

    def add(self, problem: str) -> None:
        """Record one problem: a sentence naming the part, its (redacted) value and the fix."""
        self.problems.append(problem)

    @contextmanager
    def check(self) -> Iterator[None]:
        """Record a ``ValueError``/``TypeError`` raised in the block instead of raising it."""
        try:
            yield
        except ConfigurationError as exc:
            self.problems.extend(exc.problems or (str(exc),))
        except (ValueError, TypeError) as exc:
            self.problems.append(str(exc))

    def raise_if_any(self) -> None:
        """Raise ``InvalidURL`` listing every recorded problem, if there is one."""
        if self.problems:
            raise InvalidURL(self.url, self.problems)


def parse_problems(parse: Callable[[str], object], url: str) -> list[str]:
    """Every problem a driver's URL parser finds with *url* (``[]`` if it parses).

    For ``runkit_persistence_url_problems`` hooks: *parse* raises ``InvalidURL``
    listing the problems (or a ``ValueError`` for a single one).
    """
    try:
        parse(url)
    except InvalidURL as exc:
        return list(exc.problems)
    except ValueError as exc:
        return [str(exc)]
    return []


def query_params(
    url: str, allowed: set[str] | frozenset[str], problems: URLProblems | None = None
) -> dict[str, str]:
    """Return the URL's query parameters, refusing unknown or repeated ones.

    Each unknown or repeated parameter is a problem naming it (and listing the
    allowed ones). With *problems* they are recorded there and the valid
    parameters returned; without, ``InvalidURL`` (a ``ValueError``) lists them all.
    """
    collect = URLProblems(url) if problems is None else problems
    parts = urlsplit(url)
    params: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in allowed:
            collect.add(
                f"{parts.scheme}:// URL has unknown parameter {key!r} "
                f"(allowed: {', '.join(sorted(allowed)) or 'none'})"
            )
        elif key in params:
            collect.add(f"{parts.scheme}:// URL repeats parameter {key!r}")
        else:
            params[key] = value
    if problems is None:
        collect.raise_if_any()
    return params


def parse_bool(name: str, value: str) -> bool:
    """Parse a boolean URL parameter (true/false, 1/0, yes/no, on/off, or empty = true)."""
    v = value.strip().lower()
    if v in {"", "1", "true", "yes", "on"}:
        return True
    if v in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"URL parameter {name!r} must be true or false, not {value!r}")


def empty_store_hint(url: str) -> str:
    """Why a store at *url* may look empty to another process, or ``""``.

    A ``memory://`` store lives in the process that opened it: a command or a
    client run beside ``runkit run`` on one (its default) opens an empty store
    of its own.
    """
    if not url.lower().startswith("memory:"):
        return ""
    return (
        "a memory:// store lives inside the process that opened it, so the nodes of "
        "another process cannot be seen through it: run them on a shared store "
        "(postgresql://, dynamodb:// or s3://) and set DOGMA_PERSISTENCE_URL to it"
    )
