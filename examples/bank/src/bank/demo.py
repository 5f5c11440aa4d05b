"""``bank-demo``: run the bank's scenarios in-process and print the read models.

The scenario (:data:`SCENARIO`) and the table printing
(:func:`print_read_models`) are independent of how the commands are run, so
the same steps can be replayed through the runkit engine. Until then they run
through :class:`bank.testing.Dispatcher`, a breadth-first in-process
dispatcher, with every handler enabled.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import anyio
import attrs

import dogma

from .app import App
from .messages import (
    Deposit,
    OpenAccount,
    OpenAccountForNewCustomer,
    Transfer,
    Withdraw,
    format_amount,
)
from .projections import ReadDB, queries
from .testing import Dispatcher

__all__ = ["DEMO_TIME", "SCENARIO", "Step", "main", "print_read_models", "run_scenario"]

DEMO_TIME = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)
"""When the scenario happens: every transaction is scheduled for this time."""

ANNA = "7c5f2f4e-3d0a-4c36-9d1e-0f6a2b8e4a11"
BOB = "a3b9d0c2-58e1-4f7b-8a64-2c1d9e7f5b22"
ANNA_EVERYDAY = "100000001"
ANNA_SAVINGS = "100000002"
BOB_EVERYDAY = "100000003"


@attrs.frozen
class Step:
    """One step of the scenario: a command and what it shows."""

    title: str
    command: dogma.Command


SCENARIO: tuple[Step, ...] = (
    Step(
        "Anna Smith joins the bank",
        OpenAccountForNewCustomer(
            customer_id=ANNA,
            customer_name="Anna Smith",
            account_id=ANNA_EVERYDAY,
            account_name="Everyday",
        ),
    ),
    Step(
        "Anna opens a savings account",
        OpenAccount(customer_id=ANNA, account_id=ANNA_SAVINGS, account_name="Savings"),
    ),
    Step(
        "Bob Jones joins the bank",
        OpenAccountForNewCustomer(
            customer_id=BOB,
            customer_name="Bob Jones",
            account_id=BOB_EVERYDAY,
            account_name="Everyday",
        ),
    ),
    Step(
        "Anna deposits $10000.00",
        Deposit(transaction_id="D-0001", account_id=ANNA_EVERYDAY, amount=1_000_000),
    ),
    Step(
        "Bob deposits $250.00",
        Deposit(transaction_id="D-0002", account_id=BOB_EVERYDAY, amount=25_000),
    ),
    Step(
        "Anna withdraws $200.00",
        Withdraw(
            transaction_id="W-0001",
            account_id=ANNA_EVERYDAY,
            amount=20_000,
            scheduled_time=DEMO_TIME,
        ),
    ),
    Step(
        "Anna transfers $500.00 to Bob",
        Transfer(
            transaction_id="T-0001",
            from_account_id=ANNA_EVERYDAY,
            to_account_id=BOB_EVERYDAY,
            amount=50_000,
            scheduled_time=DEMO_TIME,
        ),
    ),
    Step(
        "Anna tries to move $8500.00 to savings: over her $9000.00 daily limit",
        Transfer(
            transaction_id="T-0002",
            from_account_id=ANNA_EVERYDAY,
            to_account_id=ANNA_SAVINGS,
            amount=850_000,
            scheduled_time=DEMO_TIME,
        ),
    ),
    Step(
        "Bob tries to withdraw $1000.00: more than he has",
        Withdraw(
            transaction_id="W-0002",
            account_id=BOB_EVERYDAY,
            amount=100_000,
            scheduled_time=DEMO_TIME,
        ),
    ),
    Step(
        "Anna sends $50.00 to another bank's account 987654321",
        Transfer(
            transaction_id="T-0003",
            from_account_id=ANNA_EVERYDAY,
            to_account_id="987654321",
            to_third_party_bank=True,
            amount=5_000,
            scheduled_time=DEMO_TIME,
        ),
    ),
    Step(
        "Anna sends $75.00 to ACME-42, which the other bank does not know: refunded",
        Transfer(
            transaction_id="T-0004",
            from_account_id=ANNA_EVERYDAY,
            to_account_id="ACME-42",
            to_third_party_bank=True,
            amount=7_500,
            scheduled_time=DEMO_TIME,
        ),
    ),
)
"""The demo's steps, in order."""

# Events that conclude a step, shown as its outcome.
_OUTCOMES = (
    "CustomerAcquired",
    "AccountOpened",
    "DepositApproved",
    "WithdrawalApproved",
    "WithdrawalDeclined",
    "TransferApproved",
    "TransferDeclined",
    "TransferFailed",
)


async def run_scenario(
    app: App, steps: Sequence[Step] = SCENARIO, *, out: TextIO | None = None, verbose: bool = False
) -> None:
    """Run ``steps`` through an in-process dispatcher, printing each outcome to ``out``."""
    out = sys.stdout if out is None else out
    dispatcher = Dispatcher(app, now=DEMO_TIME, enable_all=True)
    for number, step in enumerate(steps, 1):
        print(f"{number:>2}. {step.title}", file=out)
        for event in await dispatcher.execute_command(step.command):
            if verbose or type(event).__name__ in _OUTCOMES:
                print(f"      {event.message_description()}", file=out)


def print_read_models(db: ReadDB | str | os.PathLike[str], *, out: TextIO | None = None) -> None:
    """Print the customers, accounts and ledger read models as plain-text tables (blocking)."""
    out = sys.stdout if out is None else out
    read_db = db if isinstance(db, ReadDB) else ReadDB(db)
    conn = read_db.connect()
    try:
        _print_tables(conn, out)
    finally:
        conn.close()


def _print_tables(conn: sqlite3.Connection, out: TextIO) -> None:
    customers = queries.customers(conn)
    names = {c.id: c.name for c in customers}
    accounts = queries.accounts(conn)
    account_names = {
        a.id: f"{names.get(a.customer_id, a.customer_id)} / {a.name}" for a in accounts
    }

    _table(out, "Customers", ("ID", "Name"), [(c.id, c.name) for c in customers])
    _table(
        out,
        "Accounts",
        ("Account", "Customer", "Name", "Balance"),
        [
            (a.id, names.get(a.customer_id, a.customer_id), a.name, format_amount(a.balance))
            for a in accounts
        ],
        right=(3,),
    )
    _table(
        out,
        "Ledger",
        ("Account", "Transaction", "Description", "Debit", "Credit", "Balance"),
        [
            (
                account_names.get(e.account_id, e.account_id),
                e.transaction_id,
                e.description,
                format_amount(e.debit) if e.debit else "",
                format_amount(e.credit) if e.credit else "",
                format_amount(e.balance),
            )
            for e in queries.ledger(conn)
        ],
        right=(3, 4, 5),
    )


def _table(
    out: TextIO,
    title: str,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: Sequence[int] = (),
) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    print(f"\n{title}", file=out)
    print(line(header), file=out)
    print(line(["-" * w for w in widths]), file=out)
    for row in rows:
        print(line(row), file=out)
    if not rows:
        print("(none)", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="bank-demo", description="Run the bank's scenarios and print its read models."
    )
    parser.add_argument(
        "--db",
        type=Path,
        help="SQLite file for the read models (default: a new temporary file)",
    )
    parser.add_argument("--verbose", action="store_true", help="print every event recorded")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bank-demo-") as tmp:
        path = args.db if args.db is not None else Path(tmp) / "read-models.sqlite3"
        app = App(path)
        print(f"Running the bank scenario (read models in {path})\n")
        anyio.run(lambda: run_scenario(app, verbose=args.verbose))
        print_read_models(app.read_db)
    return 0


if __name__ == "__main__":
    sys.exit(main())
