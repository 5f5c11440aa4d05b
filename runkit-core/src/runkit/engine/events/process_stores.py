"""Where process handlers keep their state: store names, checkpoint keys, poisoned events.

``<app>/process/<handler key>`` holds each instance's record
(``process_instances.ProcessRecord``), ``<app>/checkpoints`` each consumer's
stream position, and ``<app>/event-poison/<partition>`` what a process gave up on.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

import msgspec

from ...persistence import Provider
from ..logs import MAX_ERROR_CHARS, shortened

__all__ = [
    "PoisonedMessage",
    "checkpoint_key",
    "checkpoints_store_name",
    "event_poison_store_name",
    "list_poisoned_events",
    "outbox_poison_key",
    "poison_error",
    "process_store_name",
]


def process_store_name(app_key: str, handler_key: str) -> str:
    """The keyspace of a process handler's instance records."""
    return f"{app_key}/process/{handler_key}"


def checkpoints_store_name(app_key: str) -> str:
    """The keyspace of the process consumers' stream checkpoints."""
    return f"{app_key}/checkpoints"


def checkpoint_key(handler_key: str, partition_id: str) -> bytes:
    """The key of one (process handler, partition stream) checkpoint."""
    return f"{handler_key}/{partition_id}".encode()


def event_poison_store_name(app_key: str, partition: int) -> str:
    """The keyspace of events and deadlines a process gave up on, per partition."""
    return f"{app_key}/event-poison/{partition}"


class PoisonedMessage(msgspec.Struct, frozen=True, kw_only=True):
    """An event or deadline a process handler gave up on (``<app>/event-poison/<p>``).

    Keyed by ``<handler key>/event/<stream ID>/<stream offset>``,
    ``<handler key>/deadline/<deadline ID>`` or ``<handler key>/outbox/<instance ID>``
    (``outbox_poison_key``); a deadline journal record that cannot be decoded
    by ``deadline-record/<position>`` (*handler_key* empty, *envelope* the
    record as stored, *stream_id* the journal's name, *offset* its position).
    """

    handler_key: str
    envelope: bytes
    instance_id: str | None
    stream_id: str | None
    offset: int | None
    error: str
    attempts: int
    poisoned_at: datetime


_poison_decoder = msgspec.msgpack.Decoder(PoisonedMessage)


def poison_error(error: BaseException) -> str:
    """What a poison record says of *error*: its type and message, kept short."""
    return shortened(f"{type(error).__qualname__}: {error}", MAX_ERROR_CHARS)


async def list_poisoned_events(
    provider: Provider, app_key: str, partition: int
) -> dict[str, PoisonedMessage]:
    """What processes gave up on in a partition: events, deadlines and stuck outboxes.

    Keyed as described at ``PoisonedMessage``; for operators' tools (the CLI).
    """
    name = event_poison_store_name(app_key, partition)
    async with await provider.keyspaces.open(name) as store:
        return {
            key.decode(): _poison_decoder.decode(value) async for key, value, _ in store.range()
        }


def outbox_poison_key(handler_key: str, instance_id: str, max_key_bytes: int) -> str:
    """The event-poison key of an instance's stuck outbox, within *max_key_bytes*.

    ``<handler key>/outbox/<instance ID>``; an instance ID that fits a process
    key may not fit with that prefix, so a long one is replaced by
    ``sha256:`` and 40 hex digits of its hash (the record holds the ID).
    """
    key = f"{handler_key}/outbox/{instance_id}"
    if len(key.encode()) <= max_key_bytes:
        return key
    digest = hashlib.sha256(instance_id.encode()).hexdigest()[:40]
    return f"{handler_key}/outbox/sha256:{digest}"
