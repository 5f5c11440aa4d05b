"""Smoke test of the plugin layer; the full suite lives in the conformance tests."""

import pytest

from runkit.persistence import provider_from_url, redact_url


def test_unknown_scheme_lists_installed_schemes_and_package() -> None:
    with pytest.raises(ValueError, match=r"no persistence driver handles 'redis' URLs"):
        provider_from_url("redis://localhost/0")


def test_redact_url_hides_password() -> None:
    assert redact_url("postgresql://bob:s3cret@db:5432/app") == "postgresql://bob:***@db:5432/app"


async def test_runs_on_both_backends(anyio_backend: object) -> None:
    import anyio

    await anyio.sleep(0)
