"""The daily-debit-limit aggregate: caps what one account may debit on one day."""

from __future__ import annotations

import attrs

import dogma

from ..messages import (
    ConsumeDailyDebitLimit,
    DailyDebitLimitConsumed,
    DailyDebitLimitExceeded,
    format_amount,
)

__all__ = ["MAXIMUM_DAILY_DEBIT_LIMIT", "DailyDebitLimitHandler", "DailyDebitLimitRoot"]

MAXIMUM_DAILY_DEBIT_LIMIT = 900_000
"""The most, in cents, an account may debit on one calendar day (inclusive): $9000.00."""


@attrs.define
class DailyDebitLimitRoot(dogma.NoSnapshotBehavior):
    """One account's debits on one day, in cents."""

    total_debits_for_day: int = 0

    def apply_event(self, event: dogma.Event) -> None:
        """Apply a limit event; exceeding the limit changes nothing."""
        match event:
            case DailyDebitLimitConsumed():
                self.total_debits_for_day = event.total_debits_for_day

    def aggregate_instance_description(self) -> str:
        """``"{total}/{limit}"``."""
        return (
            f"{format_amount(self.total_debits_for_day)}/{format_amount(MAXIMUM_DAILY_DEBIT_LIMIT)}"
        )


class DailyDebitLimitHandler:
    """Handles debit-limit commands; one instance per ``"YYYY-MM-DD:account ID"``."""

    def configure(self, c: dogma.AggregateConfigurer) -> None:
        """Declare the daily-debit-limit aggregate's identity and routes."""
        c.identity("daily-debit-limit", "238c5a7b-b51d-42d8-ac8d-a8c81b780230")
        c.routes(
            dogma.handles_command(ConsumeDailyDebitLimit),
            dogma.records_event(DailyDebitLimitConsumed),
            dogma.records_event(DailyDebitLimitExceeded),
        )

    def new(self) -> DailyDebitLimitRoot:
        """A day with no debits yet."""
        return DailyDebitLimitRoot()

    def route_command_to_instance(self, command: dogma.Command) -> str:
        """Route by date and account: ``"2001-02-03:A001"``."""
        match command:
            case ConsumeDailyDebitLimit():
                return f"{command.date}:{command.account_id}"
            case _:
                raise dogma.UnexpectedMessage(command)

    def handle_command(
        self,
        root: DailyDebitLimitRoot,
        scope: dogma.AggregateCommandScope[DailyDebitLimitRoot],
        command: dogma.Command,
    ) -> None:
        """Consume the limit, or record that the debit would exceed it."""
        match command:
            case ConsumeDailyDebitLimit():
                total = root.total_debits_for_day + command.amount
                if total > MAXIMUM_DAILY_DEBIT_LIMIT:
                    # The exceeded event reports the total *before* this debit.
                    scope.record_event(
                        DailyDebitLimitExceeded(
                            transaction_id=command.transaction_id,
                            account_id=command.account_id,
                            debit_type=command.debit_type,
                            amount=command.amount,
                            date=command.date,
                            total_debits_for_day=root.total_debits_for_day,
                            daily_limit=MAXIMUM_DAILY_DEBIT_LIMIT,
                        )
                    )
                else:
                    scope.record_event(
                        DailyDebitLimitConsumed(
                            transaction_id=command.transaction_id,
                            account_id=command.account_id,
                            debit_type=command.debit_type,
                            amount=command.amount,
                            date=command.date,
                            total_debits_for_day=total,
                            daily_limit=MAXIMUM_DAILY_DEBIT_LIMIT,
                        )
                    )
            case _:
                raise dogma.UnexpectedMessage(command)
