"""Process deliveries in a partition's inbox not yet handed to its process steps (ADR 0010).

A process instance skips a delivery at or below its recorded position for the
delivery's stream, so a delivery handed to the home partition in memory must
never overtake an earlier one of the same instance that went through the
inbox. ``InboxDeliveries`` counts, per (process handler, instance), the
deliveries the partition's batch has read from its inbox, or heard of being
appended by this node (``notify``), and not yet handed over; the home's
process steps refuse in-memory deliveries for an instance while it has some.
"""

from __future__ import annotations

from .inbox import InboxEntry, InboxRecord

__all__ = ["InboxDeliveries"]


class InboxDeliveries:
    """Per instance, the inbox deliveries not yet handed over (see the module docstring)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        # Inbox positions counted when this node appended them (``notified``),
        # so that reading them later does not count them again.
        self._counted: set[int] = set()

    def pending(self, handler_key: str, instance_id: str) -> bool:
        """Whether deliveries for the instance are in the inbox, not yet handed over."""
        return (handler_key, instance_id or "") in self._counts

    def notified(self, position: int, record: InboxRecord, read_end: int) -> None:
        """This node appended *record* at *position* (the batch reads it soon)."""
        if position >= read_end and position not in self._counted:
            self._counted.add(position)
            self._count(record, 1)

    def read(self, position: int, record: InboxRecord) -> None:
        """The batch read *record* at *position* from the inbox."""
        if position in self._counted:
            self._counted.discard(position)
        else:
            self._count(record, 1)

    def handed_over(self, entry: InboxEntry) -> None:
        """A delivery read from the inbox left it: handed over, or done without."""
        key = (entry.handler_key, entry.instance_id or "")
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)

    def _count(self, record: InboxRecord, delta: int) -> None:
        for entry in record.entries:
            if entry.source is not None:
                key = (entry.handler_key, entry.instance_id or "")
                self._counts[key] = self._counts.get(key, 0) + delta
