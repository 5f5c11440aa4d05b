"""Executing commands from outside the application."""

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import attrs

from ._messages import Command, Event, MessageKind
from ._registry import MessageTypeRegistry
from ._routes import registered_type

E = TypeVar("E", bound=Event)


@attrs.frozen
class EventObserver(Generic[E]):
    """An observer of events caused by an executed command; made by :func:`observe`.

    Attributes:
        event_type: The observed event class.
        fn: An async callable given each observed event; it returns ``True``
            once satisfied.
    """

    event_type: type[E]
    fn: Callable[[E], Awaitable[bool]]


def observe(
    event_type: type[E],
    fn: Callable[[E], Awaitable[bool]],
    *,
    registry: MessageTypeRegistry | None = None,
) -> EventObserver[E]:
    """Make an observer of ``event_type`` events for ``CommandExecutor.execute_command()``.

    ``fn`` is awaited with each event of ``event_type`` (or of a subclass
    of it) that the command causes, directly or through processes and integrations. It
    returns ``True`` when satisfied (``execute_command`` then returns) or
    ``False`` to keep waiting; an exception it raises propagates.

    ``fn`` is normally an ``async def`` function; other callables returning
    an awaitable (a :func:`functools.partial` of one, an object with an
    ``async def __call__``) are accepted too.

    Raises:
        TypeError: ``event_type`` is not a registered :class:`dogma.Event`
            subclass, or ``fn`` is not callable or is a regular (not
            ``async def``) function.
    """
    registered_type(event_type, MessageKind.EVENT, "observe", registry)
    if not callable(fn):
        raise TypeError(f"observe(): fn must be an async callable, got {fn!r}")
    # Refused here, not once the engine has taken the command. Only plain
    # functions are judged, as via_*() does: other callables (partials, mocks,
    # objects with an async __call__) cannot be classified reliably.
    if inspect.isroutine(fn) and not inspect.iscoroutinefunction(fn):
        raise TypeError(f"observe(): fn must be a coroutine function (async def), got {fn!r}")
    return EventObserver(event_type, fn)


@runtime_checkable
class CommandExecutor(Protocol):
    """Executes commands from outside an application; implemented by engines.

    Safe to share between tasks.
    """

    async def execute_command(
        self,
        command: Command,
        *,
        idempotency_key: str | None = None,
        observers: Sequence[EventObserver[Any]] = (),
    ) -> None:
        """Execute ``command``.

        Returns once the engine has durably taken ownership of the command.
        With an ``idempotency_key``, retries with the same key execute the
        command at most once, and the caller must retry until this returns.
        With ``observers``, also waits until an observer returns ``True``,
        raises (the error propagates), the caller cancels, or the engine
        knows no further observed event can occur.

        Raises:
            ValidationError: The command is invalid.
            ValueError: No handler of the application handles the command's type.
            EventObserverNotSatisfied: No observer can be satisfied any more.
        """
        ...
