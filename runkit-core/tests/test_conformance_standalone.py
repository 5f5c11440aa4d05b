"""The conformance suites in a driver author's project, as docs/driver-guide.md describes it.

A tiny project in a temporary directory subclasses ``ConformanceSuite`` for the
memory driver and runs pytest in a subprocess, away from this repository's
configuration: no ``anyio_mode`` setting, no ``anyio_backend`` fixture of ours.
"""

from __future__ import annotations

import re
import textwrap

import pytest

pytest_plugins = ["pytester"]

_SUITE = """
from collections.abc import AsyncIterator, Callable
from typing import ClassVar

import hypothesis
import pytest

from runkit.persistence import Provider
from runkit.testing import ConformanceSuite, unique_name
from runkit_memory import MemoryProvider


class TestMyDriver(ConformanceSuite):
    hypothesis_settings: ClassVar[hypothesis.settings] = hypothesis.settings(
        max_examples=3, stateful_step_count=5, deadline=None
    )

    @pytest.fixture
    def silo(self) -> str:
        return unique_name("silo")

    @pytest.fixture
    async def provider(self, silo: str) -> AsyncIterator[Provider]:
        async with MemoryProvider(silo) as provider:
            yield provider
"""

_MAKE_PROVIDER = """
    @pytest.fixture
    def make_provider(self, silo: str) -> Callable[[], Provider]:
        return lambda: MemoryProvider(silo)
"""

_TRIO = """
import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "trio"
"""


def _outcomes(result: pytest.RunResult) -> dict[str, int]:
    outcomes = result.parseoutcomes()
    return {k: outcomes.get(k, 0) for k in ("passed", "failed", "errors", "skipped")}


def _project(pytester: pytest.Pytester, *, make_provider: bool, trio: bool = False) -> None:
    # An ini file of its own makes the temporary directory the rootdir: nothing of
    # this repository's pytest configuration (anyio_mode = "auto") applies.
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(
        test_my_driver=textwrap.dedent(_SUITE) + (_MAKE_PROVIDER if make_provider else "")
    )
    if trio:
        pytester.makeconftest(_TRIO)


def test_only_a_provider_fixture_runs_the_suite_without_anyio_mode(
    pytester: pytest.Pytester,
) -> None:
    _project(pytester, make_provider=False)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", "-v")
    outcomes = _outcomes(result)
    assert outcomes["errors"] == 0, result.stdout.str()
    assert outcomes["failed"] == 0, result.stdout.str()
    assert outcomes["passed"] > 80, outcomes
    # The tests that need a second provider skip, saying which fixture to override.
    assert outcomes["skipped"] > 0, outcomes
    skips = [line for line in result.outlines if line.startswith("SKIPPED")]
    assert skips
    for line in skips:
        assert "override the 'make_provider' fixture" in line, line
    # The atomicity races run between handles of the one provider instead.
    for race in (
        "test_journal_racing_appends_at_one_position_have_exactly_one_winner",
        "test_keyspace_racing_sets_at_one_revision_have_exactly_one_winner",
        "test_set_racing_try_add_and_try_remove_have_exactly_one_winner",
    ):
        assert re.search(rf"::{race}\S* PASSED", result.stdout.str()), race


def test_make_provider_runs_the_cross_provider_tests_too(pytester: pytest.Pytester) -> None:
    _project(pytester, make_provider=True, trio=True)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    outcomes = _outcomes(result)
    assert outcomes == {
        "passed": outcomes["passed"],
        "failed": 0,
        "errors": 0,
        "skipped": 0,
    }, result.stdout.str()
    assert outcomes["passed"] > 100, outcomes
    # The project's anyio_backend fixture (trio) replaces anyio's: one run per test.
    assert "test_journal_writes_are_visible_to_other_provider PASSED" in result.stdout.str()
