"""The transfer process: moves money between accounts, possibly at a later time.

Ordering hazard, and its fix
----------------------------
When the third-party bank refuses a credit, this process executes two commands
in one scope: ``MarkTransferAsFailed`` (handled by the *transaction* aggregate,
which records ``TransferFailed``) and a refund ``CreditAccount`` (handled by the
*account* aggregate, which records ``AccountCredited``). The two events come
from different aggregate instances, so Dogma gives them no relative order
(ADR-23). The original Go example relies on ``TransferFailed`` arriving first
(it ends the instance, so the refund's ``AccountCredited`` is ignored). If the
refund arrived first it would be taken for a refund after a business rejection
and answered with ``DeclineTransfer`` without a reason, which is invalid.

The port records ``failed`` in the root when the failure is handled, and
ignores a transfer credit once it is set: the outcome is the same whichever
event arrives first.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import attrs

import dogma

from ..messages import (
    AccountCredited,
    AccountDebitDeclined,
    AccountDebited,
    ApproveTransfer,
    ConsumeDailyDebitLimit,
    CreditAccount,
    CreditThirdPartyAccount,
    DailyDebitLimitConsumed,
    DailyDebitLimitExceeded,
    DebitAccount,
    DebitFailureReason,
    DeclineTransfer,
    MarkTransferAsFailed,
    ThirdPartyAccountCredited,
    ThirdPartyAccountCreditFailed,
    TransactionType,
    TransferApproved,
    TransferDeclined,
    TransferFailed,
    TransferStarted,
    daily_debit_limit_date,
    format_amount,
)
from ..messages._validation import require_ids

__all__ = ["TransferProcessHandler", "TransferReadyToProceed", "TransferRoot"]

_OWN = TransactionType.TRANSFER


@dogma.register_deadline("b5474f89-e985-4661-b85b-645347a4a645")
@attrs.frozen(kw_only=True)
class TransferReadyToProceed(dogma.Deadline):
    """The time a transfer was scheduled for has been reached."""

    transaction_id: str

    def message_description(self) -> str:
        return f"transfer {self.transaction_id} is ready to proceed"

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id")


@attrs.define
class TransferRoot:
    """The state of one transfer, stored by the engine as JSON."""

    from_account_id: str = ""
    to_account_id: str = ""
    to_third_party_bank: bool = False
    amount: int = 0
    decline_reason: DebitFailureReason | None = None
    # Set when the third-party bank refused the money; see the module docstring.
    failed: bool = False

    def process_instance_description(self, ended: bool) -> str:
        """What the transfer is doing, or did."""
        if self.amount == 0:
            return ""
        amount = format_amount(self.amount)
        route = f"from {self.from_account_id} to {self.to_account_id}"
        if not ended:
            return f"transferring {amount} {route}"
        if self.decline_reason is not None:
            return f"transfer of {amount} {route} declined: {self.decline_reason}"
        if self.failed:
            return f"transfer of {amount} {route} failed"
        return f"transferred {amount} {route}"

    def marshal_binary(self) -> bytes:
        """Encode the root as JSON."""
        data = attrs.asdict(self)
        return json.dumps(data, separators=(",", ":")).encode()

    def unmarshal_binary(self, data: bytes) -> None:
        """Replace the root's state with JSON made by ``marshal_binary``."""
        fields = json.loads(data)
        reason = fields.get("decline_reason")
        self.from_account_id = fields["from_account_id"]
        self.to_account_id = fields["to_account_id"]
        self.to_third_party_bank = fields["to_third_party_bank"]
        self.amount = fields["amount"]
        self.decline_reason = None if reason is None else DebitFailureReason(reason)
        self.failed = fields.get("failed", False)


EventScope = dogma.ProcessEventScope[TransferRoot]
DeadlineScope = dogma.ProcessDeadlineScope[TransferRoot]


class TransferProcessHandler:
    """Coordinates a transfer; one instance per transaction ID.

    The transfer waits for its scheduled time (a ``TransferReadyToProceed``
    deadline), debits the source account, consumes the daily debit limit,
    then credits the destination, here or at a third-party bank. A debit
    beyond the daily limit is refunded and the transfer declined; a credit the
    third-party bank refuses is refunded and the transfer marked as failed.
    """

    def configure(self, c: dogma.ProcessConfigurer) -> None:
        """Declare the transfer process's identity and routes."""
        c.identity("transfer", "35afbe82-24c1-4868-a689-c2ec96c2e953")
        c.routes(
            dogma.handles_event(TransferStarted),
            dogma.handles_event(AccountDebited),
            dogma.handles_event(AccountDebitDeclined),
            dogma.handles_event(DailyDebitLimitConsumed),
            dogma.handles_event(DailyDebitLimitExceeded),
            dogma.handles_event(AccountCredited),
            dogma.handles_event(ThirdPartyAccountCredited),
            dogma.handles_event(ThirdPartyAccountCreditFailed),
            dogma.handles_event(TransferApproved),
            dogma.handles_event(TransferDeclined),
            dogma.handles_event(TransferFailed),
            dogma.executes_command(DebitAccount),
            dogma.executes_command(ConsumeDailyDebitLimit),
            dogma.executes_command(CreditAccount),
            dogma.executes_command(CreditThirdPartyAccount),
            dogma.executes_command(ApproveTransfer),
            dogma.executes_command(DeclineTransfer),
            dogma.executes_command(MarkTransferAsFailed),
            dogma.schedules_deadline(TransferReadyToProceed),
        )

    def new(self) -> TransferRoot:
        """A transfer not yet started."""
        return TransferRoot()

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        """Route by transaction ID; ignore account and limit events of other transaction types."""
        match event:
            case (
                TransferStarted()
                | TransferApproved()
                | TransferDeclined()
                | TransferFailed()
                | ThirdPartyAccountCredited()
                | ThirdPartyAccountCreditFailed()
            ):
                return event.transaction_id
            case AccountDebited() | AccountDebitDeclined() | AccountCredited():
                return event.transaction_id if event.transaction_type is _OWN else None
            case DailyDebitLimitConsumed() | DailyDebitLimitExceeded():
                return event.transaction_id if event.debit_type is _OWN else None
            case _:
                raise dogma.UnexpectedMessage(event)

    async def handle_event(self, root: TransferRoot, scope: EventScope, event: dogma.Event) -> None:
        """React to each step of the transfer."""
        tx = scope.instance_id
        match event:
            case TransferStarted():
                scope.mutate(_started(event))
                # A time already reached means "as soon as possible".
                scope.schedule_deadline(
                    TransferReadyToProceed(transaction_id=event.transaction_id),
                    event.scheduled_time,
                )
            case AccountDebited():
                scope.execute_command(
                    ConsumeDailyDebitLimit(
                        transaction_id=tx,
                        account_id=event.account_id,
                        debit_type=_OWN,
                        amount=event.amount,
                        date=daily_debit_limit_date(event.scheduled_time),
                    )
                )
            case AccountDebitDeclined():
                scope.execute_command(_decline(tx, root, event.amount, event.reason))
            case DailyDebitLimitConsumed():
                if root.to_third_party_bank:
                    scope.execute_command(
                        CreditThirdPartyAccount(
                            transaction_id=tx, account_id=root.to_account_id, amount=event.amount
                        )
                    )
                else:
                    scope.execute_command(_credit(tx, root.to_account_id, event.amount))
            case DailyDebitLimitExceeded():
                scope.mutate(_declined_because(DebitFailureReason.DAILY_DEBIT_LIMIT_EXCEEDED))
                scope.execute_command(_credit(tx, root.from_account_id, event.amount))
            case AccountCredited():
                self._credited(root, scope, event)
            case ThirdPartyAccountCredited():
                scope.execute_command(_approve(tx, root, root.amount))
            case ThirdPartyAccountCreditFailed():
                scope.mutate(_failed)
                scope.execute_command(
                    MarkTransferAsFailed(
                        transaction_id=tx,
                        from_account_id=root.from_account_id,
                        to_account_id=root.to_account_id,
                        amount=root.amount,
                    )
                )
                scope.execute_command(_credit(tx, root.from_account_id, root.amount))
            case TransferApproved() | TransferDeclined() | TransferFailed():
                scope.end()
            case _:
                raise dogma.UnexpectedMessage(event)

    @staticmethod
    def _credited(root: TransferRoot, scope: EventScope, event: AccountCredited) -> None:
        tx = scope.instance_id
        if root.failed:
            # The refund of a transfer the third-party bank refused; it may
            # arrive before or after TransferFailed, and there is nothing to do.
            scope.log("refunded failed transfer to account %s", event.account_id)
        elif event.account_id == root.to_account_id:
            scope.execute_command(_approve(tx, root, event.amount))
        elif root.decline_reason is not None:
            # The refund after a business rejection (the daily debit limit).
            scope.execute_command(_decline(tx, root, event.amount, root.decline_reason))
        else:
            scope.log("ignoring unexpected credit to account %s", event.account_id)

    async def handle_deadline(
        self, root: TransferRoot, scope: DeadlineScope, deadline: dogma.Deadline
    ) -> None:
        """Debit the source account once the scheduled time is reached."""
        match deadline:
            case TransferReadyToProceed():
                scope.execute_command(
                    DebitAccount(
                        transaction_id=deadline.transaction_id,
                        account_id=root.from_account_id,
                        transaction_type=_OWN,
                        amount=root.amount,
                        scheduled_time=scope.scheduled_for,
                    )
                )
            case _:
                raise dogma.UnexpectedMessage(deadline)


# Mutations: decided by the handler first, then applied unconditionally (ADR-34).


def _started(event: TransferStarted) -> Callable[[TransferRoot], None]:
    def mutate(root: TransferRoot) -> None:
        root.from_account_id = event.from_account_id
        root.to_account_id = event.to_account_id
        root.to_third_party_bank = event.to_third_party_bank
        root.amount = event.amount

    return mutate


def _declined_because(reason: DebitFailureReason) -> Callable[[TransferRoot], None]:
    def mutate(root: TransferRoot) -> None:
        root.decline_reason = reason

    return mutate


def _failed(root: TransferRoot) -> None:
    root.failed = True


def _credit(tx: str, account_id: str, amount: int) -> CreditAccount:
    return CreditAccount(
        transaction_id=tx, account_id=account_id, transaction_type=_OWN, amount=amount
    )


def _approve(tx: str, root: TransferRoot, amount: int) -> ApproveTransfer:
    return ApproveTransfer(
        transaction_id=tx,
        from_account_id=root.from_account_id,
        to_account_id=root.to_account_id,
        amount=amount,
    )


def _decline(
    tx: str, root: TransferRoot, amount: int, reason: DebitFailureReason
) -> DeclineTransfer:
    return DeclineTransfer(
        transaction_id=tx,
        from_account_id=root.from_account_id,
        to_account_id=root.to_account_id,
        amount=amount,
        reason=reason,
    )
