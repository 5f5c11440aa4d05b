"""The default JSON codec of message classes.

Every test here runs on both back-ends: msgspec (the default where msgspec is
installed) and the pure-Python reference. The tests at the end compare the
two back-ends directly.
"""

from __future__ import annotations

import enum
import json
import re
import subprocess
import sys
import textwrap
import typing
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Literal

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dogma
from dogma import _codec, _codec_plans
from dogma import _codec_msgspec as msgspec_backend


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Tests comparing the back-ends choose them themselves.
    if not getattr(metafunc.function, "compares_back_ends", False):
        metafunc.parametrize("backend", ["msgspec", "pure"], indirect=True)


@pytest.fixture(autouse=True)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test on the given back-end of the codec (msgspec unless parametrised)."""
    name: str = getattr(request, "param", "msgspec")
    _codec.use_pure_backend(name == "pure")
    yield name
    _codec.use_pure_backend(False)


F = typing.TypeVar("F", bound=typing.Callable[..., None])


def compares_back_ends(test: F) -> F:
    """Mark a test that compares the back-ends itself (so runs once)."""
    test.compares_back_ends = True  # type: ignore[attr-defined]
    return test


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


def test_a_datetime_that_does_not_exist_in_utc_is_refused_when_marshalling() -> None:
    # 0001-01-01T00:00 at +01:00 is in year 0 in UTC, which datetime cannot hold.
    message = Simple(name="x", at=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "cannot marshal Simple: field 'at': datetime '0001-01-01T00:00:00+01:00' is outside "
            "the range of datetime in UTC (years 1 to 9999)"
        ),
    ):
        message.marshal_binary()


@attrs.frozen
class Later(dogma.Command):
    at: datetime | None = None


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
@pytest.mark.parametrize("cls", [Simple, Later])
def test_a_datetime_that_does_not_exist_in_utc_is_refused_when_unmarshalling(
    cls: type[dogma.Command], text: str
) -> None:
    # Parsed, but not convertible to UTC: it used to raise a bare OverflowError.
    data = json.dumps({"name": "x", "at": text}).encode()
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"cannot unmarshal {cls.__name__}: field 'at': datetime {text!r} is outside "
            "the range of datetime in UTC (years 1 to 9999)"
        ),
    ):
        cls.unmarshal_binary(data)


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


def test_invalid_utf8_in_an_unknown_key_is_refused_on_both_back_ends() -> None:
    # msgspec skips an unknown key without checking its bytes; the reference
    # back-end refuses invalid UTF-8 anywhere, and the fast path must agree.
    data = b'{"name":"x","at":"2024-01-01T00:00:00+00:00","removed\x80":1}'
    kind, message = outcome_on_both(lambda: Simple.unmarshal_binary(data))
    assert kind == "ValueError"
    assert "invalid JSON" in message


SIMPLE_JSON = '{"name":"x","at":"2024-01-01T00:00:00+00:00"}'


@pytest.mark.parametrize(
    "data",
    [
        SIMPLE_JSON.encode("utf-16"),
        SIMPLE_JSON.encode("utf-16-le"),
        SIMPLE_JSON.encode("utf-32"),
        SIMPLE_JSON.encode("utf-8-sig"),
        SIMPLE_JSON.replace('"x"', '"\ud800"').encode("utf-8", "surrogatepass"),
    ],
    ids=["utf-16", "utf-16-le", "utf-32", "utf-8-bom", "encoded-surrogate"],
)
def test_only_utf8_is_read(data: bytes) -> None:
    # json.loads(bytes) detects these encodings; encode never writes them.
    with pytest.raises(ValueError, match=re.escape("cannot unmarshal Simple: invalid JSON: ")):
        Simple.unmarshal_binary(data)


TOO_MANY_DIGITS = sys.get_int_max_str_digits() + 1


@pytest.mark.skipif(TOO_MANY_DIGITS == 1, reason="int to str conversion is not limited")
def test_ints_with_more_digits_than_python_converts_are_refused() -> None:
    # They used to raise json's ValueError, which did not name the class.
    message = Simple(name="x", at=datetime(2024, 1, 1, tzinfo=UTC), count=10**TOO_MANY_DIGITS)
    with pytest.raises(ValueError, match=r"^cannot marshal Simple: Exceeds the limit \("):
        message.marshal_binary()
    data = SIMPLE_JSON[:-1] + ',"count":' + "1" * TOO_MANY_DIGITS + "}"
    with pytest.raises(ValueError, match=r"^cannot unmarshal Simple: Exceeds the limit \("):
        Simple.unmarshal_binary(data.encode())
    key = "1" * TOO_MANY_DIGITS
    with pytest.raises(
        ValueError,
        match=re.escape("cannot unmarshal NumberKeyed: field 'by_number key': invalid int key"),
    ):
        NumberKeyed.unmarshal_binary(b'{"by_number":{"%s":"a"}}' % key.encode())


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
        (b'{"name":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
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


def test_an_int_too_large_for_a_float_field_is_refused() -> None:
    @attrs.frozen
    class Measured(dogma.Event):
        value: float

    with pytest.raises(
        ValueError,
        match=re.escape(
            "cannot marshal Measured: field 'value': an int too large for a float "
            "cannot be stored; floats must be finite"
        ),
    ):
        Measured(value=10**400).marshal_binary()


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("NaN", "nan"),
        ("Infinity", "inf"),
        ("-Infinity", "-inf"),
        ("1e999", "inf"),
        ("1" + "0" * 400, "an int too large for a float"),
    ],
)
def test_non_finite_floats_are_refused_when_unmarshalling(text: str, value: str) -> None:
    # json.loads reads these, but marshal_binary never writes them: data holding
    # one is not a valid encoding, and its message could not be marshalled again.
    @attrs.frozen
    class Measured(dogma.Event):
        value: float
        values: tuple[float, ...] = ()
        either: float | str = 0.0

    for field in ("value", "values", "either"):
        stored = f"[{text}]" if field == "values" else text
        encoded = '{"value": 0.0, "' + field + '": ' + stored + "}"
        where = "values[0]" if field == "values" else field
        with pytest.raises(
            ValueError,
            match=re.escape(
                f"cannot unmarshal Measured: field {where!r}: {value} cannot be stored; "
                "floats must be finite"
            ),
        ):
            Measured.unmarshal_binary(encoded.encode())


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


class Ratio(enum.Enum):
    HALF = 0.5
    TWO = 2.0


class Numbered(enum.Enum):
    ONE = 1
    HALF = 0.5


class Answer(enum.Enum):
    YES = True
    NO = False


@attrs.frozen
class Enums(dogma.Event):
    level: Level = Level.LOW
    ratio: Ratio = Ratio.HALF
    numbered: Numbered = Numbered.ONE
    answer: Answer = Answer.YES
    maybe: Level | None = None


BADLY_SHAPED_ENUMS = [
    (b'{"level":true}', "field 'level': expected Level, got bool True"),
    (b'{"level":1.0}', "field 'level': expected Level, got float 1.0"),
    (b'{"level":"1"}', "field 'level': expected Level, got str '1'"),
    (b'{"numbered":1.0}', "field 'numbered': 1.0 is not a valid Numbered"),
    (b'{"answer":1}', "field 'answer': expected Answer, got int 1"),
    (b'{"maybe":true}', "field 'maybe': expected Level | None, got bool True"),
    (b'{"maybe":2.0}', "field 'maybe': expected Level | None, got float 2.0"),
]


@pytest.mark.parametrize(("data", "error"), BADLY_SHAPED_ENUMS)
def test_enum_values_must_have_the_json_type_of_the_member_value(data: bytes, error: str) -> None:
    # As an int field refuses true and 1.0, an int enum field does (it used to
    # take them: they equal 1 in Python).
    with pytest.raises(ValueError, match=f"^{re.escape(f'cannot unmarshal Enums: {error}')}$"):
        Enums.unmarshal_binary(data)


def test_a_float_enum_takes_an_int_as_a_float_field_does() -> None:
    assert Enums.unmarshal_binary(b'{"ratio":2}').ratio is Ratio.TWO
    decoded = Enums.unmarshal_binary(b'{"level":2,"numbered":0.5,"answer":false,"maybe":1}')
    assert decoded == Enums(
        level=Level.HIGH, numbered=Numbered.HALF, answer=Answer.NO, maybe=Level.LOW
    )


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


@attrs.frozen
class Texts(dogma.Event):
    text: str = ""
    texts: tuple[str, ...] = ()
    by_text: dict[str, int] = attrs.field(factory=dict)
    either: int | str = 0


LONE_SURROGATES = [
    (b'{"text":"\\ud800"}', "text", "\\ud800"),
    (b'{"text":"a\\udfff"}', "text", "\\udfff"),
    (b'{"texts":["\\udbff"]}', "texts[0]", "\\udbff"),
    (b'{"by_text":{"\\ud800":1}}', "by_text key", "\\ud800"),
    (b'{"either":"\\ud800x"}', "either", "\\ud800"),
]


@pytest.mark.parametrize(("data", "where", "surrogate"), LONE_SURROGATES)
def test_lone_surrogate_is_refused_when_unmarshalling(
    data: bytes, where: str, surrogate: str
) -> None:
    # json.loads reads the escape; the message could not be marshalled again.
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"cannot unmarshal Texts: field {where!r}: a string contains a lone surrogate "
            f"'{surrogate}', which UTF-8 cannot encode"
        ),
    ):
        Texts.unmarshal_binary(data)


def test_escaped_surrogate_pairs_are_read() -> None:
    assert Texts.unmarshal_binary(b'{"text":"\\ud83d\\ude00"}').text == "\U0001f600"


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


@attrs.frozen
class NumberKeyed(dogma.Event):
    by_number: dict[int, str] = attrs.field(factory=dict)
    by_level: dict[Level, str] = attrs.field(factory=dict)
    by_ratio: dict[Ratio, str] = attrs.field(factory=dict)


NON_CANONICAL_KEYS = [
    ("by_number", " 1", "invalid int key ' 1'"),
    ("by_number", "1 ", "invalid int key '1 '"),
    ("by_number", "\n1", "invalid int key '\\n1'"),
    ("by_number", "-0", "invalid int key '-0'"),
    ("by_number", "01", "invalid int key '01'"),
    ("by_number", "1.0", "expected int, got float 1.0"),
    ("by_level", " 1", "invalid Level key ' 1'"),
    ("by_ratio", "2", "invalid Ratio key '2'"),
]


@pytest.mark.parametrize(("field", "key", "error"), NON_CANONICAL_KEYS)
def test_number_keys_are_read_only_as_marshal_binary_writes_them(
    field: str, key: str, error: str
) -> None:
    # json.loads reads " 1" as 1, so {"1": .., " 1": ..} held one key twice.
    data = json.dumps({field: {key: "a"}}).encode()
    with pytest.raises(
        ValueError, match=re.escape(f"cannot unmarshal NumberKeyed: field '{field} key': {error}")
    ):
        NumberKeyed.unmarshal_binary(data)


def test_number_keys_round_trip() -> None:
    message = NumberKeyed(
        by_number={0: "a", -5: "b"}, by_level={Level.HIGH: "c"}, by_ratio={Ratio.TWO: "d"}
    )
    data = message.marshal_binary()
    assert data == (b'{"by_number":{"0":"a","-5":"b"},"by_level":{"2":"c"},"by_ratio":{"2.0":"d"}}')
    assert NumberKeyed.unmarshal_binary(data) == message


class Clash(enum.Enum):
    NUMBER = 1
    TEXT = "1"


class Clash2(enum.Enum):
    YES = True
    TEXT = "true"
    HALF = 0.5


@pytest.mark.parametrize(
    ("annotation", "clash"),
    [
        (dict[Clash, int], "enum Clash cannot be used for dict keys: NUMBER (1) and TEXT ('1')"),
        (
            dict[Clash2, int],
            "enum Clash2 cannot be used for dict keys: YES (True) and TEXT ('true')",
        ),
    ],
)
def test_enum_whose_members_would_share_a_dict_key_is_refused_as_a_key_type(
    annotation: object, clash: str
) -> None:
    # Both members were written as one key, so a round trip lost one of them.
    field = attrs.field(type=typing.cast(type, annotation))
    cls = attrs.make_class("ByClash", {"counts": field}, bases=(dogma.Event,))
    with pytest.raises(
        TypeError,
        match=re.escape(f"field ByClash.counts cannot be marshalled: {clash} would both be "),
    ):
        dogma.register_event(str(uuid.uuid4()), registry=dogma.MessageTypeRegistry())(cls)


def test_enum_whose_members_would_share_a_dict_key_is_fine_as_a_value() -> None:
    @attrs.frozen
    class Clashing(dogma.Event):
        values: tuple[Clash, ...]
        by_name: dict[str, Clash]

    message = Clashing(values=(Clash.NUMBER, Clash.TEXT), by_name={"n": Clash.NUMBER})
    data = message.marshal_binary()
    assert data == b'{"values":[1,"1"],"by_name":{"n":1}}'
    assert Clashing.unmarshal_binary(data) == message


# --------------------------------------------------------------------------- back-ends

# The tests below call the msgspec back-end directly, without the fallback to
# the reference, so they fail if it gives anything the reference does not.


def fast_codec(cls: type) -> msgspec_backend.Codec:
    plan = _codec_plans._plan_for(cls)
    assert isinstance(plan, _codec_plans._AttrsClass)
    codec = msgspec_backend.compile(plan)
    assert codec is not None
    return codec


def same_value(a: object, b: object) -> bool:
    # repr tells tuple from list, 1 from 1.0, a member from its value and
    # the time zone of datetimes, where == does not.
    return a == b and repr(a) == repr(b)


# Floats msgspec writes as json.dumps does; others take the reference back-end.
plain_floats = st.just(0.0) | st.floats(min_value=1e-4, max_value=1e16, exclude_max=True).flatmap(
    lambda f: st.sampled_from([f, -f])
)
offsets = st.builds(
    timezone, st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23))
)
# Aware datetimes in any time zone that exist in UTC: both back-ends store them in UTC.
any_aware = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC) | offsets
)
typical = st.builds(
    attrs.evolve,
    everything,
    f=plain_floats,
    scores=st.dictionaries(st.text(), plain_floats),
    at=any_aware,
    text_or_time=st.text() | any_aware,
)


@compares_back_ends
@settings(deadline=None, max_examples=300)
@given(typical)
def test_msgspec_back_end_encodes_and_decodes_exactly_as_the_reference(message: Everything) -> None:
    codec = fast_codec(Everything)
    data = _codec.pure_encode(message)
    assert codec.encode(message) == data
    decoded = codec.decode(data)
    assert same_value(decoded, _codec.pure_decode(Everything, data))
    assert decoded == message


@compares_back_ends
@settings(deadline=None, max_examples=300)
@given(everything)
def test_msgspec_back_end_never_disagrees_with_the_reference(message: Everything) -> None:
    # Any float: the fast path may decline (raise), but never differ.
    codec = fast_codec(Everything)
    data = _codec.pure_encode(message)
    try:
        fast = codec.encode(message)
    except msgspec_backend.Unsupported:
        fast = data
    assert fast == data
    assert same_value(codec.decode(data), _codec.pure_decode(Everything, data))
    assert _codec.encode(message) == data
    assert _codec.decode(Everything, data) == message


datetime_texts = st.one_of(
    st.builds(
        datetime.isoformat,
        st.datetimes(timezones=st.none() | st.just(UTC) | offsets),
        st.sampled_from(["T", " "]),
        st.sampled_from(["auto", "hours", "minutes", "seconds", "milliseconds"]),
    ),
    st.dates().map(str),
    st.from_regex(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]{2,15}(Z|[+-][0-9:]{2,5})?\Z"),
    st.text(max_size=12),
)


@compares_back_ends
@settings(deadline=None, max_examples=500)
@given(datetime_texts)
def test_datetime_texts_are_decoded_or_refused_as_the_reference_does(text: str) -> None:
    data = json.dumps({"name": "x", "at": text}).encode()
    try:
        fast = fast_codec(Simple).decode(data)
    except Exception:  # declining is always allowed
        pass
    else:
        assert same_value(fast, _codec.pure_decode(Simple, data))
    outcome_on_both(lambda: Simple.unmarshal_binary(data))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=6,
)


def outcome(fn: typing.Callable[[], object]) -> tuple[str, str]:
    try:
        return "ok", repr(fn())
    except (TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)


def outcome_on_both(fn: typing.Callable[[], object]) -> tuple[str, str]:
    _codec.use_pure_backend(True)
    pure = outcome(fn)
    _codec.use_pure_backend(False)
    assert outcome(fn) == pure
    return pure


@compares_back_ends
@settings(deadline=None, max_examples=300)
@given(everything, st.data())
def test_malformed_data_is_decoded_or_refused_the_same_way(
    message: Everything, data: st.DataObject
) -> None:
    obj = json.loads(_codec.pure_encode(message))
    key = data.draw(st.sampled_from(sorted(obj)))
    change = data.draw(st.sampled_from(["replace", "delete", "corrupt"]))
    if change == "replace":
        obj[key] = data.draw(json_values)
    elif change == "delete":
        del obj[key]
    encoded = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if change == "corrupt":
        at = data.draw(st.integers(0, len(encoded)))
        encoded = encoded[:at] + data.draw(st.binary(min_size=1, max_size=2)) + encoded[at:]
    # The fast path alone must either decline or agree with the reference.
    try:
        fast = fast_codec(Everything).decode(encoded)
    except Exception:  # declining is always allowed
        pass
    else:
        assert same_value(fast, _codec.pure_decode(Everything, encoded))
    outcome_on_both(lambda: Everything.unmarshal_binary(encoded))


wrong_values = (
    json_values
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.datetimes()
    | st.datetimes(timezones=st.timezones())
    | st.uuids()
    | st.sampled_from([*Colour, *Level, *Mixed, *Mixed2])
    | st.tuples(st.integers(), st.text())
    | st.frozensets(st.integers(), max_size=2)
    | points
)


@compares_back_ends
@settings(deadline=None, max_examples=300)
@given(everything, st.data())
def test_wrong_field_values_are_encoded_or_refused_the_same_way(
    message: Everything, data: st.DataObject
) -> None:
    field = data.draw(st.sampled_from([f.name for f in attrs.fields(Everything)]))
    value: typing.Any = data.draw(wrong_values)
    broken = attrs.evolve(message, **{field: value})
    try:
        fast = fast_codec(Everything).encode(broken)
    except Exception:  # declining is always allowed
        pass
    else:
        assert fast == _codec.pure_encode(broken)
    outcome_on_both(broken.marshal_binary)


@compares_back_ends
def test_bank_messages_take_the_fast_path() -> None:
    bank = pytest.importorskip("bank.messages")
    messages = [
        bank.DepositStarted(transaction_id="t1", account_id="a1", amount=1500),
        bank.AccountCredited(
            transaction_id="t1",
            account_id="a1",
            transaction_type=bank.TransactionType.DEPOSIT,
            amount=1500,
        ),
        bank.TransferStarted(
            transaction_id="t2",
            from_account_id="a1",
            to_account_id="a2",
            amount=10,
            scheduled_time=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        ),
    ]
    for message in messages:
        codec = fast_codec(type(message))
        data = codec.encode(message)
        assert data == _codec.pure_encode(message)
        assert same_value(codec.decode(data), message)


@attrs.frozen
class Tree(dogma.Event):
    label: str
    children: tuple[Tree, ...] = ()


@compares_back_ends
def test_recursive_classes_round_trip_on_the_fast_path() -> None:
    tree = Tree("root", (Tree("a"), Tree("b", (Tree("c"),))))
    codec = fast_codec(Tree)
    data = codec.encode(tree)
    assert data == _codec.pure_encode(tree)
    assert same_value(codec.decode(data), tree)
    assert same_value(codec.decode(b'{"label":"x"}'), Tree("x"))


@compares_back_ends
def test_fast_path_declines_what_it_cannot_write_exactly() -> None:
    @attrs.frozen
    class Measured(dogma.Event):
        value: float

    codec = fast_codec(Measured)
    assert codec.encode(Measured(2.5)) == b'{"value":2.5}'
    # msgspec would write 1e16 and 1e-05 as "1e16" and "0.00001".
    for value, text in [(1e16, b"1e+16"), (1e-5, b"1e-05"), (3, b"3.0")]:
        with pytest.raises(msgspec_backend.Unsupported):
            codec.encode(Measured(value))
        assert Measured(value).marshal_binary() == b'{"value":%s}' % text


@compares_back_ends
def test_without_msgspec_the_reference_back_end_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "msgspec", None)  # makes `import msgspec` fail
    monkeypatch.delitem(sys.modules, "dogma._codec_msgspec")
    monkeypatch.delattr(dogma, "_codec_msgspec")
    monkeypatch.setattr(_codec, "_backend", None)
    monkeypatch.setattr(_codec, "_FAST", {})
    message = Simple(name="x", at=datetime(2024, 1, 1, tzinfo=UTC))
    data = message.marshal_binary()
    assert Simple.unmarshal_binary(data) == message
    assert _codec._load_backend() is None
    assert _codec._FAST == {}


@compares_back_ends
def test_msgspec_is_imported_on_first_use_and_brings_no_async_library() -> None:
    code = textwrap.dedent(
        """
        import sys
        import attrs
        import dogma

        @attrs.frozen
        class Ping(dogma.Command):
            n: int

        before = "msgspec" in sys.modules
        assert Ping.unmarshal_binary(Ping(1).marshal_binary()) == Ping(1)
        after = "msgspec" in sys.modules
        print(before, after, "asyncio" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split() == ["False", "True", "False"]


def _upper(value: str) -> str:
    return value.upper()


@attrs.frozen
class Converted(dogma.Event):
    name: str = attrs.field(converter=_upper)


@attrs.frozen
class NotInit(dogma.Event):
    name: str
    derived: str = attrs.field(init=False, default="fixed")


@attrs.frozen(cache_hash=True)
class CachedHash(dogma.Event):
    name: str


PRE_INITS: list[str] = []


@attrs.define
class PreInit(dogma.Event):
    name: str
    calls: list[str] = attrs.field(factory=list)

    def __attrs_pre_init__(self) -> None:
        PRE_INITS.append(type(self).__name__)


@attrs.define
class PostInit(dogma.Event):
    name: str
    calls: list[str] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        self.calls.append("post")


@attrs.frozen
class Plain(dogma.Event):
    name: str
    amount: int = attrs.field(default=1, validator=attrs.validators.gt(0))
    _secret: str = "s"
    tags: tuple[str, ...] = attrs.field(factory=tuple)
    colour: Colour | None = None
    point: Point | None = None


@compares_back_ends
@pytest.mark.parametrize(
    ("cls", "native"),
    [
        (Plain, True),
        (Point, True),
        (Converted, False),
        (NotInit, False),
        (CachedHash, False),
        (PreInit, False),
        (PostInit, True),
        (Everything, False),  # datetimes are parsed as the reference does
    ],
)
def test_msgspec_builds_instances_itself_only_where_that_equals_calling_the_class(
    cls: type, native: bool
) -> None:
    plan = _codec_plans._plan_for(cls)
    assert isinstance(plan, _codec_plans._AttrsClass)
    decoded, build = msgspec_backend._attrs_spec(plan, frozenset())
    assert (decoded is cls and build is None) is native


@compares_back_ends
@pytest.mark.parametrize(
    "data",
    [
        b'{"name":"abc"}',
        b'{"name":"abc","derived":"other","amount":2,"_secret":"t","tags":["x"]}',
        b'{"name":"abc","colour":"red","point":{"x":1,"y":2},"calls":["a"]}',
        b'{"name":"abc","amount":0}',
        b'{"name":1}',
        b"{}",
    ],
)
@pytest.mark.parametrize("cls", [Plain, Converted, NotInit, CachedHash, PreInit, PostInit])
def test_attrs_features_are_honoured_on_the_fast_path(cls: type[dogma.Event], data: bytes) -> None:
    fast: object = None
    try:
        fast = fast_codec(cls).decode(data)
    except Exception:  # declining is always allowed
        pass
    else:
        pure: object = _codec.pure_decode(cls, data)
        assert same_value(fast, pure)
        if cls is CachedHash:
            assert hash(fast) == hash(pure)
        assert getattr(fast, "calls", None) == getattr(pure, "calls", None)
    outcome_on_both(lambda: cls.unmarshal_binary(data))
    if data == b'{"name":"abc"}':
        assert fast is not None  # valid data never needs the reference back-end


REFUSED_BY_BOTH: list[tuple[type, bytes]] = [
    *(
        (cls, json.dumps({"name": "x", "at": text}).encode())
        for cls in (Simple, Later)
        for text in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00")
    ),
    *((Enums, data) for data, _ in BADLY_SHAPED_ENUMS),
    *((Texts, data) for data, _, _ in LONE_SURROGATES),
    *(
        (NumberKeyed, json.dumps({field: {key: "a"}}).encode())
        for field, key, _ in NON_CANONICAL_KEYS
    ),
    (Simple, SIMPLE_JSON.encode("utf-8-sig")),
    (Simple, SIMPLE_JSON.encode("utf-16")),
    *(
        [(Simple, (SIMPLE_JSON[:-1] + ',"count":' + "1" * TOO_MANY_DIGITS + "}").encode())]
        if TOO_MANY_DIGITS > 1
        else []
    ),
]


@compares_back_ends
@pytest.mark.parametrize(
    ("cls", "data"),
    REFUSED_BY_BOTH,
    ids=[f"{cls.__name__}-{i}" for i, (cls, _) in enumerate(REFUSED_BY_BOTH)],
)
def test_what_the_reference_refuses_the_fast_path_does_not_accept(cls: type, data: bytes) -> None:
    with pytest.raises(Exception):  # noqa: B017 - declining is all that is asked of it
        fast_codec(cls).decode(data)
    kind, _ = outcome_on_both(lambda: _codec.decode(cls, data))
    assert kind == "ValueError"
