"""Fixtures for the S3 driver's tests: one moto server per session, one bucket per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import boto3
import pytest

from runkit.testing.moto import MotoServer


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """A serialized moto server for the whole session, SIGKILLed at the end."""
    with MotoServer() as server:
        yield server


def moto_session(moto: MotoServer) -> boto3.Session:
    """A new boto3 session with moto's fake credentials (never the environment's)."""
    kwargs = moto.client_kwargs()
    return boto3.Session(
        aws_access_key_id=kwargs["aws_access_key_id"],
        aws_secret_access_key=kwargs["aws_secret_access_key"],
        aws_session_token=kwargs["aws_session_token"],
        region_name=kwargs["region_name"],
    )


@pytest.fixture
def aws_session(moto_server: MotoServer) -> boto3.Session:
    """A session of this test's own, so event hooks it installs stay in the test."""
    return moto_session(moto_server)


@pytest.fixture(scope="session")
def shared_session(moto_server: MotoServer) -> boto3.Session:
    """One session for tests that install no hooks (loading a session's models costs ~0.3 s)."""
    return moto_session(moto_server)


@pytest.fixture
def bucket() -> str:
    """A bucket name no other test uses (the provider creates it)."""
    return f"runkit-{uuid.uuid4().hex}"
