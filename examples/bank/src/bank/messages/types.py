"""Value types and helpers shared by the bank's messages."""

from __future__ import annotations

import enum
import re
from datetime import UTC, date, datetime

import dogma

__all__ = [
    "DebitFailureReason",
    "TransactionType",
    "daily_debit_limit_date",
    "format_amount",
    "is_valid_date",
]

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class TransactionType(enum.StrEnum):
    """The kind of transaction that moves money into or out of an account."""

    DEPOSIT = "deposit"
    WITHDRAWAL = "withdrawal"
    TRANSFER = "transfer"

    @property
    def is_debit(self) -> bool:
        """Whether this kind of transaction takes money out of an account."""
        return self is not TransactionType.DEPOSIT

    @staticmethod
    def validate(value: object) -> None:
        """Raise ``dogma.ValidationError`` unless ``value`` is a ``TransactionType``."""
        if not isinstance(value, TransactionType):
            raise dogma.ValidationError(f"invalid transaction type: {value}")


class DebitFailureReason(enum.StrEnum):
    """Why an attempt to take money out of an account was refused."""

    INSUFFICIENT_FUNDS = "insufficient funds"
    DAILY_DEBIT_LIMIT_EXCEEDED = "daily debit limit exceeded"

    @staticmethod
    def validate(value: object) -> None:
        """Raise ``dogma.ValidationError`` unless ``value`` is a ``DebitFailureReason``."""
        if not isinstance(value, DebitFailureReason):
            raise dogma.ValidationError(f"invalid debit failure reason: {value}")


def format_amount(cents: int) -> str:
    """Format an amount of cents as dollars: ``500`` -> ``"$5.00"``, ``-1`` -> ``"-$0.01"``."""
    sign = "-" if cents < 0 else ""
    dollars, rest = divmod(abs(cents), 100)
    return f"{sign}${dollars}.{rest:02d}"


def daily_debit_limit_date(at: datetime) -> str:
    """The calendar day (UTC, ``YYYY-MM-DD``) whose daily debit limit applies at ``at``.

    Raises:
        ValueError: ``at`` is naive; the bank only deals in aware times.
    """
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {at.isoformat()} has no timezone; use an aware time")
    return at.astimezone(UTC).strftime("%Y-%m-%d")


def is_valid_date(value: str) -> bool:
    """Whether ``value`` is a ``YYYY-MM-DD`` date."""
    if not _DATE.fullmatch(value):
        return False
    try:
        date.fromisoformat(value)
    except ValueError:  # e.g. 2001-02-30
        return False
    return True
