"""``Executor``: the ``dogma.CommandExecutor`` of one application on an engine.

``execute_command`` validates the command (``is_new=True``), finds its handler,
builds the envelope (command ID ``uuid5(app_key, idempotency_key)`` when a key
is given, else random), waits for its gateway (an engine, or a ``runkit.Client``)
to start, and returns once the command is durable. With observers it subscribes
to the chain's events (on this node and, over the node transport, at the owner
of the command's partition when the chain cannot leave it, else on every peer;
the peers' streams open only once the command's done note shows that the chain
goes on) *before* accepting, so no event can be missed, then waits in
``observers.wait_for_observers``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol

import dogma

from ..config import ApplicationConfig, HandlerKind
from .commands.acceptance import Acceptor, command_id_for, enabled_command_handler
from .envelope import new_envelope, validate_new
from .events.observers import (
    Subscription,
    satisfiable_observers,
    unsatisfiable,
    wait_for_observers,
)
from .ids import new_id
from .settings import EngineSettings
from .streams import Widen

__all__ = ["Executor", "Gateway"]


class Gateway(Protocol):
    """Where an executor sends commands: an engine, or a ``runkit.Client``."""

    @property
    def settings(self) -> EngineSettings:
        """Site key and clock for new envelopes."""
        ...

    async def acceptor(self, app_key: str) -> Acceptor:
        """The application's acceptor; waits until the gateway has started."""
        ...

    def subscribe(
        self,
        app_key: str,
        correlation_id: str,
        partition: int | None = None,
        widen: Widen | None = None,
    ) -> Subscription:
        """Events of the chain, wherever they are recorded (subscribed on entry).

        *partition*: the one partition the chain can reach (its events are
        recorded only there), or ``None`` when it may reach any. With *widen*,
        peers other than the command's partition's owner may be subscribed
        only once it is set (the command is done and the chain goes on).
        """
        ...


class Executor:
    """Executes commands of one application; safe to share."""

    def __init__(self, gateway: Gateway, app: ApplicationConfig) -> None:
        self._gateway = gateway
        self._app = app
        self._confined: dict[type, bool] = {}

    @property
    def app(self) -> ApplicationConfig:
        """The application this executor executes commands of."""
        return self._app

    async def execute_command(
        self,
        command: dogma.Command,
        *,
        idempotency_key: str | None = None,
        observers: Sequence[dogma.EventObserver[Any]] = (),
    ) -> None:
        """Execute *command*; see ``dogma.CommandExecutor.execute_command``.

        Blocks until the gateway has started, then until the command is durable.

        Raises:
            dogma.ValidationError: the command is invalid.
            ValueError: no enabled handler of the application consumes its
                type, the idempotency key is empty, or the aggregate routed it
                to an empty instance ID.
            TypeError: *command* is not a ``dogma.Command``, or an observer is
                not a ``dogma.EventObserver`` of a ``dogma.Event`` class with an
                async callable (as ``dogma.observe`` makes).
            dogma.EventObserverNotSatisfied: no observer can be satisfied any more
                (the command was executed all the same).
            runkit.engine.commands.inbox.EngineStopped: the engine stopped first.
            runkit.engine.commands.acceptance.Backlogged: the partition's backlog stayed
                over the limit.
        """
        if not isinstance(command, dogma.Command):
            raise TypeError(f"execute_command() takes a dogma.Command, got {command!r}")
        if idempotency_key is not None and (
            not isinstance(idempotency_key, str) or not idempotency_key
        ):
            raise ValueError(f"idempotency_key must be a non-empty str, got {idempotency_key!r}")
        # Checked before anything is stored, and taken once: a generator would
        # be empty when the observers are waited for.
        observers = tuple(observers)
        for observer in observers:
            _check_observer(observer)
        app_key = self._app.identity.key
        enabled_command_handler(self._app, type(command))  # ValueError if none takes it
        validate_new(command)
        settings = self._gateway.settings
        command_id = (
            command_id_for(app_key, idempotency_key) if idempotency_key is not None else new_id()
        )
        envelope = new_envelope(
            command,
            app_key=app_key,
            site_key=settings.site_key,
            created_at=settings.clock(),
            message_id=command_id,
            validated=True,
        )
        acceptor = await self._gateway.acceptor(app_key)
        routed = acceptor.route(envelope, keyed=idempotency_key is not None)
        if not observers:
            await acceptor.accept([routed])
            return
        if not satisfiable_observers(self._app, type(command), observers):
            # Known from the route graph: nothing to wait for. The command still
            # runs, so that the error means the same whenever it is raised.
            await acceptor.accept([routed])
            raise unsatisfiable(self._app, type(command), observers)
        partition = routed[0] if self._stays_in_partition(type(command)) else None
        # The chain reaches other nodes only through processes reacting to the
        # command's events: its subscription widens once those are known.
        widen = Widen()
        async with self._gateway.subscribe(
            app_key, envelope.correlation_id, partition, widen
        ) as events:
            if await acceptor.accept([routed]):
                widen.set()  # in an inbox: it may be handled anywhere, and later
            await wait_for_observers(
                self._app, envelope, type(command), observers, events, widen=widen.set
            )

    def _stays_in_partition(self, command_cls: type) -> bool:
        """Whether the command's chain ends with its own events (no process follows).

        Then every event of the chain is recorded on the command's partition
        and published by its owner, so only that node need be observed.
        """
        confined = self._confined.get(command_cls)
        if confined is None:
            confined = self._confined[command_cls] = not any(
                consumer.kind is HandlerKind.PROCESS
                for event in self._app.reachable_events(command_cls)
                for consumer in self._app.event_consumers(event)
            )
        return confined


def _check_observer(observer: object) -> None:
    """Raise ``TypeError`` unless *observer* is one ``dogma.observe`` could have made."""
    if not isinstance(observer, dogma.EventObserver):
        raise TypeError(
            f"execute_command() observers must be dogma.EventObserver (made by "
            f"dogma.observe()), got {observer!r}"
        )
    event_type = observer.event_type
    if not (isinstance(event_type, type) and issubclass(event_type, dogma.Event)):
        raise TypeError(f"an observer must observe a dogma.Event class, not {event_type!r}")
    fn = observer.fn
    if not callable(fn) or (inspect.isroutine(fn) and not inspect.iscoroutinefunction(fn)):
        raise TypeError(f"an observer's fn must be an async callable, got {fn!r}")
