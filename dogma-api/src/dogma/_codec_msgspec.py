"""The msgspec back-end of the default JSON codec.

It compiles a class's plan (see :mod:`dogma._codec`) into a msgspec encoder
and decoder. The plans stay the one description of the fields: each plan
node becomes a native msgspec type where msgspec's behaviour is known to match
the reference back-end exactly, and otherwise delegates to the plan's own
(reference) ``encode``/``decode`` for that value.

Encoding turns the message into JSON-native values (checking every field
against its annotation, as the reference does) and lets msgspec write them.
msgspec writes strings, ints and floats in ``[1e-4, 1e16)`` exactly as
``json.dumps`` does, but other floats differently (``1e16`` rather than
``1e+16``), so those go back to the reference back-end.

Decoding lets msgspec build the attrs instance itself when every field is
native and the class has nothing msgspec would skip (converters, a cached
hash, ...). Otherwise msgspec parses into a ``msgspec.Struct`` mirroring the
class, and the class is called with the field values, so attrs defaults,
converters and validators run as they do in the reference back-end.

Anything unusual raises: the caller then uses the reference back-end, which
gives the same result or the same error. Only success has to match exactly.
"""

from __future__ import annotations

import enum
import typing
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs
import msgspec
from msgspec.structs import asdict

from ._codec_plans import (
    _NONE_TYPE,
    _UUID,
    _AttrsClass,
    _DateTime,
    _Dict,
    _Enum,
    _FixedTuple,
    _Literal,
    _Plan,
    _Scalar,
    _Sequence,
    _Union,
    dumps,
)

# Turns a field value into what msgspec encodes to the reference bytes.
_Prep = Callable[[Any], object]
# Turns what msgspec decoded into the field value; None when it already is.
_Post = Callable[[Any], object] | None

_UNSET: Any = msgspec.UNSET


class Unsupported(Exception):
    """A value the fast path leaves to the reference back-end."""


class Codec:
    """One attrs class's compiled encoder and decoder."""

    __slots__ = ("_build", "_decoder", "_encoder", "_prep")

    def __init__(self, prep: _Prep, decoded: object, build: _Post) -> None:
        self._prep = prep
        self._encoder = msgspec.json.Encoder()
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(decoded)
        self._build = build

    def encode(self, message: object) -> bytes:
        """Return ``message`` as the reference back-end's bytes, or raise."""
        return self._encoder.encode(self._prep(message))

    def decode(self, data: bytes) -> object:
        """Return the reference back-end's value for ``data``, or raise."""
        if not data.isascii():
            # msgspec skips unknown keys without checking their UTF-8; the
            # reference refuses invalid UTF-8 anywhere in the document.
            data.decode("utf-8")
        value = self._decoder.decode(data)
        return value if self._build is None else self._build(value)


def compile(plan: _AttrsClass) -> Codec | None:
    """Return the codec for ``plan``'s class, or None where msgspec cannot express it."""
    try:
        decoded, build = _attrs_spec(plan, frozenset())
        return Codec(_attrs_prep(plan, frozenset()), decoded, build)
    except Exception:  # e.g. a type msgspec refuses: the reference back-end handles the class
        return None


# --------------------------------------------------------------------------- encoding

# Field types whose values msgspec writes exactly like the reference, as they are.
_EXACT: dict[type, type] = {str: str, int: int, bool: bool}


def _exact_type(plan: _Plan) -> type | None:
    if isinstance(plan, _Scalar):
        return _EXACT.get(plan.tp)
    if isinstance(plan, _UUID):
        return uuid.UUID  # msgspec writes the canonical form, as str(UUID) does
    return None


def _prep(plan: _Plan, building: frozenset[type]) -> _Prep:
    exact = _exact_type(plan)
    if exact is not None:
        return _exact_prep(exact)
    if isinstance(plan, _Scalar) and plan.tp is float:
        return _float_prep
    if isinstance(plan, _Scalar) and plan.tp is _NONE_TYPE:
        return _none_prep
    if isinstance(plan, _Enum) and _plain_values(plan.tp):
        return _enum_prep(plan.tp)
    if isinstance(plan, _DateTime):
        return _datetime_prep(plan)
    if isinstance(plan, _Literal):
        return _reference_prep(plan)  # the str, int or bool itself
    if isinstance(plan, _Sequence):
        return _sequence_prep(plan, building)
    if isinstance(plan, _FixedTuple):
        return _fixed_tuple_prep(plan, building)
    if isinstance(plan, _Dict):
        return _dict_prep(plan, building)
    if isinstance(plan, _Union) and _optional_member(plan) is not None:
        return _optional_prep(_prep(typing.cast(_Plan, _optional_member(plan)), building))
    if isinstance(plan, _AttrsClass) and plan.cls not in building:
        return _attrs_prep(plan, building)
    return _raw_prep(plan)


def _exact_prep(tp: type) -> _Prep:
    def prep(value: object) -> object:
        if type(value) is not tp:  # subclasses (e.g. enum members in str fields) differ
            raise Unsupported
        return value

    return prep


def _float_prep(value: object) -> object:
    if type(value) is float and (value == 0.0 or 1e-4 <= abs(value) < 1e16):
        return value
    raise Unsupported


def _none_prep(value: object) -> object:
    if value is not None:
        raise Unsupported
    return None


def _plain_values(tp: type[enum.Enum]) -> bool:
    # Values msgspec writes like json.dumps, for enums msgspec decodes by value.
    values = [member.value for member in tp]
    return (
        not issubclass(tp, enum.Flag)
        and bool(values)
        and (all(type(v) is str for v in values) or all(type(v) is int for v in values))
    )


def _enum_prep(tp: type[enum.Enum]) -> _Prep:
    def prep(value: object) -> object:
        if type(value) is not tp:
            raise Unsupported
        return value._value_  # the plain attribute: .value is a slow descriptor

    return prep


def _datetime_prep(plan: _DateTime) -> _Prep:
    reference = _reference_prep(plan)

    def prep(value: object) -> object:
        # What the reference writes, value.astimezone(UTC).isoformat(), without
        # the conversion when the value is already in UTC.
        if type(value) is datetime and value.tzinfo is UTC:
            return value.isoformat()
        return reference(value)

    return prep


def _reference_prep(plan: _Plan) -> _Prep:
    def prep(value: object) -> object:
        return plan.encode(value, "")

    return prep


def _raw_prep(plan: _Plan) -> _Prep:
    # The reference back-end's own text for this value, spliced in as it is.
    def prep(value: object) -> object:
        return msgspec.Raw(dumps(plan.encode(value, "")).encode())

    return prep


def _sequence_prep(plan: _Sequence, building: frozenset[type]) -> _Prep:
    container = plan.container
    exact = _exact_type(plan.item)
    if exact is not None:

        def exact_items(value: object) -> object:
            if type(value) is not container:
                raise Unsupported
            for item in typing.cast("typing.Iterable[object]", value):
                if type(item) is not exact:
                    raise Unsupported
            return value  # msgspec writes tuples, lists, sets and frozensets as arrays

        return exact_items
    item_prep = _prep(plan.item, building)

    def items(value: object) -> object:
        if type(value) is not container:
            raise Unsupported
        return [item_prep(item) for item in typing.cast("typing.Iterable[object]", value)]

    return items


def _fixed_tuple_prep(plan: _FixedTuple, building: frozenset[type]) -> _Prep:
    preps = tuple(_prep(p, building) for p in plan.items)

    def prep(value: object) -> object:
        if type(value) is not tuple or len(value) != len(preps):
            raise Unsupported
        return [p(v) for p, v in zip(preps, value, strict=True)]

    return prep


def _dict_prep(plan: _Dict, building: frozenset[type]) -> _Prep:
    value_prep = _prep(plan.value, building)
    str_keys = isinstance(plan.key, _Scalar) and plan.key.tp is str

    def prep(value: object) -> object:
        if type(value) is not dict:
            raise Unsupported
        out: dict[str, object] = {}
        for k, v in typing.cast(dict[object, object], value).items():
            if str_keys:
                if type(k) is not str:
                    raise Unsupported
                key = k
            else:
                key = plan._encode_key(k, "")
            out[key] = value_prep(v)
        return out

    return prep


def _optional_member(plan: _Union) -> _Plan | None:
    """The X of an untagged ``X | None``, else None."""
    if plan.tagged or len(plan.members) != 2:
        return None
    x, none = plan.members
    if isinstance(x, _Scalar) and x.tp is _NONE_TYPE:
        x, none = none, x
    if not (isinstance(none, _Scalar) and none.tp is _NONE_TYPE):
        return None
    return x


def _optional_prep(member_prep: _Prep) -> _Prep:
    def prep(value: object) -> object:
        return None if value is None else member_prep(value)

    return prep


def _attrs_prep(plan: _AttrsClass, building: frozenset[type]) -> _Prep:
    cls = plan.cls
    inner = building | {cls}
    # Fields of exact types are checked inline: no call per field.
    fields = tuple(
        (name, _exact_type(p), None if _exact_type(p) else _prep(p, inner))
        for name, _, p, _ in plan.fields
    )

    def prep(value: object) -> object:
        if type(value) is not cls:
            raise Unsupported
        out: dict[str, object] = {}
        for name, exact, field_prep in fields:
            v = getattr(value, name)
            if exact is not None:
                if type(v) is not exact:
                    raise Unsupported
                out[name] = v
            else:
                out[name] = typing.cast(_Prep, field_prep)(v)
        return out

    return prep


# --------------------------------------------------------------------------- decoding


def _spec(plan: _Plan, building: frozenset[type]) -> tuple[object, _Post]:
    """The msgspec type to decode ``plan``'s JSON as, and how to finish the value."""
    if isinstance(plan, _Scalar):
        return (None if plan.tp is _NONE_TYPE else plan.tp), None
    if isinstance(plan, _UUID):
        return uuid.UUID, None
    if isinstance(plan, _Enum) and _plain_values(plan.tp):
        return plan.tp, None
    if isinstance(plan, _DateTime):
        return str, _reference_post(plan)  # parsed exactly as the reference does
    if isinstance(plan, _Sequence):
        return _sequence_spec(plan, building)
    if isinstance(plan, _FixedTuple) and plan.items:
        return _fixed_tuple_spec(plan, building)
    if isinstance(plan, _Dict):
        return _dict_spec(plan, building)
    if isinstance(plan, _Union) and _optional_member(plan) is not None:
        return _optional_spec(typing.cast(_Plan, _optional_member(plan)), building)
    if isinstance(plan, _AttrsClass) and plan.cls not in building:
        return _attrs_spec(plan, building)
    return Any, _reference_post(plan)


def _reference_post(plan: _Plan) -> _Post:
    def post(value: object) -> object:
        return plan.decode(value, "")

    return post


def _sequence_spec(plan: _Sequence, building: frozenset[type]) -> tuple[object, _Post]:
    item, item_post = _spec(plan.item, building)
    container = plan.container
    if item_post is None:
        if container is tuple:
            return tuple[item, ...], None  # type: ignore[valid-type]
        return container[item], None  # type: ignore[index]

    def post(value: list[object]) -> object:
        return container(item_post(v) for v in value)

    return list[item], post  # type: ignore[valid-type]


def _fixed_tuple_spec(plan: _FixedTuple, building: frozenset[type]) -> tuple[object, _Post]:
    specs = [_spec(p, building) for p in plan.items]
    tp = tuple.__class_getitem__(tuple(t for t, _ in specs))
    posts = tuple(p for _, p in specs)
    if all(p is None for p in posts):
        return tp, None

    def post(value: tuple[object, ...]) -> object:
        return tuple(v if p is None else p(v) for p, v in zip(posts, value, strict=True))

    return tp, post


def _dict_spec(plan: _Dict, building: frozenset[type]) -> tuple[object, _Post]:
    value, value_post = _spec(plan.value, building)
    # Keys are JSON strings; all but str keys are parsed as the reference does.
    str_keys = isinstance(plan.key, _Scalar) and plan.key.tp is str
    if str_keys and value_post is None:
        return dict[str, value], None  # type: ignore[valid-type]

    def post(data: dict[str, object]) -> object:
        return {
            (k if str_keys else plan._decode_key(k, "")): (
                v if value_post is None else value_post(v)
            )
            for k, v in data.items()
        }

    return dict[str, value], post  # type: ignore[valid-type]


def _optional_spec(member: _Plan, building: frozenset[type]) -> tuple[object, _Post]:
    tp, member_post = _spec(member, building)
    optional = typing.Optional[tp]  # type: ignore[valid-type]  # noqa: UP045 - tp is a runtime value
    if member_post is None:
        return optional, None

    def post(value: object) -> object:
        return None if value is None else member_post(value)

    return optional, post


def _attrs_spec(plan: _AttrsClass, building: frozenset[type]) -> tuple[object, _Post]:
    """How to decode an attrs class: by msgspec itself where that is exact, else via a Struct."""
    inner = building | {plan.cls}
    specs = [(name, alias, required, *_spec(p, inner)) for name, alias, p, required in plan.fields]
    if all(post is None for *_, post in specs) and _msgspec_builds_like_init(plan.cls):
        return plan.cls, None
    return _struct(plan, specs)


def _msgspec_builds_like_init(cls: type) -> bool:
    """Whether msgspec's own decoding of attrs class ``cls`` is what ``cls(**fields)`` gives.

    msgspec sets the fields without calling ``__init__`` (about 0.5 µs
    faster), applies defaults and factories, and runs validators and
    ``__attrs_post_init__``, all as attrs's generated ``__init__`` does. It
    knows nothing of converters, ``init=False`` fields, ``__attrs_pre_init__``,
    a hand-written ``__init__`` or a cached hash, so those classes are decoded
    via a Struct and a call of the class instead.
    """
    try:
        props = attrs.inspect(cls)  # attrs >= 25.4
        if not (
            "__attrs_attrs__" in vars(cls)  # decorated itself, not a plain subclass
            and props.added_init
            and props.hashability.name != "HASHABLE_CACHED"
            and not hasattr(cls, "__attrs_pre_init__")
            and all(f.init and f.converter is None for f in attrs.fields(cls))
        ):
            return False
        msgspec.json.Decoder(cls)  # msgspec resolves the annotations itself
    except Exception:  # an older attrs, or annotations msgspec cannot resolve
        return False
    return True


def _struct(
    plan: _AttrsClass, specs: list[tuple[str, str, bool, object, _Post]]
) -> tuple[type, _Post]:
    """A Struct mirroring ``plan``'s class, and the function making the instance from it.

    Struct attributes are named like the class's ``__init__`` arguments and
    read from the JSON keys the reference writes (the attribute names).
    """
    cls = plan.cls
    fields: list[tuple[str, object, object]] = []
    finish: list[tuple[str, _Post]] = []  # fields that are post-processed or may be missing
    for name, alias, required, tp, post in specs:
        default = msgspec.NODEFAULT if required else msgspec.UNSET
        fields.append((alias, tp, msgspec.field(default=default, name=name)))
        if post is not None or not required:
            finish.append((alias, post))
    struct = msgspec.defstruct(plan.name, fields, kw_only=True)

    if not finish:

        def build(value: msgspec.Struct) -> object:
            return cls(**asdict(value))

        return struct, build

    def build_finished(value: msgspec.Struct) -> object:
        kwargs = asdict(value)
        for alias, post in finish:
            v = kwargs[alias]
            if v is _UNSET:  # missing: the attrs default applies
                del kwargs[alias]
            elif post is not None:
                kwargs[alias] = post(v)
        return cls(**kwargs)

    return struct, build_finished


__all__ = ["Codec", "Unsupported", "compile"]
