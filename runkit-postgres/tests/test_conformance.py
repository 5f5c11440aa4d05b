"""The persistence contract (``runkit.testing.ConformanceSuite``) on a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from runkit.persistence import Provider
from runkit.testing import ConformanceSuite
from runkit_postgres import PostgresProvider

pytestmark = pytest.mark.postgres


class TestPostgres(ConformanceSuite):
    """Every contract test, each on a fresh schema of the session's server.

    The state-machine tests run with the suite's full default budget.
    """

    @pytest.fixture
    async def provider(self, postgres_dsn: str, postgres_schema: str) -> AsyncIterator[Provider]:
        async with PostgresProvider(postgres_dsn, schema=postgres_schema) as provider:
            yield provider

    @pytest.fixture
    def make_provider(self, postgres_dsn: str, postgres_schema: str) -> Callable[[], Provider]:
        return lambda: PostgresProvider(postgres_dsn, schema=postgres_schema)
