"""Configurers that record what ``configure()`` declares, for later validation.

They never raise for a bad declaration: every call is recorded as given, so
that validation can report every problem at once rather than the first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

import dogma

from ._dogma_compat import describe_value
from ._model import HandlerKind

__all__ = [
    "AggregateRecorder",
    "ApplicationRecorder",
    "HandlerRecorder",
    "IntegrationRecorder",
    "ProcessRecorder",
    "ProjectionRecorder",
    "recorder_for",
]


@attrs.define
class _Declarations:
    """The raw calls made on one configurer."""

    identities: list[tuple[object, object]] = attrs.Factory(list)
    routes: list[object] = attrs.Factory(list)


class ApplicationRecorder:
    """Implements ``dogma.ApplicationConfigurer`` by recording every call."""

    def __init__(self) -> None:
        self.declared = _Declarations()

    def identity(self, name: str, key: str) -> None:
        """Record the application's identity."""
        self.declared.identities.append((name, key))

    def routes(self, *routes: dogma.HandlerRoute) -> None:
        """Record handler routes (``dogma.via_*``)."""
        self.declared.routes.extend(routes)


class HandlerRecorder:
    """The calls common to every handler configurer."""

    kind: HandlerKind

    def __init__(self) -> None:
        self.declared = _Declarations()
        self.disabled = False
        # Each call to concurrency_preference(), in order; the last one wins.
        self.concurrency: list[object] = []
        self.misuse: list[str] = []

    def identity(self, name: str, key: str) -> None:
        """Record the handler's identity."""
        self.declared.identities.append((name, key))

    def routes(self, *routes: Any) -> None:
        """Record message routes."""
        self.declared.routes.extend(routes)

    def disable(self, *args: object, **kwargs: object) -> None:
        """Record that the handler is disabled."""
        # Dogma reserves disable options for the future; accept and ignore them.
        del args, kwargs
        self.disabled = True

    def snapshot(self) -> tuple[object, ...]:
        """A comparable summary, used to detect a non-deterministic ``configure()``."""
        return (
            tuple(self.declared.identities),
            tuple(describe_value(r) for r in self.declared.routes),
            self.disabled,
            tuple(self.concurrency),
            tuple(self.misuse),
        )


class AggregateRecorder(HandlerRecorder):
    """Implements ``dogma.AggregateConfigurer``."""

    kind = HandlerKind.AGGREGATE

    def concurrency_preference(self, preference: object) -> None:
        """Not part of the aggregate API; recorded as a problem to report."""
        del preference
        self.misuse.append("concurrency_preference")


class ProcessRecorder(HandlerRecorder):
    """Implements ``dogma.ProcessConfigurer``."""

    kind = HandlerKind.PROCESS

    def concurrency_preference(self, preference: object) -> None:
        """Not part of the process API; recorded as a problem to report."""
        del preference
        self.misuse.append("concurrency_preference")


class IntegrationRecorder(HandlerRecorder):
    """Implements ``dogma.IntegrationConfigurer``."""

    kind = HandlerKind.INTEGRATION

    def concurrency_preference(self, preference: dogma.ConcurrencyPreference) -> None:
        """Record the concurrency hint; the last call wins."""
        self.concurrency.append(preference)


class ProjectionRecorder(HandlerRecorder):
    """Implements ``dogma.ProjectionConfigurer``."""

    kind = HandlerKind.PROJECTION

    def concurrency_preference(self, preference: dogma.ConcurrencyPreference) -> None:
        """Record the concurrency hint; the last call wins."""
        self.concurrency.append(preference)


_RECORDERS: dict[HandlerKind, type[HandlerRecorder]] = {
    HandlerKind.AGGREGATE: AggregateRecorder,
    HandlerKind.PROCESS: ProcessRecorder,
    HandlerKind.INTEGRATION: IntegrationRecorder,
    HandlerKind.PROJECTION: ProjectionRecorder,
}


def recorder_for(kind: HandlerKind) -> HandlerRecorder:
    """A fresh configurer for a handler of ``kind``."""
    return _RECORDERS[kind]()


if TYPE_CHECKING:
    # Static proof that the recorders implement dogma's configurer protocols.
    _app: dogma.ApplicationConfigurer = ApplicationRecorder()
    _aggregate: dogma.AggregateConfigurer = AggregateRecorder()
    _process: dogma.ProcessConfigurer = ProcessRecorder()
    _integration: dogma.IntegrationConfigurer = IntegrationRecorder()
    _projection: dogma.ProjectionConfigurer = ProjectionRecorder()
