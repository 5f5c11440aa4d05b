"""``s3://`` URL checking: every problem at once, through parse_url and the hook (no I/O)."""

from __future__ import annotations

import pytest

from runkit.persistence import InvalidURL
from runkit_s3 import _plugin as plugin
from runkit_s3 import parse_url


def test_every_problem_is_reported_at_once() -> None:
    url = "s3://key:s3cret@h/Bad_Bucket?prefix=a//b&region=nope&role_arn=x&zz=1#f"
    shown = "s3://key:***@h/Bad_Bucket?prefix=a//b&region=nope&role_arn=x&zz=1#f"
    with pytest.raises(InvalidURL) as info:
        parse_url(url)
    assert info.value.problems == (
        f"S3 URL {shown!r} contains credentials; use the standard AWS credential chain "
        "(environment, profile, instance role) or role_arn instead",
        f"S3 URL {shown!r} has a fragment; expected 's3:///<bucket>'",
        "s3:// URL has unknown parameter 'zz' (allowed: insecure, prefix, region, role_arn)",
        "invalid S3 bucket name 'Bad_Bucket': may contain only lowercase letters, digits, "
        "'.' and '-', and must begin and end with a letter or digit",
        "invalid S3 key prefix 'a//b': use '/'-separated segments of letters, digits and "
        "!_.*'()- (no empty, '.' or '..' segments, no leading '/')",
        "invalid AWS region 'nope': expected a name like 'eu-west-1'",
        "invalid IAM role ARN 'x': expected 'arn:aws:iam::<12-digit account>:role/<name>'",
    )
    assert "s3cret" not in str(info.value)


def test_a_valid_url_still_parses() -> None:
    settings = parse_url("s3://minio:9000/data?insecure=1&prefix=app&region=eu-west-1")
    assert settings.endpoint_url == "http://minio:9000"
    assert settings.prefix == "app/"


def test_hook() -> None:
    assert plugin.runkit_persistence_url_problems("memory:///x") is None
    assert plugin.runkit_persistence_url_problems("s3:///bucket") == []
    assert plugin.runkit_persistence_url_problems("s3:///?insecure=true") == [
        "S3 URL 's3:///?insecure=true' names no bucket; expected 's3:///<bucket>'",
        "S3 URL 's3:///?insecure=true' sets insecure but names no host; plain HTTP is only "
        "for a custom endpoint: 's3://host:port/<bucket>?insecure=true'",
    ]
