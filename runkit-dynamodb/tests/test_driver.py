"""Driver-specific behaviour against moto: request counts, limits, pagination,
truncation recovery, retries and ambiguous writes, region/role/TLS handling."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import anyio
import boto3
import pytest
from botocore.config import Config

from runkit.persistence import (
    Conflict,
    Interval,
    LimitExceeded,
    PersistenceError,
    RecordNotFound,
)
from runkit.testing.moto import MotoServer
from runkit_dynamodb import DYNAMODB_LIMITS, DynamoDBProvider

pytestmark = pytest.mark.dynamodb


# -- requests per operation ---------------------------------------------------


async def test_journal_request_counts(provider: DynamoDBProvider, requests: Any) -> None:
    """The documented number of requests for each journal operation."""
    journal = await provider.journals.open("j")
    await journal.append(0, b"a")
    assert requests.take() == {"PutItem": 1}
    await journal.append(1, b"b")
    assert requests.take() == {"PutItem": 1}
    with pytest.raises(Conflict):
        await journal.append(0, b"x")  # below what this handle has seen: no request
    assert requests.take() == {}
    assert await journal.bounds() == Interval(0, 2)
    assert requests.take() == {"Query": 1}
    assert await journal.get(1) == b"b"
    assert requests.take() == {"BatchGetItem": 1}
    assert [r async for r in journal.range(0)] == [(0, b"a"), (1, b"b")]
    assert requests.take() == {"Query": 1, "GetItem": 1}

    other = await provider.journals.open("j")
    await other.append(2, b"c")  # beyond what this handle has seen: check position 1
    assert requests.take() == {"GetItem": 1, "PutItem": 1}
    with pytest.raises(Conflict):
        await other.append(5, b"x")  # past the end
    assert requests.take() == {"GetItem": 1}

    for position in range(3, 60):
        await other.append(position, b"r")
    requests.reset()
    await other.truncate(55)  # 55 tombstones: 3 batches
    assert requests.take() == {"Query": 1, "UpdateItem": 2, "BatchWriteItem": 3}
    await other.truncate(55)
    assert requests.take() == {"Query": 1}


async def test_keyspace_and_set_request_counts(provider: DynamoDBProvider, requests: Any) -> None:
    """Keyspace and set operations are one request each."""
    keyspace = await provider.keyspaces.open("k")
    revision = await keyspace.set(b"k", b"v", "")
    assert requests.take() == {"PutItem": 1}
    assert await keyspace.get(b"k") == (b"v", revision)
    assert await keyspace.has(b"k")
    assert requests.take() == {"GetItem": 2}
    assert await keyspace.set(b"absent", b"", "") == ""
    assert requests.take() == {"GetItem": 1}
    await keyspace.set(b"k", b"", revision)
    assert requests.take() == {"DeleteItem": 1}
    await keyspace.set_unconditional(b"k", b"w")
    assert requests.take() == {"PutItem": 1}

    set_ = await provider.sets.open("s")
    await set_.add(b"m")
    assert await set_.try_add(b"n")
    assert not await set_.try_add(b"n")
    assert await set_.has(b"m")
    assert await set_.try_remove(b"m")
    await set_.remove(b"n")
    assert requests.take() == {"PutItem": 3, "GetItem": 1, "DeleteItem": 2}


# -- limits -------------------------------------------------------------------


async def test_limits_at_the_edge(provider: DynamoDBProvider) -> None:
    """Inputs exactly at every limit round-trip, together, under the 400 KB item limit."""
    limits = provider.limits
    assert limits == DYNAMODB_LIMITS
    # 2,048 bytes of UTF-8 mixing 1-, 2-, 3- and 4-byte characters, NUL, '/' and '%'.
    name = ("\0/%é€😀" * 200).encode()[:2040].decode("utf-8", "ignore")
    name += "x" * (limits.max_name_bytes - len(name.encode()))
    assert len(name.encode()) == limits.max_name_bytes
    key = bytes(range(256)) * 4
    value = b"\xff" * limits.max_value_bytes

    journal = await provider.journals.open(name)
    await journal.append(0, value)
    assert await journal.get(0) == value
    keyspace = await provider.keyspaces.open(name)
    revision = await keyspace.set(key, value, "")
    assert await keyspace.get(key) == (value, revision)
    set_ = await provider.sets.open(name)
    assert await set_.try_add(key)
    assert [m async for m in set_.range()] == [key]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda p: p.journals.open("n" * 2049),
            "journal name is 2049 bytes, over this provider's limit of 2048 bytes",
        ),
        (
            lambda p: p.keyspaces.open("é" * 1025),
            "keyspace name is 2050 bytes, over this provider's limit of 2048 bytes",
        ),
    ],
)
async def test_name_over_the_limit(
    provider: DynamoDBProvider, requests: Any, call: Callable[[Any], Any], message: str
) -> None:
    """Names over 2,048 bytes of UTF-8 are refused before any request."""
    with pytest.raises(LimitExceeded, match=f"^{re.escape(message)}$"):
        await call(provider)
    assert requests.take() == {}


async def test_inputs_over_the_limits(provider: DynamoDBProvider, requests: Any) -> None:
    """One byte over any limit raises LimitExceeded before any request."""
    big = b"x" * (390 * 1024 + 1)
    journal = await provider.journals.open("j")
    keyspace = await provider.keyspaces.open("k")
    set_ = await provider.sets.open("s")
    cases: list[tuple[Any, str]] = [
        (journal.append(0, big), "record is 399361 bytes, over this provider's limit of 399360"),
        (
            keyspace.set(b"k", big, ""),
            "value is 399361 bytes, over this provider's limit of 399360",
        ),
        (
            keyspace.set_unconditional(b"x" * 1025, b"v"),
            "key is 1025 bytes, over this provider's limit of 1024",
        ),
        (keyspace.get(b"x" * 1025), "key is 1025 bytes, over this provider's limit of 1024"),
        (set_.add(b"x" * 1025), "member is 1025 bytes, over this provider's limit of 1024"),
        (set_.try_remove(b"x" * 1025), "member is 1025 bytes, over this provider's limit of 1024"),
    ]
    for coro, message in cases:
        with pytest.raises(LimitExceeded, match=f"^{re.escape(message)} bytes$"):
            await coro
    assert requests.take() == {}


# -- journals -----------------------------------------------------------------


async def test_truncated_and_past_end_positions_conflict(provider: DynamoDBProvider) -> None:
    """Appends conflict below begin, inside, and past the end, through fresh handles too."""
    journal = await provider.journals.open("j")
    for position in range(5):
        await journal.append(position, b"%d" % position)
    await journal.truncate(5)
    for position in (0, 3, 4, 6, 100):
        fresh = await provider.journals.open("j")
        with pytest.raises(
            Conflict, match=f"^journal 'j': conflict appending at position {position}$"
        ):
            await fresh.append(position, b"x")
        with pytest.raises(RecordNotFound):
            await fresh.get(min(position, 4))
    fresh = await provider.journals.open("j")
    await fresh.append(5, b"5")
    assert await fresh.bounds() == Interval(5, 6)
    assert [r async for r in fresh.range(5)] == [(5, b"5")]


async def test_stale_handle_cannot_append_invisibly(provider: DynamoDBProvider) -> None:
    """A handle that saw an old end conflicts after another appended and truncated everything."""
    stale = await provider.journals.open("j")
    await stale.append(0, b"a")
    other = await provider.journals.open("j")
    for position in range(1, 4):
        await other.append(position, b"b")
    await other.truncate(4)
    for position in (1, 2, 3):
        with pytest.raises(Conflict):
            await stale.append(position, b"stale")
    await stale.append(4, b"ok")
    assert [r async for r in other.range(4)] == [(4, b"ok")]


async def test_truncate_past_end(provider: DynamoDBProvider) -> None:
    """Truncating beyond the end is a ValueError that names both positions."""
    journal = await provider.journals.open("j")
    await journal.append(0, b"a")
    with pytest.raises(
        ValueError, match=r"^journal 'j': cannot truncate to position 2, past the end \(1\)$"
    ):
        await journal.truncate(2)


async def test_failed_truncation_hides_records_and_completes(
    provider: DynamoDBProvider, inject: Any, raw: Any
) -> None:
    """After a truncation fails part-way, reads still honour begin; a retry completes it."""
    journal = await provider.journals.open("j")
    for position in range(30):
        await journal.append(position, b"r")
    inject.plan["BatchWriteItem"] = ["invalid"] * 2  # both batches fail, not retried
    with pytest.raises(PersistenceError) as info:
        await journal.truncate(28)
    assert str(info.value) == (
        "journal 'j': DynamoDB BatchWriteItem failed: ValidationException: ValidationException"
    )
    table = provider.tables["journal"]
    item = raw.get_item(TableName=table, Key={"n": {"B": b"j"}, "k": {"B": (3).to_bytes(8, "big")}})
    assert "r" in item["Item"]  # not tombstoned yet ...
    assert (await journal.bounds()).begin == 28
    with pytest.raises(RecordNotFound):
        await journal.get(3)  # ... but no longer readable
    with pytest.raises(RecordNotFound):
        await anext(aiter(journal.range(3)))
    with pytest.raises(Conflict):
        await journal.append(3, b"x")

    await journal.truncate(1)  # below begin: still completes the earlier truncation
    for position in range(28):
        key = {"n": {"B": b"j"}, "k": {"B": position.to_bytes(8, "big")}}
        assert "r" not in raw.get_item(TableName=table, Key=key, ConsistentRead=True)["Item"]
    assert [p async for p, _ in journal.range(28)] == [28, 29]


async def test_range_sees_truncation_overtake(provider: DynamoDBProvider, url: str) -> None:
    """A truncation that overtakes a paginated range raises RecordNotFound mid-iteration."""
    small = DynamoDBProvider.from_url(url, page_size=2)
    try:
        journal = await small.journals.open("j")
        for position in range(6):
            await journal.append(position, b"r")
        seen = []

        async def consume() -> None:
            async for position, _ in journal.range(0):
                seen.append(position)
                if position == 1:
                    await journal.truncate(4)

        with pytest.raises(RecordNotFound, match=r"^journal 'j': no record at position 2$"):
            await consume()
        assert seen == [0, 1]
    finally:
        await small.close()


@pytest.mark.parametrize("aws_pagination", [False, True], ids=["moto", "aws"])
async def test_pagination(url: str, session: boto3.session.Session, aws_pagination: bool) -> None:
    """Ranges are complete with page boundaries anywhere, with either pagination behaviour.

    ``aws`` adds a LastEvaluatedKey to every non-empty page that lacks one, as
    AWS does at an exact Limit: the driver must then accept an empty last page.
    """
    queries: list[int] = []
    partition: list[Any] = []

    def before_query(params: dict[str, Any], **_: Any) -> None:
        partition[:] = [params["ExpressionAttributeValues"][":n"]]

    def after_query(parsed: dict[str, Any], **_: Any) -> None:
        items = parsed.get("Items", [])
        queries.append(len(items))
        if aws_pagination and items and "LastEvaluatedKey" not in parsed:
            parsed["LastEvaluatedKey"] = {"n": partition[0], "k": items[-1]["k"]}

    session.events.register("provide-client-params.dynamodb.Query", before_query)
    session.events.register("after-call.dynamodb.Query", after_query)
    async with DynamoDBProvider.from_url(url, session=session, page_size=3) as provider:
        for records in (0, 1, 3, 5, 6, 7):
            name = f"n{records}"
            journal = await provider.journals.open(name)
            keyspace = await provider.keyspaces.open(name)
            set_ = await provider.sets.open(name)
            for i in range(records):
                await journal.append(i, b"%d" % i)
                await keyspace.set(b"%d" % i, b"v", "")
                await set_.add(b"%d" % i)
            expected = [b"%d" % i for i in range(records)]
            queries.clear()
            if records:
                assert [r async for _, r in journal.range(0)] == expected
                assert [r async for _, r in journal.range(records - 1)] == expected[-1:]
            else:
                with pytest.raises(RecordNotFound):
                    await anext(aiter(journal.range(0)))
            assert sorted([k async for k, _, _ in keyspace.range()]) == expected
            assert sorted([m async for m in set_.range()]) == expected
            assert all(n <= 3 for n in queries)
            if aws_pagination and records and records % 3 == 0:
                assert 0 in queries  # the empty page after an exact Limit was read


# -- retries and ambiguity ----------------------------------------------------


async def test_lost_append_response_is_ambiguous(provider: DynamoDBProvider, inject: Any) -> None:
    """An append whose response is lost raises ambiguous, is not retried, and did land."""
    journal = await provider.journals.open("j")
    inject.plan["PutItem"] = ["lost"]
    with pytest.raises(PersistenceError) as info:
        await journal.append(0, b"mine")
    assert info.value.ambiguous
    assert not info.value.retryable
    assert str(info.value) == (
        "journal 'j': PutItem may or may not have taken effect "
        '(ReadTimeoutError: Read timeout on endpoint URL: "' + str(inject_url(provider)) + '/"); '
        "read back to find out"
    )
    assert inject.sent.count("PutItem") == 1
    assert await journal.get(0) == b"mine"
    with pytest.raises(Conflict):
        await journal.append(0, b"mine")


def inject_url(provider: DynamoDBProvider) -> str:
    return repr(provider).split(" at ", 1)[1].removesuffix(">")


@pytest.mark.parametrize("action", ["lost", "500"])
async def test_conditional_writes_are_never_retried_when_ambiguous(
    provider: DynamoDBProvider, inject: Any, action: str
) -> None:
    """set, try_add and try_remove raise ambiguous after one attempt."""
    keyspace = await provider.keyspaces.open("k")
    set_ = await provider.sets.open("s")
    await set_.add(b"present")
    calls: list[tuple[str, Callable[[], Any]]] = [
        ("PutItem", lambda: keyspace.set(b"k", b"v", "")),
        ("PutItem", lambda: set_.try_add(b"m")),
        ("DeleteItem", lambda: set_.try_remove(b"present")),
    ]
    for op, call in calls:
        inject.sent.clear()
        inject.plan[op] = [action]
        with pytest.raises(PersistenceError) as info:
            await call()
        assert info.value.ambiguous, op
        assert inject.sent == [op]


async def test_unconditional_writes_are_retried(provider: DynamoDBProvider, inject: Any) -> None:
    """Idempotent writes (add, remove, deletes) are retried after a lost response."""
    set_ = await provider.sets.open("s")
    inject.plan["PutItem"] = ["lost"]
    await set_.add(b"m")
    assert inject.sent == ["PutItem", "PutItem"]
    assert await set_.has(b"m")


@pytest.mark.parametrize("action", ["throttle", "refused"])
async def test_unsent_or_throttled_conditional_writes_are_retried(
    provider: DynamoDBProvider, inject: Any, action: str
) -> None:
    """Throttling and connection failures before sending are safe to retry, and are."""
    journal = await provider.journals.open("j")
    inject.plan["PutItem"] = [action, action]
    await journal.append(0, b"a")
    assert inject.sent == ["PutItem"] * 3
    assert await journal.get(0) == b"a"


async def test_reads_are_retried_after_server_errors(
    provider: DynamoDBProvider, inject: Any
) -> None:
    """A 500 or a lost response on a read is retried by botocore."""
    keyspace = await provider.keyspaces.open("k")
    inject.plan["GetItem"] = ["500", "lost"]
    assert await keyspace.get(b"k") == (b"", "")
    assert inject.sent == ["GetItem"] * 3


async def test_exhausted_throttling_is_retryable(
    url: str, session: boto3.session.Session, inject: Any
) -> None:
    """When botocore gives up on throttling, the error is retryable and not ambiguous."""
    config = Config(retries={"mode": "standard", "total_max_attempts": 2})
    async with DynamoDBProvider.from_url(url, session=session, config=config) as provider:
        set_ = await provider.sets.open("s")
        await set_.has(b"m")
        inject.plan["PutItem"] = ["throttle", "throttle"]
        with pytest.raises(PersistenceError) as info:
            await set_.try_add(b"m")
    assert info.value.retryable
    assert not info.value.ambiguous
    assert str(info.value) == (
        "set 's': DynamoDB PutItem failed: ThrottlingException: ThrottlingException"
    )


async def test_shared_handle_concurrency(provider: DynamoDBProvider) -> None:
    """One handle shared by many tasks: exactly one append per position wins."""
    journal = await provider.journals.open("j")
    wins: list[int] = []

    async def racer(position: int) -> None:
        try:
            await journal.append(position, b"x")
        except Conflict:
            return
        wins.append(position)

    for position in range(3):
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(racer, position)
    assert wins == [0, 1, 2]


# -- region, role, TLS ------------------------------------------------------------


async def test_region_is_used(moto: MotoServer, prefix: str, raw: Any) -> None:
    """?region= picks the region: requests are signed for it and tables live there."""
    signed: list[str] = []
    session = boto3.session.Session()
    session.events.register(
        "before-send.dynamodb",
        lambda request, **_: signed.append(request.headers["Authorization"].decode()),
    )
    url = f"dynamodb://{moto.netloc}/{prefix}?insecure=1&region=eu-west-2"
    async with DynamoDBProvider.from_url(url, session=session) as provider:
        await provider.provision()
    assert all("/eu-west-2/dynamodb/aws4_request" in header for header in signed)
    with pytest.raises(raw.exceptions.ResourceNotFoundException):
        raw.describe_table(TableName=f"{prefix}-set")  # raw is in us-east-1
    kwargs: Any = {**moto.client_kwargs(), "region_name": "eu-west-2"}
    west = boto3.client("dynamodb", **kwargs)
    assert west.describe_table(TableName=f"{prefix}-set")["Table"]["TableStatus"] == "ACTIVE"
    west.close()


async def test_role_arn_assumes_the_role(
    moto: MotoServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """?role_arn= calls STS AssumeRole once and signs DynamoDB requests with its credentials."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", moto.endpoint)
    role_arn = "arn:aws:iam::123456789012:role/runkit-test"
    assumed: list[dict[str, Any]] = []
    signed: list[str] = []
    session = boto3.session.Session()
    session.events.register(
        "provide-client-params.sts.AssumeRole", lambda params, **_: assumed.append(params)
    )
    keys: list[str] = []
    session.events.register(
        "after-call.sts.AssumeRole",
        lambda parsed, **_: keys.append(parsed["Credentials"]["AccessKeyId"]),
    )
    session.events.register(
        "before-send.dynamodb",
        lambda request, **_: signed.append(request.headers["Authorization"].decode()),
    )
    url = f"dynamodb://{moto.netloc}/{prefix}?insecure=1&region=us-east-1&role_arn={role_arn}"
    async with DynamoDBProvider.from_url(url, session=session) as provider:
        set_ = await provider.sets.open("s")
        await set_.add(b"m")
        assert await set_.has(b"m")
    assert [p["RoleArn"] for p in assumed] == [role_arn]
    assert assumed[0]["RoleSessionName"] == "runkit-dynamodb"
    assert len(keys) == 1
    assert keys[0] != "testing"
    assert signed
    assert all(f"Credential={keys[0]}/" in header for header in signed)


async def test_https_without_insecure(moto: MotoServer, prefix: str) -> None:
    """With a host and no insecure, the driver speaks TLS (and so cannot reach plain-HTTP moto)."""
    config = Config(retries={"mode": "standard", "total_max_attempts": 1})
    url = f"dynamodb://{moto.netloc}/{prefix}?region=us-east-1"
    async with DynamoDBProvider.from_url(url, config=config) as provider:
        assert repr(provider) == f"<DynamoDBProvider {prefix!r} at https://{moto.netloc}>"
        set_ = await provider.sets.open("s")
        with pytest.raises(PersistenceError) as info:
            await set_.has(b"m")
    assert info.value.retryable
    assert str(info.value).startswith(
        f"set 's': cannot reach DynamoDB for GetItem: SSL validation failed for https://{moto.netloc}/"
    )


async def test_errors_never_show_credentials(
    url: str, session: boto3.session.Session, inject: Any
) -> None:
    """Failure messages carry AWS's error code, never the access key or secret."""
    config = Config(retries={"mode": "standard", "total_max_attempts": 2})
    inject.plan["GetItem"] = ["500"] * 2
    async with DynamoDBProvider.from_url(url, session=session, config=config) as provider:
        keyspace = await provider.keyspaces.open("k")
        with pytest.raises(PersistenceError) as info:
            await keyspace.get(b"k")
    assert info.value.retryable
    assert str(info.value) == (
        "keyspace 'k': DynamoDB GetItem failed: InternalServerError: InternalServerError"
    )
    assert "testing" not in str(info.value)


async def test_a_range_overtaken_by_a_partly_failed_truncation_stops(
    url: str, session: boto3.session.Session, inject: Any
) -> None:
    # Truncation moves begin, then tombstones the records below it; if that
    # fails part-way, get() already reports them gone, and so must a range
    # that was running: it raises at the next position it has not yielded.
    small = DynamoDBProvider.from_url(url, session=session, page_size=2)
    try:
        journal = await small.journals.open("j")
        for position in range(6):
            await journal.append(position, b"r")
        seen: list[int] = []

        async def consume() -> None:
            async for position, _ in journal.range(0):
                seen.append(position)
                if position == 1:
                    inject.plan["BatchWriteItem"] = ["invalid"]
                    with pytest.raises(PersistenceError):
                        await journal.truncate(4)
                    assert (await journal.bounds()).begin == 4
                    with pytest.raises(RecordNotFound):
                        await journal.get(2)

        with pytest.raises(RecordNotFound):
            await consume()
        assert seen == [0, 1]
    finally:
        await small.close()


@pytest.mark.parametrize("action", ["lost", "500"])
async def test_set_unconditional_never_resends_a_revision(
    url: str, session: boto3.session.Session, inject: Any, action: str
) -> None:
    """After a failure that may have landed, botocore must not resend the PutItem: another
    write may have replaced it meanwhile, and its revision would come back. The driver
    writes again with a new revision."""
    revisions: list[str] = []

    def record(request: Any, **_: Any) -> None:  # each attempt, before it is sent
        revisions.append(json.loads(request.body)["Item"]["r"]["S"])

    session.events.register("request-created.dynamodb.PutItem", record)
    async with DynamoDBProvider.from_url(url, session=session) as provider:
        keyspace = await provider.keyspaces.open("k")
        assert await keyspace.get(b"k") == (b"", "")  # creates the table
        inject.plan["PutItem"] = [action]
        revision = await keyspace.set_unconditional(b"k", b"v")
        assert await keyspace.get(b"k") == (b"v", revision)
    assert len(revisions) == 2
    assert revisions[0] != revisions[1] == revision
