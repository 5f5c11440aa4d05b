"""PostgreSQL persistence driver for runkit (psycopg 3).

``postgres://`` and ``postgresql://`` URLs resolve to a ``PostgresProvider``
through the ``runkit`` plugin entry point; the provider can also be built
directly::

    provider = PostgresProvider("host=db dbname=app", schema="bank")
    provider = PostgresProvider.from_url("postgresql://app@db/app?schema=bank")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._config import DEFAULT_SCHEMA as DEFAULT_SCHEMA
    from ._config import Settings as Settings
    from ._provider import PostgresProvider as PostgresProvider

__all__ = ["DEFAULT_SCHEMA", "PostgresProvider", "Settings"]

# Imported on first use: loading the plugin (to learn its URL scheme) must not
# import the client library, which costs seconds at start-up.
_LAZY = {
    "DEFAULT_SCHEMA": "._config",
    "Settings": "._config",
    "PostgresProvider": "._provider",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    if isinstance(value, type):
        value.__module__ = __name__  # tracebacks and reprs show the public path
    globals()[name] = value
    return value
