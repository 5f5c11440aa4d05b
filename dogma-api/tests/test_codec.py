"""The default JSON codec of message classes."""

from __future__ import annotations

import enum
import json
import re
import typing
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Literal

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dogma


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@attrs.frozen
class Point:
    x: int
    y: int


@attrs.frozen
class Label:
    text: str


@attrs.frozen(kw_only=True)
class Everything(dogma.Event):
    s: str
    i: int
    f: float
    b: bool
    n: None
    at: datetime
    id: uuid.UUID
    colour: Colour
    level: Level
    mode: Literal["on", "off"]
    ints: tuple[int, ...]
    pair: tuple[str, int]
    names: list[str]
    tags: frozenset[str]
    scores: dict[str, float]
    by_id: dict[uuid.UUID, int]
    by_level: dict[Level, str]
    by_colour: dict[Colour, Point]
    by_number: dict[int, str]
    point: Point
    points: tuple[Point, ...]
    maybe: int | None
    choice: int | str
    shape: Point | Label | None
    text_or_time: str | datetime
    nested: tuple[tuple[int, ...], ...]
    default: str = "d"


aware = st.datetimes(timezones=st.just(UTC))
points = st.builds(Point, x=st.integers(), y=st.integers())
finite = st.floats(allow_nan=False, allow_infinity=False)

everything = st.builds(
    Everything,
    s=st.text(),
    i=st.integers(),
    f=finite,
    b=st.booleans(),
    n=st.none(),
    at=aware,
    id=st.uuids(),
    colour=st.sampled_from(Colour),
    level=st.sampled_from(Level),
    mode=st.sampled_from(["on", "off"]),
    ints=st.lists(st.integers()).map(tuple),
    pair=st.tuples(st.text(), st.integers()),
    names=st.lists(st.text()),
    tags=st.frozensets(st.text()),
    scores=st.dictionaries(st.text(), finite),
    by_id=st.dictionaries(st.uuids(), st.integers()),
    by_level=st.dictionaries(st.sampled_from(Level), st.text()),
    by_colour=st.dictionaries(st.sampled_from(Colour), points),
    by_number=st.dictionaries(st.integers(), st.text()),
    point=points,
    points=st.lists(points, max_size=3).map(tuple),
    maybe=st.none() | st.integers(),
    choice=st.integers() | st.text(),
    shape=st.none() | points | st.builds(Label, text=st.text()),
    text_or_time=st.text() | aware,
    nested=st.lists(st.lists(st.integers(), max_size=3).map(tuple), max_size=3).map(tuple),
    default=st.text(),
)


@settings(deadline=None)
@given(everything)
def test_round_trip_is_exact(message: Everything) -> None:
    decoded = Everything.unmarshal_binary(message.marshal_binary())
    assert decoded == message
    assert type(decoded.ints) is tuple
    assert type(decoded.names) is list
    assert type(decoded.tags) is frozenset
    assert type(decoded.nested) is tuple
    assert all(type(t) is tuple for t in decoded.nested)
    assert type(decoded.choice) is type(message.choice)
    assert type(decoded.text_or_time) is type(message.text_or_time)
    assert type(decoded.shape) is type(message.shape)
    assert type(decoded.level) is Level


@settings(deadline=None)
@given(everything)
def test_encoding_is_utf8_json_object_keyed_by_field_name(message: Everything) -> None:
    obj = json.loads(message.marshal_binary().decode("utf-8"))
    assert set(obj) == {f.name for f in attrs.fields(Everything)}


@attrs.frozen
class Simple(dogma.Command):
    name: str
    at: datetime
    count: int = 0


def test_encoding_is_compact_and_readable() -> None:
    message = Simple(name="é", at=datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=UTC), count=3)
    assert message.marshal_binary() == (
        '{"name":"é","at":"2024-05-06T07:08:09.000010+00:00","count":3}'.encode()
    )


def test_datetimes_are_stored_and_decoded_in_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    message = Simple(name="x", at=datetime(2024, 1, 1, 12, tzinfo=plus_two))
    assert b'"2024-01-01T10:00:00+00:00"' in message.marshal_binary()
    decoded = Simple.unmarshal_binary(message.marshal_binary())
    assert decoded == message
    assert decoded.at.tzinfo is UTC


def test_naive_datetime_is_refused_when_marshalling() -> None:
    message = Simple(name="x", at=datetime(2024, 1, 1))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "cannot marshal Simple: field 'at': naive datetime '2024-01-01T00:00:00' is not "
            "allowed; use a timezone-aware datetime in UTC, e.g. datetime.now(UTC)"
        ),
    ):
        message.marshal_binary()


def test_naive_datetime_is_refused_when_unmarshalling() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "cannot unmarshal Simple: field 'at': datetime '2024-01-01T00:00:00' has no UTC offset"
        ),
    ):
        Simple.unmarshal_binary(b'{"name":"x","at":"2024-01-01T00:00:00"}')


def test_missing_fields_take_their_defaults() -> None:
    decoded = Simple.unmarshal_binary(b'{"name":"x","at":"2024-01-01T00:00:00+00:00"}')
    assert decoded == Simple(name="x", at=datetime(2024, 1, 1, tzinfo=UTC), count=0)


def test_unknown_fields_are_ignored() -> None:
    decoded = Simple.unmarshal_binary(
        b'{"name":"x","at":"2024-01-01T00:00:00+00:00","removed":[1,2]}'
    )
    assert decoded.name == "x"


def test_missing_required_field_is_refused() -> None:
    with pytest.raises(
        ValueError, match=re.escape("cannot unmarshal Simple: field 'at' is missing")
    ):
        Simple.unmarshal_binary(b'{"name":"x"}')


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"not json", "cannot unmarshal Simple: invalid JSON: "),
        (b"\xff", "cannot unmarshal Simple: invalid JSON: "),
        (b"[]", "cannot unmarshal Simple: expected an object, got list []"),
        (
            b'{"name":1,"at":"2024-01-01T00:00:00+00:00"}',
            "cannot unmarshal Simple: field 'name': expected str, got int 1",
        ),
        (
            b'{"name":"x","at":"yesterday"}',
            "cannot unmarshal Simple: field 'at': 'yesterday' is not an ISO 8601 datetime",
        ),
        (
            b'{"name":"x","at":"2024-01-01T00:00:00+00:00","count":true}',
            "cannot unmarshal Simple: field 'count': expected int, got bool True",
        ),
        (
            b'{"name":"x","at":"2024-01-01T00:00:00+00:00","count":1.0}',
            "cannot unmarshal Simple: field 'count': expected int, got float 1.0",
        ),
    ],
)
def test_malformed_data_is_refused_with_the_path(data: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        Simple.unmarshal_binary(data)


def test_wrong_value_type_is_refused_when_marshalling() -> None:
    message = Simple(name=42, at=datetime.now(UTC))  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=re.escape("cannot marshal Simple: field 'name': expected str, got int 42")
    ):
        message.marshal_binary()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused(value: float) -> None:
    @attrs.frozen
    class Measured(dogma.Event):
        value: float

    with pytest.raises(ValueError, match="floats must be finite"):
        Measured(value=value).marshal_binary()


def test_int_in_a_float_field_is_stored_as_float() -> None:
    @attrs.frozen
    class Measured(dogma.Event):
        value: float

    data = Measured(value=3).marshal_binary()
    assert data == b'{"value":3.0}'
    assert Measured.unmarshal_binary(b'{"value":3}').value == 3.0


def test_nested_path_is_reported() -> None:
    data = b'{"points":[{"x":1,"y":2},{"x":1,"y":"2"}]}'

    @attrs.frozen
    class Path(dogma.Event):
        points: tuple[Point, ...]

    with pytest.raises(
        ValueError,
        match=re.escape("cannot unmarshal Path: field 'points[1].y': expected int, got str '2'"),
    ):
        Path.unmarshal_binary(data)


def test_ambiguous_union_is_tagged_with_the_member_name() -> None:
    @attrs.frozen
    class Tagged(dogma.Event):
        shape: Point | Label | None
        when: str | datetime

    message = Tagged(shape=Label(text="a"), when="2024-01-01T00:00:00+00:00")
    data = message.marshal_binary()
    assert data == (b'{"shape":{"Label":{"text":"a"}},"when":{"str":"2024-01-01T00:00:00+00:00"}}')
    assert Tagged.unmarshal_binary(data) == message
    assert Tagged.unmarshal_binary(b'{"shape":null,"when":{"str":"x"}}') == Tagged(None, "x")


def test_unambiguous_union_is_untagged() -> None:
    @attrs.frozen
    class Untagged(dogma.Event):
        value: int | str | None

    assert Untagged(value=1).marshal_binary() == b'{"value":1}'
    assert Untagged(value="1").marshal_binary() == b'{"value":"1"}'
    assert Untagged.unmarshal_binary(b'{"value":"1"}') == Untagged(value="1")


def test_enum_with_invalid_value_is_refused() -> None:
    @attrs.frozen
    class Painted(dogma.Event):
        colour: Colour

    with pytest.raises(ValueError, match=re.escape("field 'colour': 'blue' is not a valid Colour")):
        Painted.unmarshal_binary(b'{"colour":"blue"}')


def test_validators_run_when_unmarshalling() -> None:
    @attrs.frozen
    class Positive(dogma.Event):
        amount: int = attrs.field(validator=attrs.validators.gt(0))

    with pytest.raises(ValueError, match=r"^cannot unmarshal Positive: 'amount' must be > 0: 0$"):
        Positive.unmarshal_binary(b'{"amount":0}')


def test_private_attributes_use_their_field_name() -> None:
    @attrs.frozen
    class Private(dogma.Event):
        _secret: str

    message = Private(secret="s")
    assert message.marshal_binary() == b'{"_secret":"s"}'
    assert Private.unmarshal_binary(b'{"_secret":"s"}') == message


def test_non_attrs_class_with_an_init_needs_its_own_codec() -> None:
    class NotAttrs(dogma.Command):
        def __init__(self, amount: int) -> None:
            self.amount = amount

    with pytest.raises(
        TypeError,
        match=re.escape(
            "NotAttrs is not an attrs class, so the default codec cannot marshal it; "
            "decorate it with @attrs.frozen or override marshal_binary() and unmarshal_binary()"
        ),
    ):
        NotAttrs(1).marshal_binary()


def test_plain_class_without_fields_round_trips_as_an_empty_object() -> None:
    class Ping(dogma.Command):
        pass

    assert Ping().marshal_binary() == b"{}"
    assert type(Ping.unmarshal_binary(b"{}")) is Ping
    with pytest.raises(ValueError, match=re.escape("cannot unmarshal Ping: expected an object")):
        Ping.unmarshal_binary(b"[]")


def test_plain_class_with_attributes_is_refused() -> None:
    class Ping(dogma.Command):
        pass

    ping = Ping()
    ping.extra = 1  # type: ignore[attr-defined]
    with pytest.raises(
        TypeError,
        match=re.escape(
            "cannot marshal Ping: Ping is not an attrs class, so the default codec cannot "
            "marshal its attributes; decorate it with @attrs.frozen (below @dogma.register_*) "
            "or override marshal_binary() and unmarshal_binary()"
        ),
    ):
        ping.marshal_binary()


@pytest.mark.parametrize(
    ("annotation", "error"),
    [
        (bytes, "bytes is not a supported field type"),
        (tuple, "bare tuple needs item types, e.g. tuple[str, ...]"),
        (dict[float, int], "dict keys of type float cannot be stored"),
        (dict[Point, int], "dict keys of type Point cannot be stored"),
        (Literal[1.5], "Literal value 1.5 cannot be stored; use str, int or bool"),
    ],
)
def test_unsupported_annotations_are_refused(annotation: object, error: str) -> None:
    field = attrs.field(type=typing.cast(type, annotation))
    cls = attrs.make_class("Unsupported", {"field": field}, bases=(dogma.Event,))
    with pytest.raises(TypeError, match=re.escape(error)):
        dogma.register_event(str(uuid.uuid4()), registry=dogma.MessageTypeRegistry())(cls)


class Pairs(enum.Enum):
    A = (1, 2)


def test_enum_with_unstorable_values_is_refused() -> None:
    @attrs.frozen
    class HasPairs(dogma.Event):
        pair: Pairs

    with pytest.raises(
        TypeError,
        match=re.escape(
            "field HasPairs.pair cannot be marshalled: enum Pairs has a tuple value (A); "
            "only str, int, float and bool values can be stored"
        ),
    ):
        HasPairs(pair=Pairs.A).marshal_binary()


def test_subclass_instance_in_a_nested_field_is_refused() -> None:
    @attrs.frozen
    class Point3(Point):
        z: int = 0

    @attrs.frozen
    class Holder(dogma.Event):
        point: Point

    with pytest.raises(
        TypeError,
        match=re.escape("cannot marshal Holder: field 'point': expected Point, got Point3 Point3("),
    ):
        Holder(point=Point3(1, 2, 3)).marshal_binary()


def test_unmarshal_returns_the_calling_class() -> None:
    decoded = Simple.unmarshal_binary(b'{"name":"x","at":"2024-01-01T00:00:00Z"}')
    assert type(decoded) is Simple
    assert decoded.at == datetime(2024, 1, 1, tzinfo=UTC)


def test_unmarshal_rejects_non_bytes() -> None:
    with pytest.raises(TypeError, match="cannot unmarshal Simple: expected bytes, got str"):
        Simple.unmarshal_binary('{"name":"x"}')  # type: ignore[arg-type]


def test_registration_resolves_annotations_naming_local_classes() -> None:
    # This module uses `from __future__ import annotations`, so `inner: Inner`
    # is the string "Inner", which only the defining function's locals resolve.
    @attrs.frozen
    class Inner:
        value: int

    @dogma.register_event(str(uuid.uuid4()), registry=dogma.MessageTypeRegistry())
    @attrs.frozen
    class Outer(dogma.Event):
        inner: Inner
        inners: tuple[Inner, ...]

    message = Outer(inner=Inner(1), inners=(Inner(2),))
    assert Outer.unmarshal_binary(message.marshal_binary()) == message


def test_unresolvable_annotation_is_reported_at_first_use() -> None:
    @attrs.frozen
    class Inner:
        value: int

    @attrs.frozen
    class Unregistered(dogma.Event):
        inner: Inner

    with pytest.raises(
        TypeError,
        match=re.escape(
            "cannot resolve the annotations of Unregistered: name 'Inner' is not defined; "
            "define the classes it refers to at module level"
        ),
    ):
        Unregistered(inner=Inner(1)).marshal_binary()


def test_validator_failure_in_nested_class_names_the_path() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "cannot unmarshal Wrapper: field 'inner': invalid Checked: 'n' must be > 0: 0"
        ),
    ):
        Wrapper.unmarshal_binary(b'{"inner":{"n":0}}')


@attrs.frozen
class Checked:
    n: int = attrs.field(validator=attrs.validators.gt(0))


@attrs.frozen
class Wrapper(dogma.Event):
    inner: Checked


class Mixed(str, enum.Enum):  # noqa: UP042 - the mixin form str() renders as "Mixed.A"
    A = "a"


def test_enum_members_in_plain_str_and_int_fields_are_stored_as_plain_values() -> None:
    @attrs.frozen
    class Plain(dogma.Event):
        text: str
        number: int

    data = Plain(text=Mixed.A, number=Level.HIGH).marshal_binary()
    assert data == b'{"text":"a","number":2}'
    decoded = Plain.unmarshal_binary(data)
    assert type(decoded.text) is str
    assert type(decoded.number) is int


def test_bool_is_not_accepted_as_int() -> None:
    @attrs.frozen
    class Counted(dogma.Event):
        count: int

    with pytest.raises(
        TypeError,
        match=re.escape("cannot marshal Counted: field 'count': expected int, got bool True"),
    ):
        Counted(count=True).marshal_binary()


def test_lone_surrogate_is_refused() -> None:
    @attrs.frozen
    class Texted(dogma.Event):
        text: str

    with pytest.raises(
        ValueError,
        match=re.escape(
            "cannot marshal Texted: a string contains a lone surrogate '\\ud800', "
            "which UTF-8 cannot encode"
        ),
    ):
        Texted(text="a\ud800").marshal_binary()


class Mixed2(enum.Enum):
    TEXT = "1"
    NUMBER = 2


def test_dict_keys_round_trip_and_bad_keys_are_reported() -> None:
    @attrs.frozen
    class Keyed(dogma.Event):
        by_number: dict[int, str]
        by_mixed: dict[Mixed2, int]

    message = Keyed(by_number={-1: "a", 2: "b"}, by_mixed={Mixed2.TEXT: 1, Mixed2.NUMBER: 2})
    data = message.marshal_binary()
    assert data == b'{"by_number":{"-1":"a","2":"b"},"by_mixed":{"1":1,"2":2}}'
    assert Keyed.unmarshal_binary(data) == message
    with pytest.raises(
        ValueError,
        match=re.escape("cannot unmarshal Keyed: field 'by_number key': invalid int key 'x'"),
    ):
        Keyed.unmarshal_binary(b'{"by_number":{"x":"a"},"by_mixed":{}}')
