"""The application protocol and its configurer."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ._routes import HandlerRoute


class ApplicationConfigurer(Protocol):
    """Configures an application; implemented by engines."""

    def identity(self, name: str, key: str) -> None:
        """Set the application's identity; call it exactly once."""
        ...

    def routes(self, *routes: HandlerRoute) -> None:
        """Add handlers, made by :func:`dogma.via_aggregate` and friends."""
        ...


@runtime_checkable
class Application(Protocol):
    """A set of handlers for one business domain.

    Any object with a ``configure`` method is an application.
    """

    def configure(self, c: ApplicationConfigurer) -> None:
        """Declare the application's identity and handlers.

        The engine calls it at least once; it must declare the same
        configuration every time.
        """
        ...
