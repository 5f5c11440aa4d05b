"""Handling a group of an instance's messages against its root: the record to commit.

The runner hands ``handle_steps`` everything queued for one instance; it calls
the handler for each message in order (skipping what the record says is done)
and returns the instance's next record, whose outbox holds only what this group
produced.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs

from ...persistence import PersistenceError
from ..envelope import Envelope, encode
from .process_instances import CachedInstance, OutboxDeadline, ProcessRecord, ProcessRoot
from .process_scopes import ProcessScope

__all__ = ["Invoke", "StaleRecord", "Step", "StepFailed", "handle_steps"]

Invoke = Callable[[ProcessRoot, ProcessScope], Awaitable[None]]


@attrs.frozen
class Step:
    """One message to handle for an instance: an event (``stream``) or a deadline."""

    cause: Envelope
    invoke: Invoke
    make_scope: Callable[[ProcessRoot], ProcessScope]
    stream: tuple[str, int] | None = None
    deadline_id: str | None = None


class StepFailed(Exception):
    """Handling step *index* of several failed with *error*; nothing was committed."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


class StaleRecord(Exception):
    """A cached record cannot tell whether a deadline is pending: read it again."""


async def invoke_step(step: Step, root: ProcessRoot, scope: ProcessScope) -> None:
    await step.invoke(root, scope)
    if scope.bug is not None:
        raise scope.bug  # the handler swallowed it; still a bug


async def handle_steps(
    entry: CachedInstance, steps: list[Step], *, fresh: bool
) -> ProcessRecord | None:
    """Handle *steps* in order against the entry's root; the record to commit (``None``: none).

    The result's outbox holds only what these steps produced: the entry's own
    outbox is dispatched already. Raises ``StaleRecord`` if a deadline is not
    pending in a cached (not *fresh*) record, and what a handler raises
    (wrapped in ``StepFailed`` when there are several steps).
    """
    record = entry.record
    root = entry.root
    ended = record.ended
    positions = dict(record.positions)
    pending = list(record.pending_deadlines)
    commands: list[bytes] = []
    deadlines: list[OutboxDeadline] = []
    mutated = handled = False
    for index, step in enumerate(steps):
        if ended:
            break  # an ended instance never handles again
        if step.stream is not None and positions.get(step.stream[0], -1) >= step.stream[1]:
            continue  # already handled (redelivery)
        if step.deadline_id is not None and step.deadline_id not in pending:
            if not fresh:
                raise StaleRecord  # another node may have scheduled it since we cached the record
            continue  # already handled, or cancelled by end()
        scope = step.make_scope(root)
        try:
            await invoke_step(step, root, scope)
        except PersistenceError:
            raise
        except Exception as exc:
            if len(steps) == 1:
                raise
            raise StepFailed(index, exc) from exc
        handled = True
        mutated = mutated or scope.mutated
        commands.extend(encode(c) for c in scope.commands)
        if step.stream is not None:
            positions[step.stream[0]] = step.stream[1]
        if scope.ended:
            # Drop the root and cancel every pending deadline (including those
            # this group scheduled); commands executed before end() still go out.
            ended = True
            continue
        pending = [d for d in pending if d != step.deadline_id]
        pending.extend(d.entry.deadline_id for d in scope.deadlines)
        deadlines.extend(scope.deadlines)
    if not handled:
        return None
    if ended:
        return ProcessRecord(ended=True, positions=positions, commands=commands)
    return ProcessRecord(
        root=root.marshal_binary() if mutated else record.root,
        positions=positions,
        pending_deadlines=pending,
        commands=commands,
        deadlines=deadlines,
    )
