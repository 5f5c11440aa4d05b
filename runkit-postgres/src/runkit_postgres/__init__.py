"""PostgreSQL persistence driver for runkit (psycopg 3).

``postgres://`` and ``postgresql://`` URLs resolve to a ``PostgresProvider``
through the ``runkit`` plugin entry point; the provider can also be built
directly::

    provider = PostgresProvider("host=db dbname=app", schema="bank")
    provider = PostgresProvider.from_url("postgresql://app@db/app?schema=bank")
"""

from ._config import DEFAULT_SCHEMA as DEFAULT_SCHEMA
from ._config import Settings as Settings
from ._provider import PostgresProvider as PostgresProvider

__all__ = ["DEFAULT_SCHEMA", "PostgresProvider", "Settings"]

# Tracebacks, reprs and docs show the public path.
PostgresProvider.__module__ = __name__
Settings.__module__ = __name__
