"""What aggregate and integration scopes share: recording events and logging."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import NoReturn

import dogma

from ...config import HandlerConfig
from ..envelope import Envelope, new_envelope, validate_new
from ..streams import envelope_size
from .poison import HandlerBug

__all__ = ["EventRecorder", "handler_log"]

_app_log = logging.getLogger("runkit.app")


def handler_log(
    handler: HandlerConfig, envelope: Envelope, instance_id: str | None, fmt: str, args: object
) -> None:
    """Log a handler's ``scope.log()`` call, with the handler and message as context."""
    try:
        text = fmt % args if args else fmt
    except (TypeError, ValueError):
        text = f"{fmt} {args!r}"
    _app_log.info(
        text,
        extra={
            "handler": handler.identity.name,
            "handler_key": handler.identity.key,
            "instance": instance_id,
            "message_id": envelope.message_id,
            "message_description": envelope.description,
        },
    )


class EventRecorder:
    """Validates, routes and envelopes the events a handler records for one command.

    A routing or validation failure is a bug in the handler: it is remembered
    (so a handler that catches the exception cannot hide it) and poisons the
    command at once (``check``, ``failure``). An invalid event raises the
    ``dogma.ValidationError`` that ``validate()`` raised, as the API documents;
    the other bugs raise ``HandlerBug``. So are events too large for one stream
    record (more than *max_bytes* by ``envelope_size``): the store would refuse the
    record for ever, and the partition would commit nothing more.
    """

    def __init__(
        self,
        handler: HandlerConfig,
        command: Envelope,
        *,
        instance_id: str | None,
        site_key: str | None,
        clock: Callable[[], datetime],
        max_bytes: int,
    ) -> None:
        self.handler = handler
        self.command = command
        self.instance_id = instance_id
        self.site_key = site_key
        self.clock = clock
        self.events: list[Envelope] = []
        self.bug: str | None = None
        self._max_bytes = max_bytes
        self._size = 0

    def record(self, event: dogma.Event) -> Envelope:
        """Return the new event's envelope.

        Raises:
            dogma.ValidationError: The event is invalid.
            HandlerBug: The event may not be recorded for another reason.
        """
        if not isinstance(event, dogma.Event):
            self._bug(f"record_event() got {type(event).__qualname__}, which is not an event")
        if not self.handler.produces(type(event)):
            self._bug(
                f"{self.handler.describe()} recorded {type(event).__qualname__}, "
                "which it has no records_event route for"
            )
        try:
            validate_new(event)
        except dogma.ValidationError as exc:
            self._note(f"{self.handler.describe()} recorded an invalid event: {exc}")
            raise
        env = new_envelope(
            event,
            app_key=self.command.app_key,
            site_key=self.site_key,
            created_at=self.clock(),
            causation_id=self.command.message_id,
            correlation_id=self.command.correlation_id,
            source_handler=self.handler.identity.key,
            source_instance=self.instance_id,
            validated=True,
        )
        self._size += envelope_size(env)
        if self._size > self._max_bytes:
            self._bug(
                f"{self.handler.describe()} recorded {len(self.events) + 1} event(s) of about "
                f"{self._size} bytes for one command; the store's records take at most "
                f"{self._max_bytes} bytes of a command's events"
            )
        self.events.append(env)
        return env

    def check(self) -> None:
        """Raise ``HandlerBug`` if the handler made a mistake during this handling."""
        if self.bug is not None:
            raise HandlerBug(self.bug)

    def failure(self, error: Exception) -> Exception:
        """What a handling that raised *error* failed with.

        ``HandlerBug`` if the handler made a mistake (an invalid event it let
        propagate is then poisoned at once, not retried), else *error*.
        """
        if self.bug is None or isinstance(error, HandlerBug):
            return error
        return HandlerBug(self.bug)

    def _note(self, reason: str) -> None:
        if self.bug is None:
            self.bug = reason

    def _bug(self, reason: str) -> NoReturn:
        self._note(reason)
        raise HandlerBug(reason)
