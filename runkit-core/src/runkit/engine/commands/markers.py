"""Idempotency markers of a partition's keyed integration commands.

A keyed integration command is committed pinned: stream records list it
as ``unmarked`` (whether or not it recorded events), so that a new owner's
takeover scan finds it, until its marker (``<app>/idempotency``) is written after its record is
durable, which unpins it. A new owner writes the markers a previous owner may not have written
(``mark_unmarked``). Before a keyed command is handled, its marker says
whether (and where) it was handled already.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import anyio

from ...persistence import Keyspace, PersistenceError
from ..backoff import backoff
from ..settings import EngineSettings
from ..streams import Publication
from .acceptance import IdempotencyMarker, marker_decoder, marker_encoder
from .pending import Location

__all__ = ["Markers"]

# Part of the batch processor: logs as it.
_log = logging.getLogger("runkit.engine.commands.batches")


class Markers:
    """Reads and writes the idempotency markers of one partition's commands.

    *unpin* releases a pinned command on the stream writer once it is marked.
    """

    def __init__(
        self,
        idempotency: Keyspace,
        *,
        settings: EngineSettings,
        index: int,
        unpin: Callable[[str], None],
    ) -> None:
        self._idempotency = idempotency
        self._settings = settings
        self._index = index
        self._unpin = unpin

    async def marked(self, command_id: str) -> tuple[bool, Location]:
        """Whether a keyed command has a marker, and where its events are."""
        value, _ = await self._idempotency.get(command_id.encode())
        if not value:
            return False, None
        marker = marker_decoder.decode(value)
        if marker.first_offset is None:
            return True, None
        return True, (marker.first_offset, marker.count)

    async def mark_after(self, publication: Publication) -> None:
        """Mark the publication's command once its record is durable."""
        await publication.wait_settled()
        if publication.error is not None:
            return
        location = (publication.offset, len(publication.events)) if publication.events else None
        await self.mark(publication.command_id, location)

    async def mark_unmarked(
        self, command_ids: Sequence[str], location: Callable[[str], Location]
    ) -> None:
        """Write the markers a previous owner may not have written (takeover)."""
        for command_id in command_ids:
            await self.mark(command_id, location(command_id))

    async def mark(self, command_id: str, location: Location) -> None:
        """Write the command's marker (retrying storage faults), then unpin it."""
        marker = IdempotencyMarker(
            completed_at=self._settings.clock(),
            partition=self._index,
            first_offset=None if location is None else location[0],
            count=0 if location is None else location[1],
        )
        failures = 0
        while True:
            try:
                await self._idempotency.set_unconditional(
                    command_id.encode(), marker_encoder.encode(marker)
                )
                self._unpin(command_id)
                return
            except PersistenceError as exc:
                failures += 1
                _log.warning("writing an idempotency marker failed, retrying: %s", exc)
                await anyio.sleep(backoff(failures, self._settings.retry_base_delay, 5.0))
