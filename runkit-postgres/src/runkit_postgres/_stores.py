"""The journal, keyspace and set stores of ``PostgresProvider``.

Each opens (or, read-only, finds) a name's row through the provider and wraps
its id in the handle of its kind. The provider imports this module, which
names ``PostgresProvider`` for type checking only, so imports never cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runkit.persistence import Journal, JournalStore, Keyspace, KeyspaceStore, Set, SetStore

from ._journal import _Journal
from ._keyspace import _Keyspace
from ._set import _Set

if TYPE_CHECKING:
    from ._provider import PostgresProvider

__all__ = ["_JournalStore", "_KeyspaceStore", "_SetStore"]


class _JournalStore(JournalStore):
    def __init__(self, provider: PostgresProvider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Journal:
        p = self._provider
        name = p.limits.check_name("journal", name)
        journal_id = await p._open("journal", p._sql.open_journal, p._sql.find_journal, name)
        return _Journal(p, name, journal_id)


class _KeyspaceStore(KeyspaceStore):
    def __init__(self, provider: PostgresProvider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Keyspace:
        p = self._provider
        name = p.limits.check_name("keyspace", name)
        keyspace_id = await p._open("keyspace", p._sql.open_keyspace, p._sql.find_keyspace, name)
        return _Keyspace(p, name, keyspace_id)


class _SetStore(SetStore):
    def __init__(self, provider: PostgresProvider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Set:
        p = self._provider
        name = p.limits.check_name("set", name)
        set_id = await p._open("set", p._sql.open_set, p._sql.find_set, name)
        return _Set(p, name, set_id)
