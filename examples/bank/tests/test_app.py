"""The bank application's configuration, and the demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import bank
import dogma
from bank.demo import SCENARIO, main, print_read_models
from runkit.config import HandlerKind, build

# Identities kept from dogmatiq/example so persisted data stays portable.
HANDLERS = [
    (HandlerKind.AGGREGATE, "account", "fcce9a78-23a3-4211-b608-ecbe21ea446f"),
    (HandlerKind.AGGREGATE, "customer", "f30111d5-f100-4495-90ad-b09746ba8477"),
    (HandlerKind.AGGREGATE, "daily-debit-limit", "238c5a7b-b51d-42d8-ac8d-a8c81b780230"),
    (HandlerKind.AGGREGATE, "transaction", "2afe7484-8eb4-4c02-9c39-c2493e0defb0"),
    (HandlerKind.PROCESS, "deposit", "4e50b66b-b2c4-4522-bf15-39756186caee"),
    (HandlerKind.PROCESS, "open-account-for-new-customer", "89b39176-a57f-4071-afad-e0db62137fd3"),
    (HandlerKind.PROCESS, "transfer", "35afbe82-24c1-4868-a689-c2ec96c2e953"),
    (HandlerKind.PROCESS, "withdrawal", "23f70d2b-a289-4e0f-8a83-c0c6a69d11d9"),
    (HandlerKind.INTEGRATION, "third-party-bank", "f2a7e4b1-9c3d-4f8a-b6e5-1d0c2a9f7e3b"),
    (HandlerKind.PROJECTION, "customers", "70b58269-931a-46d6-b745-286a670fb6f7"),
    (HandlerKind.PROJECTION, "ledger", "a1b2c3d4-e5f6-7890-abcd-ef1234567890"),
]


def test_configuration_is_valid(app: bank.App) -> None:
    config = build(app)

    assert (config.identity.name, config.identity.key) == (
        "bank",
        "22028264-0bca-43e1-8d9d-cd094efb10b7",
    )
    assert [(h.kind, h.identity.name, h.identity.key) for h in config.handlers] == HANDLERS
    assert not any(h.disabled for h in config.handlers)
    assert {h.concurrency for h in config.handlers} == {dogma.ConcurrencyPreference.MAXIMIZE}


def test_every_message_type_is_routed(app: bank.App) -> None:
    config = build(app)
    bank_types = {t for t in dogma.registry if t.cls.__module__.startswith("bank.")}

    assert set(config.message_types()) == bank_types


def test_the_ready_instance_is_a_bank() -> None:
    assert isinstance(bank.app, bank.App)
    assert build(bank.app).identity.name == "bank"


def test_importing_dogma_domain_code_does_not_import_runkit() -> None:
    """The domain depends on dogma only; runkit is for the dispatcher and demo."""
    code = (
        "import sys, bank, bank.domain, bank.messages, bank.projections, bank.thirdparty; "
        "print(any(m == 'runkit' or m.startswith('runkit.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "False"


def test_demo_runs_every_scenario_and_prints_the_read_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "demo.sqlite3"

    assert main(["--db", str(db)]) == 0

    out = capsys.readouterr().out
    for number, step in enumerate(SCENARIO, 1):
        assert f"{number:>2}. {step.title}" in out
    assert (
        "declined transfer of $8500.00 from account 100000001 to account 100000002: "
        "daily debit limit exceeded" in out
    )
    assert "declined withdrawal of $1000.00 from account 100000003: insufficient funds" in out
    assert "failed transfer of $75.00 from account 100000001 to account ACME-42" in out
    assert "Anna Smith / Everyday  T-0004       Outgoing transfer refund" in out
    lines = out.splitlines()
    accounts = lines[lines.index("Accounts") + 3 : lines.index("Accounts") + 6]
    assert accounts == [
        "100000001  Anna Smith  Everyday  $9250.00",
        "100000002  Anna Smith  Savings      $0.00",
        "100000003  Bob Jones   Everyday   $750.00",
    ]


def test_print_read_models_of_an_empty_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    print_read_models(tmp_path / "empty.sqlite3")

    assert capsys.readouterr().out.count("(none)") == 3


def test_handlers_implement_dogma_protocols(app: bank.App) -> None:
    """mypy checks these annotations; at run time each list holds its handlers."""
    aggregates: list[dogma.AggregateMessageHandler[Any]] = [
        app.account,
        app.customer,
        app.daily_debit_limit,
        app.transaction,
    ]
    processes: list[dogma.ProcessMessageHandler[Any]] = [
        app.deposit,
        app.open_account_for_new_customer,
        app.transfer,
        app.withdrawal,
    ]
    integrations: list[dogma.IntegrationMessageHandler] = [app.third_party_bank]
    projections: list[dogma.ProjectionMessageHandler] = [app.customers, app.ledger]

    assert len(aggregates + processes + integrations + projections) == 11
