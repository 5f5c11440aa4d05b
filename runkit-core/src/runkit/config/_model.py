"""The immutable description of an application, as built by ``runkit.config.build``."""

from __future__ import annotations

import enum
from collections.abc import Iterable

import attrs

import dogma

__all__ = [
    "ApplicationConfig",
    "HandlerConfig",
    "HandlerKind",
    "Identity",
    "RouteConfig",
    "RouteKind",
]


@attrs.frozen
class Identity:
    """The name and key of an application or handler.

    The name is for people and may change; the key is a lowercase UUID that the
    engine uses to associate persisted state, so it must never change.
    """

    name: str
    key: str

    def __str__(self) -> str:
        return f"{self.name!r} ({self.key})"


class HandlerKind(enum.Enum):
    """The four kinds of message handler."""

    AGGREGATE = "aggregate"
    PROCESS = "process"
    INTEGRATION = "integration"
    PROJECTION = "projection"


class RouteKind(enum.Enum):
    """The five kinds of message route; the value is the ``dogma`` constructor's name."""

    HANDLES_COMMAND = "handles_command"
    RECORDS_EVENT = "records_event"
    HANDLES_EVENT = "handles_event"
    EXECUTES_COMMAND = "executes_command"
    SCHEDULES_DEADLINE = "schedules_deadline"

    @property
    def consumes(self) -> bool:
        """Whether a handler with this route receives messages of its type."""
        return self in _CONSUMING

    @property
    def produces(self) -> bool:
        """Whether a handler with this route creates messages of its type."""
        return self in _PRODUCING


# A deadline is both produced (scheduled) and consumed by the process that owns it.
_CONSUMING = frozenset(
    {RouteKind.HANDLES_COMMAND, RouteKind.HANDLES_EVENT, RouteKind.SCHEDULES_DEADLINE}
)
_PRODUCING = frozenset(
    {RouteKind.RECORDS_EVENT, RouteKind.EXECUTES_COMMAND, RouteKind.SCHEDULES_DEADLINE}
)


@attrs.frozen
class RouteConfig:
    """One message route of a handler: a route kind and a registered message type."""

    kind: RouteKind
    message_type: dogma.MessageType

    @property
    def message_class(self) -> type[dogma.Message]:
        """The Python class of the routed message type."""
        return self.message_type.cls

    def __str__(self) -> str:
        return f"{self.kind.value}({self.message_type.cls.__qualname__})"


@attrs.frozen
class HandlerConfig:
    """The validated configuration of one handler.

    ``handler`` is the object passed to ``dogma.via_*``; ``routes`` are in the
    order ``configure()`` declared them. A disabled handler stays in the
    configuration (for documentation and route analysis) but the engine never
    delivers messages to it.
    """

    kind: HandlerKind
    identity: Identity
    handler: object
    routes: tuple[RouteConfig, ...]
    disabled: bool = False
    concurrency: dogma.ConcurrencyPreference = dogma.ConcurrencyPreference.MAXIMIZE
    # Precomputed for handles()/produces(), which run once per message handled.
    _consumed: frozenset[type] = attrs.field(init=False, eq=False, repr=False)
    _produced: frozenset[type] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        consumed = frozenset(r.message_type.cls for r in self.routes if r.kind.consumes)
        produced = frozenset(r.message_type.cls for r in self.routes if r.kind.produces)
        object.__setattr__(self, "_consumed", consumed)
        object.__setattr__(self, "_produced", produced)

    def types_of(self, *kinds: RouteKind) -> tuple[dogma.MessageType, ...]:
        """The message types of this handler's routes of the given kinds, in route order."""
        return _unique(r.message_type for r in self.routes if r.kind in kinds)

    def consumed_types(self) -> tuple[dogma.MessageType, ...]:
        """The types delivered to this handler: commands, events and its own deadlines."""
        return _unique(r.message_type for r in self.routes if r.kind.consumes)

    def produced_types(self) -> tuple[dogma.MessageType, ...]:
        """The types this handler creates: events, commands and deadlines."""
        return _unique(r.message_type for r in self.routes if r.kind.produces)

    def handles(self, cls: type) -> bool:
        """Whether messages of class ``cls`` are delivered to this handler."""
        return cls in self._consumed

    def produces(self, cls: type) -> bool:
        """Whether this handler may create messages of class ``cls``."""
        return cls in self._produced

    def describe(self) -> str:
        """A label naming the handler for log and error messages."""
        return f"{self.kind.value} {self.identity} [{_qualified(self.handler)}]"


@attrs.frozen
class ApplicationConfig:
    """The validated configuration of an application and its handlers.

    Build one with ``runkit.config.build(app)``. Lookups by message class are
    precomputed, so they are cheap enough for the engine's hot paths.
    """

    identity: Identity
    app: object
    handlers: tuple[HandlerConfig, ...]

    _by_name: dict[str, HandlerConfig] = attrs.field(init=False, repr=False, eq=False)
    _by_key: dict[str, HandlerConfig] = attrs.field(init=False, repr=False, eq=False)
    _command_handlers: dict[type, HandlerConfig] = attrs.field(init=False, repr=False, eq=False)
    _recorders: dict[type, HandlerConfig] = attrs.field(init=False, repr=False, eq=False)
    _consumers: dict[type, tuple[HandlerConfig, ...]] = attrs.field(
        init=False, repr=False, eq=False
    )
    _reachable: dict[type, frozenset[type]] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        consumers: dict[type, list[HandlerConfig]] = {}
        commands: dict[type, HandlerConfig] = {}
        recorders: dict[type, HandlerConfig] = {}
        for h in self.handlers:
            for r in h.routes:
                cls = r.message_type.cls
                if r.kind is RouteKind.HANDLES_COMMAND:
                    commands.setdefault(cls, h)
                elif r.kind is RouteKind.RECORDS_EVENT:
                    recorders.setdefault(cls, h)
                elif r.kind is RouteKind.HANDLES_EVENT and not h.disabled:
                    consumers.setdefault(cls, []).append(h)
        # Frozen class: the indexes are derived data, set once here.
        object.__setattr__(self, "_by_name", {h.identity.name: h for h in self.handlers})
        object.__setattr__(self, "_by_key", {h.identity.key: h for h in self.handlers})
        object.__setattr__(self, "_command_handlers", commands)
        object.__setattr__(self, "_recorders", recorders)
        object.__setattr__(self, "_consumers", {k: tuple(v) for k, v in consumers.items()})
        object.__setattr__(self, "_reachable", {})

    def handler_by_name(self, name: str) -> HandlerConfig | None:
        """The handler named ``name``, or ``None``."""
        return self._by_name.get(name)

    def handler_by_key(self, key: str) -> HandlerConfig | None:
        """The handler whose identity key is ``key`` (compared case-insensitively), or ``None``."""
        return self._by_key.get(key.lower())

    def command_handler(self, cls: type) -> HandlerConfig | None:
        """The aggregate or integration that handles commands of class ``cls``, or ``None``.

        The handler is returned even when it is disabled; check
        ``HandlerConfig.disabled`` before delivering to it.
        """
        return self._command_handlers.get(cls)

    def recorder_of(self, cls: type) -> HandlerConfig | None:
        """The aggregate or integration that records events of class ``cls``, or ``None``.

        As with ``command_handler``, a disabled recorder is still returned.
        """
        return self._recorders.get(cls)

    def event_consumers(self, cls: type) -> tuple[HandlerConfig, ...]:
        """The enabled processes and projections that handle events of class ``cls``."""
        return self._consumers.get(cls, ())

    def message_types(self) -> tuple[dogma.MessageType, ...]:
        """Every message type routed by any handler, in order of first appearance."""
        return _unique(r.message_type for h in self.handlers for r in h.routes)

    def enabled_handlers(self, kind: HandlerKind | None = None) -> tuple[HandlerConfig, ...]:
        """The handlers that are not disabled, optionally only those of ``kind``."""
        return tuple(
            h for h in self.handlers if not h.disabled and (kind is None or h.kind is kind)
        )

    def reachable_events(self, command_cls: type) -> frozenset[type]:
        """The event classes that may follow, directly or transitively, from a command.

        Walks the static route graph over enabled handlers: the command's
        handler records events; processes that handle those events execute
        commands (also from their deadlines); those commands' handlers record
        more events; and so on. The result over-approximates what can really
        happen (a process may ignore an event), so an observed event class that
        is *not* in it can never be produced by this command. Returns an empty
        set for a command no enabled handler consumes.
        """
        cached = self._reachable.get(command_cls)
        if cached is not None:
            return cached

        events: set[type] = set()
        seen_commands: set[type] = set()
        seen_processes: set[int] = set()
        pending = [command_cls]
        while pending:
            cmd = pending.pop()
            if cmd in seen_commands:
                continue
            seen_commands.add(cmd)
            handler = self.command_handler(cmd)
            if handler is None or handler.disabled:
                continue
            for evt in handler.types_of(RouteKind.RECORDS_EVENT):
                if evt.cls in events:
                    continue
                events.add(evt.cls)
                for consumer in self.event_consumers(evt.cls):
                    if consumer.kind is HandlerKind.PROCESS and id(consumer) not in seen_processes:
                        seen_processes.add(id(consumer))
                        pending.extend(t.cls for t in consumer.types_of(RouteKind.EXECUTES_COMMAND))

        result = frozenset(events)
        self._reachable[command_cls] = result
        return result

    def events_following(self, event_classes: Iterable[type]) -> frozenset[type]:
        """The event classes that may still follow from events already recorded.

        Only processes react to events: the result is what the commands they
        execute (directly, or from their deadlines) may lead to. An observed
        class outside it, and not yet recorded, can no longer appear once the
        command that started the chain is done and recorded these events.
        """
        following: set[type] = set()
        seen: set[int] = set()
        for cls in event_classes:
            for consumer in self.event_consumers(cls):
                if consumer.kind is not HandlerKind.PROCESS or id(consumer) in seen:
                    continue
                seen.add(id(consumer))
                for command in consumer.types_of(RouteKind.EXECUTES_COMMAND):
                    following |= self.reachable_events(command.cls)
        return frozenset(following)


def _unique(types: Iterable[dogma.MessageType]) -> tuple[dogma.MessageType, ...]:
    return tuple(dict.fromkeys(types))


def _qualified(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"
