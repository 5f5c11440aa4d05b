"""URL parsing, settings validation and redaction: no server needed."""

from __future__ import annotations

import pytest

from runkit.persistence import Limits, provider_from_url
from runkit_postgres import DEFAULT_SCHEMA, PostgresProvider, Settings
from runkit_postgres import _plugin as plugin
from runkit_postgres._config import describe_conninfo, parse_url, scrub

SCHEMA_SHAPE = "expected 1-63 ASCII letters, digits and underscores, not starting with a digit"


class TestParseUrl:
    def test_libpq_parameters_pass_through_and_runkit_ones_are_removed(self) -> None:
        conninfo, settings = parse_url(
            "postgresql://app@db.example:6432/bank?sslmode=require&schema=bank_1"
            "&pool_min_size=2&pool_max_size=20&pool_timeout=2.5&application_name=node%201"
            "&max_record_bytes=1024&max_value_bytes=2048"
        )
        assert conninfo == (
            "postgresql://app@db.example:6432/bank?sslmode=require&application_name=node%201"
        )
        assert settings == Settings(
            schema="bank_1",
            pool_min_size=2,
            pool_max_size=20,
            pool_timeout=2.5,
            max_record_bytes=1024,
            max_value_bytes=2048,
        )

    def test_defaults(self) -> None:
        conninfo, settings = parse_url("postgres:///app")
        assert conninfo == "postgres:///app"
        assert settings == Settings()
        assert settings.schema == DEFAULT_SCHEMA == "runkit"

    def test_multi_host_urls_are_accepted(self) -> None:
        conninfo, _ = parse_url("postgresql://h1:5432,h2:5433/app?target_session_attrs=read-write")
        assert conninfo == "postgresql://h1:5432,h2:5433/app?target_session_attrs=read-write"

    def test_unknown_parameter_is_named(self) -> None:
        with pytest.raises(ValueError) as info:
            parse_url("postgresql://u:s3cret@h/db?sslmode=disable&pool_size=3")
        assert str(info.value) == (
            "postgresql:// URL has unknown parameter 'pool_size': it is neither a libpq "
            "connection parameter nor one of runkit's (max_record_bytes, max_value_bytes, "
            "pool_max_size, pool_min_size, pool_timeout, schema)"
        )

    def test_repeated_parameter_is_named(self) -> None:
        with pytest.raises(ValueError, match=r"^postgres:// URL repeats parameter 'schema'$"):
            parse_url("postgres://h/db?schema=a&schema=b")

    @pytest.mark.parametrize(
        ("query", "message"),
        [
            ("pool_max_size=ten", "parameter 'pool_max_size' must be an integer, not 'ten'"),
            ("pool_min_size=1.5", "parameter 'pool_min_size' must be an integer, not '1.5'"),
            (
                "pool_timeout=soon",
                "parameter 'pool_timeout' must be a number of seconds, not 'soon'",
            ),
            ("pool_timeout=0", ": pool_timeout must be a positive number of seconds, not 0.0"),
            ("pool_timeout=nan", ": pool_timeout must be a positive number of seconds, not nan"),
            ("pool_max_size=0", ": pool_max_size must be at least 1, not 0"),
            ("pool_min_size=-1", ": pool_min_size must be at least 0, not -1"),
            (
                "pool_min_size=5&pool_max_size=4",
                ": pool_max_size (4) must not be less than pool_min_size (5)",
            ),
            (
                "max_record_bytes=0",
                ": max_record_bytes must be at least 1 and at most 268435456, not 0",
            ),
            ("schema=", f": invalid schema name '': {SCHEMA_SHAPE}"),
            ("schema=1abc", f": invalid schema name '1abc': {SCHEMA_SHAPE}"),
            ("schema=a-b", f": invalid schema name 'a-b': {SCHEMA_SHAPE}"),
            ("schema=pg_mine", ": invalid schema name 'pg_mine': the prefix 'pg_' is reserved"),
            (f"schema={'a' * 64}", f": invalid schema name '{'a' * 64}': {SCHEMA_SHAPE}"),
        ],
    )
    def test_malformed_values_are_named(self, query: str, message: str) -> None:
        with pytest.raises(ValueError) as info:
            parse_url(f"postgres://u:s3cret@h/db?{query}")
        assert str(info.value) == f"postgres:// URL{' ' if message[0] != ':' else ''}{message}"

    def test_malformed_port_is_reported_without_the_password(self) -> None:
        with pytest.raises(ValueError) as info:
            parse_url("postgresql://u:s3cret@h:99999/db")
        assert str(info.value) == (
            "malformed PostgreSQL connection string 'postgresql://u:***@h:99999/db': "
            "invalid port '99999'"
        )

    def test_libpq_error_quoting_the_password_is_scrubbed(self) -> None:
        # libpq quotes the offending token, which here is the password itself.
        with pytest.raises(ValueError) as info:
            parse_url("postgresql://u:s3cr%zzet@h/db")
        assert "s3cr" not in str(info.value)
        assert str(info.value).startswith("malformed PostgreSQL connection string")

    @pytest.mark.parametrize(
        ("url", "problem"),
        [
            # libpq ends the user info at the first '@': the rest would be a host
            # name (looked up in DNS, quoted in errors) or a port.
            (
                "postgresql://u:pa@S3kr1t@127.0.0.1/d",
                "the user name or password in PostgreSQL URL 'postgresql://u:***@127.0.0.1/d' "
                "contains '@': percent-encode it (%40)",
            ),
            (
                "postgresql://app@srv:S3kr1t@127.0.0.1:5432/d",
                "the user name or password in PostgreSQL URL "
                "'postgresql://app@srv:***@127.0.0.1:5432/d' contains '@': percent-encode it (%40)",
            ),
            (
                "postgresql://u:pa/S3kr1t@127.0.0.1/d",
                "the password in PostgreSQL URL 'postgresql://u:***@127.0.0.1/d' contains "
                "'/': percent-encode it (%2F)",
            ),
            # Every character to encode is named at once, '@' included.
            (
                "postgresql://op:S3kr1t#x@y?z@127.0.0.1:55432/bank?schema=bank",
                "the password in PostgreSQL URL "
                "'postgresql://op:***@127.0.0.1:55432/bank?schema=bank' contains "
                "'?', '#' and '@': percent-encode them (%3F, %23, %40)",
            ),
        ],
    )
    @pytest.mark.parametrize("make", [PostgresProvider, PostgresProvider.from_url])
    def test_unencoded_user_info_is_refused_without_the_password(
        self, url: str, problem: str, make: object
    ) -> None:
        """Both the runkit URL and a libpq URL given as conninfo: no piece of the password shows."""
        with pytest.raises(ValueError) as info:
            make(url)  # type: ignore[operator]
        assert str(info.value) == problem
        assert "S3kr1t" not in repr(info.value)

    @pytest.mark.parametrize(
        ("url", "problem"),
        [
            (
                "postgresql://u@h/db?password=pw9&S3kr1t",
                "the password parameter of PostgreSQL URL 'postgresql://u@h/db?password=***' "
                "contains '&': percent-encode it (%26)",
            ),
            (
                "postgresql://u@h/db?sslmode=require&sslpassword=pw9#S3kr1t",
                "the sslpassword parameter of PostgreSQL URL "
                "'postgresql://u@h/db?sslmode=require&sslpassword=***' contains '#': "
                "percent-encode it (%23)",
            ),
        ],
    )
    def test_unencoded_separator_in_a_password_parameter_hides_its_tail(
        self, url: str, problem: str
    ) -> None:
        """What follows an unencoded '&' or '#' in a password would show as a name or fragment."""
        with pytest.raises(ValueError) as info:
            parse_url(url)
        assert str(info.value) == problem
        assert "S3kr1t" not in repr(info.value)

    @pytest.mark.parametrize("url", ["postgresql:/app@db/bank", "postgres:db/bank"])
    def test_a_url_without_two_slashes_is_rejected(self, url: str) -> None:
        # Else libpq reads 'app@db/bank' as a database name on the local socket.
        scheme = url.partition(":")[0]
        with pytest.raises(ValueError) as info:
            parse_url(url)
        assert str(info.value) == (
            f"PostgreSQL URL {url!r} must start with '{scheme}://' (two slashes), "
            "e.g. 'postgresql://user@host/db'"
        )

    def test_fragment_is_rejected(self) -> None:
        with pytest.raises(ValueError) as info:
            parse_url("postgresql://u:s3cret@h/db#x")
        assert str(info.value) == (
            "PostgreSQL URL 'postgresql://u:***@h/db#x' must not have a fragment"
        )


class TestRedaction:
    @pytest.mark.parametrize(
        ("conninfo", "shown"),
        [
            ("postgresql://u:s3cret@h:5432/db", "postgresql://u:***@h:5432/db"),
            (
                "postgresql://u@h/db?password=s3cret&sslmode=disable",
                "postgresql://u@h/db?password=***&sslmode=disable",
            ),
            ("host=h user=u password=s3cret dbname=db", "host=h user=u password=*** dbname=db"),
            ("host=h password='s3 cret' dbname=db", "host=h password=*** dbname=db"),
            ("", "<libpq defaults>"),
        ],
    )
    def test_describe_conninfo_hides_passwords(self, conninfo: str, shown: str) -> None:
        assert describe_conninfo(conninfo) == shown

    @pytest.mark.parametrize(
        ("conninfo", "shown"),
        [
            # A password parameter is hidden whole, whatever it holds.
            (
                "postgresql://app@127.0.0.1:55432/postgres?password=correct horse&sslmode=disable",
                "postgresql://app@127.0.0.1:55432/postgres?password=***&sslmode=disable",
            ),
            (
                "postgresql://u@h/db?password=pa%26ss%40%23&port=5",
                "postgresql://u@h/db?password=***&port=5",
            ),
            (
                "postgresql://u@h/db?password=p%25x&sslmode=disable",
                "postgresql://u@h/db?password=***&sslmode=disable",
            ),
            (
                "postgresql://u@h/db?password=p@ss&sslmode=disable",
                "postgresql://u@h/db?password=***&sslmode=disable",
            ),
            ("postgresql://u@h/db?password=pässwörd€", "postgresql://u@h/db?password=***"),
            ("postgresql://u:p%C3%A4ss@h/db", "postgresql://u:***@h/db"),
            # A one-letter password garbles nothing: it is hidden where it is a value only.
            ("postgresql://p:p@h/p?port=5", "postgresql://p:***@h/p?port=5"),
            (
                "postgresql://u@h/db?password=p&sslmode=prefer",
                "postgresql://u@h/db?password=***&sslmode=prefer",
            ),
            ("host=p user=p password=p dbname=p", "host=p user=p password=*** dbname=p"),
        ],
    )
    def test_describe_conninfo_hides_any_password_whole(self, conninfo: str, shown: str) -> None:
        assert describe_conninfo(conninfo) == shown

    @pytest.mark.parametrize(
        ("message", "conninfo", "scrubbed"),
        [
            (
                "could not connect to postgresql://u:p@h/db: timeout",
                "postgresql://u:p@h/db",
                "could not connect to postgresql://u:***@h/db: timeout",
            ),
            (
                'password authentication failed for user "app" (password=s)',
                "postgresql://app@h/db?password=s",
                'password authentication failed for user "app" (password=***)',
            ),
            (
                'invalid percent-encoded token: "s3cr%zzet"',
                "postgresql://u:s3cr%zzet@h/db",
                'invalid percent-encoded token: "***"',
            ),
            (
                "bad value in 'host=h password='a b' port=x'",
                "host=h password='a b' port=x",
                "bad value in 'host=h password=*** port=x'",
            ),
            # Elsewhere it is no password: a short one would garble the message.
            (
                "connection to server at h (postgresql) failed: db p is down",
                "postgresql://u:p@h/db",
                "connection to server at h (postgresql) failed: db p is down",
            ),
        ],
    )
    def test_scrub_replaces_passwords_where_they_are_values(
        self, message: str, conninfo: str, scrubbed: str
    ) -> None:
        assert scrub(message, conninfo) == scrubbed

    @pytest.mark.parametrize(
        ("conninfo", "cut"),
        [
            ("postgresql://u@h/db?password=pa&S3kr1t", "'&': percent-encode it (%26)"),
            ("postgresql://u@h/db?password=pa#S3kr1t", "'#': percent-encode it (%23)"),
        ],
    )
    def test_a_libpq_url_with_a_cut_password_parameter_is_refused(
        self, conninfo: str, cut: str
    ) -> None:
        # Else libpq quotes the rest of the password as a parameter (or ignores it).
        with pytest.raises(ValueError) as info:
            PostgresProvider(conninfo)
        assert str(info.value) == (
            "the password parameter of PostgreSQL URL 'postgresql://u@h/db?password=***' "
            f"contains {cut}"
        )
        assert "S3kr1t" not in repr(info.value)

    def test_repr_hides_the_password(self) -> None:
        provider = PostgresProvider("host=h user=u password=s3cret dbname=db", schema="app")
        assert (
            repr(provider)
            == "PostgresProvider('host=h user=u password=*** dbname=db', schema='app')"
        )
        from_url = PostgresProvider.from_url("postgresql://u:s3cret@h/db?schema=app")
        assert repr(from_url) == "PostgresProvider('postgresql://u:***@h/db', schema='app')"

    def test_malformed_conninfo_is_reported_without_the_password(self) -> None:
        with pytest.raises(ValueError) as info:
            PostgresProvider("host=h password=s3cret port=abc")
        assert str(info.value) == (
            "malformed PostgreSQL connection string 'host=h password=*** port=abc': "
            "invalid port 'abc'"
        )


class TestProviderConstruction:
    def test_limits_are_declared(self) -> None:
        provider = PostgresProvider("", max_record_bytes=1000, max_value_bytes=2000)
        assert provider.limits == Limits(
            max_name_bytes=1024,
            max_key_bytes=2000,
            max_value_bytes=2000,
            max_record_bytes=1000,
            max_member_bytes=2000,
        )
        assert PostgresProvider("").limits.max_record_bytes == 16 << 20

    def test_settings_are_validated(self) -> None:
        with pytest.raises(TypeError, match=r"^pool_max_size must be int, not str$"):
            PostgresProvider("", pool_max_size="3")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"^invalid schema name 'x y'"):
            PostgresProvider("", schema="x y")
        with pytest.raises(TypeError, match=r"^conninfo must be str, not bytes$"):
            PostgresProvider(b"host=h")  # type: ignore[arg-type]


class TestPlugin:
    def test_both_schemes_resolve_through_the_installed_plugin(self) -> None:
        for scheme in ("postgres", "postgresql"):
            provider = provider_from_url(f"{scheme}://u:s3cret@h/db?schema=s1&pool_max_size=3")
            assert isinstance(provider, PostgresProvider)
            assert provider.settings == Settings(schema="s1", pool_max_size=3)

    def test_hooks(self) -> None:
        assert plugin.runkit_persistence_schemes() == ["postgres", "postgresql"]
        assert plugin.runkit_persistence_provider("memory:///x") is None
        assert isinstance(plugin.runkit_persistence_provider("POSTGRES://h/db"), PostgresProvider)

    def test_bad_url_raises_value_error_without_the_password(self) -> None:
        with pytest.raises(ValueError) as info:
            provider_from_url("postgresql://u:s3cret@h/db?schema=a.b")
        assert "s3cret" not in str(info.value)
        assert str(info.value) == (
            "postgresql:// URL: invalid schema name 'a.b': expected 1-63 ASCII letters, "
            "digits and underscores, not starting with a digit"
        )


class TestEveryProblemAtOnce:
    def test_parse_url_lists_every_bad_parameter(self) -> None:
        url = (
            "postgresql://u:s3cret@h:99999/db?foo=bar&pool_max_size=ten&schema=pg_x"
            "&pool_timeout=0&foo=baz#frag"
        )
        with pytest.raises(ValueError) as info:
            parse_url(url)
        assert info.value.problems == (  # type: ignore[attr-defined]
            f"PostgreSQL URL {describe_conninfo(url)!r} must not have a fragment",
            "postgresql:// URL has unknown parameter 'foo': it is neither a libpq connection "
            "parameter nor one of runkit's (max_record_bytes, max_value_bytes, pool_max_size, "
            "pool_min_size, pool_timeout, schema)",
            "postgresql:// URL repeats parameter 'foo'",
            "postgresql:// URL parameter 'pool_max_size' must be an integer, not 'ten'",
            "postgresql:// URL: invalid schema name 'pg_x': the prefix 'pg_' is reserved",
            "postgresql:// URL: pool_timeout must be a positive number of seconds, not 0.0",
            "malformed PostgreSQL connection string 'postgresql://u:***@h:99999/db': "
            "invalid port '99999'",
        )
        assert "s3cret" not in str(info.value)

    def test_the_rule_relating_two_values_is_checked_once_both_are_valid(self) -> None:
        assert parse_url("postgres://h/db?pool_min_size=20&pool_max_size=30")[1] == Settings(
            pool_min_size=20, pool_max_size=30
        )
        with pytest.raises(ValueError) as info:
            parse_url("postgres://h/db?pool_min_size=20")
        assert str(info.value) == (
            "postgres:// URL: pool_max_size (10) must not be less than pool_min_size (20)"
        )

    def test_hook(self) -> None:
        assert plugin.runkit_persistence_url_problems("memory:///x") is None
        assert plugin.runkit_persistence_url_problems("postgres://h/db?schema=s") == []
        assert plugin.runkit_persistence_url_problems("postgres://h/db?a=1&pool_min_size=x") == [
            "postgres:// URL has unknown parameter 'a': it is neither a libpq connection "
            "parameter nor one of runkit's (max_record_bytes, max_value_bytes, pool_max_size, "
            "pool_min_size, pool_timeout, schema)",
            "postgres:// URL parameter 'pool_min_size' must be an integer, not 'x'",
        ]


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("sslmode=bogus", "'sslmode' must be one of allow, disable, prefer"),
        ("connect_timeout=abc", "'connect_timeout' must be an integer, not 'abc'"),
        ("target_session_attrs=nope", "'target_session_attrs' must be one of any,"),
        ("keepalives_idle=1.5", "'keepalives_idle' must be an integer"),
    ],
)
def test_libpq_parameter_values_are_checked_before_connecting(query: str, problem: str) -> None:
    # libpq checks them only when it connects, where the failure would look
    # like an unreachable store and be retried until the start timeout.
    from runkit.persistence import check_url

    with pytest.raises(ValueError, match=problem):
        check_url(f"postgresql://db/app?{query}")
    assert parse_url("postgresql://db/app?sslmode=verify-full&connect_timeout=5")[0]


def test_a_value_libpq_refuses_when_connecting_is_permanent() -> None:
    from runkit_postgres._connecting import _PERMANENT

    for reason in (
        'invalid sslmode value: "bogus"',
        'invalid integer value "abc" for connection option "connect_timeout"',
    ):
        assert any(p in reason.lower() for p in _PERMANENT), reason
