"""Test configuration shared by every package in the workspace.

Every async test runs on both asyncio and trio (anyio's pytest plugin in auto
mode, parametrised here). ``DOGMA_*`` variables are stripped so tests of
``from_environment()`` are hermetic, and the bank's read models go to the test's
own folder. Property tests have no per-example deadline: on two CPUs shared by
two test workers one slow example is noise, not a finding.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("runkit", deadline=None)
settings.load_profile("runkit")


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


@pytest.fixture(autouse=True)
def _clean_dogma_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("DOGMA_"):
            monkeypatch.delenv(name)
    # Not ./bank.sqlite3, shared by every test worker and run (and subprocesses).
    monkeypatch.setenv("BANK_READ_DB", str(tmp_path / "bank.sqlite3"))


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
