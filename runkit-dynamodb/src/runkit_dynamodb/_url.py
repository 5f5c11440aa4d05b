"""``dynamodb://`` URLs and DynamoDB naming rules."""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit

import attrs

from runkit.persistence import (
    URLProblems,
    has_unencoded_password,
    parse_bool,
    query_params,
    redact_url,
)

__all__ = ["MAX_PREFIX_LENGTH", "TABLE_SUFFIXES", "DynamoDBURL", "check_table_prefix", "parse_url"]

SCHEME: Final = "dynamodb"

#: The table of each store kind is ``<prefix><suffix>``.
TABLE_SUFFIXES: Final = {"journal": "-journal", "keyspace": "-keyspace", "set": "-set"}

#: DynamoDB table names are at most 255 characters; the longest suffix must still fit.
MAX_PREFIX_LENGTH: Final = 255 - max(len(s) for s in TABLE_SUFFIXES.values())

_PREFIX_CHAR = re.compile(r"[A-Za-z0-9_.\-]")
# botocore's own region-name rule (it rejects anything else when building a client).
_REGION = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9\-]{0,61}[a-zA-Z0-9])?$")
_ROLE_ARN = re.compile(r"^arn:[a-z0-9\-]+:iam::\d{12}:role/[\w+=,.@/\-]{1,512}$")
_USAGE = "expected 'dynamodb:///<table-prefix>' or 'dynamodb://host:port/<table-prefix>'"


def check_table_prefix(prefix: object) -> str:
    """Validate a table prefix: 1 to ``MAX_PREFIX_LENGTH`` characters of ``A-Za-z0-9_.-``.

    Raises ``TypeError`` or ``ValueError`` naming the problem.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"dynamodb table prefix must be str, not {type(prefix).__name__}")
    if not prefix:
        raise ValueError("dynamodb table prefix must not be empty")
    for char in prefix:
        if not _PREFIX_CHAR.fullmatch(char):
            raise ValueError(
                f"dynamodb table prefix {prefix!r} is invalid: {char!r} is not allowed in "
                "DynamoDB table names (use A-Z, a-z, 0-9, '_', '-' and '.')"
            )
    if len(prefix) > MAX_PREFIX_LENGTH:
        raise ValueError(
            f"dynamodb table prefix is {len(prefix)} characters, over the limit of "
            f"{MAX_PREFIX_LENGTH} (table names are at most 255 characters with the "
            "'-keyspace' suffix)"
        )
    return prefix


def check_region(region: object) -> str:
    """Validate an AWS region name such as ``eu-west-1``."""
    if not isinstance(region, str):
        raise TypeError(f"dynamodb region must be str, not {type(region).__name__}")
    if not _REGION.fullmatch(region):
        raise ValueError(f"dynamodb region {region!r} is not a valid AWS region name")
    return region


def check_role_arn(role_arn: object) -> str:
    """Validate an IAM role ARN (``arn:<partition>:iam::<account-id>:role/<name>``)."""
    if not isinstance(role_arn, str):
        raise TypeError(f"dynamodb role_arn must be str, not {type(role_arn).__name__}")
    if not _ROLE_ARN.fullmatch(role_arn):
        raise ValueError(
            f"dynamodb role_arn {role_arn!r} is not an IAM role ARN "
            "(arn:<partition>:iam::<account-id>:role/<name>)"
        )
    return role_arn


@attrs.frozen
class DynamoDBURL:
    """The parts of a ``dynamodb://`` URL.

    ``endpoint_url`` is ``None`` for AWS's own endpoint (chosen by region),
    ``region`` and ``role_arn`` are ``None`` when not given.
    """

    table_prefix: str
    endpoint_url: str | None = None
    region: str | None = None
    role_arn: str | None = None


def parse_url(url: str) -> DynamoDBURL:
    """Parse ``dynamodb:///<table-prefix>`` or ``dynamodb://host[:port]/<table-prefix>``.

    Query parameters: ``region``, ``role_arn`` (assume this IAM role through STS)
    and ``insecure`` (plain HTTP to the custom endpoint; needs a host). With a
    host and no ``insecure``, the endpoint is ``https://host[:port]``.

    Raises ``runkit.persistence.InvalidURL`` (a ``ValueError``) listing every
    problem: user info (credentials never go in the URL), a bad port, a missing
    or invalid table prefix, a fragment, an unknown, repeated, empty or
    malformed parameter. No I/O.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != SCHEME:
        raise ValueError(f"not a dynamodb URL: {redact_url(url)!r}")
    # User info in the authority, or a secret key whose '/', '?' or '#' hides the
    # '@' from urlsplit; an '@' elsewhere is fine (role ARNs may hold one).
    if "@" in parts.netloc or has_unencoded_password(url):
        # Never echo user info: it would be an access key or a secret.
        raise ValueError(
            "dynamodb URL must not contain credentials (user info before '@'); "
            "configure them through the AWS credential chain (environment, profile, role)"
        )
    shown = redact_url(url)
    problems = URLProblems(url)
    port: int | None = None
    try:
        port = parts.port
    except ValueError as exc:
        problems.add(f"dynamodb URL {shown!r} has an invalid port: {exc}")
    if parts.netloc and not parts.hostname:
        problems.add(f"dynamodb URL {shown!r} has a port but no host; {_USAGE}")
    if parts.fragment:
        problems.add(f"dynamodb URL {shown!r} has a fragment; {_USAGE}")
    params = query_params(url, frozenset({"region", "role_arn", "insecure"}), problems)
    for key, value in list(params.items()):
        if not value:
            problems.add(f"dynamodb URL parameter {key!r} must not be empty")
            del params[key]

    prefix = parts.path.removeprefix("/")
    if not prefix:
        problems.add(f"dynamodb URL {shown!r} names no table prefix; {_USAGE}")
    else:
        with problems.check():
            check_table_prefix(prefix)

    insecure = False
    if "insecure" in params:
        with problems.check():
            insecure = parse_bool("insecure", params["insecure"])
    endpoint_url = None
    if parts.netloc:
        endpoint_url = f"{'http' if insecure else 'https'}://{parts.netloc}"
        if port is None and parts.netloc.endswith(":"):
            endpoint_url = endpoint_url.removesuffix(":")
    elif insecure:
        problems.add(
            "dynamodb URL parameter 'insecure' needs a host "
            "('dynamodb://host:port/<table-prefix>?insecure=true'); "
            "AWS's own endpoints are always HTTPS"
        )
    region = params.get("region")
    if region is not None and not _REGION.fullmatch(region):
        problems.add(f"dynamodb URL parameter 'region' is not a valid AWS region: {region!r}")
    role_arn = params.get("role_arn")
    if role_arn is not None and not _ROLE_ARN.fullmatch(role_arn):
        problems.add(
            f"dynamodb URL parameter 'role_arn' is not an IAM role ARN "
            f"(arn:<partition>:iam::<account-id>:role/<name>): {role_arn!r}"
        )
    problems.raise_if_any()
    return DynamoDBURL(prefix, endpoint_url, region, role_arn)
