"""Protocols and values common to every handler kind."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Protocol


class ConcurrencyPreference(enum.Enum):
    """A hint about how much concurrency an integration or projection tolerates.

    It is only a hint: engines may ignore it.
    """

    MAXIMIZE = 0
    """Handle as many messages in parallel as possible (the default)."""

    MINIMIZE = 1
    """Try to handle one message at a time, to reduce conflicts or contention."""


class HandlerConfigurer(Protocol):
    """The configurer calls common to every handler kind; implemented by engines."""

    def identity(self, name: str, key: str) -> None:
        """Set the handler's identity; call it exactly once.

        ``name`` is for display and must be unique within the application;
        ``key`` is an immutable UUID that associates persisted state with the
        handler (see :func:`dogma.validate_identity_name` and
        :func:`dogma.validate_identity_key`).
        """
        ...

    def disable(self) -> None:
        """Keep the handler in the configuration but never deliver messages to it.

        Prefer disabling a handler conditionally to adding it conditionally,
        so that tools still see its routes.
        """
        ...


class HandlerScope(Protocol):
    """The operations every handler scope offers; implemented by engines."""

    def now(self) -> datetime:
        """Return the engine's current time (timezone-aware, UTC).

        Use it instead of the system clock: tests use a virtual clock.
        """
        ...

    def log(self, fmt: str, *args: object) -> None:
        """Log an informational message, ``%``-formatted like :mod:`logging`.

        Write it lowercase, without trailing punctuation, without sensitive
        data, for domain experts, e.g. ``"cannot cancel order %s, it has
        already shipped"``.
        """
        ...
