"""``EngineSettings``: everything an ``Engine`` runs with, as one immutable value.

``runkit._options.resolve_options`` turns the public options (``with_application``,
``with_persistence``, ``from_environment`` ...) into an ``EngineSettings``; tests
and embedders may also build one directly and use ``Engine.from_settings``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs

from ..config import ApplicationConfig
from ..persistence import Provider, redact_url

__all__ = ["EngineSettings", "Site", "utc_now"]


def utc_now() -> datetime:
    """The default engine clock: the current time in UTC."""
    return datetime.now(UTC)


@attrs.frozen
class Site:
    """The site identity stamped in every envelope: a name for people and a UUID key."""

    name: str
    key: str


def _positive(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


def _non_negative(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    # NaN and inf fail the comparison: a wait of either means nothing.
    if not (isinstance(value, int | float) and 0 <= value < float("inf")):
        raise ValueError(f"{attribute.name} must be zero or finite and positive, not {value!r}")


def _positive_or_none(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not (isinstance(value, int | float) and value > 0):
        raise ValueError(f"{attribute.name} must be positive or None, got {value!r}")


def _at_least_one(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an int >= 1, got {value!r}")


def _with_tls_cert(instance: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if (value is None) != (instance.tls_cert is None):
        raise ValueError("tls_cert and tls_key must be given together (or neither)")


def _redacted(url: str | None) -> str:
    return repr(None if url is None else redact_url(url))


@attrs.frozen(kw_only=True)
class EngineSettings:
    """The configuration of one engine node. The defaults suit production.

    Attributes:
        applications: The applications to run (built configurations); their
            identity keys are distinct.
        node_id: This node's UUID; keep it stable across restarts so a
            restarted node gets its partitions (and warm state) back.
        site: The site identity stamped in envelopes, if any.
        persistence_url: Where to persist, resolved through the installed
            driver plugins when the engine runs (ignored if
            ``persistence_provider`` is set). Never shown unredacted.
        persistence_provider: A provider object to use instead of a URL; the
            engine does not close a provider it was given.
        listen_address: ``host:port`` the node listens on for peers.
        advertise_address: ``host:port`` peers use to reach this node.
        heartbeat_interval: Seconds between membership heartbeats.
        partition_count: Partitions of an application the first time it
            starts; afterwards the count stored in ``<app>/meta`` wins.
        max_attempts: Consecutive failed attempts at handling a command before
            it is moved to the poison store.
        retry_base_delay: Seconds before the first retry; doubles per failure.
        retry_max_delay: Cap of the delay between retries, in seconds.
        backlog_limit: The most commands waiting in one partition; beyond it
            ``execute_command`` waits for room (back-pressure).
        start_timeout: Seconds start-up keeps retrying an unreachable store
            before giving up.
        tls_cert: Path of this node's PEM certificate for node-to-node TLS
            (with ``tls_key``); ``None``: a self-signed certificate per node,
            trusted by the fingerprint in its heartbeat.
        tls_key: Path of the PEM private key of ``tls_cert``.
        tls_ca: Path of a PEM CA bundle that peers' certificates must chain
            to; ``None``: trust by heartbeat fingerprint.
        snapshot_every: Write an aggregate snapshot after this many events
            since the last one (roots that support snapshots only).
        truncate_aggregate_journals: Truncate aggregate instance journals below
            their latest snapshot once the commands it covers are fully
            processed. Saves storage, but the history is then gone: a snapshot
            that no longer loads (root code changed incompatibly) leaves the
            instance unrecoverable. Off by default (ADR 0004).
        materialise_delay: Seconds a partition's owner waits, once aggregate
            events are committed, before writing them to their instance
            journals, so that an instance's commands in that time cost one
            append (ADR 0009). A new owner re-reads about this much of the
            stream at takeover. ``0``: write as soon as committed.
        idempotency_retention: Seconds an idempotency marker is kept after its
            command completed (``None``: forever). A command re-submitted with
            the same key after that may execute again. The owner of partition 0
            prunes markers every ``min(1 h, retention / 4)``.
        inbox_batch_limit: Most commands in one inbox record (group commit).
        stream_batch_limit: Most events in one stream record.
        instance_cache_size: Aggregate instances kept in memory per partition.
        progress_interval: Seconds the stream writer stays idle before it
            records inbox progress of commands that published no events.
        shutdown_timeout: Seconds a graceful shutdown may spend flushing.
        clock: The engine clock (UTC); tests may inject one.
    """

    applications: tuple[ApplicationConfig, ...] = ()
    node_id: uuid.UUID = attrs.field(factory=uuid.uuid4)
    site: Site | None = None
    persistence_url: str | None = attrs.field(default=None, repr=_redacted)
    persistence_provider: Provider | None = None
    listen_address: str | None = None
    advertise_address: str | None = None
    heartbeat_interval: float = attrs.field(default=1.0, validator=_positive)
    partition_count: int = attrs.field(default=16, validator=_at_least_one)
    max_attempts: int = attrs.field(default=5, validator=_at_least_one)
    retry_base_delay: float = attrs.field(default=0.1, validator=_positive)
    retry_max_delay: float = attrs.field(default=30.0, validator=_positive)
    backlog_limit: int = attrs.field(default=1000, validator=_at_least_one)
    start_timeout: float = attrs.field(default=60.0, validator=_positive)
    tls_cert: str | None = None
    tls_key: str | None = attrs.field(default=None, validator=_with_tls_cert)
    tls_ca: str | None = None
    snapshot_every: int = attrs.field(default=100, validator=_at_least_one)
    truncate_aggregate_journals: bool = False
    materialise_delay: float = attrs.field(default=1.0, validator=_non_negative)
    idempotency_retention: float | None = attrs.field(
        default=7 * 24 * 3600.0, validator=_positive_or_none
    )
    inbox_batch_limit: int = attrs.field(default=500, validator=_at_least_one)
    stream_batch_limit: int = attrs.field(default=1000, validator=_at_least_one)
    instance_cache_size: int = attrs.field(default=10_000, validator=_at_least_one)
    progress_interval: float = attrs.field(default=0.05, validator=_positive)
    shutdown_timeout: float = attrs.field(default=5.0, validator=_positive)
    clock: Callable[[], datetime] = attrs.field(default=utc_now, repr=False)

    @property
    def site_key(self) -> str | None:
        """The site key stamped in envelopes, or ``None``."""
        return None if self.site is None else self.site.key
