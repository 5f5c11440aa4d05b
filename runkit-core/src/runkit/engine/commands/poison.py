"""Poisoned commands: the per-partition store, and list/get/requeue for operators.

A command lands in ``<app>/poison/<p>`` (keyed by command ID) when its handler
failed ``max_attempts`` times in a row, or at once when the failure is a bug:
``dogma.UnexpectedMessage``, an invalid or unrouted produced message, an empty
instance ID. The partition then moves past it, so it blocks nothing.

``requeue`` re-accepts the command (same envelope, same ID) by appending it to
its partition inbox, then removes the poison entry. Appending first means a
crash in between leaves a harmless duplicate entry, never a lost command.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

import attrs
import msgspec

from ...persistence import Conflict, Provider
from .inbox import InboxEntry, append_to_inbox, inbox_name

__all__ = [
    "HandlerBug",
    "PoisonRecord",
    "PoisonedCommand",
    "get_poisoned",
    "list_poisoned",
    "poison_name",
    "requeue",
    "write_poison",
]


class HandlerBug(Exception):
    """A failure that retrying cannot fix; the command is poisoned at once."""


def poison_name(app_key: str, index: int) -> str:
    """The name of partition *index*'s poison keyspace."""
    return f"{app_key}/poison/{index}"


class PoisonRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A poisoned command, as stored."""

    entry: InboxEntry
    handler_key: str
    error: str
    attempts: int
    poisoned_at: datetime
    inbox_position: int


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(PoisonRecord)


@attrs.frozen
class PoisonedCommand:
    """A poisoned command, for operators.

    Attributes:
        partition: The partition index it was accepted on.
        command_id: The key it is stored under: the command's message ID, or a
            process delivery's delivery ID.
        record: The stored record: envelope, handler, error text, attempts.
    """

    partition: int
    command_id: str
    record: PoisonRecord

    @property
    def description(self) -> str:
        """The command's description."""
        return self.record.entry.envelope.description


async def write_poison(provider: Provider, app_key: str, index: int, record: PoisonRecord) -> None:
    """Store *record* (idempotent: a repeat overwrites the same key)."""
    async with await provider.keyspaces.open(poison_name(app_key, index)) as ks:
        # A delivery's by its delivery ID: one event's deliveries to two
        # processes homed here must not overwrite each other's.
        await ks.set_unconditional(record.entry.entry_id.encode(), _encoder.encode(record))


async def list_poisoned(
    provider: Provider, app_key: str, partition_count: int
) -> AsyncIterator[PoisonedCommand]:
    """Iterate every poisoned command of the application, partition by partition."""
    for index in range(partition_count):
        async with await provider.keyspaces.open(poison_name(app_key, index)) as ks:
            async for key, value, _ in ks.range():
                yield PoisonedCommand(index, key.decode(), _decoder.decode(value))


async def get_poisoned(
    provider: Provider, app_key: str, partition_count: int, command_id: str
) -> PoisonedCommand | None:
    """Return the poisoned command with *command_id*, or ``None``."""
    for index in range(partition_count):
        async with await provider.keyspaces.open(poison_name(app_key, index)) as ks:
            value, _ = await ks.get(command_id.encode())
            if value:
                return PoisonedCommand(index, command_id, _decoder.decode(value))
    return None


async def requeue(provider: Provider, app_key: str, partition_count: int, command_id: str) -> bool:
    """Re-accept a poisoned command and remove its poison entry.

    Returns ``False`` if no such command is poisoned (or another operator
    requeued it first).
    """
    for index in range(partition_count):
        async with await provider.keyspaces.open(poison_name(app_key, index)) as ks:
            value, revision = await ks.get(command_id.encode())
            if not value:
                continue
            record = _decoder.decode(value)
            async with await provider.journals.open(inbox_name(app_key, index)) as inbox:
                await append_to_inbox(inbox, [record.entry])
            try:
                await ks.set(command_id.encode(), b"", revision)
            except Conflict:
                return False
            return True
    return False
