"""This node's own heartbeat record: claiming it, rewriting it, deleting it.

The record lives under the node's UUID in ``cluster/nodes`` and is rewritten
conditionally on the revision this process last wrote. Every process stamps a
random *incarnation* in its record, which tells our own earlier write (one
whose success we did not hear of: ambiguous or abandoned) from another
process's:

- A ``Conflict`` on our key that is not our own earlier write means another
  process uses the same node ID: ``NodeIdInUse``, fatal.
- A node may take work until ``STOP_INTERVALS`` intervals after the *start* of
  its last successful write (``fresh``), one interval before peers consider it
  gone, however slow the write was.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

import anyio
import attrs
import msgspec

from ...persistence import Conflict, Keyspace, PersistenceError
from ..backoff import backoff
from ..settings import EngineSettings
from .nodes import (
    ENGINE_PROTOCOL,
    EXPIRY_INTERVALS,
    RECORD_VERSION,
    RUNKIT_VERSION,
    STOP_INTERVALS,
    Heartbeat,
    NodeIdInUse,
    NodeRecord,
    Progress,
    ProgressField,
    decode_node_record,
    describe_node,
)
from .store_calls import MEMBERSHIP_LOG, StoreCalls, StoreTimeout

__all__ = ["HeartbeatWriter", "OwnRecord"]


@attrs.frozen
class OwnRecord:
    """What is stored under our key: the record (``None`` if absent or our own
    process's), whether anything is there, whether it is this process's own
    write, and its revision."""

    record: NodeRecord | None
    present: bool
    revision: str
    ours: bool = False


class HeartbeatWriter:
    """Writes one node's heartbeat record (see the module docstring)."""

    def __init__(
        self,
        settings: EngineSettings,
        *,
        calls: StoreCalls,
        max_value_bytes: int,
        progress: Callable[[], Progress] | None,
        tls_fingerprint: str | None,
        role: str,
    ) -> None:
        self._node_id = settings.node_id
        self._key = str(settings.node_id).encode("ascii")
        self._interval = settings.heartbeat_interval
        self._advertise_address = settings.advertise_address
        self._listen_address = settings.listen_address
        self._calls = calls
        self._max_value_bytes = max_value_bytes
        self._progress = progress
        self._tls_fingerprint = tls_fingerprint
        self._role = role
        # Peers rank only the nodes that run an application for its partitions
        # (an empty list: none; only records without the field count for all).
        self._apps = sorted(app.identity.key for app in settings.applications)
        self._extra = {"node_id": str(settings.node_id)}
        self.incarnation = str(uuid.uuid4())
        #: The revision of our record as we last wrote it ("" for none of ours).
        self.revision = ""
        self.started_at: datetime | None = None
        self.last_written: datetime | None = None
        self._valid_until: datetime | None = None
        self._oversized = False
        self._progress_failing = False

    @property
    def valid_until(self) -> datetime | None:
        """When the last successful write stops being fresh (``None``: never written)."""
        return self._valid_until

    def fresh(self, now: datetime) -> bool:
        """Whether the last successful write is recent enough to take work at *now*."""
        return self._valid_until is not None and now < self._valid_until

    async def read_own(self, ks: Keyspace) -> OwnRecord | None:
        """What is stored under our key; ``None`` if it could not be read (logged)."""
        try:
            value, revision = await self._calls.bounded(ks.get(self._key))
        except (PersistenceError, StoreTimeout) as exc:
            self._calls.failed("read its heartbeat record", exc)
            return None
        record = decode_node_record(self._key, value) if value else None
        ours = record is not None and record.incarnation == self.incarnation
        # Our own write: one whose success we did not hear of, or a take-over
        # whose follow-up read failed.
        return OwnRecord(None if ours else record, bool(value), revision, ours)

    async def write(self, ks: Keyspace, now: datetime) -> bool:
        """Write our record at ``revision``; whether it succeeded."""
        value = self._encode(now)
        for _ in range(3):
            try:
                self.revision = await self._calls.bounded(ks.set(self._key, value, self.revision))
            except Conflict:
                # Our own earlier write (ambiguous or abandoned) may have landed; else fatal.
                if not await self._resolve(ks):
                    return False
                continue
            except (PersistenceError, StoreTimeout) as exc:
                self._calls.failed("write its heartbeat", exc)
                return False
            self._valid_until = now + timedelta(seconds=STOP_INTERVALS * self._interval)
            self.last_written = now
            if self._calls.recovered():
                MEMBERSHIP_LOG.info(
                    "node %s: heartbeat written again", self._node_id, extra=self._extra
                )
            return True
        return False

    async def delete(self, ks: Keyspace) -> None:
        """Delete our record, conditionally on our revision, retrying transient failures."""
        attempt = 0
        while True:
            try:
                await ks.set(self._key, b"", self.revision)
            except Conflict:
                try:
                    if await self._resolve(ks, deleting=True) and not self.revision:
                        return  # already gone
                except NodeIdInUse:
                    MEMBERSHIP_LOG.warning(
                        "node %s: not deleting a heartbeat record another process wrote",
                        self._node_id,
                        extra=self._extra,
                    )
                    return
                continue
            except PersistenceError as exc:
                if not (exc.retryable or exc.ambiguous):
                    raise
                # An ambiguous delete that landed shows up as a conflict on the retry.
                attempt += 1
                await anyio.sleep(backoff(attempt, 0.01, self._interval))
                continue
            self.revision = ""
            MEMBERSHIP_LOG.info(
                "%s %s left the cluster", self._role, self._node_id, extra=self._extra
            )
            return

    async def _resolve(self, ks: Keyspace, *, deleting: bool = False) -> bool:
        """After a conflict on our key: adopt our own revision, or raise ``NodeIdInUse``.

        Returns ``False`` if the key could not be read (try again next beat).
        """
        try:
            value, revision = await self._calls.bounded(ks.get(self._key))
        except (PersistenceError, StoreTimeout) as exc:
            self._calls.failed("read its heartbeat record", exc)
            return False
        if not value:
            if self.revision and not deleting:
                MEMBERSHIP_LOG.warning(
                    "node %s: its heartbeat record was deleted by someone else "
                    "(pruned after expiry, or by an operator); writing it again",
                    self._node_id,
                    extra=self._extra,
                )
            self.revision = ""
            return True
        record = decode_node_record(self._key, value)
        if record is not None and record.incarnation == self.incarnation:
            self.revision = revision
            return True
        raise NodeIdInUse(self._node_id, describe_node(record))

    def _encode(self, now: datetime) -> bytes:
        assert self.started_at is not None
        progress: dict[str, dict[int, dict[str, int]]] = {}
        if self._progress is not None and not self._oversized:
            try:
                # Checked, so a bad value cannot make our record unreadable to peers.
                progress = msgspec.convert(self._progress(), ProgressField)
                self._progress_failing = False
            except Exception:
                if not self._progress_failing:
                    MEMBERSHIP_LOG.exception(
                        "node %s: the progress callback failed; heartbeats go without progress",
                        self._node_id,
                        extra=self._extra,
                    )
                self._progress_failing = True
        beat = Heartbeat(
            version=RECORD_VERSION,
            node_id=str(self._node_id),
            incarnation=self.incarnation,
            started_at=self.started_at,
            written_at=now,
            expires_at=now + timedelta(seconds=EXPIRY_INTERVALS * self._interval),
            heartbeat_interval=self._interval,
            advertise_address=self._advertise_address,
            listen_address=self._listen_address,
            tls_fingerprint=self._tls_fingerprint,
            progress=progress,
            role=self._role,
            runkit_version=RUNKIT_VERSION,
            apps=self._apps,
            protocol=ENGINE_PROTOCOL,
        )
        value = msgspec.msgpack.encode(beat)
        if len(value) > self._max_value_bytes and progress:
            # Liveness matters more than progress: never let progress block the heartbeat.
            MEMBERSHIP_LOG.warning(
                "node %s: heartbeat with progress is %d bytes, over the store's limit; "
                "publishing no progress from now on",
                self._node_id,
                len(value),
                extra=self._extra,
            )
            self._oversized = True
            value = msgspec.msgpack.encode(msgspec.structs.replace(beat, progress={}))
        return value
