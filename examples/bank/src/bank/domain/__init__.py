"""The bank's domain logic: four aggregates and four processes."""

from .account import AccountHandler, AccountRoot
from .customer import CustomerHandler, CustomerRoot
from .dailydebitlimit import MAXIMUM_DAILY_DEBIT_LIMIT, DailyDebitLimitHandler, DailyDebitLimitRoot
from .deposit import DepositProcessHandler
from .openaccount import OpenAccountForNewCustomerProcessHandler
from .transaction import TransactionHandler, TransactionRoot
from .transfer import TransferProcessHandler, TransferReadyToProceed, TransferRoot
from .withdrawal import WithdrawalProcessHandler

__all__ = [
    "MAXIMUM_DAILY_DEBIT_LIMIT",
    "AccountHandler",
    "AccountRoot",
    "CustomerHandler",
    "CustomerRoot",
    "DailyDebitLimitHandler",
    "DailyDebitLimitRoot",
    "DepositProcessHandler",
    "OpenAccountForNewCustomerProcessHandler",
    "TransactionHandler",
    "TransactionRoot",
    "TransferProcessHandler",
    "TransferReadyToProceed",
    "TransferRoot",
    "WithdrawalProcessHandler",
]
