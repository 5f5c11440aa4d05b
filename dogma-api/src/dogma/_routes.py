"""Handler routes (``via_*``) and message routes (``handles_command`` etc.).

Route values are checked when they are made, so a mistake is reported at the
line that makes it: a handler missing a method, or a message class that is
not registered or is of the wrong kind.
"""

import inspect
from typing import Any, TypeAlias

import attrs

from ._messages import MessageKind, kind_of
from ._registry import MessageType, MessageTypeRegistry, _qualified, with_article
from ._registry import registry as _global_registry

# --------------------------------------------------------------------------- handler routes

# (method, must be async) for each handler kind.
_AGGREGATE_METHODS = (
    ("configure", False),
    ("new", False),
    ("route_command_to_instance", False),
    ("handle_command", False),
)
_PROCESS_METHODS = (
    ("configure", False),
    ("new", False),
    ("route_event_to_instance", True),
    ("handle_event", True),
    ("handle_deadline", True),
)
_INTEGRATION_METHODS = (("configure", False), ("handle_command", True))
_PROJECTION_METHODS = (
    ("configure", False),
    ("handle_event", True),
    ("checkpoint_offset", True),
    ("compact", True),
    ("reset", True),
)


def _check_handler(handler: object, kind: str, methods: tuple[tuple[str, bool], ...]) -> None:
    if handler is None:
        raise TypeError(f"via_{kind}(): handler cannot be None")
    if isinstance(handler, type):
        # The class has the methods too, so it would pass the checks below and
        # fail later, when the engine calls them unbound.
        name = handler.__qualname__.rpartition("<locals>.")[2]
        raise TypeError(
            f"via_{kind}(): pass an instance of {name}, not the class (e.g. via_{kind}({name}()))"
        )
    what = f"{kind} handler {_qualified(type(handler))}"
    for name, must_be_async in methods:
        method = getattr(handler, name, None)
        if not callable(method):
            raise TypeError(f"{what} has no {name}() method; {kind} handlers must implement it")
        # Only plain functions are judged: other callables (partials, mocks,
        # objects with an async __call__) cannot be classified reliably.
        is_async = inspect.iscoroutinefunction(method)
        if must_be_async and not is_async and inspect.isroutine(method):
            raise TypeError(f"{what}: {name}() must be a coroutine function (async def)")
        if not must_be_async and is_async:
            raise TypeError(f"{what}: {name}() must be a regular function, not async def")


@attrs.frozen
class AggregateHandlerRoute:
    """A route to an aggregate handler, made by :func:`via_aggregate`."""

    handler: Any


@attrs.frozen
class ProcessHandlerRoute:
    """A route to a process handler, made by :func:`via_process`."""

    handler: Any


@attrs.frozen
class IntegrationHandlerRoute:
    """A route to an integration handler, made by :func:`via_integration`."""

    handler: Any


@attrs.frozen
class ProjectionHandlerRoute:
    """A route to a projection handler, made by :func:`via_projection`."""

    handler: Any


HandlerRoute: TypeAlias = (
    AggregateHandlerRoute | ProcessHandlerRoute | IntegrationHandlerRoute | ProjectionHandlerRoute
)
"""Any handler route; what ``ApplicationConfigurer.routes()`` accepts."""


def via_aggregate(handler: Any) -> AggregateHandlerRoute:
    """Route an application to an aggregate handler.

    The handler must have synchronous ``configure``, ``new``,
    ``route_command_to_instance`` and ``handle_command`` methods
    (:class:`dogma.AggregateMessageHandler`).

    Raises:
        TypeError: ``handler`` is ``None``, a class rather than an instance, or
            lacks a method; the message names it.
    """
    _check_handler(handler, "aggregate", _AGGREGATE_METHODS)
    return AggregateHandlerRoute(handler)


def via_process(handler: Any) -> ProcessHandlerRoute:
    """Route an application to a process handler.

    The handler must have synchronous ``configure`` and ``new`` and
    asynchronous ``route_event_to_instance``, ``handle_event`` and
    ``handle_deadline`` methods (:class:`dogma.ProcessMessageHandler`).

    Raises:
        TypeError: ``handler`` is ``None``, a class rather than an instance, or
            lacks a method; the message names it.
    """
    _check_handler(handler, "process", _PROCESS_METHODS)
    return ProcessHandlerRoute(handler)


def via_integration(handler: Any) -> IntegrationHandlerRoute:
    """Route an application to an integration handler.

    The handler must have a synchronous ``configure`` and an asynchronous
    ``handle_command`` method (:class:`dogma.IntegrationMessageHandler`).

    Raises:
        TypeError: ``handler`` is ``None``, a class rather than an instance, or
            lacks a method; the message names it.
    """
    _check_handler(handler, "integration", _INTEGRATION_METHODS)
    return IntegrationHandlerRoute(handler)


def via_projection(handler: Any) -> ProjectionHandlerRoute:
    """Route an application to a projection handler.

    The handler must have a synchronous ``configure`` and asynchronous
    ``handle_event``, ``checkpoint_offset``, ``compact`` and ``reset``
    methods (:class:`dogma.ProjectionMessageHandler`).

    Raises:
        TypeError: ``handler`` is ``None``, a class rather than an instance, or
            lacks a method; the message names it.
    """
    _check_handler(handler, "projection", _PROJECTION_METHODS)
    return ProjectionHandlerRoute(handler)


# --------------------------------------------------------------------------- message routes


@attrs.frozen
class HandlesCommandRoute:
    """The handler consumes commands of ``type`` (aggregates and integrations)."""

    type: MessageType


@attrs.frozen
class RecordsEventRoute:
    """The handler records events of ``type`` (aggregates and integrations)."""

    type: MessageType


@attrs.frozen
class HandlesEventRoute:
    """The handler consumes events of ``type`` (processes and projections)."""

    type: MessageType


@attrs.frozen
class ExecutesCommandRoute:
    """The handler executes commands of ``type`` (processes)."""

    type: MessageType


@attrs.frozen
class SchedulesDeadlineRoute:
    """The handler schedules, and receives back, deadlines of ``type`` (processes)."""

    type: MessageType


AggregateRoute: TypeAlias = HandlesCommandRoute | RecordsEventRoute
"""A message route accepted by ``AggregateConfigurer.routes()``."""

ProcessRoute: TypeAlias = HandlesEventRoute | ExecutesCommandRoute | SchedulesDeadlineRoute
"""A message route accepted by ``ProcessConfigurer.routes()``."""

IntegrationRoute: TypeAlias = HandlesCommandRoute | RecordsEventRoute
"""A message route accepted by ``IntegrationConfigurer.routes()``."""

ProjectionRoute: TypeAlias = HandlesEventRoute
"""A message route accepted by ``ProjectionConfigurer.routes()``."""

MessageRoute: TypeAlias = (
    HandlesCommandRoute
    | RecordsEventRoute
    | HandlesEventRoute
    | ExecutesCommandRoute
    | SchedulesDeadlineRoute
)
"""Any message route."""


def registered_type(
    cls: object, kind: MessageKind, caller: str, registry: MessageTypeRegistry | None
) -> MessageType:
    """Return the registry entry of message class ``cls``, which must be of ``kind``.

    Raises:
        TypeError: ``cls`` is not a class, is of another kind, or is not
            registered; the message names it and says what to do.
    """
    base = f"dogma.{kind.name.title()}"
    if not isinstance(cls, type):
        raise TypeError(f"{caller}() takes {with_article(kind.value)} class, got {cls!r}")
    actual = kind_of(cls)
    if actual is not kind:
        if actual is None:
            what = "not a message class"
        else:
            what = f"{with_article(actual.value)} (derives from dogma.{actual.name.title()})"
        raise TypeError(
            f"{caller}() takes {with_article(kind.value)} class (a {base} subclass), "
            f"but {_qualified(cls)} is {what}"
        )
    reg = _global_registry if registry is None else registry
    entry = reg.of(cls)
    if entry is None:
        namesake = next((t for t in reg if _qualified(t.cls) == _qualified(cls)), None)
        if namesake is not None:
            # Two class objects of one name: the class statement ran twice (a
            # class defined in a function) or something copied the class
            # without its namespace, and only the other one was registered.
            raise TypeError(
                f"{_qualified(cls)} is not in the message type registry, but another class "
                f"with that name is ({namesake.id}); register the class object that is "
                f"routed with @dogma.register_{kind.value}(), applied to every class "
                "statement that creates it"
            )
        raise TypeError(
            f"{_qualified(cls)} is not in the message type registry; "
            f"register it with @dogma.register_{kind.value}('<uuid>') before routing it"
        )
    return entry


def handles_command(
    command_type: type, *, registry: MessageTypeRegistry | None = None
) -> HandlesCommandRoute:
    """Route commands of ``command_type`` to the handler being configured.

    Accepted by aggregate and integration configurers. At most one handler in
    an application may handle a given command type.

    Raises:
        TypeError: ``command_type`` is not a registered :class:`dogma.Command` subclass.
    """
    return HandlesCommandRoute(
        registered_type(command_type, MessageKind.COMMAND, "handles_command", registry)
    )


def records_event(
    event_type: type, *, registry: MessageTypeRegistry | None = None
) -> RecordsEventRoute:
    """Declare that the handler being configured records events of ``event_type``.

    Accepted by aggregate and integration configurers. At most one handler in
    an application may record a given event type.

    Raises:
        TypeError: ``event_type`` is not a registered :class:`dogma.Event` subclass.
    """
    return RecordsEventRoute(
        registered_type(event_type, MessageKind.EVENT, "records_event", registry)
    )


def handles_event(
    event_type: type, *, registry: MessageTypeRegistry | None = None
) -> HandlesEventRoute:
    """Route events of ``event_type`` to the handler being configured.

    Accepted by process and projection configurers; any number of handlers
    may handle the same event type.

    Raises:
        TypeError: ``event_type`` is not a registered :class:`dogma.Event` subclass.
    """
    return HandlesEventRoute(
        registered_type(event_type, MessageKind.EVENT, "handles_event", registry)
    )


def executes_command(
    command_type: type, *, registry: MessageTypeRegistry | None = None
) -> ExecutesCommandRoute:
    """Declare that the process being configured executes commands of ``command_type``.

    Raises:
        TypeError: ``command_type`` is not a registered :class:`dogma.Command` subclass.
    """
    return ExecutesCommandRoute(
        registered_type(command_type, MessageKind.COMMAND, "executes_command", registry)
    )


def schedules_deadline(
    deadline_type: type, *, registry: MessageTypeRegistry | None = None
) -> SchedulesDeadlineRoute:
    """Declare that the process being configured schedules deadlines of ``deadline_type``.

    Deadlines are delivered back to the process instance that scheduled them.

    Raises:
        TypeError: ``deadline_type`` is not a registered :class:`dogma.Deadline` subclass.
    """
    return SchedulesDeadlineRoute(
        registered_type(deadline_type, MessageKind.DEADLINE, "schedules_deadline", registry)
    )
