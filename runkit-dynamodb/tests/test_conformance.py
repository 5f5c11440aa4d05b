"""The runkit persistence conformance suite, against DynamoDB on moto."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import ClassVar

import hypothesis
import pytest

from runkit.persistence import Provider
from runkit.testing import ConformanceSuite
from runkit_dynamodb import DynamoDBProvider

pytestmark = pytest.mark.dynamodb


class TestDynamoDB(ConformanceSuite):
    """Every contract test; tables are created lazily, so each test pays only for what it uses."""

    # moto serves a few hundred requests a second on a shared 2-core machine.
    hypothesis_settings: ClassVar[hypothesis.settings] = hypothesis.settings(
        max_examples=10,
        stateful_step_count=15,
        deadline=None,
        suppress_health_check=[hypothesis.HealthCheck.too_slow],
    )

    @pytest.fixture
    async def provider(self, url: str) -> AsyncIterator[Provider]:
        p = DynamoDBProvider.from_url(url)
        try:
            yield p
        finally:
            await p.close()

    @pytest.fixture
    def make_provider(self, url: str) -> Callable[[], Provider]:
        return lambda: DynamoDBProvider.from_url(url)
