"""Table provisioning: create a missing table and wait until it is active.

Every table has the binary partition key ``n`` and the binary sort key ``k``
and is billed per request; an existing table with another key schema is
refused. Runs in a worker thread (see ``DynamoDBProvider._ensure_table``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import botocore.exceptions

from runkit.persistence import PersistenceError, StoreUnavailable

from ._aws import error_code

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

    from ._provider import DynamoDBProvider

__all__ = ["ensure_table_sync"]


def ensure_table_sync(provider: DynamoDBProvider, kind: str) -> None:
    """Create the table of *kind* if it is missing; return once it is active.

    A missing table raises ``StoreUnavailable`` if the provider is read-only.
    One that exists but is not active (being created or updated) is waited for,
    never created again.
    """
    client = provider._client_sync()
    name = provider._tables[kind]
    try:
        table = client.describe_table(TableName=name)["Table"]
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) != "ResourceNotFoundException":
            raise
        if provider.read_only:
            raise StoreUnavailable(
                f"table {name!r} does not exist (region {client.meta.region_name!r}); "
                "check the table prefix of the persistence URL (read-only commands "
                "never create it)"
            ) from None
        _create_table(client, name)
    else:
        keys = {(k["AttributeName"], k["KeyType"]) for k in table.get("KeySchema", [])}
        types = {
            (a["AttributeName"], a["AttributeType"]) for a in table.get("AttributeDefinitions", [])
        }
        if keys != {("n", "HASH"), ("k", "RANGE")} or not {("n", "B"), ("k", "B")} <= types:
            raise PersistenceError(
                f"table {name!r} exists but is not a runkit {kind} table: expected the "
                "binary partition key 'n' and the binary sort key 'k'"
            )
        if table.get("TableStatus") == "ACTIVE":
            return
    # Just created, or being created or updated by someone else: wait until active.
    client.get_waiter("table_exists").wait(
        TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 300}
    )


def _create_table(client: DynamoDBClient, name: str) -> None:
    try:
        client.create_table(
            TableName=name,
            KeySchema=[
                {"AttributeName": "n", "KeyType": "HASH"},
                {"AttributeName": "k", "KeyType": "RANGE"},
            ],
            AttributeDefinitions=[
                {"AttributeName": "n", "AttributeType": "B"},
                {"AttributeName": "k", "AttributeType": "B"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )
    except botocore.exceptions.ClientError as exc:
        # Another provider created it since we looked: wait for it like our own.
        if error_code(exc) != "ResourceInUseException":
            raise
