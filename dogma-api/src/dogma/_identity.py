"""Identity and UUID validation shared by identities and message type IDs.

Dogma's UUID rule is deliberately stricter than :class:`uuid.UUID`, which also
accepts braces, ``urn:uuid:`` prefixes and unhyphenated forms: an identifier
must be exactly the 36-character hyphenated form so that every engine agrees
on its canonical spelling.
"""

from __future__ import annotations

_HYPHENS = frozenset((8, 13, 18, 23))
_HEX = frozenset("0123456789abcdefABCDEF")
_NIL = "00000000-0000-0000-0000-000000000000"
_MAX_NAME_BYTES = 255

_KEY_RULE = (
    "expected a UUID in the 36-character hyphenated form "
    "(e.g. '5195fe85-eb3f-4121-84b0-be72cbc5722f'), which must not be the nil UUID"
)
_NAME_RULE = "names must be 1-255 bytes of printable UTF-8 with no whitespace"


def uuid_problem(value: str) -> str | None:
    """Return why ``value`` breaks Dogma's UUID rule, or ``None`` if it is valid."""
    if len(value) != 36:
        return f"it is {len(value)} characters long, not 36"
    for i, ch in enumerate(value):
        if i in _HYPHENS:
            if ch != "-":
                return f"character {i} is {ch!r}, not '-'"
        elif ch not in _HEX:
            return f"character {i} is {ch!r}, not a hexadecimal digit"
    if value == _NIL:
        return "it is the nil UUID"
    return None


def normalize_uuid(value: object, what: str) -> str:
    """Validate ``value`` against Dogma's UUID rule and return it in lowercase.

    ``what`` names the value in error messages, e.g. ``"identity key"``.
    """
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__qualname__} {value!r}")
    problem = uuid_problem(value)
    if problem is not None:
        raise ValueError(f"invalid {what} {value!r}: {problem}; {_KEY_RULE}")
    return value.lower()


def validate_identity_key(key: str) -> str:
    """Validate an application or handler identity key and return its normal form.

    A key is a UUID: exactly 36 characters, hyphens at indexes 8, 13, 18 and
    23, hexadecimal digits (either case) elsewhere, and not the nil UUID.
    Braces, ``urn:uuid:`` prefixes and unhyphenated forms are rejected even
    though :class:`uuid.UUID` accepts them.

    Returns:
        The key in lowercase.

    Raises:
        TypeError: ``key`` is not a ``str``.
        ValueError: ``key`` breaks the rule; the message names the key and the rule.
    """
    return normalize_uuid(key, "identity key")


def validate_identity_name(name: str) -> str:
    """Validate an application or handler identity name and return it unchanged.

    A name is 1-255 bytes of UTF-8, every character printable
    (:meth:`str.isprintable`, matching Go's ``unicode.IsPrint``) and none of
    them whitespace. Names are compared byte-wise; no Unicode normalisation
    is applied.

    Raises:
        TypeError: ``name`` is not a ``str``.
        ValueError: ``name`` breaks the rule; the message names the value and the rule.
    """
    if not isinstance(name, str):
        raise TypeError(f"identity name must be a str, got {type(name).__qualname__} {name!r}")
    problem = _name_problem(name)
    if problem is not None:
        raise ValueError(f"invalid identity name {name!r}: {problem}; {_NAME_RULE}")
    return name


def _name_problem(name: str) -> str | None:
    if not name:
        return "it is empty"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid UTF-8 (it contains a lone surrogate)"
    if size > _MAX_NAME_BYTES:
        return f"it is {size} bytes long"
    for ch in name:
        if ch.isspace():
            return f"it contains whitespace ({ch!r})"
        if not ch.isprintable():
            return f"it contains a non-printable character ({ch!r})"
    return None
