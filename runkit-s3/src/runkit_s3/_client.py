"""boto3 plumbing: the client, its retry policy, and S3 calls run in worker threads.

boto3 is synchronous, so every call runs through ``anyio.to_thread.run_sync``
with a per-provider ``CapacityLimiter`` (which also sizes the HTTP pool). The
async methods of ``S3Objects`` (and ``gather`` of them) return plain results
and raise only:

- ``ConditionFailed`` for HTTP 412 ``PreconditionFailed`` and HTTP 409
  ``ConditionalRequestConflict`` (AWS's answer when conditional writes race;
  the losing write was not applied, exactly like a 412);
- ``PersistenceError`` for everything else, with ``retryable`` and
  ``ambiguous`` set.

Retries: botocore's *standard* mode retries throttling (503 ``SlowDown``),
5xx and connection errors, which is right for reads and idempotent writes. A
*conditional* write whose request may have reached S3 (a dropped connection, a
read timeout, a 5xx other than throttling) must not be retried: if the first
attempt succeeded, the retry would fail its condition and we would report a
conflict for a write that happened. ``_veto_ambiguous_retry`` runs before
botocore's retry handler and turns those cases into an ambiguous error instead.
The same goes for a write that must land at most once though it has no condition
(``put(..., once=True)``: a keyspace value's fresh token, whose ETag is the
revision); ``put_new`` sends a new body instead of resending the old one.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio
import anyio.to_thread
import attrs
import boto3
import botocore.session
from botocore.config import Config
from botocore.credentials import (
    AssumeRoleCredentialFetcher,
    CredentialProvider,
    CredentialResolver,
    Credentials,
    DeferredRefreshableCredentials,
)
from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    ProxyConnectionError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from runkit.persistence import PersistenceError, StoreUnavailable

from ._settings import S3Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["ConditionFailed", "S3Objects", "create_client", "gather"]

T = TypeVar("T")

#: Region used with a custom endpoint when none is configured anywhere.
_DEFAULT_CUSTOM_REGION: Final = "us-east-1"
_MAX_ATTEMPTS: Final = 5
#: Seconds to connect and to wait for each read of a response (see ``_create_client``).
_CONNECT_TIMEOUT: Final = 5
_READ_TIMEOUT: Final = 30
_DELETE_BATCH: Final = 1000  # DeleteObjects' limit
# Error codes botocore's standard mode treats as throttling: never applied.
_THROTTLING: Final = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "ServiceUnavailable",
    }
)
# Exceptions raised before the request left this process: safe to retry.
_NOT_SENT: Final = (EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError)
# Transport faults, which may pass: the connection, or a body cut short or garbled in
# transit. Any other BotoCoreError (no credentials, a bad profile) needs a person.
_TRANSIENT: Final = (BotoConnectionError, HTTPClientError, IncompleteReadError, ChecksumError)
_MISSING_CODES: Final = frozenset({"NoSuchKey", "404", "NotFound"})
#: The calls that change the bucket: a transport error or a 5xx may hide their effect.
_WRITES: Final = frozenset({"PutObject", "DeleteObject", "DeleteObjects"})


class ConditionFailed(Exception):
    """A conditional request's precondition failed (HTTP 412 or 409); nothing was written.

    ``missing`` is true when the condition was ``If-Match`` and the object does
    not exist (HTTP 404).
    """

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status

    @property
    def missing(self) -> bool:
        """The condition was ``If-Match`` and the object does not exist (HTTP 404)."""
        return self.status == 404

    @property
    def exists(self) -> bool:
        """The condition failed because of the object's state (HTTP 412), not a race (409)."""
        return self.status == 412


async def gather(*calls: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Run *calls* concurrently and return their results in order.

    The first failure cancels the others and is raised itself, not in an
    ``ExceptionGroup``, so callers see the ``PersistenceError`` the contract promises.
    """
    results: list[Any] = [None] * len(calls)
    errors: list[Exception] = []

    async def run(index: int, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            results[index] = await call()
        except Exception as exc:  # re-raised below, unwrapped
            errors.append(exc)
            tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for index, call in enumerate(calls):
            tg.start_soon(run, index, call)
    if errors:
        raise errors[0]
    return results


# True while a worker thread sends a write that must go out at most once (see ``put``).
_ONCE: ContextVar[bool] = ContextVar("runkit_s3_once", default=False)


class _AmbiguousWrite(Exception):
    """A write that must not be resent may or may not have been applied (raised inside botocore)."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


def _veto_ambiguous_retry(
    response: tuple[Any, dict[str, Any]] | None,
    caught_exception: BaseException | None,
    request_dict: dict[str, Any],
    **_: Any,
) -> None:
    """``needs-retry`` hook: stop botocore resending a write of unknown outcome.

    That is a conditional write, or one sent with ``once``. Returning ``None``
    leaves the decision to the standard handler; raising ends the call with
    ``_AmbiguousWrite``.
    """
    headers = request_dict.get("headers") or {}
    if request_dict.get("method") not in {"PUT", "DELETE"} or not (
        "If-Match" in headers or "If-None-Match" in headers or _ONCE.get()
    ):
        return
    if caught_exception is not None:
        if isinstance(caught_exception, _NOT_SENT):
            return
        raise _AmbiguousWrite(f"{type(caught_exception).__name__}: {caught_exception}")
    if response is not None:
        http, parsed = response
        status = getattr(http, "status_code", 0)
        code = parsed.get("Error", {}).get("Code", "")
        if status >= 500 and code not in _THROTTLING:
            raise _AmbiguousWrite(f"HTTP {status} {code}".rstrip())


class _FixedCredentialProvider(CredentialProvider):
    METHOD = "runkit-s3-assume-role"
    CANONICAL_NAME = "runkit-s3-assume-role"

    def __init__(self, credentials: Credentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> Credentials:
        return self._credentials


# boto3 sessions are not thread-safe; providers sharing one create clients in turn.
_creating = threading.Lock()


def create_client(settings: S3Settings, session: boto3.Session | None, pool: int) -> S3Client:
    """Build the S3 client (blocking: run it in a worker thread).

    With ``role_arn``, the source credentials come from *session* (or the
    default chain) and the client signs with credentials from STS
    ``AssumeRole``, refreshed before they expire. STS goes to the custom
    endpoint if there is one (S3-compatible stores and emulators serve it
    there), otherwise to AWS.
    """
    try:
        with _creating:
            return _create_client(
                settings, session if session is not None else boto3.Session(), pool
            )
    except BotoCoreError as exc:
        # A bad profile, unreadable configuration, ...: waiting cures none of them.
        # botocore's messages name the setting at fault, never a secret.
        raise PersistenceError(f"cannot create the S3 client: {exc}") from None


def _create_client(settings: S3Settings, session: boto3.Session, pool: int) -> S3Client:
    # (boto3's stubs say str, but region_name is None when nothing configures one.)
    region: str | None = settings.region or session.region_name or None
    if region is None and settings.endpoint_url is not None:
        region = _DEFAULT_CUSTOM_REGION
    config = Config(
        retries={"mode": "standard", "max_attempts": _MAX_ATTEMPTS},
        max_pool_connections=pool,
        # A request in flight is not interrupted by cancellation (it finishes in
        # its worker thread, which keeps the thread bound and the pool sound), so
        # these bound how long a cancelled caller can wait: botocore's default is
        # 60 s for each.
        connect_timeout=_CONNECT_TIMEOUT,
        read_timeout=_READ_TIMEOUT,
        s3={"addressing_style": "path"} if settings.endpoint_url else None,
        user_agent_extra="runkit-s3",
    )
    if settings.role_arn is not None:
        source = session.get_credentials()
        if source is None:
            raise PersistenceError(
                f"cannot assume role {settings.role_arn!r}: no source AWS credentials found"
            )
        sts_config = Config(
            retries={"mode": "standard", "max_attempts": _MAX_ATTEMPTS},
            connect_timeout=_CONNECT_TIMEOUT,
            read_timeout=_READ_TIMEOUT,
        )

        def sts_creator(service: str, **kwargs: Any) -> Any:
            # Called on first use and on every refresh, from whichever worker
            # thread needs credentials: take the session lock like any creation.
            with _creating:
                return session.client(
                    service,  # type: ignore[call-overload]
                    region_name=region,
                    endpoint_url=settings.endpoint_url,
                    config=sts_config,
                    **kwargs,
                )

        fetcher = AssumeRoleCredentialFetcher(
            client_creator=sts_creator,
            source_credentials=source,
            role_arn=settings.role_arn,
            extra_args={"RoleSessionName": "runkit-s3"},
        )
        assumed = DeferredRefreshableCredentials(
            refresh_using=fetcher.fetch_credentials, method="assume-role"
        )
        # A private botocore session whose only credential source is the role;
        # it shares the caller's event emitter so their hooks still apply.
        role_session = botocore.session.Session()
        role_session.register_component("event_emitter", session.events)
        role_session.register_component(
            "credential_provider", CredentialResolver([_FixedCredentialProvider(assumed)])
        )
        create: Callable[..., Any] = role_session.create_client
    else:
        create = session.client
    client: S3Client = create(
        "s3", region_name=region, endpoint_url=settings.endpoint_url, config=config
    )
    client.meta.events.register_first("needs-retry.s3", _veto_ambiguous_retry)
    return client


@attrs.frozen
class Blob:
    """An object's body and ETag (without quotes)."""

    body: bytes
    etag: str


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _etag(value: str) -> str:
    return value.strip('"')


class S3Objects:
    """Async access to the objects of one bucket (every call in a worker thread)."""

    def __init__(self, client: S3Client, bucket: str, limiter: anyio.CapacityLimiter) -> None:
        self.client = client
        self.bucket = bucket
        self._limiter = limiter

    async def _run(self, op: str, key: str, fn: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(
            functools.partial(self._guard, op, key, fn), limiter=self._limiter
        )

    def _guard(self, op: str, key: str, fn: Callable[[], T]) -> T:
        where = f"s3://{self.bucket}/{key}"
        try:
            return fn()
        except ConditionFailed:
            raise
        except _AmbiguousWrite as exc:
            raise PersistenceError(
                f"S3 {op} {where}: outcome unknown ({exc.cause}); the write may or may not "
                "have been applied",
                ambiguous=True,
            ) from None
        except ClientError as exc:
            code, status = _code(exc), _status(exc)
            message = exc.response.get("Error", {}).get("Message", "")
            if code == "NoSuchBucket":
                text = f"S3 {op} {where}: bucket {self.bucket!r} does not exist"
            else:
                text = f"S3 {op} {where} failed: HTTP {status} {code}: {message}".rstrip(": ")
            retryable = status >= 500 or status in {408, 429} or code in _THROTTLING
            # A write the server may have applied before failing (or timing out).
            ambiguous = op in _WRITES and (status >= 500 or status == 408)
            raise PersistenceError(text, retryable=retryable, ambiguous=ambiguous) from None
        except _TRANSIENT as exc:
            raise PersistenceError(
                f"S3 {op} {where} failed: {exc}",
                retryable=True,
                ambiguous=op in _WRITES and not isinstance(exc, _NOT_SENT),
            ) from None
        except BotoCoreError as exc:
            # Raised before sending (no credentials, ...): retrying cannot help.
            raise PersistenceError(f"S3 {op} {where} failed: {exc}") from None

    # -- reads ------------------------------------------------------------------

    async def get(self, key: str) -> Blob | None:
        """Return the object's body and ETag, or ``None`` if it does not exist."""

        def call() -> Blob | None:
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _code(exc) in _MISSING_CODES:
                    return None
                raise
            with response["Body"] as body:
                return Blob(body.read(), _etag(response["ETag"]))

        return await self._run("GetObject", key, call)

    async def get_many(self, keys: list[str]) -> list[Blob | None]:
        """GET the objects concurrently (bounded by the limiter); ``None`` where absent."""
        return await gather(*(functools.partial(self.get, key) for key in keys))

    async def head(self, key: str) -> str | None:
        """Return the object's ETag, or ``None`` if it does not exist."""

        def call() -> str | None:
            try:
                response = self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _code(exc) in _MISSING_CODES:
                    return None
                raise
            return _etag(response["ETag"])

        return await self._run("HeadObject", key, call)

    async def list(
        self, prefix: str, *, start_after: str | None = None, token: str | None = None
    ) -> tuple[list[str], str | None]:
        """Return one page of keys under *prefix* (ascending) and the next page's token."""

        def call() -> tuple[list[str], str | None]:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token is not None:
                kwargs["ContinuationToken"] = token
            elif start_after is not None:
                kwargs["StartAfter"] = start_after
            response = self.client.list_objects_v2(**kwargs)
            keys = [o["Key"] for o in response.get("Contents", [])]
            return keys, response.get("NextContinuationToken")

        return await self._run("ListObjectsV2", prefix, call)

    # -- writes -----------------------------------------------------------------

    async def put(
        self,
        key: str,
        body: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        once: bool = False,
    ) -> str:
        """Write the object and return its new ETag.

        With a condition, raises ``ConditionFailed`` on 412/409, and also on 404
        for ``if_match`` (the object is gone, so the ETag cannot match). With
        *once* (or a condition), a request that may have reached S3 is not sent
        again: its failure is an ambiguous ``PersistenceError``.
        """

        def call() -> str:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": body}
            if if_none_match:
                kwargs["IfNoneMatch"] = "*"
            if if_match is not None:
                kwargs["IfMatch"] = f'"{if_match}"'
            token = _ONCE.set(once)  # read by _veto_ambiguous_retry, in this thread
            try:
                response = self.client.put_object(**kwargs)
            except ClientError as exc:
                conditional = if_none_match or if_match is not None
                if conditional and _status(exc) in {409, 412}:
                    raise ConditionFailed(_status(exc)) from None
                if if_match is not None and _code(exc) in _MISSING_CODES:
                    raise ConditionFailed(404) from None
                raise
            finally:
                _ONCE.reset(token)
            return _etag(response["ETag"])

        return await self._run("PutObject", key, call)

    async def put_new(self, key: str, body: Callable[[], bytes]) -> str:
        """Write ``body()`` unconditionally and return its ETag; a new body per attempt.

        For a body that must never be written twice (a keyspace value's token: the
        ETag is its revision, and resending it after a lost response could write an
        old revision over a newer one). botocore never resends an attempt that may
        have reached S3 (``once``); this sends a new body instead, up to
        ``_MAX_ATTEMPTS`` in all, then raises the ambiguous error.
        """
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                return await self.put(key, body(), once=True)
            except PersistenceError as exc:
                # Only the veto's error (ambiguous, not retried by botocore) calls
                # for another attempt; botocore spent its own on the others.
                if not exc.ambiguous or exc.retryable:
                    raise
                if attempt == _MAX_ATTEMPTS:
                    # Calling again, with a new body, is as safe as these attempts were.
                    raise PersistenceError(str(exc), retryable=True, ambiguous=True) from None
            await anyio.sleep(min(1.0, 0.05 * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Delete the object (absent is fine unless conditional).

        With ``if_match``, raises ``ConditionFailed`` if the ETag differs (412),
        a conditional write raced (409), or the object is absent (404).
        """

        def call() -> None:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
            if if_match is not None:
                kwargs["IfMatch"] = f'"{if_match}"'
            try:
                self.client.delete_object(**kwargs)
            except ClientError as exc:
                if if_match is not None and _status(exc) in {409, 412}:
                    raise ConditionFailed(_status(exc)) from None
                if if_match is not None and _code(exc) in _MISSING_CODES:
                    raise ConditionFailed(404) from None
                raise

        await self._run("DeleteObject", key, call)

    async def delete_many(self, keys: Iterable[str]) -> None:
        """Delete the objects (absent ones are fine), up to 1,000 per request."""
        batch = list(keys)
        for start in range(0, len(batch), _DELETE_BATCH):
            chunk = batch[start : start + _DELETE_BATCH]

            def call(chunk: list[str] = chunk) -> None:
                response = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True},
                )
                if errors := response.get("Errors"):
                    first = errors[0]
                    raise PersistenceError(
                        f"S3 DeleteObjects s3://{self.bucket}/{first.get('Key')} failed: "
                        f"{first.get('Code')}: {first.get('Message')} "
                        f"({len(errors)} of {len(chunk)} keys not deleted)",
                        retryable=True,
                    )

            await self._run("DeleteObjects", chunk[0], call)


class BucketProvisioner:
    """Creates the bucket once per provider; blocking, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False

    def ensure(self, client: S3Client, bucket: str, *, create: bool = True) -> None:
        """Create *bucket* unless it exists; concurrent creators are fine.

        With *create* false (a read-only provider) a missing bucket raises
        ``StoreUnavailable`` instead.
        """
        with self._lock:
            if self._done:
                return
            try:
                client.head_bucket(Bucket=bucket)
            except ClientError as exc:
                if _status(exc) != 404:
                    raise
                if not create:
                    raise StoreUnavailable(
                        f"bucket {bucket!r} does not exist; check the bucket in the persistence "
                        "URL (read-only commands never create it)",
                        retryable=False,
                    ) from None
                self._create(client, bucket)
            self._done = True

    @staticmethod
    def _create(client: S3Client, bucket: str) -> None:
        region = client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            client.create_bucket(**kwargs)
        except ClientError as exc:
            # Another provider (or process) won the race: the bucket is ours.
            if _code(exc) != "BucketAlreadyOwnedByYou":
                raise
