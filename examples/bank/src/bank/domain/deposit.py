"""The deposit process: credits the account, then approves the deposit."""

from __future__ import annotations

import dogma

from ..messages import (
    AccountCredited,
    ApproveDeposit,
    CreditAccount,
    DepositApproved,
    DepositStarted,
    TransactionType,
)

__all__ = ["DepositProcessHandler"]

Scope = dogma.ProcessEventScope[dogma.StatelessProcessRoot]


class DepositProcessHandler(dogma.StatelessProcessBehavior, dogma.NoDeadlineMessagesBehavior):
    """Coordinates a deposit; one instance per transaction ID."""

    def configure(self, c: dogma.ProcessConfigurer) -> None:
        """Declare the deposit process's identity and routes."""
        c.identity("deposit", "4e50b66b-b2c4-4522-bf15-39756186caee")
        c.routes(
            dogma.handles_event(DepositStarted),
            dogma.handles_event(AccountCredited),
            dogma.handles_event(DepositApproved),
            dogma.executes_command(CreditAccount),
            dogma.executes_command(ApproveDeposit),
        )

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        """Route by transaction ID; ignore credits made by other kinds of transaction."""
        match event:
            case DepositStarted() | DepositApproved():
                return event.transaction_id
            case AccountCredited():
                if event.transaction_type is TransactionType.DEPOSIT:
                    return event.transaction_id
                return None
            case _:
                raise dogma.UnexpectedMessage(event)

    async def handle_event(
        self, root: dogma.StatelessProcessRoot, scope: Scope, event: dogma.Event
    ) -> None:
        """Credit the account, approve once credited, end once approved."""
        match event:
            case DepositStarted():
                scope.execute_command(
                    CreditAccount(
                        transaction_id=event.transaction_id,
                        account_id=event.account_id,
                        transaction_type=TransactionType.DEPOSIT,
                        amount=event.amount,
                    )
                )
            case AccountCredited():
                scope.execute_command(
                    ApproveDeposit(
                        transaction_id=event.transaction_id,
                        account_id=event.account_id,
                        amount=event.amount,
                    )
                )
            case DepositApproved():
                scope.end()
            case _:
                raise dogma.UnexpectedMessage(event)
