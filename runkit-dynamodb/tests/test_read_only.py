"""A read-only provider creates no table (against moto).

That it reads existing data and refuses writes is the conformance suite's
``test_provider_read_only_refuses_every_write_and_still_reads``.
"""

from __future__ import annotations

from typing import Any

import pytest

from runkit.persistence import StoreUnavailable
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
