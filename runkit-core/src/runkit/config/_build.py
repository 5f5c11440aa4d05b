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


def build(app: object, *, registry: dogma.MessageTypeRegistry | None = None) -> ApplicationConfig:
    """Configure ``app`` and return its validated, immutable configuration.

    ``app.configure(c)`` and every handler's ``configure(c)`` are called twice;
    a configuration that differs between the two calls is refused, because the
    engine may call ``configure()`` at any time and relies on the answer.

    Args:
        app: The application: any object with a ``configure(c)`` method.
        registry: The registry every routed message type must be in, so the
            engine can decode stored messages; the global ``dogma.registry``
            by default.

    Raises:
        TypeError: ``app`` has no ``configure`` method.
        runkit.ConfigurationError: the configuration breaks one or more rules;
            ``problems`` lists every one, each naming the handler, the route
            and what to change.
    """
    configure = getattr(app, "configure", None)
    if not callable(configure):
        raise TypeError(f"an application must have a configure(c) method; got {_describe(app)}")

    first = _configure(app)
    second = _configure(app)

    v = _Validator(app, dogma.registry if registry is None else registry)
    v.check(first)
    v.compare(first, second)
    if v.problems:
        count = len(v.problems)
        noun = "problem" if count == 1 else "problems"
        # Chain the first exception a configure() raised, so its traceback is kept.
        cause = next((e for e in v.errors), None)
        raise ConfigurationError(
            f"application {v.app_label} has {count} configuration {noun}", v.problems
        ) from cause
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
    error: Exception | None = None
    try:
        app.configure(recorder)  # type: ignore[attr-defined]
    except Exception as exc:  # reported as a problem, with the rest
        # What was declared before it raised is still checked, so the
        # exception does not hide the application's other problems.
        error = exc

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
    return _Pass(recorder, handlers, strays, error)


class _Validator:
    """Collects every problem with one application's configuration."""

    def __init__(self, app: object, registry: dogma.MessageTypeRegistry) -> None:
        self.app = app
        self.registry = registry
        self.app_label = _qualified(app)
        self.problems: list[str] = []
        self.errors: list[Exception] = []
        # Per handler: its label for messages, and its identity when valid.
        self.labels: dict[int, str] = {}
        self.identities: dict[int, Identity] = {}
        # Per handler: its routes that resolved to a registered message type.
        self.routes: dict[int, tuple[RouteConfig, ...]] = {}

    def add(self, subject: str, problem: str, *, sep: str = ": ") -> None:
        self.problems.append(f"{subject}{sep}{problem}")

    # -- the first call ---------------------------------------------------------

    def check(self, p: _Pass) -> None:
        app_identity: Identity | None = None
        if p.error is not None:
            self.errors.append(p.error)
            self.add(
                f"application {self.app_label}",
                f"configure() raised {_error(p.error)}; fix the application's configure()",
            )
        # After an exception, a missing identity or route is not reported: the
        # call may have stopped before declaring it.
        if p.error is None or p.app.declared.identities:
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
            self.add(subject, name_problem)
        normalised, key_problem = compat.normalise_key(key)
        if key_problem is not None:
            ok = False
            self.add(subject, f"{key_problem}; keys never change once used")
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
            self.errors.append(h.error)
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
                    f"route {route} is not allowed on {_a(kind)}, which accepts only "
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
        self.routes[id(h)] = tuple(counts)

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
                    sep=" ",
                )
        for key, holders in by_key.items():
            if len(holders) > 1:
                self.add(
                    f"identity key {key}",
                    f"is used by {_and(holders)}; keys must be unique across the "
                    "application and its handlers, so give all but one a new UUID",
                    sep=" ",
                )

    def _unique_producers(self, handlers: list[_HandlerPass]) -> None:
        for kind, verb in (
            (RouteKind.HANDLES_COMMAND, "handled"),
            (RouteKind.RECORDS_EVENT, "recorded"),
        ):
            owners: dict[type, list[str]] = {}
            for h in handlers:
                for r in self.routes.get(id(h), ()):
                    if r.kind is kind and kind in _ALLOWED[h.kind]:
                        owners.setdefault(r.message_class, []).append(self.labels[id(h)])
            for cls, holders in owners.items():
                if len(holders) > 1:
                    self.add(
                        f"{_MESSAGE_KIND[kind]} type {_qualified_class(cls)}",
                        f"is {verb} by {_and(holders)}, but only one handler in an "
                        f"application may have a {kind.value} route for it; "
                        "remove the route from all but one",
                        sep=" ",
                    )

    # -- the second call --------------------------------------------------------

    def compare(self, first: _Pass, second: _Pass) -> None:
        """Report every difference between two calls of ``configure()``."""
        subject = f"application {self.app_label}"
        advice = "configure() must declare the same configuration every time it is called"
        if (first.error is None) != (second.error is None):
            failed = first.error or second.error
            assert failed is not None
            self.errors.append(failed)
            call = "first" if first.error is not None else "second"
            self.add(
                subject, f"configure() raised {_error(failed)} only on the {call} call; {advice}"
            )
            return
        if first.error is not None:
            return  # already reported
        if first.app.declared.identities != second.app.declared.identities:
            self.add(
                subject,
                "identity() was called with different arguments on the second call "
                f"({_calls(first.app.declared.identities)} then "
                f"{_calls(second.app.declared.identities)}); {advice}",
            )
        shape1 = [compat.describe_value(r) for r in first.app.declared.routes]
        shape2 = [compat.describe_value(r) for r in second.app.declared.routes]
        if shape1 != shape2:
            self.add(
                subject,
                f"routes() declared different handlers on the second call ([{_list(shape1)}] "
                f"then [{_list(shape2)}]); {advice}",
            )
            return
        for h1, h2 in zip(first.handlers, second.handlers, strict=True):
            if h1.error is not None or h2.error is not None:
                if (h1.error is None) != (h2.error is None):
                    failed = h1.error or h2.error
                    assert failed is not None
                    self.errors.append(failed)
                    call = "first" if h1.error is not None else "second"
                    self.add(
                        self.labels.get(id(h1), f"{h1.kind.value} {_qualified(h1.handler)}"),
                        f"configure() raised {_error(failed)} only on the {call} call; {advice}",
                    )
                continue
            differences = _differences(h1.recorder, h2.recorder)
            if differences:
                self.add(
                    self.labels.get(id(h1), f"{h1.kind.value} {_qualified(h1.handler)}"),
                    f"configure() declared a different configuration on the second call "
                    f"({'; '.join(differences)}); {advice}",
                )


def _resolve_routes(v: _Validator, label: str, h: _HandlerPass) -> list[RouteConfig]:
    """Turn the declared route values into ``RouteConfig``s, reporting any that cannot be."""
    resolved: list[RouteConfig] = []
    for value in h.recorder.declared.routes:
        found = compat.as_message_route(value)
        if found is None:
            v.add(
                label,
                f"routes() was given {_describe(value)}, which is not a message route; use "
                "dogma.handles_command(), records_event(), handles_event(), "
                "executes_command() or schedules_deadline()",
            )
            continue
        kind, entry = found
        route = RouteConfig(kind, entry)
        expected = _MESSAGE_KIND[kind]
        if entry not in v.registry:
            v.add(
                label,
                f"route {route}: {_qualified_class(entry.cls)} ({entry.id}) is not in the "
                f"message type registry; register it with @dogma.register_{expected}('<uuid>')",
            )
            continue
        actual = compat.kind_name(entry)
        if actual != expected:
            v.add(
                label,
                f"route {route}: {_qualified_class(entry.cls)} is {_a(actual)}, but "
                f"{kind.value} routes take {expected} types; use {_a(expected)} type",
            )
            continue
        resolved.append(RouteConfig(kind, entry))
    return resolved


def _differences(a: HandlerRecorder, b: HandlerRecorder) -> list[str]:
    out: list[str] = []
    if a.declared.identities != b.declared.identities:
        out.append(f"identity {_calls(a.declared.identities)} then {_calls(b.declared.identities)}")
    r1 = [compat.describe_value(r) for r in a.declared.routes]
    r2 = [compat.describe_value(r) for r in b.declared.routes]
    if r1 != r2:
        out.append(f"routes [{_list(r1)}] then [{_list(r2)}]")
    if a.disabled != b.disabled:
        out.append(f"disabled {a.disabled} then {b.disabled}")
    if a.concurrency != b.concurrency or a.misuse != b.misuse:
        out.append(f"concurrency_preference {_list(a.concurrency)} then {_list(b.concurrency)}")
    return out


def _assemble(app: object, p: _Pass) -> ApplicationConfig:
    """Build the model from a call that validated cleanly."""
    identity = _only_identity(p.app.declared.identities)
    handlers: list[HandlerConfig] = []
    for h in p.handlers:
        concurrency = dogma.ConcurrencyPreference.MAXIMIZE
        if h.recorder.concurrency:
            last = h.recorder.concurrency[-1]
            assert isinstance(last, dogma.ConcurrencyPreference)
            concurrency = last
        routes: list[RouteConfig] = []
        for value in h.recorder.declared.routes:
            found = compat.as_message_route(value)
            assert found is not None
            routes.append(RouteConfig(*found))
        handlers.append(
            HandlerConfig(
                kind=h.kind,
                identity=_only_identity(h.recorder.declared.identities),
                handler=h.handler,
                routes=tuple(routes),
                disabled=h.recorder.disabled,
                concurrency=concurrency,
            )
        )
    return ApplicationConfig(identity=identity, app=app, handlers=tuple(handlers))


def _only_identity(calls: list[tuple[object, object]]) -> Identity:
    ((name, key),) = calls
    normalised, _ = compat.normalise_key(key)
    assert isinstance(name, str)
    assert normalised is not None
    return Identity(name, normalised)


def _qualified(obj: object) -> str:
    return _qualified_class(type(obj))


def _qualified_class(cls: object) -> str:
    if isinstance(cls, type):
        if cls.__module__ == "builtins":
            return cls.__qualname__
        return f"{cls.__module__}.{cls.__qualname__}"
    return repr(cls)


def _describe(value: object) -> str:
    return f"{value!r} ({_qualified(value)})"


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _calls(calls: Iterable[tuple[object, object]]) -> str:
    return ", ".join(f"({n!r}, {k!r})" for n, k in calls) or "none"


def _list(items: Iterable[object]) -> str:
    return ", ".join(str(i) for i in items)


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _and(items: list[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]
