"""The customers and ledger projections: ADR-26 OCC and the read models they build."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

import bank
import dogma
from bank.messages import (
    AccountCredited,
    AccountOpened,
    CustomerAcquired,
    Deposit,
    OpenAccount,
    OpenAccountForNewCustomer,
    TransactionType,
    Transfer,
    TransferApproved,
    TransferDeclined,
    Withdraw,
)
from bank.projections import CustomerProjectionHandler, LedgerProjectionHandler, ReadDB, queries
from bank.projections.ledger import credit_description, debit_description
from bank.testing import Dispatcher, ProjectionEventScope, ProjectionScope

AT = datetime(2001, 2, 3, tzinfo=UTC)
STREAM = "6ba7b810-9dad-41d1-80b4-00c04fd430c8"
OTHER_STREAM = "6ba7b811-9dad-41d1-80b4-00c04fd430c8"


def acquired(n: int) -> CustomerAcquired:
    return CustomerAcquired(
        customer_id=f"C{n}", customer_name=f"Customer {n}", account_id=f"A{n}", account_name="S"
    )


def scope(offset: int, checkpoint: int, stream: str = STREAM) -> ProjectionEventScope:
    return ProjectionEventScope(
        stream_id=stream, offset=offset, checkpoint_offset=checkpoint, recorded_at=AT
    )


@pytest.fixture
def db(tmp_path: Path) -> ReadDB:
    return ReadDB(tmp_path / "read.sqlite3")


@pytest.fixture
def customers(db: ReadDB) -> CustomerProjectionHandler:
    return CustomerProjectionHandler(db)


async def names(db: ReadDB) -> list[str]:
    return [c.name for c in await db.run(queries.customers)]


class TestOptimisticConcurrency:
    async def test_a_new_stream_starts_at_zero(self, customers: CustomerProjectionHandler) -> None:
        assert await customers.checkpoint_offset(STREAM) == 0

    async def test_agreeing_checkpoints_apply_the_event(
        self, db: ReadDB, customers: CustomerProjectionHandler
    ) -> None:
        """When the engine's checkpoint matches, the event is applied and offset+1 returned."""
        assert await customers.handle_event(scope(0, 0), acquired(1)) == 1
        assert await customers.handle_event(scope(1, 1), acquired(2)) == 2

        assert await names(db) == ["Customer 1", "Customer 2"]
        assert await customers.checkpoint_offset(STREAM) == 2

    async def test_skipped_offsets_are_allowed(
        self, db: ReadDB, customers: CustomerProjectionHandler
    ) -> None:
        """The engine's checkpoint may trail the offset when the stream has unrouted events."""
        assert await customers.handle_event(scope(5, 0), acquired(1)) == 6
        assert await customers.handle_event(scope(9, 6), acquired(2)) == 10

        assert await names(db) == ["Customer 1", "Customer 2"]

    async def test_disagreeing_checkpoints_change_nothing_and_return_the_stored_one(
        self, db: ReadDB, customers: CustomerProjectionHandler
    ) -> None:
        await customers.handle_event(scope(0, 0), acquired(1))

        assert await customers.handle_event(scope(3, 2), acquired(2)) == 1
        assert await customers.handle_event(scope(1, 0), acquired(2)) == 1
        assert await names(db) == ["Customer 1"]

    async def test_an_engine_ahead_of_an_empty_projection_gets_zero(
        self, db: ReadDB, customers: CustomerProjectionHandler
    ) -> None:
        assert await customers.handle_event(scope(4, 4), acquired(1)) == 0
        assert await names(db) == []

    async def test_redelivery_is_idempotent(
        self, db: ReadDB, customers: CustomerProjectionHandler
    ) -> None:
        """A redelivered, already-applied event returns offset+1 (success) without reapplying."""
        await customers.handle_event(scope(0, 0), acquired(1))

        assert await customers.handle_event(scope(0, 0), acquired(1)) == 1
        assert await names(db) == ["Customer 1"]

    async def test_streams_are_independent(
        self, db: ReadDB, customers: CustomerProjectionHandler
    ) -> None:
        await customers.handle_event(scope(0, 0), acquired(1))

        assert await customers.handle_event(scope(0, 0, OTHER_STREAM), acquired(2)) == 1
        assert await customers.checkpoint_offset(OTHER_STREAM) == 1

    async def test_projections_sharing_a_database_keep_their_own_checkpoints(
        self, db: ReadDB, customers: CustomerProjectionHandler
    ) -> None:
        ledger = LedgerProjectionHandler(db)
        await customers.handle_event(scope(0, 0), acquired(1))

        assert await ledger.checkpoint_offset(STREAM) == 0

    async def test_a_failure_rolls_back_the_checkpoint_too(self, db: ReadDB) -> None:
        """The checkpoint and the read model change in one transaction, or not at all."""
        ledger = LedgerProjectionHandler(db)
        credit = AccountCredited(
            transaction_id="T",
            account_id="nowhere",
            transaction_type=TransactionType.DEPOSIT,
            amount=1,
        )

        with pytest.raises(
            LookupError, match=r"^ledger has no account 'nowhere'; it was never opened$"
        ):
            await ledger.handle_event(scope(0, 0), credit)
        assert await ledger.checkpoint_offset(STREAM) == 0

    async def test_reset_clears_data_and_checkpoints(
        self, db: ReadDB, customers: CustomerProjectionHandler
    ) -> None:
        await customers.handle_event(scope(0, 0), acquired(1))

        await customers.reset(ProjectionScope(AT))

        assert await names(db) == []
        assert await customers.checkpoint_offset(STREAM) == 0
        assert await customers.handle_event(scope(0, 0), acquired(1)) == 1

    async def test_compact_does_nothing(
        self, db: ReadDB, customers: CustomerProjectionHandler
    ) -> None:
        await customers.handle_event(scope(0, 0), acquired(1))

        await customers.compact(ProjectionScope(AT))

        assert await names(db) == ["Customer 1"]

    async def test_stream_ids_must_be_uuids(self, customers: CustomerProjectionHandler) -> None:
        with pytest.raises(ValueError, match=r"^stream ID 'stream-1' is not a UUID$"):
            await customers.checkpoint_offset("stream-1")

    async def test_unexpected_events_are_refused(
        self, customers: CustomerProjectionHandler
    ) -> None:
        with pytest.raises(dogma.UnexpectedMessage):
            await customers.handle_event(
                scope(0, 0), AccountOpened(customer_id="C", account_id="A", account_name="S")
            )
        assert await customers.checkpoint_offset(STREAM) == 0


class TestReadDB:
    def test_nothing_is_opened_until_first_use(self, tmp_path: Path) -> None:
        bank.App(tmp_path / "lazy.sqlite3")

        assert not (tmp_path / "lazy.sqlite3").exists()

    def test_default_path_comes_from_the_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("BANK_READ_DB", str(tmp_path / "env.sqlite3"))

        assert ReadDB().path == tmp_path / "env.sqlite3"

    def test_default_path_is_in_the_working_directory(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("BANK_READ_DB", raising=False)

        assert ReadDB().path == Path("bank.sqlite3")

    def test_max_threads_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match=r"^max_threads must be at least 1, got 0$"):
            ReadDB("x", max_threads=0)


@pytest.mark.parametrize(
    ("kind", "refund", "text"),
    [
        (TransactionType.DEPOSIT, False, "Deposit"),
        (TransactionType.TRANSFER, False, "Incoming transfer"),
        (TransactionType.WITHDRAWAL, True, "Withdrawal refund"),
        (TransactionType.TRANSFER, True, "Outgoing transfer refund"),
    ],
)
def test_credit_descriptions(kind: TransactionType, refund: bool, text: str) -> None:
    assert credit_description(kind, refund=refund) == text


def test_descriptions_of_impossible_ledger_rows_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^a withdrawal credits an account only as a refund$"):
        credit_description(TransactionType.WITHDRAWAL, refund=False)
    with pytest.raises(ValueError, match=r"^a deposit does not debit an account$"):
        debit_description(TransactionType.DEPOSIT)


# The Go example's projection tests: one projection enabled, SQL queried directly.


async def rows(app: bank.App, sql: str, *params: str) -> list[tuple[object, ...]]:
    """Query the read models in a worker thread (sqlite3 blocks)."""
    result: list[tuple[object, ...]] = await app.read_db.run(
        lambda conn: conn.execute(sql, params).fetchall()
    )
    return result


async def open_accounts(d: Dispatcher) -> None:
    await d.execute_command(
        OpenAccount(customer_id="C001", account_id="A001", account_name="Savings")
    )
    await d.execute_command(
        OpenAccount(customer_id="C001", account_id="A002", account_name="Cheque")
    )


async def test_customers_projection(app: bank.App, begin: Callable[..., Dispatcher]) -> None:
    d = begin("customers")

    await d.execute_command(
        OpenAccountForNewCustomer(
            customer_id="C001",
            customer_name="Anna Smith",
            account_id="A001",
            account_name="Savings",
        )
    )

    assert await rows(app, "SELECT id, name FROM customers") == [("C001", "Anna Smith")]


async def test_ledger_opened_account(app: bank.App, begin: Callable[..., Dispatcher]) -> None:
    d = begin("ledger")

    await open_accounts(d)

    assert await rows(
        app, "SELECT id, name, customer_id, balance FROM accounts WHERE id = 'A001'"
    ) == [("A001", "Savings", "C001", 0)]


LEDGER = (
    "SELECT description, debit, credit, balance FROM ledger "
    "WHERE account_id = ? AND transaction_id = ? ORDER BY transaction_order"
)


async def ledger_row(app: bank.App, account: str, tx: str) -> list[tuple[object, ...]]:
    return await rows(app, LEDGER, account, tx)


async def balance(app: bank.App, account: str) -> object:
    return (await rows(app, "SELECT balance FROM accounts WHERE id = ?", account))[0][0]


async def test_ledger_credit(app: bank.App, begin: Callable[..., Dispatcher]) -> None:
    d = begin("ledger")
    await open_accounts(d)

    await d.execute_command(Deposit(transaction_id="T001", account_id="A001", amount=150))

    assert await balance(app, "A001") == 150
    assert await ledger_row(app, "A001", "T001") == [("Deposit", 0, 150, 150)]


async def test_ledger_debit(app: bank.App, begin: Callable[..., Dispatcher]) -> None:
    d = begin("ledger")
    await open_accounts(d)
    await d.execute_command(Deposit(transaction_id="T001", account_id="A001", amount=500))

    await d.execute_command(
        Withdraw(transaction_id="T002", account_id="A001", amount=150, scheduled_time=AT)
    )

    assert await balance(app, "A001") == 350
    assert await ledger_row(app, "A001", "T002") == [("Withdrawal", 150, 0, 350)]


async def test_ledger_approved_transfer(app: bank.App, begin: Callable[..., Dispatcher]) -> None:
    d = begin("ledger")
    await open_accounts(d)
    await d.execute_command(Deposit(transaction_id="T001", account_id="A001", amount=500))

    events = await d.execute_command(
        Transfer(
            transaction_id="T002",
            from_account_id="A001",
            to_account_id="A002",
            amount=200,
            scheduled_time=AT,
        )
    )

    assert any(isinstance(e, TransferApproved) for e in events)
    assert await ledger_row(app, "A001", "T002") == [("Outgoing transfer", 200, 0, 300)]
    assert await ledger_row(app, "A002", "T002") == [("Incoming transfer", 0, 200, 200)]


async def test_ledger_transfer_declined_after_debit(
    app: bank.App, begin: Callable[..., Dispatcher]
) -> None:
    d = begin("ledger")
    await open_accounts(d)
    await d.execute_command(Deposit(transaction_id="T001", account_id="A001", amount=1000000))

    events = await d.execute_command(
        Transfer(
            transaction_id="T002",
            from_account_id="A001",
            to_account_id="A002",
            amount=900001,
            scheduled_time=AT,
        )
    )

    assert any(isinstance(e, TransferDeclined) for e in events)
    assert await ledger_row(app, "A001", "T002") == [
        ("Outgoing transfer", 900001, 0, 99999),
        ("Outgoing transfer refund", 0, 900001, 1000000),
    ]
    assert await rows(
        app, "SELECT transaction_order FROM ledger WHERE transaction_id = 'T002'"
    ) == [
        (0,),
        (1,),
    ]


async def test_queries_read_the_ledger_in_order(
    app: bank.App, begin: Callable[..., Dispatcher]
) -> None:
    d = begin("ledger")
    await open_accounts(d)
    await d.execute_command(Deposit(transaction_id="T001", account_id="A001", amount=500))
    await d.execute_command(
        Withdraw(transaction_id="T002", account_id="A001", amount=150, scheduled_time=AT)
    )

    entries = await app.read_db.run(lambda conn: queries.ledger(conn, "A001"))

    assert [(e.transaction_id, e.description, e.balance) for e in entries] == [
        ("T001", "Deposit", 500),
        ("T002", "Withdrawal", 350),
    ]
    assert [a.id for a in await app.read_db.run(queries.accounts)] == ["A002", "A001"]


async def test_dispatcher_streams_are_uuid5_of_handler_key_and_instance(
    begin: Callable[..., Dispatcher],
) -> None:
    """Like testkit: one stream per aggregate instance, UUIDv5(handler key, instance ID)."""
    d = begin()

    await d.execute_command(OpenAccount(customer_id="C001", account_id="A001", account_name="S"))

    assert d.envelopes[0].stream_id == str(
        uuid.uuid5(uuid.UUID("fcce9a78-23a3-4211-b608-ecbe21ea446f"), "A001")
    )
    assert d.envelopes[0].offset == 0
