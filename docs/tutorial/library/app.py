"""The library application, and the object ``runkit run library.app:app`` runs."""

from __future__ import annotations

# --8<-- [start:app]
import os
from datetime import timedelta

import dogma

from .book import BookHandler
from .catalogue import Database, LoansProjection
from .loan import LoanProcess


class Library:
    """The application: its identity, and its handlers."""

    def __init__(self, *, database: str, loan_period: timedelta) -> None:
        self.db = Database(database)
        self.loan_period = loan_period

    def configure(self, c: dogma.ApplicationConfigurer) -> None:
        c.identity("library", "2385fbd3-71ee-4bd6-9d42-a2931ff76d0d")
        c.routes(
            dogma.via_aggregate(BookHandler(self.loan_period)),
            dogma.via_process(LoanProcess()),
            dogma.via_projection(LoansProjection(self.db)),
        )


def from_environment() -> Library:
    """The library configured by ``LIBRARY_DB`` (the read model's ``postgresql://`` URL)
    and ``LIBRARY_LOAN_SECONDS`` (default two weeks)."""
    return Library(
        database=os.environ.get("LIBRARY_DB", "postgresql://localhost/library"),
        loan_period=timedelta(seconds=float(os.environ.get("LIBRARY_LOAN_SECONDS", "1209600"))),
    )


app = from_environment()
# --8<-- [end:app]
