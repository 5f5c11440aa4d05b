"""``runkit.testing.moto.MotoServer`` start-up, without moto: a stand-in child process."""

from __future__ import annotations

import stat
import sys
import time
from pathlib import Path

import pytest

from runkit.testing.moto import MotoServer


def _fake_python(tmp_path: Path, body: str) -> str:
    """An executable that ignores its arguments (``-m runkit.testing._moto_server``)."""
    script = tmp_path / "fake-python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script stands in for Python")
def test_a_server_that_never_announces_its_port_fails_after_the_start_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", _fake_python(tmp_path, "exec sleep 60"))
    server = MotoServer(start_timeout=0.5)
    began = time.monotonic()
    with pytest.raises(RuntimeError, match=r"^moto server did not start within 0.5 s$"):
        server.start()
    assert time.monotonic() - began < 10
    server.stop()  # already stopped: harmless


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script stands in for Python")
def test_a_server_that_exits_at_once_fails_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", _fake_python(tmp_path, "exit 1"))
    with pytest.raises(RuntimeError, match=r"^moto server failed to start"):
        MotoServer(start_timeout=30).start()


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script stands in for Python")
def test_the_announced_port_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", _fake_python(tmp_path, "echo 4567; exec sleep 60"))
    with MotoServer() as server:
        assert server.endpoint == "http://127.0.0.1:4567"


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_start_timeout_must_be_positive(timeout: float) -> None:
    with pytest.raises(ValueError, match="start_timeout must be positive"):
        MotoServer(start_timeout=timeout)
