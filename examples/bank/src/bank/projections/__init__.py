"""The bank's projections (customers, ledger) on SQLite, and read-model queries."""

from ._db import DEFAULT_PATH_VARIABLE, ReadDB, SQLiteProjection
from .customers import CustomerProjectionHandler
from .ledger import LedgerProjectionHandler

__all__ = [
    "DEFAULT_PATH_VARIABLE",
    "CustomerProjectionHandler",
    "LedgerProjectionHandler",
    "ReadDB",
    "SQLiteProjection",
]
