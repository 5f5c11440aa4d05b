"""The four aggregates, called directly through an AggregateScope."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

import dogma
from bank.domain import (
    MAXIMUM_DAILY_DEBIT_LIMIT,
    AccountHandler,
    AccountRoot,
    CustomerHandler,
    CustomerRoot,
    DailyDebitLimitHandler,
    DailyDebitLimitRoot,
    TransactionHandler,
    TransactionRoot,
)
from bank.messages import (
    AccountCredited,
    AccountDebitDeclined,
    AccountDebited,
    AccountOpened,
    ApproveDeposit,
    ApproveTransfer,
    ApproveWithdrawal,
    ConsumeDailyDebitLimit,
    CreditAccount,
    CustomerAcquired,
    DailyDebitLimitConsumed,
    DailyDebitLimitExceeded,
    DebitAccount,
    DebitFailureReason,
    DeclineTransfer,
    DeclineWithdrawal,
    Deposit,
    DepositApproved,
    DepositStarted,
    MarkTransferAsFailed,
    OpenAccount,
    OpenAccountForNewCustomer,
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
from bank.testing import AggregateScope

NOW = datetime(2001, 2, 3, tzinfo=UTC)
WD = TransactionType.WITHDRAWAL
TR = TransactionType.TRANSFER
DEP = TransactionType.DEPOSIT


def handle(handler: Any, root: Any, command: dogma.Command) -> AggregateScope[Any]:
    """Route and handle ``command`` on ``root``, returning the scope to inspect."""
    routes: dict[type, set[type]] = {
        AccountHandler: {AccountOpened, AccountCredited, AccountDebited, AccountDebitDeclined},
        CustomerHandler: {CustomerAcquired},
        DailyDebitLimitHandler: {DailyDebitLimitConsumed, DailyDebitLimitExceeded},
        TransactionHandler: {
            DepositStarted,
            DepositApproved,
            WithdrawalStarted,
            WithdrawalApproved,
            WithdrawalDeclined,
            TransferStarted,
            TransferApproved,
            TransferDeclined,
            TransferFailed,
        },
    }
    produces = frozenset(routes[type(handler)])
    scope: AggregateScope[Any] = AggregateScope(
        root, handler.route_command_to_instance(command), NOW, produces
    )
    handler.handle_command(root, scope, command)
    return scope


class Unknown(dogma.Command):
    """A command no bank handler routes."""


@pytest.mark.parametrize(
    "handler", [AccountHandler(), CustomerHandler(), DailyDebitLimitHandler(), TransactionHandler()]
)
def test_unexpected_commands_are_refused(handler: Any) -> None:
    with pytest.raises(
        dogma.UnexpectedMessage, match=r"^unexpected message: .*\.Unknown \(Unknown\)$"
    ):
        handler.route_command_to_instance(Unknown())
    with pytest.raises(dogma.UnexpectedMessage):
        handler.handle_command(handler.new(), AggregateScope(handler.new(), "x", NOW), Unknown())


FOREIGN = TransferFailed(transaction_id="T", from_account_id="A", to_account_id="B", amount=1)


@pytest.mark.parametrize(
    ("root", "event"),
    [
        (AccountRoot(), FOREIGN),
        (CustomerRoot(), FOREIGN),
        (DailyDebitLimitRoot(), FOREIGN),
        (TransactionRoot(), AccountOpened(customer_id="C", account_id="A", account_name="N")),
    ],
)
def test_roots_ignore_unknown_historical_events(root: Any, event: dogma.Event) -> None:
    """apply_event must accept event types the handler no longer records (ADR-14)."""
    before = repr(root)

    root.apply_event(event)

    assert repr(root) == before


@pytest.mark.parametrize(
    "root", [AccountRoot(), CustomerRoot(), DailyDebitLimitRoot(), TransactionRoot()]
)
def test_roots_do_not_support_snapshots(root: Any) -> None:
    with pytest.raises(dogma.NotSupported):
        root.marshal_binary()


class TestAccount:
    def test_opening_records_account_opened(self) -> None:
        root = AccountRoot()

        scope = handle(
            AccountHandler(),
            root,
            OpenAccount(customer_id="C001", account_id="A001", account_name="Anna Smith"),
        )

        assert scope.instance_id == "A001"
        assert scope.recorded == [
            AccountOpened(customer_id="C001", account_id="A001", account_name="Anna Smith")
        ]
        assert root.aggregate_instance_description() == "Anna Smith ($0.00)"

    def test_opening_twice_records_nothing(self) -> None:
        root = AccountRoot(name="Anna Smith")

        scope = handle(
            AccountHandler(),
            root,
            OpenAccount(customer_id="C001", account_id="A001", account_name="Anna Smith"),
        )

        assert scope.recorded == []
        assert scope.logs == ["account has already been opened"]

    def test_credit_is_recorded_and_applied(self) -> None:
        root = AccountRoot(name="Savings", balance=100)

        scope = handle(
            AccountHandler(),
            root,
            CreditAccount(transaction_id="T", account_id="A001", transaction_type=DEP, amount=50),
        )

        assert scope.recorded == [
            AccountCredited(transaction_id="T", account_id="A001", transaction_type=DEP, amount=50)
        ]
        assert root.balance == 150

    def test_credit_does_not_require_an_opened_account(self) -> None:
        """Kept from the original (hazard 2): the aggregate does not check."""
        scope = handle(
            AccountHandler(),
            AccountRoot(),
            CreditAccount(transaction_id="T", account_id="A9", transaction_type=DEP, amount=1),
        )

        assert len(scope.recorded) == 1

    @pytest.mark.parametrize("balance", [500, 501])
    def test_debit_up_to_the_balance_is_allowed(self, balance: int) -> None:
        root = AccountRoot(name="Savings", balance=balance)

        scope = handle(
            AccountHandler(),
            root,
            DebitAccount(
                transaction_id="T",
                account_id="A001",
                transaction_type=WD,
                amount=500,
                scheduled_time=NOW,
            ),
        )

        assert scope.recorded == [
            AccountDebited(
                transaction_id="T",
                account_id="A001",
                transaction_type=WD,
                amount=500,
                scheduled_time=NOW,
            )
        ]
        assert root.balance == balance - 500

    def test_debit_beyond_the_balance_is_declined(self) -> None:
        root = AccountRoot(name="Savings", balance=499)

        scope = handle(
            AccountHandler(),
            root,
            DebitAccount(
                transaction_id="T",
                account_id="A001",
                transaction_type=TR,
                amount=500,
                scheduled_time=NOW,
            ),
        )

        assert scope.recorded == [
            AccountDebitDeclined(
                transaction_id="T",
                account_id="A001",
                transaction_type=TR,
                amount=500,
                reason=DebitFailureReason.INSUFFICIENT_FUNDS,
            )
        ]
        assert root.balance == 499

    def test_description_is_empty_until_opened(self) -> None:
        assert AccountRoot().aggregate_instance_description() == ""


class TestCustomer:
    def test_acquiring_records_customer_acquired(self) -> None:
        root = CustomerRoot()
        command = OpenAccountForNewCustomer(
            customer_id="C001",
            customer_name="Bob Jones",
            account_id="A001",
            account_name="Bob Jones",
        )

        scope = handle(CustomerHandler(), root, command)

        assert scope.instance_id == "C001"
        assert scope.recorded == [
            CustomerAcquired(
                customer_id="C001",
                customer_name="Bob Jones",
                account_id="A001",
                account_name="Bob Jones",
            )
        ]
        assert root.aggregate_instance_description() == "Bob Jones"

    def test_acquiring_twice_records_nothing(self) -> None:
        command = OpenAccountForNewCustomer(
            customer_id="C001",
            customer_name="Bob Jones",
            account_id="A001",
            account_name="Bob Jones",
        )

        scope = handle(CustomerHandler(), CustomerRoot(name="Bob Jones"), command)

        assert scope.recorded == []
        assert scope.logs == ["customer has already been acquired"]


class TestDailyDebitLimit:
    def consume(self, root: DailyDebitLimitRoot, amount: int) -> AggregateScope[Any]:
        return handle(
            DailyDebitLimitHandler(),
            root,
            ConsumeDailyDebitLimit(
                transaction_id="T",
                account_id="A001",
                debit_type=WD,
                amount=amount,
                date="2001-02-03",
            ),
        )

    def test_instances_are_per_day_and_account(self) -> None:
        command = ConsumeDailyDebitLimit(
            transaction_id="T", account_id="A001", debit_type=WD, amount=1, date="2001-02-03"
        )

        assert DailyDebitLimitHandler().route_command_to_instance(command) == "2001-02-03:A001"

    def test_consumed_total_includes_the_debit(self) -> None:
        root = DailyDebitLimitRoot(total_debits_for_day=100)

        scope = self.consume(root, 50)

        assert scope.recorded == [
            DailyDebitLimitConsumed(
                transaction_id="T",
                account_id="A001",
                debit_type=WD,
                amount=50,
                date="2001-02-03",
                total_debits_for_day=150,
                daily_limit=MAXIMUM_DAILY_DEBIT_LIMIT,
            )
        ]
        assert root.total_debits_for_day == 150

    def test_the_limit_is_inclusive(self) -> None:
        root = DailyDebitLimitRoot(total_debits_for_day=MAXIMUM_DAILY_DEBIT_LIMIT - 1)

        scope = self.consume(root, 1)

        assert type(scope.recorded[0]) is DailyDebitLimitConsumed
        assert root.aggregate_instance_description() == "$9000.00/$9000.00"

    def test_exceeded_total_excludes_the_debit_and_changes_nothing(self) -> None:
        root = DailyDebitLimitRoot(total_debits_for_day=MAXIMUM_DAILY_DEBIT_LIMIT)

        scope = self.consume(root, 1)

        assert scope.recorded == [
            DailyDebitLimitExceeded(
                transaction_id="T",
                account_id="A001",
                debit_type=WD,
                amount=1,
                date="2001-02-03",
                total_debits_for_day=MAXIMUM_DAILY_DEBIT_LIMIT,
                daily_limit=MAXIMUM_DAILY_DEBIT_LIMIT,
            )
        ]
        assert root.total_debits_for_day == MAXIMUM_DAILY_DEBIT_LIMIT

    def test_the_limit_is_nine_thousand_dollars(self) -> None:
        assert MAXIMUM_DAILY_DEBIT_LIMIT == 900000


class TestTransaction:
    STARTS: list[tuple[dogma.Command, dogma.Event, str]] = [
        (
            Deposit(transaction_id="T1", account_id="A1", amount=500),
            DepositStarted(transaction_id="T1", account_id="A1", amount=500),
            "deposit of $5.00 (pending)",
        ),
        (
            Withdraw(transaction_id="T1", account_id="A1", amount=500, scheduled_time=NOW),
            WithdrawalStarted(transaction_id="T1", account_id="A1", amount=500, scheduled_time=NOW),
            "withdrawal of $5.00 (pending)",
        ),
        (
            Transfer(
                transaction_id="T1",
                from_account_id="A1",
                to_account_id="A2",
                amount=500,
                scheduled_time=NOW,
                to_third_party_bank=True,
            ),
            TransferStarted(
                transaction_id="T1",
                from_account_id="A1",
                to_account_id="A2",
                amount=500,
                scheduled_time=NOW,
                to_third_party_bank=True,
            ),
            "transfer of $5.00 (pending)",
        ),
    ]

    @pytest.mark.parametrize(("command", "event", "description"), STARTS)
    def test_start_is_recorded_once(
        self, command: dogma.Command, event: dogma.Event, description: str
    ) -> None:
        root = TransactionRoot()

        first = handle(TransactionHandler(), root, command)
        again = handle(TransactionHandler(), root, command)

        assert first.recorded == [event]
        assert root.aggregate_instance_description() == description
        assert again.recorded == []
        assert again.logs == ["transaction already started"]

    def test_transfer_to_the_same_account_records_nothing(self) -> None:
        """Validation normally prevents this; the aggregate still refuses it."""
        command = Transfer(
            transaction_id="T1",
            from_account_id="A1",
            to_account_id="A1",
            amount=5,
            scheduled_time=NOW,
        )
        scope = AggregateScope(TransactionRoot(), "T1", NOW)

        TransactionHandler().handle_command(scope.root, scope, command)

        assert scope.recorded == []
        assert scope.logs == ["cannot transfer to same account"]

    OUTCOMES: list[tuple[dogma.Command, dogma.Event, str]] = [
        (
            ApproveDeposit(transaction_id="T1", account_id="A1", amount=5),
            DepositApproved(transaction_id="T1", account_id="A1", amount=5),
            "approved",
        ),
        (
            ApproveWithdrawal(transaction_id="T1", account_id="A1", amount=5),
            WithdrawalApproved(transaction_id="T1", account_id="A1", amount=5),
            "approved",
        ),
        (
            DeclineWithdrawal(
                transaction_id="T1",
                account_id="A1",
                amount=5,
                reason=DebitFailureReason.INSUFFICIENT_FUNDS,
            ),
            WithdrawalDeclined(
                transaction_id="T1",
                account_id="A1",
                amount=5,
                reason=DebitFailureReason.INSUFFICIENT_FUNDS,
            ),
            "declined: insufficient funds",
        ),
        (
            ApproveTransfer(
                transaction_id="T1", from_account_id="A1", to_account_id="A2", amount=5
            ),
            TransferApproved(
                transaction_id="T1", from_account_id="A1", to_account_id="A2", amount=5
            ),
            "approved",
        ),
        (
            DeclineTransfer(
                transaction_id="T1",
                from_account_id="A1",
                to_account_id="A2",
                amount=5,
                reason=DebitFailureReason.DAILY_DEBIT_LIMIT_EXCEEDED,
            ),
            TransferDeclined(
                transaction_id="T1",
                from_account_id="A1",
                to_account_id="A2",
                amount=5,
                reason=DebitFailureReason.DAILY_DEBIT_LIMIT_EXCEEDED,
            ),
            "declined: daily debit limit exceeded",
        ),
        (
            MarkTransferAsFailed(
                transaction_id="T1", from_account_id="A1", to_account_id="A2", amount=5
            ),
            TransferFailed(transaction_id="T1", from_account_id="A1", to_account_id="A2", amount=5),
            "failed",
        ),
    ]

    @pytest.mark.parametrize(("command", "event", "status"), OUTCOMES)
    def test_outcomes_are_recorded_unconditionally(
        self, command: dogma.Command, event: dogma.Event, status: str
    ) -> None:
        root = TransactionRoot(type=TR, amount=5, status="pending")

        scope = handle(TransactionHandler(), root, command)

        assert scope.recorded == [event]
        assert root.status == status

    def test_description_is_empty_until_started(self) -> None:
        assert TransactionRoot().aggregate_instance_description() == ""


def test_scope_refuses_events_the_handler_does_not_record() -> None:
    scope = AggregateScope(AccountRoot(), "A1", NOW, frozenset({AccountOpened}))

    with pytest.raises(
        TypeError,
        match=r"^the handler produced AccountCredited, which is not produced by this handler",
    ):
        scope.record_event(
            AccountCredited(transaction_id="T", account_id="A1", transaction_type=DEP, amount=1)
        )


def test_scope_refuses_invalid_events() -> None:
    scope = AggregateScope(AccountRoot(), "A1", NOW)

    with pytest.raises(
        dogma.ValidationError, match=r"^AccountCredited must have a positive amount$"
    ):
        scope.record_event(
            AccountCredited(transaction_id="T", account_id="A1", transaction_type=DEP, amount=0)
        )
    assert scope.recorded == []
