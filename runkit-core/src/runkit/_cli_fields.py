"""Fields an operator's JSON gives that the command does not have (``runkit execute``).

dogma's default codec ignores unknown fields, so that stored messages outlive
removed fields; for a command typed by hand that would turn a misspelt optional
field into its default without a word, at any depth of nested attrs classes.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Iterator

import attrs

import dogma

from ._errors import CLIError

__all__ = ["check_fields"]

_SEQUENCES = (list, tuple, set, frozenset)


def check_fields(cls: type, text: str) -> None:
    """Raise ``CLIError`` if the JSON *text* has fields the command class *cls* has not.

    Checks the object of *cls* and every nested attrs class its annotations
    name (alone, in ``X | None``, or as the items of a collection or the values
    of a ``dict``). Classes with their own encoding, and unions whose JSON is
    tagged, are left to their codec.
    """
    if not _default_json(cls):
        return
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return  # the codec says what is wrong with it
    for where, found, unknown in _unknown(cls, data, cls.__name__):
        known = _init_fields(found)
        named = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            named.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        what = where if where == found.__name__ else f"{where} ({found.__name__})"
        raise CLIError(
            f"{what} has no field{'s' if len(unknown) > 1 else ''} {', '.join(named)}; "
            f"its fields are {', '.join(known) or 'none'}"
        )


def _default_json(cls: type) -> bool:
    """Whether *cls* is an attrs class that dogma's default codec encodes (by its fields)."""

    def decoder(c: type) -> object:
        return getattr(getattr(c, "unmarshal_binary", None), "__func__", None)

    # A nested class need not be a message: it is encoded by the codec of its container.
    return attrs.has(cls) and (
        not issubclass(cls, dogma.Message) or decoder(cls) is decoder(dogma.Message)
    )


def _init_fields(cls: type) -> list[str]:
    return [f.name for f in attrs.fields(cls) if f.init]


def _unknown(cls: type, data: object, where: str) -> Iterator[tuple[str, type, list[str]]]:
    """(where, class, unknown keys) for *data* decoded as *cls*, outermost first."""
    if not isinstance(data, dict):
        return
    known = _init_fields(cls)
    unknown = [key for key in data if key not in known]
    if unknown:
        yield where, cls, unknown
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: the codec reports it
        return
    for key, value in data.items():
        if key in known and key in hints:
            yield from _within(hints[key], value, f"{where}.{key}")


def _within(annotation: object, value: object, where: str) -> Iterator[tuple[str, type, list[str]]]:
    """What :func:`_unknown` finds in *value*, decoded by *annotation*."""
    if isinstance(annotation, type) and _default_json(annotation):
        yield from _unknown(annotation, value, where)
        return
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # X | None: untagged
            yield from _within(members[0], value, where)
        return
    if origin in _SEQUENCES and isinstance(value, list):
        items = [a for a in args if a is not Ellipsis]
        for i, item in enumerate(value):
            # tuple[X, ...] and list[X] name one type; a fixed tuple one per place.
            kind = items[0] if len(items) == 1 else items[i] if i < len(items) else None
            if kind is not None:
                yield from _within(kind, item, f"{where}[{i}]")
    elif origin is dict and isinstance(value, dict) and len(args) == 2:
        for key, item in value.items():
            yield from _within(args[1], item, f"{where}[{key!r}]")
