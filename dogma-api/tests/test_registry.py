"""Message type registration (ADR-27) and the registry."""

from __future__ import annotations

import re
import threading
import uuid

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dogma

ID1 = "0cfac865-a1d9-4fd2-b085-f8fce0053795"
ID2 = "75ef425c-3c42-4ead-8925-cd26cbea3139"
ID3 = "b5474f89-e985-4661-b85b-645347a4a645"


@pytest.fixture
def reg() -> dogma.MessageTypeRegistry:
    return dogma.MessageTypeRegistry()


def test_register_command_records_id_class_and_kind(reg: dogma.MessageTypeRegistry) -> None:
    @dogma.register_command(ID1, registry=reg)
    @attrs.frozen
    class Deposit(dogma.Command):
        amount: int

    entry = reg.of(Deposit)
    assert entry == dogma.MessageType(id=ID1, cls=Deposit, kind=dogma.MessageKind.COMMAND)
    assert reg.of(Deposit(amount=1)) is entry
    assert reg.by_id(ID1) is entry


def test_register_event_and_deadline_record_their_kinds(reg: dogma.MessageTypeRegistry) -> None:
    @dogma.register_event(ID1, registry=reg)
    class Opened(dogma.Event):
        pass

    @dogma.register_deadline(ID2, registry=reg)
    class Ready(dogma.Deadline):
        pass

    assert [(t.cls, t.kind) for t in reg] == [
        (Opened, dogma.MessageKind.EVENT),
        (Ready, dogma.MessageKind.DEADLINE),
    ]


def test_decorator_returns_the_class_unchanged(reg: dogma.MessageTypeRegistry) -> None:
    class Plain(dogma.Command):
        pass

    assert dogma.register_command(ID1, registry=reg)(Plain) is Plain


def test_id_is_normalised_to_lowercase(reg: dogma.MessageTypeRegistry) -> None:
    @dogma.register_command(ID1.upper(), registry=reg)
    class Upper(dogma.Command):
        pass

    entry = reg.of(Upper)
    assert entry is not None
    assert entry.id == ID1
    assert reg.by_id(ID1.upper()) is entry


def test_iteration_is_in_registration_order(reg: dogma.MessageTypeRegistry) -> None:
    classes: list[type[dogma.Message]] = []
    for i in range(5):
        cls = type(f"C{i}", (dogma.Event,), {})
        dogma.register_event(str(uuid.UUID(int=i + 1)), registry=reg)(cls)
        classes.append(cls)
    assert [t.cls for t in reg] == classes
    assert len(reg) == 5


def test_lookups_of_unregistered_return_none(reg: dogma.MessageTypeRegistry) -> None:
    class Unregistered(dogma.Command):
        pass

    assert reg.by_id(ID1) is None
    assert reg.of(Unregistered) is None
    assert reg.of(Unregistered()) is None
    assert Unregistered not in reg


def test_subclass_of_registered_class_is_not_registered(reg: dogma.MessageTypeRegistry) -> None:
    @dogma.register_command(ID1, registry=reg)
    class Base(dogma.Command):
        pass

    class Sub(Base):
        pass

    assert reg.of(Sub) is None
    assert Base in reg


def test_by_id_rejects_malformed_id(reg: dogma.MessageTypeRegistry) -> None:
    with pytest.raises(ValueError, match=re.escape("invalid message type ID '{" + ID1 + "}'")):
        reg.by_id("{" + ID1 + "}")


def test_registering_a_class_twice_is_refused(reg: dogma.MessageTypeRegistry) -> None:
    @dogma.register_command(ID1, registry=reg)
    class Twice(dogma.Command):
        pass

    name = f"{__name__}.{Twice.__qualname__}"
    with pytest.raises(
        ValueError, match=re.escape(f"cannot register {name} as {ID1}: it is already registered")
    ):
        dogma.register_command(ID1, registry=reg)(Twice)
    with pytest.raises(
        ValueError,
        match=re.escape(f"cannot register {name} as {ID2}: it is already registered as {ID1}"),
    ):
        dogma.register_command(ID2, registry=reg)(Twice)
    assert [t.id for t in reg] == [ID1]


def test_two_classes_under_one_id_are_refused(reg: dogma.MessageTypeRegistry) -> None:
    @dogma.register_command(ID1, registry=reg)
    class First(dogma.Command):
        pass

    class Second(dogma.Event):
        pass

    first = f"{__name__}.{First.__qualname__}"
    second = f"{__name__}.{Second.__qualname__}"
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"cannot register {second} as {ID1}: {ID1} is already associated with {first}"
        ),
    ):
        dogma.register_event(ID1.upper(), registry=reg)(Second)
    assert reg.of(Second) is None


def test_local_classes_with_the_same_name_are_distinct(reg: dogma.MessageTypeRegistry) -> None:
    def make() -> type[dogma.Command]:
        class Same(dogma.Command):
            pass

        return Same

    dogma.register_command(ID1, registry=reg)(make())
    with pytest.raises(ValueError, match="is already associated with"):
        dogma.register_command(ID1, registry=reg)(make())


def test_reloaded_module_class_replaces_its_entry(reg: dogma.MessageTypeRegistry) -> None:
    # importlib.reload() re-executes a module: a new class object with the same
    # module, qualified name and ID must not break registration.
    old = type("Reloaded", (dogma.Event,), {"__module__": "app.messages"})
    new = type("Reloaded", (dogma.Event,), {"__module__": "app.messages"})
    other = type("Other", (dogma.Event,), {"__module__": "app.messages"})
    dogma.register_event(ID1, registry=reg)(old)
    dogma.register_event(ID2, registry=reg)(other)
    dogma.register_event(ID1, registry=reg)(new)
    assert [t.cls for t in reg] == [new, other]
    assert reg.of(old) is None


@pytest.mark.parametrize(
    ("decorator", "base", "kind", "actual"),
    [
        (dogma.register_event, dogma.Command, "event", "a command"),
        (dogma.register_deadline, dogma.Command, "deadline", "a command"),
        (dogma.register_command, dogma.Event, "command", "an event"),
        (dogma.register_deadline, dogma.Event, "deadline", "an event"),
        (dogma.register_command, dogma.Deadline, "command", "a deadline"),
        (dogma.register_event, dogma.Deadline, "event", "a deadline"),
        (dogma.register_command, object, "command", "not a message class"),
    ],
)
def test_wrong_kind_is_refused(
    reg: dogma.MessageTypeRegistry, decorator: object, base: type, kind: str, actual: str
) -> None:
    cls = type("Wrong", (base,), {})
    register = decorator(ID1, registry=reg)  # type: ignore[operator]
    expected_base = {"command": "Command", "event": "Event", "deadline": "Deadline"}[kind]
    article = "an" if kind == "event" else "a"
    with pytest.raises(
        TypeError,
        match=re.escape(
            f"cannot register {__name__}.Wrong as {article} {kind} ({ID1}): it is {actual}; "
            f"{article} {kind} class must derive from dogma.{expected_base}"
        ),
    ):
        register(cls)
    assert len(reg) == 0


def test_base_classes_themselves_cannot_be_registered(reg: dogma.MessageTypeRegistry) -> None:
    with pytest.raises(TypeError, match="it is not a message class"):
        dogma.register_command(ID1, registry=reg)(dogma.Command)


def test_decorating_a_non_class_is_refused(reg: dogma.MessageTypeRegistry) -> None:
    with pytest.raises(TypeError, match=r"register_command\(\) must decorate a class, got 42"):
        dogma.register_command(ID1, registry=reg)(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "00000000-0000-0000-0000-000000000000",
        "{" + ID1 + "}",
        "urn:uuid:" + ID1,
        ID1.replace("-", ""),
        ID1[:-1] + "g",
    ],
)
def test_invalid_id_is_refused_at_the_call_naming_it(
    reg: dogma.MessageTypeRegistry, bad: str
) -> None:
    expected = rf"^register_event\(\): invalid message type ID {re.escape(repr(bad))}: "
    # At once, before any class is decorated...
    with pytest.raises(ValueError, match=expected):
        dogma.register_event(bad, registry=reg)
    # ...and so in the usual decorator form too.
    with pytest.raises(ValueError, match=expected):

        @dogma.register_event(bad, registry=reg)
        class BadId(dogma.Event):
            pass

    assert len(reg) == 0


def test_registry_register_refuses_an_invalid_id_naming_the_class(
    reg: dogma.MessageTypeRegistry,
) -> None:
    class BadId(dogma.Event):
        pass

    with pytest.raises(
        ValueError,
        match=(
            rf"^cannot register {re.escape(__name__)}\..*<locals>\.BadId as an event: "
            r"invalid message type ID 'nope': "
        ),
    ):
        reg.register(BadId, "nope", dogma.MessageKind.EVENT)
    assert len(reg) == 0


def test_decorator_without_its_argument_is_refused_at_once() -> None:
    class Forgot(dogma.Command):
        pass

    with pytest.raises(
        TypeError,
        match=re.escape(
            "register_command() takes the type's UUID as a str, "
            "e.g. @dogma.register_command('<uuid>'); got <class "
        ),
    ):
        dogma.register_command(Forgot)  # type: ignore[arg-type]


def test_non_str_id_is_refused() -> None:
    with pytest.raises(TypeError, match=r"takes the type's UUID as a str, .*; got UUID\('"):
        dogma.register_event(uuid.UUID(ID1))  # type: ignore[arg-type]


def test_register_method_refuses_non_str_id(reg: dogma.MessageTypeRegistry) -> None:
    class Direct(dogma.Event):
        pass

    with pytest.raises(
        TypeError,
        match=re.escape(
            f"cannot register {__name__}.{Direct.__qualname__} as an event: "
            "message type ID must be a str, got int 1"
        ),
    ):
        reg.register(Direct, 1, dogma.MessageKind.EVENT)  # type: ignore[arg-type]


@settings(deadline=None)
@given(st.uuids(allow_nil=False))
def test_forms_python_accepts_are_refused_as_type_ids(u: uuid.UUID) -> None:
    reg = dogma.MessageTypeRegistry()
    for form in ("{" + str(u) + "}", "urn:uuid:" + str(u), u.hex, u.hex.upper()):
        cls = type("Form", (dogma.Command,), {})
        with pytest.raises(ValueError, match=re.escape(f"invalid message type ID {form!r}")):
            dogma.register_command(form, registry=reg)(cls)
    assert len(reg) == 0


def test_unsupported_field_type_is_refused_at_registration(
    reg: dogma.MessageTypeRegistry,
) -> None:
    @attrs.frozen
    class HasBytes(dogma.Event):
        blob: bytes

    with pytest.raises(
        TypeError,
        match=re.escape(
            f"cannot register {__name__}.{HasBytes.__qualname__} as an event ({ID1}): "
            "field HasBytes.blob cannot be marshalled: bytes is not a supported field type; "
            "override marshal_binary() and unmarshal_binary() to store it"
        ),
    ):
        dogma.register_event(ID1, registry=reg)(HasBytes)


def test_custom_codec_allows_any_field_type(reg: dogma.MessageTypeRegistry) -> None:
    @attrs.frozen
    class Custom(dogma.Event):
        blob: bytes

        def marshal_binary(self) -> bytes:
            return self.blob

        @classmethod
        def unmarshal_binary(cls, data: bytes) -> Custom:
            return cls(blob=data)

    dogma.register_event(ID1, registry=reg)(Custom)
    entry = reg.of(Custom)
    assert entry is not None
    assert entry.unmarshal(b"\x00\x01") == Custom(blob=b"\x00\x01")


def test_global_registry_is_a_message_type_registry() -> None:
    assert isinstance(dogma.registry, dogma.MessageTypeRegistry)
    type_id = str(uuid.uuid4())

    @dogma.register_command(type_id)
    class GloballyRegistered(dogma.Command):
        pass

    entry = dogma.registry.by_id(type_id)
    assert entry is not None
    assert entry.cls is GloballyRegistered
    assert list(dogma.registry)[-1] is entry


def test_fresh_registry_does_not_touch_the_global_one(reg: dogma.MessageTypeRegistry) -> None:
    before = list(dogma.registry)

    @dogma.register_command(ID3, registry=reg)
    class Isolated(dogma.Command):
        pass

    assert list(dogma.registry) == before
    assert dogma.registry.of(Isolated) is None


def test_message_type_str_names_kind_class_and_id(reg: dogma.MessageTypeRegistry) -> None:
    @dogma.register_event(ID1, registry=reg)
    class Named(dogma.Event):
        pass

    assert str(reg.of(Named)) == f"event {__name__}.{Named.__qualname__} ({ID1})"


@settings(deadline=None)
@given(
    st.lists(
        st.tuples(st.uuids(allow_nil=False), st.sampled_from(list(dogma.MessageKind))),
        max_size=20,
        unique_by=lambda pair: pair[0],
    ),
    st.booleans(),
)
def test_registry_keeps_every_type_in_order_and_finds_it_in_any_case(
    specs: list[tuple[uuid.UUID, dogma.MessageKind]], upper: bool
) -> None:
    reg = dogma.MessageTypeRegistry()
    bases = {
        dogma.MessageKind.COMMAND: (dogma.Command, dogma.register_command),
        dogma.MessageKind.EVENT: (dogma.Event, dogma.register_event),
        dogma.MessageKind.DEADLINE: (dogma.Deadline, dogma.register_deadline),
    }
    classes = []
    for i, (type_id, kind) in enumerate(specs):
        base, register = bases[kind]
        cls = type(f"M{i}", (base,), {})
        text = str(type_id).upper() if upper else str(type_id)
        register(text, registry=reg)(cls)
        classes.append(cls)
    assert [(t.cls, t.id, t.kind) for t in reg] == [
        (cls, str(type_id), kind) for cls, (type_id, kind) in zip(classes, specs, strict=True)
    ]
    for cls, (type_id, _) in zip(classes, specs, strict=True):
        entry = reg.by_id(str(type_id).upper())
        assert entry is not None
        assert entry.cls is cls
        assert reg.of(cls) is entry


def test_concurrent_registrations_of_one_id_admit_exactly_one() -> None:
    reg = dogma.MessageTypeRegistry()
    classes = [type(f"Racer{i}", (dogma.Event,), {}) for i in range(8)]
    barrier = threading.Barrier(len(classes))
    errors: list[BaseException] = []

    def register(cls: type[dogma.Event]) -> None:
        barrier.wait()
        try:
            dogma.register_event(ID1, registry=reg)(cls)
        except ValueError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(cls,)) for cls in classes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reg) == 1
    assert len(errors) == len(classes) - 1
    winner = reg.by_id(ID1)
    assert winner is not None
    assert winner.cls in classes


# -- decorator order: register_* below a decorator that rebuilds the class --------------


def test_register_below_attrs_frozen_registers_the_class_attrs_creates(
    reg: dogma.MessageTypeRegistry,
) -> None:
    @dogma.register_event(ID1, registry=reg)
    class First(dogma.Event):
        pass

    @attrs.frozen
    @dogma.register_command(ID2, registry=reg)
    class Deposit(dogma.Command):
        amount: int

    @dogma.register_deadline(ID3, registry=reg)
    @attrs.frozen
    class Ready(dogma.Deadline):
        pass

    assert "__slots__" in Deposit.__dict__  # attrs did rebuild it
    assert Deposit in reg
    assert Deposit(amount=1) in reg
    entry = reg.of(Deposit)
    assert entry == dogma.MessageType(id=ID2, cls=Deposit, kind=dogma.MessageKind.COMMAND)
    assert reg.by_id(ID2) is entry
    assert entry in reg
    assert [t.cls for t in reg] == [First, Deposit, Ready]  # registration order kept
    assert len(reg) == 3
    assert entry.unmarshal(Deposit(amount=7).marshal_binary()) == Deposit(amount=7)
    route = dogma.handles_command(Deposit, registry=reg)
    assert route.type is entry
    # The class attrs replaced is no longer registered, and its ID is still taken.
    assert [c for c in reg if c.cls.__qualname__ == Deposit.__qualname__] == [entry]
    with pytest.raises(ValueError, match="is already associated with"):
        dogma.register_command(ID2, registry=reg)(type("Other", (dogma.Command,), {}))


def test_register_below_attrs_works_with_the_global_registry() -> None:
    type_id = str(uuid.uuid4())

    @attrs.define(frozen=True, kw_only=True)
    @dogma.register_event(type_id)
    class Opened(dogma.Event):
        account_id: str

    assert Opened in dogma.registry
    assert dogma.registry.by_id(type_id).cls is Opened  # type: ignore[union-attr]
    assert dogma.records_event(Opened).type.cls is Opened
    assert dogma.handles_event(Opened).type.cls is Opened


def test_register_below_attrs_in_two_registries(reg: dogma.MessageTypeRegistry) -> None:
    other = dogma.MessageTypeRegistry()

    @attrs.frozen
    @dogma.register_command(ID1, registry=reg)
    @dogma.register_command(ID2, registry=other)
    class Deposit(dogma.Command):
        amount: int

    assert reg.by_id(ID1) == dogma.MessageType(ID1, Deposit, dogma.MessageKind.COMMAND)
    assert other.by_id(ID2) == dogma.MessageType(ID2, Deposit, dogma.MessageKind.COMMAND)


def test_register_below_attrs_checks_the_codec_of_the_class_attrs_creates(
    reg: dogma.MessageTypeRegistry,
) -> None:
    with pytest.raises(TypeError, match=r"cannot register .*Bad as a command \(" + ID1):

        @attrs.frozen
        @dogma.register_command(ID1, registry=reg)
        class Bad(dogma.Command):
            lock: threading.Lock  # the default codec cannot store it

    assert len(reg) == 0
    assert reg.by_id(ID1) is None


def test_register_on_both_sides_of_attrs_is_a_duplicate(reg: dogma.MessageTypeRegistry) -> None:
    with pytest.raises(ValueError, match="it is already registered"):

        @dogma.register_command(ID1, registry=reg)
        @attrs.frozen
        @dogma.register_command(ID1, registry=reg)
        class Twice(dogma.Command):
            amount: int


def test_subclass_of_a_class_registered_below_attrs_is_not_registered(
    reg: dogma.MessageTypeRegistry,
) -> None:
    @attrs.frozen
    @dogma.register_command(ID1, registry=reg)
    class Base(dogma.Command):
        amount: int

    @attrs.frozen
    class Derived(Base):
        note: str = ""

    assert Base in reg
    assert Derived not in reg
    assert reg.of(Derived) is None
