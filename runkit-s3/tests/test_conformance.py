"""The runkit persistence conformance suite against S3 (moto in server mode)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import ClassVar

import boto3
import hypothesis
import pytest

from runkit.persistence import Provider
from runkit.testing import ConformanceSuite
from runkit.testing.moto import MotoServer
from runkit_s3 import S3Provider

pytestmark = pytest.mark.s3


class TestS3(ConformanceSuite):
    """Every contract test, each on a fresh bucket."""

    # moto serves a few hundred requests a second and an append costs three:
    # keep the state machines small.
    hypothesis_settings: ClassVar[hypothesis.settings] = hypothesis.settings(
        max_examples=6,
        stateful_step_count=12,
        deadline=None,
        suppress_health_check=[hypothesis.HealthCheck.too_slow],
    )
    # Limits are 4 MiB; writing inputs at that edge is cheap enough.

    @pytest.fixture
    def make_provider(
        self, moto_server: MotoServer, shared_session: boto3.Session, bucket: str
    ) -> Callable[[], Provider]:
        def make() -> Provider:
            return S3Provider(bucket, endpoint_url=moto_server.endpoint, session=shared_session)

        return make

    @pytest.fixture
    async def provider(self, make_provider: Callable[[], Provider]) -> AsyncIterator[Provider]:
        provider = make_provider()
        try:
            yield provider
        finally:
            await provider.close()
