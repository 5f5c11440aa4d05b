"""A read-only provider creates no table (against moto).

That it reads existing data and refuses writes is the conformance suite's
``test_provider_read_only_refuses_every_write_and_still_reads``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import boto3
import pytest

from runkit.persistence import Interval, PersistenceError, StoreUnavailable
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


async def test_every_write_is_refused_by_its_store_operation_before_any_request(
    url: str, session: boto3.session.Session, requests: Any
) -> None:
    """Also the writes a read would decide (deleting an absent key, truncating to begin)
    and an append below the end the handle saw: refused, not answered or a Conflict."""
    async with DynamoDBProvider.from_url(url) as writer:
        await writer.provision()
        await (await writer.journals.open("j")).append(0, b"r")
    reader = DynamoDBProvider.from_url(url, session=session)
    reader.set_read_only()
    async with reader:
        journal = await reader.journals.open("j")
        keyspace = await reader.keyspaces.open("k")
        set_ = await reader.sets.open("s")
        assert await journal.bounds() == Interval(0, 1)  # the handle saw the end
        requests.reset()
        writes: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("journal 'j': append", lambda: journal.append(0, b"x")),
            ("journal 'j': append", lambda: journal.append(1, b"x")),
            ("journal 'j': truncate", lambda: journal.truncate(0)),
            ("journal 'j': truncate", lambda: journal.truncate(1)),
            ("keyspace 'k': set", lambda: keyspace.set(b"absent", b"", "")),
            ("keyspace 'k': set", lambda: keyspace.set(b"k", b"v", "")),
            ("keyspace 'k': set_unconditional", lambda: keyspace.set_unconditional(b"k", b"v")),
            ("keyspace 'k': set_unconditional", lambda: keyspace.set_unconditional(b"k", b"")),
            ("set 's': add", lambda: set_.add(b"m")),
            ("set 's': try_add", lambda: set_.try_add(b"m")),
            ("set 's': remove", lambda: set_.remove(b"m")),
            ("set 's': try_remove", lambda: set_.try_remove(b"m")),
        ]
        for what, write in writes:
            with pytest.raises(PersistenceError) as info:
                await write()
            assert type(info.value) is PersistenceError, what
            assert str(info.value) == f"{what}: the provider is read-only"
        assert requests.take() == {}
