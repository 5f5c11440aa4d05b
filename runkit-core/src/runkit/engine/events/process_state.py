"""A process instance's committed state as its home partition folds it (ADR 0010).

The home partition is the one writer of its instances, so the state it holds
in memory is the truth up to its last queued step: no revision, no lock and
no fresh read before trusting "this deadline is not pending". The state is
the instance's keyspace record (derived, possibly behind) folded with the
committed ``ProcessStep`` values of the home stream after it.

``handle_group`` handles a group of deliveries of one instance against its
live root, with the skip rules (ended; a stream position at or past the
event; a deadline no longer pending), and returns the step to commit
and the state after it. It is pure apart from the handler calls, which the
caller supplies (``Invoke``), so the rules are tested without an engine.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

import attrs
import msgspec

from ...persistence import PersistenceError
from ..envelope import encode
from ..streams import ProcessStep
from .process_deliveries import Delivery
from .process_instances import ProcessRecord, ProcessRoot
from .process_scopes import ProcessScope

__all__ = ["Handled", "InstanceState", "Invoke", "StepFailed", "handle_group", "poisoned_step"]

_entry_encoder = msgspec.msgpack.Encoder()

#: Handle one delivery against the root: call the handler with a fresh scope
#: and return the scope (raising what the handler raised, or the bug it swallowed).
Invoke = Callable[[Delivery, ProcessRoot], Awaitable[ProcessScope]]


class StepFailed(Exception):
    """Handling delivery *index* of several failed with *error*; nothing was committed."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


@attrs.frozen
class InstanceState:
    """What a process instance's committed steps add up to.

    Attributes:
        root: The root's ``marshal_binary()`` (``None``: never mutated, or ended).
        ended: The instance has ended and never handles again.
        positions: Stream ID -> offset of the last event handled from it.
        pending: IDs of the deadlines scheduled and not yet handled.
        through: (stream position, step index) of the last home step folded
            in; ``None``: none (the state is a record written before steps).
    """

    root: bytes | None = None
    ended: bool = False
    positions: Mapping[str, int] = attrs.field(factory=dict)
    pending: tuple[str, ...] = ()
    through: tuple[int, int] | None = None

    @classmethod
    def of_record(cls, record: ProcessRecord) -> InstanceState:
        """The state a stored (derived or older) keyspace record holds.

        An outbox in a record written by the consumers of ADR 0006 is not
        part of the state: it was dispatched by whoever wrote it, or is
        dispatched by the load that finds it (``process_homes``).
        """
        return cls(
            root=record.root,
            ended=record.ended,
            positions=dict(record.positions),
            pending=tuple(record.pending_deadlines),
            through=record.through,
        )

    def record(self) -> ProcessRecord:
        """The derived keyspace record of this state (no outbox: the stream holds those)."""
        if self.ended:
            return ProcessRecord(ended=True, positions=dict(self.positions), through=self.through)
        return ProcessRecord(
            root=self.root,
            positions=dict(self.positions),
            pending_deadlines=list(self.pending),
            through=self.through,
        )

    def done(self, delivery: Delivery) -> bool:
        """Whether *delivery* is handled already (or can never be): skip it.

        An ended instance handles nothing; an event at or below the
        instance's position for its stream was handled; a deadline that is
        not pending was handled or cancelled by ``end()``.
        """
        if self.ended:
            return True
        if delivery.stream is not None:
            stream_id, offset = delivery.stream
            return self.positions.get(stream_id, -1) >= offset
        return delivery.deadline_id not in self.pending

    def includes(self, at: tuple[int, int]) -> bool:
        """Whether the step at *at* (stream position, index) is folded in already."""
        return self.through is not None and at <= self.through

    def after(self, step: ProcessStep, at: tuple[int, int] | None = None) -> InstanceState:
        """The state once *step* (committed at *at*, if known) is folded in.

        A step at or below ``through`` is in the state already (a record
        written after it, read by a rebuild): the state is returned unchanged.
        """
        if at is not None and self.includes(at):
            return self
        positions = dict(self.positions)
        for stream_id, offset in step.positions:
            if offset > positions.get(stream_id, -1):
                positions[stream_id] = offset
        through = at if at is not None else self.through
        if step.ended or self.ended:
            return InstanceState(ended=True, positions=positions, through=through)
        return InstanceState(
            root=self.root if step.root is None else step.root,
            positions=positions,
            pending=self.pending if step.pending is None else step.pending,
            through=through,
        )


@attrs.frozen
class Handled:
    """What ``handle_group`` made of a group of deliveries.

    Attributes:
        step: The step to commit; ``None`` if every delivery was done already
            (nothing to commit: acknowledge them once the instance's steps
            before are durable).
        state: The instance's state once the step is committed.
        mutated: The live root was changed (``step.root`` holds it).
    """

    step: ProcessStep | None
    state: InstanceState
    mutated: bool = False


async def handle_group(
    state: InstanceState,
    root: ProcessRoot,
    deliveries: Sequence[Delivery],
    *,
    handler_key: str,
    instance_id: str,
    invoke: Invoke,
) -> Handled:
    """Handle *deliveries* of one instance in order against *root*; the step to commit.

    Deliveries the state (as the group leaves it) says are done are skipped
    but listed in the step, so an inbox delivery among them is acknowledged
    by its commit. If a handler fails on delivery *k* of several, nothing is
    returned: ``StepFailed(k, error)`` is raised (the root may have changed
    in place; the caller rebuilds it from the state). A single delivery's
    failure is raised as it is. Persistence errors are raised as they are.
    """
    ended = state.ended
    positions = dict(state.positions)
    pending = list(state.pending)
    commands: list[bytes] = []
    deadlines: list[bytes] = []
    mutated = handled = pending_changed = False
    for index, delivery in enumerate(deliveries):
        if ended:
            break  # an ended instance never handles again
        if delivery.stream is not None:
            stream_id, offset = delivery.stream
            if positions.get(stream_id, -1) >= offset:
                continue  # handled before (redelivery)
        elif delivery.deadline_id not in pending:
            continue  # handled before, or cancelled by end()
        try:
            scope = await invoke(delivery, root)
        except PersistenceError:
            raise
        except Exception as exc:
            if len(deliveries) == 1:
                raise
            raise StepFailed(index, exc) from exc
        handled = True
        mutated = mutated or scope.mutated
        commands.extend(encode(c) for c in scope.commands)
        if delivery.stream is not None:
            positions[delivery.stream[0]] = delivery.stream[1]
        if scope.ended:
            # The root and every pending deadline go (those this group
            # scheduled too); commands executed before end() still go out.
            ended = True
            continue
        if delivery.deadline_id is not None:
            pending.remove(delivery.deadline_id)
            pending_changed = True
        for d in scope.deadlines:
            pending.append(d.entry.deadline_id)
            deadlines.append(_entry_encoder.encode(d.entry))
            pending_changed = True
    if not handled:
        return Handled(None, state)
    moved = tuple(
        (stream_id, offset)
        for stream_id, offset in positions.items()
        if state.positions.get(stream_id, -1) != offset
    )
    ids = tuple(d.id for d in deliveries)
    if ended:
        step = ProcessStep(
            handler_key=handler_key,
            instance_id=instance_id,
            deliveries=ids,
            positions=moved,
            ended=True,
            commands=tuple(commands),
        )
        return Handled(step, state.after(step), mutated)
    step = ProcessStep(
        handler_key=handler_key,
        instance_id=instance_id,
        deliveries=ids,
        positions=moved,
        root=root.marshal_binary() if mutated else None,
        pending=tuple(pending) if pending_changed else None,
        commands=tuple(commands),
        deadlines=tuple(deadlines),
    )
    return Handled(step, state.after(step), mutated)


def poisoned_step(
    handler_key: str, instance_id: str, state: InstanceState, delivery: Delivery
) -> tuple[ProcessStep, InstanceState]:
    """The step that records *delivery* as given up on: its position passes it.

    A deadline given up on leaves the pending list too, so its timer's next
    owner does not fire it again.
    """
    positions: tuple[tuple[str, int], ...] = ()
    pending: tuple[str, ...] | None = None
    if delivery.stream is not None:
        positions = (delivery.stream,)
    elif delivery.deadline_id in state.pending:
        pending = tuple(d for d in state.pending if d != delivery.deadline_id)
    step = ProcessStep(
        handler_key=handler_key,
        instance_id=instance_id,
        deliveries=(delivery.id,),
        positions=positions,
        pending=pending,
        poisoned=True,
    )
    return step, state.after(step)
