"""The bank application: its identity and handlers."""

from __future__ import annotations

import os

import dogma

from .domain import (
    AccountHandler,
    CustomerHandler,
    DailyDebitLimitHandler,
    DepositProcessHandler,
    OpenAccountForNewCustomerProcessHandler,
    TransactionHandler,
    TransferProcessHandler,
    WithdrawalProcessHandler,
)
from .projections import CustomerProjectionHandler, LedgerProjectionHandler, ReadDB
from .thirdparty import ThirdPartyBankHandler

__all__ = ["App"]


class App:
    """The bank: customers, accounts, deposits, withdrawals and transfers.

    The two projections keep their read models in a SQLite file, ``read_db``:
    a :class:`bank.projections.ReadDB`, or a path to one. Without it the path
    comes from the ``BANK_READ_DB`` environment variable, or is
    ``bank.sqlite3`` in the working directory; nothing is opened until a
    projection first needs it, so making an ``App`` has no side effects.

    Example::

        app = bank.App("/var/lib/bank/read-models.sqlite3")
    """

    def __init__(self, read_db: ReadDB | str | os.PathLike[str] | None = None) -> None:
        self.read_db = read_db if isinstance(read_db, ReadDB) else ReadDB(read_db)
        self.account = AccountHandler()
        self.customer = CustomerHandler()
        self.daily_debit_limit = DailyDebitLimitHandler()
        self.transaction = TransactionHandler()
        self.deposit = DepositProcessHandler()
        self.open_account_for_new_customer = OpenAccountForNewCustomerProcessHandler()
        self.transfer = TransferProcessHandler()
        self.withdrawal = WithdrawalProcessHandler()
        self.third_party_bank = ThirdPartyBankHandler()
        self.customers = CustomerProjectionHandler(self.read_db)
        self.ledger = LedgerProjectionHandler(self.read_db)

    def configure(self, c: dogma.ApplicationConfigurer) -> None:
        """Declare the bank's identity and handlers."""
        c.identity("bank", "22028264-0bca-43e1-8d9d-cd094efb10b7")
        c.routes(
            dogma.via_aggregate(self.account),
            dogma.via_aggregate(self.customer),
            dogma.via_aggregate(self.daily_debit_limit),
            dogma.via_aggregate(self.transaction),
            dogma.via_process(self.deposit),
            dogma.via_process(self.open_account_for_new_customer),
            dogma.via_process(self.transfer),
            dogma.via_process(self.withdrawal),
            dogma.via_integration(self.third_party_bank),
            dogma.via_projection(self.customers),
            dogma.via_projection(self.ledger),
        )
