"""Event observers for CommandExecutor.execute_command()."""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable

import attrs
import pytest

import dogma

REG = dogma.MessageTypeRegistry()


@dogma.register_event("8520d995-5c0e-4905-9bbf-99b5f8028505", registry=REG)
@attrs.frozen
class DepositApproved(dogma.Event):
    amount: int


@dogma.register_command("6cd5ee09-b59d-45ef-a8ed-91cb1bb6940a", registry=REG)
class ApproveDeposit(dogma.Command):
    pass


async def large(event: DepositApproved) -> bool:
    return event.amount > 100


async def test_observe_holds_event_type_and_fn() -> None:
    observer = dogma.observe(DepositApproved, large, registry=REG)
    assert observer == dogma.EventObserver(DepositApproved, large)
    assert observer.event_type is DepositApproved
    assert observer.fn is large
    assert await observer.fn(DepositApproved(amount=101)) is True
    assert await observer.fn(DepositApproved(amount=1)) is False


def test_observe_refuses_unregistered_event() -> None:
    class Unknown(dogma.Event):
        pass

    with pytest.raises(
        TypeError,
        match=re.escape(
            f"{__name__}.{Unknown.__qualname__} is not in the message type registry; "
            "register it with @dogma.register_event('<uuid>') before routing it"
        ),
    ):
        dogma.observe(Unknown, large, registry=REG)  # type: ignore[arg-type]


def test_observe_refuses_a_command() -> None:
    with pytest.raises(
        TypeError,
        match=re.escape(
            "observe() takes an event class (a dogma.Event subclass), "
            f"but {__name__}.ApproveDeposit is a command (derives from dogma.Command)"
        ),
    ):
        dogma.observe(ApproveDeposit, large, registry=REG)  # type: ignore[arg-type, type-var]


def test_observe_refuses_a_non_callable() -> None:
    with pytest.raises(
        TypeError, match=re.escape("observe(): fn must be an async callable, got None")
    ):
        dogma.observe(DepositApproved, None, registry=REG)  # type: ignore[arg-type]


def test_observe_refuses_a_regular_function() -> None:
    # Refused at once: it used to fail only once the engine had taken the command.
    def sync(event: DepositApproved) -> bool:
        return True

    for fn in (sync, lambda event: True, len):
        with pytest.raises(
            TypeError,
            match=re.escape(f"observe(): fn must be a coroutine function (async def), got {fn!r}"),
        ):
            dogma.observe(DepositApproved, fn, registry=REG)  # type: ignore[arg-type]


class AsyncCallable:
    async def __call__(self, event: DepositApproved) -> bool:
        return True

    async def method(self, event: DepositApproved) -> bool:
        return True


async def test_observe_accepts_async_callables_that_are_not_functions() -> None:
    async def at_least(minimum: int, event: DepositApproved) -> bool:
        return event.amount >= minimum

    fns: list[Callable[[DepositApproved], Awaitable[bool]]] = [
        functools.partial(at_least, 5),
        AsyncCallable(),
        AsyncCallable().method,
    ]
    for fn in fns:
        observer = dogma.observe(DepositApproved, fn, registry=REG)
        assert observer.fn is fn
        assert await observer.fn(DepositApproved(amount=5)) is True


def test_observer_is_frozen() -> None:
    observer = dogma.observe(DepositApproved, large, registry=REG)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        observer.fn = large  # type: ignore[misc]
