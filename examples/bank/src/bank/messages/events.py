"""The bank's events: facts the bank has recorded.

Type IDs are those of dogmatiq/example, but the JSON is not: field names are
snake_case (``transaction_id``) where Go writes ``TransactionID``, so only the
type IDs (and the handlers' names and keys) are shared with the Go bank.
"""

from __future__ import annotations

from datetime import datetime

import attrs

import dogma

from ._validation import (
    require_at_least,
    require_aware,
    require_debit_type,
    require_distinct,
    require_ids,
    require_positive,
    require_valid_date,
)
from .types import DebitFailureReason, TransactionType, format_amount

__all__ = [
    "AccountCredited",
    "AccountDebitDeclined",
    "AccountDebited",
    "AccountOpened",
    "CustomerAcquired",
    "DailyDebitLimitConsumed",
    "DailyDebitLimitExceeded",
    "DepositApproved",
    "DepositStarted",
    "ThirdPartyAccountCreditFailed",
    "ThirdPartyAccountCredited",
    "TransferApproved",
    "TransferDeclined",
    "TransferFailed",
    "TransferStarted",
    "WithdrawalApproved",
    "WithdrawalDeclined",
    "WithdrawalStarted",
]


@dogma.register_event("ddf33f6c-d120-440e-b611-b86a6c3b80a6")
@attrs.frozen(kw_only=True)
class CustomerAcquired(dogma.Event):
    """A new customer joined the bank, asking for their first account."""

    customer_id: str
    customer_name: str
    account_id: str
    account_name: str

    def message_description(self) -> str:
        return f"acquired customer {self.customer_id} {self.customer_name}"

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "customer_id", "customer_name", "account_id", "account_name")


@dogma.register_event("75ef425c-3c42-4ead-8925-cd26cbea3139")
@attrs.frozen(kw_only=True)
class AccountOpened(dogma.Event):
    """An account was opened for a customer."""

    customer_id: str
    account_id: str
    account_name: str

    def message_description(self) -> str:
        return (
            f"opened account {self.account_id} {self.account_name} for customer {self.customer_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "customer_id", "account_id", "account_name")


@dogma.register_event("f3091f46-7d36-4e5f-b0ab-fb96029e5d7a")
@attrs.frozen(kw_only=True)
class AccountCredited(dogma.Event):
    """Money was added to an account."""

    transaction_id: str
    account_id: str
    transaction_type: TransactionType
    amount: int

    def message_description(self) -> str:
        return (
            f"{self.transaction_type} {self.transaction_id}: credited "
            f"{format_amount(self.amount)} to account {self.account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        TransactionType.validate(self.transaction_type)
        require_positive(self)


@dogma.register_event("76552351-0095-442e-85dd-68f8f7fae286")
@attrs.frozen(kw_only=True)
class AccountDebited(dogma.Event):
    """Money was taken out of an account."""

    transaction_id: str
    account_id: str
    transaction_type: TransactionType
    amount: int
    scheduled_time: datetime

    def message_description(self) -> str:
        return (
            f"{self.transaction_type} {self.transaction_id}: debited "
            f"{format_amount(self.amount)} from account {self.account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        TransactionType.validate(self.transaction_type)
        require_positive(self)
        require_aware(self)


@dogma.register_event("34b0c426-5467-44d8-a5db-7d09c789c930")
@attrs.frozen(kw_only=True)
class AccountDebitDeclined(dogma.Event):
    """An attempt to take money out of an account was refused."""

    transaction_id: str
    account_id: str
    transaction_type: TransactionType
    amount: int
    reason: DebitFailureReason

    def message_description(self) -> str:
        return (
            f"{self.transaction_type} {self.transaction_id}: declined debit of "
            f"{format_amount(self.amount)} from account {self.account_id}: {self.reason}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        TransactionType.validate(self.transaction_type)
        require_positive(self)
        DebitFailureReason.validate(self.reason)


@dogma.register_event("9b4a1114-817e-42d1-963d-ba6324dd07b2")
@attrs.frozen(kw_only=True)
class DailyDebitLimitConsumed(dogma.Event):
    """A debit was counted against a daily debit limit.

    ``total_debits_for_day`` *includes* this debit.
    """

    transaction_id: str
    account_id: str
    debit_type: TransactionType
    amount: int
    date: str
    total_debits_for_day: int
    daily_limit: int

    def message_description(self) -> str:
        return (
            f"{self.debit_type} {self.transaction_id}: consumed {format_amount(self.amount)} "
            f"from {self.date} daily debit limit of account {self.account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        require_debit_type(self, self.debit_type)
        require_positive(self)
        require_valid_date(self)
        require_at_least(self, "total_debits_for_day", 1)
        require_at_least(self, "daily_limit", 0)


@dogma.register_event("83c5315e-440d-4d70-a6c8-41f97edc226f")
@attrs.frozen(kw_only=True)
class DailyDebitLimitExceeded(dogma.Event):
    """A debit was refused because it would exceed a daily debit limit.

    ``total_debits_for_day`` *excludes* the refused debit.
    """

    transaction_id: str
    account_id: str
    debit_type: TransactionType
    amount: int
    date: str
    total_debits_for_day: int
    daily_limit: int

    def message_description(self) -> str:
        excess = self.total_debits_for_day + self.amount - self.daily_limit
        return (
            f"{self.debit_type} {self.transaction_id}: exceeded {self.date} daily debit "
            f"limit of account {self.account_id} by {format_amount(excess)}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        require_debit_type(self, self.debit_type)
        require_positive(self)
        require_valid_date(self)
        require_at_least(self, "total_debits_for_day", 0)
        require_at_least(self, "daily_limit", 0)


@dogma.register_event("699ae4e6-ea0a-4450-8a04-8ec5248b8042")
@attrs.frozen(kw_only=True)
class DepositStarted(dogma.Event):
    """A deposit began."""

    transaction_id: str
    account_id: str
    amount: int

    def message_description(self) -> str:
        return (
            f"deposit {self.transaction_id}: started deposit of {format_amount(self.amount)} "
            f"into account {self.account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        require_positive(self)


@dogma.register_event("8520d995-5c0e-4905-9bbf-99b5f8028505")
@attrs.frozen(kw_only=True)
class DepositApproved(dogma.Event):
    """A deposit completed."""

    transaction_id: str
    account_id: str
    amount: int

    def message_description(self) -> str:
        return (
            f"deposit {self.transaction_id}: approved deposit of {format_amount(self.amount)} "
            f"into account {self.account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        require_positive(self)


@dogma.register_event("ae327c68-3de9-4fe1-aa39-c4830200602c")
@attrs.frozen(kw_only=True)
class WithdrawalStarted(dogma.Event):
    """A withdrawal began."""

    transaction_id: str
    account_id: str
    amount: int
    scheduled_time: datetime

    def message_description(self) -> str:
        return (
            f"withdrawal {self.transaction_id}: started withdrawal of "
            f"{format_amount(self.amount)} from account {self.account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        require_positive(self)
        require_aware(self)


@dogma.register_event("8551621a-ef28-42aa-b815-d5a448299d38")
@attrs.frozen(kw_only=True)
class WithdrawalApproved(dogma.Event):
    """A withdrawal completed."""

    transaction_id: str
    account_id: str
    amount: int

    def message_description(self) -> str:
        return (
            f"withdrawal {self.transaction_id}: approved withdrawal of "
            f"{format_amount(self.amount)} from account {self.account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        require_positive(self)


@dogma.register_event("a87f5f6f-52ec-4eeb-954f-2af97a165181")
@attrs.frozen(kw_only=True)
class WithdrawalDeclined(dogma.Event):
    """A withdrawal was refused."""

    transaction_id: str
    account_id: str
    amount: int
    reason: DebitFailureReason

    def message_description(self) -> str:
        return (
            f"withdrawal {self.transaction_id}: declined withdrawal of "
            f"{format_amount(self.amount)} from account {self.account_id}: {self.reason}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        require_positive(self)
        DebitFailureReason.validate(self.reason)


@dogma.register_event("e5a7db39-861a-4a98-b109-a6f4187ac407")
@attrs.frozen(kw_only=True)
class TransferStarted(dogma.Event):
    """A transfer began; it proceeds at ``scheduled_time``."""

    transaction_id: str
    from_account_id: str
    to_account_id: str
    amount: int
    scheduled_time: datetime
    to_third_party_bank: bool = False

    def message_description(self) -> str:
        return (
            f"transfer {self.transaction_id}: started transfer of {format_amount(self.amount)} "
            f"from account {self.from_account_id} to account {self.to_account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "from_account_id", "to_account_id")
        require_distinct(self)
        require_positive(self)
        require_aware(self)


@dogma.register_event("bcc989cc-4ec7-4175-84dc-24908ac82676")
@attrs.frozen(kw_only=True)
class TransferApproved(dogma.Event):
    """A transfer completed."""

    transaction_id: str
    from_account_id: str
    to_account_id: str
    amount: int

    def message_description(self) -> str:
        return (
            f"transfer {self.transaction_id}: approved transfer of {format_amount(self.amount)} "
            f"from account {self.from_account_id} to account {self.to_account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "from_account_id", "to_account_id")
        require_distinct(self)
        require_positive(self)


@dogma.register_event("0e43679a-bf5b-4730-a4a0-543e17a67479")
@attrs.frozen(kw_only=True)
class TransferDeclined(dogma.Event):
    """A transfer was refused by the bank's business rules."""

    transaction_id: str
    from_account_id: str
    to_account_id: str
    amount: int
    reason: DebitFailureReason

    def message_description(self) -> str:
        return (
            f"transfer {self.transaction_id}: declined transfer of {format_amount(self.amount)} "
            f"from account {self.from_account_id} to account {self.to_account_id}: {self.reason}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "from_account_id", "to_account_id")
        require_distinct(self)
        require_positive(self)
        DebitFailureReason.validate(self.reason)


@dogma.register_event("c6d8e9a1-2b4f-5e7c-8d0a-1f3e5c7b9d2e")
@attrs.frozen(kw_only=True)
class TransferFailed(dogma.Event):
    """A transfer failed because the third-party bank refused the money."""

    transaction_id: str
    from_account_id: str
    to_account_id: str
    amount: int

    def message_description(self) -> str:
        return (
            f"transfer {self.transaction_id}: failed transfer of {format_amount(self.amount)} "
            f"from account {self.from_account_id} to account {self.to_account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "from_account_id", "to_account_id")
        require_distinct(self)
        require_positive(self)


@dogma.register_event("a7f3c8e2-5d1b-4a9e-8c6f-3b2d0e7a1c5d")
@attrs.frozen(kw_only=True)
class ThirdPartyAccountCredited(dogma.Event):
    """A third-party bank accepted money for one of its accounts."""

    transaction_id: str
    account_id: str
    amount: int

    def message_description(self) -> str:
        return (
            f"transfer {self.transaction_id}: credited {format_amount(self.amount)} "
            f"to third-party account {self.account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        require_positive(self)


@dogma.register_event("e9b4d7f0-2c6a-4e8b-9d3f-1a5c0b8e4d2a")
@attrs.frozen(kw_only=True)
class ThirdPartyAccountCreditFailed(dogma.Event):
    """A third-party bank refused money for one of its accounts."""

    transaction_id: str
    account_id: str
    amount: int

    def message_description(self) -> str:
        return (
            f"transfer {self.transaction_id}: failed to credit {format_amount(self.amount)} "
            f"to third-party account {self.account_id}"
        )

    def validate(self, scope: dogma.ValidationScope) -> None:
        require_ids(self, "transaction_id", "account_id")
        require_positive(self)
