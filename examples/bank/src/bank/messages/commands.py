"""The bank's commands: requests for the bank to do something.

Type IDs are those of dogmatiq/example, but the JSON is not: field names are
snake_case (``transaction_id``) where Go writes ``TransactionID``, so only the
type IDs (and the handlers' names and keys) are shared with the Go bank.
"""

from __future__ import annotations

from datetime import datetime

import attrs

import dogma

from ._validation import (
    require_aware,
    require_debit_type,
    require_distinct,
    require_ids,
    require_positive,
    require_valid_date,
)
from .types import DebitFailureReason, TransactionType, format_amount

__all__ = [
    "ApproveDeposit",
    "ApproveTransfer",
    "ApproveWithdrawal",
    "ConsumeDailyDebitLimit",
    "CreditAccount",
    "CreditThirdPartyAccount",
    "DebitAccount",
    "DeclineTransfer",
    "DeclineWithdrawal",
    "Deposit",
    "MarkTransferAsFailed",
    "OpenAccount",
    "OpenAccountForNewCustomer",
    "Transfer",
    "Withdraw",
]


@dogma.register_command("209ed1ad-4394-4c1a-b36f-7b24fc8b1d1b")
@attrs.frozen(kw_only=True)
class OpenAccountForNewCustomer(dogma.Command):
    """Acquire a new customer and open their first account."""

    customer_id: str
    customer_name: str
    account_id: str
    account_name: str

    def message_description(self) -> str:
        return (
            f"customer {self.customer_id} {self.customer_name} is opening their first "
            f"account {self.account_id} {self.account_name}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "customer_id", "customer_name", "account_id", "account_name")


@dogma.register_command("3d20299c-ba57-4756-8692-f4e3a95fe00d")
@attrs.frozen(kw_only=True)
class OpenAccount(dogma.Command):
    """Open an account for an existing customer."""

    customer_id: str
    account_id: str
    account_name: str

    def message_description(self) -> str:
        return (
            f"opening account {self.account_id} {self.account_name} for customer {self.customer_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "customer_id", "account_id", "account_name")


@dogma.register_command("0ffb0a54-eaf5-459c-a58b-76f22b95de2d")
@attrs.frozen(kw_only=True)
class CreditAccount(dogma.Command):
    """Add money to an account, as part of a transaction."""

    transaction_id: str
    account_id: str
    transaction_type: TransactionType
    amount: int

    def message_description(self) -> str:
        return (
            f"{self.transaction_type} {self.transaction_id}: crediting "
            f"{format_amount(self.amount)} to account {self.account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        TransactionType.validate(self.transaction_type)
        require_positive(self)


@dogma.register_command("4209ab99-5f15-45b9-a88f-48bce219b911")
@attrs.frozen(kw_only=True)
class DebitAccount(dogma.Command):
    """Take money out of an account, as part of a transaction.

    ``scheduled_time`` is when the transaction was scheduled for; it picks the
    day whose daily debit limit applies.
    """

    transaction_id: str
    account_id: str
    transaction_type: TransactionType
    amount: int
    scheduled_time: datetime

    def message_description(self) -> str:
        return (
            f"{self.transaction_type} {self.transaction_id}: debiting "
            f"{format_amount(self.amount)} from account {self.account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        TransactionType.validate(self.transaction_type)
        require_positive(self)
        require_aware(self)


@dogma.register_command("d86ca816-6333-4b78-a1d3-9368b3adcf65")
@attrs.frozen(kw_only=True)
class ConsumeDailyDebitLimit(dogma.Command):
    """Count a debit against an account's daily debit limit for ``date`` (YYYY-MM-DD)."""

    transaction_id: str
    account_id: str
    debit_type: TransactionType
    amount: int
    date: str

    def message_description(self) -> str:
        return (
            f"{self.debit_type} {self.transaction_id}: consuming {format_amount(self.amount)} "
            f"from {self.date} daily debit limit of account {self.account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        require_debit_type(self, self.debit_type)
        require_positive(self)
        require_valid_date(self)


@dogma.register_command("0cfac865-a1d9-4fd2-b085-f8fce0053795")
@attrs.frozen(kw_only=True)
class Deposit(dogma.Command):
    """Deposit money into an account."""

    transaction_id: str
    account_id: str
    amount: int

    def message_description(self) -> str:
        return (
            f"deposit {self.transaction_id}: depositing {format_amount(self.amount)} "
            f"into account {self.account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        require_positive(self)


@dogma.register_command("6cd5ee09-b59d-45ef-a8ed-91cb1bb6940a")
@attrs.frozen(kw_only=True)
class ApproveDeposit(dogma.Command):
    """Mark a deposit as approved."""

    transaction_id: str
    account_id: str
    amount: int

    def message_description(self) -> str:
        return (
            f"deposit {self.transaction_id}: approving deposit of {format_amount(self.amount)} "
            f"into account {self.account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        require_positive(self)


@dogma.register_command("5528ea57-2fa4-4ddd-ac96-3ec56ec89fce")
@attrs.frozen(kw_only=True)
class Withdraw(dogma.Command):
    """Withdraw money from an account.

    ``scheduled_time`` never delays a withdrawal; it only picks the day whose
    daily debit limit applies.
    """

    transaction_id: str
    account_id: str
    amount: int
    scheduled_time: datetime

    def message_description(self) -> str:
        return (
            f"withdrawal {self.transaction_id}: withdrawing {format_amount(self.amount)} "
            f"from account {self.account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        require_positive(self)
        require_aware(self)


@dogma.register_command("1023356f-f49c-4ea1-9244-83fdb3225da9")
@attrs.frozen(kw_only=True)
class ApproveWithdrawal(dogma.Command):
    """Mark a withdrawal as approved."""

    transaction_id: str
    account_id: str
    amount: int

    def message_description(self) -> str:
        return (
            f"withdrawal {self.transaction_id}: approving withdrawal of "
            f"{format_amount(self.amount)} from account {self.account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        require_positive(self)


@dogma.register_command("ee1e59ff-ed96-4d66-a1aa-f0a11ca8c47d")
@attrs.frozen(kw_only=True)
class DeclineWithdrawal(dogma.Command):
    """Mark a withdrawal as declined, giving the reason."""

    transaction_id: str
    account_id: str
    amount: int
    reason: DebitFailureReason

    def message_description(self) -> str:
        return (
            f"withdrawal {self.transaction_id}: declining withdrawal of "
            f"{format_amount(self.amount)} from account {self.account_id}: {self.reason}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        require_positive(self)
        DebitFailureReason.validate(self.reason)


@dogma.register_command("5ee87c7b-bde3-4b39-9f12-44968cdb9889")
@attrs.frozen(kw_only=True)
class Transfer(dogma.Command):
    """Transfer money between accounts, at ``scheduled_time`` or as soon as possible after.

    With ``to_third_party_bank`` the destination is an account at another bank.
    """

    transaction_id: str
    from_account_id: str
    to_account_id: str
    amount: int
    scheduled_time: datetime
    to_third_party_bank: bool = False

    def message_description(self) -> str:
        return (
            f"transfer {self.transaction_id}: transferring {format_amount(self.amount)} "
            f"from account {self.from_account_id} to account {self.to_account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "from_account_id", "to_account_id")
        require_distinct(self)
        require_positive(self)
        require_aware(self)


@dogma.register_command("0d22aaa5-4449-459a-b9b1-c5fb0ce4a990")
@attrs.frozen(kw_only=True)
class ApproveTransfer(dogma.Command):
    """Mark a transfer as approved."""

    transaction_id: str
    from_account_id: str
    to_account_id: str
    amount: int

    def message_description(self) -> str:
        return (
            f"transfer {self.transaction_id}: approving transfer of {format_amount(self.amount)} "
            f"from account {self.from_account_id} to account {self.to_account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "from_account_id", "to_account_id")
        require_positive(self)


@dogma.register_command("d7d069a2-41fc-415e-91dd-7db3affa9f6d")
@attrs.frozen(kw_only=True)
class DeclineTransfer(dogma.Command):
    """Mark a transfer as declined, giving the reason."""

    transaction_id: str
    from_account_id: str
    to_account_id: str
    amount: int
    reason: DebitFailureReason

    def message_description(self) -> str:
        return (
            f"transfer {self.transaction_id}: declining transfer of {format_amount(self.amount)} "
            f"from account {self.from_account_id} to account {self.to_account_id}: {self.reason}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "from_account_id", "to_account_id")
        require_positive(self)
        DebitFailureReason.validate(self.reason)


@dogma.register_command("b3e5f6a2-7c1d-4e8b-a9f0-3d2c1e4b5f6a")
@attrs.frozen(kw_only=True)
class MarkTransferAsFailed(dogma.Command):
    """Mark a transfer as failed: the third-party bank refused the money."""

    transaction_id: str
    from_account_id: str
    to_account_id: str
    amount: int

    def message_description(self) -> str:
        return (
            f"transfer {self.transaction_id}: failing transfer of {format_amount(self.amount)} "
            f"from account {self.from_account_id} to account {self.to_account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "from_account_id", "to_account_id")
        require_positive(self)


@dogma.register_command("c4a2e6f1-8b3d-4e7a-9f5c-2d1b0e8a3c6f")
@attrs.frozen(kw_only=True)
class CreditThirdPartyAccount(dogma.Command):
    """Send money to an account at a third-party bank."""

    transaction_id: str
    account_id: str
    amount: int

    def message_description(self) -> str:
        return (
            f"transfer {self.transaction_id}: crediting {format_amount(self.amount)} "
            f"to third-party account {self.account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        require_positive(self)
