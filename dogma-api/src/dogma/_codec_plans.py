"""The default JSON codec's plans: one per field type, and the reference back-end.

A plan describes how one annotated type is written to and read from JSON
(see :mod:`dogma._codec`); its ``encode``/``decode`` methods are the
pure-Python reference back-end, which words every error message.
:mod:`dogma._codec_msgspec` compiles the same plans into msgspec codecs.
"""

from __future__ import annotations

import enum
import json
import math
import types
import typing
import uuid
from datetime import UTC, datetime
from typing import Any, Literal, Union, get_args, get_origin

import attrs

JSON = Any  # the result of json.loads(): None, bool, int, float, str, list or dict

_NONE_TYPE = type(None)


class _DecodeError(ValueError):
    """A decoding failure at a path inside the message."""


class _EncodeTypeError(TypeError):
    """A value that does not match its annotation."""


def dumps(obj: JSON) -> str:
    """Return ``obj`` (JSON-native values) as the codec's compact JSON text."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _name(cls: type) -> str:
    # Error messages name classes as written in the source, without the
    # "<locals>" path of classes defined inside functions.
    return cls.__qualname__.rpartition("<locals>.")[2]


class _Plan:
    """How to encode and decode values of one annotation."""

    name: str
    shapes: frozenset[str]

    def matches(self, value: object, *, exact: bool) -> bool:
        raise NotImplementedError

    def encode(self, value: object, path: str) -> JSON:
        raise NotImplementedError

    def decode(self, data: JSON, path: str) -> object:
        raise NotImplementedError


def _at(path: str) -> str:
    return f"field {path!r}: " if path else ""


def _got(value: object) -> str:
    return f"{_name(type(value))} {value!r}"


def _json_shape(data: JSON) -> str:
    if data is None:
        return "null"
    if isinstance(data, bool):
        return "bool"
    if isinstance(data, int):
        return "int"
    if isinstance(data, float):
        return "float"
    if isinstance(data, str):
        return "string"
    if isinstance(data, list):
        return "array"
    return "object"


class _Scalar(_Plan):
    """None, bool, int, float and str: JSON-native values."""

    def __init__(self, tp: type) -> None:
        self.tp = tp
        self.name = "None" if tp is _NONE_TYPE else tp.__name__
        shape = {_NONE_TYPE: "null", bool: "bool", int: "int", float: "float", str: "string"}[tp]
        self.shapes = frozenset({shape})

    def matches(self, value: object, *, exact: bool) -> bool:
        if self.tp is _NONE_TYPE:
            return value is None
        if exact:
            return type(value) is self.tp
        if self.tp is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if self.tp is float:
            return isinstance(value, int | float) and not isinstance(value, bool)
        return isinstance(value, self.tp)

    def encode(self, value: object, path: str) -> JSON:
        if not self.matches(value, exact=False):
            raise _EncodeTypeError(f"{_at(path)}expected {self.name}, got {_got(value)}")
        if self.tp is float:
            given = typing.cast(float, value)
            number = _as_float(given)
            if not math.isfinite(number):
                raise ValueError(_not_finite(given, path))
            return number
        # A subclass value (e.g. a str-mixin enum member) is stored as its plain
        # value; str() would give "Colour.RED" for a (str, Enum) member.
        if self.tp is str and type(value) is not str:
            return str.__str__(typing.cast(str, value))
        if self.tp is int and type(value) is not int:
            return int.__int__(typing.cast(int, value))
        return value

    def decode(self, data: JSON, path: str) -> object:
        # json.loads reads NaN, Infinity and numbers beyond float's range; encode
        # never writes them.
        if self.tp is float and isinstance(data, int | float) and not isinstance(data, bool):
            number = _as_float(data)
            if not math.isfinite(number):
                raise _DecodeError(_not_finite(data, path))
            return number
        if self.tp is int and isinstance(data, float) and data.is_integer():
            raise _DecodeError(f"{_at(path)}expected int, got float {data!r}")
        if not self.matches(data, exact=True):
            raise _DecodeError(f"{_at(path)}expected {self.name}, got {_got(data)}")
        if self.tp is str and not data.isascii():
            _refuse_lone_surrogates(data, path)
        return data


def _refuse_lone_surrogates(text: str, path: str) -> None:
    # json.loads reads "\ud800" escapes as lone surrogates, which encode could
    # not write back (msgspec refuses them itself).
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _DecodeError(
            f"{_at(path)}a string contains a lone surrogate "
            f"{exc.object[exc.start : exc.end]!r}, which UTF-8 cannot encode"
        ) from None


def _as_float(number: float) -> float:
    """``float(number)``, with an int too large for a float as infinity (refused as such)."""
    try:
        return float(number)
    except OverflowError:
        return math.inf if number > 0 else -math.inf


def _not_finite(number: float, path: str) -> str:
    # Only an int too large for a float is non-finite without being a float.
    shown = repr(float(number)) if isinstance(number, float) else "an int too large for a float"
    return f"{_at(path)}{shown} cannot be stored; floats must be finite"


class _DateTime(_Plan):
    name = "datetime"
    shapes = frozenset({"string"})

    def matches(self, value: object, *, exact: bool) -> bool:
        return isinstance(value, datetime)

    def encode(self, value: object, path: str) -> JSON:
        if not isinstance(value, datetime):
            raise _EncodeTypeError(f"{_at(path)}expected datetime, got {_got(value)}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"{_at(path)}naive datetime {value.isoformat()!r} is not allowed; "
                "use a timezone-aware datetime in UTC, e.g. datetime.now(UTC)"
            )
        try:
            return value.astimezone(UTC).isoformat()
        except OverflowError:
            raise ValueError(
                f"{_at(path)}datetime {value.isoformat()!r} is outside the range of "
                "datetime in UTC (years 1 to 9999)"
            ) from None

    def decode(self, data: JSON, path: str) -> object:
        if not isinstance(data, str):
            raise _DecodeError(f"{_at(path)}expected an ISO 8601 string, got {_got(data)}")
        try:
            value = datetime.fromisoformat(data)
        except ValueError:
            raise _DecodeError(f"{_at(path)}{data!r} is not an ISO 8601 datetime") from None
        if value.tzinfo is None:
            raise _DecodeError(f"{_at(path)}datetime {data!r} has no UTC offset")
        try:
            return value.astimezone(UTC)
        except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is in year 0 in UTC
            raise _DecodeError(
                f"{_at(path)}datetime {data!r} is outside the range of datetime in UTC "
                "(years 1 to 9999)"
            ) from None


class _UUID(_Plan):
    name = "UUID"
    shapes = frozenset({"string"})

    def matches(self, value: object, *, exact: bool) -> bool:
        return isinstance(value, uuid.UUID)

    def encode(self, value: object, path: str) -> JSON:
        if not isinstance(value, uuid.UUID):
            raise _EncodeTypeError(f"{_at(path)}expected UUID, got {_got(value)}")
        return str(value)

    def decode(self, data: JSON, path: str) -> object:
        if not isinstance(data, str):
            raise _DecodeError(f"{_at(path)}expected a UUID string, got {_got(data)}")
        try:
            return uuid.UUID(data)
        except ValueError:
            raise _DecodeError(f"{_at(path)}{data!r} is not a UUID") from None


class _Enum(_Plan):
    def __init__(self, tp: type[enum.Enum]) -> None:
        self.tp = tp
        self.name = _name(tp)
        shapes: set[str] = set()
        for member in tp:
            shape = _json_shape(member.value)
            if shape not in ("bool", "int", "float", "string"):
                raise TypeError(
                    f"enum {_name(tp)} has a {type(member.value).__qualname__} value "
                    f"({member.name}); only str, int, float and bool values can be stored"
                )
            shapes.add(shape)
        self.shapes = frozenset(shapes)

    def matches(self, value: object, *, exact: bool) -> bool:
        return isinstance(value, self.tp)

    def encode(self, value: object, path: str) -> JSON:
        if not isinstance(value, self.tp):
            raise _EncodeTypeError(f"{_at(path)}expected {self.name}, got {_got(value)}")
        return value.value

    def decode(self, data: JSON, path: str) -> object:
        # The JSON shape is checked first: the lookup by value alone would take
        # true or 1.0 for a member valued 1 (they are equal in Python), which an
        # int field refuses. A float value takes an int, as a float field does.
        shape = _json_shape(data)
        if not _shape_fits(shape, self.shapes):
            raise _DecodeError(f"{_at(path)}expected {self.name}, got {_got(data)}")
        try:
            member = self.tp(data)
        except ValueError:
            raise _DecodeError(f"{_at(path)}{data!r} is not a valid {self.name}") from None
        # In an enum of ints and floats, 1.0 must not find the member valued 1.
        if not _shape_fits(shape, {_json_shape(member.value)}):
            raise _DecodeError(f"{_at(path)}{data!r} is not a valid {self.name}")
        return member


def _shape_fits(shape: str, shapes: typing.AbstractSet[str]) -> bool:
    """Whether JSON of ``shape`` may decode as a value of one of ``shapes``."""
    return shape in shapes or (shape == "int" and "float" in shapes)


class _Literal(_Plan):
    def __init__(self, values: tuple[object, ...]) -> None:
        for v in values:
            if not isinstance(v, str | int | bool) or isinstance(v, enum.Enum):
                raise TypeError(f"Literal value {v!r} cannot be stored; use str, int or bool")
        self.values = values
        self.name = f"Literal[{', '.join(map(repr, values))}]"
        self.shapes = frozenset(_json_shape(v) for v in values)

    def matches(self, value: object, *, exact: bool) -> bool:
        return any(type(value) is type(v) and value == v for v in self.values)

    def encode(self, value: object, path: str) -> JSON:
        if not self.matches(value, exact=True):
            raise _EncodeTypeError(f"{_at(path)}expected {self.name}, got {_got(value)}")
        return value

    def decode(self, data: JSON, path: str) -> object:
        if not self.matches(data, exact=True):
            raise _DecodeError(f"{_at(path)}expected {self.name}, got {_got(data)}")
        return data


class _Sequence(_Plan):
    """tuple[X, ...], list[X], set[X] and frozenset[X]: JSON arrays."""

    shapes = frozenset({"array"})

    def __init__(self, container: type, item: _Plan) -> None:
        self.container = container
        self.item = item
        suffix = ", ..." if container is tuple else ""
        self.name = f"{container.__name__}[{item.name}{suffix}]"

    def matches(self, value: object, *, exact: bool) -> bool:
        return isinstance(value, self.container)

    def encode(self, value: object, path: str) -> JSON:
        if not isinstance(value, self.container):
            raise _EncodeTypeError(f"{_at(path)}expected {self.name}, got {_got(value)}")
        items = typing.cast("typing.Iterable[object]", value)
        return [self.item.encode(v, f"{path}[{i}]") for i, v in enumerate(items)]

    def decode(self, data: JSON, path: str) -> object:
        if not isinstance(data, list):
            raise _DecodeError(f"{_at(path)}expected an array, got {_got(data)}")
        return self.container(self.item.decode(v, f"{path}[{i}]") for i, v in enumerate(data))


class _FixedTuple(_Plan):
    shapes = frozenset({"array"})

    def __init__(self, items: tuple[_Plan, ...]) -> None:
        self.items = items
        self.name = f"tuple[{', '.join(p.name for p in items)}]"

    def matches(self, value: object, *, exact: bool) -> bool:
        return isinstance(value, tuple) and len(value) == len(self.items)

    def encode(self, value: object, path: str) -> JSON:
        if not self.matches(value, exact=False):
            raise _EncodeTypeError(f"{_at(path)}expected {self.name}, got {_got(value)}")
        values = typing.cast(tuple[object, ...], value)
        return [
            p.encode(v, f"{path}[{i}]")
            for i, (p, v) in enumerate(zip(self.items, values, strict=True))
        ]

    def decode(self, data: JSON, path: str) -> object:
        if not isinstance(data, list) or len(data) != len(self.items):
            raise _DecodeError(
                f"{_at(path)}expected an array of {len(self.items)} items, got {_got(data)}"
            )
        return tuple(
            p.decode(v, f"{path}[{i}]")
            for i, (p, v) in enumerate(zip(self.items, data, strict=True))
        )


class _Dict(_Plan):
    shapes = frozenset({"object"})

    def __init__(self, key: _Plan, value: _Plan) -> None:
        if not isinstance(key, _Scalar | _UUID | _Enum) or key.name in ("None", "bool", "float"):
            raise TypeError(
                f"dict keys of type {key.name} cannot be stored; use str, int, UUID or enum"
            )
        if isinstance(key, _Enum):
            _check_distinct_keys(key.tp)
        self.key = key
        self.value = value
        self.name = f"dict[{key.name}, {value.name}]"

    def matches(self, value: object, *, exact: bool) -> bool:
        return isinstance(value, dict)

    def _encode_key(self, key: object, path: str) -> str:
        return _key_text(self.key.encode(key, f"{path} key"))

    def _decode_key(self, key: str, path: str) -> object:
        # JSON object keys are strings: str, UUID and str-valued enum keys are
        # stored as they are; numbers (int and int-valued enum keys) as JSON text.
        sub = f"{path} key"
        if "string" in self.key.shapes:
            try:
                return self.key.decode(key, sub)
            except _DecodeError:
                if self.key.shapes == {"string"}:
                    raise
        try:
            raw = json.loads(key)
        except ValueError:  # not JSON, or an int with more digits than Python converts
            raise _DecodeError(f"{_at(sub)}invalid {self.key.name} key {key!r}") from None
        value = self.key.decode(raw, sub)
        # Only the spelling encode writes: json.loads also reads " 1" and "-0",
        # and two spellings of one key would collide in the dict.
        if self._encode_key(value, path) != key:
            raise _DecodeError(f"{_at(sub)}invalid {self.key.name} key {key!r}")
        return value

    def encode(self, value: object, path: str) -> JSON:
        if not isinstance(value, dict):
            raise _EncodeTypeError(f"{_at(path)}expected {self.name}, got {_got(value)}")
        items = typing.cast(dict[object, object], value).items()
        out: dict[str, JSON] = {}
        for k, v in items:
            out[self._encode_key(k, path)] = self.value.encode(v, f"{path}[{k!r}]")
        return out

    def decode(self, data: JSON, path: str) -> object:
        if not isinstance(data, dict):
            raise _DecodeError(f"{_at(path)}expected an object, got {_got(data)}")
        return {
            self._decode_key(k, path): self.value.decode(v, f"{path}[{k!r}]")
            for k, v in data.items()
        }


def _key_text(encoded: JSON) -> str:
    """The JSON object key for a dict key encoded as ``encoded``."""
    return encoded if isinstance(encoded, str) else json.dumps(encoded)


def _check_distinct_keys(tp: type[enum.Enum]) -> None:
    """Refuse enum ``tp`` as a dict key type if two members would be written as one key.

    Keys are strings, so a member valued 1 and one valued "1" would collide.
    """
    seen: dict[str, enum.Enum] = {}
    for member in tp:
        text = _key_text(member.value)
        other = seen.setdefault(text, member)
        if other is not member:
            raise TypeError(
                f"enum {_name(tp)} cannot be used for dict keys: {other.name} "
                f"({other.value!r}) and {member.name} ({member.value!r}) would both be "
                f"stored as the key {text!r}"
            )


class _Union(_Plan):
    def __init__(self, members: tuple[_Plan, ...]) -> None:
        self.members = members
        self.name = " | ".join(m.name for m in members)
        owners: dict[str, list[_Plan]] = {}
        for m in members:
            for shape in m.shapes:
                owners.setdefault(shape, []).append(m)
        self.shapes = frozenset(owners)
        # None is always unambiguous (only NoneType is null); tag when anything else collides.
        self.tagged = any(len(ms) > 1 for shape, ms in owners.items() if shape != "null")
        self.by_shape = {shape: ms[0] for shape, ms in owners.items()}
        self.by_tag = {m.name: m for m in members}
        if self.tagged and len(self.by_tag) != len(members):
            raise TypeError(
                f"union {self.name} has members with the same name; it cannot be stored"
            )

    def _member_for(self, value: object) -> _Plan | None:
        for exact in (True, False):
            for m in self.members:
                if m.matches(value, exact=exact):
                    return m
        return None

    def matches(self, value: object, *, exact: bool) -> bool:
        return any(m.matches(value, exact=exact) for m in self.members)

    def encode(self, value: object, path: str) -> JSON:
        member = self._member_for(value)
        if member is None:
            raise _EncodeTypeError(f"{_at(path)}expected {self.name}, got {_got(value)}")
        encoded = member.encode(value, path)
        if not self.tagged or value is None:
            return encoded
        return {member.name: encoded}

    def decode(self, data: JSON, path: str) -> object:
        if data is None and "null" in self.by_shape:
            return None
        if self.tagged:
            if not isinstance(data, dict) or len(data) != 1:
                raise _DecodeError(
                    f"{_at(path)}expected a one-key object naming a member of {self.name}, "
                    f"got {_got(data)}"
                )
            ((tag, inner),) = data.items()
            member = self.by_tag.get(tag)
            if member is None:
                raise _DecodeError(f"{_at(path)}{tag!r} is not a member of {self.name}")
            return member.decode(inner, path)
        shape = _json_shape(data)
        plan = self.by_shape.get(shape)
        if plan is None and shape == "int":
            plan = self.by_shape.get("float")
        if plan is None:
            raise _DecodeError(f"{_at(path)}expected {self.name}, got {_got(data)}")
        return plan.decode(data, path)


class _AttrsClass(_Plan):
    """A nested (or top-level) attrs class: a JSON object keyed by field name."""

    shapes = frozenset({"object"})

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.name = _name(cls)
        self._fields: list[tuple[str, str, _Plan, bool]] | None = None

    @property
    def fields(self) -> list[tuple[str, str, _Plan, bool]]:
        # Resolved on first use so that classes may refer to ones defined after them.
        if self._fields is None:
            try:
                attrs.resolve_types(self.cls)
            except NameError as exc:
                raise TypeError(
                    f"cannot resolve the annotations of {_name(self.cls)}: {exc}; "
                    "define the classes it refers to at module level"
                ) from None
            fields: list[tuple[str, str, _Plan, bool]] = []
            for f in attrs.fields(self.cls):
                if not f.init:
                    continue
                try:
                    plan = _plan(f.type)
                except TypeError as exc:
                    raise TypeError(
                        f"field {_name(self.cls)}.{f.name} cannot be marshalled: {exc}; "
                        "override marshal_binary() and unmarshal_binary() to store it"
                    ) from None
                fields.append((f.name, f.alias or f.name, plan, f.default is attrs.NOTHING))
            self._fields = fields
        return self._fields

    def matches(self, value: object, *, exact: bool) -> bool:
        return type(value) is self.cls if exact else isinstance(value, self.cls)

    def encode(self, value: object, path: str) -> JSON:
        if type(value) is not self.cls:
            raise _EncodeTypeError(f"{_at(path)}expected {self.name}, got {_got(value)}")
        return {
            name: plan.encode(getattr(value, name), f"{path}.{name}" if path else name)
            for name, _, plan, _ in self.fields
        }

    def decode(self, data: JSON, path: str) -> object:
        if not isinstance(data, dict):
            raise _DecodeError(f"{_at(path)}expected an object, got {_got(data)}")
        kwargs: dict[str, object] = {}
        for name, alias, plan, required in self.fields:
            sub = f"{path}.{name}" if path else name
            if name not in data:
                if required:
                    raise _DecodeError(f"field {sub!r} is missing")
                continue
            kwargs[alias] = plan.decode(data[name], sub)
        try:
            return self.cls(**kwargs)
        except (TypeError, ValueError) as exc:
            # attrs validators and __attrs_post_init__ run here.
            where = f"{_at(path)}invalid {self.name}: " if path else ""
            raise _DecodeError(f"{where}{exc}") from exc


# --------------------------------------------------------------------------- building


class _Stateless(_Plan):
    """A plain class without fields (``class Ping(dogma.Command): pass``): ``{}``."""

    shapes = frozenset({"object"})

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.name = _name(cls)

    def matches(self, value: object, *, exact: bool) -> bool:
        return type(value) is self.cls if exact else isinstance(value, self.cls)

    def encode(self, value: object, path: str) -> JSON:
        if type(value) is not self.cls:
            raise _EncodeTypeError(f"{_at(path)}expected {self.name}, got {_got(value)}")
        if getattr(value, "__dict__", None):
            raise _EncodeTypeError(
                f"{self.name} is not an attrs class, so the default codec cannot marshal its "
                "attributes; decorate it with @attrs.frozen (below @dogma.register_*) or "
                "override marshal_binary() and unmarshal_binary()"
            )
        return {}

    def decode(self, data: JSON, path: str) -> object:
        if not isinstance(data, dict):
            raise _DecodeError(f"{_at(path)}expected an object, got {_got(data)}")
        return self.cls()


# One plan per class, built on first use; a racing duplicate build is harmless.
_PLANS: dict[type, _Plan] = {}


def _plan_for(cls: type) -> _Plan:
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS.setdefault(cls, _new_plan(cls))
    return plan


def _new_plan(cls: type) -> _Plan:
    if attrs.has(cls):
        return _AttrsClass(cls)
    if cls.__init__ is object.__init__:  # type: ignore[misc]
        return _Stateless(cls)
    raise TypeError(
        f"{_name(cls)} is not an attrs class, so the default codec cannot marshal it; "
        "decorate it with @attrs.frozen or override marshal_binary() and unmarshal_binary()"
    )


_TYPE_ALIAS_TYPE: type | None = getattr(typing, "TypeAliasType", None)
_SCALARS: dict[object, type] = {
    str: str,
    int: int,
    float: float,
    bool: bool,
    None: _NONE_TYPE,
    _NONE_TYPE: _NONE_TYPE,
}
_CONTAINERS: dict[object, type] = {
    tuple: tuple,
    list: list,
    set: set,
    frozenset: frozenset,
    dict: dict,
}


def _plan(tp: object) -> _Plan:
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is typing.Annotated:
        return _plan(args[0])
    if _TYPE_ALIAS_TYPE is not None and isinstance(tp, _TYPE_ALIAS_TYPE):
        return _plan(getattr(tp, "__value__"))  # noqa: B009 - `type X = ...` (Python 3.12+)
    if tp in _SCALARS:
        return _Scalar(_SCALARS[tp])
    if tp is datetime:
        return _DateTime()
    if tp is uuid.UUID:
        return _UUID()
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _Enum(tp)
    if isinstance(tp, type) and attrs.has(tp):
        return _plan_for(tp)
    if origin is Literal:
        return _Literal(args)
    if origin is Union or origin is types.UnionType:
        return _Union(tuple(_plan(a) for a in args))
    if origin in _CONTAINERS:
        return _container(typing.cast(type, origin), args, tp)
    if tp in _CONTAINERS:
        raise TypeError(
            f"bare {typing.cast(type, tp).__name__} needs item types, e.g. tuple[str, ...]"
        )
    raise TypeError(f"{_type_name(tp)} is not a supported field type")


def _container(origin: type, args: tuple[object, ...], tp: object) -> _Plan:
    if origin is dict:
        return _Dict(_plan(args[0]), _plan(args[1]))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _Sequence(tuple, _plan(args[0]))
        if args == ((),):  # tuple[()]
            return _FixedTuple(())
        return _FixedTuple(tuple(_plan(a) for a in args))
    if len(args) != 1:
        raise TypeError(f"{_type_name(tp)} is not a supported field type")
    return _Sequence(origin, _plan(args[0]))


def _type_name(tp: object) -> str:
    if isinstance(tp, type):
        return _name(tp)
    return repr(tp)
