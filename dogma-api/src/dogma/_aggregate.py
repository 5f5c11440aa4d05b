"""Aggregates: synchronous, deterministic handlers that record events."""

from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

from ._errors import NotSupported
from ._handler import HandlerConfigurer, HandlerScope
from ._messages import Command, Event
from ._routes import AggregateRoute


@runtime_checkable
class AggregateRoot(Protocol):
    """The state of one aggregate instance, rebuilt from its events.

    Required: :meth:`apply_event`. Optional, looked up by the engine:

    - ``aggregate_instance_description() -> str``: a lowercase summary for
      logs, without the identity, or ``""``.
    - ``marshal_binary() -> bytes`` / ``unmarshal_binary(data) -> None``:
      snapshots, an optimisation only. Raise :class:`dogma.NotSupported` (or
      inherit :class:`dogma.NoSnapshotBehavior`) when unsupported.
    """

    def apply_event(self, event: Event) -> None:
        """Change the root to reflect ``event``.

        Called when the handler records an event and when the engine replays
        history. It must accept historical event types, including ones the
        handler no longer records; ignore types that do not matter.
        """
        ...


R = TypeVar("R", bound=AggregateRoot)
R_co = TypeVar("R_co", bound=AggregateRoot, covariant=True)


class AggregateConfigurer(HandlerConfigurer, Protocol):
    """Configures an aggregate handler; implemented by engines."""

    def routes(self, *routes: AggregateRoute) -> None:
        """Add routes: :func:`dogma.handles_command` and :func:`dogma.records_event`."""
        ...


class AggregateCommandScope(HandlerScope, Protocol[R_co]):
    """The scope passed to ``AggregateMessageHandler.handle_command()``."""

    @property
    def instance_id(self) -> str:
        """The ID of the instance the command was routed to."""
        ...

    def record_event(self, event: Event) -> None:
        """Record ``event``.

        The engine validates it, checks that the handler routes it
        (``records_event``) and applies it to the root at once, so the rest
        of the handler sees the change. All events recorded in the scope are
        persisted atomically after ``handle_command`` returns.

        Raises:
            ValidationError: The event is invalid.
        """
        ...


@runtime_checkable
class AggregateMessageHandler(Protocol[R]):
    """Handles commands for many instances of one aggregate; all methods are synchronous.

    ``handle_command`` must be deterministic and free of side effects: decide
    only from the root, the scope and the command, and change the root only
    by recording events. The engine may call it any number of times.
    """

    def configure(self, c: AggregateConfigurer) -> None:
        """Declare the handler's identity and routes; must be deterministic."""
        ...

    def new(self) -> R:
        """Return a new root in its initial state."""
        ...

    def route_command_to_instance(self, command: Command) -> str:
        """Return the non-empty ID of the instance that handles ``command``.

        Raise :class:`dogma.UnexpectedMessage` for types the handler does not handle.
        """
        ...

    def handle_command(self, root: R, scope: AggregateCommandScope[R], command: Command) -> None:
        """Handle ``command`` by recording events on ``scope``.

        Raise :class:`dogma.UnexpectedMessage` for types the handler does not handle.
        """
        ...


class NoSnapshotBehavior:
    """Mixin for aggregate roots that do not support snapshots."""

    __slots__ = ()

    def marshal_binary(self) -> bytes:
        """Raise :class:`dogma.NotSupported`: the root has no snapshot form."""
        raise NotSupported("aggregate root does not support snapshots")

    def unmarshal_binary(self, data: bytes) -> None:
        """Raise :class:`dogma.NotSupported`: the root has no snapshot form."""
        del data
        raise NotSupported("aggregate root does not support snapshots")
