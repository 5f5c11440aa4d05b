"""An application's metadata keyspace (``<app>/meta``): its partition count.

The partition count is fixed when the application first starts: the engine
stores it then and every later start (on any node) reads it back, whatever the
configured count. Tools read it without creating anything.
"""

from __future__ import annotations

from datetime import datetime

import anyio
import msgspec

from ..persistence import Conflict, PersistenceError, Provider
from .backoff import backoff

__all__ = ["MetaRecord", "load_partition_count", "meta_name", "read_partition_count"]


def meta_name(app_key: str) -> str:
    """The name of an application's metadata keyspace."""
    return f"{app_key}/meta"


class MetaRecord(msgspec.Struct, frozen=True, kw_only=True):
    """``<app>/meta`` key ``partitions``: fixed when the application first starts."""

    partition_count: int
    created_at: datetime


_META_KEY = b"partitions"
_meta_decoder = msgspec.msgpack.Decoder(MetaRecord)


async def read_partition_count(provider: Provider, app_key: str) -> int | None:
    """The application's partition count, or ``None`` if it has never started (read-only)."""
    async with await provider.keyspaces.open(meta_name(app_key)) as ks:
        value, _ = await ks.get(_META_KEY)
    return _meta_decoder.decode(value).partition_count if value else None


async def load_partition_count(
    provider: Provider, app_key: str, default: int, now: datetime
) -> int:
    """Read the application's partition count, storing *default* if it has none yet."""
    failures = 0
    async with await provider.keyspaces.open(meta_name(app_key)) as ks:
        while True:
            try:
                value, _ = await ks.get(_META_KEY)
                if value:
                    return _meta_decoder.decode(value).partition_count
                record = MetaRecord(partition_count=default, created_at=now)
                await ks.set(_META_KEY, msgspec.msgpack.encode(record), "")
                return default
            except Conflict:
                continue  # another node (or our own ambiguous write) created it; read it
            except PersistenceError as exc:
                failures += 1
                if failures >= 10 or not (exc.retryable or exc.ambiguous):
                    raise
                await anyio.sleep(backoff(failures, 0.02, 1.0))
