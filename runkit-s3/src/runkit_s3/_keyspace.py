"""Keyspaces and sets on S3: one object per key or member.

Keyspace entries: the body is a version byte, a random 16-byte token and the
value. The token makes the ETag change on every write (even of the same value,
even after a delete), so the ETag itself is the revision and compare-and-set is
a single ``If-Match`` request. Nothing assumes an ETag is an MD5, so SSE-KMS is
fine. Deletes are conditional ``DeleteObject`` with ``If-Match`` (supported by
AWS on general-purpose buckets and by moto), so no tombstones or lifecycle rules
are needed.

Set members: an empty object; ``try_add`` is ``If-None-Match: *`` and
``try_remove`` a conditional delete.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

from runkit.persistence import Conflict, Keyspace, PersistenceError, Set

from ._client import Blob, ConditionFailed, S3Objects

if TYPE_CHECKING:
    from ._provider import S3Provider

__all__ = ["S3Keyspace", "S3Set"]

_FORMAT: Final = b"\x01"
_HEADER: Final = len(_FORMAT) + 16
#: ETag of an empty single-part object without SSE-KMS (the MD5 of nothing).
_EMPTY_ETAG: Final = "d41d8cd98f00b204e9800998ecf8427e"
#: Keyspace ``range`` GETs up to this many values of a listing page concurrently.
_RANGE_PREFETCH: Final = 32
# An ETag's characters (RFC 9110 etagc, without quotes); anything else can never match.
_REVISION: Final = re.compile(r"[\x21\x23-\x7e]{1,256}")


class _Handle:
    _kind: str

    def __init__(self, provider: S3Provider, name: str, prefix: str) -> None:
        self._provider = provider
        self._name = name
        self._prefix = prefix
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    async def close(self) -> None:
        self._closed = True

    def _objects(self) -> S3Objects:
        if self._closed:
            raise PersistenceError(f"{self._kind} {self._name!r}: handle is closed")
        return self._provider._objects()

    def _writable(self, operation: str) -> S3Objects:
        """``_objects()``, refusing *operation* (a write) on a read-only provider."""
        objects = self._objects()
        self._provider.refuse_if_read_only(f"{self._kind} {self._name!r}: {operation}")
        return objects

    def _key(self, data: bytes) -> str:
        return self._prefix + data.hex()

    def _decode(self, key: str) -> bytes | None:
        try:
            return bytes.fromhex(key[len(self._prefix) :])
        except ValueError:
            return None  # not ours (someone else's object under our prefix)

    async def _page(
        self, objects: S3Objects, token: str | None
    ) -> tuple[list[tuple[str, bytes]], str | None]:
        """One listing page of ``(object key, decoded key)``, and the next page's token.

        (A plain coroutine, not a nested async generator: the ranges that use it
        may be abandoned mid-way, and only the outermost generator gets closed.)
        """
        keys, token = await objects.list(self._prefix, token=token)
        return [(k, d) for k in keys if (d := self._decode(k))], token

    def __repr__(self) -> str:
        state = " (closed)" if self._closed else ""
        return f"<s3 {self._kind} {self._name!r}{state}>"


def _encode_value(value: bytes) -> bytes:
    return _FORMAT + secrets.token_bytes(16) + value


class S3Keyspace(_Handle, Keyspace):
    """A keyspace handle; safe to share between tasks."""

    _kind = "keyspace"

    def _value(self, key: bytes, blob: Blob) -> bytes:
        if len(blob.body) <= _HEADER or blob.body[:1] != _FORMAT:
            raise PersistenceError(
                f"keyspace {self._name!r}: object for key {key!r} is not a runkit value"
            )
        return blob.body[_HEADER:]

    async def get(self, key: bytes) -> tuple[bytes, str]:
        key = self._provider.limits.check_key(key)
        blob = await self._objects().get(self._key(key))
        if blob is None:
            return b"", ""
        return self._value(key, blob), blob.etag

    async def has(self, key: bytes) -> bool:
        key = self._provider.limits.check_key(key)
        return await self._objects().head(self._key(key)) is not None

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        limits = self._provider.limits
        key = limits.check_key(key)
        value = limits.check_value(value)
        if not isinstance(revision, str):
            raise TypeError(f"revision must be str, not {type(revision).__name__}")
        objects = self._writable("set")
        if revision and not _REVISION.fullmatch(revision):
            raise Conflict.keyspace(self._name, key, revision)  # can never match an ETag
        object_key = self._key(key)
        try:
            if not value and not revision:
                # "Delete if absent": a read decides.
                if await objects.head(object_key) is not None:
                    raise Conflict.keyspace(self._name, key, revision)
                return ""
            if not value:
                await objects.delete(object_key, if_match=revision)
                return ""
            if not revision:
                return await objects.put(object_key, _encode_value(value), if_none_match=True)
            return await objects.put(object_key, _encode_value(value), if_match=revision)
        except ConditionFailed:
            raise Conflict.keyspace(self._name, key, revision) from None

    async def set_unconditional(self, key: bytes, value: bytes) -> str:
        limits = self._provider.limits
        key = limits.check_key(key)
        value = limits.check_value(value)
        objects = self._writable("set_unconditional")
        if not value:
            await objects.delete(self._key(key))  # idempotent: botocore may resend it
            return ""
        # A fresh token (so revision) for every attempt, never a resent one.
        return await objects.put_new(self._key(key), lambda: _encode_value(value))

    async def range(self) -> AsyncIterator[tuple[bytes, bytes, str]]:
        token: str | None = None
        while True:
            objects = self._objects()
            page, token = await self._page(objects, token)
            for start in range(0, len(page), _RANGE_PREFETCH):
                chunk = page[start : start + _RANGE_PREFETCH]
                blobs = await self._objects().get_many([k for k, _ in chunk])
                for (_, key), blob in zip(chunk, blobs, strict=True):
                    if blob is not None:  # deleted since the listing
                        yield key, self._value(key, blob), blob.etag
            if token is None:
                return


class S3Set(_Handle, Set):
    """A set handle; safe to share between tasks."""

    _kind = "set"

    async def has(self, member: bytes) -> bool:
        member = self._provider.limits.check_member(member)
        return await self._objects().head(self._key(member)) is not None

    async def add(self, member: bytes) -> None:
        member = self._provider.limits.check_member(member)
        await self._writable("add").put(self._key(member), b"")

    async def try_add(self, member: bytes) -> bool:
        member = self._provider.limits.check_member(member)
        try:
            await self._writable("try_add").put(self._key(member), b"", if_none_match=True)
        except ConditionFailed:
            return False
        return True

    async def remove(self, member: bytes) -> None:
        member = self._provider.limits.check_member(member)
        await self._writable("remove").delete(self._key(member))

    async def try_remove(self, member: bytes) -> bool:
        member = self._provider.limits.check_member(member)
        objects = self._writable("try_remove")
        key = self._key(member)
        # Members are empty objects, so their ETag is normally the MD5 of nothing
        # and one conditional delete decides. If the store computes ETags
        # differently (SSE-KMS), read the real one and retry.
        etag = _EMPTY_ETAG
        while True:
            try:
                await objects.delete(key, if_match=etag)
            except ConditionFailed as exc:
                if exc.missing:
                    return False
                current = await objects.head(key)
                if current is None:
                    return False
                if current == etag:
                    continue  # a racing remove and re-add: try again with the same ETag
                etag = current
                continue
            return True

    async def range(self) -> AsyncIterator[bytes]:
        token: str | None = None
        while True:
            page, token = await self._page(self._objects(), token)
            for _, member in page:
                yield member
            if token is None:
                return
