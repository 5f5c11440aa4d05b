"""Amazon S3 persistence for runkit: journals, keyspaces and sets on conditional writes.

``s3:///<bucket>`` and ``s3://host:port/<bucket>`` URLs (through
``runkit.persistence.provider_from_url``), with the parameters ``region``,
``role_arn``, ``insecure`` and ``prefix``, or ``S3Provider(bucket, ...)``
directly. See ``docs/drivers/s3.md`` for the object layout, the append and
truncate protocol, request counts and IAM permissions.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._provider import S3Provider as S3Provider
    from ._settings import S3Settings as S3Settings
    from ._settings import parse_url as parse_url

__all__ = ["S3Provider", "S3Settings", "parse_url"]

# Imported on first use: loading the plugin (to learn its URL scheme) must not
# import the client library, which costs seconds at start-up.
_LAZY = {
    "S3Provider": "._provider",
    "S3Settings": "._settings",
    "parse_url": "._settings",
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
