"""The message type registry (Dogma ADR-27).

Every message type is registered under a UUID. Engines store messages as
(type ID, bytes), so classes can be renamed or moved without breaking stored
data, and historical types can still be decoded.
"""

import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import attrs

from . import _codec
from ._identity import normalize_uuid
from ._messages import (
    REGISTRATIONS_ATTRIBUTE,
    Command,
    Deadline,
    Event,
    Message,
    MessageKind,
    kind_of,
)

M = TypeVar("M", bound=Message)
C = TypeVar("C", bound=Command)
E = TypeVar("E", bound=Event)
D = TypeVar("D", bound=Deadline)

_BASE_FOR_KIND: dict[MessageKind, type[Message]] = {
    MessageKind.COMMAND: Command,
    MessageKind.EVENT: Event,
    MessageKind.DEADLINE: Deadline,
}


@attrs.frozen
class MessageType:
    """A registered message type.

    Attributes:
        id: The type's UUID, in lowercase.
        cls: The message class.
        kind: The message kind, given by the class's base class.
    """

    id: str
    cls: type[Message]
    kind: MessageKind

    def unmarshal(self, data: bytes) -> Message:
        """Decode a message of this type with ``cls.unmarshal_binary(data)``."""
        return self.cls.unmarshal_binary(data)

    def __str__(self) -> str:
        return f"{self.kind.value} {_qualified(self.cls)} ({self.id})"


class MessageTypeRegistry:
    """A set of registered message types, iterated in registration order.

    ``dogma.registry`` is the global instance that the ``register_*``
    decorators and the route constructors use by default. Tests can create
    their own instances and pass them as ``registry=`` so the global one is
    left untouched. Lookups are safe from any thread; registration is
    serialised by a lock.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, MessageType] = {}
        self._by_cls: dict[type, MessageType] = {}
        self._lock = threading.Lock()

    def register(
        self,
        cls: type[M],
        type_id: str,
        kind: MessageKind,
        *,
        localns: dict[str, object] | None = None,
    ) -> MessageType:
        """Register message class ``cls`` of ``kind`` under ``type_id``.

        ``localns`` is the namespace ``cls`` was defined in, used to resolve
        string annotations that name function-local classes.

        Re-executing a module (``importlib.reload``) registers a new class
        object with the same module, qualified name and ID; that replaces the
        old entry instead of failing. Every other duplicate is an error.

        Returns:
            The new registry entry.

        Raises:
            TypeError: ``cls`` is not a class of ``kind``.
            ValueError: ``type_id`` is not a valid UUID, ``cls`` is already
                registered, or another class is registered under ``type_id``.
        """
        if not isinstance(kind, MessageKind):
            raise TypeError(f"kind must be a dogma.MessageKind, got {kind!r}")
        if not isinstance(cls, type):
            raise TypeError(f"register_{kind.value}() must decorate a class, got {cls!r}")
        what = f"{_qualified(cls)} as {with_article(kind.value)}"
        try:
            type_id = normalize_uuid(type_id, "message type ID")
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"cannot register {what}: {exc}") from None
        actual = kind_of(cls)
        if actual is not kind:
            base = _BASE_FOR_KIND[kind].__name__
            is_ = with_article(actual.value) if actual else "not a message class"
            raise TypeError(
                f"cannot register {what} ({type_id}): it is {is_}; "
                f"{with_article(kind.value)} class must derive from dogma.{base}"
            )
        try:
            _codec_check(cls, localns)
        except TypeError as exc:
            raise TypeError(f"cannot register {what} ({type_id}): {exc}") from None
        entry = MessageType(id=type_id, cls=cls, kind=kind)
        with self._lock:
            existing = self._by_cls.get(cls)
            if existing is not None:
                if existing.id == type_id:
                    raise ValueError(
                        f"cannot register {_qualified(cls)} as {type_id}: it is already registered"
                    )
                raise ValueError(
                    f"cannot register {_qualified(cls)} as {type_id}: "
                    f"it is already registered as {existing.id}"
                )
            other = self._by_id.get(type_id)
            if other is not None:
                if _is_reload_of(other, entry):
                    del self._by_cls[other.cls]
                else:
                    raise ValueError(
                        f"cannot register {_qualified(cls)} as {type_id}: "
                        f"{type_id} is already associated with {_qualified(other.cls)}"
                    )
            self._by_id[type_id] = entry
            self._by_cls[cls] = entry
        # Recorded on the class itself, so a copy of it made by a decorator
        # applied afterwards (attrs rebuilds slotted classes) takes its place.
        registration = _Registration(self, type_id, cls, localns)
        recorded = cls.__dict__.get(REGISTRATIONS_ATTRIBUTE, ())
        setattr(cls, REGISTRATIONS_ATTRIBUTE, (*recorded, registration))
        return entry

    def _adopt(self, registration: "_Registration", cls: type[Message]) -> None:
        """Move *registration*'s entry to *cls*, a rebuilt copy of its class."""
        old = registration.cls
        if cls is old:
            return
        with self._lock:
            entry = self._by_cls.get(old)
            if entry is None or entry.id != registration.type_id:
                return  # replaced since (a module reload): nothing to move
        problem: str | None = None
        if kind_of(cls) is not entry.kind:
            problem = f"the rebuilt class is not {with_article(entry.kind.value)}"
        else:
            try:
                _codec_check(cls, registration.localns)
            except TypeError as exc:
                problem = str(exc)
        if problem is not None:
            # The class the application would use cannot be registered: leave
            # nothing behind, so the error is the only outcome.
            with self._lock:
                if self._by_cls.get(old) is entry:
                    del self._by_cls[old]
                    del self._by_id[entry.id]
            what = f"{_qualified(cls)} as {with_article(entry.kind.value)} ({entry.id})"
            raise TypeError(f"cannot register {what}: {problem}")
        moved = MessageType(id=entry.id, cls=cls, kind=entry.kind)
        with self._lock:
            if self._by_cls.get(old) is not entry:
                return
            del self._by_cls[old]
            self._by_cls[cls] = moved
            self._by_id[entry.id] = moved  # same key: registration order is kept
            registration.cls = cls

    def by_id(self, type_id: str) -> MessageType | None:
        """Return the type registered under ``type_id`` (any case), or ``None``.

        Raises:
            ValueError: ``type_id`` is not a valid UUID.
        """
        return self._by_id.get(normalize_uuid(type_id, "message type ID"))

    def of(self, message_or_class: Message | type[Message]) -> MessageType | None:
        """Return the registered type of a message or message class, or ``None``.

        Only the exact class counts: a subclass of a registered class is not
        registered unless it was registered itself.
        """
        cls = message_or_class if isinstance(message_or_class, type) else type(message_or_class)
        return self._by_cls.get(cls)

    def __iter__(self) -> Iterator[MessageType]:
        """Iterate over the registered types in registration order."""
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, item: object) -> bool:
        """Whether ``item`` (a class, message or entry) is registered."""
        if isinstance(item, MessageType):
            return self._by_id.get(item.id) == item
        cls = item if isinstance(item, type) else type(item)
        return cls in self._by_cls

    def __repr__(self) -> str:
        return f"<MessageTypeRegistry with {len(self)} types>"


registry = MessageTypeRegistry()
"""The global message type registry."""


@attrs.define(eq=False)
class _Registration:
    """One registration of a class, kept in the class's ``__dogma_registrations__``.

    A decorator applied after the ``register_*`` one may replace the class
    with a rebuilt copy (attrs does for slotted classes, which is the
    default); the copy's namespace carries this record, and
    ``Message.__init_subclass__`` calls :meth:`rebuilt` for it, so the registry
    holds the class the application uses whatever the decorator order.
    """

    registry: MessageTypeRegistry
    type_id: str
    cls: type[Message]
    localns: dict[str, object] | None = attrs.field(repr=False)

    def rebuilt(self, cls: type[Message]) -> None:
        """Register *cls*, a rebuilt copy of ``self.cls``, in its place."""
        self.registry._adopt(self, cls)


def _make_decorator(
    kind: MessageKind, type_id: str, reg: MessageTypeRegistry | None
) -> Callable[[type[M]], type[M]]:
    # The ID is checked at the call, not when a class is decorated: a bad ID
    # is wrong whatever it decorates. A non-string usually means the decorator
    # was applied without its argument (@dogma.register_command).
    if not isinstance(type_id, str):
        raise TypeError(
            f"register_{kind.value}() takes the type's UUID as a str, "
            f"e.g. @dogma.register_{kind.value}('<uuid>'); got {type_id!r}"
        )
    try:
        normalize_uuid(type_id, "message type ID")
    except ValueError as exc:
        raise ValueError(f"register_{kind.value}(): {exc}") from None
    target = registry if reg is None else reg

    def decorate(cls: type[M]) -> type[M]:
        # The caller's locals resolve annotations such as `inner: Inner` (under
        # `from __future__ import annotations`) when Inner is local to a function.
        localns = sys._getframe(1).f_locals
        target.register(cls, type_id, kind, localns=localns)
        return cls

    return decorate


def register_command(
    type_id: str, *, registry: MessageTypeRegistry | None = None
) -> Callable[[type[C]], type[C]]:
    """Class decorator that registers a :class:`dogma.Command` subclass under ``type_id``.

    Example::

        @dogma.register_command("0cfac865-a1d9-4fd2-b085-f8fce0053795")
        @attrs.frozen(kw_only=True)
        class Deposit(dogma.Command):
            transaction_id: str
            amount: int

    It may go above or below ``@attrs.frozen``. attrs creates a new class for
    slotted classes; when it does so after registration, the new class takes
    the registered one's place (same ID, same position in the registry).

    Args:
        type_id: The type's UUID (36-character hyphenated form, not nil).
        registry: The registry to use; the global ``dogma.registry`` by default.

    Raises:
        ValueError: ``type_id`` is invalid (raised at the call), or already
            used, or the class is already registered (raised when the class is
            decorated, naming it).
        TypeError: ``type_id`` is not a str, the decorated class is not a
            ``dogma.Command``, or a field annotation is not supported by the
            default codec.
    """
    return _make_decorator(MessageKind.COMMAND, type_id, registry)


def register_event(
    type_id: str, *, registry: MessageTypeRegistry | None = None
) -> Callable[[type[E]], type[E]]:
    """Class decorator that registers a :class:`dogma.Event` subclass under ``type_id``.

    See :func:`register_command` for the arguments and errors.
    """
    return _make_decorator(MessageKind.EVENT, type_id, registry)


def register_deadline(
    type_id: str, *, registry: MessageTypeRegistry | None = None
) -> Callable[[type[D]], type[D]]:
    """Class decorator that registers a :class:`dogma.Deadline` subclass under ``type_id``.

    See :func:`register_command` for the arguments and errors.
    """
    return _make_decorator(MessageKind.DEADLINE, type_id, registry)


def _codec_check(cls: type[Message], localns: dict[str, object] | None) -> None:
    # Fail at registration, not at the first marshal, when the default codec
    # cannot store a field. Classes with their own codec are left alone.
    default_unmarshal = getattr(Message.unmarshal_binary, "__func__", None)
    if (
        cls.marshal_binary is Message.marshal_binary
        and getattr(cls.unmarshal_binary, "__func__", None) is default_unmarshal
        and attrs.has(cls)
    ):
        _codec.check(cls, localns)


def _is_reload_of(old: MessageType, new: MessageType) -> bool:
    return (
        old.kind is new.kind
        and old.cls.__module__ == new.cls.__module__
        and old.cls.__qualname__ == new.cls.__qualname__
        and "<locals>" not in new.cls.__qualname__
    )


def with_article(word: str) -> str:
    """Return ``word`` with its indefinite article: "a command", "an event"."""
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def _qualified(cls: type) -> str:
    module = getattr(cls, "__module__", None)
    name = getattr(cls, "__qualname__", repr(cls))
    return f"{module}.{name}" if module and module != "builtins" else name
