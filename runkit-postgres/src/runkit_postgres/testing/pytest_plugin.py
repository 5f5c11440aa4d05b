"""pytest fixtures for tests that need PostgreSQL.

Import them into a ``conftest.py``::

    from runkit_postgres.testing.pytest_plugin import (
        postgres_dsn as postgres_dsn,
        postgres_schema as postgres_schema,
        postgres_server as postgres_server,
    )

``postgres_server`` (session) starts one throwaway server per test session (per
xdist worker), or uses ``RUNKIT_TEST_PG_DSN``. ``postgres_schema`` gives each
test a fresh schema name and drops the schema afterwards; ``postgres_url`` is a
persistence URL for that schema (for ``runkit.with_persistence``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import PostgresServer, drop_schema, unique_schema, url_for

__all__ = ["postgres_dsn", "postgres_schema", "postgres_server", "postgres_url"]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session, stopped at its end."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """libpq DSN of the session's server (superuser, database ``postgres``)."""
    return postgres_server.dsn


@pytest.fixture
def postgres_schema(postgres_dsn: str) -> Iterator[str]:
    """A schema name unique to this test; the schema is dropped after it."""
    schema = unique_schema()
    yield schema
    drop_schema(postgres_dsn, schema)


@pytest.fixture
def postgres_url(postgres_dsn: str, postgres_schema: str) -> str:
    """A ``postgresql://`` persistence URL for this test's fresh schema."""
    return url_for(postgres_dsn, schema=postgres_schema)
