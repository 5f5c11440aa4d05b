"""Processes: workflow handlers whose roots the engine stores."""

from collections.abc import Callable
from datetime import datetime
from typing import Protocol, TypeVar, runtime_checkable

import attrs

from ._errors import UnexpectedMessage
from ._handler import HandlerConfigurer, HandlerScope
from ._messages import Command, Deadline, Event
from ._routes import ProcessRoute


@runtime_checkable
class ProcessRoot(Protocol):
    """The state of one process instance, stored by the engine as bytes.

    Change it only inside ``scope.mutate(fn)``.
    """

    def process_instance_description(self, ended: bool) -> str:
        """Return a lowercase summary for logs, or ``""``.

        ``ended`` is true once the instance has ended, so the text can
        switch to the past tense.
        """
        ...

    def marshal_binary(self) -> bytes:
        """Return the root encoded as bytes."""
        ...

    def unmarshal_binary(self, data: bytes) -> None:
        """Replace the root's state with ``data``, as made by :meth:`marshal_binary`."""
        ...


R = TypeVar("R", bound=ProcessRoot)
R_co = TypeVar("R_co", bound=ProcessRoot, covariant=True)


class ProcessConfigurer(HandlerConfigurer, Protocol):
    """Configures a process handler; implemented by engines."""

    def routes(self, *routes: ProcessRoute) -> None:
        """Add routes: ``handles_event``, ``executes_command`` and ``schedules_deadline``."""
        ...


class ProcessScope(HandlerScope, Protocol[R_co]):
    """The operations common to the process scopes; implemented by engines.

    Commands and deadlines are buffered and persisted atomically with the
    root after the handler returns; all of it is discarded if it raises.
    """

    @property
    def instance_id(self) -> str:
        """The ID of the process instance."""
        ...

    def mutate(self, fn: Callable[[R_co], object]) -> None:
        """Change the root by calling ``fn(root)``; the only way to change it.

        The engine may skip ``fn`` (e.g. for a stateless root), so ``fn``
        must not use the scope or depend on conditions: decide first, then
        mutate. After ``mutate`` returns the root reflects the change. The
        engine persists the root only if ``mutate`` was called.

        Raises:
            RuntimeError: The instance has ended.
        """
        ...

    def end(self) -> None:
        """End the instance permanently.

        Its state is discarded, its pending deadlines are cancelled and later
        messages for it are ignored.
        """
        ...

    def execute_command(self, command: Command) -> None:
        """Execute ``command`` once the handler returns successfully.

        Raises:
            RuntimeError: The instance has ended.
            ValidationError: The command is invalid.
        """
        ...

    def schedule_deadline(self, deadline: Deadline, at: datetime) -> None:
        """Schedule ``deadline`` to be delivered back to this instance at ``at``.

        Raises:
            RuntimeError: The instance has ended.
            ValidationError: The deadline is invalid.
            ValueError: ``at`` is a naive datetime (no tzinfo, or one that gives
                no UTC offset).
            TypeError: ``at`` is not a datetime.
        """
        ...


class ProcessEventScope(ProcessScope[R_co], Protocol[R_co]):
    """The scope passed to ``ProcessMessageHandler.handle_event()``."""

    @property
    def recorded_at(self) -> datetime:
        """When the event being handled was recorded."""
        ...


class ProcessDeadlineScope(ProcessScope[R_co], Protocol[R_co]):
    """The scope passed to ``ProcessMessageHandler.handle_deadline()``."""

    @property
    def scheduled_for(self) -> datetime:
        """The time the deadline being handled was scheduled for."""
        ...


@runtime_checkable
class ProcessMessageHandler(Protocol[R]):
    """Handles events and deadlines for many instances of one process.

    ``configure`` and ``new`` are synchronous; the rest are coroutines. The
    engine persists the effects of exactly one successful call per message.
    """

    def configure(self, c: ProcessConfigurer) -> None:
        """Declare the handler's identity and routes; must be deterministic."""
        ...

    def new(self) -> R:
        """Return a new root in its initial state."""
        ...

    async def route_event_to_instance(self, event: Event) -> str | None:
        """Return the ID of the instance that handles ``event``, or ``None`` to ignore it.

        Raise :class:`dogma.UnexpectedMessage` for types the handler does not handle.
        """
        ...

    async def handle_event(self, root: R, scope: ProcessEventScope[R], event: Event) -> None:
        """Handle ``event`` for the instance ``scope.instance_id``."""
        ...

    async def handle_deadline(
        self, root: R, scope: ProcessDeadlineScope[R], deadline: Deadline
    ) -> None:
        """Handle a deadline this instance scheduled, once its time is reached."""
        ...


@attrs.frozen
class StatelessProcessRoot:
    """The root of a process that keeps no state.

    Its description is ``""``, it marshals to ``b""`` and unmarshals only
    ``b""``. Engines may store it specially.
    """

    def process_instance_description(self, ended: bool) -> str:
        """Return ``""``: a stateless instance has nothing to describe."""
        del ended
        return ""

    def marshal_binary(self) -> bytes:
        """Return ``b""``."""
        return b""

    def unmarshal_binary(self, data: bytes) -> None:
        """Accept only empty data.

        Raises:
            ValueError: ``data`` is not empty.
        """
        if data:
            raise ValueError(
                f"cannot unmarshal StatelessProcessRoot from {len(data)} bytes: "
                "a stateless root only unmarshals empty data"
            )


class StatelessProcessBehavior:
    """Mixin for stateless process handlers: ``new()`` returns a :class:`StatelessProcessRoot`."""

    __slots__ = ()

    def new(self) -> StatelessProcessRoot:
        """Return a :class:`StatelessProcessRoot`."""
        return StatelessProcessRoot()


class NoDeadlineMessagesBehavior:
    """Mixin for process handlers that schedule no deadlines."""

    __slots__ = ()

    async def handle_deadline(self, root: object, scope: object, deadline: Deadline) -> None:
        """Raise :class:`dogma.UnexpectedMessage`: the handler schedules no deadlines."""
        del root, scope
        raise UnexpectedMessage(deadline)
