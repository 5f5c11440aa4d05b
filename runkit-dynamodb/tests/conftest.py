"""Fixtures for the DynamoDB driver tests: one moto server per session, one table prefix per test.

Every test gets fake credentials and a hermetic AWS configuration (no profile
or config files from the machine), so nothing can reach real AWS.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.compat import HTTPHeaders
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError
from botocore.httpsession import URLLib3Session

from runkit.testing.moto import MotoServer
from runkit_dynamodb import DynamoDBProvider


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    """A serialized moto server for the whole session, killed (SIGKILL) at the end."""
    with MotoServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("AWS_ENDPOINT_URL_"):
            monkeypatch.delenv(name)
    for name, value in MotoServer.environ().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def prefix() -> str:
    """A table prefix no other test uses."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def url(moto: MotoServer, prefix: str) -> str:
    """A ``dynamodb://`` URL for this test's prefix on the moto server."""
    return f"dynamodb://{moto.netloc}/{prefix}?insecure=true&region=us-east-1"


class Requests:
    """Counts the DynamoDB API calls (not retries) and attempts made through a session."""

    def __init__(self, session: boto3.session.Session) -> None:
        self.calls: Counter[str] = Counter()
        self.attempts: Counter[str] = Counter()
        session.events.register("before-call.dynamodb", self._call)
        session.events.register("before-send.dynamodb", self._send)

    def _call(self, event_name: str, **_: Any) -> None:
        self.calls[event_name.rsplit(".", 1)[-1]] += 1

    def _send(self, request: Any, **_: Any) -> None:
        target = request.headers.get("X-Amz-Target", b"")
        if isinstance(target, bytes):
            target = target.decode()
        self.attempts[target.rsplit(".", 1)[-1]] += 1

    def reset(self) -> None:
        self.calls.clear()
        self.attempts.clear()

    def take(self) -> dict[str, int]:
        """Return the calls counted since the last ``take``/``reset`` and reset."""
        calls = dict(self.calls)
        self.reset()
        return calls


def operation(request: AWSPreparedRequest) -> str:
    target = request.headers.get("X-Amz-Target", b"")
    text = target.decode() if isinstance(target, bytes) else target
    return text.rsplit(".", 1)[-1]


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Any:
        yield self._body


def error_response(request: AWSPreparedRequest, status: int, code: str) -> AWSResponse:
    """A DynamoDB JSON error response, as if the service had sent it."""
    body = json.dumps({"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": code})
    headers = HTTPHeaders()
    headers["Content-Type"] = "application/x-amz-json-1.0"
    headers["x-amzn-RequestId"] = "injected"
    return AWSResponse(request.url, status, headers, _Raw(body.encode()))


class Injector:
    """A ``before-send`` hook that fails chosen attempts of chosen operations.

    ``plan[op]`` is a list of actions for that operation's next attempts: ``"lost"``
    sends the request for real, then raises a read timeout (the write landed but
    the response was lost); ``"refused"`` raises a connection error without
    sending; ``"throttle"``, ``"invalid"`` and ``"500"`` answer with that error
    instead of sending.
    """

    def __init__(self, session: boto3.session.Session) -> None:
        self.plan: dict[str, list[str]] = {}
        self.sent: list[str] = []
        self._http = URLLib3Session()
        hook: Any = self._before_send  # returns a response, which the stubs do not allow
        session.events.register_first("before-send.dynamodb", hook)

    def _before_send(self, request: AWSPreparedRequest, **_: Any) -> AWSResponse | None:
        op = operation(request)
        self.sent.append(op)
        actions = self.plan.get(op)
        if not actions:
            return None
        action = actions.pop(0)
        if action == "lost":
            self._http.send(request)
            raise ReadTimeoutError(endpoint_url=request.url, error="injected")
        if action == "refused":
            raise EndpointConnectionError(endpoint_url=request.url)
        if action == "throttle":
            return error_response(request, 400, "ThrottlingException")
        if action == "invalid":
            return error_response(request, 400, "ValidationException")
        if action == "500":
            return error_response(request, 500, "InternalServerError")
        raise AssertionError(action)


@pytest.fixture
def inject(session: boto3.session.Session) -> Injector:
    """Fails chosen requests of providers built from ``session`` (see ``Injector``)."""
    return Injector(session)


@pytest.fixture
def session() -> boto3.session.Session:
    """A boto3 session tests can hook (events) before a provider builds its client from it."""
    return boto3.session.Session()


@pytest.fixture
def requests(session: boto3.session.Session) -> Requests:
    """Counts the requests of providers built from ``session``."""
    return Requests(session)


@pytest.fixture
async def provider(
    url: str, session: boto3.session.Session, requests: Requests, inject: Injector
) -> AsyncIterator[DynamoDBProvider]:
    """A provisioned provider on this test's prefix, built from the hooked ``session``.

    Hooks must be registered on a session before a client is created from it.
    """
    p = DynamoDBProvider.from_url(url, session=session)
    await p.provision()
    requests.reset()
    inject.sent.clear()
    yield p
    await p.close()


@pytest.fixture
def raw(moto: MotoServer) -> Iterator[Any]:
    """A plain boto3 DynamoDB client on the moto server, for looking behind the driver."""
    kwargs: Any = moto.client_kwargs()
    client = boto3.client("dynamodb", **kwargs)
    yield client
    client.close()
