"""Engine options: validation at the call, precedence, and resolution to settings."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from runkit import ConfigurationError
from runkit import _options as o
from runkit_memory import MemoryProvider

NODE = "6f1a8e5c-2b1d-4c3e-9f4a-1b2c3d4e5f60"
OTHER = "0b7e3f2a-9c4d-4e5f-8a1b-2c3d4e5f6a7b"
SITE_KEY = "3e0c5e1a-8f7b-4a52-9d1c-0f4b6a2d7e91"


def test_with_application_rejects_none() -> None:
    with pytest.raises(TypeError, match=r"with_application\(None\)"):
        o.with_application(None)


def test_with_application_rejects_objects_without_configure() -> None:
    with pytest.raises(TypeError, match=r"must have a configure\(c\) method"):
        o.with_application(object())


def test_with_node_id_validates() -> None:
    assert o.with_node_id(NODE).value == uuid.UUID(NODE)
    assert o.with_node_id(uuid.UUID(NODE)).value == uuid.UUID(NODE)
    with pytest.raises(ValueError, match=r"with_node_id\(\): node ID 'abc' is not a canonical"):
        o.with_node_id("abc")
    with pytest.raises(TypeError, match="must be a UUID string, not int"):
        o.with_node_id(5)  # type: ignore[arg-type]


def test_with_site_validates_name_and_key() -> None:
    site = o.with_site("eu-west", SITE_KEY.upper()).value
    assert (site.name, site.key) == ("eu-west", SITE_KEY)
    with pytest.raises(ValueError, match=r"with_site\(\): site name:"):
        o.with_site("", SITE_KEY)
    with pytest.raises(ValueError, match=r"with_site\(\): site key:"):
        o.with_site("eu-west", "urn:uuid:" + SITE_KEY)


@pytest.mark.parametrize(
    ("name", "key", "message"),
    [
        (None, SITE_KEY, r"with_site\(\): site name must be a str, not NoneType \(None\)"),
        ("eu-west", 5, r"with_site\(\): site key must be a str, not int \(5\)"),
        ("eu-west", b"key", r"site key must be a str, not bytes \(b'key'\)"),
    ],
)
def test_with_site_type_errors_name_the_bad_argument(
    name: object, key: object, message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        o.with_site(name, key)  # type: ignore[arg-type]


def test_with_site_takes_a_uuid_object_as_the_key() -> None:
    site = o.with_site("eu-west", uuid.UUID(SITE_KEY)).value
    assert (site.name, site.key) == ("eu-west", SITE_KEY)


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("0.0.0.0:7000", "peers cannot route to a wildcard address"),
        ("[::]:7000", "peers cannot route to a wildcard address"),
        ("node-1:0", "port 0 is not routable"),
        ("node-1", "is not 'host:port'"),
        ("node-1:99999", "invalid port '99999'"),
        ("::1:7000", "put an IPv6 host in brackets"),
        ("[::0]:7000", "peers cannot route to a wildcard address"),
        ("0:7000", "peers cannot route to a wildcard address"),
        ("[::ffff:0.0.0.0]:7000", "peers cannot route to a wildcard address"),
        ("node-1:\u0667\u0660\u0660\u0660", "invalid port"),
        ("node-1:\u00b2", "invalid port"),
        ("tcp://node-1:7000", "no scheme"),
    ],
)
def test_with_advertise_address_must_be_routable(address: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        o.with_advertise_address(address)


def test_with_listen_address_allows_wildcards_and_port_zero() -> None:
    assert o.with_listen_address("0.0.0.0:0").value == "0.0.0.0:0"
    assert o.with_listen_address("[::]:7000").value == "[::]:7000"


@pytest.mark.parametrize(
    "address",
    [
        "localhost:7000",
        "node-1:7000",
        "node-1.internal:7000",
        "db-2.eu-west.example.com.:7000",
        "10.0.0.5:7000",
        "[::1]:7000",
        "[fe80::1%eth0]:7000",
        "bücher.example:7000",
        "xn--bcher-kva.example:7000",
        "1node.example:7000",
        "bank_node_1:7000",  # a Docker Compose name: not RFC 1123, but in use
    ],
)
def test_addresses_take_ip_addresses_and_host_names(address: str) -> None:
    assert o.with_advertise_address(address).value == address
    assert o.with_listen_address(address).value == address


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("h/x", "a host name has only letters, digits, '-', '_' and '.', and no part starts"),
        ("_node", "a host name has only letters"),
        ("-node", "a host name has only letters"),
        ("node-.internal", "a host name has only letters"),
        ("a..b", "an empty part between dots"),
        (".", "an empty part between dots"),
        ("x" * 64, "too long: at most 63 characters between dots, 253 in all"),
        (".".join(["x" * 60] * 5), "too long"),
        ("0.0.0.0.", "not a valid IPv4 address"),
        ("999.1.1.1", "not a valid IPv4 address"),
        ("10.1", "not a valid IPv4 address"),
        ("\u00ad", "not a valid internationalised name"),
    ],
)
def test_addresses_refuse_what_is_neither_an_ip_address_nor_a_host_name(
    host: str, problem: str
) -> None:
    with pytest.raises(ValueError) as info:
        o.with_advertise_address(f"{host}:7000")
    assert str(info.value).startswith(
        f"with_advertise_address() {host + ':7000'!r} has an invalid host {host!r} ({problem}"
    )
    assert str(info.value).endswith(
        "; expected an IP address (IPv6 in brackets) or a host name, e.g. 'node-1.internal:7000'"
    )
    with pytest.raises(ValueError, match="has an invalid host"):
        o.with_listen_address(f"{host}:7000")


def test_with_persistence_unknown_scheme_lists_installed_and_invents_no_package() -> None:
    with pytest.raises(ValueError, match=r"no persistence driver handles 'redis' URLs") as info:
        o.with_persistence("redis://localhost/0")
    assert "memory" in str(info.value)
    assert "pip install" not in str(info.value)  # runkit-redis would be a squatter's name
    assert "install a runkit driver plugin that handles it" in str(info.value)


def test_with_persistence_reports_every_bad_parameter_at_once() -> None:
    with pytest.raises(ConfigurationError) as info:
        o.with_persistence("postgresql://bob:hunter2@db/app?foo=bar&pool_max_size=ten&schema=pg_x")
    assert info.value.summary == (
        "with_persistence('postgresql://bob:***@db/app?foo=bar&pool_max_size=ten&schema=pg_x'): "
        "invalid persistence URL"
    )
    problems = info.value.problems
    assert len(problems) == 3
    assert problems[0].startswith("postgresql:// URL has unknown parameter 'foo'")
    assert problems[1] == (
        "postgresql:// URL parameter 'pool_max_size' must be an integer, not 'ten'"
    )
    assert problems[2] == (
        "postgresql:// URL: invalid schema name 'pg_x': the prefix 'pg_' is reserved"
    )
    assert "hunter2" not in str(info.value)


def test_with_persistence_accepts_valid_urls_of_every_driver() -> None:
    for url in (
        "memory:///app",
        "postgresql://db.internal/bank?schema=bank&pool_max_size=4",
        "dynamodb:///bank?region=eu-west-1",
        "s3:///bank-bucket?prefix=nodes/",
    ):
        assert o.with_persistence(url).value == url


def test_with_persistence_never_shows_the_password() -> None:
    option = o.with_persistence("memory:///x")
    assert repr(option) == "with_persistence('memory:///x')"
    with pytest.raises(ValueError) as info:
        o.with_persistence("redis://bob:hunter2@localhost/0")
    assert "hunter2" not in str(info.value)


def test_with_persistence_provider_type_checks() -> None:
    with pytest.raises(TypeError, match=r"takes a runkit.persistence.Provider, not str"):
        o.with_persistence_provider("memory:///x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "value", "error", "message"),
    [
        (
            o.with_partition_count,
            0,
            ValueError,
            r"^with_partition_count\(\): 0 is out of range; "
            "expected 1 to 4096$",
        ),
        (
            o.with_partition_count,
            "8",
            TypeError,
            r"^with_partition_count\(\) takes an int, not str$",
        ),
        (o.with_partition_count, True, TypeError, "takes an int, not bool"),
        (o.with_heartbeat_interval, 0, ValueError, "expected 0.05 to 60 seconds"),
        (o.with_heartbeat_interval, float("nan"), ValueError, "expected 0.05 to 60 seconds"),
        (o.with_backlog_limit, 0, ValueError, r"^with_backlog_limit\(\): 0 is out of range"),
        (o.with_backlog_limit, 2.5, TypeError, "takes an int, not float"),
        (o.with_start_timeout, -1, ValueError, r"^with_start_timeout\(\): -1 is out of range"),
        (o.with_start_timeout, "60", TypeError, "takes seconds"),
    ],
)
def test_tuning_options_validate(make: Any, value: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        make(value)


def test_retry_policy_validates() -> None:
    with pytest.raises(
        ValueError,
        match=r"^with_retry_policy\(base_delay\) \(2\) is above "
        r"with_retry_policy\(max_delay\) \(1\); ",
    ):
        o.with_retry_policy(base_delay=2, max_delay=1)
    with pytest.raises(ValueError, match=r"with_retry_policy\(max_attempts=...\): 0 is out"):
        o.with_retry_policy(max_attempts=0)
    with pytest.raises(ValueError, match=r"with_retry_policy\(base_delay=...\): 0 is out"):
        o.with_retry_policy(base_delay=0)


def test_with_tls_checks_the_files_now(tmp_path: Path) -> None:
    cert, key, ca = _pem(tmp_path, "node.crt"), _pem(tmp_path, "node.key"), _pem(tmp_path, "ca")
    settings = o.resolve_options([o.with_tls(cert=cert, key=key, ca=ca)])
    assert (settings.tls_cert, settings.tls_key, settings.tls_ca) == (cert, key, ca)
    assert o.resolve_options([o.with_tls(cert=cert, key=key)]).tls_ca is None
    with pytest.raises(ValueError, match=r"^with_tls\(\): cert '/nope/node.crt' does not exist$"):
        o.with_tls(cert="/nope/node.crt", key=key)
    with pytest.raises(ValueError, match=r"with_tls\(\): key '.*' is not a file"):
        o.with_tls(cert=cert, key=str(tmp_path))
    (tmp_path / "der").write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(ValueError, match=r"with_tls\(\): ca '.*der' is not a PEM file"):
        o.with_tls(cert=cert, key=key, ca=tmp_path / "der")
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'key'"):
        o.with_tls(cert=cert)  # type: ignore[call-arg]


def test_with_tls_reports_an_unreadable_file(tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    key = _pem(tmp_path, "node.key")
    os.chmod(key, 0)
    with pytest.raises(ValueError, match=r"with_tls\(\): key '.*' cannot be read: Permission"):
        o.with_tls(cert=_pem(tmp_path, "node.crt"), key=key)


def _pem(directory: Path, name: str) -> str:
    path = directory / name
    path.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return str(path)


def test_resolve_rejects_non_options() -> None:
    with pytest.raises(TypeError, match=r"takes options made by runkit.with_\*\(\)"):
        o.resolve_options(["memory:///x"])  # type: ignore[list-item]


def test_resolve_rejects_duplicates_and_conflicts() -> None:
    with pytest.raises(ValueError, match=r"with_node_id\(\) is given twice"):
        o.resolve_options([o.with_node_id(NODE), o.with_node_id(OTHER)])
    with pytest.raises(ValueError, match="choose one"):
        o.resolve_options(
            [o.with_persistence("memory:///x"), o.with_persistence_provider(MemoryProvider())]
        )


def test_an_advertise_address_without_a_listen_address_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Nothing would listen where peers are told to call.
    with pytest.raises(ValueError, match=r"^with_advertise_address\(\) is set \(10.0.0.5:7000\)"):
        o.resolve_options([o.with_advertise_address("10.0.0.5:7000")])
    monkeypatch.setenv("DOGMA_ADVERTISE_ADDRESS", "10.0.0.5:7000")
    with pytest.raises(ValueError, match=r"^DOGMA_ADVERTISE_ADDRESS is set .*DOGMA_LISTEN_ADDRESS"):
        o.resolve_options([o.from_environment()])
    # With a listen address it is taken; a client (which never listens) ignores it.
    settings = o.resolve_options([o.from_environment(), o.with_listen_address("0.0.0.0:7000")])
    assert settings.advertise_address == "10.0.0.5:7000"
    assert o.resolve_options([o.from_environment()], client=True).listen_address is None


@pytest.mark.parametrize("env_first", [True, False])
def test_explicit_options_beat_environment_whatever_the_order(
    monkeypatch: pytest.MonkeyPatch, env_first: bool
) -> None:
    monkeypatch.setenv("DOGMA_NODE_ID", OTHER)
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "memory:///from-env")
    monkeypatch.setenv("DOGMA_LISTEN_ADDRESS", "127.0.0.1:9000")
    explicit = [o.with_node_id(NODE), o.with_persistence("memory:///explicit")]
    env = [o.from_environment()]
    settings = o.resolve_options(env + explicit if env_first else explicit + env)
    assert settings.node_id == uuid.UUID(NODE)
    assert settings.persistence_url == "memory:///explicit"
    # Not given explicitly, so the environment's value is used.
    assert settings.listen_address == "127.0.0.1:9000"


def test_explicit_provider_beats_environment_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "memory:///from-env")
    provider = MemoryProvider()
    settings = o.resolve_options([o.from_environment(), o.with_persistence_provider(provider)])
    assert settings.persistence_provider is provider
    assert settings.persistence_url is None


def test_from_environment_reports_invalid_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from runkit import ConfigurationError

    monkeypatch.setenv("DOGMA_NODE_ID", "nope")
    with pytest.raises(ConfigurationError, match="DOGMA_NODE_ID='nope'"):
        o.from_environment()


def test_retry_policy_and_tuning_reach_settings() -> None:
    settings = o.resolve_options(
        [
            o.with_retry_policy(max_attempts=3, base_delay=0.5, max_delay=2),
            o.with_partition_count(8),
            o.with_heartbeat_interval(0.5),
            o.with_backlog_limit(50),
            o.with_start_timeout(5),
        ]
    )
    assert (settings.max_attempts, settings.retry_base_delay, settings.retry_max_delay) == (
        3,
        0.5,
        2.0,
    )
    assert settings.partition_count == 8
    assert settings.heartbeat_interval == 0.5
    assert settings.backlog_limit == 50
    assert settings.start_timeout == 5.0


def test_defaults_when_nothing_is_set() -> None:
    settings = o.resolve_options([o.from_environment()])
    assert (settings.partition_count, settings.heartbeat_interval) == (16, 1.0)
    assert (settings.backlog_limit, settings.start_timeout) == (1000, 60.0)
    assert (settings.max_attempts, settings.retry_base_delay, settings.retry_max_delay) == (
        5,
        0.1,
        30.0,
    )
    assert (settings.tls_cert, settings.tls_key, settings.tls_ca) == (None, None, None)


@pytest.mark.parametrize("env_first", [True, False])
def test_tuning_options_beat_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env_first: bool
) -> None:
    env_cert, env_key, env_ca = (_pem(tmp_path, n) for n in ("e.crt", "e.key", "e.ca"))
    for name, value in {
        "DOGMA_PARTITION_COUNT": "32",
        "DOGMA_HEARTBEAT_INTERVAL": "2",
        "DOGMA_BACKLOG_LIMIT": "7",
        "DOGMA_START_TIMEOUT": "9",
        "DOGMA_MAX_ATTEMPTS": "11",
        "DOGMA_RETRY_BASE_DELAY": "0.25",
        "DOGMA_RETRY_MAX_DELAY": "4",
        "DOGMA_TLS_CERT": env_cert,
        "DOGMA_TLS_KEY": env_key,
        "DOGMA_TLS_CA": env_ca,
    }.items():
        monkeypatch.setenv(name, value)
    from_env = o.resolve_options([o.from_environment()])
    assert (from_env.partition_count, from_env.heartbeat_interval) == (32, 2.0)
    assert (from_env.backlog_limit, from_env.start_timeout) == (7, 9.0)
    assert (from_env.max_attempts, from_env.retry_base_delay, from_env.retry_max_delay) == (
        11,
        0.25,
        4.0,
    )
    assert (from_env.tls_cert, from_env.tls_key, from_env.tls_ca) == (env_cert, env_key, env_ca)

    cert, key = _pem(tmp_path, "o.crt"), _pem(tmp_path, "o.key")
    explicit = [
        o.with_partition_count(4),
        o.with_backlog_limit(3),
        # Only max_attempts is given: the delays keep the environment's values.
        o.with_retry_policy(max_attempts=2),
        # A whole TLS configuration replaces the environment's, CA included.
        o.with_tls(cert=cert, key=key),
    ]
    env = [o.from_environment()]
    settings = o.resolve_options(env + explicit if env_first else explicit + env)
    assert (settings.partition_count, settings.backlog_limit) == (4, 3)
    assert (settings.heartbeat_interval, settings.start_timeout) == (2.0, 9.0)
    assert (settings.max_attempts, settings.retry_base_delay, settings.retry_max_delay) == (
        2,
        0.25,
        4.0,
    )
    assert (settings.tls_cert, settings.tls_key, settings.tls_ca) == (cert, key, None)


def test_retry_delays_are_checked_across_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOGMA_RETRY_MAX_DELAY", "1")
    with pytest.raises(ValueError) as info:
        o.resolve_options([o.from_environment(), o.with_retry_policy(base_delay=5)])
    # Each delay is named by where it came from: what to change.
    assert str(info.value) == (
        "with_retry_policy(base_delay) (5) is above DOGMA_RETRY_MAX_DELAY (1); "
        "the retry max delay must be at least the base delay"
    )
    monkeypatch.delenv("DOGMA_RETRY_MAX_DELAY")
    with pytest.raises(ValueError, match=r"^with_retry_policy\(base_delay\) \(50\) is above "):
        o.resolve_options([o.with_retry_policy(base_delay=50)])
    with pytest.raises(ValueError, match=r"^the default retry base delay \(0\.1\) is above "):
        o.resolve_options([o.with_retry_policy(max_delay=0.01)])


def test_settings_refuse_a_certificate_without_its_key() -> None:
    from runkit.engine.settings import EngineSettings

    with pytest.raises(ValueError, match="tls_cert and tls_key must be given together"):
        EngineSettings(tls_cert="/etc/runkit/node.crt")
    with pytest.raises(ValueError, match="tls_cert and tls_key must be given together"):
        EngineSettings(tls_key="/etc/runkit/node.key")
    with pytest.raises(ValueError, match="backlog_limit must be an int >= 1, got 0"):
        EngineSettings(backlog_limit=0)
    with pytest.raises(ValueError, match="start_timeout must be positive, got 0"):
        EngineSettings(start_timeout=0)


def test_a_number_too_large_for_a_float_is_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        o.with_heartbeat_interval(10**400)


def test_with_application_given_the_class_says_to_pass_an_object() -> None:
    import bank

    with pytest.raises(TypeError, match=r"pass an application object, e.g. App\(\), not the class"):
        o.with_application(bank.App)


def test_two_applications_with_one_identity_key_are_a_configuration_error(
    tmp_path: Path,
) -> None:
    # Configuration problems come as one ConfigurationError (a ValueError).
    import bank

    first = bank.App(tmp_path / "a.sqlite3")
    second = bank.App(tmp_path / "b.sqlite3")
    with pytest.raises(ConfigurationError, match="share the identity key"):
        o.resolve_options([o.with_application(first), o.with_application(second)])


def test_options_take_their_parameters_by_the_names_the_api_gives() -> None:
    # api.md: with_node_id(id), with_persistence_provider(p),
    # with_partition_count(n), with_backlog_limit(n), with_heartbeat_interval(seconds).
    node = uuid.uuid4()
    assert o.with_node_id(id=node).value == node
    provider = MemoryProvider()
    assert o.with_persistence_provider(p=provider).value is provider
    assert o.with_partition_count(n=4).value == 4
    assert o.with_backlog_limit(n=50).value == 50
    assert o.with_heartbeat_interval(seconds=0.5).value == 0.5
