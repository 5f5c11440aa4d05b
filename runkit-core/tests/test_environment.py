"""runkit.ENVIRONMENT: documentation and validation of the DOGMA_* variables."""

from __future__ import annotations

import uuid
from pathlib import Path

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
        "DOGMA_PARTITION_COUNT",
        "DOGMA_HEARTBEAT_INTERVAL",
        "DOGMA_BACKLOG_LIMIT",
        "DOGMA_START_TIMEOUT",
        "DOGMA_MAX_ATTEMPTS",
        "DOGMA_RETRY_BASE_DELAY",
        "DOGMA_RETRY_MAX_DELAY",
        "DOGMA_TLS_CERT",
        "DOGMA_TLS_KEY",
        "DOGMA_TLS_CA",
    ]
    for v in ENVIRONMENT:
        assert v.description
        assert v.type
        assert v.example


def test_membership_is_by_name_as_lookup_is() -> None:
    # ENVIRONMENT["DOGMA_NODE_ID"] looks a variable up by name, so ``in`` must too.
    assert "DOGMA_NODE_ID" in ENVIRONMENT
    assert "DOGMA_TLS_CA" in ENVIRONMENT
    assert ENVIRONMENT["DOGMA_NODE_ID"] in ENVIRONMENT
    assert "DOGMA_NOPE" not in ENVIRONMENT
    assert 5 not in ENVIRONMENT


def test_every_example_is_valid(tmp_path: Path) -> None:
    # The documented examples must themselves pass validation; the TLS
    # examples are paths, so real PEM files stand in for them.
    environ = {v.name: v.example for v in ENVIRONMENT}
    for name in ("DOGMA_TLS_CERT", "DOGMA_TLS_KEY", "DOGMA_TLS_CA"):
        environ[name] = _pem(tmp_path, environ[name].rpartition("/")[2])
    values = ENVIRONMENT.load(environ)
    assert values.site is not None
    assert values.site.name == "eu-west"
    assert (values.partition_count, values.heartbeat_interval, values.backlog_limit) == (
        32,
        2.0,
        5000,
    )
    assert (values.start_timeout, values.max_attempts) == (120.0, 10)
    assert (values.retry_base_delay, values.retry_max_delay) == (0.5, 60.0)
    assert values.tls_cert == environ["DOGMA_TLS_CERT"]


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


def test_the_values_repr_hides_the_persistence_password() -> None:
    values = ENVIRONMENT.load({"DOGMA_PERSISTENCE_URL": "postgresql://app:hunter2@db/bank"})
    assert values.persistence_url == "postgresql://app:hunter2@db/bank"
    assert "hunter2" not in repr(values)
    assert "persistence_url='postgresql://app:***@db/bank'" in repr(values)
    assert "persistence_url=None" in repr(ENVIRONMENT.load({}))


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        (
            "DOGMA_ADVERTISE_ADDRESS",
            "h/x:7000",
            "DOGMA_ADVERTISE_ADDRESS='h/x:7000': advertise address 'h/x:7000' has an invalid "
            "host 'h/x' (a host name has only letters, digits, '-', '_' and '.', and no part "
            "starts or ends with '-' or '_')",
        ),
        (
            "DOGMA_LISTEN_ADDRESS",
            "0.0.0.0.:7000",
            "DOGMA_LISTEN_ADDRESS='0.0.0.0.:7000': listen address '0.0.0.0.:7000' has an invalid "
            "host '0.0.0.0.' (not a valid IPv4 address)",
        ),
    ],
)
def test_address_variables_need_an_ip_or_a_host_name(name: str, value: str, problem: str) -> None:
    env = {name: value}
    if name == "DOGMA_ADVERTISE_ADDRESS":
        env["DOGMA_LISTEN_ADDRESS"] = "0.0.0.0:7000"
    with pytest.raises(ConfigurationError) as info:
        ENVIRONMENT.load(env)
    (only,) = info.value.problems
    assert only.startswith(problem), only


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
    assert str(info.value).startswith("4 problems with the DOGMA_* environment variables")
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


def _pem(directory: Path, name: str) -> str:
    path = directory / name
    path.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return str(path)


def test_describe_documents_the_engine_knobs() -> None:
    text = ENVIRONMENT.describe()
    assert "DOGMA_PARTITION_COUNT (integer, 1 to 4096)" in text
    assert "DOGMA_HEARTBEAT_INTERVAL (number, 0.05 to 60 seconds)" in text
    assert "Also with_backlog_limit() and runkit run --backlog-limit." in text
    assert "Also with_retry_policy(max_attempts=...) and runkit run --max-attempts." in text
    assert "DOGMA_TLS_CA (PEM file path)" in text


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        (
            "DOGMA_PARTITION_COUNT",
            "ten",
            "DOGMA_PARTITION_COUNT='ten': 'ten' is not a whole number; "
            "expected integer, 1 to 4096, e.g. DOGMA_PARTITION_COUNT=32",
        ),
        (
            "DOGMA_PARTITION_COUNT",
            "5000",
            "DOGMA_PARTITION_COUNT='5000': '5000' is out of range; "
            "expected integer, 1 to 4096, e.g. DOGMA_PARTITION_COUNT=32",
        ),
        (
            "DOGMA_HEARTBEAT_INTERVAL",
            "0",
            "DOGMA_HEARTBEAT_INTERVAL='0': '0' is out of range; "
            "expected number, 0.05 to 60 seconds, e.g. DOGMA_HEARTBEAT_INTERVAL=2",
        ),
        (
            "DOGMA_START_TIMEOUT",
            "inf",
            "DOGMA_START_TIMEOUT='inf': 'inf' is out of range; "
            "expected number, 0.1 to 86,400 seconds, e.g. DOGMA_START_TIMEOUT=120",
        ),
        (
            "DOGMA_BACKLOG_LIMIT",
            "1e3",
            "DOGMA_BACKLOG_LIMIT='1e3': '1e3' is not a whole number; "
            "expected integer, 1 to 1,000,000, e.g. DOGMA_BACKLOG_LIMIT=5000",
        ),
        (
            "DOGMA_RETRY_BASE_DELAY",
            "soon",
            "DOGMA_RETRY_BASE_DELAY='soon': 'soon' is not a number of seconds; "
            "expected number, 0.001 to 3600 seconds, e.g. DOGMA_RETRY_BASE_DELAY=0.5",
        ),
    ],
)
def test_invalid_knob_names_variable_value_and_range(name: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        ENVIRONMENT.load({name: raw})
    assert info.value.problems == (message,)


def test_retry_max_delay_below_base_delay_is_refused() -> None:
    with pytest.raises(ConfigurationError) as info:
        ENVIRONMENT.load({"DOGMA_RETRY_BASE_DELAY": "5", "DOGMA_RETRY_MAX_DELAY": "1"})
    assert info.value.problems == (
        "DOGMA_RETRY_BASE_DELAY (5) is above DOGMA_RETRY_MAX_DELAY (1); "
        "the retry max delay must be at least the base delay",
    )


def test_tls_files_must_exist_and_come_in_pairs(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        ENVIRONMENT.load(
            {"DOGMA_TLS_CERT": str(tmp_path / "missing.crt"), "DOGMA_TLS_CA": str(tmp_path)}
        )
    assert info.value.problems == (
        f"DOGMA_TLS_CERT='{tmp_path}/missing.crt': certificate '{tmp_path}/missing.crt' "
        "does not exist; expected PEM file path, e.g. DOGMA_TLS_CERT=/etc/runkit/node.crt",
        f"DOGMA_TLS_CA='{tmp_path}': CA bundle '{tmp_path}' is not a file; "
        "expected PEM file path, e.g. DOGMA_TLS_CA=/etc/runkit/ca.crt",
        "DOGMA_TLS_KEY is not set but DOGMA_TLS_CERT is: the two are required together, "
        "e.g. DOGMA_TLS_KEY=/etc/runkit/node.key",
    )


def test_a_tls_ca_without_a_certificate_and_key_is_refused(tmp_path: Path) -> None:
    # Else the node would ignore the CA and trust peers by fingerprint.
    with pytest.raises(ConfigurationError) as info:
        ENVIRONMENT.load({"DOGMA_TLS_CA": _pem(tmp_path, "ca.crt")})
    assert info.value.problems == (
        "DOGMA_TLS_CA is set but DOGMA_TLS_CERT and DOGMA_TLS_KEY are not: a CA needs "
        "this node's certificate and key, e.g. DOGMA_TLS_CERT=/etc/runkit/node.crt and "
        "DOGMA_TLS_KEY=/etc/runkit/node.key",
    )


def test_persistence_url_is_checked_by_its_driver_reporting_every_problem() -> None:
    url = "postgresql://bob:hunter2@db/app?foo=bar&pool_max_size=ten"
    with pytest.raises(ConfigurationError) as info:
        ENVIRONMENT.load({"DOGMA_PERSISTENCE_URL": url})
    problems = info.value.problems
    assert len(problems) == 2
    assert problems[0].startswith(
        "DOGMA_PERSISTENCE_URL='postgresql://bob:***@db/app?foo=bar&pool_max_size=ten': "
        "postgresql:// URL has unknown parameter 'foo': it is neither a libpq connection "
        "parameter nor one of runkit's"
    )
    assert problems[1] == (
        "DOGMA_PERSISTENCE_URL: postgresql:// URL parameter 'pool_max_size' must be an "
        "integer, not 'ten'"
    )
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "mysql://db/app",
            "no persistence driver handles 'mysql' URLs (installed schemes: dynamodb, memory, "
            "postgres, postgresql, s3); install a runkit driver plugin that handles it",
        ),
        ("memory://app", "memory URL 'memory://app' has a host ('app'); memory URLs have none"),
        ("dynamodb:///t?region=nowhere!", "dynamodb URL parameter 'region' is not a valid"),
        ("s3:///Bad_Bucket", "invalid S3 bucket name 'Bad_Bucket'"),
    ],
)
def test_persistence_url_problems_of_each_driver(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        ENVIRONMENT.load({"DOGMA_PERSISTENCE_URL": url})
    (problem,) = info.value.problems
    assert problem.startswith(f"DOGMA_PERSISTENCE_URL={url!r}: {message}")
    assert "e.g. DOGMA_PERSISTENCE_URL=" not in problem  # the driver said what it expects


def test_one_retry_delay_alone_is_checked_against_the_others_default() -> None:
    # As the engine will: runkit env must not call valid what runkit run refuses.
    with pytest.raises(ConfigurationError) as info:
        ENVIRONMENT.load({"DOGMA_RETRY_BASE_DELAY": "100"})
    assert info.value.problems == (
        "DOGMA_RETRY_BASE_DELAY (100) is above the default retry max delay (30); "
        "the retry max delay must be at least the base delay",
    )
    ENVIRONMENT.load({"DOGMA_RETRY_BASE_DELAY": "10"})


def test_a_misspelt_variable_is_a_problem_and_an_unknown_one_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Ignored, a misspelt persistence URL would mean the memory driver.
    with pytest.raises(ConfigurationError, match="did you mean DOGMA_PERSISTENCE_URL"):
        ENVIRONMENT.load({"DOGMA_PERSISTANCE_URL": "postgresql://db/app"})
    with caplog.at_level("WARNING", logger="runkit.environment"):
        ENVIRONMENT.load({"DOGMA_SOMETHING_ELSE": "1"})
    assert "ignoring DOGMA_SOMETHING_ELSE" in caplog.text
