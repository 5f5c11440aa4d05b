"""``ConformanceSuite``: every suite in one class."""

from __future__ import annotations

from ._journal import JournalSuite
from ._keyspace import KeyspaceSuite
from ._provider import ProviderSuite
from ._set import SetSuite

__all__ = ["ConformanceSuite"]


class ConformanceSuite(JournalSuite, KeyspaceSuite, SetSuite, ProviderSuite):
    """Every contract test: journals, keyspaces, sets and the provider itself."""
