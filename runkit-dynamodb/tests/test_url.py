"""URL parsing, plugin resolution and constructor validation (no server needed)."""

from __future__ import annotations

import re

import pytest

from runkit.persistence import InvalidURL, installed_schemes, provider_from_url
from runkit_dynamodb import DynamoDBProvider, DynamoDBURL, parse_url

USAGE = "expected 'dynamodb:///<table-prefix>' or 'dynamodb://host:port/<table-prefix>'"


class TestParseURL:
    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("dynamodb:///app", DynamoDBURL("app")),
            ("DynamoDB:///App_1.x-y", DynamoDBURL("App_1.x-y")),
            (
                "dynamodb://localhost:8000/app?insecure=true",
                DynamoDBURL("app", endpoint_url="http://localhost:8000"),
            ),
            (
                "dynamodb://localhost:8000/app",
                DynamoDBURL("app", endpoint_url="https://localhost:8000"),
            ),
            (
                "dynamodb://ddb.example.com/app?insecure=0",
                DynamoDBURL("app", endpoint_url="https://ddb.example.com"),
            ),
            (
                "dynamodb://[::1]:8000/app?insecure=yes",
                DynamoDBURL("app", endpoint_url="http://[::1]:8000"),
            ),
            ("dynamodb:///app?region=eu-west-2", DynamoDBURL("app", region="eu-west-2")),
            (
                "dynamodb:///app?role_arn=arn:aws:iam::123456789012:role/path/runner",
                DynamoDBURL("app", role_arn="arn:aws:iam::123456789012:role/path/runner"),
            ),
            (
                "dynamodb:///app?role_arn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fr&insecure=false",
                DynamoDBURL("app", role_arn="arn:aws:iam::123456789012:role/r"),
            ),
            ("dynamodb:///" + "p" * 246, DynamoDBURL("p" * 246)),
            (  # IAM role names may hold '@': not user info
                "dynamodb:///app?role_arn=arn:aws:iam::123456789012:role/ops@prod",
                DynamoDBURL("app", role_arn="arn:aws:iam::123456789012:role/ops@prod"),
            ),
        ],
    )
    def test_valid(self, url: str, expected: DynamoDBURL) -> None:
        """Valid URLs give the prefix, the endpoint (https unless insecure) and the parameters."""
        assert parse_url(url) == expected

    @pytest.mark.parametrize(
        ("url", "message"),
        [
            ("dynamodb:///", f"dynamodb URL 'dynamodb:///' names no table prefix; {USAGE}"),
            ("dynamodb://", f"dynamodb URL 'dynamodb://' names no table prefix; {USAGE}"),
            (
                "dynamodb://host:8000",
                f"dynamodb URL 'dynamodb://host:8000' names no table prefix; {USAGE}",
            ),
            (
                "dynamodb:///a/b",
                "dynamodb table prefix 'a/b' is invalid: '/' is not allowed in DynamoDB "
                "table names (use A-Z, a-z, 0-9, '_', '-' and '.')",
            ),
            (
                "dynamodb:///a%20b",
                "dynamodb table prefix 'a%20b' is invalid: '%' is not allowed in DynamoDB "
                "table names (use A-Z, a-z, 0-9, '_', '-' and '.')",
            ),
            (
                "dynamodb:///" + "p" * 247,
                "dynamodb table prefix is 247 characters, over the limit of 246 (table names "
                "are at most 255 characters with the '-keyspace' suffix)",
            ),
            (
                "dynamodb:///app?bucket=x",
                "dynamodb:// URL has unknown parameter 'bucket' "
                "(allowed: insecure, region, role_arn)",
            ),
            ("dynamodb:///app?region=a&region=b", "dynamodb:// URL repeats parameter 'region'"),
            ("dynamodb:///app?region=", "dynamodb URL parameter 'region' must not be empty"),
            ("dynamodb:///app?region", "dynamodb URL parameter 'region' must not be empty"),
            (
                "dynamodb:///app?region=us_east!",
                "dynamodb URL parameter 'region' is not a valid AWS region: 'us_east!'",
            ),
            (
                "dynamodb:///app?role_arn=admin",
                "dynamodb URL parameter 'role_arn' is not an IAM role ARN "
                "(arn:<partition>:iam::<account-id>:role/<name>): 'admin'",
            ),
            (
                "dynamodb:///app?role_arn=arn:aws:iam::123:user/bob",
                "dynamodb URL parameter 'role_arn' is not an IAM role ARN "
                "(arn:<partition>:iam::<account-id>:role/<name>): 'arn:aws:iam::123:user/bob'",
            ),
            (
                "dynamodb://h:1/app?insecure=maybe",
                "URL parameter 'insecure' must be true or false, not 'maybe'",
            ),
            (
                "dynamodb:///app?insecure=true",
                "dynamodb URL parameter 'insecure' needs a host "
                "('dynamodb://host:port/<table-prefix>?insecure=true'); "
                "AWS's own endpoints are always HTTPS",
            ),
            (
                "dynamodb://host:99999/app",
                "dynamodb URL 'dynamodb://host:99999/app' has an invalid port: "
                "Port out of range 0-65535",
            ),
            (
                "dynamodb://host:http/app",
                "dynamodb URL 'dynamodb://host:http/app' has an invalid port: "
                "Port could not be cast to integer value as 'http'",
            ),
            (
                "dynamodb://:8000/app",
                f"dynamodb URL 'dynamodb://:8000/app' has a port but no host; {USAGE}",
            ),
            ("dynamodb:///app#x", f"dynamodb URL 'dynamodb:///app#x' has a fragment; {USAGE}"),
            ("s3:///app", "not a dynamodb URL: 's3:///app'"),
        ],
    )
    def test_invalid(self, url: str, message: str) -> None:
        """Every malformed URL is a ValueError whose message names the problem."""
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            parse_url(url)

    @pytest.mark.parametrize(
        "url",
        [
            "dynamodb://AKIAEXAMPLE:s3cr3t@localhost:8000/app",
            "dynamodb://AKIAEXAMPLE@localhost/app",
            # A '/' or '?' in the secret hides the '@' from urlsplit.
            "dynamodb://AKIAEXAMPLE:s3cr/3t@localhost:8000/app",
            "dynamodb://AKIAEXAMPLE:s3cr?3t@localhost/app?region=eu-west-1",
        ],
    )
    def test_credentials_refused_without_echo(self, url: str) -> None:
        """User info is refused, and neither the key nor the secret appears in the message."""
        with pytest.raises(ValueError, match="must not contain credentials") as info:
            parse_url(url)
        assert "AKIAEXAMPLE" not in str(info.value)
        assert "s3cr3t" not in str(info.value)


class TestPlugin:
    def test_scheme_installed(self) -> None:
        """The entry point registers the dynamodb scheme."""
        assert installed_schemes()["dynamodb"]

    def test_provider_from_url(self) -> None:
        """provider_from_url builds a DynamoDBProvider without any I/O."""
        provider = provider_from_url("dynamodb://localhost:8000/app?insecure=1&region=eu-west-1")
        assert isinstance(provider, DynamoDBProvider)
        assert provider.tables == {
            "journal": "app-journal",
            "keyspace": "app-keyspace",
            "set": "app-set",
        }
        assert repr(provider) == "<DynamoDBProvider 'app' at http://localhost:8000>"

    def test_malformed_url_through_the_plugin(self) -> None:
        """The plugin's ValueError reaches the caller unchanged."""
        with pytest.raises(ValueError, match=r"^dynamodb URL 'dynamodb:///' names no table prefix"):
            provider_from_url("dynamodb:///")

    async def test_close_is_idempotent_without_io(self) -> None:
        """Closing a provider that never connected does nothing, twice."""
        provider = provider_from_url("dynamodb:///app?region=eu-west-1")
        await provider.close()
        await provider.close()


class TestConstructor:
    @pytest.mark.parametrize(
        ("kwargs", "error", "message"),
        [
            ({"table_prefix": ""}, ValueError, "dynamodb table prefix must not be empty"),
            ({"table_prefix": 3}, TypeError, "dynamodb table prefix must be str, not int"),
            (
                {"table_prefix": "a", "region": "x y"},
                ValueError,
                "dynamodb region 'x y' is not a valid AWS region name",
            ),
            (
                {"table_prefix": "a", "role_arn": "r"},
                ValueError,
                "dynamodb role_arn 'r' is not an IAM role ARN "
                "(arn:<partition>:iam::<account-id>:role/<name>)",
            ),
            (
                {"table_prefix": "a", "max_concurrency": 0},
                ValueError,
                "max_concurrency must be a positive int, not 0",
            ),
            (
                {"table_prefix": "a", "page_size": 0},
                ValueError,
                "page_size must be a positive int, not 0",
            ),
            (
                {"table_prefix": "a", "endpoint_url": "http://key:s3cret@localhost:8000"},
                ValueError,
                "invalid dynamodb endpoint URL 'http://key:***@localhost:8000': credentials "
                "do not belong in the URL; use the standard AWS credential chain",
            ),
            (
                {"table_prefix": "a", "endpoint_url": "localhost:8000"},
                ValueError,
                "invalid dynamodb endpoint URL 'localhost:8000': "
                "expected 'https://host[:port]' or 'http://host[:port]'",
            ),
            (
                {"table_prefix": "a", "endpoint_url": "http://localhost:99999"},
                ValueError,
                "invalid dynamodb endpoint URL 'http://localhost:99999': Port out of range 0-65535",
            ),
            (
                {"table_prefix": "a", "client": object(), "region": "eu-west-1"},
                ValueError,
                "DynamoDBProvider: pass either client=... or session/region/endpoint_url/"
                "role_arn/config, not both",
            ),
        ],
    )
    def test_invalid_arguments(
        self, kwargs: dict[str, object], error: type[Exception], message: str
    ) -> None:
        """Invalid constructor arguments fail at the call, naming the value."""
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            DynamoDBProvider(**kwargs)  # type: ignore[arg-type]


class TestEveryProblemAtOnce:
    def test_parse_url_lists_every_problem(self) -> None:
        url = "dynamodb://h:99999/bad prefix?region=x_y&insecure=maybe&zz=1&role_arn=arn#f"
        with pytest.raises(InvalidURL) as info:
            parse_url(url)
        assert info.value.problems == (
            f"dynamodb URL {url!r} has an invalid port: Port out of range 0-65535",
            f"dynamodb URL {url!r} has a fragment; {USAGE}",
            "dynamodb:// URL has unknown parameter 'zz' (allowed: insecure, region, role_arn)",
            "dynamodb table prefix 'bad prefix' is invalid: ' ' is not allowed in DynamoDB "
            "table names (use A-Z, a-z, 0-9, '_', '-' and '.')",
            "URL parameter 'insecure' must be true or false, not 'maybe'",
            "dynamodb URL parameter 'region' is not a valid AWS region: 'x_y'",
            "dynamodb URL parameter 'role_arn' is not an IAM role ARN "
            "(arn:<partition>:iam::<account-id>:role/<name>): 'arn'",
        )

    def test_hook(self) -> None:
        from runkit_dynamodb import _plugin as plugin

        assert plugin.runkit_persistence_url_problems("s3:///x") is None
        assert plugin.runkit_persistence_url_problems("dynamodb:///app?region=eu-west-1") == []
        assert plugin.runkit_persistence_url_problems("dynamodb:///?region=") == [
            "dynamodb URL parameter 'region' must not be empty",
            f"dynamodb URL 'dynamodb:///?region=' names no table prefix; {USAGE}",
        ]
        # Credentials are refused on their own, never echoed.
        (problem,) = plugin.runkit_persistence_url_problems("dynamodb://AKIA:s3cret@h/app") or []
        assert "s3cret" not in problem
        assert "AKIA" not in problem
