"""The Go example's scenario tests (reference §4.9), run through the in-process dispatcher.

As in testkit, integrations and projections are disabled unless a test enables
them, and the clock is the real time unless a test starts it elsewhere, so
transactions scheduled for 2001-02-03 are already due.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest

import dogma
from bank.messages import (
    AccountCredited,
    AccountOpened,
    CustomerAcquired,
    DebitFailureReason,
    Deposit,
    DepositApproved,
    OpenAccount,
    OpenAccountForNewCustomer,
    ThirdPartyAccountCredited,
    ThirdPartyAccountCreditFailed,
    TransactionType,
    Transfer,
    TransferApproved,
    TransferDeclined,
    TransferFailed,
    Withdraw,
    WithdrawalApproved,
    WithdrawalDeclined,
)
from bank.testing import Dispatcher

Begin = Callable[..., Dispatcher]
DAY = datetime(2001, 2, 3, tzinfo=UTC)
NEXT_DAY = datetime(2001, 2, 4, tzinfo=UTC)
NSF = DebitFailureReason.INSUFFICIENT_FUNDS
LIMIT = DebitFailureReason.DAILY_DEBIT_LIMIT_EXCEEDED


async def open_account(d: Dispatcher, account_id: str = "A001") -> None:
    await d.execute_command(
        OpenAccount(customer_id="C001", account_id=account_id, account_name="Anna Smith")
    )


async def deposit(d: Dispatcher, amount: int, account_id: str = "A001", tx: str = "D001") -> None:
    events = await d.execute_command(
        Deposit(transaction_id=tx, account_id=account_id, amount=amount)
    )
    assert DepositApproved(transaction_id=tx, account_id=account_id, amount=amount) in events


def withdraw(tx: str, amount: int, account_id: str = "A001", at: datetime = DAY) -> Withdraw:
    return Withdraw(transaction_id=tx, account_id=account_id, amount=amount, scheduled_time=at)


class TestAccount:
    async def test_opening_an_account(self, begin: Begin) -> None:
        d = begin()

        events = await d.execute_command(
            OpenAccount(customer_id="C001", account_id="A001", account_name="Anna Smith")
        )

        assert events == [
            AccountOpened(customer_id="C001", account_id="A001", account_name="Anna Smith")
        ]

    async def test_opening_an_open_account_records_nothing(self, begin: Begin) -> None:
        d = begin()
        await open_account(d)

        assert (
            await d.execute_command(
                OpenAccount(customer_id="C001", account_id="A001", account_name="Anna Smith")
            )
            == []
        )


class TestCustomer:
    COMMAND = OpenAccountForNewCustomer(
        customer_id="C001", customer_name="Bob Jones", account_id="A001", account_name="Bob Jones"
    )

    async def test_acquiring_a_customer_opens_their_account(self, begin: Begin) -> None:
        d = begin()

        events = await d.execute_command(self.COMMAND)

        assert events == [
            CustomerAcquired(
                customer_id="C001",
                customer_name="Bob Jones",
                account_id="A001",
                account_name="Bob Jones",
            ),
            AccountOpened(customer_id="C001", account_id="A001", account_name="Bob Jones"),
        ]

    async def test_acquiring_a_customer_twice_records_nothing(self, begin: Begin) -> None:
        d = begin()
        await d.execute_command(self.COMMAND)

        assert await d.execute_command(self.COMMAND) == []


class TestDeposit:
    async def test_deposit_then_withdraw(self, begin: Begin) -> None:
        d = begin()
        await open_account(d)

        assert DepositApproved(transaction_id="T001", account_id="A001", amount=500) in (
            await d.execute_command(Deposit(transaction_id="T001", account_id="A001", amount=500))
        )
        assert WithdrawalApproved(transaction_id="W001", account_id="A001", amount=100) in (
            await d.execute_command(withdraw("W001", 100))
        )


class TestWithdrawal:
    async def test_withdrawing_the_whole_balance_is_allowed(self, begin: Begin) -> None:
        d = begin()
        await open_account(d)
        await deposit(d, 500)

        events = await d.execute_command(withdraw("T002", 500))

        assert WithdrawalApproved(transaction_id="T002", account_id="A001", amount=500) in events

    async def test_withdrawing_more_than_the_balance_is_declined(self, begin: Begin) -> None:
        d = begin()
        await open_account(d)

        events = await d.execute_command(withdraw("T001", 500))

        assert (
            WithdrawalDeclined(transaction_id="T001", account_id="A001", amount=500, reason=NSF)
            in events
        )

    async def test_withdrawing_within_the_limit(self, begin: Begin) -> None:
        d = begin()
        await open_account(d)
        await deposit(d, 910000)

        assert WithdrawalApproved(transaction_id="T002", account_id="A001", amount=500) in (
            await d.execute_command(withdraw("T002", 500))
        )

    async def test_the_limit_is_per_account(self, begin: Begin) -> None:
        d = begin()
        for account in ("A001", "A002"):
            await open_account(d, account)
            await deposit(d, 910000, account, tx=f"D-{account}")

        for account in ("A001", "A002"):
            assert WithdrawalApproved(
                transaction_id=f"W-{account}", account_id=account, amount=900000
            ) in (await d.execute_command(withdraw(f"W-{account}", 900000, account)))

    async def test_the_limit_is_per_day(self, begin: Begin) -> None:
        d = begin()
        await open_account(d)
        await deposit(d, 1800000)
        assert WithdrawalApproved(transaction_id="T002", account_id="A001", amount=900000) in (
            await d.execute_command(withdraw("T002", 900000))
        )

        assert WithdrawalApproved(transaction_id="T003", account_id="A001", amount=500) in (
            await d.execute_command(withdraw("T003", 500, at=NEXT_DAY))
        )

    async def test_the_limit_is_cumulative(self, begin: Begin) -> None:
        d = begin()
        await open_account(d)
        await deposit(d, 900001)
        for tx in ("T001", "T002"):
            assert WithdrawalApproved(transaction_id=tx, account_id="A001", amount=450000) in (
                await d.execute_command(withdraw(tx, 450000))
            )

        events = await d.execute_command(withdraw("T003", 1))

        # The cent is debited (balance 1 -> 0), the limit is exceeded, it is refunded.
        names = [type(e).__name__ for e in events]
        assert names == [
            "WithdrawalStarted",
            "AccountDebited",
            "DailyDebitLimitExceeded",
            "AccountCredited",
            "WithdrawalDeclined",
        ]
        assert events[-1] == WithdrawalDeclined(
            transaction_id="T003", account_id="A001", amount=1, reason=LIMIT
        )

    async def test_withdrawing_more_than_the_limit_is_declined(self, begin: Begin) -> None:
        d = begin()
        await open_account(d)
        await deposit(d, 910000)

        assert WithdrawalDeclined(
            transaction_id="T002", account_id="A001", amount=900001, reason=LIMIT
        ) in (await d.execute_command(withdraw("T002", 900001)))


# In-house (to A002) and third-party (to "100001", integration enabled) variants.
DESTINATIONS = [
    pytest.param(("A002", False, ()), id="in-house"),
    pytest.param(("100001", True, ("third-party-bank",)), id="third-party"),
]


async def prepare(d: Dispatcher, amount: int) -> None:
    await open_account(d, "A001")
    await open_account(d, "A002")
    await deposit(d, amount)


def transfer(
    tx: str, amount: int, to: str = "A002", *, third_party: bool = False, at: datetime = DAY
) -> Transfer:
    return Transfer(
        transaction_id=tx,
        from_account_id="A001",
        to_account_id=to,
        amount=amount,
        scheduled_time=at,
        to_third_party_bank=third_party,
    )


class TestTransfer:
    @pytest.mark.parametrize("destination", DESTINATIONS)
    async def test_transfer(
        self, begin: Begin, destination: tuple[str, bool, tuple[str, ...]]
    ) -> None:
        to, third_party, enable = destination
        d = begin(*enable)
        await prepare(d, 500)

        events = await d.execute_command(transfer("T001", 100, to, third_party=third_party))

        assert (
            TransferApproved(
                transaction_id="T001", from_account_id="A001", to_account_id=to, amount=100
            )
            in events
        )

    @pytest.mark.parametrize("destination", DESTINATIONS)
    async def test_transfer_within_the_limit(
        self, begin: Begin, destination: tuple[str, bool, tuple[str, ...]]
    ) -> None:
        to, third_party, enable = destination
        d = begin(*enable)
        await prepare(d, 910000)

        events = await d.execute_command(transfer("T002", 500, to, third_party=third_party))

        assert (
            TransferApproved(
                transaction_id="T002", from_account_id="A001", to_account_id=to, amount=500
            )
            in events
        )

    @pytest.mark.parametrize("destination", DESTINATIONS)
    async def test_future_dated_transfer_waits_for_its_time(
        self, begin: Begin, destination: tuple[str, bool, tuple[str, ...]]
    ) -> None:
        to, third_party, enable = destination
        d = begin(*enable, now=datetime(2001, 2, 3, 11, 22, 33, tzinfo=UTC))
        await prepare(d, 500)
        approved = TransferApproved(
            transaction_id="T001", from_account_id="A001", to_account_id=to, amount=100
        )

        events = await d.execute_command(
            transfer("T001", 100, to, third_party=third_party, at=NEXT_DAY)
        )

        assert approved not in events
        assert await d.advance_time(datetime(2001, 2, 3, 23, 59, 59, tzinfo=UTC)) == []
        assert approved in await d.advance_time(NEXT_DAY)

    async def test_insufficient_funds(self, begin: Begin) -> None:
        d = begin()
        await prepare(d, 500)

        events = await d.execute_command(transfer("T001", 1000))

        assert (
            TransferDeclined(
                transaction_id="T001",
                from_account_id="A001",
                to_account_id="A002",
                amount=1000,
                reason=NSF,
            )
            in events
        )
        # Nothing arrived in A002.
        assert WithdrawalDeclined(
            transaction_id="W001", account_id="A002", amount=100, reason=NSF
        ) in (await d.execute_command(withdraw("W001", 100, "A002")))

    async def test_daily_limit_exceeded(self, begin: Begin) -> None:
        d = begin()
        await prepare(d, 910000)

        events = await d.execute_command(transfer("T001", 900001))

        assert (
            TransferDeclined(
                transaction_id="T001",
                from_account_id="A001",
                to_account_id="A002",
                amount=900001,
                reason=LIMIT,
            )
            in events
        )
        assert WithdrawalDeclined(
            transaction_id="W001", account_id="A002", amount=100, reason=NSF
        ) in (await d.execute_command(withdraw("W001", 100, "A002")))

    async def test_third_party_failure_is_refunded(self, begin: Begin) -> None:
        """The integration is disabled, so the test injects the other bank's refusal."""
        d = begin()
        await prepare(d, 500)
        stalled = await d.execute_command(transfer("T001", 100, "100001", third_party=True))
        assert not any(isinstance(e, TransferApproved | TransferFailed) for e in stalled)

        events = await d.record_event(
            ThirdPartyAccountCreditFailed(transaction_id="T001", account_id="100001", amount=100)
        )

        assert (
            TransferFailed(
                transaction_id="T001", from_account_id="A001", to_account_id="100001", amount=100
            )
            in events
        )
        # The refund happened: the whole 500 can be withdrawn.
        assert WithdrawalApproved(transaction_id="W001", account_id="A001", amount=500) in (
            await d.execute_command(withdraw("W001", 500))
        )


class TestThirdPartyBank:
    async def test_known_account_is_credited(self, begin: Begin) -> None:
        d = begin("third-party-bank")
        await prepare(d, 500)

        events = await d.execute_command(transfer("T001", 100, "100001", third_party=True))

        assert (
            ThirdPartyAccountCredited(transaction_id="T001", account_id="100001", amount=100)
            in events
        )

    async def test_unknown_account_fails(self, begin: Begin) -> None:
        d = begin("third-party-bank")
        await prepare(d, 500)

        events = await d.execute_command(transfer("T001", 100, "EXT001", third_party=True))

        assert (
            ThirdPartyAccountCreditFailed(transaction_id="T001", account_id="EXT001", amount=100)
            in events
        )
        assert (
            TransferFailed(
                transaction_id="T001", from_account_id="A001", to_account_id="EXT001", amount=100
            )
            in events
        )
        # The refund is recorded after TransferFailed ended the process, which ignores it.
        assert events[-1] == AccountCredited(
            transaction_id="T001",
            account_id="A001",
            transaction_type=TransactionType.TRANSFER,
            amount=100,
        )


class TestDispatcher:
    async def test_commands_no_handler_consumes_are_refused(self, begin: Begin) -> None:
        class Stray(dogma.Command):
            """A command the bank does not handle."""

        with pytest.raises(ValueError, match=r"^no handler of the application handles Stray$"):
            await begin().execute_command(Stray())

    async def test_invalid_commands_are_refused(self, begin: Begin) -> None:
        with pytest.raises(dogma.ValidationError, match=r"^Deposit must have a positive amount$"):
            await begin().execute_command(Deposit(transaction_id="T", account_id="A", amount=0))

    def test_only_integrations_and_projections_can_be_enabled(self, begin: Begin) -> None:
        with pytest.raises(
            ValueError, match=r"^'account' is not an integration or projection of this app$"
        ):
            begin("account")

    async def test_the_clock_cannot_go_back(self, begin: Begin) -> None:
        d = begin(now=NEXT_DAY)

        with pytest.raises(ValueError, match=r"^cannot move the clock back"):
            await d.advance_time(DAY)
