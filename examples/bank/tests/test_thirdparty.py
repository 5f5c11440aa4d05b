"""The third-party bank integration, called directly through an IntegrationScope."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

import dogma
from bank.messages import (
    CreditThirdPartyAccount,
    Deposit,
    ThirdPartyAccountCredited,
    ThirdPartyAccountCreditFailed,
)
from bank.testing import IntegrationScope
from bank.thirdparty import ThirdPartyBankHandler, is_known_third_party_account

NOW = datetime(2001, 2, 3, tzinfo=UTC)
PRODUCES = frozenset({ThirdPartyAccountCredited, ThirdPartyAccountCreditFailed})


async def test_numeric_accounts_are_credited() -> None:
    scope = IntegrationScope(NOW, PRODUCES)

    await ThirdPartyBankHandler().handle_command(
        scope, CreditThirdPartyAccount(transaction_id="T001", account_id="100001", amount=100)
    )

    assert scope.recorded == [
        ThirdPartyAccountCredited(transaction_id="T001", account_id="100001", amount=100)
    ]
    assert scope.logs == ["crediting third-party account 100001 with $1.00 (transaction T001)"]


async def test_other_accounts_are_refused() -> None:
    scope = IntegrationScope(NOW, PRODUCES)

    await ThirdPartyBankHandler().handle_command(
        scope, CreditThirdPartyAccount(transaction_id="T001", account_id="EXT001", amount=100)
    )

    assert scope.recorded == [
        ThirdPartyAccountCreditFailed(transaction_id="T001", account_id="EXT001", amount=100)
    ]
    assert scope.logs == [
        "crediting third-party account EXT001 with $1.00 (transaction T001)",
        "third-party bank rejected the credit: account EXT001 not found",
    ]


async def test_unexpected_commands_are_refused() -> None:
    with pytest.raises(dogma.UnexpectedMessage):
        await ThirdPartyBankHandler().handle_command(
            IntegrationScope(NOW), Deposit(transaction_id="T", account_id="A", amount=1)
        )


@pytest.mark.parametrize(
    ("account_id", "known"),
    [
        ("0", True),
        ("100001", True),
        ("18446744073709551615", True),  # 2**64 - 1
        ("18446744073709551616", False),  # 2**64: ParseUint overflows
        ("", False),
        ("+1", False),
        ("-1", False),
        (" 1", False),
        ("1_000", False),
        ("١٢٣", False),  # Arabic-Indic digits: str.isdecimal() would accept them
        ("EXT001", False),
    ],
)
def test_known_accounts_are_unsigned_64_bit_decimals(account_id: str, known: bool) -> None:
    assert is_known_third_party_account(account_id) is known
