"""Log conventions: one line per event, salient fields in the text, repeats rate-limited.

The default ``logging`` formatter prints only the message, so anything an
operator needs (the command ID, the message type, the handler, the partition)
goes in the text, not only in ``extra``. ``LogContext`` renders those fields
the same way everywhere and also supplies them as ``extra`` for structured
handlers::

    ctx = LogContext(partition=3, handler="accounts", command_id=cid, message_type=OpenAccount)
    _log.error("command failed %d times; moving it to the poison store (%s)", n, ctx,
               extra=ctx.extra)
    # ... moving it to the poison store (partition 3, handler accounts,
    #     command 0b7d..., type OpenAccount)

A failure that repeats for as long as an outage lasts is logged through a
``RateLimitedLog``: at most one line per key per interval, the next one saying
how many were suppressed in between. ``describe_error`` turns an exception into
a one-line reason that is never empty.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import attrs

import dogma

from .envelope import Envelope, _lookup

__all__ = [
    "MAX_ERROR_CHARS",
    "SHORT_ERROR_CHARS",
    "LogContext",
    "RateLimitedLog",
    "describe_error",
    "shortened",
]

#: The longest error text a poison record keeps (a handler's message may be huge).
MAX_ERROR_CHARS = 4096
#: What is left of it when the record would otherwise not fit the store.
SHORT_ERROR_CHARS = 256


def describe_error(exc: BaseException) -> str:
    """A one-line, never empty, reason for *exc*.

    Multi-line messages are folded onto one line; an exception without a
    message (``TimeoutError()``, a bare ``ConnectionError``) is named by its
    type, so a log line never ends in ``": "``.
    """
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    name = type(exc).__name__
    if not text:
        return {"TimeoutError": "timed out", "CancelledError": "cancelled"}.get(name, name)
    return text


def shortened(text: str, limit: int) -> str:
    """*text*, cut to at most *limit* characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return text[: limit - 20] + f"... ({len(text)} chars)"


def _type_name(message_type: str | type[Any] | None) -> str | None:
    if message_type is None or isinstance(message_type, str):
        return message_type
    return message_type.__name__


@attrs.frozen(kw_only=True)
class LogContext:
    """The fields that identify what a log line is about, rendered into its text.

    Every field is optional; ``str(ctx)`` lists the ones that are set, in a
    fixed order, e.g. ``partition 3, handler accounts, command 0b7d..., type
    OpenAccount``. ``extra`` is the same as a dict for ``logging``'s
    ``extra=`` (keys ``app``, ``partition``, ``handler``, ``command_id``,
    ``message_type``, ``instance_id``, ``node_id``).

    Attributes:
        app: The application's name or key.
        partition: The partition index.
        handler: The handler's name.
        command_id: The command's message ID.
        message_id: The ID of a message that is not a command (an event or a
            deadline).
        message_type: The message type (a class, or its name).
        instance_id: An aggregate or process instance ID.
        node_id: A node ID.
    """

    app: str | None = None
    partition: int | None = None
    handler: str | None = None
    command_id: str | None = None
    message_id: str | None = None
    message_type: str | None = attrs.field(default=None, converter=_type_name)
    instance_id: str | None = None
    node_id: str | None = None

    def __str__(self) -> str:
        parts = [
            f"{label} {value}"
            for label, value in (
                ("app", self.app),
                ("partition", self.partition),
                ("handler", self.handler),
                ("command", self.command_id),
                ("message", self.message_id),
                ("type", self.message_type),
                ("instance", None if self.instance_id is None else repr(self.instance_id)),
                ("node", self.node_id),
            )
            if value is not None
        ]
        return ", ".join(parts)

    @classmethod
    def of_message(
        cls,
        envelope: Envelope,
        *,
        app: str | None = None,
        partition: int | None = None,
        handler: str | None = None,
        instance_id: str | None = None,
    ) -> LogContext:
        """The context of handling *envelope*: its ID and type name, plus the given fields."""
        try:
            entry: dogma.MessageType | None = _lookup(envelope.type_id)
        except LookupError:
            entry = None
        type_name = envelope.type_id if entry is None else entry.cls.__name__
        is_command = entry is not None and entry.kind is dogma.MessageKind.COMMAND
        return cls(
            app=app,
            partition=partition,
            handler=handler,
            command_id=envelope.message_id if is_command else None,
            message_id=None if is_command else envelope.message_id,
            message_type=type_name,
            instance_id=instance_id,
        )

    @property
    def extra(self) -> dict[str, object]:
        """The set fields, for ``logging``'s ``extra=`` argument."""
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


class RateLimitedLog:
    """Logs at most one line per key per *interval*; later lines count what was held back.

    For failures that repeat while an outage lasts (a store that is down, a
    peer that is unreachable): the first occurrence is logged at once, repeats
    within *interval* are counted, and the next line logged for the key ends
    in ``(N similar messages suppressed)``. Thread-safe, so log filters running
    in library threads may use it too. Keys should come from a small set (one
    per kind of failure and resource), as each is remembered until ``reset``.

    Args:
        logger: Where the lines go.
        interval: Seconds between two lines of one key.
        clock: Monotonic seconds (tests inject one).
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (when the last line was logged, repeats suppressed since)
        self._state: dict[Hashable, tuple[float, int]] = {}

    def admit(self, key: Hashable) -> int | None:
        """``None`` if a line for *key* must be held back; else how many were held back."""
        now = self._clock()
        with self._lock:
            last = self._state.get(key)
            if last is not None and now - last[0] < self.interval:
                self._state[key] = (last[0], last[1] + 1)
                return None
            self._state[key] = (now, 0)
            return 0 if last is None else last[1]

    def reset(self, key: Hashable) -> int:
        """Forget *key* (the condition ended), so its next line is logged at once.

        Returns how many lines were suppressed since the last one logged.
        """
        with self._lock:
            last = self._state.pop(key, None)
        return 0 if last is None else last[1]

    def log(
        self,
        level: int,
        key: Hashable,
        msg: str,
        *args: object,
        exc_info: Any = None,
        extra: Mapping[str, object] | None = None,
    ) -> bool:
        """Log ``msg % args`` at *level* unless *key* was logged within the interval.

        Returns whether the line was logged.
        """
        suppressed = self.admit(key)
        if suppressed is None or not self.logger.isEnabledFor(level):
            return False
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        self.logger.log(level, msg, *args, exc_info=exc_info, extra=extra)
        return True

    def warning(self, key: Hashable, msg: str, *args: object, **kwargs: Any) -> bool:
        """``log(logging.WARNING, ...)``."""
        return self.log(logging.WARNING, key, msg, *args, **kwargs)

    def info(self, key: Hashable, msg: str, *args: object, **kwargs: Any) -> bool:
        """``log(logging.INFO, ...)``."""
        return self.log(logging.INFO, key, msg, *args, **kwargs)

    def error(self, key: Hashable, msg: str, *args: object, **kwargs: Any) -> bool:
        """``log(logging.ERROR, ...)``."""
        return self.log(logging.ERROR, key, msg, *args, **kwargs)
