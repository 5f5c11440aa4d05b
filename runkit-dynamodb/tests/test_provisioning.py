"""Table provisioning, lazy creation, and the provider's lifecycle against moto."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import anyio.to_thread
import boto3
import pytest

from runkit.persistence import PersistenceError
from runkit.testing.moto import MotoServer
from runkit_dynamodb import DynamoDBProvider, _provider
from runkit_dynamodb._aws import create_client

pytestmark = pytest.mark.dynamodb


def tables(client: Any, prefix: str) -> list[str]:
    """The tables of *prefix* (ListTables pages: the session's other tests made many)."""
    pages = client.get_paginator("list_tables").paginate()
    return sorted(n for page in pages for n in page["TableNames"] if n.startswith(prefix + "-"))


async def test_provision_creates_pay_per_request_tables(url: str, prefix: str, raw: Any) -> None:
    """provision() creates the three tables with the documented key schema."""
    async with DynamoDBProvider.from_url(url) as provider:
        await provider.provision()
    assert tables(raw, prefix) == [f"{prefix}-journal", f"{prefix}-keyspace", f"{prefix}-set"]
    for name in tables(raw, prefix):
        table = raw.describe_table(TableName=name)["Table"]
        assert table["TableStatus"] == "ACTIVE"
        assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
        assert sorted((k["AttributeName"], k["KeyType"]) for k in table["KeySchema"]) == [
            ("k", "RANGE"),
            ("n", "HASH"),
        ]
        definitions = table["AttributeDefinitions"]
        assert sorted((a["AttributeName"], a["AttributeType"]) for a in definitions) == [
            ("k", "B"),
            ("n", "B"),
        ]


async def test_provision_is_idempotent(
    url: str, session: boto3.session.Session, requests: Any
) -> None:
    """A second provision() only describes the existing tables."""
    async with DynamoDBProvider.from_url(url, session=session) as provider:
        await provider.provision()
        assert requests.take() == {"DescribeTable": 6, "CreateTable": 3}
        await provider.provision()
        assert requests.take() == {"DescribeTable": 3}


async def test_concurrent_provisioning(url: str, prefix: str, raw: Any) -> None:
    """Several providers provisioning and opening at once all succeed (ResourceInUse is fine)."""
    providers = [DynamoDBProvider.from_url(url) for _ in range(4)]

    async def use(provider: DynamoDBProvider) -> None:
        await provider.provision()
        set_ = await provider.sets.open("s")
        await set_.add(b"m")

    async with anyio.create_task_group() as tg:
        for provider in providers:
            tg.start_soon(use, provider)
    for provider in providers:
        await provider.close()
    assert len(tables(raw, prefix)) == 3


async def test_tables_created_on_first_use(url: str, prefix: str, raw: Any) -> None:
    """Without provision(), the first operation on a store kind creates its table."""
    async with DynamoDBProvider.from_url(url) as provider:
        journal = await provider.journals.open("j")
        assert tables(raw, prefix) == []  # open does no I/O
        await journal.append(0, b"x")
        assert tables(raw, prefix) == [f"{prefix}-journal"]
        keyspace = await provider.keyspaces.open("k")
        assert await keyspace.get(b"k") == (b"", "")
        assert tables(raw, prefix) == [f"{prefix}-journal", f"{prefix}-keyspace"]
        assert await journal.get(0) == b"x"


async def test_first_use_races(url: str, prefix: str, raw: Any) -> None:
    """Many tasks hitting a missing table at once provision it once and all succeed."""
    async with DynamoDBProvider.from_url(url) as provider:
        set_ = await provider.sets.open("s")
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(set_.add, bytes([i + 1]))
        assert sorted([m async for m in set_.range()]) == [bytes([i + 1]) for i in range(8)]
    assert tables(raw, prefix) == [f"{prefix}-set"]


async def test_foreign_table_is_refused(url: str, prefix: str, raw: Any) -> None:
    """A table of the same name but another key schema is reported, not used."""
    raw.create_table(
        TableName=f"{prefix}-set",
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    async with DynamoDBProvider.from_url(url) as provider:
        with pytest.raises(PersistenceError) as info:
            await provider.provision()
    assert str(info.value) == (
        f"table '{prefix}-set' exists but is not a runkit set table: expected the "
        "binary partition key 'n' and the binary sort key 'k'"
    )


async def test_closed_provider_refuses_work(url: str) -> None:
    """After close() (idempotent), the provider and its handles raise PersistenceError."""
    provider = DynamoDBProvider.from_url(url)
    journal = await provider.journals.open("j")
    await journal.append(0, b"x")
    await provider.close()
    await provider.close()
    message = rf"^<DynamoDBProvider '{provider.table_prefix}' at http://\S+ \(closed\)> is closed$"
    with pytest.raises(PersistenceError, match=message):
        await journal.get(0)
    with pytest.raises(PersistenceError, match=message):
        await provider.journals.open("j")
    with pytest.raises(PersistenceError, match=message):
        await provider.provision()


async def test_closed_handle(provider: DynamoDBProvider) -> None:
    """A closed handle refuses work; other handles of the name carry on."""
    first = await provider.keyspaces.open("k")
    second = await provider.keyspaces.open("k")
    await first.close()
    await first.close()
    with pytest.raises(PersistenceError, match=r"^keyspace 'k': handle is closed$"):
        await first.has(b"x")
    assert not await second.has(b"x")


async def test_given_client_is_used_and_not_closed(moto: MotoServer, prefix: str) -> None:
    """A caller's client is used as is and stays open after the provider closes."""
    kwargs: Any = moto.client_kwargs()
    client = boto3.client("dynamodb", **kwargs)
    async with DynamoDBProvider(prefix, client=client) as provider:
        set_ = await provider.sets.open("s")
        assert await set_.try_add(b"m")
    assert tables(client, prefix) == [f"{prefix}-set"]
    client.close()


async def test_no_region(moto: MotoServer, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without any region, the first operation says how to set one."""
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    async with DynamoDBProvider.from_url(f"dynamodb://{moto.netloc}/{prefix}?insecure=1") as p:
        set_ = await p.sets.open("s")
        with pytest.raises(PersistenceError) as info:
            await set_.has(b"m")
    assert str(info.value) == (
        "set 's': no AWS region configured: add '?region=...' to the dynamodb URL, "
        "pass region=..., or set AWS_REGION"
    )


async def test_a_table_that_is_not_active_is_waited_for_never_created(
    url: str, session: boto3.session.Session, requests: Any
) -> None:
    """A table being updated (or created by someone else) is waited for, also by a
    read-only provider: never a CreateTable."""
    async with DynamoDBProvider.from_url(url) as setup:
        await setup.provision()
    described: set[str] = set()
    lock = threading.Lock()

    def first_updating(parsed: dict[str, Any], **_: Any) -> None:
        table = parsed["Table"]
        with lock:  # the three tables are described in parallel threads
            if table["TableName"] not in described:
                described.add(table["TableName"])
                table["TableStatus"] = "UPDATING"

    session.events.register("after-call.dynamodb.DescribeTable", first_updating)
    provider = DynamoDBProvider.from_url(url, session=session)
    provider.set_read_only()
    async with provider:
        await provider.provision()
    # Per table: UPDATING, then ACTIVE for the waiter.
    assert requests.take() == {"DescribeTable": 6}


async def test_close_closes_the_client_even_when_cancelled(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As when ``async with provider:`` is left by a cancellation."""
    provider = DynamoDBProvider.from_url(url)
    set_ = await provider.sets.open("s")
    await set_.has(b"m")
    client = provider._client
    assert client is not None
    closed: list[bool] = []
    close = client.close

    def counted_close() -> None:
        closed.append(True)
        close()

    monkeypatch.setattr(client, "close", counted_close)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await provider.close()
    assert closed == [True]
    await provider.close()
    assert closed == [True]


async def test_close_does_not_wait_for_a_client_being_created(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creating a client keeps a worker thread busy for about half a second: close() must
    not block the event loop meanwhile, and the client made after it is closed."""
    creating = threading.Event()
    release = threading.Event()
    closed: list[bool] = []

    def slow_create(*args: Any) -> Any:
        creating.set()
        release.wait(5)
        client = create_client(*args)
        close = client.close

        def counted_close() -> None:
            closed.append(True)
            close()

        monkeypatch.setattr(client, "close", counted_close)
        return client

    monkeypatch.setattr(_provider, "create_client", slow_create)
    provider = DynamoDBProvider.from_url(url)
    set_ = await provider.sets.open("s")

    async def use() -> None:
        with pytest.raises(PersistenceError, match=r"is closed$"):
            await set_.has(b"m")

    async with anyio.create_task_group() as tg:
        tg.start_soon(use)
        await anyio.to_thread.run_sync(creating.wait)
        timer = threading.Timer(1.0, release.set)  # frees a close() that waits for creation
        timer.start()
        started = time.monotonic()
        await provider.close()
        elapsed = time.monotonic() - started
        release.set()
        timer.cancel()
    assert elapsed < 0.5
    assert closed == [True]
