"""runkit.ENVIRONMENT: documentation and validation of the DOGMA_* variables."""

from __future__ import annotations

import uuid

import pytest

from runkit import ConfigurationError
from runkit._environment import ENVIRONMENT

NODE = "6f1a8e5c-2b1d-4c3e-9f4a-1b2c3d4e5f60"
SITE_KEY = "3e0c5e1a-8f7b-4a52-9d1c-0f4b6a2d7e91"


def test_lists_every_documented_variable_in_order() -> None:
    assert [v.name for v in ENVIRONMENT] == [
        "DOGMA_SITE_NAME",
        "DOGMA_SITE_KEY",
        "DOGMA_NODE_ID",
        "DOGMA_PERSISTENCE_URL",
        "DOGMA_LISTEN_ADDRESS",
        "DOGMA_ADVERTISE_ADDRESS",
    ]
    for v in ENVIRONMENT:
        assert v.description
        assert v.type
        assert v.example


def test_every_example_is_valid() -> None:
    # The documented examples must themselves pass validation.
    values = ENVIRONMENT.load({v.name: v.example for v in ENVIRONMENT})
    assert values.site is not None
    assert values.site.name == "eu-west"


def test_describe_shows_type_default_and_example() -> None:
    text = ENVIRONMENT.describe()
    assert "DOGMA_NODE_ID (UUID)" in text
    assert "default: a random UUID at each start" in text
    assert "example: DOGMA_LISTEN_ADDRESS=0.0.0.0:7000" in text


def test_empty_environment_sets_nothing() -> None:
    values = ENVIRONMENT.load({})
    assert values.site is None
    assert values.node_id is None
    assert values.persistence_url is None


def test_valid_environment_is_parsed() -> None:
    values = ENVIRONMENT.load(
        {
            "DOGMA_SITE_NAME": "eu-west",
            "DOGMA_SITE_KEY": SITE_KEY.upper(),
            "DOGMA_NODE_ID": NODE,
            "DOGMA_PERSISTENCE_URL": "memory:///bank",
            "DOGMA_LISTEN_ADDRESS": "0.0.0.0:7000",
            "DOGMA_ADVERTISE_ADDRESS": "[::1]:7000",
            "UNRELATED": "x",
        }
    )
    assert values.site is not None
    assert values.site.key == SITE_KEY  # normalised to lowercase
    assert values.node_id == uuid.UUID(NODE)
    assert values.persistence_url == "memory:///bank"
    assert values.advertise_address == "[::1]:7000"


def test_every_invalid_variable_is_reported_at_once() -> None:
    with pytest.raises(ConfigurationError) as info:
        ENVIRONMENT.load(
            {
                "DOGMA_NODE_ID": "not-a-uuid",
                "DOGMA_LISTEN_ADDRESS": "7000",
                "DOGMA_ADVERTISE_ADDRESS": "0.0.0.0:7000",
                "DOGMA_PERSISTENCE_URL": "no-scheme-here",
            }
        )
    problems = info.value.problems
    assert len(problems) == 4
    assert str(info.value).startswith("4 invalid environment variable(s)")
    assert problems[0].startswith("DOGMA_NODE_ID='not-a-uuid': node ID 'not-a-uuid' is not")
    assert "e.g. DOGMA_NODE_ID=6f1a8e5c-2b1d-4c3e-9f4a-1b2c3d4e5f60" in problems[0]
    assert "DOGMA_PERSISTENCE_URL='no-scheme-here': the URL has no scheme" in problems[1]
    assert "DOGMA_LISTEN_ADDRESS='7000': listen address '7000' is not 'host:port'" in problems[2]
    assert "peers cannot route to a wildcard address" in problems[3]


def test_site_name_and_key_are_required_together() -> None:
    with pytest.raises(ConfigurationError, match=r"DOGMA_SITE_KEY is not set but DOGMA_SITE_NAME"):
        ENVIRONMENT.load({"DOGMA_SITE_NAME": "eu-west"})
    with pytest.raises(ConfigurationError, match=r"DOGMA_SITE_NAME is not set but DOGMA_SITE_KEY"):
        ENVIRONMENT.load({"DOGMA_SITE_KEY": SITE_KEY})


def test_invalid_site_key_names_the_rule() -> None:
    with pytest.raises(ConfigurationError, match=r"DOGMA_SITE_KEY='\{") as info:
        ENVIRONMENT.load({"DOGMA_SITE_NAME": "eu", "DOGMA_SITE_KEY": "{" + SITE_KEY + "}"})
    assert "site key:" in str(info.value)


def test_persistence_url_password_is_never_shown() -> None:
    # A URL with a password but an invalid port fails; the message must not echo it.
    with pytest.raises(ConfigurationError) as info:
        ENVIRONMENT.load({"DOGMA_PERSISTENCE_URL": "://bob:hunter2@db/x"})
    assert "hunter2" not in str(info.value)


def test_node_id_must_be_canonical() -> None:
    with pytest.raises(ConfigurationError, match="is not a canonical UUID"):
        ENVIRONMENT.load({"DOGMA_NODE_ID": NODE.upper()})
    with pytest.raises(ConfigurationError, match="must not be the nil UUID"):
        ENVIRONMENT.load({"DOGMA_NODE_ID": str(uuid.UUID(int=0))})
