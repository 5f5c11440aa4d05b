"""The reference bank application for Dogma, ported from dogmatiq/example.

``bank.App`` is the application class; ``bank.app`` is a ready instance whose
read models live in ``$BANK_READ_DB`` (default ``./bank.sqlite3``), opened on
first use. The domain code depends on ``dogma`` only.
"""

from .app import App
from .projections import ReadDB

__all__ = ["App", "ReadDB", "app"]

app = App()
"""A ready bank, for ``runkit run bank:app``; see :class:`App` for its database."""
