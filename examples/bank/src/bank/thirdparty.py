"""The third-party bank integration: a simulated external bank."""

from __future__ import annotations

import re

import dogma

from .messages import (
    CreditThirdPartyAccount,
    ThirdPartyAccountCredited,
    ThirdPartyAccountCreditFailed,
    format_amount,
)

__all__ = ["ThirdPartyBankHandler", "is_known_third_party_account"]

_DIGITS = re.compile(r"[0-9]+")


def is_known_third_party_account(account_id: str) -> bool:
    """Whether the simulated bank has ``account_id``: an unsigned 64-bit decimal number.

    Matches Go's ``strconv.ParseUint(id, 10, 64)``: ASCII digits only (no
    sign, no spaces, no other scripts' digits) and a value below 2**64.
    """
    return _DIGITS.fullmatch(account_id) is not None and int(account_id) < 2**64


class ThirdPartyBankHandler:
    """Sends money to accounts at a (simulated) third-party bank.

    Real code would call the other bank's API here, idempotently keyed by the
    transaction ID, since the engine may run this more than once.
    """

    def configure(self, c: dogma.IntegrationConfigurer) -> None:
        """Declare the integration's identity and routes."""
        c.identity("third-party-bank", "f2a7e4b1-9c3d-4f8a-b6e5-1d0c2a9f7e3b")
        c.routes(
            dogma.handles_command(CreditThirdPartyAccount),
            dogma.records_event(ThirdPartyAccountCredited),
            dogma.records_event(ThirdPartyAccountCreditFailed),
        )

    async def handle_command(
        self, scope: dogma.IntegrationCommandScope, command: dogma.Command
    ) -> None:
        """Credit the account if the other bank knows it; otherwise record the failure."""
        match command:
            case CreditThirdPartyAccount():
                scope.log(
                    "crediting third-party account %s with %s (transaction %s)",
                    command.account_id,
                    format_amount(command.amount),
                    command.transaction_id,
                )
                if is_known_third_party_account(command.account_id):
                    scope.record_event(
                        ThirdPartyAccountCredited(
                            transaction_id=command.transaction_id,
                            account_id=command.account_id,
                            amount=command.amount,
                        )
                    )
                else:
                    scope.log(
                        "third-party bank rejected the credit: account %s not found",
                        command.account_id,
                    )
                    scope.record_event(
                        ThirdPartyAccountCreditFailed(
                            transaction_id=command.transaction_id,
                            account_id=command.account_id,
                            amount=command.amount,
                        )
                    )
            case _:
                raise dogma.UnexpectedMessage(command)
