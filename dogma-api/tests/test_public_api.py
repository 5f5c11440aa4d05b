"""The package's public surface and its layering."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
import typing

import attrs
import pytest

import dogma


def test_all_is_sorted_and_unique() -> None:
    assert list(dogma.__all__) == sorted(set(dogma.__all__))


@pytest.mark.parametrize("name", dogma.__all__)
def test_every_public_name_exists_and_lives_in_dogma(name: str) -> None:
    obj = getattr(dogma, name)
    if isinstance(obj, type | types.FunctionType):
        assert obj.__module__ == "dogma", f"{name}.__module__ is {obj.__module__}"
        assert obj.__doc__, f"{name} has no docstring"


def test_no_other_public_names_are_exported() -> None:
    public = {
        name
        for name, value in vars(dogma).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(dogma.__all__)


def test_contract_names_are_present() -> None:
    # The names api.md section 2 fixes.
    expected = {
        "Command", "Event", "Deadline", "register_command", "register_event",
        "register_deadline", "registry", "MessageTypeRegistry", "via_aggregate",
        "via_process", "via_integration", "via_projection", "handles_command",
        "records_event", "handles_event", "executes_command", "schedules_deadline",
        "ConcurrencyPreference", "StatelessProcessBehavior", "StatelessProcessRoot",
        "NoDeadlineMessagesBehavior", "NoSnapshotBehavior", "NoCompactBehavior",
        "NoResetBehavior", "CommandExecutor", "EventObserver", "observe", "ValidationError",
        "UnexpectedMessage", "NotSupported", "EventObserverNotSatisfied",
    }  # fmt: skip
    assert expected <= set(dogma.__all__)


def test_importing_dogma_imports_no_engine_or_async_library() -> None:
    code = textwrap.dedent(
        """
        import sys
        import dogma
        loaded = sorted(
            name for name in ("runkit", "anyio", "trio", "asyncio")
            if name in sys.modules
        )
        print(",".join(loaded))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("name", [n for n in dogma.__all__ if attrs.has(getattr(dogma, n))])
def test_public_attrs_classes_have_resolvable_annotations(name: str) -> None:
    # __module__ is rewritten to "dogma", so string annotations would be
    # resolved in dogma's namespace and could fail; they must be real objects.
    cls = getattr(dogma, name)
    typing.get_type_hints(cls)
    attrs.resolve_types(cls)
