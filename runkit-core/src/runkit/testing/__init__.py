"""Test support for runkit and its persistence drivers.

The conformance suites are pytest base classes (the counterparts of
persistencekit's journaltest, kvtest and settest). A driver's test module
subclasses them and supplies a ``provider`` fixture::

    class TestMyDriver(ConformanceSuite):
        @pytest.fixture
        async def provider(self) -> AsyncIterator[Provider]:
            ...  # a provider on a FRESH namespace; close it after the yield

        @pytest.fixture
        def make_provider(self) -> Callable[[], Provider]:
            ...  # optional: builds another provider on the same backend and namespace

        hypothesis_settings = hypothesis.settings(max_examples=10, deadline=None)

Without ``make_provider`` the tests that need a second provider (visibility
across providers, concurrent provisioning, closing one of several) skip, naming
the fixture. Every suite test is marked ``anyio``, so the suites run under
anyio's pytest plugin with no ``anyio_mode`` setting, on the backends the
project's ``anyio_backend`` fixture names.

The suites need pytest, Hypothesis and anyio's pytest plugin; install
``runkit-core[testing]``. They are imported lazily, so ``runkit.testing.faults``
(fault-injecting provider wrappers) works without them. See docs/driver-guide.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._conformance import ConformanceSuite as ConformanceSuite
    from ._journal import JournalSuite as JournalSuite
    from ._keyspace import KeyspaceSuite as KeyspaceSuite
    from ._provider import ProviderSuite as ProviderSuite
    from ._set import SetSuite as SetSuite
    from ._support import unique_name as unique_name

__all__ = [
    "ConformanceSuite",
    "JournalSuite",
    "KeyspaceSuite",
    "ProviderSuite",
    "SetSuite",
    "unique_name",
]

_HOMES = {
    "ConformanceSuite": "._conformance",
    "JournalSuite": "._journal",
    "KeyspaceSuite": "._keyspace",
    "ProviderSuite": "._provider",
    "SetSuite": "._set",
    "unique_name": "._support",
}
_SUITE_MODULES = ("_conformance", "_journal", "_keyspace", "_machines", "_provider", "_set")


def _register_assert_rewrite() -> None:
    import pytest

    # The suites' plain asserts should explain themselves as a test module's
    # do; rewriting must be registered before the modules are first imported.
    pytest.register_assert_rewrite(*(f"{__name__}.{m}" for m in _SUITE_MODULES))


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name != "unique_name":
        _register_assert_rewrite()
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value
