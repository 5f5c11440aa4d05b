"""Helpers for drivers that parse persistence URLs."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit, urlunsplit

__all__ = ["parse_bool", "query_params", "redact_url"]


# "user:password@" anywhere, for strings urlsplit cannot take apart (no scheme, ...).
_USERINFO = re.compile(r"([^:/@?#\s]*):[^@/?#\s]*@")
# libpq keyword/value form: password=... (quoted or not).
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)", re.IGNORECASE)


def _scrub(text: str) -> str:
    return _KEYWORD_PASSWORD.sub(r"\1***", _USERINFO.sub(r"\1:***@", text))


def redact_url(url: str) -> str:
    """Return *url* with any password replaced by ``***``, safe to log or show.

    Also scrubs ``password=`` query or libpq keyword parameters, and
    ``user:password@`` in strings that are not well-formed URLs.
    """
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


def query_params(url: str, allowed: set[str] | frozenset[str]) -> dict[str, str]:
    """Return the URL's query parameters, refusing unknown or repeated ones.

    Raises ``ValueError`` naming the parameter and listing the allowed ones.
    """
    parts = urlsplit(url)
    params: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in allowed:
            raise ValueError(
                f"{parts.scheme}:// URL has unknown parameter {key!r} "
                f"(allowed: {', '.join(sorted(allowed)) or 'none'})"
            )
        if key in params:
            raise ValueError(f"{parts.scheme}:// URL repeats parameter {key!r}")
        params[key] = value
    return params


def parse_bool(name: str, value: str) -> bool:
    """Parse a boolean URL parameter (true/false, 1/0, yes/no, on/off, or empty = true)."""
    v = value.strip().lower()
    if v in {"", "1", "true", "yes", "on"}:
        return True
    if v in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"URL parameter {name!r} must be true or false, not {value!r}")
