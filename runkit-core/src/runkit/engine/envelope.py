"""Message envelopes: how the engine stores and moves Dogma messages.

An ``Envelope`` carries a message as (registry type ID, ``marshal_binary()``
bytes) plus the identities the architecture requires (site, application,
message, causation, correlation, producing handler and instance, times).
Envelopes are immutable msgspec Structs encoded as msgpack.

Message ownership (Dogma ADR-32): a message object never crosses the
engine/application boundary twice. ``to_message`` decodes a *fresh* object on
every call, so each delivery gets an independent copy (decoding is cheap: the
default codec is compiled with msgspec).

Stored messages are re-validated with ``is_new=False`` once per node (the
first time a message ID is decoded here), because the stored bytes may predate
the current rules. A stored message that no longer validates is still
delivered, with a warning: it was valid when it was recorded, it is part of
history, and refusing it would poison every consumer behind it (a rule
tightened in a new release must never stall projections on old events).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TypeVar

import msgspec

import dogma

from .ids import new_id

T = TypeVar("T")
_log = logging.getLogger("runkit.engine.envelope")

#: What msgspec raises for bytes it cannot decode: ``DecodeError``, and
#: ``UnicodeDecodeError`` (not a ``DecodeError``) for invalid UTF-8. Catch this
#: wherever malformed input (a peer's, a stored record's) is handled.
UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError)

#: Message IDs re-validated on this node (bounded): each is checked once.
_VALIDATED_CACHE = 100_000
_validated: OrderedDict[str, None] = OrderedDict()
#: Message types whose stored messages failed re-validation (warned once each).
_invalid_types: set[str] = set()

__all__ = [
    "UNDECODABLE",
    "Envelope",
    "RoutedMessages",
    "closing_iter",
    "decode",
    "encode",
    "message_class",
    "message_type",
    "new_envelope",
    "register_types",
    "to_message",
    "validate_new",
]


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """A message with its identities, as stored and passed between engine parts.

    Attributes:
        message_id: UUID string of this message.
        causation_id: ID of the message that caused this one (equal to
            ``message_id`` for commands from an executor).
        correlation_id: ID of the first message in the causal chain.
        app_key: Identity key of the application the message belongs to.
        site_key: Key of the site that created it, if one is configured.
        type_id: The message type's registry ID.
        description: ``message_description()`` at creation (for logs and tools).
        created_at: When the message was created (UTC): executed, recorded or
            scheduled.
        source_handler: Key of the handler that produced it, if any.
        source_instance: Instance ID of the producing handler, if any.
        scheduled_for: When a deadline is due; ``None`` for other messages.
        data: ``message.marshal_binary()``.
    """

    message_id: str
    causation_id: str
    correlation_id: str
    app_key: str
    site_key: str | None
    type_id: str
    description: str
    created_at: datetime
    source_handler: str | None = None
    source_instance: str | None = None
    scheduled_for: datetime | None = None
    data: bytes


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)


def encode(env: Envelope) -> bytes:
    """Encode an envelope as msgpack."""
    return _encoder.encode(env)


def decode(data: bytes) -> Envelope:
    """Decode an envelope made by :func:`encode`.

    Raises:
        msgspec.DecodeError: ``data`` is not an encoded envelope.
    """
    return _decoder.decode(data)


# Types of the registered applications, by ID. Applications may register their
# messages on a private ``dogma.MessageTypeRegistry`` (tests do), so the engine
# records every type its applications route and consults the global registry
# only for IDs it has not seen.
_types: dict[str, dogma.MessageType] = {}
_types_by_cls: dict[type, dogma.MessageType] = {}


def register_types(types: Iterable[dogma.MessageType]) -> None:
    """Make message types known to :func:`to_message` (called for each engine application)."""
    for t in types:
        _types[t.id] = t
        _types_by_cls[t.cls] = t


def message_type(message: dogma.Message) -> dogma.MessageType:
    """Return the registry entry of *message*'s class.

    Raises:
        ValueError: the class is not registered.
    """
    cls = type(message)
    entry = _types_by_cls.get(cls) or dogma.registry.of(message)
    if entry is None:
        raise ValueError(
            f"{cls.__module__}.{cls.__qualname__} is not a registered message type; "
            "decorate it with dogma.register_command/register_event/register_deadline"
        )
    return entry


def message_class(env: Envelope) -> type[dogma.Message] | None:
    """The class the envelope's message decodes to, or ``None`` if its type is unknown here."""
    entry = _find(env.type_id)
    return None if entry is None else entry.cls


def _find(type_id: str) -> dogma.MessageType | None:
    return _types.get(type_id) or dogma.registry.by_id(type_id)


def _lookup(type_id: str) -> dogma.MessageType:
    entry = _find(type_id)
    if entry is None:
        raise LookupError(f"message type {type_id} is not registered in this process")
    return entry


# The scopes of new commands and events carry no times: one (frozen) object each.
_NEW_SCOPES: dict[dogma.MessageKind, dogma.ValidationScope] = {
    dogma.MessageKind.COMMAND: dogma.CommandValidationScope(is_new=True),
    dogma.MessageKind.EVENT: dogma.EventValidationScope(is_new=True),
}


def _scope(
    kind: dogma.MessageKind,
    *,
    is_new: bool,
    created_at: datetime | None,
    scheduled_for: datetime | None = None,
) -> dogma.ValidationScope:
    if is_new and created_at is None and kind is not dogma.MessageKind.DEADLINE:
        return _NEW_SCOPES[kind]
    if kind is dogma.MessageKind.COMMAND:
        return dogma.CommandValidationScope(is_new=is_new, executed_at=created_at)
    if kind is dogma.MessageKind.EVENT:
        return dogma.EventValidationScope(is_new=is_new, recorded_at=created_at)
    return dogma.DeadlineValidationScope(
        is_new=is_new, scheduled_at=created_at, scheduled_for=scheduled_for
    )


def validate_new(message: dogma.Message, *, scheduled_for: datetime | None = None) -> None:
    """Validate a message as it enters the engine (``is_new=True``).

    Raises:
        dogma.ValidationError: the message is malformed.
        TypeError: *message* is not a Dogma message.
    """
    if isinstance(message, dogma.Command):
        kind = dogma.MessageKind.COMMAND
    elif isinstance(message, dogma.Event):
        kind = dogma.MessageKind.EVENT
    elif isinstance(message, dogma.Deadline):
        kind = dogma.MessageKind.DEADLINE
    else:
        raise TypeError(f"expected a dogma message, got {type(message).__qualname__}")
    message.validate(_scope(kind, is_new=True, created_at=None, scheduled_for=scheduled_for))


def new_envelope(
    message: dogma.Message,
    *,
    app_key: str,
    site_key: str | None,
    created_at: datetime,
    message_id: str | None = None,
    causation_id: str | None = None,
    correlation_id: str | None = None,
    source_handler: str | None = None,
    source_instance: str | None = None,
    scheduled_for: datetime | None = None,
    validated: bool = False,
) -> Envelope:
    """Build the envelope of a new message; it is *not* validated here.

    ``message_id`` defaults to a random UUID; ``causation_id`` and
    ``correlation_id`` default to the message ID (a root message). The message
    is marshalled now, so later changes to the object cannot leak into the
    engine (ADR-32). Pass *validated* when the caller has just validated the
    message (``validate_new``): this node then does not re-validate its
    decoded copies, which the current rules have already passed.
    """
    if created_at.tzinfo is None:
        raise ValueError("created_at must be timezone-aware")
    mid = message_id or new_id()
    if validated:
        _remember_validated(mid)
    return Envelope(
        message_id=mid,
        causation_id=causation_id or mid,
        correlation_id=correlation_id or mid,
        app_key=app_key,
        site_key=site_key,
        type_id=message_type(message).id,
        description=message.message_description(),
        created_at=created_at.astimezone(UTC),
        source_handler=source_handler,
        source_instance=source_instance,
        scheduled_for=scheduled_for.astimezone(UTC) if scheduled_for else None,
        data=message.marshal_binary(),
    )


def to_message(env: Envelope) -> dogma.Message:
    """Decode the envelope's message: a fresh object on every call (ADR-32).

    The first time this node decodes a message ID, the message is re-validated
    with ``is_new=False`` (and the envelope's times in the scope); a failure is
    logged, once per message type, and the message is delivered all the same
    (see the module docstring).

    Raises:
        LookupError: the type ID is unknown in this process.
        ValueError: the data does not decode as the registered class.
    """
    entry = _lookup(env.type_id)
    message = entry.unmarshal(env.data)
    if env.message_id not in _validated:
        _revalidate(entry, env, message)
    return message


class RoutedMessages:
    """Messages decoded for one handler's routing, kept for its first handling.

    Dogma hands a handler's routing (``route_*_to_instance``) and its handling
    the same message, so the handling takes the object routing was given
    instead of decoding the envelope again. Each is handed out once: a retry
    decodes its own copy (ADR-32), and other handlers never see it (keep one
    of these per handler, or per node for commands, which have one handler
    each). Kept by message ID and checked against the envelope's data, so a
    different message under the same ID is decoded. Bounded: the oldest are
    forgotten, and their handling decodes. Whoever keeps a message that
    another node then handles discards it.
    """

    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        self._kept: OrderedDict[str, tuple[bytes, dogma.Message]] = OrderedDict()

    def keep(self, env: Envelope, message: dogma.Message) -> None:
        """Keep *message*, decoded from *env* and given to routing, for the handling."""
        self._kept[env.message_id] = (env.data, message)
        if len(self._kept) > self._limit:
            self._kept.popitem(last=False)

    def take(self, env: Envelope) -> dogma.Message:
        """The message kept for *env*, handed out once; otherwise a fresh ``to_message``."""
        kept = self._kept.pop(env.message_id, None)
        if kept is not None and (kept[0] is env.data or kept[0] == env.data):
            return kept[1]
        return to_message(env)

    def discard(self, env: Envelope) -> None:
        """Forget what is kept for *env* (its handling was skipped)."""
        self._kept.pop(env.message_id, None)

    def __len__(self) -> int:
        return len(self._kept)


def _revalidate(entry: dogma.MessageType, env: Envelope, message: dogma.Message) -> None:
    try:
        message.validate(
            _scope(
                entry.kind,
                is_new=False,
                created_at=env.created_at,
                scheduled_for=env.scheduled_for,
            )
        )
    except dogma.ValidationError as exc:
        if env.type_id not in _invalid_types:
            _invalid_types.add(env.type_id)
            _log.warning(
                "stored %s %s (%s) no longer passes validate(): %s; delivering it anyway, "
                "as recorded (further failures of this type are not logged)",
                entry.cls.__qualname__,
                env.message_id,
                env.description,
                exc,
            )
    _remember_validated(env.message_id)


def _remember_validated(message_id: str) -> None:
    _validated[message_id] = None
    if len(_validated) > _VALIDATED_CACHE:
        _validated.popitem(last=False)


@asynccontextmanager
async def closing_iter(iterator: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Use an async iterator and close it (``aclose()``, if it has one) on exit.

    Store ``range()`` methods are typed as plain async iterators; closing them
    promptly when a loop stops early releases their resources on every backend.
    """
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
