"""A read-only provider creates no table and refuses writes (against moto)."""

from __future__ import annotations

from typing import Any

import pytest

from runkit.persistence import PersistenceError, StoreUnavailable
from runkit_dynamodb import DynamoDBProvider

pytestmark = pytest.mark.dynamodb


def tables(client: Any, prefix: str) -> list[str]:
    pages = client.get_paginator("list_tables").paginate()
    return sorted(n for page in pages for n in page["TableNames"] if n.startswith(prefix + "-"))


async def test_a_missing_table_is_reported_not_created(url: str, prefix: str, raw: Any) -> None:
    provider = DynamoDBProvider.from_url(url)
    provider.set_read_only()
    async with provider:
        ks = await provider.keyspaces.open("cluster/nodes")
        with pytest.raises(StoreUnavailable, match=f"table '{prefix}-keyspace' does not exist"):
            [item async for item in ks.range()]
    assert tables(raw, prefix) == []


async def test_existing_tables_are_read_and_writes_refused(url: str, prefix: str) -> None:
    async with (
        DynamoDBProvider.from_url(url) as writer,
        await writer.keyspaces.open("ks") as ks,
    ):
        await ks.set_unconditional(b"k", b"v")
    reader = DynamoDBProvider.from_url(url)
    reader.set_read_only()
    async with reader, await reader.keyspaces.open("ks") as ks:
        assert (await ks.get(b"k"))[0] == b"v"
        with pytest.raises(PersistenceError, match="the provider is read-only"):
            await ks.set_unconditional(b"k", b"w")
        with pytest.raises(PersistenceError, match="the provider is read-only"):
            await ks.set(b"new", b"w", "")
