"""``bank-demo``: the scenario through ``runkit.Engine`` (the default) or the dispatcher.

``test_app.py`` checks the default run's output; these check the options and
what happens when a step's expected outcome does not happen.
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import pytest

from bank import App
from bank.demo import SCENARIO, Step, StepFailed, main, run_on_engine
from bank.messages import (
    AccountOpened,
    DebitFailureReason,
    Deposit,
    DepositApproved,
    OpenAccount,
    Withdraw,
    WithdrawalApproved,
    WithdrawalDeclined,
)

BALANCES = [
    "100000001  Anna Smith  Everyday  $9250.00",
    "100000002  Anna Smith  Savings      $0.00",
    "100000003  Bob Jones   Everyday   $750.00",
]


def accounts_table(out: str) -> list[str]:
    lines = out.splitlines()
    start = lines.index("Accounts") + 3
    return lines[start : start + 3]


@pytest.mark.parametrize("options", [["--backend", "trio"], ["--dispatcher"]])
def test_every_way_of_running_gives_the_same_balances(
    options: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--db", str(tmp_path / "demo.sqlite3"), *options]) == 0

    out = capsys.readouterr().out
    assert accounts_table(out) == BALANCES
    assert f"{len(SCENARIO)} steps done" in out


def test_verbose_prints_every_event_of_a_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--db", str(tmp_path / "demo.sqlite3"), "--verbose"]) == 0

    out = capsys.readouterr().out
    # Not only the outcome: the steps in between too.
    assert "deposit D-0001: started deposit of $10000.00 into account 100000001" in out
    assert "transfer T-0004: failed to credit $75.00 to third-party account ACME-42" in out


def test_a_step_that_does_not_happen_fails_the_demo_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"memory:///bank-demo-test-{uuid.uuid4()}"
    assert main(["--db", str(tmp_path / "first.sqlite3"), "--persistence", url]) == 0
    capsys.readouterr()

    # Again in the same silo: the customer exists, so the first step records nothing.
    status = main(
        ["--db", str(tmp_path / "again.sqlite3"), "--persistence", url, "--timeout", "30"]
    )

    assert status == 1
    err = capsys.readouterr().err
    # The engine tells at once that the outcome can no longer happen: the
    # command was handled and recorded nothing (no waiting for the timeout).
    assert err.startswith("bank-demo: Anna Smith joins the bank: cannot complete")
    assert "still waiting for acquired customer" in err


async def test_an_unexpected_outcome_fails_the_step_at_once(tmp_path: Path) -> None:
    app = App(tmp_path / "read-models.sqlite3")
    steps = (
        Step(
            "open",
            OpenAccount(customer_id="C1", account_id="A1", account_name="Main"),
            (AccountOpened(customer_id="C1", account_id="A1", account_name="Main"),),
        ),
        Step(
            "deposit",
            Deposit(transaction_id="D1", account_id="A1", amount=100),
            (DepositApproved(transaction_id="D1", account_id="A1", amount=100),),
        ),
        Step(
            "withdraw more than the balance, expecting approval",
            Withdraw(
                transaction_id="W1",
                account_id="A1",
                amount=500,
                scheduled_time=SCENARIO[5].command.scheduled_time,  # type: ignore[attr-defined]
            ),
            (WithdrawalApproved(transaction_id="W1", account_id="A1", amount=500),),
        ),
    )

    # A generous timeout: the failure must come from the declined outcome, not the clock.
    with pytest.raises(StepFailed) as failed:
        await run_on_engine(app, steps, out=io.StringIO(), timeout=60)

    assert str(failed.value) == (
        "withdraw more than the balance, expecting approval: expected withdrawal W1: "
        "approved withdrawal of $5.00 from account A1, but the engine recorded: "
        + WithdrawalDeclined(
            transaction_id="W1",
            account_id="A1",
            amount=500,
            reason=DebitFailureReason.INSUFFICIENT_FUNDS,
        ).message_description()
    )


def test_a_persistence_url_it_cannot_use_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--persistence", "mysql://db/bank"])
    assert info.value.code == 2
    assert "--persistence: no persistence driver handles 'mysql'" in capsys.readouterr().err
