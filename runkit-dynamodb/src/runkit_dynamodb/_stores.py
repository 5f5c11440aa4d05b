"""The journal, keyspace and set stores of ``DynamoDBProvider``.

Each checks a name and wraps it in the handle of its kind, with no I/O. The
provider imports this module, which names ``DynamoDBProvider`` for type
checking only, so imports never cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from anyio.lowlevel import checkpoint

from runkit.persistence import Journal, JournalStore, Keyspace, KeyspaceStore, Set, SetStore

from ._journal import _DynamoJournal
from ._keyspace import _DynamoKeyspace
from ._set import _DynamoSet

if TYPE_CHECKING:
    from ._provider import DynamoDBProvider

__all__ = ["_JournalStore", "_KeyspaceStore", "_SetStore"]


class _JournalStore(JournalStore):
    def __init__(self, provider: DynamoDBProvider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Journal:
        # No I/O: the table is created on first use if it is missing.
        name = self._provider.limits.check_name("journal", name)
        await checkpoint()
        self._provider._check_open()
        return _DynamoJournal(self._provider, name)


class _KeyspaceStore(KeyspaceStore):
    def __init__(self, provider: DynamoDBProvider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Keyspace:
        name = self._provider.limits.check_name("keyspace", name)
        await checkpoint()
        self._provider._check_open()
        return _DynamoKeyspace(self._provider, name)


class _SetStore(SetStore):
    def __init__(self, provider: DynamoDBProvider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Set:
        name = self._provider.limits.check_name("set", name)
        await checkpoint()
        self._provider._check_open()
        return _DynamoSet(self._provider, name)
