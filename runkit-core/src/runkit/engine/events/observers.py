"""Event observers of ``CommandExecutor.execute_command`` (seam 4).

The executor subscribes to the command's correlation ID *before* accepting
the command (on this node's ``EventBus`` and, over the node transport, on the
peers, whose streams open only once the command's done note shows that the
chain goes on: ``Router.observe``), then awaits ``wait_for_observers`` with that
subscription. Every
event of the causal chain (the command's own events and those of commands that
processes execute in consequence) carries the command's correlation ID, so the
subscription sees exactly the candidates, wherever they are recorded.

When is an observer "not satisfiable"? ``dogma.EventObserverNotSatisfied`` is
raised

1. as soon as the command is accepted (durable, so it runs), if no observed
   class (or a subclass of one) is in the static route graph's
   ``app.reachable_events(command_type)``: the executor does not subscribe;
2. as soon as the command itself is done on its owner (a ``CommandDone`` note,
   sent after its events) and no observed class is among the events that can
   still follow the events it recorded: ``app.events_following(recorded)``,
   the events reachable from the commands that processes handling those events
   execute, directly or from deadlines they schedule. An event the command did
   record is not observed again unless a process can lead to it.

Only processes react to events, so after (2) an observed event could only come
from a process acting on the chain's events, which ``events_following`` covers;
while one can, the wait goes on (a process may ignore the event: the caller
bounds the wait). A repeated command whose original events cannot be
re-delivered reports a *non-conclusive* done note, which decides nothing.

In both cases the command was executed: ``EventObserverNotSatisfied`` never
means that it was not, so a caller need not tell the two apart (nor retry).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import dogma

from ...config import ApplicationConfig
from ..envelope import Envelope, message_class
from ..streams import CommandDone, Observed, Stopped

__all__ = ["Subscription", "satisfiable_observers", "unsatisfiable", "wait_for_observers"]

Subscription = AbstractAsyncContextManager[AsyncIterator[Observed]]


def satisfiable_observers(
    app: ApplicationConfig, command_type: type, observers: Sequence[dogma.EventObserver[Any]]
) -> list[dogma.EventObserver[Any]]:
    """The *observers* whose event class may follow from *command_type* (rule 1)."""
    reachable = app.reachable_events(command_type)
    return [o for o in observers if any(issubclass(r, o.event_type) for r in reachable)]


def unsatisfiable(
    app: ApplicationConfig, command_type: type, observers: Sequence[dogma.EventObserver[Any]]
) -> dogma.EventObserverNotSatisfied:
    """The error for *observers* none of which can follow from *command_type* (rule 1)."""
    observed = ", ".join(sorted(o.event_type.__qualname__ for o in observers))
    return dogma.EventObserverNotSatisfied(
        f"no observed event ({observed}) can follow from a "
        f"{command_type.__qualname__} in application {app.identity}; "
        "the command was executed"
    )


async def wait_for_observers(
    app: ApplicationConfig,
    command: Envelope,
    command_type: type,
    observers: Sequence[dogma.EventObserver[Any]],
    events: AsyncIterator[Observed],
    *,
    widen: Callable[[], object] | None = None,
) -> None:
    """Feed the command's events to *observers* until one is satisfied.

    *widen* is called once the command is done and what it recorded may lead
    to more events elsewhere (processes follow them), or when its done note is
    not conclusive: a subscription that watched only the command's partition
    then subscribes on every node.

    Each event whose correlation ID is the command's and whose class is an
    observer's ``event_type`` (or a subclass of it) is decoded afresh for
    each observer (ADR-32) and awaited in order; events of one partition
    arrive in stream order, events of different partitions in any order.

    Returns when an observer returns ``True``. An exception an observer raises
    propagates. Cancellation (the caller's timeout) propagates.

    Raises:
        dogma.EventObserverNotSatisfied: No observed event type can follow
            from *command_type* (checked before waiting), or *events* ended
            without an observer being satisfied.
    """
    if not observers:
        return
    live = satisfiable_observers(app, command_type, observers)
    if not live:
        raise unsatisfiable(app, command_type, observers)
    correlation_id = command.correlation_id
    recorded: set[type] = set()
    async for event in events:
        if isinstance(event, CommandDone):
            if isinstance(event, Stopped):
                raise event.error()  # the engine stopped, or the client was left
            if event.command_id != command.message_id:
                continue
            if event.conclusive:
                _check_can_follow(app, command, live, recorded)
            if widen is not None:
                widen()
            continue
        if event.envelope.correlation_id != correlation_id:
            continue
        cls = message_class(event.envelope)
        if cls is None:
            # Recorded by a node that knows more types (a newer version of the
            # application, mid-upgrade): no observer here can want it, and
            # nothing in this node's route graph follows from it.
            continue
        recorded.add(cls)
        for observer in live:
            # Each observer gets its own copy (ADR-32): observers may keep it.
            if issubclass(cls, observer.event_type) and await observer.fn(event.message()):
                return
    raise dogma.EventObserverNotSatisfied(
        f"the events of {command.description!r} ended without satisfying an observer"
    )


def _check_can_follow(
    app: ApplicationConfig,
    command: Envelope,
    observers: Sequence[dogma.EventObserver[Any]],
    recorded: set[type],
) -> None:
    """The chain's first command is done: raise if no observed event can still follow."""
    following = app.events_following(recorded)
    if any(issubclass(f, o.event_type) for o in observers for f in following):
        return
    observed = ", ".join(sorted(o.event_type.__qualname__ for o in observers))
    seen = ", ".join(sorted(c.__qualname__ for c in recorded)) or "no events"
    raise dogma.EventObserverNotSatisfied(
        f"{command.description!r} was handled and recorded {seen}; no observed event "
        f"({observed}) can follow from those"
    )
