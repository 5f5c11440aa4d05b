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
