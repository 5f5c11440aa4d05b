"""Message base classes, message kinds and validation scopes.

A message's kind is nominal: it is the base class (:class:`Command`,
:class:`Event` or :class:`Deadline`) the application's class derives from.
"""

import enum
from datetime import UTC, datetime
from typing import Self

import attrs

from . import _codec


class MessageKind(enum.Enum):
    """The kind of a message type, fixed by the base class it derives from."""

    COMMAND = "command"
    EVENT = "event"
    DEADLINE = "deadline"


def _in_utc(value: datetime | None) -> datetime | None:
    # Converter of the scopes' times; _aware (run after it) refuses what it leaves alone.
    if isinstance(value, datetime) and value.utcoffset() is not None:
        return value.astimezone(UTC)
    return value


def _aware(instance: object, attribute: "attrs.Attribute[datetime | None]", value: object) -> None:
    """Refuse a scope time that is not a timezone-aware ``datetime`` (or ``None``)."""
    del instance
    name = attribute.name
    if value is None:
        return
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__qualname__} {value!r}")
    if value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (in UTC), got naive {value!r}")


@attrs.frozen
class ValidationScope:
    """The context passed to ``Message.validate()``.

    Engines pass the kind-specific subclass (:class:`CommandValidationScope`,
    :class:`EventValidationScope` or :class:`DeadlineValidationScope`) when
    they know the extra details; a plain ``ValidationScope`` is always
    acceptable. Applications should annotate ``validate()`` with this base
    class so that every engine's scope is accepted. The subclasses' times
    are timezone-aware and held in UTC: a naive ``datetime`` raises
    ``ValueError``.

    Attributes:
        is_new: ``True`` when the message is being created (executed, recorded
            or scheduled), ``False`` when the engine re-validates a message it
            accepted earlier. Rules may become stricter over time by applying
            them only to new messages.
    """

    is_new: bool


@attrs.frozen
class CommandValidationScope(ValidationScope):
    """The validation scope of a command.

    Attributes:
        executed_at: When the command was submitted, if known (re-validation).
    """

    executed_at: datetime | None = attrs.field(
        default=None, kw_only=True, converter=_in_utc, validator=_aware
    )


@attrs.frozen
class EventValidationScope(ValidationScope):
    """The validation scope of an event.

    Attributes:
        recorded_at: When the event was recorded, if known (re-validation).
    """

    recorded_at: datetime | None = attrs.field(
        default=None, kw_only=True, converter=_in_utc, validator=_aware
    )


@attrs.frozen
class DeadlineValidationScope(ValidationScope):
    """The validation scope of a deadline.

    Attributes:
        scheduled_at: When the deadline was scheduled, if known (re-validation).
        scheduled_for: The time the deadline is scheduled for, if known.
    """

    scheduled_at: datetime | None = attrs.field(
        default=None, kw_only=True, converter=_in_utc, validator=_aware
    )
    scheduled_for: datetime | None = attrs.field(
        default=None, kw_only=True, converter=_in_utc, validator=_aware
    )


#: The class attribute where the registry records a class's registrations
#: (only in the class's own ``__dict__``: subclasses are not registered).
REGISTRATIONS_ATTRIBUTE = "__dogma_registrations__"

# Filled in once the kind base classes exist; Message.__init_subclass__ runs for them too.
_KIND_BASES: "dict[type[Message], MessageKind]" = {}


class Message:
    """The common base of :class:`Command`, :class:`Event` and :class:`Deadline`.

    Applications never derive from ``Message`` directly; they derive from one
    of the three kinds, normally as ``@attrs.frozen`` classes. Message values
    must be safe to share between tasks, which frozen classes with immutable
    fields (tuples rather than lists) are.

    The default :meth:`marshal_binary`/:meth:`unmarshal_binary` pair is a
    JSON codec for attrs classes; see :meth:`marshal_binary` for the field
    types it supports. A class may override both methods.
    """

    __slots__ = ()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        kinds = {k for base, k in _KIND_BASES.items() if issubclass(cls, base)}
        if len(kinds) > 1:
            names = " and ".join(f"dogma.{k.name.title()}" for k in _KIND_ORDER if k in kinds)
            raise TypeError(
                f"{cls.__qualname__} derives from both {names}; "
                "a message type must have exactly one kind"
            )
        # A class decorator that rebuilds a registered class (attrs does for
        # slotted classes) copies its namespace, registrations included, into
        # the new class: the registry moves each entry to the class in use.
        for registration in cls.__dict__.get(REGISTRATIONS_ATTRIBUTE, ()):
            registration.rebuilt(cls)

    def message_description(self) -> str:
        """Return a short, human-readable description of the message.

        Override it: descriptions are lowercase with no trailing punctuation
        and contain nothing sensitive. Commands use the present continuous
        ("opening account 123"), events the past tense ("opened account
        123"), deadlines read as just reached ("transfer 42 is ready to
        proceed"). The default is the class's qualified name.
        """
        return type(self).__qualname__

    def validate(self, scope: ValidationScope) -> None:
        """Raise :class:`dogma.ValidationError` if the message is malformed.

        The engine calls it with ``scope.is_new`` true whenever the message
        is created (executed, recorded or scheduled) and with ``is_new``
        false when it re-validates a stored message. The default accepts
        every message.
        """
        del scope

    def marshal_binary(self) -> bytes:
        """Return the message encoded as bytes.

        The default encodes an attrs class as a UTF-8 JSON object, field by
        field, following the field annotations. Supported field types:
        ``str``, ``int``, ``float`` (finite), ``bool``, ``None``,
        ``datetime`` (timezone-aware; stored and decoded in UTC),
        ``uuid.UUID``, ``enum.Enum`` subclasses with str/int/float/bool
        values, ``Literal`` of those, ``tuple`` (``tuple[X, ...]`` or fixed
        length), ``list``, ``frozenset``, ``set`` and ``dict`` (keys: str, int,
        UUID or enum) of supported types, nested attrs classes, and unions
        such as ``X | None``. Unions whose members would encode to the same
        JSON shape (e.g. two attrs classes) are stored as a one-key object
        ``{"<type name>": value}``.

        Raises:
            TypeError: The class is not an attrs class, an annotation is not
                supported, or a value does not match its annotation.
            ValueError: A datetime is naive or a float is not finite.
        """
        return _codec.encode(self)

    @classmethod
    def unmarshal_binary(cls, data: bytes) -> Self:
        """Return a new message decoded from ``data``, as made by :meth:`marshal_binary`.

        Fields missing from the data take their attrs defaults; unknown
        fields are ignored, so fields can be added (with defaults) and
        removed over time.

        Raises:
            ValueError: ``data`` is not a valid encoding of this class (for
                example, it holds a non-finite float or a naive datetime).
            TypeError: The class is not an attrs class or an annotation is
                not supported.
        """
        return _codec.decode(cls, data)


class Command(Message):
    """Base class of commands: requests for the application to do something.

    Exactly one aggregate or integration handles each command type.
    """

    __slots__ = ()


class Event(Message):
    """Base class of events: facts the application has recorded.

    Exactly one aggregate or integration records each event type; any number
    of processes and projections may handle it.
    """

    __slots__ = ()


class Deadline(Message):
    """Base class of deadlines: notifications a process schedules for itself.

    A deadline is delivered back to the process instance that scheduled it,
    never before the time it is scheduled for.
    """

    __slots__ = ()


_KIND_BASES.update(
    {Command: MessageKind.COMMAND, Event: MessageKind.EVENT, Deadline: MessageKind.DEADLINE}
)
_KIND_ORDER = (MessageKind.COMMAND, MessageKind.EVENT, MessageKind.DEADLINE)


def kind_of(cls: type) -> MessageKind | None:
    """Return the kind of message class ``cls``, or ``None`` if it is not a message."""
    if isinstance(cls, type) and issubclass(cls, Message) and cls not in _KIND_BASES:
        for base, kind in _KIND_BASES.items():
            if issubclass(cls, base):
                return kind
    return None
