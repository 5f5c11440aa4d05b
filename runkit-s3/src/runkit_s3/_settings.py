"""Validated settings of an S3 provider, and parsing of ``s3://`` URLs.

Every check here runs before any I/O, and every error is a ``ValueError`` that
names the offending part. URLs are shown through ``redact_url`` so a password
someone put in the URL never reaches an error message.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import attrs

from runkit.persistence import (
    InvalidURL,
    URLProblems,
    check_endpoint_url,
    has_unencoded_password,
    parse_bool,
    query_params,
    redact_url,
)

__all__ = ["MAX_PREFIX_BYTES", "S3Settings", "parse_url"]

SCHEME = "s3"

#: The longest key prefix accepted; it comes out of the 1,024-byte S3 key budget.
MAX_PREFIX_BYTES = 256

_PARAMETERS = frozenset({"region", "role_arn", "insecure", "prefix"})

# General-purpose bucket naming rules (AWS "Bucket naming rules").
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_BUCKET_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
_REGION = re.compile(r"[a-z]{2}(-[a-z0-9]+)+-\d{1,2}")
_ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}")
# Prefix segments use only S3's "safe" key characters; no empty, "." or ".." segments.
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9!_.*'()-]+")


def _check_bucket(bucket: str) -> str:
    problem = None
    if not 3 <= len(bucket) <= 63:
        problem = "must be 3 to 63 characters long"
    elif not _BUCKET.fullmatch(bucket):
        problem = (
            "may contain only lowercase letters, digits, '.' and '-', "
            "and must begin and end with a letter or digit"
        )
    elif ".." in bucket:
        problem = "must not contain two adjacent periods"
    elif bucket.startswith(_BUCKET_RESERVED_PREFIXES) or bucket.endswith(_BUCKET_RESERVED_SUFFIXES):
        problem = "uses a prefix or suffix that S3 reserves"
    else:
        try:
            ipaddress.IPv4Address(bucket)
        except ValueError:
            pass
        else:
            problem = "must not be formatted as an IP address"
    if problem:
        raise ValueError(f"invalid S3 bucket name {bucket!r}: {problem}")
    return bucket


def _check_prefix(prefix: str) -> str:
    """Return *prefix* normalised to end with ``/`` (or ``""``)."""
    if not prefix:
        return ""
    stripped = prefix.removesuffix("/")
    segments = stripped.split("/")
    if not all(_PREFIX_SEGMENT.fullmatch(s) and s not in {".", ".."} for s in segments):
        raise ValueError(
            f"invalid S3 key prefix {prefix!r}: use '/'-separated segments of letters, "
            "digits and !_.*'()- (no empty, '.' or '..' segments, no leading '/')"
        )
    normalised = stripped + "/"
    if len(normalised) > MAX_PREFIX_BYTES:
        raise ValueError(f"invalid S3 key prefix {prefix!r}: longer than {MAX_PREFIX_BYTES} bytes")
    return normalised


def _check_region(region: str) -> str:
    if not _REGION.fullmatch(region):
        raise ValueError(f"invalid AWS region {region!r}: expected a name like 'eu-west-1'")
    return region


def _check_role_arn(role_arn: str) -> str:
    if not _ROLE_ARN.fullmatch(role_arn):
        raise ValueError(
            f"invalid IAM role ARN {role_arn!r}: expected "
            "'arn:aws:iam::<12-digit account>:role/<name>'"
        )
    return role_arn


def _check_endpoint(endpoint_url: str) -> str:
    return check_endpoint_url(endpoint_url, "S3")


@attrs.frozen
class S3Settings:
    """Where an S3 provider keeps its data, validated.

    Attributes:
        bucket: The bucket name (created if missing).
        prefix: A key prefix for namespacing, ``""`` or ending in ``/``.
        region: The AWS region, or ``None`` for the standard AWS configuration
            chain (``us-east-1`` when a custom endpoint is given and none is set).
        endpoint_url: A custom endpoint (S3-compatible stores, emulators); path-style
            addressing is used with it. ``None`` means AWS.
        role_arn: An IAM role to assume through STS, or ``None``.
    """

    bucket: str = attrs.field(converter=_check_bucket)
    prefix: str = attrs.field(default="", converter=_check_prefix)
    region: str | None = attrs.field(
        default=None, converter=attrs.converters.optional(_check_region)
    )
    endpoint_url: str | None = attrs.field(
        default=None, converter=attrs.converters.optional(_check_endpoint)
    )
    role_arn: str | None = attrs.field(
        default=None, converter=attrs.converters.optional(_check_role_arn)
    )

    def url(self) -> str:
        """The ``s3://`` URL of these settings (it holds no secrets)."""
        host = ""
        query: list[str] = []
        if self.endpoint_url is not None:
            parts = urlsplit(self.endpoint_url)
            host = parts.netloc
            if parts.scheme == "http":
                query.append("insecure=true")
        if self.region:
            query.append(f"region={self.region}")
        if self.role_arn:
            query.append(f"role_arn={self.role_arn}")
        if self.prefix:
            query.append(f"prefix={self.prefix}")
        return f"s3://{host}/{self.bucket}" + ("?" + "&".join(query) if query else "")


_CREDENTIALS = (
    "S3 URL {shown!r} contains credentials; use the standard AWS credential "
    "chain (environment, profile, instance role) or role_arn instead"
)


def parse_url(url: str) -> S3Settings:
    """Parse ``s3:///<bucket>`` or ``s3://host[:port]/<bucket>`` into settings.

    Query parameters: ``region``, ``role_arn``, ``insecure`` (plain HTTP to the
    custom host; an error without one) and ``prefix``. Raises
    ``runkit.persistence.InvalidURL`` (a ``ValueError``) listing every problem:
    credentials in the URL, a missing or invalid bucket, a path below the
    bucket, a fragment, an unknown, repeated or malformed parameter; a
    ``ValueError`` for another scheme. No I/O.
    """
    shown = redact_url(url)
    if has_unencoded_password(url):
        # Never parse further: a piece of a secret key would show as a port or path.
        raise InvalidURL(url, [_CREDENTIALS.format(shown=shown)])
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"malformed S3 URL {shown!r}: {exc}") from None
    if parts.scheme.lower() != SCHEME:
        raise ValueError(f"not an S3 URL: {shown!r} (expected 's3:///<bucket>')")
    problems = URLProblems(url)
    if parts.username is not None or parts.password is not None:
        problems.add(_CREDENTIALS.format(shown=shown))
    if parts.fragment:
        problems.add(f"S3 URL {shown!r} has a fragment; expected 's3:///<bucket>'")
    params = query_params(url, _PARAMETERS, problems)
    path = parts.path.removeprefix("/")
    if not path:
        problems.add(f"S3 URL {shown!r} names no bucket; expected 's3:///<bucket>'")
    elif "/" in path:
        problems.add(
            f"S3 URL {shown!r} has a path below the bucket; "
            "use the prefix parameter for a key prefix: 's3:///<bucket>?prefix=<prefix>'"
        )
    bucket = unquote(path)
    for name, value in list(params.items()):
        if not value and name != "insecure":
            problems.add(f"S3 URL parameter {name!r} is empty")
            del params[name]
    insecure = False
    if "insecure" in params:
        with problems.check():
            insecure = parse_bool("insecure", params["insecure"])
    host = parts.hostname
    endpoint_url = None
    if host:
        netloc = f"[{host}]" if ":" in host else host
        if port is not None:
            netloc += f":{port}"
        endpoint_url = f"{'http' if insecure else 'https'}://{netloc}"
    elif insecure:
        problems.add(
            f"S3 URL {shown!r} sets insecure but names no host; plain HTTP is only for "
            "a custom endpoint: 's3://host:port/<bucket>?insecure=true'"
        )
    elif port is not None:
        problems.add(f"S3 URL {shown!r} has a port but no host")
    # Each setting checked on its own, so one bad value does not hide the others.
    checks: list[tuple[Callable[[str], str], str | None]] = [
        (_check_bucket, bucket if path and "/" not in path else None),
        (_check_prefix, params.get("prefix")),
        (_check_region, params.get("region")),
        (_check_endpoint, endpoint_url),
        (_check_role_arn, params.get("role_arn")),
    ]
    for check, given in checks:
        if given is not None:
            with problems.check():
                check(given)
    problems.raise_if_any()
    return S3Settings(
        bucket=bucket,
        prefix=params.get("prefix", ""),
        region=params.get("region"),
        endpoint_url=endpoint_url,
        role_arn=params.get("role_arn"),
    )
