"""Projections: handlers that build read models from events."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, runtime_checkable

from ._errors import NotSupported
from ._handler import ConcurrencyPreference, HandlerConfigurer, HandlerScope
from ._messages import Event
from ._routes import ProjectionRoute


class ProjectionConfigurer(HandlerConfigurer, Protocol):
    """Configures a projection handler; implemented by engines."""

    def routes(self, *routes: ProjectionRoute) -> None:
        """Add routes: :func:`dogma.handles_event`."""
        ...

    def concurrency_preference(self, preference: ConcurrencyPreference) -> None:
        """Set the concurrency hint; the default is ``MAXIMIZE``."""
        ...


class ProjectionEventScope(HandlerScope, Protocol):
    """The scope passed to ``ProjectionMessageHandler.handle_event()``."""

    @property
    def recorded_at(self) -> datetime:
        """When the event was recorded."""
        ...

    @property
    def stream_id(self) -> str:
        """The ID (a lowercase UUID) of the event stream the event belongs to."""
        ...

    @property
    def offset(self) -> int:
        """The zero-based offset of the event within its stream."""
        ...

    @property
    def checkpoint_offset(self) -> int:
        """The offset the engine believes the handler will resume the stream from.

        It may be lower than :attr:`offset` when the stream holds events the
        handler does not consume.
        """
        ...


class ProjectionCompactScope(HandlerScope, Protocol):
    """The scope passed to ``ProjectionMessageHandler.compact()``."""


class ProjectionResetScope(HandlerScope, Protocol):
    """The scope passed to ``ProjectionMessageHandler.reset()``."""


@runtime_checkable
class ProjectionMessageHandler(Protocol):
    """Builds a read model from events, with optimistic concurrency per stream (ADR-26)."""

    def configure(self, c: ProjectionConfigurer) -> None:
        """Declare the handler's identity and routes; must be deterministic."""
        ...

    async def handle_event(self, scope: ProjectionEventScope, event: Event) -> int:
        """Apply ``event`` if the checkpoints agree and return the new checkpoint.

        If the handler's stored checkpoint for ``scope.stream_id`` equals
        ``scope.checkpoint_offset``, atomically apply the event and store
        ``scope.offset + 1``, and return that. Otherwise change nothing and
        return the stored checkpoint; the engine resumes from it.
        """
        ...

    async def checkpoint_offset(self, stream_id: str) -> int:
        """Return the offset of the next event the handler expects from ``stream_id``."""
        ...

    async def compact(self, scope: ProjectionCompactScope) -> None:
        """Reduce the projection's data; may run concurrently with ``handle_event``."""
        ...

    async def reset(self, scope: ProjectionResetScope) -> None:
        """Delete all data and checkpoints, so the projection is rebuilt from history.

        Raise :class:`dogma.NotSupported` if the projection cannot be reset.
        """
        ...


class NoCompactBehavior:
    """Mixin for projections that need no compaction: ``compact()`` does nothing."""

    __slots__ = ()

    async def compact(self, scope: ProjectionCompactScope) -> None:
        """Do nothing."""
        del scope


class NoResetBehavior:
    """Mixin for projections that cannot be reset: ``reset()`` raises NotSupported."""

    __slots__ = ()

    async def reset(self, scope: ProjectionResetScope) -> None:
        """Raise :class:`dogma.NotSupported`."""
        del scope
        raise NotSupported("projection does not support reset")
