"""Validators shared by engine options and environment variables.

Each returns the normalised value or raises ``ValueError``/``TypeError`` with a
message that names the value, says what was expected, and gives an example.
"""

from __future__ import annotations

import ipaddress
import uuid

import attrs

import dogma

__all__ = ["Site", "parse_address", "parse_node_id", "parse_site"]


@attrs.frozen
class Site:
    """A site's identity, stamped in every envelope; separate sites never share data."""

    name: str
    key: str


def parse_node_id(value: object, *, what: str = "node ID") -> uuid.UUID:
    """Parse a node ID: a canonical (lowercase, hyphenated) RFC 9562 UUID string, not nil."""
    if isinstance(value, uuid.UUID):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        raise TypeError(f"{what} must be a UUID string, not {type(value).__name__}")
    try:
        parsed = uuid.UUID(text)
    except ValueError:
        parsed = None
    if parsed is None or str(parsed) != text:
        raise ValueError(
            f"{what} {text!r} is not a canonical UUID; expected 36 lowercase hex characters "
            "with hyphens, e.g. '6f1a8e5c-2b1d-4c3e-9f4a-1b2c3d4e5f60'"
        )
    if parsed.int == 0:
        raise ValueError(f"{what} must not be the nil UUID")
    return parsed


def parse_site(name: object, key: object) -> Site:
    """Validate a site identity: a Dogma identity name and key."""
    if not isinstance(name, str) or not isinstance(key, str):
        raise TypeError("site name and key must be str")
    try:
        name = dogma.validate_identity_name(name)
    except ValueError as exc:
        raise ValueError(f"site name: {exc}") from None
    try:
        key = dogma.validate_identity_key(key)
    except ValueError as exc:
        raise ValueError(f"site key: {exc}") from None
    return Site(name, key)


def parse_address(value: object, *, what: str, advertise: bool) -> str:
    """Validate a ``host:port`` address (IPv6 hosts in brackets).

    A listen address may use a wildcard host or port 0 (any free port); an
    advertise address must be something peers can connect to.
    """
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a 'host:port' str, not {type(value).__name__}")
    example = "'node-1.internal:7000'" if advertise else "'0.0.0.0:7000'"
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{what} {value!r} is not 'host:port', e.g. {example}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what} {value!r} has an invalid IPv6 host {host!r}") from None
    elif ":" in host:
        raise ValueError(f"{what} {value!r}: put an IPv6 host in brackets, e.g. '[::1]:7000'")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{what} {value!r} has an invalid port {port_text!r}; expected 0-65535")
    if any(c.isspace() for c in host):
        raise ValueError(f"{what} {value!r} contains whitespace")
    if advertise:
        if host in {"0.0.0.0", "::"}:  # noqa: S104 - rejecting the wildcard, not binding it
            raise ValueError(
                f"{what} {value!r}: peers cannot route to a wildcard address; "
                f"give this node's host name or IP, e.g. {example}"
            )
        if int(port_text) == 0:
            raise ValueError(f"{what} {value!r}: port 0 is not routable; give the real port")
    return value
