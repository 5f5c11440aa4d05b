"""Test support for runkit and its persistence drivers.

The conformance suites are pytest base classes (the counterparts of
persistencekit's journaltest, kvtest and settest). A driver's test module
subclasses them and supplies two fixtures::

    class TestMyDriver(ConformanceSuite):
        @pytest.fixture
        async def provider(self) -> AsyncIterator[Provider]:
            ...  # a provider on a FRESH namespace; close it after the yield

        @pytest.fixture
        def make_provider(self) -> Callable[[], Provider]:
            ...  # builds another provider on the same backend and namespace

        hypothesis_settings = hypothesis.settings(max_examples=10, deadline=None)

The suites need pytest, Hypothesis and anyio's pytest plugin (``anyio_mode =
"auto"``); install ``runkit-core[testing]``. ``runkit.testing.faults`` wraps a
provider to fail writes before or after they take effect.
"""

import pytest

# The suites' plain asserts should explain themselves like a test module's do.
# Registered before the submodules are imported, which is what rewriting needs.
pytest.register_assert_rewrite(
    "runkit.testing._journal",
    "runkit.testing._keyspace",
    "runkit.testing._machines",
    "runkit.testing._provider",
    "runkit.testing._set",
    "runkit.testing._support",
)

from ._journal import JournalSuite as JournalSuite  # noqa: E402
from ._keyspace import KeyspaceSuite as KeyspaceSuite  # noqa: E402
from ._provider import ProviderSuite as ProviderSuite  # noqa: E402
from ._set import SetSuite as SetSuite  # noqa: E402
from ._support import unique_name as unique_name  # noqa: E402

__all__ = [
    "ConformanceSuite",
    "JournalSuite",
    "KeyspaceSuite",
    "ProviderSuite",
    "SetSuite",
    "unique_name",
]


class ConformanceSuite(JournalSuite, KeyspaceSuite, SetSuite, ProviderSuite):
    """Every contract test: journals, keyspaces, sets and the provider itself."""
