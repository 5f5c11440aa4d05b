"""The default JSON codec for attrs message classes.

Values are encoded by their *annotations*, not by their runtime types, so a
value decodes to exactly the type its field declares (a ``tuple`` stays a
``tuple``). A plan is built once per class and cached.

Unions are encoded untagged when each member has its own JSON shape (e.g.
``int | str | None``). When two members share a shape (``A | B`` of two attrs
classes, ``str | datetime``), values are wrapped as ``{"<type name>": value}``
so decoding cannot guess wrong.

The plans are the codec's one description of a class's fields, and their
``encode``/``decode`` methods are the pure-Python reference back-end. When
msgspec is importable (``dogma-api[fast]``; the engine always has it),
:mod:`dogma._codec_msgspec` compiles the same plans into a msgspec encoder
and decoder per class. That fast path produces the same bytes and values;
whatever it cannot handle exactly (and every error) is left to the reference
back-end, which therefore also words every error message.
"""

from __future__ import annotations

import json
import typing
from typing import TypeVar

import attrs

from ._codec_plans import (
    _AttrsClass,
    _DecodeError,
    _EncodeTypeError,
    _name,
    _plan_for,
    dumps,
)

T = TypeVar("T")


def encode(message: object) -> bytes:
    """Encode attrs instance ``message`` as compact UTF-8 JSON."""
    fast = _fast_codec(type(message))
    if fast is not None:
        try:
            return fast.encode(message)
        except Exception:  # noqa: S110 - the reference back-end decides, and words the error
            pass
    return pure_encode(message)


def decode(cls: type[T], data: bytes) -> T:
    """Decode ``data`` (as made by :func:`encode`) into a new instance of ``cls``."""
    # Only exact bytes take the fast path: the reference back-end checks the
    # argument's type, and msgspec would also accept a str.
    if type(data) is bytes:
        fast = _fast_codec(cls)
        if fast is not None:
            try:
                return typing.cast(T, fast.decode(data))
            except Exception:  # noqa: S110 - the reference back-end decides, and words the error
                pass
    return pure_decode(cls, data)


def pure_encode(message: object) -> bytes:
    """:func:`encode` on the pure-Python reference back-end."""
    cls = type(message)
    plan = _plan_for(cls)
    try:
        obj = plan.encode(message, "")
    except _EncodeTypeError as exc:
        raise TypeError(f"cannot marshal {_name(cls)}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"cannot marshal {_name(cls)}: {exc}") from None
    try:
        text = dumps(obj)
    except ValueError as exc:  # an int with more digits than Python converts
        raise ValueError(f"cannot marshal {_name(cls)}: {exc}") from None
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"cannot marshal {_name(cls)}: a string contains a lone surrogate "
            f"{exc.object[exc.start : exc.end]!r}, which UTF-8 cannot encode"
        ) from None


def pure_decode(cls: type[T], data: bytes) -> T:
    """:func:`decode` on the pure-Python reference back-end."""
    plan = _plan_for(cls)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(
            f"cannot unmarshal {_name(cls)}: expected bytes, got {type(data).__qualname__}"
        )
    try:
        # Strict UTF-8: json.loads(bytes) would also read UTF-16, UTF-32, a BOM
        # and encoded surrogates, none of which encode writes or msgspec reads.
        obj = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot unmarshal {_name(cls)}: invalid JSON: {exc}") from None
    except ValueError as exc:  # an int with more digits than Python converts
        raise ValueError(f"cannot unmarshal {_name(cls)}: {exc}") from None
    except RecursionError:
        raise ValueError(f"cannot unmarshal {_name(cls)}: JSON nested too deeply") from None
    try:
        value = plan.decode(obj, "")
    except _DecodeError as exc:
        raise ValueError(f"cannot unmarshal {_name(cls)}: {exc}") from None
    except RecursionError:
        raise ValueError(f"cannot unmarshal {_name(cls)}: value nested too deeply") from None
    return typing.cast(T, value)


# --------------------------------------------------------------------------- back-ends


class FastCodec(typing.Protocol):
    """A class's compiled encoder and decoder, made by a fast back-end.

    Both give exactly what the reference back-end gives, or raise (anything)
    for the reference back-end to handle the value instead.
    """

    def encode(self, message: object) -> bytes: ...

    def decode(self, data: bytes) -> object: ...


class _Backend(typing.Protocol):
    def compile(self, plan: _AttrsClass) -> FastCodec | None: ...


# The fast back-end: None until loaded, then the module or False without msgspec.
_backend: _Backend | typing.Literal[False] | None = None

# Each class's fast codec, compiled on first use; None where there is none.
_FAST: dict[type, FastCodec | None] = {}


def _load_backend() -> _Backend | None:
    """Return the msgspec back-end, importing msgspec on first use, or None without it."""
    global _backend  # noqa: PLW0603 - loaded on first use so that importing dogma stays cheap
    if _backend is None:
        try:
            from . import _codec_msgspec
        except ImportError:
            _backend = False
        else:
            _backend = _codec_msgspec
    return _backend or None


def use_pure_backend(pure: bool) -> None:
    """Use only the reference back-end (``True``) or the fastest available one.

    For tests and benchmarks; forgets the fast codecs compiled so far.
    """
    global _backend  # noqa: PLW0603
    _backend = False if pure else None
    _FAST.clear()


def _fast_codec(cls: type) -> FastCodec | None:
    try:
        return _FAST[cls]
    except KeyError:
        pass
    backend = _load_backend()
    if backend is None:
        return None
    plan = _plan_for(cls)
    if not isinstance(plan, _AttrsClass):
        _FAST[cls] = None
        return None
    try:
        plan.fields  # noqa: B018 - unsupported fields: the reference back-end reports them
    except TypeError:
        return None
    fast = _FAST[cls] = backend.compile(plan)
    return fast


def check(cls: type, localns: dict[str, object] | None = None) -> None:
    """Build the codec for ``cls`` now, raising ``TypeError`` for unsupported fields.

    ``localns`` is the namespace the class was defined in, which resolves
    string annotations naming classes local to a function. Annotations that
    cannot be resolved yet (forward references) are left for first use.
    """
    try:
        attrs.resolve_types(cls, localns=localns)
    except NameError:
        return
    plan = _plan_for(cls)
    if not isinstance(plan, _AttrsClass):
        return
    try:
        plan.fields  # noqa: B018 - evaluated for its validation
    except TypeError as exc:
        if "cannot resolve" not in str(exc):
            raise


__all__ = ["check", "decode", "dumps", "encode", "pure_decode", "pure_encode", "use_pure_backend"]
