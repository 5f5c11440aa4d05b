"""Benchmark targets: one module per persistence driver, found by name.

A target module ``benchmarks/targets/<name>.py`` defines:

``NAME: str``
    The name ``--drivers`` selects it by (normally the module name).

``open_target() -> contextlib.AbstractAsyncContextManager[Target]``
    Starts whatever the driver needs (servers, emulators, a fresh namespace),
    yields a ``Target``, and tears everything down on exit. Called once per
    benchmark run of that driver.

``Target.provider`` is the ``runkit.persistence.Provider`` under test.
``Target.baseline``, optional, is a provider-like object that issues the same
backend requests as the driver but directly, without the driver (no validation,
error mapping or cancellation handling); when present, the report shows the
driver's throughput as a ratio of it. It only needs the methods the workloads
call (see ``BaselineProvider``). ``Target.notes`` describes the backend (version,
settings) for the report. ``Target.write_transactions``, optional, counts the
write transactions the backend has committed so far (a database's own count,
beside the engine's count of store calls: one statement may carry many
grouped writes); reports give its difference over a phase.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import ModuleType
from typing import Protocol, TypeVar, cast

import attrs

from runkit.persistence import Provider

__all__ = [
    "BaselineJournal",
    "BaselineKeyspace",
    "BaselineProvider",
    "BaselineSet",
    "Target",
    "TargetModule",
    "available",
    "load",
]


class BaselineJournal(Protocol):
    """The journal methods the workloads use."""

    async def append(self, position: int, record: bytes) -> None: ...
    async def get(self, position: int) -> bytes: ...
    def range(self, position: int) -> AsyncIterator[tuple[int, bytes]]: ...


class BaselineKeyspace(Protocol):
    """The keyspace methods the workloads use."""

    async def get(self, key: bytes) -> tuple[bytes, str]: ...
    async def set(self, key: bytes, value: bytes, revision: str) -> str: ...


class BaselineSet(Protocol):
    """The set methods the workloads use."""

    async def add(self, member: bytes) -> None: ...


H_co = TypeVar("H_co", covariant=True)


class _Opener(Protocol[H_co]):
    async def open(self, name: str) -> H_co: ...


class BaselineProvider(Protocol):
    """What the workloads need of a provider: a ``Provider`` satisfies it too."""

    @property
    def journals(self) -> _Opener[BaselineJournal]: ...
    @property
    def keyspaces(self) -> _Opener[BaselineKeyspace]: ...
    @property
    def sets(self) -> _Opener[BaselineSet]: ...


@attrs.frozen
class Target:
    """What a target module's ``open_target()`` yields."""

    provider: Provider
    baseline: BaselineProvider | None = None
    notes: str = ""
    write_transactions: Callable[[], Awaitable[int]] | None = None


class TargetModule(Protocol):
    """The shape of a target module."""

    NAME: str

    def open_target(self) -> AbstractAsyncContextManager[Target]: ...


def available() -> list[str]:
    """The names of the target modules in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load(name: str) -> TargetModule:
    """Import the target module *name*; ``ValueError`` listing the choices if unknown."""
    if name not in available():
        raise ValueError(f"unknown driver {name!r}; available: {', '.join(available())}")
    module: ModuleType = importlib.import_module(f"{__name__}.{name}")
    for attribute in ("NAME", "open_target"):
        if not hasattr(module, attribute):
            raise ValueError(f"benchmark target {module.__name__} does not define {attribute}")
    return cast(TargetModule, module)
