"""Message base classes, kinds and validation scopes."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import attrs
import pytest

import dogma


@attrs.frozen(kw_only=True)
class OpenAccount(dogma.Command):
    account_id: str
    name: str

    def message_description(self) -> str:
        return f"opening account {self.account_id} {self.name}"

    def validate(self, scope: dogma.ValidationScope) -> None:
        if not self.account_id:
            raise dogma.ValidationError("open account: account ID must not be empty")
        if scope.is_new and not self.name:
            raise dogma.ValidationError("open account: name must not be empty")


def test_kinds_are_nominal_base_classes() -> None:
    assert issubclass(dogma.Command, dogma.Message)
    assert issubclass(dogma.Event, dogma.Message)
    assert issubclass(dogma.Deadline, dogma.Message)
    assert not issubclass(dogma.Command, dogma.Event)
    assert isinstance(OpenAccount(account_id="a", name="n"), dogma.Command)


@pytest.mark.parametrize(
    ("first", "second", "names"),
    [
        (dogma.Command, dogma.Event, "dogma.Command and dogma.Event"),
        (dogma.Event, dogma.Deadline, "dogma.Event and dogma.Deadline"),
        (dogma.Deadline, dogma.Command, "dogma.Command and dogma.Deadline"),
    ],
)
def test_a_class_cannot_have_two_kinds(first: type, second: type, names: str) -> None:
    with pytest.raises(
        TypeError,
        match=re.escape(
            f"Both derives from both {names}; a message type must have exactly one kind"
        ),
    ):
        type("Both", (first, second), {})


def test_validate_uses_the_scope() -> None:
    stored = OpenAccount(account_id="a", name="")
    stored.validate(dogma.ValidationScope(is_new=False))
    with pytest.raises(dogma.ValidationError, match=r"^open account: name must not be empty$"):
        stored.validate(dogma.ValidationScope(is_new=True))


def test_validation_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="account ID must not be empty"):
        OpenAccount(account_id="", name="n").validate(dogma.CommandValidationScope(is_new=True))


def test_default_validate_accepts_every_message() -> None:
    class Anything(dogma.Event):
        pass

    Anything().validate(dogma.EventValidationScope(is_new=True))  # does not raise


def test_default_description_is_the_class_name() -> None:
    class Described(dogma.Deadline):
        pass

    assert Described().message_description() == Described.__qualname__
    assert OpenAccount(account_id="a", name="n").message_description() == "opening account a n"


def test_kind_specific_scopes_are_validation_scopes() -> None:
    at = datetime(2024, 1, 1, tzinfo=UTC)
    command = dogma.CommandValidationScope(is_new=False, executed_at=at)
    event = dogma.EventValidationScope(is_new=False, recorded_at=at)
    deadline = dogma.DeadlineValidationScope(is_new=False, scheduled_at=at, scheduled_for=at)
    for scope in (command, event, deadline):
        assert isinstance(scope, dogma.ValidationScope)
        assert scope.is_new is False
    assert dogma.CommandValidationScope(is_new=True).executed_at is None
    assert dogma.EventValidationScope(is_new=True).recorded_at is None
    assert dogma.DeadlineValidationScope(is_new=True).scheduled_for is None


def test_validation_scopes_are_frozen_values() -> None:
    scope = dogma.ValidationScope(is_new=True)
    assert scope == dogma.ValidationScope(is_new=True)
    assert hash(scope) == hash(dogma.ValidationScope(is_new=True))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        scope.is_new = False  # type: ignore[misc]


def test_is_new_may_be_positional_but_times_are_keyword_only() -> None:
    assert dogma.ValidationScope(True) == dogma.ValidationScope(is_new=True)
    assert dogma.EventValidationScope(False).is_new is False
    with pytest.raises(TypeError, match="positional argument"):
        dogma.CommandValidationScope(True, datetime.now(UTC))  # type: ignore[call-arg]


def test_message_kind_values() -> None:
    assert [k.value for k in dogma.MessageKind] == ["command", "event", "deadline"]


def test_attrs_frozen_slotted_messages_have_no_instance_dict() -> None:
    # The base classes declare empty __slots__, so slotted subclasses stay slotted.
    message = OpenAccount(account_id="a", name="n")
    assert not hasattr(message, "__dict__")


def test_message_kinds_can_have_a_field_named_kind() -> None:
    @attrs.frozen
    class Typed(dogma.Event):
        kind: str

    assert Typed.unmarshal_binary(Typed(kind="x").marshal_binary()) == Typed(kind="x")


@pytest.mark.parametrize(
    ("cls", "name"),
    [
        (dogma.CommandValidationScope, "executed_at"),
        (dogma.EventValidationScope, "recorded_at"),
        (dogma.DeadlineValidationScope, "scheduled_at"),
        (dogma.DeadlineValidationScope, "scheduled_for"),
    ],
)
def test_scope_times_are_utc_and_naive_ones_are_refused(
    cls: type[dogma.ValidationScope], name: str
) -> None:
    naive = datetime(2024, 1, 1, 12, 30)
    with pytest.raises(
        ValueError,
        match=re.escape(f"{name} must be timezone-aware (in UTC), got naive {naive!r}"),
    ):
        cls(is_new=True, **{name: naive})
    with pytest.raises(TypeError, match=re.escape(f"{name} must be a datetime, got str '2024'")):
        cls(is_new=True, **{name: "2024"})
    plus_two = timezone(timedelta(hours=2))
    scope = cls(is_new=False, **{name: datetime(2024, 1, 1, 14, 30, tzinfo=plus_two)})
    at = getattr(scope, name)
    assert at == datetime(2024, 1, 1, 12, 30, tzinfo=UTC)
    assert at.tzinfo is UTC
