"""The customers projection: every customer's ID and name."""

from __future__ import annotations

import sqlite3
from datetime import datetime

import dogma

from ..messages import CustomerAcquired
from . import _schema
from ._db import SQLiteProjection

__all__ = ["CustomerProjectionHandler"]


class CustomerProjectionHandler(SQLiteProjection):
    """Keeps the ``customers`` table: one row per acquired customer."""

    KEY = "70b58269-931a-46d6-b745-286a670fb6f7"
    SCHEMA = _schema.CUSTOMERS

    def configure(self, c: dogma.ProjectionConfigurer) -> None:
        """Declare the projection's identity and routes."""
        c.identity("customers", self.KEY)
        c.routes(dogma.handles_event(CustomerAcquired))

    def apply(self, conn: sqlite3.Connection, event: dogma.Event, recorded_at: datetime) -> None:
        """Insert the acquired customer."""
        match event:
            case CustomerAcquired():
                conn.execute(
                    "INSERT INTO customers (id, name) VALUES (?, ?)",
                    (event.customer_id, event.customer_name),
                )
            case _:
                raise dogma.UnexpectedMessage(event)

    def clear(self, conn: sqlite3.Connection) -> None:
        """Delete every customer."""
        conn.execute("DELETE FROM customers")
