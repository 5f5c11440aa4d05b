"""The withdrawal process: debit, check the daily limit, then approve or refund."""

from __future__ import annotations

import dogma

from ..messages import (
    AccountCredited,
    AccountDebitDeclined,
    AccountDebited,
    ApproveWithdrawal,
    ConsumeDailyDebitLimit,
    CreditAccount,
    DailyDebitLimitConsumed,
    DailyDebitLimitExceeded,
    DebitAccount,
    DebitFailureReason,
    DeclineWithdrawal,
    TransactionType,
    WithdrawalApproved,
    WithdrawalDeclined,
    WithdrawalStarted,
    daily_debit_limit_date,
)

__all__ = ["WithdrawalProcessHandler"]

_OWN = TransactionType.WITHDRAWAL


class WithdrawalProcessHandler(dogma.StatelessProcessBehavior, dogma.NoDeadlineMessagesBehavior):
    """Coordinates a withdrawal; one instance per transaction ID.

    The money is debited *before* the daily limit is checked, and refunded if
    the limit is exceeded. A withdrawal is never delayed: its scheduled time
    only picks the day whose limit applies.
    """

    def configure(self, c: dogma.ProcessConfigurer) -> None:
        """Declare the withdrawal process's identity and routes."""
        c.identity("withdrawal", "23f70d2b-a289-4e0f-8a83-c0c6a69d11d9")
        c.routes(
            dogma.handles_event(WithdrawalStarted),
            dogma.handles_event(AccountDebited),
            dogma.handles_event(AccountDebitDeclined),
            dogma.handles_event(DailyDebitLimitConsumed),
            dogma.handles_event(DailyDebitLimitExceeded),
            dogma.handles_event(AccountCredited),
            dogma.handles_event(WithdrawalApproved),
            dogma.handles_event(WithdrawalDeclined),
            dogma.executes_command(DebitAccount),
            dogma.executes_command(ConsumeDailyDebitLimit),
            dogma.executes_command(CreditAccount),
            dogma.executes_command(ApproveWithdrawal),
            dogma.executes_command(DeclineWithdrawal),
        )

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        """Route by transaction ID; ignore account and limit events of other transaction types."""
        match event:
            case WithdrawalStarted() | WithdrawalApproved() | WithdrawalDeclined():
                return event.transaction_id
            case AccountDebited() | AccountDebitDeclined() | AccountCredited():
                return event.transaction_id if event.transaction_type is _OWN else None
            case DailyDebitLimitConsumed() | DailyDebitLimitExceeded():
                return event.transaction_id if event.debit_type is _OWN else None
            case _:
                raise dogma.UnexpectedMessage(event)

    async def handle_event(
        self,
        root: dogma.StatelessProcessRoot,
        scope: dogma.ProcessEventScope[dogma.StatelessProcessRoot],
        event: dogma.Event,
    ) -> None:
        """React to each step of the withdrawal."""
        match event:
            case WithdrawalStarted():
                scope.execute_command(
                    DebitAccount(
                        transaction_id=event.transaction_id,
                        account_id=event.account_id,
                        transaction_type=_OWN,
                        amount=event.amount,
                        scheduled_time=event.scheduled_time,
                    )
                )
            case AccountDebited():
                scope.execute_command(
                    ConsumeDailyDebitLimit(
                        transaction_id=event.transaction_id,
                        account_id=event.account_id,
                        debit_type=_OWN,
                        amount=event.amount,
                        date=daily_debit_limit_date(event.scheduled_time),
                    )
                )
            case AccountDebitDeclined():
                scope.execute_command(
                    DeclineWithdrawal(
                        transaction_id=event.transaction_id,
                        account_id=event.account_id,
                        amount=event.amount,
                        reason=event.reason,
                    )
                )
            case DailyDebitLimitConsumed():
                scope.execute_command(
                    ApproveWithdrawal(
                        transaction_id=event.transaction_id,
                        account_id=event.account_id,
                        amount=event.amount,
                    )
                )
            case DailyDebitLimitExceeded():
                # Compensate: give back the money debited before the limit check.
                scope.execute_command(
                    CreditAccount(
                        transaction_id=event.transaction_id,
                        account_id=event.account_id,
                        transaction_type=_OWN,
                        amount=event.amount,
                    )
                )
            case AccountCredited():
                # The only credit a withdrawal makes is the refund above.
                scope.execute_command(
                    DeclineWithdrawal(
                        transaction_id=event.transaction_id,
                        account_id=event.account_id,
                        amount=event.amount,
                        reason=DebitFailureReason.DAILY_DEBIT_LIMIT_EXCEEDED,
                    )
                )
            case WithdrawalApproved() | WithdrawalDeclined():
                scope.end()
            case _:
                raise dogma.UnexpectedMessage(event)
