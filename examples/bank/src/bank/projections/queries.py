"""Read the bank's read models: plain functions over a ``sqlite3`` connection.

They block; from async code run them with ``await read_db.run(customers)``.
"""

from __future__ import annotations

import sqlite3

import attrs

__all__ = ["Account", "Customer", "LedgerEntry", "accounts", "customers", "ledger"]


@attrs.frozen
class Customer:
    """A row of the customers read model."""

    id: str
    name: str


@attrs.frozen
class Account:
    """A row of the ledger's accounts table; ``balance`` in cents."""

    id: str
    name: str
    customer_id: str
    balance: int


@attrs.frozen
class LedgerEntry:
    """A credit or debit of an account; amounts in cents."""

    account_id: str
    transaction_id: str
    transaction_order: int
    description: str
    debit: int
    credit: int
    balance: int
    created_at: str


def customers(conn: sqlite3.Connection) -> list[Customer]:
    """Every customer, by name then ID."""
    rows = conn.execute("SELECT id, name FROM customers ORDER BY name, id").fetchall()
    return [Customer(*row) for row in rows]


def accounts(conn: sqlite3.Connection) -> list[Account]:
    """Every account, by customer then name."""
    rows = conn.execute(
        "SELECT id, name, customer_id, balance FROM accounts ORDER BY customer_id, name, id"
    ).fetchall()
    return [Account(*row) for row in rows]


def ledger(conn: sqlite3.Connection, account_id: str | None = None) -> list[LedgerEntry]:
    """The ledger, oldest first, for one account or all of them."""
    sql = (
        "SELECT account_id, transaction_id, transaction_order, description, debit, credit, "
        "balance, created_at FROM ledger"
    )
    params: tuple[str, ...] = ()
    if account_id is not None:
        sql += " WHERE account_id = ?"
        params = (account_id,)
    # rowid breaks ties in insertion order: the order the ledger saw the events.
    sql += " ORDER BY created_at, rowid"
    return [LedgerEntry(*row) for row in conn.execute(sql, params).fetchall()]
