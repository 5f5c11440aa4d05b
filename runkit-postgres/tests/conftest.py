"""Fixtures for the PostgreSQL driver's tests: one throwaway server per session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from runkit_postgres import PostgresProvider
from runkit_postgres.testing.pytest_plugin import (
    postgres_dsn,
    postgres_schema,
    postgres_server,
    postgres_url,
)

__all__ = ["pg_provider", "postgres_dsn", "postgres_schema", "postgres_server", "postgres_url"]


@pytest.fixture
async def pg_provider(postgres_dsn: str, postgres_schema: str) -> AsyncIterator[PostgresProvider]:
    """A provider on a fresh schema, closed after the test."""
    async with PostgresProvider(postgres_dsn, schema=postgres_schema) as provider:
        yield provider
