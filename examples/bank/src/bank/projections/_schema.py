"""The SQL schema of the bank's read models (idempotent DDL)."""

CHECKPOINTS = """
CREATE TABLE IF NOT EXISTS projection_checkpoint (
    handler BLOB NOT NULL,
    stream BLOB NOT NULL,
    checkpoint_offset INTEGER NOT NULL,
    PRIMARY KEY (handler, stream)
);
"""

CUSTOMERS = """
CREATE TABLE IF NOT EXISTS customers (
    id TEXT NOT NULL PRIMARY KEY,
    name TEXT NOT NULL
);
"""

LEDGER = """
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT NOT NULL PRIMARY KEY,
    name TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    balance INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS accounts_customer_id ON accounts (customer_id);
CREATE TABLE IF NOT EXISTS ledger (
    account_id TEXT NOT NULL,
    transaction_id TEXT NOT NULL DEFAULT '',
    transaction_order INTEGER NOT NULL DEFAULT 0,
    description TEXT NOT NULL,
    debit INTEGER NOT NULL DEFAULT 0,
    credit INTEGER NOT NULL DEFAULT 0,
    balance INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (account_id, transaction_id, transaction_order)
);
"""

ALL = (CHECKPOINTS, CUSTOMERS, LEDGER)
