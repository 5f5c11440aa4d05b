"""The collector settings of a node process (``runkit run``)."""

from __future__ import annotations

import gc
import io
from typing import Any

import anyio
import pytest

from runkit import _run
from runkit._collector import NODE_GC_THRESHOLD, tuned_collector


def test_the_node_collector_is_tuned_inside_and_restored_after() -> None:
    before = gc.get_threshold()
    with tuned_collector():
        assert gc.get_threshold() == (NODE_GC_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > 0  # the start-up heap is frozen
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


class _Engine:
    applications = ()

    class settings:
        node_id = "n"


def test_runkit_run_runs_the_node_with_the_tuned_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    during: list[tuple[int, int, int]] = []

    def run(func: Any, *, backend: str) -> None:
        during.append(gc.get_threshold())

    monkeypatch.setattr(_run, "_engine", lambda *args: (_Engine(), "memory:///x"))
    monkeypatch.setattr(anyio, "run", run)
    before = gc.get_threshold()
    assert _run.run_node("app:app", out=io.StringIO()) == 0
    assert during == [(NODE_GC_THRESHOLD, *before[1:])]
    assert gc.get_threshold() == before
