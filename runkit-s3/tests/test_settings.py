"""URL parsing, settings validation and plugin resolution (no I/O)."""

from __future__ import annotations

from typing import Any

import boto3
import pytest

from runkit.persistence import installed_schemes, provider_from_url
from runkit_s3 import S3Provider, S3Settings, parse_url
from runkit_s3 import _plugin as plugin
from runkit_s3._client import create_client
from runkit_s3._layout import MAX_OBJECT_KEY_BYTES, Layout, limits_for


def test_minimal_url_names_the_bucket_and_nothing_else() -> None:
    assert parse_url("s3:///my-bucket") == S3Settings(bucket="my-bucket")


def test_host_and_port_become_an_https_endpoint() -> None:
    settings = parse_url("s3://minio.local:9000/data")
    assert settings.endpoint_url == "https://minio.local:9000"
    assert settings.bucket == "data"


def test_insecure_uses_plain_http_to_the_host() -> None:
    assert parse_url("s3://127.0.0.1:9000/data?insecure").endpoint_url == "http://127.0.0.1:9000"
    assert parse_url("s3://h/data?insecure=true").endpoint_url == "http://h"
    assert parse_url("s3://h/data?insecure=false").endpoint_url == "https://h"


def test_ipv6_host_is_bracketed() -> None:
    assert parse_url("s3://[::1]:9000/data").endpoint_url == "https://[::1]:9000"


def test_all_parameters() -> None:
    settings = parse_url(
        "s3:///data?region=eu-west-1&role_arn=arn:aws:iam::123456789012:role/runkit"
        "&prefix=cluster-a/blue"
    )
    assert settings == S3Settings(
        bucket="data",
        prefix="cluster-a/blue/",
        region="eu-west-1",
        role_arn="arn:aws:iam::123456789012:role/runkit",
    )
    assert settings.url() == (
        "s3:///data?region=eu-west-1&role_arn=arn:aws:iam::123456789012:role/runkit"
        "&prefix=cluster-a/blue/"
    )


def test_prefix_is_normalised_to_end_with_a_slash() -> None:
    assert parse_url("s3:///data?prefix=a").prefix == "a/"
    assert parse_url("s3:///data?prefix=a/b/").prefix == "a/b/"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory:///x", "not an S3 URL: 'memory:///x' (expected 's3:///<bucket>')"),
        ("s3:///", "S3 URL 's3:///' names no bucket; expected 's3:///<bucket>'"),
        ("s3://host:9000", "S3 URL 's3://host:9000' names no bucket; expected 's3:///<bucket>'"),
        (
            "s3:///data/sub",
            "S3 URL 's3:///data/sub' has a path below the bucket; use the prefix parameter "
            "for a key prefix: 's3:///<bucket>?prefix=<prefix>'",
        ),
        ("s3:///data#frag", "S3 URL 's3:///data#frag' has a fragment; expected 's3:///<bucket>'"),
        (
            "s3:///data?colour=red",
            "s3:// URL has unknown parameter 'colour' "
            "(allowed: insecure, prefix, region, role_arn)",
        ),
        ("s3:///data?region=eu-west-1&region=eu-west-2", "s3:// URL repeats parameter 'region'"),
        ("s3:///data?region=", "S3 URL parameter 'region' is empty"),
        ("s3:///data?prefix=", "S3 URL parameter 'prefix' is empty"),
        ("s3:///data?role_arn=", "S3 URL parameter 'role_arn' is empty"),
        (
            "s3:///data?insecure=maybe",
            "URL parameter 'insecure' must be true or false, not 'maybe'",
        ),
        (
            "s3:///data?insecure=true",
            "S3 URL 's3:///data?insecure=true' sets insecure but names no host; plain HTTP "
            "is only for a custom endpoint: 's3://host:port/<bucket>?insecure=true'",
        ),
        ("s3://:9000/data", "S3 URL 's3://:9000/data' has a port but no host"),
        (
            "s3://host:port/data",
            "malformed S3 URL 's3://host:port/data': Port could not be cast to integer "
            "value as 'port'",
        ),
        (
            "s3:///data?region=Europe",
            "invalid AWS region 'Europe': expected a name like 'eu-west-1'",
        ),
        (
            "s3:///data?role_arn=runkit",
            "invalid IAM role ARN 'runkit': expected 'arn:aws:iam::<12-digit account>:role/<name>'",
        ),
        (
            "s3:///data?role_arn=arn:aws:iam::123:role/x",
            "invalid IAM role ARN 'arn:aws:iam::123:role/x': expected "
            "'arn:aws:iam::<12-digit account>:role/<name>'",
        ),
        (
            "s3:///data?prefix=/abs",
            "invalid S3 key prefix '/abs': use '/'-separated segments of letters, digits and "
            "!_.*'()- (no empty, '.' or '..' segments, no leading '/')",
        ),
        (
            "s3:///data?prefix=a//b",
            "invalid S3 key prefix 'a//b': use '/'-separated segments of letters, digits and "
            "!_.*'()- (no empty, '.' or '..' segments, no leading '/')",
        ),
        (
            "s3:///data?prefix=a/../b",
            "invalid S3 key prefix 'a/../b': use '/'-separated segments of letters, digits and "
            "!_.*'()- (no empty, '.' or '..' segments, no leading '/')",
        ),
        (
            "s3:///data?prefix=a%20b",
            "invalid S3 key prefix 'a b': use '/'-separated segments of letters, digits and "
            "!_.*'()- (no empty, '.' or '..' segments, no leading '/')",
        ),
        (
            f"s3:///data?prefix={'p' * 256}",
            f"invalid S3 key prefix '{'p' * 256}': longer than 256 bytes",
        ),
    ],
)
def test_malformed_url_raises_value_error_naming_the_problem(url: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_url(url)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("bucket", "problem"),
    [
        ("ab", "must be 3 to 63 characters long"),
        ("a" * 64, "must be 3 to 63 characters long"),
        (
            "My-Bucket",
            "may contain only lowercase letters, digits, '.' and '-', "
            "and must begin and end with a letter or digit",
        ),
        (
            "-bucket",
            "may contain only lowercase letters, digits, '.' and '-', "
            "and must begin and end with a letter or digit",
        ),
        (
            "bucket_1",
            "may contain only lowercase letters, digits, '.' and '-', "
            "and must begin and end with a letter or digit",
        ),
        ("my..bucket", "must not contain two adjacent periods"),
        ("192.168.1.1", "must not be formatted as an IP address"),
        ("xn--bucket", "uses a prefix or suffix that S3 reserves"),
        ("bucket-s3alias", "uses a prefix or suffix that S3 reserves"),
    ],
)
def test_invalid_bucket_name_raises_value_error(bucket: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_url(f"s3:///{bucket}")
    assert str(info.value) == f"invalid S3 bucket name {bucket!r}: {problem}"


def test_credentials_in_the_url_are_refused_without_echoing_the_password() -> None:
    with pytest.raises(ValueError) as info:
        parse_url("s3://AKIAEXAMPLE:s3cr3t@host:9000/data")
    message = str(info.value)
    assert "s3cr3t" not in message
    assert message == (
        "S3 URL 's3://AKIAEXAMPLE:***@host:9000/data' contains credentials; use the standard "
        "AWS credential chain (environment, profile, instance role) or role_arn instead"
    )


def test_password_never_appears_in_malformed_url_errors() -> None:
    with pytest.raises(ValueError) as info:
        provider_from_url("s3://user:hunter2@host:notaport/data")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bucket": "Bad"}, "invalid S3 bucket name 'Bad'"),
        ({"bucket": "data", "endpoint_url": "ftp://h"}, "invalid S3 endpoint URL 'ftp://h'"),
        (
            {"bucket": "data", "endpoint_url": "https://h/path"},
            "invalid S3 endpoint URL 'https://h/path': expected no path, query or fragment",
        ),
        (
            {"bucket": "data", "endpoint_url": "https://u:pw@h"},
            "invalid S3 endpoint URL 'https://u:***@h': credentials do not belong in the URL",
        ),
        ({"bucket": "data", "region": "mars"}, "invalid AWS region 'mars'"),
        ({"bucket": "data", "max_concurrency": 0}, "max_concurrency must be a positive int"),
    ],
)
def test_provider_constructor_validates_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        S3Provider(**kwargs)  # type: ignore[arg-type]
    assert str(info.value).startswith(message)


def test_plugin_handles_s3_urls_only() -> None:
    assert plugin.runkit_persistence_schemes() == ["s3"]
    assert plugin.runkit_persistence_provider("memory:///x") is None
    assert installed_schemes()["s3"]
    provider = provider_from_url("s3://127.0.0.1:9000/data?insecure&prefix=p")
    assert isinstance(provider, S3Provider)
    assert provider.settings == S3Settings(
        bucket="data", prefix="p/", endpoint_url="http://127.0.0.1:9000"
    )
    assert repr(provider) == "<S3Provider s3://127.0.0.1:9000/data?insecure=true&prefix=p/>"
    with pytest.raises(ValueError, match=r"^S3 URL 's3:///' names no bucket"):
        provider_from_url("s3:///")


@pytest.mark.parametrize("prefix", ["", "a/", "p" * 255 + "/"])
def test_declared_limits_fill_but_never_exceed_the_s3_key_budget(prefix: str) -> None:
    limits = limits_for(prefix)
    layout = Layout(prefix)
    name = "\u00e9" * (limits.max_name_bytes // 2)  # multi-byte UTF-8, exactly at the limit
    assert len(name.encode()) == limits.max_name_bytes
    longest = max(
        len((layout.keyspace(name) + "ff" * limits.max_key_bytes).encode()),
        len((layout.set(name) + "ff" * limits.max_member_bytes).encode()),
        len(layout.journal(name).record(2**63 - 1).encode()),
        len(layout.journal(name).meta.encode()),
    )
    assert MAX_OBJECT_KEY_BYTES - 1 <= longest <= MAX_OBJECT_KEY_BYTES
    assert limits.max_key_bytes == limits.max_member_bytes == (1024 - len(prefix) - 259) // 2


def test_layout_encodes_any_name_key_and_member_as_hex() -> None:
    layout = Layout("p/")
    journal = layout.journal("a/b%c\x00\u00e9")
    assert journal.meta == "p/j/612f622563" + "00" + "c3a9" + "/m"
    assert journal.record(255) == "p/j/612f62256300c3a9/r/00000000000000ff"
    assert journal.position(journal.record(2**63 - 1)) == 2**63 - 1
    assert layout.keyspace("k") == "p/k/6b/"
    assert layout.set("s") == "p/s/73/"


def test_requests_are_bounded_by_timeouts_shorter_than_botocores_default() -> None:
    # A cancelled call waits for its request in flight (it finishes in its worker
    # thread), so the client's timeouts bound that wait: botocore's are 60 s each.
    session = boto3.Session(aws_access_key_id="k", aws_secret_access_key="s")
    client = create_client(parse_url("s3://127.0.0.1:9/data?insecure"), session, 2)
    config: Any = client.meta.config  # (the stubs omit the timeout attributes)
    assert (config.connect_timeout, config.read_timeout) == (5, 30)
