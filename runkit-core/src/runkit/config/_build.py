"""``build(app)``: configure an application twice, validate, and describe it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import attrs
import dogma

from .._errors import ConfigurationError
from . import _dogma_compat as compat
from ._configurers import ApplicationRecorder, HandlerRecorder, recorder_for
from ._model import (
    ApplicationConfig,
    HandlerConfig,
    HandlerKind,
    Identity,
    RouteConfig,
    RouteKind,
)

__all__ = ["build"]

# Which route kinds each handler kind accepts, and which it needs at least one of.
_ALLOWED: dict[HandlerKind, tuple[RouteKind, ...]] = {
    HandlerKind.AGGREGATE: (RouteKind.HANDLES_COMMAND, RouteKind.RECORDS_EVENT),
    HandlerKind.PROCESS: (
        RouteKind.HANDLES_EVENT,
        RouteKind.EXECUTES_COMMAND,
        RouteKind.SCHEDULES_DEADLINE,
    ),
    HandlerKind.INTEGRATION: (RouteKind.HANDLES_COMMAND, RouteKind.RECORDS_EVENT),
    HandlerKind.PROJECTION: (RouteKind.HANDLES_EVENT,),
}
_REQUIRED: dict[HandlerKind, tuple[RouteKind, ...]] = {
    HandlerKind.AGGREGATE: (RouteKind.HANDLES_COMMAND, RouteKind.RECORDS_EVENT),
    HandlerKind.PROCESS: (RouteKind.HANDLES_EVENT, RouteKind.EXECUTES_COMMAND),
    HandlerKind.INTEGRATION: (RouteKind.HANDLES_COMMAND,),
    HandlerKind.PROJECTION: (RouteKind.HANDLES_EVENT,),
}
# The message kind each route kind carries.
_MESSAGE_KIND: dict[RouteKind, str] = {
    RouteKind.HANDLES_COMMAND: "command",
    RouteKind.RECORDS_EVENT: "event",
    RouteKind.HANDLES_EVENT: "event",
    RouteKind.EXECUTES_COMMAND: "command",
    RouteKind.SCHEDULES_DEADLINE: "deadline",
}
_REQUIRED_WHY: dict[RouteKind, str] = {
    RouteKind.HANDLES_COMMAND: "it must handle at least one command type",
    RouteKind.RECORDS_EVENT: "it must record at least one event type",
    RouteKind.HANDLES_EVENT: "it must handle at least one event type",
    RouteKind.EXECUTES_COMMAND: "it must execute at least one command type",
}
_EXAMPLE_KEY = "3f2e8a1c-5b7d-4e9f-a0c6-2d8b4f1e7a93"


def build(app: object) -> ApplicationConfig:
    """Configure ``app`` and return its validated, immutable configuration.

    ``app.configure(c)`` and every handler's ``configure(c)`` are called twice;
    a configuration that differs between the two calls is refused, because the
    engine may call ``configure()`` at any time and relies on the answer.

    Raises:
        TypeError: ``app`` has no ``configure`` method.
        runkit.ConfigurationError: the configuration breaks one or more rules;
            ``problems`` lists every one, each naming the handler, the route
            and what to change.
    """
    configure = getattr(app, "configure", None)
    if not callable(configure):
        raise TypeError(
            f"an application must have a configure(c) method; got {_describe(app)}"
        )

    first = _configure(app)
    second = _configure(app)

    v = _Validator(app)
    v.check(first)
    v.compare(first, second)
    if v.problems:
        count = len(v.problems)
        noun = "problem" if count == 1 else "problems"
        raise ConfigurationError(
            f"application {v.app_label} has {count} configuration {noun}", v.problems
        )
    return _assemble(app, first)


@attrs.define
class _HandlerPass:
    """One handler as declared during one call of the application's ``configure()``."""

    kind: HandlerKind
    handler: object
    recorder: HandlerRecorder
    error: Exception | None = None


@attrs.define
class _Pass:
    """Everything one call of ``configure()`` declared."""

    app: ApplicationRecorder
    handlers: list[_HandlerPass]
    # Values given to the application's routes() that are not handler routes.
    strays: list[object]
    error: Exception | None = None


def _configure(app: object) -> _Pass:
    recorder = ApplicationRecorder()
    try:
        app.configure(recorder)  # type: ignore[attr-defined]
    except Exception as exc:  # reported as a problem, with the rest
        return _Pass(recorder, [], [], exc)

    handlers: list[_HandlerPass] = []
    strays: list[object] = []
    for route in recorder.declared.routes:
        found = compat.as_handler_route(route)
        if found is None:
            strays.append(route)
            continue
        kind, handler = found
        h = _HandlerPass(kind, handler, recorder_for(kind))
        try:
            handler.configure(h.recorder)  # type: ignore[attr-defined]
        except Exception as exc:  # reported as a problem, with the rest
            h.error = exc
        handlers.append(h)
    return _Pass(recorder, handlers, strays)


class _Validator:
    """Collects every problem with one application's configuration."""

    def __init__(self, app: object) -> None:
        self.app = app
        self.app_label = _qualified(app)
        self.problems: list[str] = []
        # Per handler: its label for messages, and its identity when valid.
        self.labels: dict[int, str] = {}
        self.identities: dict[int, Identity] = {}

    def add(self, subject: str, problem: str) -> None:
        self.problems.append(f"{subject}: {problem}")

    # -- the first call ---------------------------------------------------------

    def check(self, p: _Pass) -> None:
        if p.error is not None:
            self.add(
                f"application {self.app_label}",
                f"configure() raised {_error(p.error)}; fix the application's configure()",
            )
            return

        app_identity = self._identity(
            f"application {self.app_label}", "the application", p.app.declared.identities
        )
        if app_identity is not None:
            self.app_label = f"{app_identity.name!r} ({self.app_label})"

        for stray in p.strays:
            self.add(
                f"application {self.app_label}",
                f"routes() was given {_describe(stray)}, which is not a handler route; "
                "wrap each handler with dogma.via_aggregate(), via_process(), "
                "via_integration() or via_projection()",
            )

        seen: set[int] = set()
        handlers: list[_HandlerPass] = []
        for h in p.handlers:
            if id(h.handler) in seen:
                self.add(
                    f"application {self.app_label}",
                    f"{h.kind.value} {_qualified(h.handler)} is routed more than once; "
                    "pass each handler object to routes() once",
                )
                continue
            seen.add(id(h.handler))
            handlers.append(h)
            self._handler(h)

        self._unique_identities(app_identity, handlers)
        self._unique_producers(handlers)

    def _identity(
        self, subject: str, what: str, calls: list[tuple[object, object]]
    ) -> Identity | None:
        if not calls:
            self.add(
                subject,
                f"{what} has no identity; call c.identity(name, key) once in configure()",
            )
            return None
        if len(calls) > 1:
            given = ", ".join(f"({n!r}, {k!r})" for n, k in calls)
            self.add(
                subject,
                f"identity() is called {len(calls)} times ({given}); call it exactly once",
            )
            return None

        name, key = calls[0]
        ok = True
        name_problem = compat.name_problem(name)
        if name_problem is not None:
            ok = False
            self.add(
                subject,
                f"identity name {name!r} is invalid ({name_problem}); use 1-255 bytes of "
                "printable UTF-8 without whitespace, such as 'account'",
            )
        normalised, key_problem = compat.normalise_key(key)
        if key_problem is not None:
            ok = False
            self.add(
                subject,
                f"identity key {key!r} is invalid ({key_problem}); use a canonical UUID "
                f"such as {_EXAMPLE_KEY!r}, and never change it once used",
            )
        if not ok:
            return None
        assert isinstance(name, str)
        assert normalised is not None
        return Identity(name, normalised)

    def _handler(self, h: _HandlerPass) -> None:
        kind = h.kind.value
        label = f"{kind} {_qualified(h.handler)}"
        self.labels[id(h)] = label
        if h.error is not None:
            self.add(
                label,
                f"configure() raised {_error(h.error)}; fix the handler's configure()",
            )
            return

        identity = self._identity(label, f"the {kind}", h.recorder.declared.identities)
        if identity is not None:
            label = f"{kind} {identity.name!r} (key {identity.key}, {_qualified(h.handler)})"
            self.labels[id(h)] = label
            self.identities[id(h)] = identity

        for method in h.recorder.misuse:
            self.add(
                label,
                f"{method}() is only supported on integrations and projections; "
                f"remove the call from the {kind}'s configure()",
            )
        for preference in h.recorder.concurrency:
            if not isinstance(preference, dogma.ConcurrencyPreference):
                self.add(
                    label,
                    f"concurrency_preference({preference!r}) is not a "
                    "dogma.ConcurrencyPreference; use ConcurrencyPreference.MAXIMIZE "
                    "or ConcurrencyPreference.MINIMIZE",
                )

        routes = _resolve_routes(self, label, h)
        allowed = _ALLOWED[h.kind]
        counts = Counter(routes)
        for route, n in counts.items():
            if route.kind not in allowed:
                names = " and ".join(k.value for k in allowed)
                self.add(
                    label,
                    f"route {route} is not allowed on a {kind}, which accepts only "
                    f"{names} routes; remove it",
                )
            if n > 1:
                self.add(label, f"route {route} is declared {n} times; declare it once")
        present = {r.kind for r in routes}
        for required in _REQUIRED[h.kind]:
            if required not in present:
                self.add(
                    label,
                    f"has no {required.value} route, but {_REQUIRED_WHY[required]}; "
                    f"add dogma.{required.value}(<{_MESSAGE_KIND[required].title()}Class>) "
                    "to its routes",
                )
        h_routes[id(h)] = tuple(counts)
        _ROUTES_BY_VALIDATOR.setdefault(id(self), {})[id(h)] = tuple(counts)

    def _unique_identities(self, app: Identity | None, handlers: list[_HandlerPass]) -> None:
        by_name: dict[str, list[str]] = {}
        by_key: dict[str, list[str]] = {}
        if app is not None:
            by_key.setdefault(app.key, []).append(f"application {self.app_label}")
        for h in handlers:
            identity = self.identities.get(id(h))
            if identity is None:
                continue
            by_name.setdefault(identity.name, []).append(self.labels[id(h)])
            by_key.setdefault(identity.key, []).append(self.labels[id(h)])
        for name, holders in by_name.items():
            if len(holders) > 1:
                self.add(
                    f"handler name {name!r}",
                    f"is used by {_and(holders)}; handler names must be unique within the "
                    "application, so rename all but one",
                )
        for key, holders in by_key.items():
            if len(holders) > 1:
                self.add(
                    f"identity key {key}",
                    f"is used by {_and(holders)}; keys must be unique across the "
                    "application and its handlers, so give all but one a new UUID",
                )

    def _unique_producers(self, handlers: list[_HandlerPass]) -> None:
        routes = _ROUTES_BY_VALIDATOR.get(id(self), {})
        for kind, verb in (
            (RouteKind.HANDLES_COMMAND, "handled"),
            (RouteKind.RECORDS_EVENT, "recorded"),
        ):
            owners: dict[type, list[str]] = {}
            for h in handlers:
                for r in routes.get(id(h), ()):
                    if r.kind is kind and h.kind in (HandlerKind.AGGREGATE, HandlerKind.INTEGRATION):
                        owners.setdefault(r.message_class, []).append(self.labels[id(h)])
            for cls, holders in owners.items():
                if len(holders) > 1:
                    self.add(
                        f"{_MESSAGE_KIND[kind]} type {_qualified_class(cls)}",
                        f"is {verb} by {_and(holders)}, but only one handler in an "
                        f"application may have a {kind.value} route for it; "
                        "remove the route from all but one",
                    )
