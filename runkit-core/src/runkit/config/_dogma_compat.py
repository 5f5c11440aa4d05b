"""The few places where configuration reads ``dogma`` objects.

Kept in one module so that the rest of the package depends only on ``dogma``'s
documented surface through these small functions.
"""

from __future__ import annotations

import dogma

from ._model import HandlerKind, RouteKind

__all__ = [
    "as_handler_route",
    "as_message_route",
    "describe_value",
    "kind_name",
    "name_problem",
    "normalise_key",
]


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid identity name (dogma's words), or ``None``."""
    try:
        dogma.validate_identity_name(name)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def normalise_key(key: object) -> tuple[str | None, str | None]:
    """``(lowercase key, None)`` for a valid identity key, else ``(None, why)``."""
    try:
        return dogma.validate_identity_key(key), None  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        return None, str(exc)


_HANDLER_ROUTES: dict[type, HandlerKind] = {
    dogma.AggregateHandlerRoute: HandlerKind.AGGREGATE,
    dogma.ProcessHandlerRoute: HandlerKind.PROCESS,
    dogma.IntegrationHandlerRoute: HandlerKind.INTEGRATION,
    dogma.ProjectionHandlerRoute: HandlerKind.PROJECTION,
}

_MESSAGE_ROUTES: dict[type, RouteKind] = {
    dogma.HandlesCommandRoute: RouteKind.HANDLES_COMMAND,
    dogma.RecordsEventRoute: RouteKind.RECORDS_EVENT,
    dogma.HandlesEventRoute: RouteKind.HANDLES_EVENT,
    dogma.ExecutesCommandRoute: RouteKind.EXECUTES_COMMAND,
    dogma.SchedulesDeadlineRoute: RouteKind.SCHEDULES_DEADLINE,
}


def as_handler_route(value: object) -> tuple[HandlerKind, object] | None:
    """The handler kind and handler of a ``dogma.via_*`` value, or ``None``."""
    kind = _HANDLER_ROUTES.get(type(value))
    if kind is None:
        return None
    return kind, value.handler  # type: ignore[attr-defined]


def as_message_route(value: object) -> tuple[RouteKind, dogma.MessageType] | None:
    """The route kind and message type of a message route value, or ``None``."""
    kind = _MESSAGE_ROUTES.get(type(value))
    if kind is None:
        return None
    entry = value.type  # type: ignore[attr-defined]
    if not isinstance(entry, dogma.MessageType):
        return None
    return kind, entry


def kind_name(entry: dogma.MessageType) -> str:
    """``"command"``, ``"event"`` or ``"deadline"``."""
    return entry.kind.value


def describe_value(value: object) -> object:
    """A comparable, printable summary of a value passed to ``routes()``.

    Two calls of ``configure()`` agree when their summaries are equal: routes
    compare by kind and message type, handler routes by kind and handler
    class (a fresh but equivalent handler object is fine).
    """
    handler = as_handler_route(value)
    if handler is not None:
        handler_kind, h = handler
        return _Shown(f"via_{handler_kind.value}({type(h).__qualname__})", (handler_kind, type(h)))
    message = as_message_route(value)
    if message is not None:
        route_kind, entry = message
        return _Shown(f"{route_kind.value}({entry.cls.__qualname__})", (route_kind, entry))
    return _Shown(repr(value), (type(value), repr(value)))


class _Shown:
    """A summary that compares by ``key`` and prints as ``text``."""

    __slots__ = ("key", "text")

    def __init__(self, text: str, key: object) -> None:
        self.text = text
        self.key = key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Shown) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__
