"""The S3 provider: journals, keyspaces and sets in one bucket, under a key prefix."""

from __future__ import annotations

import threading
from typing import Final

import anyio
import anyio.to_thread
import boto3

from runkit.persistence import (
    Journal,
    JournalStore,
    Keyspace,
    KeyspaceStore,
    Limits,
    PersistenceError,
    Provider,
    Set,
    SetStore,
)

from ._client import BucketProvisioner, S3Objects, create_client
from ._journal import JournalState, S3Journal
from ._keyspace import S3Keyspace, S3Set
from ._layout import Layout, limits_for
from ._settings import S3Settings, parse_url

__all__ = ["S3Provider"]

#: Default bound on concurrent S3 requests (worker threads and pooled connections).
DEFAULT_MAX_CONCURRENCY: Final = 16


class _JournalStore(JournalStore):
    def __init__(self, provider: S3Provider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Journal:
        p = self._provider
        name = p.limits.check_name("journal", name)
        await p._ready()
        return S3Journal(p, name, p._layout.journal(name), p._journal_state(name))


class _KeyspaceStore(KeyspaceStore):
    def __init__(self, provider: S3Provider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Keyspace:
        p = self._provider
        name = p.limits.check_name("keyspace", name)
        await p._ready()
        return S3Keyspace(p, name, p._layout.keyspace(name))


class _SetStore(SetStore):
    def __init__(self, provider: S3Provider) -> None:
        self._provider = provider

    async def open(self, name: str) -> Set:
        p = self._provider
        name = p.limits.check_name("set", name)
        await p._ready()
        return S3Set(p, name, p._layout.set(name))


class S3Provider(Provider):
    """Journals, keyspaces and sets stored as objects in one S3 bucket.

    Args:
        bucket: The bucket; created on first use (or by ``provision()``) if missing.
        prefix: A key prefix that namespaces everything this provider stores,
            so several clusters can share a bucket.
        region: The AWS region; default: the standard AWS configuration chain
            (``us-east-1`` with a custom endpoint).
        endpoint_url: A custom endpoint (``https://host:port``, or ``http://`` for
            plain HTTP) for S3-compatible stores and emulators; path-style
            addressing is used with it.
        role_arn: An IAM role to assume through STS; the source credentials come
            from *session* or the default AWS credential chain.
        session: The ``boto3.Session`` to take credentials, configuration and
            event hooks from; default: a new one.
        max_concurrency: At most this many S3 requests in flight at once (each
            runs in a worker thread).

    Constructing a provider does no I/O. Invalid arguments raise ``ValueError``.
    Safe to share between tasks; ``close()`` (idempotent) releases the HTTP pool.
    After it, every operation raises ``PersistenceError``. After ``set_read_only()``
    a missing bucket raises ``StoreUnavailable`` and writes raise ``PersistenceError``.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        region: str | None = None,
        endpoint_url: str | None = None,
        role_arn: str | None = None,
        session: boto3.Session | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        settings = S3Settings(
            bucket=bucket,
            prefix=prefix,
            region=region,
            endpoint_url=endpoint_url,
            role_arn=role_arn,
        )
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive int, not {max_concurrency!r}")
        self._settings = settings
        self._session = session
        self._max_concurrency = max_concurrency
        self._layout = Layout(settings.prefix)
        self._limits = limits_for(settings.prefix)
        self._limiter = anyio.CapacityLimiter(max_concurrency)
        self._lock = threading.Lock()
        self._create_lock = threading.Lock()
        self._s3: S3Objects | None = None
        self._provisioner = BucketProvisioner()
        self._journal_states: dict[str, JournalState] = {}
        self._closed = False
        self._journals = _JournalStore(self)
        self._keyspaces = _KeyspaceStore(self)
        self._sets = _SetStore(self)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        session: boto3.Session | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> S3Provider:
        """Return a provider for an ``s3:///<bucket>`` or ``s3://host:port/<bucket>`` URL."""
        settings = parse_url(url)
        return cls(
            settings.bucket,
            prefix=settings.prefix,
            region=settings.region,
            endpoint_url=settings.endpoint_url,
            role_arn=settings.role_arn,
            session=session,
            max_concurrency=max_concurrency,
        )

    @property
    def settings(self) -> S3Settings:
        """Where this provider keeps its data."""
        return self._settings

    @property
    def journals(self) -> JournalStore:
        return self._journals

    @property
    def keyspaces(self) -> KeyspaceStore:
        return self._keyspaces

    @property
    def sets(self) -> SetStore:
        return self._sets

    @property
    def limits(self) -> Limits:
        return self._limits

    async def provision(self) -> None:
        """Create the bucket if it is missing (idempotent; safe under concurrency)."""
        await self._ready()

    async def close(self) -> None:
        with self._lock:
            self._closed = True
            s3, self._s3 = self._s3, None
        if s3 is not None:
            s3.client.close()

    def _objects(self) -> S3Objects:
        with self._lock:
            if self._closed or self._s3 is None:
                raise PersistenceError(f"{self!r} is closed")
            return self._s3

    async def _ready(self) -> None:
        """Create the client and provision the bucket, once (blocking work in a thread)."""
        if self._closed:
            raise PersistenceError(f"{self!r} is closed")
        await anyio.to_thread.run_sync(self._ready_sync, limiter=self._limiter)

    def _ready_sync(self) -> None:
        # Worker threads only. ``_lock`` guards state the event loop reads and is
        # never held across slow work; ``_create_lock`` serialises client creation.
        with self._create_lock:
            with self._lock:
                if self._closed:
                    raise PersistenceError(f"{self!r} is closed")
                s3 = self._s3
            if s3 is None:
                client = create_client(self._settings, self._session, self._max_concurrency)
                with self._lock:
                    if self._is_closed():  # closed while we were creating it
                        client.close()
                        raise PersistenceError(f"{self!r} is closed")
                    s3 = self._s3 = S3Objects(client, self._settings.bucket, self._limiter)
        s3._guard(
            "HeadBucket/CreateBucket",
            "",
            lambda: self._provisioner.ensure(
                s3.client, self._settings.bucket, create=not self.read_only
            ),
        )

    def _is_closed(self) -> bool:
        return self._closed

    def _journal_state(self, name: str) -> JournalState:
        with self._lock:
            return self._journal_states.setdefault(name, JournalState())

    def __repr__(self) -> str:
        return f"<S3Provider {self._settings.url()}>"
