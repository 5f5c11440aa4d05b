"""The four processes, called directly through process scopes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import dogma
from bank.domain import (
    DepositProcessHandler,
    OpenAccountForNewCustomerProcessHandler,
    TransferProcessHandler,
    TransferReadyToProceed,
    TransferRoot,
    WithdrawalProcessHandler,
)
from bank.messages import (
    AccountCredited,
    AccountDebitDeclined,
    AccountDebited,
    ApproveDeposit,
    ApproveTransfer,
    ApproveWithdrawal,
    ConsumeDailyDebitLimit,
    CreditAccount,
    CreditThirdPartyAccount,
    CustomerAcquired,
    DailyDebitLimitConsumed,
    DailyDebitLimitExceeded,
    DebitAccount,
    DebitFailureReason,
    DeclineTransfer,
    DeclineWithdrawal,
    DepositApproved,
    DepositStarted,
    MarkTransferAsFailed,
    OpenAccount,
    ThirdPartyAccountCredited,
    ThirdPartyAccountCreditFailed,
    TransactionType,
    TransferApproved,
    TransferDeclined,
    TransferFailed,
    TransferStarted,
    WithdrawalApproved,
    WithdrawalDeclined,
    WithdrawalStarted,
)
from bank.testing import ProcessDeadlineScope, ProcessEventScope

NOW = datetime(2001, 2, 3, 10, tzinfo=UTC)
LATER = datetime(2001, 2, 4, tzinfo=UTC)
DEP = TransactionType.DEPOSIT
WD = TransactionType.WITHDRAWAL
TR = TransactionType.TRANSFER
NSF = DebitFailureReason.INSUFFICIENT_FUNDS
LIMIT = DebitFailureReason.DAILY_DEBIT_LIMIT_EXCEEDED


async def handle(handler: Any, event: dogma.Event, root: Any = None) -> ProcessEventScope[Any]:
    """Route ``event`` and handle it on ``root`` (a new root by default)."""
    instance_id = await handler.route_event_to_instance(event)
    assert instance_id is not None, "the event was ignored"
    root = handler.new() if root is None else root
    scope: ProcessEventScope[Any] = ProcessEventScope(root, instance_id, NOW)
    await handler.handle_event(root, scope, event)
    return scope


def credited(tx_type: TransactionType, account: str = "A1", amount: int = 500) -> AccountCredited:
    return AccountCredited(
        transaction_id="T1", account_id=account, transaction_type=tx_type, amount=amount
    )


def debited(tx_type: TransactionType, at: datetime = NOW) -> AccountDebited:
    return AccountDebited(
        transaction_id="T1",
        account_id="A1",
        transaction_type=tx_type,
        amount=500,
        scheduled_time=at,
    )


def declined(tx_type: TransactionType) -> AccountDebitDeclined:
    return AccountDebitDeclined(
        transaction_id="T1", account_id="A1", transaction_type=tx_type, amount=500, reason=NSF
    )


def consumed(tx_type: TransactionType) -> DailyDebitLimitConsumed:
    return DailyDebitLimitConsumed(
        transaction_id="T1",
        account_id="A1",
        debit_type=tx_type,
        amount=500,
        date="2001-02-03",
        total_debits_for_day=500,
        daily_limit=900000,
    )


def exceeded(tx_type: TransactionType) -> DailyDebitLimitExceeded:
    return DailyDebitLimitExceeded(
        transaction_id="T1",
        account_id="A1",
        debit_type=tx_type,
        amount=500,
        date="2001-02-03",
        total_debits_for_day=900000,
        daily_limit=900000,
    )


class Unknown(dogma.Event):
    """An event no bank process routes."""


HANDLERS = [
    DepositProcessHandler(),
    OpenAccountForNewCustomerProcessHandler(),
    TransferProcessHandler(),
    WithdrawalProcessHandler(),
]


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: type(h).__name__)
async def test_unexpected_events_are_refused(handler: Any) -> None:
    with pytest.raises(dogma.UnexpectedMessage):
        await handler.route_event_to_instance(Unknown())
    with pytest.raises(dogma.UnexpectedMessage):
        await handler.handle_event(
            handler.new(), ProcessEventScope(handler.new(), "x", NOW), Unknown()
        )


@pytest.mark.parametrize(
    "handler",
    [
        DepositProcessHandler(),
        OpenAccountForNewCustomerProcessHandler(),
        WithdrawalProcessHandler(),
    ],
    ids=lambda h: type(h).__name__,
)
async def test_stateless_processes_have_no_deadlines(handler: Any) -> None:
    scope = ProcessDeadlineScope(handler.new(), "x", NOW, scheduled_for=NOW)

    with pytest.raises(dogma.UnexpectedMessage):
        await handler.handle_deadline(
            handler.new(), scope, TransferReadyToProceed(transaction_id="x")
        )


class TestOpenAccountForNewCustomer:
    async def test_opens_the_account_then_ends(self) -> None:
        event = CustomerAcquired(
            customer_id="C1", customer_name="Anna", account_id="A1", account_name="Savings"
        )

        scope = await handle(OpenAccountForNewCustomerProcessHandler(), event)

        assert scope.instance_id == "C1"
        assert scope.commands == [
            OpenAccount(customer_id="C1", account_id="A1", account_name="Savings")
        ]
        assert scope.ended


class TestDeposit:
    async def test_started_credits_the_account(self) -> None:
        scope = await handle(
            DepositProcessHandler(),
            DepositStarted(transaction_id="T1", account_id="A1", amount=500),
        )

        assert scope.instance_id == "T1"
        assert scope.commands == [
            CreditAccount(transaction_id="T1", account_id="A1", transaction_type=DEP, amount=500)
        ]
        assert not scope.ended

    async def test_credited_approves_the_deposit(self) -> None:
        scope = await handle(DepositProcessHandler(), credited(DEP))

        assert scope.commands == [ApproveDeposit(transaction_id="T1", account_id="A1", amount=500)]

    async def test_approved_ends_the_instance(self) -> None:
        scope = await handle(
            DepositProcessHandler(),
            DepositApproved(transaction_id="T1", account_id="A1", amount=500),
        )

        assert scope.ended
        assert scope.commands == []

    @pytest.mark.parametrize("tx_type", [WD, TR])
    async def test_credits_of_other_transaction_types_are_ignored(
        self, tx_type: TransactionType
    ) -> None:
        assert await DepositProcessHandler().route_event_to_instance(credited(tx_type)) is None


class TestWithdrawal:
    async def test_started_debits_the_account_with_the_scheduled_time(self) -> None:
        event = WithdrawalStarted(
            transaction_id="T1", account_id="A1", amount=500, scheduled_time=LATER
        )

        scope = await handle(WithdrawalProcessHandler(), event)

        assert scope.commands == [
            DebitAccount(
                transaction_id="T1",
                account_id="A1",
                transaction_type=WD,
                amount=500,
                scheduled_time=LATER,
            )
        ]

    async def test_debited_consumes_the_limit_of_the_scheduled_day(self) -> None:
        scope = await handle(WithdrawalProcessHandler(), debited(WD, at=LATER))

        assert scope.commands == [
            ConsumeDailyDebitLimit(
                transaction_id="T1", account_id="A1", debit_type=WD, amount=500, date="2001-02-04"
            )
        ]

    async def test_debit_declined_declines_with_the_reason(self) -> None:
        scope = await handle(WithdrawalProcessHandler(), declined(WD))

        assert scope.commands == [
            DeclineWithdrawal(transaction_id="T1", account_id="A1", amount=500, reason=NSF)
        ]

    async def test_limit_consumed_approves(self) -> None:
        scope = await handle(WithdrawalProcessHandler(), consumed(WD))

        assert scope.commands == [
            ApproveWithdrawal(transaction_id="T1", account_id="A1", amount=500)
        ]

    async def test_limit_exceeded_refunds(self) -> None:
        scope = await handle(WithdrawalProcessHandler(), exceeded(WD))

        assert scope.commands == [
            CreditAccount(transaction_id="T1", account_id="A1", transaction_type=WD, amount=500)
        ]

    async def test_refund_declines_for_the_daily_limit(self) -> None:
        scope = await handle(WithdrawalProcessHandler(), credited(WD))

        assert scope.commands == [
            DeclineWithdrawal(transaction_id="T1", account_id="A1", amount=500, reason=LIMIT)
        ]

    @pytest.mark.parametrize(
        "event",
        [
            WithdrawalApproved(transaction_id="T1", account_id="A1", amount=5),
            WithdrawalDeclined(transaction_id="T1", account_id="A1", amount=5, reason=NSF),
        ],
    )
    async def test_outcome_ends_the_instance(self, event: dogma.Event) -> None:
        assert (await handle(WithdrawalProcessHandler(), event)).ended

    @pytest.mark.parametrize(
        "event",
        [credited(DEP), credited(TR), debited(TR), declined(TR), consumed(TR), exceeded(TR)],
        ids=lambda e: f"{type(e).__name__}",
    )
    async def test_events_of_other_transaction_types_are_ignored(self, event: dogma.Event) -> None:
        assert await WithdrawalProcessHandler().route_event_to_instance(event) is None


def started(to: str = "A2", *, third_party: bool = False, at: datetime = LATER) -> TransferStarted:
    return TransferStarted(
        transaction_id="T1",
        from_account_id="A1",
        to_account_id=to,
        amount=500,
        scheduled_time=at,
        to_third_party_bank=third_party,
    )


def transfer_root(to: str = "A2", *, third_party: bool = False, **changes: Any) -> TransferRoot:
    return TransferRoot(
        from_account_id="A1",
        to_account_id=to,
        to_third_party_bank=third_party,
        amount=500,
        **changes,
    )


class TestTransfer:
    async def test_started_remembers_the_transfer_and_waits_for_its_time(self) -> None:
        scope = await handle(TransferProcessHandler(), started(third_party=True))

        assert scope.mutated
        assert scope.root == transfer_root(third_party=True)
        assert scope.deadlines == [(TransferReadyToProceed(transaction_id="T1"), LATER)]
        assert scope.commands == []

    async def test_deadline_debits_the_source_for_the_scheduled_time(self) -> None:
        handler = TransferProcessHandler()
        root = transfer_root()
        scope = ProcessDeadlineScope(root, "T1", LATER + timedelta(seconds=5), scheduled_for=LATER)

        await handler.handle_deadline(root, scope, TransferReadyToProceed(transaction_id="T1"))

        assert scope.commands == [
            DebitAccount(
                transaction_id="T1",
                account_id="A1",
                transaction_type=TR,
                amount=500,
                scheduled_time=LATER,
            )
        ]

    async def test_debited_consumes_the_limit(self) -> None:
        scope = await handle(TransferProcessHandler(), debited(TR, at=LATER), transfer_root())

        assert scope.commands == [
            ConsumeDailyDebitLimit(
                transaction_id="T1", account_id="A1", debit_type=TR, amount=500, date="2001-02-04"
            )
        ]

    async def test_debit_declined_declines_with_the_reason(self) -> None:
        scope = await handle(TransferProcessHandler(), declined(TR), transfer_root())

        assert scope.commands == [
            DeclineTransfer(
                transaction_id="T1",
                from_account_id="A1",
                to_account_id="A2",
                amount=500,
                reason=NSF,
            )
        ]

    async def test_limit_consumed_credits_the_destination(self) -> None:
        scope = await handle(TransferProcessHandler(), consumed(TR), transfer_root())

        assert scope.commands == [
            CreditAccount(transaction_id="T1", account_id="A2", transaction_type=TR, amount=500)
        ]

    async def test_limit_consumed_credits_a_third_party_destination(self) -> None:
        scope = await handle(
            TransferProcessHandler(), consumed(TR), transfer_root("100001", third_party=True)
        )

        assert scope.commands == [
            CreditThirdPartyAccount(transaction_id="T1", account_id="100001", amount=500)
        ]

    async def test_limit_exceeded_remembers_the_reason_and_refunds(self) -> None:
        scope = await handle(TransferProcessHandler(), exceeded(TR), transfer_root())

        assert scope.root.decline_reason is LIMIT
        assert scope.commands == [
            CreditAccount(transaction_id="T1", account_id="A1", transaction_type=TR, amount=500)
        ]

    async def test_credit_of_the_destination_approves(self) -> None:
        scope = await handle(TransferProcessHandler(), credited(TR, "A2"), transfer_root())

        assert scope.commands == [
            ApproveTransfer(
                transaction_id="T1", from_account_id="A1", to_account_id="A2", amount=500
            )
        ]

    async def test_refund_after_the_limit_declines(self) -> None:
        scope = await handle(
            TransferProcessHandler(), credited(TR, "A1"), transfer_root(decline_reason=LIMIT)
        )

        assert scope.commands == [
            DeclineTransfer(
                transaction_id="T1",
                from_account_id="A1",
                to_account_id="A2",
                amount=500,
                reason=LIMIT,
            )
        ]

    async def test_third_party_credit_approves(self) -> None:
        event = ThirdPartyAccountCredited(transaction_id="T1", account_id="100001", amount=500)

        scope = await handle(
            TransferProcessHandler(), event, transfer_root("100001", third_party=True)
        )

        assert scope.commands == [
            ApproveTransfer(
                transaction_id="T1", from_account_id="A1", to_account_id="100001", amount=500
            )
        ]

    async def test_third_party_failure_fails_the_transfer_and_refunds(self) -> None:
        event = ThirdPartyAccountCreditFailed(transaction_id="T1", account_id="X", amount=500)

        scope = await handle(TransferProcessHandler(), event, transfer_root("X", third_party=True))

        assert scope.root.failed
        assert scope.commands == [
            MarkTransferAsFailed(
                transaction_id="T1", from_account_id="A1", to_account_id="X", amount=500
            ),
            CreditAccount(transaction_id="T1", account_id="A1", transaction_type=TR, amount=500),
        ]

    async def test_refund_of_a_failed_transfer_is_ignored_whatever_the_order(self) -> None:
        """Hazard 4.11(1): the refund may arrive before TransferFailed; nothing must follow."""
        root = transfer_root("X", third_party=True, failed=True)

        scope = await handle(TransferProcessHandler(), credited(TR, "A1"), root)

        assert scope.commands == []
        assert not scope.ended
        assert scope.logs == ["refunded failed transfer to account A1"]

    @pytest.mark.parametrize(
        "event",
        [
            TransferApproved(
                transaction_id="T1", from_account_id="A1", to_account_id="A2", amount=5
            ),
            TransferDeclined(
                transaction_id="T1", from_account_id="A1", to_account_id="A2", amount=5, reason=NSF
            ),
            TransferFailed(transaction_id="T1", from_account_id="A1", to_account_id="A2", amount=5),
        ],
        ids=lambda e: type(e).__name__,
    )
    async def test_outcome_ends_the_instance(self, event: dogma.Event) -> None:
        assert (await handle(TransferProcessHandler(), event, transfer_root())).ended

    @pytest.mark.parametrize(
        "event",
        [credited(DEP), credited(WD), debited(WD), declined(WD), consumed(WD), exceeded(WD)],
        ids=lambda e: type(e).__name__,
    )
    async def test_events_of_other_transaction_types_are_ignored(self, event: dogma.Event) -> None:
        assert await TransferProcessHandler().route_event_to_instance(event) is None

    def test_root_round_trips_through_bytes(self) -> None:
        root = transfer_root("X", third_party=True, decline_reason=LIMIT, failed=True)
        copy = TransferRoot()

        copy.unmarshal_binary(root.marshal_binary())

        assert copy == root

    @pytest.mark.parametrize(
        ("root", "ended", "text"),
        [
            (TransferRoot(), False, ""),
            (transfer_root(), False, "transferring $5.00 from A1 to A2"),
            (transfer_root(), True, "transferred $5.00 from A1 to A2"),
            (
                transfer_root(decline_reason=LIMIT),
                True,
                "transfer of $5.00 from A1 to A2 declined: daily debit limit exceeded",
            ),
            (transfer_root(failed=True), True, "transfer of $5.00 from A1 to A2 failed"),
        ],
    )
    def test_description(self, root: TransferRoot, ended: bool, text: str) -> None:
        assert root.process_instance_description(ended) == text


class TestProcessScope:
    @pytest.mark.parametrize(
        ("operation", "words"),
        [
            (lambda s: s.mutate(lambda r: None), "mutate the root"),
            (
                lambda s: s.execute_command(
                    ApproveDeposit(transaction_id="T", account_id="A", amount=1)
                ),
                "execute a command",
            ),
            (
                lambda s: s.schedule_deadline(TransferReadyToProceed(transaction_id="T"), NOW),
                "schedule a deadline",
            ),
        ],
    )
    def test_writes_after_end_are_refused(self, operation: Any, words: str) -> None:
        scope = ProcessEventScope(TransferRoot(), "T1", NOW)
        scope.end()

        with pytest.raises(RuntimeError, match=f"^cannot {words}: process instance T1 ended$"):
            operation(scope)

    def test_naive_deadline_times_are_refused(self) -> None:
        scope = ProcessEventScope(TransferRoot(), "T1", NOW)

        with pytest.raises(ValueError, match=r"^deadline time 2001-02-03T00:00:00 is naive"):
            scope.schedule_deadline(
                TransferReadyToProceed(transaction_id="T"), datetime(2001, 2, 3)
            )

    def test_invalid_commands_are_refused(self) -> None:
        scope = ProcessEventScope(TransferRoot(), "T1", NOW)

        with pytest.raises(
            dogma.ValidationError, match=r"^ApproveDeposit must not have an empty account ID$"
        ):
            scope.execute_command(ApproveDeposit(transaction_id="T", account_id="", amount=1))

    def test_unrouted_commands_are_refused(self) -> None:
        scope = ProcessEventScope(TransferRoot(), "T1", NOW, frozenset({DebitAccount}))

        with pytest.raises(
            TypeError, match=r"^the handler produced ApproveDeposit, which is not produced"
        ):
            scope.execute_command(ApproveDeposit(transaction_id="T", account_id="A", amount=1))


class TestThirdPartyFailureOrdering:
    """Hazard 4.11(1): TransferFailed and the refund's AccountCredited have no relative order."""

    async def deliver(self, root: TransferRoot, events: list[dogma.Event]) -> list[dogma.Command]:
        """Deliver events one scope at a time, as an engine would, until the instance ends."""
        handler = TransferProcessHandler()
        commands: list[dogma.Command] = []
        for event in events:
            scope: ProcessEventScope[TransferRoot] = ProcessEventScope(root, "T1", NOW)
            await handler.handle_event(root, scope, event)
            commands += scope.commands
            if scope.ended:
                break  # the engine ignores later events for an ended instance
        return commands

    FAILED = ThirdPartyAccountCreditFailed(transaction_id="T1", account_id="X", amount=500)
    TRANSFER_FAILED = TransferFailed(
        transaction_id="T1", from_account_id="A1", to_account_id="X", amount=500
    )

    @pytest.mark.parametrize("refund_first", [False, True], ids=["failed-first", "refund-first"])
    async def test_outcome_is_the_same_in_either_order(self, refund_first: bool) -> None:
        root = transfer_root("X", third_party=True)
        refund = credited(TR, "A1")
        later = [refund, self.TRANSFER_FAILED] if refund_first else [self.TRANSFER_FAILED, refund]

        commands = await self.deliver(root, [self.FAILED, *later])

        assert commands == [
            MarkTransferAsFailed(
                transaction_id="T1", from_account_id="A1", to_account_id="X", amount=500
            ),
            CreditAccount(transaction_id="T1", account_id="A1", transaction_type=TR, amount=500),
        ]
