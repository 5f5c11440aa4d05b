"""The No…Behavior and Stateless… helpers, and the errors."""

from __future__ import annotations

import re
from typing import Any

import attrs
import pytest

import dogma


class Root(dogma.NoSnapshotBehavior):
    def apply_event(self, event: dogma.Event) -> None:
        pass


def test_no_snapshot_behavior_raises_not_supported() -> None:
    root = Root()
    with pytest.raises(dogma.NotSupported, match=r"^aggregate root does not support snapshots$"):
        root.marshal_binary()
    with pytest.raises(dogma.NotSupported, match=r"^aggregate root does not support snapshots$"):
        root.unmarshal_binary(b"")


def test_not_supported_is_a_not_implemented_error_with_a_default_message() -> None:
    assert issubclass(dogma.NotSupported, NotImplementedError)
    assert str(dogma.NotSupported()) == "not supported"


def test_stateless_process_root() -> None:
    root = dogma.StatelessProcessRoot()
    assert root.process_instance_description(ended=False) == ""
    assert root.process_instance_description(ended=True) == ""
    assert root.marshal_binary() == b""
    root.unmarshal_binary(b"")
    assert root == dogma.StatelessProcessRoot()


@pytest.mark.parametrize("data", [b"\x00", b"{}", b"x" * 10])
def test_stateless_process_root_refuses_non_empty_data(data: bytes) -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"cannot unmarshal StatelessProcessRoot from {len(data)} bytes: "
            "a stateless root only unmarshals empty data"
        ),
    ):
        dogma.StatelessProcessRoot().unmarshal_binary(data)


def test_stateless_process_root_is_immutable() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        dogma.StatelessProcessRoot().x = 1  # type: ignore[attr-defined]


def test_stateless_process_behavior_returns_a_stateless_root() -> None:
    class Handler(dogma.StatelessProcessBehavior):
        pass

    assert Handler().new() == dogma.StatelessProcessRoot()
    assert isinstance(Handler().new(), dogma.StatelessProcessRoot)


class Ready(dogma.Deadline):
    def message_description(self) -> str:
        return "transfer t1 is ready to proceed"


async def test_no_deadline_messages_behavior_raises_unexpected_message() -> None:
    class Handler(dogma.NoDeadlineMessagesBehavior):
        pass

    deadline = Ready()
    with pytest.raises(dogma.UnexpectedMessage) as info:
        await Handler().handle_deadline(dogma.StatelessProcessRoot(), object(), deadline)
    assert info.value.message is deadline
    assert str(info.value) == (
        f"unexpected message: {__name__}.Ready (transfer t1 is ready to proceed)"
    )


async def test_no_compact_behavior_does_nothing() -> None:
    class Handler(dogma.NoCompactBehavior):
        pass

    scope: Any = object()
    await Handler().compact(scope)  # does not raise


async def test_no_reset_behavior_raises_not_supported() -> None:
    class Handler(dogma.NoResetBehavior):
        pass

    scope: Any = object()
    with pytest.raises(dogma.NotSupported, match=r"^projection does not support reset$"):
        await Handler().reset(scope)


def test_unexpected_message_carries_any_value() -> None:
    error = dogma.UnexpectedMessage(42)
    assert error.message == 42
    assert str(error) == "unexpected message: builtins.int"


def test_unexpected_message_can_be_raised_without_the_message() -> None:
    # As Go handlers panic with the value: `raise dogma.UnexpectedMessage`.
    with pytest.raises(dogma.UnexpectedMessage, match=r"^unexpected message$") as info:
        raise dogma.UnexpectedMessage
    assert info.value.message is None


def test_unexpected_message_survives_a_broken_description() -> None:
    class Broken(dogma.Command):
        def message_description(self) -> str:
            raise RuntimeError("boom")

    assert str(dogma.UnexpectedMessage(Broken())) == (
        f"unexpected message: {__name__}.{Broken.__qualname__}"
    )


def test_error_hierarchy() -> None:
    assert issubclass(dogma.ValidationError, ValueError)
    assert issubclass(dogma.UnexpectedMessage, Exception)
    assert not issubclass(dogma.UnexpectedMessage, ValueError)
    assert str(dogma.EventObserverNotSatisfied()) == "event observer not satisfied"


def test_concurrency_preference() -> None:
    assert [p.name for p in dogma.ConcurrencyPreference] == ["MAXIMIZE", "MINIMIZE"]
    assert dogma.ConcurrencyPreference.MAXIMIZE.value == 0
    assert dogma.ConcurrencyPreference.MINIMIZE.value == 1
