"""Amazon DynamoDB persistence for runkit.

``dynamodb:///<table-prefix>`` and ``dynamodb://host:port/<table-prefix>`` URLs
(through ``runkit.persistence.provider_from_url``), with the parameters
``region``, ``role_arn`` and ``insecure``, or ``DynamoDBProvider(prefix, ...)``
with a boto3 session or client. See docs/drivers/dynamodb.md for the table
layout, IAM permissions and request costs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._provider import DYNAMODB_LIMITS as DYNAMODB_LIMITS
    from ._provider import DynamoDBProvider as DynamoDBProvider
    from ._url import DynamoDBURL as DynamoDBURL
    from ._url import parse_url as parse_url

__all__ = ["DYNAMODB_LIMITS", "DynamoDBProvider", "DynamoDBURL", "parse_url"]

# Imported on first use: loading the plugin (to learn its URL scheme) must not
# import the client library, which costs seconds at start-up.
_LAZY = {
    "DYNAMODB_LIMITS": "._provider",
    "DynamoDBProvider": "._provider",
    "DynamoDBURL": "._url",
    "parse_url": "._url",
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
