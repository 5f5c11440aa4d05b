"""Deliveries: the work a process step is made of, and where it goes (ADR 0010).

A *delivery* asks the home partition of a process instance to handle one
message in it: an event from some partition's stream, or one of the
instance's deadlines. The consumer of the stream routes the event and submits
the delivery to the instance's home partition, whose batch handles it and
commits the result in its own stream record; a deadline timer, which already
runs on the home partition's owner, submits its deadlines the same way. The
home partition is then the one writer of the instance.

A delivery's ID is derived from its cause and the handler, so a delivery
submitted again after a crash has the same ID (the inbox and stream records
name it). Exactly-once handling does not rest on the ID but on the instance's
committed state: its per-stream positions and ended flag (and, for a
deadline, its pending list).
"""

from __future__ import annotations

from datetime import datetime

import attrs

from ..envelope import Envelope
from ..ids import delivery_id
from ..partitions import instance_workload, partition_of

__all__ = ["Delivery", "delivery_id", "home_partition"]


def home_partition(handler_key: str, instance_id: str, partition_count: int) -> int:
    """The home partition of a process instance: where its steps commit and its deadlines live."""
    return partition_of(instance_workload(handler_key, instance_id), partition_count)


@attrs.frozen
class Delivery:
    """One message for one process instance, to be handled by its home partition.

    Attributes:
        id: ``delivery_id(envelope.message_id, handler_key)``.
        handler_key: The process handler's identity key.
        instance_id: The instance (what ``route_event_to_instance`` returned,
            or the deadline's instance).
        envelope: The event's or the deadline's envelope.
        at: When the event was recorded, or the time the deadline was
            scheduled for (what the handler's scope reports).
        stream: (stream ID, offset) of an event; ``None`` for a deadline.
        deadline_id: A deadline's ID; ``None`` for an event.
    """

    id: str
    handler_key: str
    instance_id: str
    envelope: Envelope
    at: datetime
    stream: tuple[str, int] | None = None
    deadline_id: str | None = None

    @classmethod
    def of_event(
        cls,
        handler_key: str,
        instance_id: str,
        envelope: Envelope,
        *,
        stream_id: str,
        offset: int,
        recorded_at: datetime,
    ) -> Delivery:
        """The delivery of the event at *offset* of stream *stream_id*."""
        return cls(
            delivery_id(envelope.message_id, handler_key),
            handler_key,
            instance_id,
            envelope,
            recorded_at,
            stream=(stream_id, offset),
        )

    @classmethod
    def of_deadline(
        cls, handler_key: str, instance_id: str, envelope: Envelope, *, scheduled_for: datetime
    ) -> Delivery:
        """The delivery of a due deadline (its envelope's ID is the deadline ID)."""
        return cls(
            delivery_id(envelope.message_id, handler_key),
            handler_key,
            instance_id,
            envelope,
            scheduled_for,
            deadline_id=envelope.message_id,
        )
