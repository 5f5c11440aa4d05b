"""The bank's messages: type IDs, validation rules, descriptions and encoding."""

from __future__ import annotations

import re
import typing
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import attrs
import pytest

import dogma
from bank.domain import TransferReadyToProceed
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
    CreditThirdPartyAccount,
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
    daily_debit_limit_date,
    format_amount,
    is_valid_date,
)

AT = datetime(2001, 2, 3, tzinfo=UTC)
NEW = dogma.ValidationScope(is_new=True)
DEP = TransactionType.DEPOSIT
WD = TransactionType.WITHDRAWAL
TR = TransactionType.TRANSFER
NSF = DebitFailureReason.INSUFFICIENT_FUNDS
LIMIT = DebitFailureReason.DAILY_DEBIT_LIMIT_EXCEEDED

# One valid example of every message, with the Go example's type ID and description.
EXAMPLES: list[tuple[dogma.Message, str, str]] = [
    (
        OpenAccountForNewCustomer(
            customer_id="C1", customer_name="Anna", account_id="A1", account_name="Savings"
        ),
        "209ed1ad-4394-4c1a-b36f-7b24fc8b1d1b",
        "customer C1 Anna is opening their first account A1 Savings",
    ),
    (
        OpenAccount(customer_id="C1", account_id="A1", account_name="Savings"),
        "3d20299c-ba57-4756-8692-f4e3a95fe00d",
        "opening account A1 Savings for customer C1",
    ),
    (
        CreditAccount(transaction_id="T1", account_id="A1", transaction_type=DEP, amount=500),
        "0ffb0a54-eaf5-459c-a58b-76f22b95de2d",
        "deposit T1: crediting $5.00 to account A1",
    ),
    (
        DebitAccount(
            transaction_id="T1", account_id="A1", transaction_type=WD, amount=500, scheduled_time=AT
        ),
        "4209ab99-5f15-45b9-a88f-48bce219b911",
        "withdrawal T1: debiting $5.00 from account A1",
    ),
    (
        ConsumeDailyDebitLimit(
            transaction_id="T1", account_id="A1", debit_type=WD, amount=500, date="2001-02-03"
        ),
        "d86ca816-6333-4b78-a1d3-9368b3adcf65",
        "withdrawal T1: consuming $5.00 from 2001-02-03 daily debit limit of account A1",
    ),
    (
        Deposit(transaction_id="T1", account_id="A1", amount=500),
        "0cfac865-a1d9-4fd2-b085-f8fce0053795",
        "deposit T1: depositing $5.00 into account A1",
    ),
    (
        ApproveDeposit(transaction_id="T1", account_id="A1", amount=500),
        "6cd5ee09-b59d-45ef-a8ed-91cb1bb6940a",
        "deposit T1: approving deposit of $5.00 into account A1",
    ),
    (
        Withdraw(transaction_id="T1", account_id="A1", amount=500, scheduled_time=AT),
        "5528ea57-2fa4-4ddd-ac96-3ec56ec89fce",
        "withdrawal T1: withdrawing $5.00 from account A1",
    ),
    (
        ApproveWithdrawal(transaction_id="T1", account_id="A1", amount=500),
        "1023356f-f49c-4ea1-9244-83fdb3225da9",
        "withdrawal T1: approving withdrawal of $5.00 from account A1",
    ),
    (
        DeclineWithdrawal(transaction_id="T1", account_id="A1", amount=500, reason=NSF),
        "ee1e59ff-ed96-4d66-a1aa-f0a11ca8c47d",
        "withdrawal T1: declining withdrawal of $5.00 from account A1: insufficient funds",
    ),
    (
        Transfer(
            transaction_id="T1",
            from_account_id="A1",
            to_account_id="A2",
            amount=500,
            scheduled_time=AT,
        ),
        "5ee87c7b-bde3-4b39-9f12-44968cdb9889",
        "transfer T1: transferring $5.00 from account A1 to account A2",
    ),
    (
        ApproveTransfer(transaction_id="T1", from_account_id="A1", to_account_id="A2", amount=500),
        "0d22aaa5-4449-459a-b9b1-c5fb0ce4a990",
        "transfer T1: approving transfer of $5.00 from account A1 to account A2",
    ),
    (
        DeclineTransfer(
            transaction_id="T1", from_account_id="A1", to_account_id="A2", amount=500, reason=LIMIT
        ),
        "d7d069a2-41fc-415e-91dd-7db3affa9f6d",
        "transfer T1: declining transfer of $5.00 from account A1 to account A2: "
        "daily debit limit exceeded",
    ),
    (
        MarkTransferAsFailed(
            transaction_id="T1", from_account_id="A1", to_account_id="A2", amount=500
        ),
        "b3e5f6a2-7c1d-4e8b-a9f0-3d2c1e4b5f6a",
        "transfer T1: failing transfer of $5.00 from account A1 to account A2",
    ),
    (
        CreditThirdPartyAccount(transaction_id="T1", account_id="X1", amount=500),
        "c4a2e6f1-8b3d-4e7a-9f5c-2d1b0e8a3c6f",
        "transfer T1: crediting $5.00 to third-party account X1",
    ),
    (
        CustomerAcquired(
            customer_id="C1", customer_name="Anna", account_id="A1", account_name="Savings"
        ),
        "ddf33f6c-d120-440e-b611-b86a6c3b80a6",
        "acquired customer C1 Anna",
    ),
    (
        AccountOpened(customer_id="C1", account_id="A1", account_name="Savings"),
        "75ef425c-3c42-4ead-8925-cd26cbea3139",
        "opened account A1 Savings for customer C1",
    ),
    (
        AccountCredited(transaction_id="T1", account_id="A1", transaction_type=TR, amount=500),
        "f3091f46-7d36-4e5f-b0ab-fb96029e5d7a",
        "transfer T1: credited $5.00 to account A1",
    ),
    (
        AccountDebited(
            transaction_id="T1", account_id="A1", transaction_type=TR, amount=500, scheduled_time=AT
        ),
        "76552351-0095-442e-85dd-68f8f7fae286",
        "transfer T1: debited $5.00 from account A1",
    ),
    (
        AccountDebitDeclined(
            transaction_id="T1", account_id="A1", transaction_type=WD, amount=500, reason=NSF
        ),
        "34b0c426-5467-44d8-a5db-7d09c789c930",
        "withdrawal T1: declined debit of $5.00 from account A1: insufficient funds",
    ),
    (
        DailyDebitLimitConsumed(
            transaction_id="T1",
            account_id="A1",
            debit_type=WD,
            amount=500,
            date="2001-02-03",
            total_debits_for_day=500,
            daily_limit=900000,
        ),
        "9b4a1114-817e-42d1-963d-ba6324dd07b2",
        "withdrawal T1: consumed $5.00 from 2001-02-03 daily debit limit of account A1",
    ),
    (
        DailyDebitLimitExceeded(
            transaction_id="T1",
            account_id="A1",
            debit_type=TR,
            amount=500,
            date="2001-02-03",
            total_debits_for_day=899900,
            daily_limit=900000,
        ),
        "83c5315e-440d-4d70-a6c8-41f97edc226f",
        "transfer T1: exceeded 2001-02-03 daily debit limit of account A1 by $4.00",
    ),
    (
        DepositStarted(transaction_id="T1", account_id="A1", amount=500),
        "699ae4e6-ea0a-4450-8a04-8ec5248b8042",
        "deposit T1: started deposit of $5.00 into account A1",
    ),
    (
        DepositApproved(transaction_id="T1", account_id="A1", amount=500),
        "8520d995-5c0e-4905-9bbf-99b5f8028505",
        "deposit T1: approved deposit of $5.00 into account A1",
    ),
    (
        WithdrawalStarted(transaction_id="T1", account_id="A1", amount=500, scheduled_time=AT),
        "ae327c68-3de9-4fe1-aa39-c4830200602c",
        "withdrawal T1: started withdrawal of $5.00 from account A1",
    ),
    (
        WithdrawalApproved(transaction_id="T1", account_id="A1", amount=500),
        "8551621a-ef28-42aa-b815-d5a448299d38",
        "withdrawal T1: approved withdrawal of $5.00 from account A1",
    ),
    (
        WithdrawalDeclined(transaction_id="T1", account_id="A1", amount=500, reason=LIMIT),
        "a87f5f6f-52ec-4eeb-954f-2af97a165181",
        "withdrawal T1: declined withdrawal of $5.00 from account A1: daily debit limit exceeded",
    ),
    (
        TransferStarted(
            transaction_id="T1",
            from_account_id="A1",
            to_account_id="A2",
            amount=500,
            scheduled_time=AT,
        ),
        "e5a7db39-861a-4a98-b109-a6f4187ac407",
        "transfer T1: started transfer of $5.00 from account A1 to account A2",
    ),
    (
        TransferApproved(transaction_id="T1", from_account_id="A1", to_account_id="A2", amount=500),
        "bcc989cc-4ec7-4175-84dc-24908ac82676",
        "transfer T1: approved transfer of $5.00 from account A1 to account A2",
    ),
    (
        TransferDeclined(
            transaction_id="T1", from_account_id="A1", to_account_id="A2", amount=500, reason=NSF
        ),
        "0e43679a-bf5b-4730-a4a0-543e17a67479",
        "transfer T1: declined transfer of $5.00 from account A1 to account A2: insufficient funds",
    ),
    (
        TransferFailed(transaction_id="T1", from_account_id="A1", to_account_id="A2", amount=500),
        "c6d8e9a1-2b4f-5e7c-8d0a-1f3e5c7b9d2e",
        "transfer T1: failed transfer of $5.00 from account A1 to account A2",
    ),
    (
        ThirdPartyAccountCredited(transaction_id="T1", account_id="X1", amount=500),
        "a7f3c8e2-5d1b-4a9e-8c6f-3b2d0e7a1c5d",
        "transfer T1: credited $5.00 to third-party account X1",
    ),
    (
        ThirdPartyAccountCreditFailed(transaction_id="T1", account_id="X1", amount=500),
        "e9b4d7f0-2c6a-4e8b-9d3f-1a5c0b8e4d2a",
        "transfer T1: failed to credit $5.00 to third-party account X1",
    ),
    (
        TransferReadyToProceed(transaction_id="T1"),
        "b5474f89-e985-4661-b85b-645347a4a645",
        "transfer T1 is ready to proceed",
    ),
]

IDS = [type(m).__name__ for m, _, _ in EXAMPLES]


def test_every_registered_bank_message_has_an_example() -> None:
    """The table above covers all 34 bank message types."""
    registered = {t.cls for t in dogma.registry if t.cls.__module__.startswith("bank.")}

    assert registered == {type(m) for m, _, _ in EXAMPLES}
    assert len(registered) == 34


@pytest.mark.parametrize(("message", "type_id", "description"), EXAMPLES, ids=IDS)
def test_type_id_matches_the_go_example(
    message: dogma.Message, type_id: str, description: str
) -> None:
    entry = dogma.registry.of(message)

    assert entry is not None
    assert entry.id == type_id


@pytest.mark.parametrize(("message", "type_id", "description"), EXAMPLES, ids=IDS)
def test_description(message: dogma.Message, type_id: str, description: str) -> None:
    assert message.message_description() == description


@pytest.mark.parametrize(("message", "type_id", "description"), EXAMPLES, ids=IDS)
def test_valid_example_validates_and_round_trips(
    message: dogma.Message, type_id: str, description: str
) -> None:
    message.validate(NEW)

    assert type(message).unmarshal_binary(message.marshal_binary()) == message


def _invalid_cases() -> list[tuple[dogma.Message, str]]:
    """Each example with each rule broken in turn, and the error expected."""
    cases: list[tuple[dogma.Message, str]] = []
    for example, _, _ in EXAMPLES:
        message: Any = example  # an attrs class, which attrs.evolve needs to know
        name = type(message).__name__
        fields = attrs.fields_dict(type(message))
        for field in fields:
            label = field.replace("_id", " ID").replace("_", " ")
            if field in ("customer_name", "account_name") or field.endswith("_id"):
                cases.append(
                    (attrs.evolve(message, **{field: ""}), f"{name} must not have an empty {label}")
                )
        if "amount" in fields:
            for bad in (0, -1):
                cases.append(
                    (attrs.evolve(message, amount=bad), f"{name} must have a positive amount")
                )
        if "scheduled_time" in fields:
            cases.append(
                (
                    attrs.evolve(message, scheduled_time=datetime(2001, 2, 3)),
                    f"{name} must have a timezone-aware scheduled time",
                )
            )
        if "transaction_type" in fields:
            cases.append(
                (
                    attrs.evolve(message, transaction_type="refund"),
                    "invalid transaction type: refund",
                )
            )
        if "reason" in fields:
            cases.append(
                (attrs.evolve(message, reason="bored"), "invalid debit failure reason: bored")
            )
        if "debit_type" in fields:
            cases.append(
                (
                    attrs.evolve(message, debit_type=DEP),
                    f"{name} must have a debit type, not deposit",
                )
            )
        if "date" in fields:
            for bad_date in ("", "2001-2-3", "2001-02-30", "03/02/2001"):
                cases.append(
                    (
                        attrs.evolve(message, date=bad_date),
                        f"{name} must have a YYYY-MM-DD date, not {bad_date!r}",
                    )
                )
        if "from_account_id" in fields and name not in (
            "ApproveTransfer",
            "DeclineTransfer",
            "MarkTransferAsFailed",
        ):
            cases.append(
                (
                    attrs.evolve(message, to_account_id=message.from_account_id),
                    f"{name} must not transfer to the account it transfers from",
                )
            )
    return cases


INVALID = _invalid_cases()


@pytest.mark.parametrize(
    ("message", "error"), INVALID, ids=[f"{type(m).__name__}-{e}" for m, e in INVALID]
)
def test_invalid_messages_are_refused(message: dogma.Message, error: str) -> None:
    with pytest.raises(dogma.ValidationError, match=f"^{re.escape(error)}$"):
        message.validate(NEW)


def _badly_typed_cases() -> list[tuple[dogma.Message, str, object]]:
    """Each example with each int or str field given a value of another type."""
    cases: list[tuple[dogma.Message, str, object]] = []
    for example, _, _ in EXAMPLES:
        message: Any = example
        hints = typing.get_type_hints(type(message))
        for field in attrs.fields_dict(type(message)):
            # bool is an int subclass and 1.5 formats badly as cents; a numeric
            # string used to fail comparing with 1 (TypeError).
            if hints[field] is int:
                bad_values: tuple[object, ...] = ("5", 1.5, True, None)
            elif hints[field] is str:
                bad_values = (5, None, b"A1")
            else:
                continue
            for bad in bad_values:
                cases.append((attrs.evolve(message, **{field: bad}), field, bad))
    return cases


BADLY_TYPED = _badly_typed_cases()


@pytest.mark.parametrize(
    ("message", "field", "value"),
    BADLY_TYPED,
    ids=[f"{type(m).__name__}-{f}={v!r}" for m, f, v in BADLY_TYPED],
)
def test_badly_typed_fields_are_refused(message: dogma.Message, field: str, value: object) -> None:
    """attrs does not check annotations: validate() refuses what the codec could not store."""
    with pytest.raises(dogma.ValidationError, match=re.escape(repr(value))):
        message.validate(NEW)


@pytest.mark.parametrize(
    ("total", "limit", "valid"),
    [(1, 0, True), (0, 0, False), (1, -1, False)],
)
def test_daily_debit_limit_consumed_totals(total: int, limit: int, valid: bool) -> None:
    """Consumed needs a total of at least 1 (it includes this debit) and a limit >= 0."""
    example: Any = EXAMPLES[20][0]
    message = attrs.evolve(example, total_debits_for_day=total, daily_limit=limit)

    if valid:
        message.validate(NEW)
    else:
        with pytest.raises(dogma.ValidationError, match="must have a"):
            message.validate(NEW)


@pytest.mark.parametrize(("total", "valid"), [(0, True), (-1, False)])
def test_daily_debit_limit_exceeded_total_may_be_zero(total: int, valid: bool) -> None:
    """Exceeded reports the total *before* the refused debit, so 0 is fine."""
    example: Any = EXAMPLES[21][0]
    message = attrs.evolve(example, total_debits_for_day=total)

    if valid:
        message.validate(NEW)
    else:
        with pytest.raises(
            dogma.ValidationError,
            match=r"^DailyDebitLimitExceeded must have a total debits for day of at least 0$",
        ):
            message.validate(NEW)


def test_approve_transfer_does_not_check_accounts_differ() -> None:
    """Like the Go example, only the Transfer* events and Transfer check from != to."""
    ApproveTransfer(transaction_id="T", from_account_id="A", to_account_id="A", amount=1).validate(
        NEW
    )


def test_json_encoding_uses_lowercase_enum_values_and_utc_times() -> None:
    message = DebitAccount(
        transaction_id="T1",
        account_id="A1",
        transaction_type=WD,
        amount=500,
        scheduled_time=datetime(2001, 2, 3, 10, tzinfo=timezone(timedelta(hours=10))),
    )

    data = message.marshal_binary()

    assert b'"withdrawal"' in data
    assert DebitAccount.unmarshal_binary(data).scheduled_time == AT


def test_json_field_names_are_snake_case_unlike_the_go_example() -> None:
    """Only type IDs are shared with the Go bank, which writes ``{"TransactionID":…}``."""
    message = Deposit(transaction_id="T1", account_id="A1", amount=500)

    assert message.marshal_binary() == b'{"transaction_id":"T1","account_id":"A1","amount":500}'


@pytest.mark.parametrize(
    ("cents", "text"),
    [
        (0, "$0.00"),
        (5, "$0.05"),
        (500, "$5.00"),
        (900000, "$9000.00"),
        (-1, "-$0.01"),
        (-123456, "-$1234.56"),
    ],
)
def test_format_amount(cents: int, text: str) -> None:
    assert format_amount(cents) == text


def test_daily_debit_limit_date_is_the_utc_day() -> None:
    local = datetime(2001, 2, 4, 9, 0, tzinfo=timezone(timedelta(hours=10)))

    assert daily_debit_limit_date(local) == "2001-02-03"


def test_daily_debit_limit_date_refuses_naive_times() -> None:
    with pytest.raises(ValueError, match=r"^naive datetime 2001-02-03T00:00:00 has no timezone"):
        daily_debit_limit_date(datetime(2001, 2, 3))


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("2001-02-03", True),
        ("2000-02-29", True),
        ("2001-02-29", False),
        ("2001-2-3", False),
        ("20010203", False),
        ("", False),
        ("2001-02-03T00:00", False),
        ("٢٠٠١-٠٢-٠٣", False),
    ],
)
def test_is_valid_date(text: str, valid: bool) -> None:
    assert is_valid_date(text) is valid


def test_transaction_types() -> None:
    assert [t.value for t in TransactionType] == ["deposit", "withdrawal", "transfer"]
    assert [t.is_debit for t in TransactionType] == [False, True, True]
    assert [r.value for r in DebitFailureReason] == [
        "insufficient funds",
        "daily debit limit exceeded",
    ]
