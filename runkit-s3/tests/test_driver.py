"""Driver tests against moto: provisioning, credentials, the journal protocol, fault mapping.

Faults are injected through botocore's event hooks on the provider's
``boto3.Session``: ``before-send`` handlers can answer a request themselves
(a fake 409/500/503 response) or raise a transport error after really sending
it (a write whose response was lost).
"""

from __future__ import annotations

import io
import os
import re
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import boto3
import pytest
import urllib3
from botocore.awsrequest import AWSPreparedRequest, AWSResponse, HTTPHeaders
from botocore.exceptions import ReadTimeoutError

from runkit.persistence import (
    Conflict,
    Interval,
    LimitExceeded,
    PersistenceError,
    RecordNotFound,
    provider_from_url,
)
from runkit.testing.moto import MotoServer
from runkit_s3 import S3Provider
from runkit_s3._layout import Layout

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

pytestmark = pytest.mark.s3


# -- helpers -----------------------------------------------------------------------------


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


def _error_response(request: AWSPreparedRequest, status: int, code: str) -> AWSResponse:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>injected</Message></Error>"
    ).encode()
    headers = HTTPHeaders()
    headers["Content-Type"] = "application/xml"
    return AWSResponse(request.url, status, headers, _Body(body))


def _send_for_real(request: AWSPreparedRequest) -> None:
    """Deliver a prepared (signed) request ourselves, discarding the response."""
    body = request.body
    if body is not None and not isinstance(body, str | bytes | bytearray):
        body = body.read()
    assert not isinstance(body, bytearray)
    with urllib3.PoolManager() as http:
        http.request(request.method, request.url, body=body, headers=dict(request.headers))


class Hooks:
    """``before-send`` rules and a request count, by operation, for one session.

    Create it before the provider's first operation: a client copies the
    session's hooks when it is created, so the one handler registered here
    consults rules added later.
    """

    def __init__(self, session: boto3.Session) -> None:
        self.sent: list[tuple[str, str]] = []  # (operation, url)
        self._rules: list[
            tuple[str, str, Callable[[AWSPreparedRequest], Any], list[int], int, list[int]]
        ] = []
        self._lock = threading.Lock()
        session.events.register("before-send.s3", self._before_send)  # type: ignore[arg-type]

    def _before_send(
        self, request: AWSPreparedRequest, event_name: str, **_: Any
    ) -> AWSResponse | None:
        operation = event_name.rsplit(".", 1)[-1]
        with self._lock:
            self.sent.append((operation, request.url))
            for op, fragment, action, calls, times, skip in self._rules:
                if op == operation and fragment in request.url and calls[0] < times:
                    if skip[0]:
                        skip[0] -= 1
                        continue
                    calls[0] += 1
                    chosen = action
                    break
            else:
                return None
        result: AWSResponse | None = chosen(request)
        return result

    def count(self, operation: str | None = None) -> int:
        with self._lock:
            return sum(1 for op, _ in self.sent if operation is None or op == operation)

    def on(
        self,
        operation: str,
        action: Callable[[AWSPreparedRequest], AWSResponse | None],
        *,
        url_contains: str = "",
        times: int = 1,
        skip: int = 0,
    ) -> list[int]:
        """Run *action* for *times* matching requests after *skip*; return a call counter."""
        calls = [0]
        with self._lock:
            self._rules.append((operation, url_contains, action, calls, times, [skip]))
        return calls


def _raw_client(moto: MotoServer) -> S3Client:
    client: S3Client = boto3.client("s3", **moto.client_kwargs())  # type: ignore[call-overload]
    return client


def _keys(moto: MotoServer, bucket: str, prefix: str = "") -> list[str]:
    response = _raw_client(moto).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in response.get("Contents", [])]


@pytest.fixture
def make(moto_server: MotoServer, bucket: str) -> Iterator[Callable[..., S3Provider]]:
    """Build providers on the test's bucket (each with its own session unless given one)."""
    made: list[S3Provider] = []

    def build(session: boto3.Session, **kwargs: Any) -> S3Provider:
        kwargs.setdefault("endpoint_url", moto_server.endpoint)
        provider = S3Provider(kwargs.pop("bucket", bucket), session=session, **kwargs)
        made.append(provider)
        return provider

    yield build
    for provider in made:
        assert provider._s3 is None, f"{provider!r} was not closed"


@pytest.fixture
def hooks(aws_session: boto3.Session) -> Hooks:
    """Request hooks on ``aws_session``, installed before any provider uses it."""
    return Hooks(aws_session)


@pytest.fixture
async def provider(
    make: Callable[..., S3Provider], aws_session: boto3.Session, hooks: Hooks
) -> AsyncIterator[S3Provider]:
    async with make(aws_session) as p:
        yield p


# -- provisioning --------------------------------------------------------------------------


async def test_provision_creates_the_bucket_idempotently(
    make: Callable[..., S3Provider],
    aws_session: boto3.Session,
    shared_session: boto3.Session,
    moto_server: MotoServer,
    bucket: str,
) -> None:
    raw = _raw_client(moto_server)
    assert bucket not in [b["Name"] for b in raw.list_buckets()["Buckets"]]
    async with make(aws_session) as provider:
        await provider.provision()
        await provider.provision()
    assert bucket in [b["Name"] for b in raw.list_buckets()["Buckets"]]
    async with make(shared_session) as again:  # an existing bucket is fine
        await again.provision()


async def test_concurrent_provisioning_of_a_new_bucket_by_many_providers_succeeds(
    make: Callable[..., S3Provider], shared_session: boto3.Session
) -> None:
    providers = [make(shared_session) for _ in range(6)]
    try:
        async with anyio.create_task_group() as tg:
            for p in providers:
                tg.start_soon(p.provision)
                tg.start_soon(p.journals.open, "j")
    finally:
        for p in providers:
            await p.close()


async def test_first_open_provisions_lazily(
    make: Callable[..., S3Provider],
    aws_session: boto3.Session,
    hooks: Hooks,
    moto_server: MotoServer,
    bucket: str,
) -> None:
    async with make(aws_session) as provider:
        journal = await provider.journals.open("j")
        await journal.append(0, b"x")
        await provider.keyspaces.open("k")
        await provider.provision()
    assert _keys(moto_server, bucket) == [Layout("").journal("j").record(0)]
    # Once per provider: HeadBucket (404), CreateBucket; then nothing more.
    assert hooks.count("HeadBucket") == 1
    assert hooks.count("CreateBucket") == 1
    # Path-style addressing with a custom endpoint: the bucket is in the path.
    assert all(url.startswith(f"{moto_server.endpoint}/{bucket}") for _, url in hooks.sent)


async def test_bucket_is_created_in_the_configured_region(
    make: Callable[..., S3Provider],
    aws_session: boto3.Session,
    moto_server: MotoServer,
    bucket: str,
) -> None:
    async with make(aws_session, region="eu-central-1") as provider:
        await provider.provision()
    location = _raw_client(moto_server).get_bucket_location(Bucket=bucket)
    assert location["LocationConstraint"] == "eu-central-1"


async def test_url_with_insecure_host_reaches_the_endpoint_over_http(
    moto_server: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in MotoServer.environ().items():
        monkeypatch.setenv(name, value)
    provider = provider_from_url(f"s3://{moto_server.netloc}/{bucket}?insecure=true&prefix=a")
    async with provider:
        journal = await provider.journals.open("j")
        await journal.append(0, b"over http")
    assert _keys(moto_server, bucket) == [Layout("a/").journal("j").record(0)]


async def test_role_arn_signs_requests_with_credentials_from_sts_assume_role(
    make: Callable[..., S3Provider], aws_session: boto3.Session
) -> None:
    role = "arn:aws:iam::123456789012:role/runkit-writer"
    assumed: list[str] = []
    signers: set[str] = set()

    def on_assume_role(params: dict[str, Any], **_: Any) -> None:
        assumed.append(params["RoleArn"])
        assert params["RoleSessionName"] == "runkit-s3"

    def on_s3_send(request: AWSPreparedRequest, **_: Any) -> None:
        authorization = request.headers["Authorization"]
        if isinstance(authorization, bytes):
            authorization = authorization.decode()
        match = re.search(r"Credential=([^/]+)/", authorization)
        assert match is not None
        signers.add(match.group(1))

    aws_session.events.register("provide-client-params.sts.AssumeRole", on_assume_role)
    aws_session.events.register("before-send.s3", on_s3_send)
    async with make(aws_session, role_arn=role) as provider:
        keyspace = await provider.keyspaces.open("k")
        await keyspace.set(b"k", b"v", "")
        assert await keyspace.get(b"k") == (b"v", (await keyspace.get(b"k"))[1])
    assert assumed == [role]
    assert len(signers) == 1
    (signer,) = signers
    assert signer != "testing"  # not the source credentials
    assert signer.startswith("ASIA")  # temporary credentials from STS


async def test_repr_and_errors_never_show_credentials(
    make: Callable[..., S3Provider], aws_session: boto3.Session
) -> None:
    provider = make(aws_session, bucket="no-such-bucket-for-runkit", prefix="x")
    assert "testing" not in repr(provider)
    await provider.close()
    with pytest.raises(PersistenceError) as info:
        await provider.journals.open("j")
    assert str(info.value) == (
        f"<S3Provider s3://{provider.settings.endpoint_url.removeprefix('http://')}"  # type: ignore[union-attr]
        "/no-such-bucket-for-runkit?insecure=true&prefix=x/> is closed"
    )


# -- limits --------------------------------------------------------------------------------


async def test_inputs_at_the_limits_succeed_and_one_byte_more_fails_before_any_request(
    make: Callable[..., S3Provider], aws_session: boto3.Session, hooks: Hooks
) -> None:
    prefix = "p" * 200
    async with make(aws_session, prefix=prefix) as provider:
        limits = provider.limits
        assert limits.max_key_bytes == (1024 - 201 - 259) // 2
        name = "\U0001f600" * (limits.max_name_bytes // 4)  # 4-byte UTF-8, exactly at the limit
        keyspace = await provider.keyspaces.open(name)
        set_ = await provider.sets.open(name)
        journal = await provider.journals.open(name)

        key = b"\x00\xff" * (limits.max_key_bytes // 2)
        revision = await keyspace.set(key, b"v", "")
        assert await keyspace.get(key) == (b"v", revision)
        assert await set_.try_add(key)
        assert [m async for m in set_.range()] == [key]
        await journal.append(0, b"r" * limits.max_record_bytes)
        assert len(await journal.get(0)) == limits.max_record_bytes
        before = hooks.count()

        with pytest.raises(LimitExceeded) as info:
            await keyspace.set(key + b"k", b"v", "")
        assert str(info.value) == (
            f"key is {limits.max_key_bytes + 1} bytes, over this provider's limit of "
            f"{limits.max_key_bytes} bytes"
        )
        with pytest.raises(LimitExceeded):
            await set_.add(key + b"m")
        with pytest.raises(LimitExceeded):
            await journal.append(1, b"r" * (limits.max_record_bytes + 1))
        with pytest.raises(LimitExceeded):
            await keyspace.set_unconditional(b"k", b"v" * (limits.max_value_bytes + 1))
        with pytest.raises(LimitExceeded) as info:
            await provider.journals.open(name + "x")
        assert str(info.value) == (
            "journal name is 129 bytes, over this provider's limit of 128 bytes"
        )
        assert hooks.count() == before


# -- the journal protocol ------------------------------------------------------------------


async def test_stale_writer_cannot_get_an_invisible_append_acknowledged(
    make: Callable[..., S3Provider],
    shared_session: boto3.Session,
    moto_server: MotoServer,
    bucket: str,
) -> None:
    """Hazard 3 of the Go driver: append into a position compaction deleted."""
    async with make(shared_session) as pa, make(shared_session) as pb:
        a = await pa.journals.open("stream")
        for position in range(5):
            await a.append(position, b"a%d" % position)
        assert await a.bounds() == Interval(0, 5)  # A now caches end = 5

        b = await pb.journals.open("stream")
        acknowledged = {p: b"a%d" % p for p in range(5)}
        for position in range(5, 10):
            await b.append(position, b"b%d" % position)
            acknowledged[position] = b"b%d" % position
        await b.truncate(10)  # everything, and compaction deletes every record object
        assert _keys(moto_server, bucket) == [Layout("").journal("stream").meta]

        with pytest.raises(Conflict) as info:
            await a.append(5, b"stale")
        assert str(info.value) == "journal 'stream': conflict appending at position 5"
        with pytest.raises(Conflict):
            await a.append(9, b"stale")
        with pytest.raises(Conflict):  # cached begin now rejects without a request
            await a.append(0, b"stale")

        await a.append(10, b"a10")
        acknowledged[10] = b"a10"
        for handle in (a, b):
            bounds = await handle.bounds()
            assert bounds == Interval(10, 11)
            assert [r async for r in handle.range(10)] == [(10, b"a10")]
            for position in range(10):
                with pytest.raises(RecordNotFound):
                    await handle.get(position)
        # Every acknowledged append that was not truncated is readable.
        assert {p: acknowledged[p] for p in range(10, 11)} == {10: await b.get(10)}


async def test_append_racing_a_truncation_past_it_is_reported_ambiguous_never_acknowledged(
    make: Callable[..., S3Provider],
    aws_session: boto3.Session,
    shared_session: boto3.Session,
    moto_server: MotoServer,
    bucket: str,
) -> None:
    """B truncates and compacts between A's pre-read and A's PUT: A's write lands in a hole."""
    hooks_a = Hooks(aws_session)
    async with make(aws_session) as pa, make(shared_session) as pb:
        a = await pa.journals.open("stream")
        b = await pb.journals.open("stream")
        for position in range(5):
            await a.append(position, b"a")

        async def overtake() -> None:
            for position in range(5, 10):
                await b.append(position, b"b")
            await b.truncate(10)

        def run_b_first(request: AWSPreparedRequest) -> None:
            anyio.from_thread.run(overtake)

        keys = Layout("").journal("stream")
        hooks_a.on("PutObject", run_b_first, url_contains=keys.record(5)[-16:])

        with pytest.raises(PersistenceError) as info:
            await a.append(5, b"stale")
        assert info.value.ambiguous
        assert not isinstance(info.value, Conflict)
        assert str(info.value) == (
            "journal 'stream': append at position 5 raced a truncation to 10; "
            "the record may have been appended and then truncated"
        )
        assert await a.bounds() == Interval(10, 10)
        with pytest.raises(RecordNotFound):
            await b.get(5)
        assert _keys(moto_server, bucket) == [keys.meta]  # the orphan was removed


async def test_truncate_completes_on_retry_after_compaction_fails(
    make: Callable[..., S3Provider],
    aws_session: boto3.Session,
    hooks: Hooks,
    moto_server: MotoServer,
    bucket: str,
) -> None:
    async with make(aws_session) as provider:
        journal = await provider.journals.open("j")
        for position in range(4):
            await journal.append(position, b"r")
        hooks.on("DeleteObjects", lambda r: _error_response(r, 403, "AccessDenied"))
        with pytest.raises(PersistenceError, match=r"^S3 DeleteObjects .* HTTP 403 AccessDenied"):
            await journal.truncate(3)
        # Already invisible: readers check begin, not the objects.
        assert await journal.bounds() == Interval(3, 4)
        with pytest.raises(RecordNotFound):
            await journal.get(0)
        keys = Layout("").journal("j")
        assert len(_keys(moto_server, bucket, keys.records)) == 4
        await journal.truncate(3)  # a no-op for begin, but it finishes compaction
        assert _keys(moto_server, bucket, keys.records) == [keys.record(3)]


async def test_truncate_past_the_end_raises_value_error(provider: S3Provider) -> None:
    journal = await provider.journals.open("j")
    await journal.append(0, b"r")
    with pytest.raises(ValueError) as info:
        await journal.truncate(3)
    assert str(info.value) == "journal 'j': cannot truncate to position 3, past the end (1)"


async def test_range_prefetches_across_batches_and_stops_at_a_truncation(
    provider: S3Provider, moto_server: MotoServer, bucket: str
) -> None:
    journal = await provider.journals.open("j")
    keys = Layout("").journal("j")
    raw = _raw_client(moto_server)
    for position in range(40):  # written directly: one request each, not an append's three
        raw.put_object(Bucket=bucket, Key=keys.record(position), Body=b"%d" % position)
    # Batches of 1, 2, 4, 8, 16, 32: the end falls inside the last one.
    assert [r async for r in journal.range(1)] == [(p, b"%d" % p) for p in range(1, 40)]

    seen = []

    async def consume() -> None:
        async for position, _ in journal.range(0):
            seen.append(position)
            if position == 2:
                await journal.truncate(20)  # overtakes the iteration

    with pytest.raises(RecordNotFound) as info:
        await consume()
    assert str(info.value) == "journal 'j': no record at position 3"
    assert seen == [0, 1, 2]


# -- conditional-write races and faults ----------------------------------------------------


async def test_http_409_on_conditional_writes_is_a_conflict(
    provider: S3Provider, aws_session: boto3.Session, hooks: Hooks
) -> None:
    journal = await provider.journals.open("j")
    keyspace = await provider.keyspaces.open("k")
    set_ = await provider.sets.open("s")
    conflict = hooks.on(
        "PutObject", lambda r: _error_response(r, 409, "ConditionalRequestConflict"), times=3
    )
    with pytest.raises(Conflict, match=r"conflict appending at position 0$"):
        await journal.append(0, b"r")
    with pytest.raises(Conflict, match=r"at revision ''"):
        await keyspace.set(b"k", b"v", "")
    assert not await set_.try_add(b"m")
    assert conflict == [3]
    assert hooks.count("PutObject") == 3  # never retried
    assert await journal.bounds() == Interval(0, 0)


async def test_http_409_on_the_truncation_metadata_write_is_retried_after_a_reread(
    provider: S3Provider, aws_session: boto3.Session, hooks: Hooks
) -> None:
    journal = await provider.journals.open("j")
    for position in range(3):
        await journal.append(position, b"r")
    calls = hooks.on(
        "PutObject",
        lambda r: _error_response(r, 409, "ConditionalRequestConflict"),
        url_contains="/m",
    )
    await journal.truncate(2)
    assert calls == [1]
    assert await journal.bounds() == Interval(2, 3)


async def test_lost_response_of_a_conditional_write_is_ambiguous_and_not_retried(
    provider: S3Provider, aws_session: boto3.Session, hooks: Hooks
) -> None:
    journal = await provider.journals.open("j")
    await journal.append(0, b"zero")
    before = hooks.count("PutObject")

    def deliver_then_drop(request: AWSPreparedRequest) -> None:
        _send_for_real(request)
        raise ReadTimeoutError(endpoint_url=request.url)

    calls = hooks.on("PutObject", deliver_then_drop)
    with pytest.raises(PersistenceError) as info:
        await journal.append(1, b"ours")
    assert info.value.ambiguous
    assert not info.value.retryable
    assert "outcome unknown (ReadTimeoutError: Read timeout on endpoint URL" in str(info.value)
    assert calls == [1]
    assert hooks.count("PutObject") == before + 1  # botocore did not retry it
    # The caller's recovery: the retry conflicts, and reading back finds our record.
    with pytest.raises(Conflict):
        await journal.append(1, b"ours")
    assert await journal.get(1) == b"ours"


async def test_append_that_cannot_be_confirmed_is_ambiguous(
    provider: S3Provider, hooks: Hooks
) -> None:
    journal = await provider.journals.open("j")
    # The append's second metadata read (the confirmation) fails.
    denied = hooks.on(
        "GetObject", lambda r: _error_response(r, 403, "AccessDenied"), url_contains="/m", skip=1
    )
    with pytest.raises(PersistenceError) as info:
        await journal.append(0, b"r")
    assert info.value.ambiguous
    assert str(info.value).startswith(
        "journal 'j': append at position 0 was written but could not be confirmed (S3 GetObject"
    )
    assert denied == [1]
    assert await journal.get(0) == b"r"  # it was, in fact, appended


async def test_try_remove_falls_back_to_the_real_etag(provider: S3Provider, hooks: Hooks) -> None:
    set_ = await provider.sets.open("s")
    await set_.add(b"m")
    # As if the store's ETag of an empty object were not its MD5 (SSE-KMS).
    refused = hooks.on("DeleteObject", lambda r: _error_response(r, 412, "PreconditionFailed"))
    assert await set_.try_remove(b"m")
    assert refused == [1]
    assert hooks.count("HeadObject") == 1
    assert not await set_.has(b"m")
    assert not await set_.try_remove(b"m")


async def test_server_error_on_a_conditional_write_is_ambiguous_and_not_retried(
    provider: S3Provider, aws_session: boto3.Session, hooks: Hooks
) -> None:
    keyspace = await provider.keyspaces.open("k")
    hooks.on("PutObject", lambda r: _error_response(r, 500, "InternalError"))
    with pytest.raises(PersistenceError) as info:
        await keyspace.set(b"k", b"v", "")
    assert info.value.ambiguous
    assert str(info.value).endswith(
        "outcome unknown (HTTP 500 InternalError); the write may or may not have been applied"
    )
    assert hooks.count("PutObject") == 1


async def test_throttling_is_retried_by_botocore(
    provider: S3Provider, aws_session: boto3.Session, hooks: Hooks
) -> None:
    journal = await provider.journals.open("j")
    keyspace = await provider.keyspaces.open("k")
    throttled = hooks.on("PutObject", lambda r: _error_response(r, 503, "SlowDown"))
    await journal.append(0, b"r")  # a conditional write: safe to retry, it was refused
    assert throttled == [1]
    assert hooks.count("PutObject") == 2
    flaky = hooks.on("GetObject", lambda r: _error_response(r, 500, "InternalError"))
    assert await keyspace.get(b"absent") == (b"", "")  # reads retry server errors too
    assert flaky == [1]
    assert await journal.get(0) == b"r"


# -- layout --------------------------------------------------------------------------------


async def test_revision_is_an_etag_that_changes_even_for_the_same_value(
    provider: S3Provider, moto_server: MotoServer, bucket: str
) -> None:
    keyspace = await provider.keyspaces.open("k")
    first = await keyspace.set(b"k", b"same", "")
    second = await keyspace.set(b"k", b"same", first)
    assert first != second
    head = _raw_client(moto_server).head_object(Bucket=bucket, Key=Layout("").keyspace("k") + "6b")
    assert head["ETag"] == f'"{second}"'
    assert head["ContentLength"] == 1 + 16 + len(b"same")


async def test_prefixes_isolate_providers_sharing_a_bucket(
    make: Callable[..., S3Provider],
    aws_session: boto3.Session,
    moto_server: MotoServer,
    bucket: str,
) -> None:
    async with make(aws_session, prefix="blue") as blue, make(aws_session, prefix="green") as green:
        for p, tag in ((blue, b"blue"), (green, b"green")):
            await (await p.journals.open("j")).append(0, tag)
            await (await p.keyspaces.open("k")).set(b"k", tag, "")
            await (await p.sets.open("s")).add(tag)
        assert await (await green.journals.open("j")).get(0) == b"green"
        assert [m async for m in (await blue.sets.open("s")).range()] == [b"blue"]
    keys = _keys(moto_server, bucket)
    assert len(keys) == 6
    assert all(k.startswith(("blue/", "green/")) for k in keys)


async def test_a_read_only_provider_reports_a_missing_bucket_and_creates_nothing(
    make: Callable[..., S3Provider], shared_session: boto3.Session, moto_server: MotoServer
) -> None:
    from runkit.persistence import StoreUnavailable

    missing = f"runkit-{uuid.uuid4().hex}"
    provider = make(shared_session, bucket=missing)
    provider.set_read_only()
    async with provider:
        with pytest.raises(StoreUnavailable, match=f"bucket '{missing}' does not exist"):
            await provider.keyspaces.open("cluster/nodes")
    buckets = [b["Name"] for b in _raw_client(moto_server).list_buckets()["Buckets"]]
    assert missing not in buckets


async def test_a_write_failing_after_it_may_have_landed_is_ambiguous(
    provider: S3Provider, hooks: Hooks
) -> None:
    # A PUT the server applied before every attempt answered 5xx: the caller
    # must read back (as with the other drivers), not take it as not written.
    keyspace = await provider.keyspaces.open("k")

    def deliver_then_500(request: AWSPreparedRequest) -> AWSResponse:
        _send_for_real(request)
        return _error_response(request, 500, "InternalError")

    hooks.on("PutObject", deliver_then_500, times=20)
    with pytest.raises(PersistenceError) as info:
        await keyspace.set_unconditional(b"k", b"new")
    assert (await keyspace.get(b"k"))[0] == b"new"  # it did take effect
    assert (info.value.ambiguous, info.value.retryable) == (True, True)


# -- review fixes ----------------------------------------------------------------------------


def _failing(request: AWSPreparedRequest) -> AWSResponse:
    return _error_response(request, 500, "InternalError")


@pytest.mark.parametrize(
    "path", ["journal get", "journal bounds", "journal range", "journal append", "keyspace range"]
)
async def test_a_failed_request_among_concurrent_ones_raises_its_persistence_error_itself(
    provider: S3Provider, hooks: Hooks, path: str
) -> None:
    """Every attempt of one GET answers 500 while others run beside it: the caller gets
    that ``PersistenceError``, not an ``ExceptionGroup``."""
    journal = await provider.journals.open("j")
    keyspace = await provider.keyspaces.open("k")
    await journal.append(0, b"r")
    await keyspace.set(b"k", b"v", "")
    keys = Layout("").journal("j")

    async def read_range() -> None:
        async for _ in journal.range(0):
            pass

    async def list_keyspace() -> None:
        async for _ in keyspace.range():
            pass

    calls: dict[str, tuple[str, Callable[[], Awaitable[object]]]] = {
        "journal get": (keys.record(0), lambda: journal.get(0)),
        "journal bounds": (keys.meta, journal.bounds),
        "journal range": (keys.meta, read_range),  # begin, read beside the next batch
        "journal append": (keys.meta, lambda: journal.append(2, b"r")),  # beside HEAD r/1
        "keyspace range": (Layout("").keyspace("k"), list_keyspace),
    }
    failing_key, call = calls[path]
    failed = hooks.on("GetObject", _failing, url_contains=failing_key, times=100)
    with pytest.raises(PersistenceError) as info:
        await call()
    assert info.value.retryable
    assert "failed: HTTP 500 InternalError: injected" in str(info.value)
    assert failed[0] > 1  # botocore retried it first


async def test_get_reads_begin_after_the_record_so_a_recreated_object_is_not_returned(
    make: Callable[..., S3Provider],
    aws_session: boto3.Session,
    shared_session: boto3.Session,
    moto_server: MotoServer,
    bucket: str,
) -> None:
    """While A's ``get(3)`` runs, B truncates past 3 (compaction deletes ``r/3``) and a
    stale writer's PUT re-creates ``r/3`` (its step 3 would delete it again). A must
    not return that record: it was never in the journal at position 3.

    Were begin read beside the record (as it once was), it could predate the
    truncation: the hook holds the record's GET until such a read has been answered.
    """
    keys = Layout("").journal("j")
    begin_read = threading.Event()

    def on_answer(request_dict: dict[str, Any], **_: Any) -> None:
        if request_dict["url"].endswith("/" + keys.meta):
            begin_read.set()

    aws_session.events.register("needs-retry.s3.GetObject", on_answer)
    hooks_a = Hooks(aws_session)
    async with make(aws_session) as pa, make(shared_session) as pb:
        a = await pa.journals.open("j")
        b = await pb.journals.open("j")
        for position in range(5):
            await a.append(position, b"a%d" % position)

        async def overtake() -> None:
            await b.truncate(5)
            _raw_client(moto_server).put_object(Bucket=bucket, Key=keys.record(3), Body=b"stale")

        def overtake_first(request: AWSPreparedRequest) -> None:
            begin_read.wait(0.5)  # only ever set if begin is read beside the record
            anyio.from_thread.run(overtake)

        hooks_a.on("GetObject", overtake_first, url_contains=keys.record(3))
        begin_read.clear()  # the appends read begin too
        with pytest.raises(RecordNotFound):
            await a.get(3)
        assert hooks_a.sent[-2:] == [
            ("GetObject", f"{moto_server.endpoint}/{bucket}/{keys.record(3)}"),
            ("GetObject", f"{moto_server.endpoint}/{bucket}/{keys.meta}"),
        ]


def _body(request: AWSPreparedRequest) -> bytes:
    body = request.body
    assert isinstance(body, io.BytesIO), type(body)
    return body.getvalue()


async def test_set_unconditional_sends_a_new_token_after_a_lost_response_never_the_old_one(
    provider: S3Provider, hooks: Hooks
) -> None:
    """botocore must not resend the PUT: another write may have replaced it meanwhile,
    and the resent token would bring an old revision back. The driver writes anew."""
    keyspace = await provider.keyspaces.open("k")
    bodies: list[bytes] = []

    def deliver_then_drop(request: AWSPreparedRequest) -> None:
        bodies.append(_body(request))
        _send_for_real(request)
        raise ReadTimeoutError(endpoint_url=request.url)

    def record(request: AWSPreparedRequest) -> None:
        bodies.append(_body(request))

    hooks.on("PutObject", deliver_then_drop)
    hooks.on("PutObject", record, times=10)
    revision = await keyspace.set_unconditional(b"k", b"v")
    assert len(bodies) == 2
    assert bodies[0] != bodies[1]  # a new token, so a new ETag: a revision never repeats
    assert bodies[0][17:] == bodies[1][17:] == b"v"
    assert await keyspace.get(b"k") == (b"v", revision)


def _hermetic_aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS settings or credentials from the machine: nothing but what the test sets."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


async def test_a_missing_profile_fails_provisioning_at_once(
    make: Callable[..., S3Provider], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _hermetic_aws_environment(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_PROFILE", "nope")
    async with make(None) as provider:
        with pytest.raises(PersistenceError) as info:
            await provider.provision()
    assert type(info.value) is PersistenceError
    assert not info.value.retryable
    assert str(info.value) == (
        "cannot create the S3 client: The config profile (nope) could not be found"
    )


async def test_missing_credentials_are_not_retryable(
    make: Callable[..., S3Provider],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    bucket: str,
) -> None:
    """Waiting cannot cure them, so the engine's start-up must not wait for them."""
    _hermetic_aws_environment(monkeypatch, tmp_path)
    async with make(boto3.Session(region_name="us-east-1")) as provider:
        with pytest.raises(PersistenceError) as info:
            await provider.provision()
    assert not info.value.retryable
    assert not info.value.ambiguous
    assert str(info.value) == (
        f"S3 HeadBucket/CreateBucket s3://{bucket}/ failed: Unable to locate credentials"
    )


async def test_malformed_metadata_is_reported_as_corrupt(
    provider: S3Provider, moto_server: MotoServer, bucket: str
) -> None:
    journal = await provider.journals.open("j")
    keys = Layout("").journal("j")
    _raw_client(moto_server).put_object(Bucket=bucket, Key=keys.meta, Body=b"{not json")
    for call in (journal.bounds, lambda: journal.truncate(0)):
        with pytest.raises(PersistenceError) as info:
            await call()
        assert str(info.value).startswith(
            f"journal 'j': corrupt metadata object '{keys.meta}': JSON is malformed"
        )
