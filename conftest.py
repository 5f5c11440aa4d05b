"""Test configuration shared by every package in the workspace.

Every async test runs on both asyncio and trio (anyio's pytest plugin in auto
mode, parametrised here). ``DOGMA_*`` variables are stripped so tests of
``from_environment()`` are hermetic.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

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
def _clean_dogma_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("DOGMA_"):
            monkeypatch.delenv(name)
    yield
