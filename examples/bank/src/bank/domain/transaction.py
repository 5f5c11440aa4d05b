"""The transaction aggregate: makes transaction IDs unique and tracks their status."""

from __future__ import annotations

import attrs

import dogma

from ..messages import (
    ApproveDeposit,
    ApproveTransfer,
    ApproveWithdrawal,
    DeclineTransfer,
    DeclineWithdrawal,
    Deposit,
    DepositApproved,
    DepositStarted,
    MarkTransferAsFailed,
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
    format_amount,
)

__all__ = ["TransactionHandler", "TransactionRoot"]


@attrs.define
class TransactionRoot(dogma.NoSnapshotBehavior):
    """One transaction: its type, amount and status (empty until started)."""

    type: TransactionType | None = None
    amount: int = 0
    status: str = ""

    def apply_event(self, event: dogma.Event) -> None:
        """Apply a transaction event; other (historical) types change nothing."""
        match event:
            case DepositStarted():
                self._start(TransactionType.DEPOSIT, event.amount)
            case WithdrawalStarted():
                self._start(TransactionType.WITHDRAWAL, event.amount)
            case TransferStarted():
                self._start(TransactionType.TRANSFER, event.amount)
            case DepositApproved() | WithdrawalApproved() | TransferApproved():
                self.status = "approved"
            case WithdrawalDeclined() | TransferDeclined():
                self.status = f"declined: {event.reason}"
            case TransferFailed():
                self.status = "failed"

    def _start(self, kind: TransactionType, amount: int) -> None:
        self.type = kind
        self.amount = amount
        self.status = "pending"

    def aggregate_instance_description(self) -> str:
        """``"{type} of {amount} ({status})"``, or ``""`` before it starts."""
        if self.type is None:
            return ""
        return f"{self.type} of {format_amount(self.amount)} ({self.status})"


class TransactionHandler:
    """Handles commands for transactions, identified by transaction ID."""

    def configure(self, c: dogma.AggregateConfigurer) -> None:
        """Declare the transaction aggregate's identity and routes."""
        c.identity("transaction", "2afe7484-8eb4-4c02-9c39-c2493e0defb0")
        c.routes(
            dogma.handles_command(Deposit),
            dogma.handles_command(ApproveDeposit),
            dogma.handles_command(Withdraw),
            dogma.handles_command(ApproveWithdrawal),
            dogma.handles_command(DeclineWithdrawal),
            dogma.handles_command(Transfer),
            dogma.handles_command(ApproveTransfer),
            dogma.handles_command(DeclineTransfer),
            dogma.handles_command(MarkTransferAsFailed),
            dogma.records_event(DepositStarted),
            dogma.records_event(DepositApproved),
            dogma.records_event(WithdrawalStarted),
            dogma.records_event(WithdrawalApproved),
            dogma.records_event(WithdrawalDeclined),
            dogma.records_event(TransferStarted),
            dogma.records_event(TransferApproved),
            dogma.records_event(TransferDeclined),
            dogma.records_event(TransferFailed),
        )

    def new(self) -> TransactionRoot:
        """A transaction not yet started."""
        return TransactionRoot()

    def route_command_to_instance(self, command: dogma.Command) -> str:
        """Route by transaction ID."""
        match command:
            case (
                Deposit()
                | ApproveDeposit()
                | Withdraw()
                | ApproveWithdrawal()
                | DeclineWithdrawal()
                | Transfer()
                | ApproveTransfer()
                | DeclineTransfer()
                | MarkTransferAsFailed()
            ):
                return command.transaction_id
            case _:
                raise dogma.UnexpectedMessage(command)

    def handle_command(
        self,
        root: TransactionRoot,
        scope: dogma.AggregateCommandScope[TransactionRoot],
        command: dogma.Command,
    ) -> None:
        """Start a transaction once, or record its outcome."""
        match command:
            case Deposit():
                if self._already_started(root, scope):
                    return
                scope.record_event(
                    DepositStarted(
                        transaction_id=command.transaction_id,
                        account_id=command.account_id,
                        amount=command.amount,
                    )
                )
            case Withdraw():
                if self._already_started(root, scope):
                    return
                scope.record_event(
                    WithdrawalStarted(
                        transaction_id=command.transaction_id,
                        account_id=command.account_id,
                        amount=command.amount,
                        scheduled_time=command.scheduled_time,
                    )
                )
            case Transfer():
                if self._already_started(root, scope):
                    return
                if command.from_account_id == command.to_account_id:
                    scope.log("cannot transfer to same account")
                    return
                scope.record_event(
                    TransferStarted(
                        transaction_id=command.transaction_id,
                        from_account_id=command.from_account_id,
                        to_account_id=command.to_account_id,
                        amount=command.amount,
                        scheduled_time=command.scheduled_time,
                        to_third_party_bank=command.to_third_party_bank,
                    )
                )
            case ApproveDeposit():
                scope.record_event(
                    DepositApproved(
                        transaction_id=command.transaction_id,
                        account_id=command.account_id,
                        amount=command.amount,
                    )
                )
            case ApproveWithdrawal():
                scope.record_event(
                    WithdrawalApproved(
                        transaction_id=command.transaction_id,
                        account_id=command.account_id,
                        amount=command.amount,
                    )
                )
            case DeclineWithdrawal():
                scope.record_event(
                    WithdrawalDeclined(
                        transaction_id=command.transaction_id,
                        account_id=command.account_id,
                        amount=command.amount,
                        reason=command.reason,
                    )
                )
            case ApproveTransfer():
                scope.record_event(
                    TransferApproved(
                        transaction_id=command.transaction_id,
                        from_account_id=command.from_account_id,
                        to_account_id=command.to_account_id,
                        amount=command.amount,
                    )
                )
            case DeclineTransfer():
                scope.record_event(
                    TransferDeclined(
                        transaction_id=command.transaction_id,
                        from_account_id=command.from_account_id,
                        to_account_id=command.to_account_id,
                        amount=command.amount,
                        reason=command.reason,
                    )
                )
            case MarkTransferAsFailed():
                scope.record_event(
                    TransferFailed(
                        transaction_id=command.transaction_id,
                        from_account_id=command.from_account_id,
                        to_account_id=command.to_account_id,
                        amount=command.amount,
                    )
                )
            case _:
                raise dogma.UnexpectedMessage(command)

    @staticmethod
    def _already_started(
        root: TransactionRoot, scope: dogma.AggregateCommandScope[TransactionRoot]
    ) -> bool:
        if root.status:
            scope.log("transaction already started")
            return True
        return False
