"""The bank end to end through ``runkit.Engine``, on every driver (reference §4.8-4.9).

Each test runs the whole bank (aggregates, processes with their deadlines, the
third-party integration and both SQLite projections) on a fresh namespace of
one driver: a memory silo, a PostgreSQL schema, a DynamoDB table prefix or an
S3 bucket. Commands are executed with event observers
(``bank.demo.execute_step``), which see every event of the command's causal
chain; each test asserts that chain (§4.8) and, once the projections have
caught up, the read models. The restart tests stop the engine with accepted
commands still pending and finish on a new ``Engine`` over the same store,
then check the balances and that the store holds no duplicate event.

The drivers share the scenarios through ``BankScenarios``; each subclass
supplies ``store_url``. Tests needing a server are marked by the fixtures they
use (``postgres_dsn``, ``moto_server``) or explicitly (``s3``).
"""

from __future__ import annotations

import io
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from psycopg.conninfo import conninfo_to_dict

import dogma
import runkit
from bank import App
from bank.demo import SCENARIO, Step, execute_step, run_on_engine, run_scenario
from bank.demo import wait_for_projections as wait_for_read_models
from bank.messages import (
    AccountCredited,
    AccountDebitDeclined,
    AccountDebited,
    AccountOpened,
    CustomerAcquired,
    DailyDebitLimitConsumed,
    DailyDebitLimitExceeded,
    DebitFailureReason,
    Deposit,
    DepositApproved,
    DepositStarted,
    OpenAccount,
    OpenAccountForNewCustomer,
    ThirdPartyAccountCredited,
    ThirdPartyAccountCreditFailed,
    TransactionType,
    Transfer,
    TransferApproved,
    TransferDeclined,
    TransferFailed,
    TransferStarted,
    Withdraw,
    WithdrawalApproved,
    WithdrawalDeclined,
    WithdrawalStarted,
)
from bank.projections import queries
from runkit.engine.engine import load_partition_count
from runkit.engine.envelope import to_message
from runkit.engine.streams import decode_stream_record
from runkit.persistence import provider_from_url
from runkit.testing.moto import MotoServer
from runkit_postgres.testing import drop_schema, unique_schema
from runkit_postgres.testing.pytest_plugin import postgres_dsn, postgres_server

__all__ = ["postgres_dsn", "postgres_server"]  # fixtures, used by name

APP_KEY = "22028264-0bca-43e1-8d9d-cd094efb10b7"
PARTITIONS = 4
# Generous: the machine running the tests may be busy. Nothing here measures speed.
TIMEOUT = 60.0
DAY = datetime(2001, 2, 3, tzinfo=UTC)
NEXT_DAY = datetime(2001, 2, 4, tzinfo=UTC)
LIMIT = 900_000
NSF = DebitFailureReason.INSUFFICIENT_FUNDS
OVER_LIMIT = DebitFailureReason.DAILY_DEBIT_LIMIT_EXCEEDED
DEPOSIT = TransactionType.DEPOSIT
WITHDRAWAL = TransactionType.WITHDRAWAL
TRANSFER = TransactionType.TRANSFER


# -- running the bank on an engine --


@attrs.frozen
class Bank:
    """A running bank: execute commands, wait for the read models, read them."""

    engine: runkit.Engine
    app: App
    executor: dogma.CommandExecutor

    async def execute(self, command: dogma.Command, *outcome: dogma.Event) -> list[dogma.Event]:
        """Execute *command*, wait for every *outcome* event; return the observed chain."""
        step = Step(command.message_description(), command, outcome)
        return await execute_step(self.executor, step, timeout=TIMEOUT)

    async def open(self, account: str, customer: str = "C001") -> None:
        await self.execute(
            OpenAccount(customer_id=customer, account_id=account, account_name=f"acct {account}"),
            AccountOpened(customer_id=customer, account_id=account, account_name=f"acct {account}"),
        )

    async def deposit(self, account: str, amount: int, tx: str) -> None:
        await self.execute(
            Deposit(transaction_id=tx, account_id=account, amount=amount),
            DepositApproved(transaction_id=tx, account_id=account, amount=amount),
        )

    async def read_models(self) -> ReadModels:
        """The read models once the projections have applied every event so far."""
        await wait_for_read_models(self.engine, self.app, timeout=TIMEOUT)
        return read_models(self.app)


@asynccontextmanager
async def running(url: str, app: App) -> AsyncIterator[Bank]:
    """Run the bank on an engine over *url* until the block exits (then cancel it)."""
    options = [
        runkit.with_application(app),
        runkit.with_persistence(url),
        runkit.with_partition_count(PARTITIONS),
    ]
    if url.startswith(("s3:", "dynamodb:")):
        # moto serializes every request (a few hundred a second on this machine):
        # under the heavier tests a 1 s heartbeat queues behind the data path and
        # the node keeps stepping back. Real AWS is far faster than the emulator.
        options.append(runkit.with_heartbeat_interval(3.0))
    engine = runkit.Engine(*options)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        yield Bank(engine, app, engine.executor_for(app))
        tg.cancel_scope.cancel()


@attrs.frozen
class ReadModels:
    customers: list[queries.Customer]
    accounts: list[queries.Account]
    ledger: list[queries.LedgerEntry]

    def comparable(self) -> ReadModels:
        """The same, without what depends on timing: comparable across runs.

        A ledger row's time is the event's ``recorded_at``. Its
        ``transaction_order`` counts the rows of its transaction already
        applied, across accounts, so it depends on how far each partition's
        projection has got (e.g. a transfer's credit can be applied before its
        debit). The rows of one account are in order either way: one account's
        events are in one stream.
        """
        rows = [attrs.evolve(e, created_at="", transaction_order=0) for e in self.ledger]
        return attrs.evolve(self, ledger=sorted(rows, key=attrs.astuple))

    def balance(self, account: str) -> int:
        (found,) = [a.balance for a in self.accounts if a.id == account]
        return found

    def entries(self, tx: str) -> list[tuple[str, str, int, int, int]]:
        """(account, description, debit, credit, balance) of each ledger row of *tx*."""
        return [
            (e.account_id, e.description, e.debit, e.credit, e.balance)
            for e in self.ledger
            if e.transaction_id == tx
        ]


def read_models(app: App) -> ReadModels:
    conn = app.read_db.connect()
    try:
        return ReadModels(queries.customers(conn), queries.accounts(conn), queries.ledger(conn))
    finally:
        conn.close()


def chain(events: Sequence[dogma.Event]) -> list[str]:
    """A causal chain in a form to compare: its events' reprs, sorted.

    Order aside (events of different partitions arrive in any order), but not
    multiplicity: an observer must see each event of the chain once, even when a
    process outbox is dispatched twice (see ``test_observers_see_each_event_once``).
    """
    return sorted(map(repr, events))


async def stored_events(url: str) -> list[dogma.Event]:
    """Every event in the store's partition streams, checking offsets are dense from 0."""
    events: list[dogma.Event] = []
    provider = provider_from_url(url)
    try:
        partitions = await load_partition_count(provider, APP_KEY, 0, datetime.now(UTC))
        assert partitions > 0
        for index in range(partitions):
            async with await provider.journals.open(f"{APP_KEY}/stream/{index}") as journal:
                bounds = await journal.bounds()
                offset = 0
                if bounds.begin == bounds.end:
                    continue
                async for _, data in journal.range(bounds.begin):
                    record = decode_stream_record(data)
                    assert record.first_offset == offset, f"gap in stream {index}"
                    offset += len(record.events)
                    events.extend(to_message(e) for e in record.events)  # type: ignore[misc]
    finally:
        await provider.close()
    return events


# -- expected events --


def debited(tx: str, account: str, kind: TransactionType, amount: int, at: datetime = DAY) -> Any:
    return AccountDebited(
        transaction_id=tx,
        account_id=account,
        transaction_type=kind,
        amount=amount,
        scheduled_time=at,
    )


def credited(tx: str, account: str, kind: TransactionType, amount: int) -> Any:
    return AccountCredited(
        transaction_id=tx, account_id=account, transaction_type=kind, amount=amount
    )


def consumed(
    tx: str, account: str, kind: TransactionType, amount: int, total: int, at: datetime = DAY
) -> Any:
    return DailyDebitLimitConsumed(
        transaction_id=tx,
        account_id=account,
        debit_type=kind,
        amount=amount,
        date=at.strftime("%Y-%m-%d"),
        total_debits_for_day=total,
        daily_limit=LIMIT,
    )


def exceeded(tx: str, account: str, kind: TransactionType, amount: int, total: int) -> Any:
    return DailyDebitLimitExceeded(
        transaction_id=tx,
        account_id=account,
        debit_type=kind,
        amount=amount,
        date=DAY.strftime("%Y-%m-%d"),
        total_debits_for_day=total,
        daily_limit=LIMIT,
    )


def withdraw(tx: str, account: str, amount: int, at: datetime = DAY) -> Withdraw:
    return Withdraw(transaction_id=tx, account_id=account, amount=amount, scheduled_time=at)


def transfer(
    tx: str, source: str, target: str, amount: int, *, third_party: bool = False, at: datetime = DAY
) -> Transfer:
    return Transfer(
        transaction_id=tx,
        from_account_id=source,
        to_account_id=target,
        amount=amount,
        scheduled_time=at,
        to_third_party_bank=third_party,
    )


def transfer_started(command: Transfer) -> Any:
    return TransferStarted(
        transaction_id=command.transaction_id,
        from_account_id=command.from_account_id,
        to_account_id=command.to_account_id,
        amount=command.amount,
        scheduled_time=command.scheduled_time,
        to_third_party_bank=command.to_third_party_bank,
    )


def transfer_outcome(
    cls: type[TransferApproved] | type[TransferFailed], command: Transfer
) -> dogma.Event:
    return cls(
        transaction_id=command.transaction_id,
        from_account_id=command.from_account_id,
        to_account_id=command.to_account_id,
        amount=command.amount,
    )


def transfer_declined(command: Transfer, reason: DebitFailureReason) -> TransferDeclined:
    return TransferDeclined(
        transaction_id=command.transaction_id,
        from_account_id=command.from_account_id,
        to_account_id=command.to_account_id,
        amount=command.amount,
        reason=reason,
    )


# -- the scenarios, on every driver --


class BankScenarios:
    """Every scenario; subclasses provide the ``store_url`` fixture (a fresh namespace)."""

    @pytest.fixture
    def app(self, tmp_path: Path) -> App:
        return App(tmp_path / "read-models.sqlite3")

    async def test_a_new_customer_gets_an_account(self, store_url: str, app: App) -> None:
        async with running(store_url, app) as bank:
            acquired = CustomerAcquired(
                customer_id="C001",
                customer_name="Anna Smith",
                account_id="A001",
                account_name="Savings",
            )
            opened = AccountOpened(customer_id="C001", account_id="A001", account_name="Savings")

            observed = await bank.execute(
                OpenAccountForNewCustomer(
                    customer_id="C001",
                    customer_name="Anna Smith",
                    account_id="A001",
                    account_name="Savings",
                ),
                acquired,
                opened,
            )

            assert chain(observed) == chain([acquired, opened])
            models = await bank.read_models()
        assert models.customers == [queries.Customer("C001", "Anna Smith")]
        assert models.accounts == [queries.Account("A001", "Savings", "C001", 0)]
        assert models.ledger == []

    async def test_a_deposit_is_credited_and_approved(self, store_url: str, app: App) -> None:
        async with running(store_url, app) as bank:
            await bank.open("A001")
            approved = DepositApproved(transaction_id="D001", account_id="A001", amount=500)

            observed = await bank.execute(
                Deposit(transaction_id="D001", account_id="A001", amount=500), approved
            )

            assert chain(observed) == chain(
                [
                    DepositStarted(transaction_id="D001", account_id="A001", amount=500),
                    credited("D001", "A001", DEPOSIT, 500),
                    approved,
                ],
            )
            models = await bank.read_models()
        assert models.balance("A001") == 500
        assert models.entries("D001") == [("A001", "Deposit", 0, 500, 500)]

    async def test_withdrawing_the_whole_balance_is_approved(
        self, store_url: str, app: App
    ) -> None:
        async with running(store_url, app) as bank:
            await bank.open("A001")
            await bank.deposit("A001", 500, "D001")
            approved = WithdrawalApproved(transaction_id="W001", account_id="A001", amount=500)

            observed = await bank.execute(withdraw("W001", "A001", 500), approved)

            assert chain(observed) == chain(
                [
                    WithdrawalStarted(
                        transaction_id="W001", account_id="A001", amount=500, scheduled_time=DAY
                    ),
                    debited("W001", "A001", WITHDRAWAL, 500),
                    consumed("W001", "A001", WITHDRAWAL, 500, total=500),
                    approved,
                ],
            )
            models = await bank.read_models()
        assert models.balance("A001") == 0
        assert models.entries("W001") == [("A001", "Withdrawal", 500, 0, 0)]

    async def test_a_withdrawal_without_funds_is_declined(self, store_url: str, app: App) -> None:
        async with running(store_url, app) as bank:
            await bank.open("A001")
            declined = WithdrawalDeclined(
                transaction_id="W001", account_id="A001", amount=500, reason=NSF
            )

            observed = await bank.execute(withdraw("W001", "A001", 500), declined)

            assert chain(observed) == chain(
                [
                    WithdrawalStarted(
                        transaction_id="W001", account_id="A001", amount=500, scheduled_time=DAY
                    ),
                    AccountDebitDeclined(
                        transaction_id="W001",
                        account_id="A001",
                        transaction_type=WITHDRAWAL,
                        amount=500,
                        reason=NSF,
                    ),
                    declined,
                ],
            )
            models = await bank.read_models()
        assert models.balance("A001") == 0
        assert models.entries("W001") == []

    async def test_a_withdrawal_over_the_daily_limit_is_refunded_and_declined(
        self, store_url: str, app: App
    ) -> None:
        async with running(store_url, app) as bank:
            await bank.open("A001")
            await bank.deposit("A001", 910_000, "D001")
            declined = WithdrawalDeclined(
                transaction_id="W001", account_id="A001", amount=900_001, reason=OVER_LIMIT
            )

            observed = await bank.execute(withdraw("W001", "A001", 900_001), declined)

            assert chain(observed) == chain(
                [
                    WithdrawalStarted(
                        transaction_id="W001",
                        account_id="A001",
                        amount=900_001,
                        scheduled_time=DAY,
                    ),
                    debited("W001", "A001", WITHDRAWAL, 900_001),
                    exceeded("W001", "A001", WITHDRAWAL, 900_001, total=0),
                    credited("W001", "A001", WITHDRAWAL, 900_001),
                    declined,
                ],
            )
            models = await bank.read_models()
        assert models.balance("A001") == 910_000
        assert models.entries("W001") == [
            ("A001", "Withdrawal", 900_001, 0, 9_999),
            ("A001", "Withdrawal refund", 0, 900_001, 910_000),
        ]

    async def test_the_daily_limit_is_cumulative_per_account_and_resets_the_next_day(
        self, store_url: str, app: App
    ) -> None:
        async with running(store_url, app) as bank:
            for account in ("A001", "A002"):
                await bank.open(account)
                await bank.deposit(account, 1_800_000, f"D-{account}")

            # 450000 twice reaches the limit exactly, which is allowed.
            for tx in ("W001", "W002"):
                await bank.execute(
                    withdraw(tx, "A001", 450_000),
                    WithdrawalApproved(transaction_id=tx, account_id="A001", amount=450_000),
                )
            # One more cent that day is debited, then refunded and declined.
            observed = await bank.execute(
                withdraw("W003", "A001", 1),
                WithdrawalDeclined(
                    transaction_id="W003", account_id="A001", amount=1, reason=OVER_LIMIT
                ),
            )
            assert exceeded("W003", "A001", WITHDRAWAL, 1, total=900_000) in observed
            # Another account has a limit of its own, and the next day a new one starts.
            await bank.execute(
                withdraw("W004", "A002", 900_000),
                WithdrawalApproved(transaction_id="W004", account_id="A002", amount=900_000),
            )
            observed = await bank.execute(
                withdraw("W005", "A001", 900_000, at=NEXT_DAY),
                WithdrawalApproved(transaction_id="W005", account_id="A001", amount=900_000),
            )
            assert consumed("W005", "A001", WITHDRAWAL, 900_000, 900_000, at=NEXT_DAY) in observed
            models = await bank.read_models()
        assert models.balance("A001") == 0
        assert models.balance("A002") == 900_000
        assert [e[1:] for e in models.entries("W003")] == [
            ("Withdrawal", 1, 0, 899_999),
            ("Withdrawal refund", 0, 1, 900_000),
        ]

    async def test_a_transfer_between_accounts_is_approved(self, store_url: str, app: App) -> None:
        async with running(store_url, app) as bank:
            await bank.open("A001")
            await bank.open("A002")
            await bank.deposit("A001", 500, "D001")
            command = transfer("T001", "A001", "A002", 100)
            approved = transfer_outcome(TransferApproved, command)

            observed = await bank.execute(command, approved)

            assert chain(observed) == chain(
                [
                    transfer_started(command),
                    debited("T001", "A001", TRANSFER, 100),
                    consumed("T001", "A001", TRANSFER, 100, total=100),
                    credited("T001", "A002", TRANSFER, 100),
                    approved,
                ],
            )
            models = await bank.read_models()
        assert (models.balance("A001"), models.balance("A002")) == (400, 100)
        assert models.entries("T001") == [
            ("A001", "Outgoing transfer", 100, 0, 400),
            ("A002", "Incoming transfer", 0, 100, 100),
        ]

    async def test_a_transfer_without_funds_is_declined(self, store_url: str, app: App) -> None:
        async with running(store_url, app) as bank:
            await bank.open("A001")
            await bank.open("A002")
            await bank.deposit("A001", 500, "D001")
            command = transfer("T001", "A001", "A002", 1000)
            declined = transfer_declined(command, NSF)

            observed = await bank.execute(command, declined)

            assert chain(observed) == chain(
                [
                    transfer_started(command),
                    AccountDebitDeclined(
                        transaction_id="T001",
                        account_id="A001",
                        transaction_type=TRANSFER,
                        amount=1000,
                        reason=NSF,
                    ),
                    declined,
                ],
            )
            # Nothing arrived, so the recipient cannot withdraw.
            await bank.execute(
                withdraw("W001", "A002", 100),
                WithdrawalDeclined(
                    transaction_id="W001", account_id="A002", amount=100, reason=NSF
                ),
            )
            models = await bank.read_models()
        assert (models.balance("A001"), models.balance("A002")) == (500, 0)
        assert models.entries("T001") == []

    async def test_a_transfer_over_the_daily_limit_is_refunded_and_declined(
        self, store_url: str, app: App
    ) -> None:
        async with running(store_url, app) as bank:
            await bank.open("A001")
            await bank.open("A002")
            await bank.deposit("A001", 1_000_000, "D001")
            command = transfer("T001", "A001", "A002", 900_001)
            declined = transfer_declined(command, OVER_LIMIT)

            observed = await bank.execute(command, declined)

            assert chain(observed) == chain(
                [
                    transfer_started(command),
                    debited("T001", "A001", TRANSFER, 900_001),
                    exceeded("T001", "A001", TRANSFER, 900_001, total=0),
                    credited("T001", "A001", TRANSFER, 900_001),
                    declined,
                ],
            )
            models = await bank.read_models()
        assert (models.balance("A001"), models.balance("A002")) == (1_000_000, 0)
        assert models.entries("T001") == [
            ("A001", "Outgoing transfer", 900_001, 0, 99_999),
            ("A001", "Outgoing transfer refund", 0, 900_001, 1_000_000),
        ]

    async def test_a_third_party_transfer_is_approved(self, store_url: str, app: App) -> None:
        async with running(store_url, app) as bank:
            await bank.open("A001")
            await bank.deposit("A001", 500, "D001")
            command = transfer("T001", "A001", "100001", 100, third_party=True)
            approved = transfer_outcome(TransferApproved, command)

            observed = await bank.execute(command, approved)

            assert chain(observed) == chain(
                [
                    transfer_started(command),
                    debited("T001", "A001", TRANSFER, 100),
                    consumed("T001", "A001", TRANSFER, 100, total=100),
                    ThirdPartyAccountCredited(
                        transaction_id="T001", account_id="100001", amount=100
                    ),
                    approved,
                ],
            )
            models = await bank.read_models()
        assert models.balance("A001") == 400
        assert models.entries("T001") == [("A001", "Outgoing transfer", 100, 0, 400)]

    async def test_a_failed_third_party_transfer_is_refunded(
        self, store_url: str, app: App
    ) -> None:
        async with running(store_url, app) as bank:
            await bank.open("A001")
            await bank.deposit("A001", 500, "D001")
            command = transfer("T001", "A001", "EXT001", 100, third_party=True)
            failed = transfer_outcome(TransferFailed, command)
            refund = credited("T001", "A001", TRANSFER, 100)

            observed = await bank.execute(command, failed, refund)

            assert chain(observed) == chain(
                [
                    transfer_started(command),
                    debited("T001", "A001", TRANSFER, 100),
                    consumed("T001", "A001", TRANSFER, 100, total=100),
                    ThirdPartyAccountCreditFailed(
                        transaction_id="T001", account_id="EXT001", amount=100
                    ),
                    failed,
                    refund,
                ],
            )
            # The refund is real: the whole original balance can be withdrawn.
            await bank.execute(
                withdraw("W001", "A001", 500),
                WithdrawalApproved(transaction_id="W001", account_id="A001", amount=500),
            )
            models = await bank.read_models()
        assert models.balance("A001") == 0
        assert models.entries("T001") == [
            ("A001", "Outgoing transfer", 100, 0, 400),
            ("A001", "Outgoing transfer refund", 0, 100, 500),
        ]

    async def test_a_future_dated_transfer_waits_for_its_time(
        self, store_url: str, app: App
    ) -> None:
        async with running(store_url, app) as bank:
            await bank.open("A001")
            await bank.open("A002")
            await bank.deposit("A001", 500, "D001")
            # Whole milliseconds: the deadline's time survives encoding exactly.
            at = (datetime.now(UTC) + timedelta(seconds=1)).replace(microsecond=0)
            command = transfer("T001", "A001", "A002", 100, at=at)
            approved_at: list[datetime] = []

            async def approved(event: TransferApproved) -> bool:
                approved_at.append(datetime.now(UTC))
                return True

            with anyio.fail_after(TIMEOUT):
                await bank.executor.execute_command(
                    command, observers=[dogma.observe(TransferApproved, approved)]
                )
            models = await bank.read_models()
        # A deadline is never delivered before its time (invariant 5).
        assert approved_at[0] >= at
        assert models.entries("T001") == [
            ("A001", "Outgoing transfer", 100, 0, 400),
            ("A002", "Incoming transfer", 0, 100, 100),
        ]

    async def test_the_demo_scenario_gives_the_dispatchers_read_models(
        self, store_url: str, tmp_path: Path
    ) -> None:
        reference = App(tmp_path / "reference.sqlite3")
        await run_scenario(reference, out=io.StringIO())
        app = App(tmp_path / "engine.sqlite3")
        out = io.StringIO()

        await run_on_engine(app, persistence=store_url, out=out, timeout=TIMEOUT)

        engine, expected = read_models(app).comparable(), read_models(reference).comparable()
        assert engine == expected
        assert engine.ledger  # not trivially equal
        assert (
            "failed transfer of $75.00 from account 100000001 to account ACME-42" in out.getvalue()
        )
        events = await stored_events(store_url)
        assert len(events) == len(set(map(repr, events)))

    async def test_a_restarted_engine_finishes_accepted_commands_once(
        self, store_url: str, app: App
    ) -> None:
        accounts = [f"A{i:03}" for i in range(8)]
        first, rest = SCENARIO[:6], SCENARIO[6:]
        async with running(store_url, app) as bank:
            for step in first:
                await execute_step(bank.executor, step, timeout=TIMEOUT)
            for account in accounts:
                await bank.open(account)
            # Accepted (durable) but not waited for: the engine stops with them in flight.
            for i in range(40):
                await bank.executor.execute_command(
                    Deposit(transaction_id=f"D{i:03}", account_id=accounts[i % 8], amount=100 + i)
                )

        async with running(store_url, app) as bank:
            for step in rest:
                await execute_step(bank.executor, step, timeout=TIMEOUT)
            with anyio.fail_after(TIMEOUT):
                while True:
                    models = await bank.read_models()
                    if sum(models.balance(a) for a in accounts) == sum(range(100, 140)):
                        break
                    await anyio.sleep(0.05)

        reference = App(app.read_db.path.with_name("reference.sqlite3"))
        await run_scenario(reference, out=io.StringIO())
        expected = read_models(reference)
        assert [a for a in models.accounts if a.id not in accounts] == expected.accounts
        for i, account in enumerate(accounts):
            assert models.balance(account) == sum(100 + j for j in range(i, 40, 8))
        events = await stored_events(store_url)
        duplicates = [e for e, n in Counter(map(repr, events)).items() if n > 1]
        assert duplicates == []
        approved = [e for e in events if isinstance(e, DepositApproved)]
        assert len(approved) == 40 + 2  # and the scenario's two deposits


# -- observers and repeated commands --


async def test_observers_see_each_event_once(tmp_path: Path) -> None:
    """An ``execute_command`` call's observers get each event of its chain once.

    A command accepted again (a retried idempotency key here; in the bank, a
    process outbox dispatched twice) is not handled again; its original events
    are given to the new call's observers, and must not reach the first call's
    again (they once did: the redelivery went to every subscriber of the
    correlation ID).
    """
    app = App(tmp_path / "read-models.sqlite3")
    command = OpenAccount(customer_id="C001", account_id="A001", account_name="Savings")
    seen: list[dogma.Event] = []

    async def once(event: AccountOpened) -> bool:
        return True

    async with running(f"memory:///bank-e2e-{uuid.uuid4()}", app) as bank:

        async def first(event: AccountOpened) -> bool:
            seen.append(event)
            if len(seen) == 1:  # retry the call while this one still waits
                await bank.executor.execute_command(
                    command, idempotency_key="k", observers=[dogma.observe(AccountOpened, once)]
                )
            return False

        # The first call waits for a second AccountOpened, which cannot follow:
        # once the command is done the engine says so.
        with anyio.fail_after(10), pytest.raises(dogma.EventObserverNotSatisfied):
            await bank.executor.execute_command(
                command, idempotency_key="k", observers=[dogma.observe(AccountOpened, first)]
            )
    assert len(seen) == 1


@pytest.mark.parametrize(
    "command",
    [
        Deposit(transaction_id="T", account_id="A", amount="5"),  # type: ignore[arg-type]
        Deposit(transaction_id="T", account_id="A", amount=1.5),  # type: ignore[arg-type]
        Deposit(transaction_id="T", account_id="A", amount=True),
        Deposit(transaction_id=5, account_id="A", amount=5),  # type: ignore[arg-type]
    ],
    ids=["str-amount", "float-amount", "bool-amount", "int-id"],
)
async def test_badly_typed_commands_are_invalid(tmp_path: Path, command: Deposit) -> None:
    """The engine refuses them with ``ValidationError`` (once a TypeError or ValueError)."""
    app = App(tmp_path / "read-models.sqlite3")
    async with running(f"memory:///bank-e2e-{uuid.uuid4()}", app) as bank:
        with anyio.fail_after(TIMEOUT), pytest.raises(dogma.ValidationError):
            await bank.executor.execute_command(command)


# -- the drivers --


class TestMemory(BankScenarios):
    @pytest.fixture
    def store_url(self) -> str:
        return f"memory:///bank-e2e-{uuid.uuid4()}"


@pytest.fixture
def postgres_url(postgres_dsn: str) -> Iterator[str]:
    """A ``postgresql://`` URL on a schema of this test's own, dropped afterwards."""
    params = conninfo_to_dict(postgres_dsn)
    schema = unique_schema("bank")
    yield (
        f"postgresql://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}"
        f":{params.get('port', 5432)}/{params.get('dbname', 'postgres')}?schema={schema}"
    )
    drop_schema(postgres_dsn, schema)


class TestPostgres(BankScenarios):
    @pytest.fixture
    def store_url(self, postgres_url: str) -> str:
        return postgres_url


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    """One serialized moto server for the session (DynamoDB and S3), killed at the end."""
    with MotoServer() as server:
        yield server


@pytest.fixture
def aws(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoServer:
    """The moto server, with fake credentials and no AWS configuration from the machine."""
    for name in list(os.environ):
        if name.startswith(("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL")):
            monkeypatch.delenv(name)
    for name, value in MotoServer.environ().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return moto


@pytest.fixture
def moto_server(aws: MotoServer) -> MotoServer:
    """The moto server for DynamoDB tests (the root conftest marks its users ``dynamodb``)."""
    return aws


class TestDynamoDB(BankScenarios):
    @pytest.fixture
    def store_url(self, moto_server: MotoServer) -> str:
        prefix = f"bank-{uuid.uuid4().hex[:12]}"
        return f"dynamodb://{moto_server.netloc}/{prefix}?insecure=true&region=us-east-1"


@pytest.mark.s3
class TestS3(BankScenarios):
    @pytest.fixture
    def store_url(self, aws: MotoServer) -> str:
        bucket = f"runkit-bank-{uuid.uuid4().hex}"
        return f"s3://{aws.netloc}/{bucket}?insecure=true&region=us-east-1"
