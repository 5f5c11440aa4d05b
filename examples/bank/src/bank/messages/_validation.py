"""Small validation helpers shared by the message classes."""

from __future__ import annotations

from datetime import datetime

import dogma

from .types import TransactionType, is_valid_date

__all__ = [
    "require_at_least",
    "require_aware",
    "require_debit_type",
    "require_distinct",
    "require_ids",
    "require_positive",
    "require_valid_date",
]


def _label(field: str) -> str:
    # "from_account_id" -> "from account ID"
    words = field.split("_")
    return " ".join("ID" if w == "id" else w for w in words)


def require_ids(message: object, *fields: str) -> None:
    """Raise unless every named field of ``message`` is a non-empty string."""
    for field in fields:
        value = getattr(message, field)
        # attrs does not check annotations, so a caller may pass any type.
        if not isinstance(value, str):
            raise dogma.ValidationError(
                f"{type(message).__name__} must have a string {_label(field)}, not {value!r}"
            )
        if not value:
            raise dogma.ValidationError(
                f"{type(message).__name__} must not have an empty {_label(field)}"
            )


def _require_int(message: object, field: str) -> int:
    value = getattr(message, field)
    # Amounts are whole cents: not a float, a numeric string or a bool (an int
    # subclass in Python, which the codec refuses to store as an int).
    if type(value) is not int:
        raise dogma.ValidationError(
            f"{type(message).__name__} must have an integer {_label(field)}, not {value!r}"
        )
    return value


def require_positive(message: object, field: str = "amount") -> None:
    """Raise unless the named field of ``message`` is an ``int`` of at least 1."""
    if _require_int(message, field) < 1:
        raise dogma.ValidationError(
            f"{type(message).__name__} must have a positive {_label(field)}"
        )


def require_at_least(message: object, field: str, minimum: int) -> None:
    """Raise unless the named field of ``message`` is an ``int`` of at least ``minimum``."""
    if _require_int(message, field) < minimum:
        raise dogma.ValidationError(
            f"{type(message).__name__} must have a {_label(field)} of at least {minimum}"
        )


def require_distinct(message: object) -> None:
    """Raise if a transfer's source and destination accounts are the same."""
    if getattr(message, "from_account_id") == getattr(message, "to_account_id"):  # noqa: B009
        raise dogma.ValidationError(
            f"{type(message).__name__} must not transfer to the account it transfers from"
        )


def require_aware(message: object, field: str = "scheduled_time") -> None:
    """Raise unless the named datetime field of ``message`` has a time zone."""
    value = getattr(message, field)
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise dogma.ValidationError(
            f"{type(message).__name__} must have a timezone-aware {_label(field)}"
        )


def require_debit_type(message: object, debit_type: object) -> None:
    """Raise unless ``debit_type`` is a transaction type that debits an account."""
    TransactionType.validate(debit_type)
    assert isinstance(debit_type, TransactionType)
    if not debit_type.is_debit:
        raise dogma.ValidationError(
            f"{type(message).__name__} must have a debit type, not {debit_type}"
        )


def require_valid_date(message: object, field: str = "date") -> None:
    """Raise unless the named field of ``message`` is a ``YYYY-MM-DD`` date."""
    value = getattr(message, field)
    if not isinstance(value, str) or not is_valid_date(value):
        raise dogma.ValidationError(
            f"{type(message).__name__} must have a YYYY-MM-DD {_label(field)}, not {value!r}"
        )
