"""Integrations: handlers that talk to external systems."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ._handler import ConcurrencyPreference, HandlerConfigurer, HandlerScope
from ._messages import Command, Event
from ._routes import IntegrationRoute


class IntegrationConfigurer(HandlerConfigurer, Protocol):
    """Configures an integration handler; implemented by engines."""

    def routes(self, *routes: IntegrationRoute) -> None:
        """Add routes: :func:`dogma.handles_command` and :func:`dogma.records_event`."""
        ...

    def concurrency_preference(self, preference: ConcurrencyPreference) -> None:
        """Set the concurrency hint; the default is ``MAXIMIZE``."""
        ...


class IntegrationCommandScope(HandlerScope, Protocol):
    """The scope passed to ``IntegrationMessageHandler.handle_command()``."""

    def record_event(self, event: Event) -> None:
        """Record ``event``; events are persisted atomically after the handler returns.

        Raises:
            ValidationError: The event is invalid.
        """
        ...


@runtime_checkable
class IntegrationMessageHandler(Protocol):
    """Handles commands by acting on external systems.

    The engine may call ``handle_command`` more than once, concurrently, so
    its side effects must be idempotent and safe under concurrency.
    """

    def configure(self, c: IntegrationConfigurer) -> None:
        """Declare the handler's identity and routes; must be deterministic."""
        ...

    async def handle_command(self, scope: IntegrationCommandScope, command: Command) -> None:
        """Handle ``command``, optionally recording events on ``scope``.

        Raise :class:`dogma.UnexpectedMessage` for types the handler does not handle.
        """
        ...
