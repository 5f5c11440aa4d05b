"""Fixtures shared by runkit-core's tests.

- PostgreSQL: ``postgres_server`` (one throwaway server per session, or
  ``RUNKIT_TEST_PG_DSN``), ``postgres_dsn`` and ``postgres_schema`` (a fresh
  schema per test, dropped afterwards). The root conftest marks tests using
  them ``postgres``. A module may still define its own fixtures of these names.
- ``invariants``: the §9 invariant checker and its test application
  (``engine_faults_app``), for tests that want it as a fixture rather than
  through ``sys.path``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest

try:
    from runkit_postgres.testing.pytest_plugin import (
        postgres_dsn,
        postgres_schema,
        postgres_server,
    )
except ImportError:  # the PostgreSQL driver is not installed: its tests skip
    pass
else:
    __all__ = ["postgres_dsn", "postgres_schema", "postgres_server"]

TESTS = Path(__file__).parent


@pytest.fixture(scope="session")
def invariants() -> ModuleType:
    """The ``engine_faults_app`` module: test application, store reader and §9 checker."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import engine_faults_app

    return engine_faults_app
