"""Validators shared by engine options and environment variables.

Each returns the normalised value or raises ``ValueError``/``TypeError`` with a
message that names the value, says what was expected, and gives an example.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import uuid

import attrs

import dogma

__all__ = [
    "KNOBS",
    "Knob",
    "Site",
    "check_readable_file",
    "check_retry_delays",
    "is_unspecified_address",
    "parse_address",
    "parse_node_id",
    "parse_site",
]


def is_unspecified_address(address: str) -> bool:
    """Whether *address*'s host is a wildcard (0.0.0.0, ::, [::0], ...): peers cannot reach it."""
    host = address.rpartition(":")[0].removeprefix("[").removesuffix("]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == "0"  # inet_aton's shorthand for 0.0.0.0
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_unspecified or (mapped is not None and mapped.is_unspecified)


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
    """Validate a site identity: a Dogma identity name and key (a UUID string or ``uuid.UUID``)."""
    if isinstance(key, uuid.UUID):
        key = str(key)  # "key a UUID": a uuid.UUID is one, as with_node_id also takes
    if not isinstance(name, str):
        raise TypeError(f"site name must be a str, not {type(name).__name__} ({name!r})")
    if not isinstance(key, str):
        raise TypeError(f"site key must be a str, not {type(key).__name__} ({key!r})")
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
    if "://" in value:
        raise ValueError(f"{what} {value!r} is not 'host:port' (no scheme), e.g. {example}")
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
    elif any(c.isspace() for c in host):
        raise ValueError(f"{what} {value!r} contains whitespace")
    elif (problem := _host_problem(host)) is not None:
        raise ValueError(
            f"{what} {value!r} has an invalid host {host!r} ({problem}); expected an IP "
            f"address (IPv6 in brackets) or a host name, e.g. {example}"
        )
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{what} {value!r} has an invalid port {port_text!r}; expected 0-65535")
    if advertise:
        if is_unspecified_address(value):
            raise ValueError(
                f"{what} {value!r}: peers cannot route to a wildcard address; "
                f"give this node's host name or IP, e.g. {example}"
            )
        if int(port_text) == 0:
            raise ValueError(f"{what} {value!r}: port 0 is not routable; give the real port")
    return value


# One label of a host name (RFC 1123): letters, digits and inner hyphens, 1-63
# characters; and inner underscores, which RFC 1123 leaves out but DNS and container
# networks use (Docker Compose names such as ``bank_node_1``).
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?", re.IGNORECASE)


def _host_problem(host: str) -> str | None:
    """Why *host* is neither an IPv4 address nor a host name, or ``None``.

    Names may be internationalised (IDNA) and end with a '.'; '0' is the
    shorthand for 0.0.0.0 that sockets accept.
    """
    if host == "0":
        return None
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        return None
    name = host.removesuffix(".")
    if "" in name.split("."):
        return "an empty part between dots"
    too_long = "too long: at most 63 characters between dots, 253 in all"
    try:
        name = name.encode("idna").decode("ascii")  # "bücher.example" -> "xn--bcher-kva.example"
    except UnicodeError:  # the codec's only complaints: a part too long, or not a name
        return too_long if name.isascii() else "not a valid internationalised name"
    labels = name.split(".")
    if len(name) > 253 or any(len(label) > 63 for label in labels):
        return too_long
    if not all(_LABEL.fullmatch(label) for label in labels):
        return (
            "a host name has only letters, digits, '-', '_' and '.', and no part starts or "
            "ends with '-' or '_'"
        )
    if labels[-1].isdigit():
        # 999.1.1.1, 0.0.0.0. or 10.1: no top-level domain is all digits.
        return "not a valid IPv4 address"
    return None


@attrs.frozen
class Knob:
    """One numeric engine setting reachable from an option, a variable and a flag.

    ``check`` validates a value given in Python (raising ``TypeError`` for the
    wrong type, ``ValueError`` out of range); ``parse`` validates the text of an
    environment variable or command-line flag.
    """

    #: The ``EngineSettings`` field.
    field: str
    #: The ``runkit.with_*`` option (or ``with_retry_policy`` argument) that sets it.
    option: str
    #: The ``DOGMA_*`` environment variable.
    variable: str
    #: The ``runkit run`` flag.
    flag: str
    kind: type[int] | type[float]
    minimum: float
    maximum: float
    description: str
    example: str
    default: str

    @property
    def expected(self) -> str:
        """The accepted range, for messages: ``1 to 4096`` or ``0.05 to 60 seconds``."""
        unit = "" if self.kind is int else " seconds"
        return f"{_number(self.minimum)} to {_number(self.maximum)}{unit}"

    def check(self, value: object, *, what: str) -> int | float:
        """Validate a Python value; *what* names the call in messages."""
        ok_type = int if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_type):
            noun = "an int" if self.kind is int else "seconds (an int or float)"
            raise TypeError(f"{what} takes {noun}, not {type(value).__name__}")
        try:
            number = self.kind(value)
        except OverflowError:  # an int too large for a float
            number = math.inf
        if not (math.isfinite(number) and self.minimum <= number <= self.maximum):
            raise ValueError(f"{what}: {value!r} is out of range; expected {self.expected}")
        return number

    def parse(self, text: str) -> int | float:
        """Validate the text of a variable or flag, e.g. ``"16"`` or ``"0.5"``.

        The ``ValueError`` says what is wrong; callers add ``expected``.
        """
        try:
            number = int(text.strip(), 10) if self.kind is int else float(text.strip())
        except ValueError:
            noun = "a whole number" if self.kind is int else "a number of seconds"
            raise ValueError(f"{text!r} is not {noun}") from None
        if not (math.isfinite(number) and self.minimum <= number <= self.maximum):
            raise ValueError(f"{text!r} is out of range")
        return number


def _number(value: float) -> str:
    return f"{value:,}" if float(value).is_integer() and value >= 10_000 else f"{value:g}"


#: The engine's tuning knobs, in the order ``runkit env`` and ``runkit run --help`` list them.
KNOBS: tuple[Knob, ...] = (
    Knob(
        "partition_count",
        "with_partition_count",
        "DOGMA_PARTITION_COUNT",
        "--partition-count",
        int,
        1,
        4096,
        "Partitions per application when it first starts; stored with the application "
        "and fixed afterwards.",
        "32",
        "16",
    ),
    Knob(
        "heartbeat_interval",
        "with_heartbeat_interval",
        "DOGMA_HEARTBEAT_INTERVAL",
        "--heartbeat-interval",
        float,
        0.05,
        60,
        "Seconds between membership heartbeats; a node is presumed dead after 3 intervals.",
        "2",
        "1",
    ),
    Knob(
        "backlog_limit",
        "with_backlog_limit",
        "DOGMA_BACKLOG_LIMIT",
        "--backlog-limit",
        int,
        1,
        1_000_000,
        "The most commands waiting in one partition; beyond it execute_command() waits "
        "for room (back-pressure).",
        "5000",
        "1000",
    ),
    Knob(
        "start_timeout",
        "with_start_timeout",
        "DOGMA_START_TIMEOUT",
        "--start-timeout",
        float,
        0.1,
        86_400,
        "Seconds start-up keeps retrying an unreachable store before giving up.",
        "120",
        "60",
    ),
    Knob(
        "max_attempts",
        "with_retry_policy(max_attempts=...)",
        "DOGMA_MAX_ATTEMPTS",
        "--max-attempts",
        int,
        1,
        1_000_000,
        "Consecutive failed attempts at handling a command before it goes to the poison store.",
        "10",
        "5",
    ),
    Knob(
        "retry_base_delay",
        "with_retry_policy(base_delay=...)",
        "DOGMA_RETRY_BASE_DELAY",
        "--retry-base-delay",
        float,
        0.001,
        3600,
        "Seconds before the first retry of a failed command; doubles per failure (with jitter).",
        "0.5",
        "0.1",
    ),
    Knob(
        "retry_max_delay",
        "with_retry_policy(max_delay=...)",
        "DOGMA_RETRY_MAX_DELAY",
        "--retry-max-delay",
        float,
        0.001,
        86_400,
        "The longest delay between retries, in seconds; at least the base delay.",
        "60",
        "30",
    ),
)


def check_retry_delays(
    base_delay: float, max_delay: float, *, sources: tuple[str | None, str | None]
) -> None:
    """Raise ``ValueError`` if *max_delay* is below *base_delay*.

    *sources* name where each delay came from, so the message names what to
    change: a flag, a variable or an option's argument; ``None`` for a default.
    """
    if max_delay < base_delay:
        base = sources[0] or "the default retry base delay"
        top = sources[1] or "the default retry max delay"
        raise ValueError(
            f"{base} ({base_delay:g}) is above {top} ({max_delay:g}); "
            "the retry max delay must be at least the base delay"
        )


def check_readable_file(path: object, *, what: str) -> str:
    """Validate the path of a PEM file (certificate, key or CA bundle) that must be readable now."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{what} must be a file path, not {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str) or not text:
        raise ValueError(f"{what} must be a non-empty file path")
    if not os.path.exists(text):
        raise ValueError(f"{what} {text!r} does not exist")
    if not os.path.isfile(text):
        raise ValueError(f"{what} {text!r} is not a file")
    try:
        with open(text, "rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        raise ValueError(f"{what} {text!r} cannot be read: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in head:
        raise ValueError(f"{what} {text!r} is not a PEM file (no '-----BEGIN' line)")
    return text
