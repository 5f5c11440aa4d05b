"""Amazon DynamoDB persistence for runkit.

``dynamodb:///<table-prefix>`` and ``dynamodb://host:port/<table-prefix>`` URLs
(through ``runkit.persistence.provider_from_url``), with the parameters
``region``, ``role_arn`` and ``insecure``, or ``DynamoDBProvider(prefix, ...)``
with a boto3 session or client. See docs/drivers/dynamodb.md for the table
layout, IAM permissions and request costs.
"""

from ._provider import DYNAMODB_LIMITS as DYNAMODB_LIMITS
from ._provider import DynamoDBProvider as DynamoDBProvider
from ._url import DynamoDBURL as DynamoDBURL
from ._url import parse_url as parse_url

__all__ = ["DYNAMODB_LIMITS", "DynamoDBProvider", "DynamoDBURL", "parse_url"]

DynamoDBProvider.__module__ = __name__
DynamoDBURL.__module__ = __name__
parse_url.__module__ = __name__
