"""boto3 plumbing: building clients, assuming roles, and classifying failures.

Retries are botocore's ("standard" mode): throttling, 5xx and transport errors
are retried with backoff. One exception: a *conditional* write whose request
may have reached DynamoDB (a read timeout, a dropped connection, a 5xx) is not
retried, because a retry of a write that did land fails its condition and would
be reported as a conflict. ``install_ambiguity_guard`` vetoes those retries and
the driver raises ``PersistenceError(ambiguous=True)`` instead. The same goes for
a write made through ``once``: its item holds a fresh revision, and resending it
could write a revision that another write had replaced meanwhile.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, TypeVar

import boto3
import botocore.exceptions
import botocore.session
from botocore.config import Config
from botocore.credentials import (
    AssumeRoleCredentialFetcher,
    CredentialProvider,
    CredentialResolver,
    Credentials,
    DeferredRefreshableCredentials,
)

from runkit.persistence import PersistenceError

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient
    from mypy_boto3_sts.client import STSClient

__all__ = [
    "AmbiguousWrite",
    "assumed_role_session",
    "create_client",
    "default_config",
    "install_ambiguity_guard",
    "map_error",
    "once",
]

T = TypeVar("T")

#: Total attempts (first try included) for throttled or transiently failed requests.
MAX_ATTEMPTS: Final = 10

# DynamoDB error codes meaning "try again later" once botocore's retries ran out.
_RETRYABLE_CODES: Final = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "InternalServerError",
        "ServiceUnavailable",
        "LimitExceededException",
        "TransactionInProgressException",
    }
)

_GUARDED_OPERATIONS: Final = ("PutItem", "UpdateItem", "DeleteItem")

# Transport failures that happen before any byte of the request is sent.
_UNSENT: Final = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ProxyConnectionError,
)


class AmbiguousWrite(Exception):
    """A conditional (or ``once``) write failed after its request may have reached DynamoDB."""

    def __init__(self, operation: str, cause: str) -> None:
        super().__init__(f"{operation}: {cause}")
        self.operation = operation
        self.cause = cause


def default_config(max_pool_connections: int) -> Config:
    """The client configuration the driver uses unless the caller merges in its own."""
    return Config(
        retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
        max_pool_connections=max_pool_connections,
        connect_timeout=5,
        read_timeout=30,
        user_agent_extra="runkit-dynamodb",
    )


# True while a worker thread makes a call wrapped by ``once``.
_ONCE: ContextVar[bool] = ContextVar("runkit_dynamodb_once", default=False)


def once(call: Callable[[DynamoDBClient], T]) -> Callable[[DynamoDBClient], T]:
    """*call*, whose write botocore must not resend once it may have reached DynamoDB.

    For a write that must not land twice though it has no condition (a fresh
    revision): the ambiguity guard treats it as a conditional one.
    """

    def run(client: DynamoDBClient) -> T:
        token = _ONCE.set(True)  # read by the guard, in this thread, during the call
        try:
            return call(client)
        finally:
            _ONCE.reset(token)

    return run


def _has_condition(request_dict: dict[str, Any]) -> bool:
    body = request_dict.get("body")
    if not body:
        return False
    try:
        return "ConditionExpression" in json.loads(body)
    except (ValueError, TypeError):
        return True  # unreadable: assume the worst


def _veto_ambiguous_retry(
    request_dict: dict[str, Any],
    response: tuple[Any, dict[str, Any]] | None,
    caught_exception: BaseException | None,
    operation: Any,
    **_: Any,
) -> None:
    """``needs-retry`` hook: stop botocore resending a write that may have landed.

    That is a conditional write, or one made through ``once``.

    Failures to connect (refused, DNS, connect timeout, proxy) never sent the
    request, so botocore may retry them. Anything else that is not a response
    (including TLS errors, which can also strike mid-response), and any 5xx
    response, leaves the outcome unknown.
    """
    if caught_exception is not None:
        if isinstance(caught_exception, _UNSENT):
            return
        cause = f"{type(caught_exception).__name__}: {caught_exception}"
    elif response is not None and response[0].status_code >= 500:
        code = response[1].get("Error", {}).get("Code", "")
        cause = f"HTTP {response[0].status_code} {code}".rstrip()
    else:
        return
    if _ONCE.get() or _has_condition(request_dict):
        # Raising from the hook ends the attempt loop: this reaches the caller.
        raise AmbiguousWrite(operation.name, cause)


def install_ambiguity_guard(client: DynamoDBClient) -> None:
    """Register the retry veto on *client* (idempotent: registered under a unique id)."""
    for operation in _GUARDED_OPERATIONS:
        client.meta.events.register_first(
            f"needs-retry.dynamodb.{operation}",
            _veto_ambiguous_retry,
            unique_id=f"runkit-dynamodb-ambiguity-guard-{operation}",
        )


class _FixedCredentialProvider(CredentialProvider):
    METHOD = "runkit-assume-role"
    CANONICAL_NAME = "custom-runkit-assume-role"

    def __init__(self, credentials: Credentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> Credentials:
        return self._credentials


def assumed_role_session(
    source: boto3.session.Session, role_arn: str, region: str | None, config: Config
) -> boto3.session.Session:
    """A session whose credentials come from assuming *role_arn* with *source*'s credentials.

    The credentials are fetched on first use and refreshed by botocore before
    they expire. The STS client uses *region* and the standard endpoint
    resolution (so ``AWS_ENDPOINT_URL_STS`` points it at an emulator).
    """
    source_credentials = source.get_credentials()
    if source_credentials is None:
        raise botocore.exceptions.NoCredentialsError()

    def create_sts_client(service_name: str, **kwargs: Any) -> STSClient:
        assert service_name == "sts"
        return source.client("sts", region_name=region, config=config, **kwargs)

    fetcher = AssumeRoleCredentialFetcher(
        client_creator=create_sts_client,
        source_credentials=source_credentials,
        role_arn=role_arn,
        extra_args={"RoleSessionName": "runkit-dynamodb"},
    )
    credentials = DeferredRefreshableCredentials(
        refresh_using=fetcher.fetch_credentials, method=_FixedCredentialProvider.METHOD
    )
    # Share the source session's event hooks (already holding botocore's built-in
    # handlers), so hooks a caller registered on its session still apply.
    core = botocore.session.Session(event_hooks=source.events, include_builtin_handlers=False)
    core.register_component(
        "credential_provider", CredentialResolver([_FixedCredentialProvider(credentials)])
    )
    return boto3.session.Session(botocore_session=core, region_name=region)


# boto3 sessions are not thread-safe, and a fresh one re-reads botocore's models
# (about half a second of CPU): providers without a session share one, and every
# client is created under this lock.
_session_lock = threading.Lock()
_default_session: boto3.session.Session | None = None


def create_client(
    session: boto3.session.Session | None,
    region: str | None,
    endpoint_url: str | None,
    role_arn: str | None,
    config: Config,
) -> DynamoDBClient:
    """Create a DynamoDB client (with the ambiguity guard) from *session* or the shared one.

    Blocking: reads configuration and models; call it from a worker thread.
    """
    global _default_session  # noqa: PLW0603 - one lazily created session per process
    with _session_lock:
        if session is None:
            if _default_session is None:
                _default_session = boto3.session.Session()
            session = _default_session
        region = region or session.region_name
        if role_arn is not None:
            session = assumed_role_session(session, role_arn, region, config)
        client = session.client(
            "dynamodb", region_name=region, endpoint_url=endpoint_url, config=config
        )
    install_ambiguity_guard(client)
    return client


def map_error(exc: Exception, what: str, operation: str, *, write: bool) -> PersistenceError:
    """Translate a boto3/botocore failure of *operation* into a ``PersistenceError``.

    *what* names the store (``journal 'orders'``). Messages carry AWS's error
    code and message, which never contain credentials.
    """
    if isinstance(exc, AmbiguousWrite):
        return PersistenceError(
            f"{what}: {exc.operation} may or may not have taken effect ({exc.cause}); "
            "read back to find out",
            ambiguous=True,
        )
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "Unknown")
        message = error.get("Message", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        retryable = code in _RETRYABLE_CODES or status >= 500
        return PersistenceError(
            f"{what}: DynamoDB {operation} failed: {code}: {message}",
            retryable=retryable,
            # A write that failed with a 5xx may still have been applied.
            ambiguous=write and status >= 500,
        )
    if isinstance(exc, botocore.exceptions.ConnectionError):
        return PersistenceError(
            f"{what}: cannot reach DynamoDB for {operation}: {exc}",
            retryable=True,
            ambiguous=write and not isinstance(exc, _UNSENT),
        )
    if isinstance(exc, botocore.exceptions.HTTPClientError):
        return PersistenceError(
            f"{what}: DynamoDB {operation} failed in transit: {exc}",
            retryable=True,
            ambiguous=write,
        )
    if isinstance(exc, botocore.exceptions.NoRegionError):
        return PersistenceError(
            f"{what}: no AWS region configured: add '?region=...' to the dynamodb URL, "
            "pass region=..., or set AWS_REGION"
        )
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return PersistenceError(f"{what}: DynamoDB {operation} failed: {exc}")
    return PersistenceError(f"{what}: DynamoDB {operation} failed: {type(exc).__name__}: {exc}")


def error_code(exc: BaseException) -> str | None:
    """The AWS error code of a ``ClientError``, else ``None``."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code")
        return code if isinstance(code, str) else None
    return None


ClientCall = Callable[["DynamoDBClient"], Any]
