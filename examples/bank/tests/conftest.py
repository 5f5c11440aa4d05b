"""Fixtures for the bank's tests: a fresh application, a clock and a dispatcher factory."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

import bank
from bank.testing import Dispatcher

# Unless a test says otherwise, everything happens on 2001-02-03 (UTC), like the Go tests.
DAY = datetime(2001, 2, 3, tzinfo=UTC)


@pytest.fixture
def day() -> datetime:
    """2001-02-03 00:00 UTC."""
    return DAY


@pytest.fixture
def app(tmp_path: Path) -> bank.App:
    """A bank whose read models live in a fresh SQLite file."""
    return bank.App(tmp_path / "read-models.sqlite3")


@pytest.fixture
def begin(app: bank.App) -> Callable[..., Dispatcher]:
    """Start a testkit-like dispatcher; integrations and projections are off unless enabled.

    The clock starts at the real time unless ``now=`` is given, so a 2001
    transfer is already due, as in the Go tests.
    """

    def begin(*enable: str, now: datetime | None = None) -> Dispatcher:
        return Dispatcher(app, enable=enable, now=now)

    return begin
