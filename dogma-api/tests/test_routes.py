"""Handler routes (via_*) and message routes."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs
import pytest

import dogma

REG = dogma.MessageTypeRegistry()


@dogma.register_command("0cfac865-a1d9-4fd2-b085-f8fce0053795", registry=REG)
class Deposit(dogma.Command):
    pass


@dogma.register_event("699ae4e6-ea0a-4450-8a04-8ec5248b8042", registry=REG)
class DepositStarted(dogma.Event):
    pass


@dogma.register_deadline("b5474f89-e985-4661-b85b-645347a4a645", registry=REG)
class ReadyToProceed(dogma.Deadline):
    pass


class Unregistered(dogma.Command):
    pass


def entry(cls: type[dogma.Message]) -> dogma.MessageType:
    found = REG.of(cls)
    assert found is not None
    return found


# --------------------------------------------------------------------------- message routes


def test_message_routes_hold_the_registered_type() -> None:
    assert dogma.handles_command(Deposit, registry=REG) == dogma.HandlesCommandRoute(entry(Deposit))
    assert dogma.executes_command(Deposit, registry=REG) == dogma.ExecutesCommandRoute(
        entry(Deposit)
    )
    assert dogma.records_event(DepositStarted, registry=REG) == dogma.RecordsEventRoute(
        entry(DepositStarted)
    )
    assert dogma.handles_event(DepositStarted, registry=REG) == dogma.HandlesEventRoute(
        entry(DepositStarted)
    )
    assert dogma.schedules_deadline(ReadyToProceed, registry=REG) == dogma.SchedulesDeadlineRoute(
        entry(ReadyToProceed)
    )


def test_message_routes_are_frozen() -> None:
    route = dogma.handles_command(Deposit, registry=REG)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        route.type = entry(Deposit)  # type: ignore[misc]


def test_message_routes_use_the_global_registry_by_default() -> None:
    with pytest.raises(TypeError, match="is not in the message type registry"):
        dogma.handles_command(Deposit)


MESSAGE_ROUTES: list[tuple[Callable[..., object], str, str]] = [
    (dogma.handles_command, "command", "Command"),
    (dogma.executes_command, "command", "Command"),
    (dogma.records_event, "event", "Event"),
    (dogma.handles_event, "event", "Event"),
    (dogma.schedules_deadline, "deadline", "Deadline"),
]


@pytest.mark.parametrize(("route", "kind", "base"), MESSAGE_ROUTES)
def test_message_route_refuses_unregistered_type(
    route: Callable[..., object], kind: str, base: str
) -> None:
    cls = type("NotRegistered", (getattr(dogma, base),), {})
    with pytest.raises(
        TypeError,
        match=re.escape(
            f"{__name__}.NotRegistered is not in the message type registry; "
            f"register it with @dogma.register_{kind}('<uuid>') before routing it"
        ),
    ):
        route(cls, registry=REG)


@pytest.mark.parametrize(("route", "kind", "base"), MESSAGE_ROUTES)
def test_message_route_refuses_wrong_kind(
    route: Callable[..., object], kind: str, base: str
) -> None:
    wrong = ReadyToProceed if kind != "deadline" else Deposit
    wrong_kind = "a deadline" if kind != "deadline" else "a command"
    wrong_base = "Deadline" if kind != "deadline" else "Command"
    article = "an" if kind == "event" else "a"
    with pytest.raises(
        TypeError,
        match=re.escape(
            f"{route.__name__}() takes {article} {kind} class (a dogma.{base} subclass), "
            f"but {__name__}.{wrong.__qualname__} is {wrong_kind} (derives from dogma.{wrong_base})"
        ),
    ):
        route(wrong, registry=REG)


@pytest.mark.parametrize(("route", "kind", "base"), MESSAGE_ROUTES)
def test_message_route_refuses_non_message(
    route: Callable[..., object], kind: str, base: str
) -> None:
    with pytest.raises(TypeError, match=re.escape("but str is not a message class")):
        route(str, registry=REG)
    with pytest.raises(TypeError, match=re.escape(f"{route.__name__}() takes ")):
        route(Deposit(), registry=REG)


# --------------------------------------------------------------------------- handler routes


class Aggregate:
    def configure(self, c: Any) -> None: ...
    def new(self) -> Any: ...
    def route_command_to_instance(self, command: Any) -> str:
        return ""

    def handle_command(self, root: Any, scope: Any, command: Any) -> None: ...


class Process:
    def configure(self, c: Any) -> None: ...
    def new(self) -> Any: ...
    async def route_event_to_instance(self, event: Any) -> str | None:
        return None

    async def handle_event(self, root: Any, scope: Any, event: Any) -> None: ...
    async def handle_deadline(self, root: Any, scope: Any, deadline: Any) -> None: ...


class Integration:
    def configure(self, c: Any) -> None: ...
    async def handle_command(self, scope: Any, command: Any) -> None: ...


class Projection:
    def configure(self, c: Any) -> None: ...
    async def handle_event(self, scope: Any, event: Any) -> int:
        return 0

    async def checkpoint_offset(self, stream_id: str) -> int:
        return 0

    async def compact(self, scope: Any) -> None: ...
    async def reset(self, scope: Any) -> None: ...


HANDLER_ROUTES: list[tuple[Callable[[Any], object], type, type, str]] = [
    (dogma.via_aggregate, Aggregate, dogma.AggregateHandlerRoute, "aggregate"),
    (dogma.via_process, Process, dogma.ProcessHandlerRoute, "process"),
    (dogma.via_integration, Integration, dogma.IntegrationHandlerRoute, "integration"),
    (dogma.via_projection, Projection, dogma.ProjectionHandlerRoute, "projection"),
]


@pytest.mark.parametrize(("via", "handler_cls", "route_cls", "kind"), HANDLER_ROUTES)
def test_handler_route_holds_the_handler(
    via: Callable[[Any], object], handler_cls: type, route_cls: type, kind: str
) -> None:
    handler = handler_cls()
    route = via(handler)
    assert type(route) is route_cls
    assert route.handler is handler  # type: ignore[attr-defined]


@pytest.mark.parametrize(("via", "handler_cls", "route_cls", "kind"), HANDLER_ROUTES)
def test_handler_route_refuses_none(
    via: Callable[[Any], object], handler_cls: type, route_cls: type, kind: str
) -> None:
    with pytest.raises(TypeError, match=re.escape(f"via_{kind}(): handler cannot be None")):
        via(None)


@pytest.mark.parametrize(("via", "handler_cls", "route_cls", "kind"), HANDLER_ROUTES)
def test_handler_route_refuses_the_class_of_a_handler(
    via: Callable[[Any], object], handler_cls: type, route_cls: type, kind: str
) -> None:
    # The class has every method, so it used to be accepted and fail later.
    name = handler_cls.__name__
    with pytest.raises(
        TypeError,
        match=re.escape(
            f"via_{kind}(): pass an instance of {name}, not the class (e.g. via_{kind}({name}()))"
        ),
    ):
        via(handler_cls)


def _methods(cls: type) -> list[str]:
    return [name for name in vars(cls) if not name.startswith("_")]


@pytest.mark.parametrize(
    ("via", "handler_cls", "missing", "kind"),
    [
        (via, handler_cls, name, kind)
        for via, handler_cls, _, kind in HANDLER_ROUTES
        for name in _methods(handler_cls)
    ],
)
def test_handler_route_names_a_missing_method(
    via: Callable[[Any], object], handler_cls: type, missing: str, kind: str
) -> None:
    incomplete = type(
        "Incomplete", (), {k: v for k, v in vars(handler_cls).items() if k != missing}
    )
    with pytest.raises(
        TypeError,
        match=re.escape(
            f"{kind} handler {__name__}.Incomplete has no {missing}() method; "
            f"{kind} handlers must implement it"
        ),
    ):
        via(incomplete())


def test_handler_route_refuses_non_callable_attribute() -> None:
    class NotCallable(Integration):
        handle_command = None  # type: ignore[assignment]

    with pytest.raises(TypeError, match=r"has no handle_command\(\) method"):
        dogma.via_integration(NotCallable())


def test_async_method_that_is_sync_is_refused() -> None:
    class SyncProjection(Projection):
        def handle_event(self, scope: Any, event: Any) -> int:  # type: ignore[override]
            return 0

    with pytest.raises(
        TypeError,
        match=re.escape(
            f"projection handler {__name__}.{SyncProjection.__qualname__}: "
            "handle_event() must be a coroutine function (async def)"
        ),
    ):
        dogma.via_projection(SyncProjection())


def test_aggregate_method_that_is_async_is_refused() -> None:
    class AsyncAggregate(Aggregate):
        async def handle_command(self, root: Any, scope: Any, command: Any) -> None:  # type: ignore[override]
            pass

    with pytest.raises(
        TypeError,
        match=re.escape(
            f"aggregate handler {__name__}.{AsyncAggregate.__qualname__}: "
            "handle_command() must be a regular function, not async def"
        ),
    ):
        dogma.via_aggregate(AsyncAggregate())


def test_handler_routes_are_frozen_and_compare_by_handler() -> None:
    handler = Integration()
    route = dogma.via_integration(handler)
    assert route == dogma.via_integration(handler)
    assert route != dogma.via_integration(Integration())
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        route.handler = Integration()  # type: ignore[misc]


def test_mixins_satisfy_the_handler_checks() -> None:
    class StatelessProcess(dogma.StatelessProcessBehavior, dogma.NoDeadlineMessagesBehavior):
        def configure(self, c: dogma.ProcessConfigurer) -> None: ...
        async def route_event_to_instance(self, event: dogma.Event) -> str | None:
            return None

        async def handle_event(self, root: Any, scope: Any, event: dogma.Event) -> None: ...

    class SimpleProjection(dogma.NoCompactBehavior, dogma.NoResetBehavior):
        def configure(self, c: dogma.ProjectionConfigurer) -> None: ...
        async def handle_event(self, scope: Any, event: dogma.Event) -> int:
            return 0

        async def checkpoint_offset(self, stream_id: str) -> int:
            return 0

    dogma.via_process(StatelessProcess())
    dogma.via_projection(SimpleProjection())


def test_route_accepts_a_class_registered_below_attrs_frozen() -> None:
    reg = dogma.MessageTypeRegistry()

    @attrs.frozen  # attrs replaces the class the decorator below registered
    @dogma.register_command("9f1c3c52-5e0b-4a8e-9a47-2f6c1d0b7e13", registry=reg)
    class Backwards(dogma.Command):
        amount: int

    route = dogma.handles_command(Backwards, registry=reg)
    assert route.type.cls is Backwards


def test_route_explains_a_namesake_that_is_not_the_registered_class() -> None:
    reg = dogma.MessageTypeRegistry()

    def define(register: bool) -> type[dogma.Command]:
        @attrs.frozen
        class Again(dogma.Command):
            amount: int

        if register:
            dogma.register_command("9f1c3c52-5e0b-4a8e-9a47-2f6c1d0b7e13", registry=reg)(Again)
        return Again

    define(register=True)
    unregistered = define(register=False)
    with pytest.raises(
        TypeError,
        match=re.escape(
            f"{__name__}.{unregistered.__qualname__} is not in the message type registry, "
            "but another class with that name is (9f1c3c52-5e0b-4a8e-9a47-2f6c1d0b7e13); "
            "register the class object that is routed with @dogma.register_command(), "
            "applied to every class statement that creates it"
        ),
    ):
        dogma.handles_command(unregistered, registry=reg)


def test_async_callables_that_are_not_functions_are_accepted() -> None:
    class AsyncCallable:
        async def __call__(self, scope: Any, command: Any) -> None: ...

    class Wrapped:
        def configure(self, c: Any) -> None: ...

        handle_command = AsyncCallable()

    route = dogma.via_integration(Wrapped())
    assert isinstance(route, dogma.IntegrationHandlerRoute)
