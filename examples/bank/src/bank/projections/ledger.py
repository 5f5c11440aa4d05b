"""The ledger projection: accounts with balances, and every credit and debit."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import dogma

from ..messages import AccountCredited, AccountDebited, AccountOpened, TransactionType
from . import _schema
from ._db import SQLiteProjection

__all__ = ["LedgerProjectionHandler", "credit_description", "debit_description"]


class LedgerProjectionHandler(SQLiteProjection):
    """Keeps the ``accounts`` and ``ledger`` tables.

    Each credit or debit adds a ledger row with the resulting balance. Rows of
    one transaction are numbered (``transaction_order``) across all accounts,
    so a transfer's debit, credit and any refund sort in the order they
    happened.
    """

    KEY = "a1b2c3d4-e5f6-7890-abcd-ef1234567890"
    SCHEMA = _schema.LEDGER

    def configure(self, c: dogma.ProjectionConfigurer) -> None:
        """Declare the projection's identity and routes."""
        c.identity("ledger", self.KEY)
        c.routes(
            dogma.handles_event(AccountOpened),
            dogma.handles_event(AccountCredited),
            dogma.handles_event(AccountDebited),
        )

    def apply(self, conn: sqlite3.Connection, event: dogma.Event, recorded_at: datetime) -> None:
        """Add the account, or the credit or debit and the new balance."""
        match event:
            case AccountOpened():
                conn.execute(
                    "INSERT INTO accounts (id, name, customer_id, balance) VALUES (?, ?, ?, 0)",
                    (event.account_id, event.account_name, event.customer_id),
                )
            case AccountCredited():
                balance = _change_balance(conn, event.account_id, event.amount)
                refund = _has_debit(conn, event.account_id, event.transaction_id)
                _add_row(
                    conn,
                    event.account_id,
                    event.transaction_id,
                    credit_description(event.transaction_type, refund=refund),
                    debit=0,
                    credit=event.amount,
                    balance=balance,
                    at=recorded_at,
                )
            case AccountDebited():
                balance = _change_balance(conn, event.account_id, -event.amount)
                _add_row(
                    conn,
                    event.account_id,
                    event.transaction_id,
                    debit_description(event.transaction_type),
                    debit=event.amount,
                    credit=0,
                    balance=balance,
                    at=recorded_at,
                )
            case _:
                raise dogma.UnexpectedMessage(event)

    def clear(self, conn: sqlite3.Connection) -> None:
        """Delete every ledger row and account."""
        conn.execute("DELETE FROM ledger")
        conn.execute("DELETE FROM accounts")


def debit_description(kind: TransactionType) -> str:
    """How the ledger describes a debit: "Withdrawal" or "Outgoing transfer"."""
    match kind:
        case TransactionType.WITHDRAWAL:
            return "Withdrawal"
        case TransactionType.TRANSFER:
            return "Outgoing transfer"
        case _:
            raise ValueError(f"a {kind} does not debit an account")


def credit_description(kind: TransactionType, *, refund: bool) -> str:
    """How the ledger describes a credit: "Deposit", "Incoming transfer" or "… refund"."""
    if refund:
        return f"{debit_description(kind)} refund"
    match kind:
        case TransactionType.DEPOSIT:
            return "Deposit"
        case TransactionType.TRANSFER:
            return "Incoming transfer"
        case _:
            raise ValueError(f"a {kind} credits an account only as a refund")


def _change_balance(conn: sqlite3.Connection, account_id: str, delta: int) -> int:
    row = conn.execute(
        "UPDATE accounts SET balance = balance + ? WHERE id = ? RETURNING balance",
        (delta, account_id),
    ).fetchone()
    if row is None:
        # Only possible if a credit reaches an account that was never opened,
        # which nothing in the bank does; failing keeps the ledger consistent.
        raise LookupError(f"ledger has no account {account_id!r}; it was never opened")
    return int(row[0])


def _has_debit(conn: sqlite3.Connection, account_id: str, transaction_id: str) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM ledger "
        "WHERE account_id = ? AND transaction_id = ? AND debit > 0)",
        (account_id, transaction_id),
    ).fetchone()
    return bool(row[0])


def _add_row(
    conn: sqlite3.Connection,
    account_id: str,
    transaction_id: str,
    description: str,
    *,
    debit: int,
    credit: int,
    balance: int,
    at: datetime,
) -> None:
    conn.execute(
        "INSERT INTO ledger (account_id, transaction_id, transaction_order, description, "
        "debit, credit, balance, created_at) "
        "VALUES (?, ?, (SELECT COUNT(*) FROM ledger WHERE transaction_id = ?), ?, ?, ?, ?, ?)",
        (
            account_id,
            transaction_id,
            transaction_id,
            description,
            debit,
            credit,
            balance,
            at.astimezone(UTC).isoformat(timespec="microseconds"),
        ),
    )
