"""Engine options: validation at the call, precedence, and resolution to settings."""

from __future__ import annotations

import uuid

import pytest

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
    ("address", "message"),
    [
        ("0.0.0.0:7000", "peers cannot route to a wildcard address"),
        ("[::]:7000", "peers cannot route to a wildcard address"),
        ("node-1:0", "port 0 is not routable"),
        ("node-1", "is not 'host:port'"),
        ("node-1:99999", "invalid port '99999'"),
        ("::1:7000", "put an IPv6 host in brackets"),
    ],
)
def test_with_advertise_address_must_be_routable(address: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        o.with_advertise_address(address)


def test_with_listen_address_allows_wildcards_and_port_zero() -> None:
    assert o.with_listen_address("0.0.0.0:0").value == "0.0.0.0:0"
    assert o.with_listen_address("[::]:7000").value == "[::]:7000"


def test_with_persistence_unknown_scheme_lists_installed_and_package() -> None:
    with pytest.raises(ValueError, match=r"no installed driver handles 'redis' URLs") as info:
        o.with_persistence("redis://localhost/0")
    assert "memory" in str(info.value)
    assert "pip install runkit-redis" in str(info.value)


def test_with_persistence_never_shows_the_password() -> None:
    option = o.with_persistence("memory:///x")
    assert repr(option) == "with_persistence('memory:///x')"
    with pytest.raises(ValueError) as info:
        o.with_persistence("redis://bob:hunter2@localhost/0")
    assert "hunter2" not in str(info.value)


def test_with_persistence_provider_type_checks() -> None:
    with pytest.raises(TypeError, match=r"takes a runkit.persistence.Provider, not str"):
        o.with_persistence_provider("memory:///x")  # type: ignore[arg-type]


def test_tuning_options_validate() -> None:
    with pytest.raises(ValueError, match=r"with_partition_count\(0\): expected 1 to 4096"):
        o.with_partition_count(0)
    with pytest.raises(ValueError, match="max_delay"):
        o.with_retry_policy(base_delay=2, max_delay=1)
    with pytest.raises(ValueError, match=r"expected 0.05 to 60 seconds"):
        o.with_heartbeat_interval(0)


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
        ]
    )
    assert (settings.max_attempts, settings.retry_base_delay, settings.retry_max_delay) == (
        3,
        0.5,
        2.0,
    )
    assert settings.partition_count == 8
    assert settings.heartbeat_interval == 0.5
