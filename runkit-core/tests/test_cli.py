"""The runkit CLI: env and drivers (run and poison are tested with the engine)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from runkit.cli import main


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = main(list(argv), out=out)
    return status, out.getvalue()


def test_env_documents_every_variable_and_says_valid() -> None:
    status, text = run("env")
    assert status == 0
    for name in ("DOGMA_SITE_NAME", "DOGMA_NODE_ID", "DOGMA_PERSISTENCE_URL"):
        assert name in text
    assert "DOGMA_NODE_ID=(unset)" in text
    assert text.rstrip().endswith("The environment is valid.")


def test_env_reports_invalid_variables_and_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOGMA_NODE_ID", "nope")
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "postgresql://bob:hunter2@db/app")
    status, text = run("env")
    assert status == 2
    assert "INVALID: 1 invalid environment variable(s)" in text
    assert "DOGMA_NODE_ID='nope'" in text
    assert "DOGMA_PERSISTENCE_URL=postgresql://bob:***@db/app" in text
    assert "hunter2" not in text


def test_drivers_lists_installed_schemes() -> None:
    status, text = run("drivers")
    assert status == 0
    assert text.splitlines()[0].split() == ["plugin", "module", "schemes"]
    assert "memory://" in text
    assert "postgres://, postgresql://" in text


def test_bad_app_spec_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    status, _ = run("poison", "list", "no-colon")
    assert status == 2
    assert "'no-colon' is not MODULE:ATTR" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runkit.cli", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    for command in ("env", "drivers", "run", "poison"):
        assert command in result.stdout


def test_run_uses_memory_when_unset_and_stops_gracefully_on_sigint(tmp_path: object) -> None:
    import os
    import signal

    env = {**os.environ, "BANK_READ_DB": str(tmp_path) + "/bank.sqlite3"}
    env = {k: v for k, v in env.items() if not k.startswith("DOGMA_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runkit.cli", "run", "bank:app"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("DOGMA_PERSISTENCE_URL is not set: using memory:///runkit")
        assert proc.stdout.readline().startswith("starting node ")
        assert "running bank on memory:///runkit;" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "received SIGINT: stopping (finishing in-flight work)" in out
    assert out.rstrip().endswith("stopped")


def test_run_rejects_objects_that_are_not_applications(capsys: pytest.CaptureFixture[str]) -> None:
    status, _ = run("run", "runkit.cli:CLIError")
    assert status == 2
    assert "is not a Dogma application" in capsys.readouterr().err


def test_poison_needs_the_nodes_store(capsys: pytest.CaptureFixture[str]) -> None:
    status, _ = run("poison", "list", "bank:app")
    assert status == 2
    assert "set DOGMA_PERSISTENCE_URL" in capsys.readouterr().err


def test_poison_refuses_a_store_the_app_never_ran_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "memory:///never-ran")
    status, _ = run("poison", "list", "bank:app")
    assert status == 2
    assert "has never run on this store" in capsys.readouterr().err


def test_nodes_lists_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    import anyio

    from runkit.engine.membership import Membership
    from runkit.engine.settings import EngineSettings
    from runkit_memory import MemoryProvider

    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "memory:///cli-nodes")
    settings = EngineSettings(advertise_address="node-1.internal:7000")

    async def heartbeat_once() -> None:
        provider = MemoryProvider("cli-nodes")
        membership = Membership(provider, settings)
        async with anyio.create_task_group() as tg:
            await tg.start(membership.run)
            status, text = await anyio.to_thread.run_sync(lambda: run("nodes"))
            assert status == 0
            assert str(settings.node_id) in text
            assert "live" in text
            assert "node-1.internal:7000" in text
            assert text.rstrip().endswith("1 live node(s), 0 expired")
            tg.cancel_scope.cancel()

    anyio.run(heartbeat_once)


def test_nodes_on_an_empty_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "memory:///cli-no-nodes")
    status, text = run("nodes")
    assert status == 0
    assert text == "no nodes have heartbeat records in this store\n"
