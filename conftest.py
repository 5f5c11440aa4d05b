"""Test configuration shared by every package in the workspace.

Every async test runs on both asyncio and trio (anyio's pytest plugin in auto
mode, parametrised here). ``DOGMA_*`` variables are stripped so tests of
``from_environment()`` are hermetic.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


@pytest.fixture(autouse=True)
def _clean_dogma_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DOGMA_"):
            monkeypatch.delenv(name)


# Backend markers are applied here, by where a test lives and which fixtures it
# uses, so nox's per-backend sessions select every test exactly once.
_BACKEND_DIRS = {
    "runkit-postgres": "postgres",
    "runkit-dynamodb": "dynamodb",
    "runkit-s3": "s3",
}
_BACKEND_FIXTURES = {
    "postgres_dsn": "postgres",
    "postgres_url": "postgres",
    "moto_server": "dynamodb",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.path.parts
        markers = {m.name for m in item.iter_markers()}
        wanted = {b for d, b in _BACKEND_DIRS.items() if d in parts}
        fixtures = set(getattr(item, "fixturenames", ()))
        wanted |= {b for f, b in _BACKEND_FIXTURES.items() if f in fixtures and not wanted}
        for backend in sorted(wanted - markers):
            item.add_marker(getattr(pytest.mark, backend))
