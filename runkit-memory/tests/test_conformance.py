"""The memory driver against every contract test, at full Hypothesis budgets."""

from collections.abc import AsyncIterator, Callable
from typing import ClassVar

import hypothesis
import pytest

from runkit.persistence import Provider
from runkit.testing import ConformanceSuite, unique_name
from runkit_memory import MemoryProvider


class TestMemoryConformance(ConformanceSuite):
    hypothesis_settings: ClassVar[hypothesis.settings] = hypothesis.settings(
        max_examples=60, stateful_step_count=30, deadline=None
    )

    @pytest.fixture
    def silo(self) -> str:
        return unique_name("silo")

    @pytest.fixture
    async def provider(self, silo: str) -> AsyncIterator[Provider]:
        async with MemoryProvider(silo) as provider:
            yield provider

    @pytest.fixture
    def make_provider(self, silo: str) -> Callable[[], Provider]:
        return lambda: MemoryProvider(silo)
