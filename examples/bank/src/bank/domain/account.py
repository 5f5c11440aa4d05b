"""The account aggregate: enforces a strict no-overdraw policy."""

from __future__ import annotations

import attrs

import dogma

from ..messages import (
    AccountCredited,
    AccountDebitDeclined,
    AccountDebited,
    AccountOpened,
    CreditAccount,
    DebitAccount,
    DebitFailureReason,
    OpenAccount,
    format_amount,
)

__all__ = ["AccountHandler", "AccountRoot"]


@attrs.define
class AccountRoot(dogma.NoSnapshotBehavior):
    """One account: its name (empty until opened) and balance in cents."""

    name: str = ""
    balance: int = 0

    def apply_event(self, event: dogma.Event) -> None:
        """Apply an account event; other (historical) types change nothing."""
        match event:
            case AccountOpened():
                self.name = event.account_name
            case AccountCredited():
                self.balance += event.amount
            case AccountDebited():
                self.balance -= event.amount

    def aggregate_instance_description(self) -> str:
        """``"{name} ({balance})"``, or ``""`` before the account is opened."""
        if not self.name:
            return ""
        return f"{self.name} ({format_amount(self.balance)})"


class AccountHandler:
    """Handles commands for bank accounts, identified by account ID."""

    def configure(self, c: dogma.AggregateConfigurer) -> None:
        """Declare the account aggregate's identity and routes."""
        c.identity("account", "fcce9a78-23a3-4211-b608-ecbe21ea446f")
        c.routes(
            dogma.handles_command(OpenAccount),
            dogma.handles_command(CreditAccount),
            dogma.handles_command(DebitAccount),
            dogma.records_event(AccountOpened),
            dogma.records_event(AccountCredited),
            dogma.records_event(AccountDebited),
            dogma.records_event(AccountDebitDeclined),
        )

    def new(self) -> AccountRoot:
        """A blank account."""
        return AccountRoot()

    def route_command_to_instance(self, command: dogma.Command) -> str:
        """Route by account ID."""
        match command:
            case OpenAccount() | CreditAccount() | DebitAccount():
                return command.account_id
            case _:
                raise dogma.UnexpectedMessage(command)

    def handle_command(
        self,
        root: AccountRoot,
        scope: dogma.AggregateCommandScope[AccountRoot],
        command: dogma.Command,
    ) -> None:
        """Open, credit or debit the account."""
        match command:
            case OpenAccount():
                if root.name:
                    scope.log("account has already been opened")
                    return
                scope.record_event(
                    AccountOpened(
                        customer_id=command.customer_id,
                        account_id=command.account_id,
                        account_name=command.account_name,
                    )
                )
            case CreditAccount():
                # Like the original, crediting does not require the account to
                # have been opened; nothing in the bank credits an unknown account.
                scope.record_event(
                    AccountCredited(
                        transaction_id=command.transaction_id,
                        account_id=command.account_id,
                        transaction_type=command.transaction_type,
                        amount=command.amount,
                    )
                )
            case DebitAccount():
                if root.balance >= command.amount:
                    scope.record_event(
                        AccountDebited(
                            transaction_id=command.transaction_id,
                            account_id=command.account_id,
                            transaction_type=command.transaction_type,
                            amount=command.amount,
                            scheduled_time=command.scheduled_time,
                        )
                    )
                else:
                    scope.record_event(
                        AccountDebitDeclined(
                            transaction_id=command.transaction_id,
                            account_id=command.account_id,
                            transaction_type=command.transaction_type,
                            amount=command.amount,
                            reason=DebitFailureReason.INSUFFICIENT_FUNDS,
                        )
                    )
            case _:
                raise dogma.UnexpectedMessage(command)
