"""Tests for runkit.config: building, validating and querying an application's configuration."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs
import pytest

import dogma
from runkit import ConfigurationError
from runkit.config import (
    ApplicationConfig,
    HandlerConfig,
    HandlerKind,
    Identity,
    RouteConfig,
    RouteKind,
    build,
)

# Test message types live in their own registry so the global one is untouched.
REGISTRY = dogma.MessageTypeRegistry()
OTHER_REGISTRY = dogma.MessageTypeRegistry()

APP_KEY = "a0000000-0000-4000-8000-000000000001"
KEY_1 = "b0000000-0000-4000-8000-000000000001"
KEY_2 = "b0000000-0000-4000-8000-000000000002"
KEY_3 = "b0000000-0000-4000-8000-000000000003"
KEY_4 = "b0000000-0000-4000-8000-000000000004"


@dogma.register_command("c0000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Open(dogma.Command):
    id: str


@dogma.register_command("c0000000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class Notify(dogma.Command):
    id: str


@dogma.register_command("c0000000-0000-4000-8000-000000000003", registry=REGISTRY)
@attrs.frozen
class Unused(dogma.Command):
    id: str


@dogma.register_event("e0000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Opened(dogma.Event):
    id: str


@dogma.register_event("e0000000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class Notified(dogma.Event):
    id: str


@dogma.register_event("e0000000-0000-4000-8000-000000000003", registry=REGISTRY)
@attrs.frozen
class Closed(dogma.Event):
    id: str


@dogma.register_deadline("d0000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Reminder(dogma.Deadline):
    id: str


@dogma.register_command("c0000000-0000-4000-8000-0000000000ff", registry=OTHER_REGISTRY)
@attrs.frozen
class Stranger(dogma.Command):
    id: str


def handles_command(t: type) -> dogma.HandlesCommandRoute:
    return dogma.handles_command(t, registry=REGISTRY)


def records_event(t: type) -> dogma.RecordsEventRoute:
    return dogma.records_event(t, registry=REGISTRY)


def handles_event(t: type) -> dogma.HandlesEventRoute:
    return dogma.handles_event(t, registry=REGISTRY)


def executes_command(t: type) -> dogma.ExecutesCommandRoute:
    return dogma.executes_command(t, registry=REGISTRY)


def schedules_deadline(t: type) -> dogma.SchedulesDeadlineRoute:
    return dogma.schedules_deadline(t, registry=REGISTRY)


Configure = Callable[[Any], None]


def declare(name: str | None, key: str | None, *routes: object, **flags: Any) -> Configure:
    """A configure() body: identity (unless None), routes, then optional flags."""

    def configure(c: Any) -> None:
        if name is not None:
            c.identity(name, key)
        c.routes(*routes)
        if flags.get("disable"):
            c.disable()
        if "concurrency" in flags:
            c.concurrency_preference(flags["concurrency"])

    return configure


class Handler:
    """Counts configure() calls and delegates to a configure body."""

    def __init__(self, configure: Configure) -> None:
        self._configure = configure
        self.calls = 0

    def configure(self, c: Any) -> None:
        self.calls += 1
        self._configure(c)


class Aggregate(Handler):
    def new(self) -> object:
        return object()

    def route_command_to_instance(self, command: dogma.Command) -> str:
        return "id"

    def handle_command(self, root: object, scope: object, command: dogma.Command) -> None:
        pass


class Process(Handler):
    def new(self) -> object:
        return dogma.StatelessProcessRoot()

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        return None

    async def handle_event(self, root: object, scope: object, event: dogma.Event) -> None:
        pass

    async def handle_deadline(self, root: object, scope: object, deadline: dogma.Deadline) -> None:
        pass


class Integration(Handler):
    async def handle_command(self, scope: object, command: dogma.Command) -> None:
        pass


class Projection(Handler, dogma.NoCompactBehavior, dogma.NoResetBehavior):
    async def handle_event(self, scope: object, event: dogma.Event) -> int:
        return 0

    async def checkpoint_offset(self, stream_id: str) -> int:
        return 0


class App:
    """An application whose configure() declares the given identity and routes."""

    def __init__(self, *routes: object, identity: tuple[str, str] | None = ("app", APP_KEY)):
        self.routes = routes
        self.identity = identity
        self.calls = 0

    def configure(self, c: dogma.ApplicationConfigurer) -> None:
        self.calls += 1
        if self.identity is not None:
            c.identity(*self.identity)
        c.routes(*self.routes)  # type: ignore[arg-type]


def aggregate(name: str = "agg", key: str = KEY_1, *routes: object, **flags: Any) -> Aggregate:
    routes = routes or (handles_command(Open), records_event(Opened))
    return Aggregate(declare(name, key, *routes, **flags))


def process(name: str = "proc", key: str = KEY_2, *routes: object, **flags: Any) -> Process:
    routes = routes or (handles_event(Opened), executes_command(Notify))
    return Process(declare(name, key, *routes, **flags))


def integration(name: str = "int", key: str = KEY_3, *routes: object, **flags: Any) -> Integration:
    routes = routes or (handles_command(Notify), records_event(Notified))
    return Integration(declare(name, key, *routes, **flags))


def projection(name: str = "proj", key: str = KEY_4, *routes: object, **flags: Any) -> Projection:
    routes = routes or (handles_event(Opened),)
    return Projection(declare(name, key, *routes, **flags))


def bank_like_app() -> App:
    return App(
        dogma.via_aggregate(aggregate()),
        dogma.via_process(process()),
        dogma.via_integration(integration()),
        dogma.via_projection(projection()),
    )


def local(text: str) -> str:
    """Shorten this module's import name, which depends on how pytest imported it."""
    return text.replace(f"{__name__}.", "test_config.")


def problems_of(app: object) -> tuple[str, ...]:
    with pytest.raises(ConfigurationError) as info:
        build(app, registry=REGISTRY)
    return tuple(local(p) for p in info.value.problems)


def only_problem(app: object) -> str:
    problems = problems_of(app)
    assert len(problems) == 1, problems
    return problems[0]


NAMES: dict[object, tuple[str, str]] = {
    aggregate: ("agg", KEY_1),
    process: ("proc", KEY_2),
    integration: ("int", KEY_3),
    projection: ("proj", KEY_4),
}
AGG = f"aggregate 'agg' (key {KEY_1}, test_config.Aggregate)"
PROC = f"process 'proc' (key {KEY_2}, test_config.Process)"
INT = f"integration 'int' (key {KEY_3}, test_config.Integration)"
PROJ = f"projection 'proj' (key {KEY_4}, test_config.Projection)"


class TestBuild:
    def test_valid_application_is_described(self) -> None:
        """A valid application becomes an immutable description of its handlers and routes."""
        app = bank_like_app()

        config = build(app, registry=REGISTRY)

        assert config.identity == Identity("app", APP_KEY)
        assert config.app is app
        assert [h.kind for h in config.handlers] == [
            HandlerKind.AGGREGATE,
            HandlerKind.PROCESS,
            HandlerKind.INTEGRATION,
            HandlerKind.PROJECTION,
        ]
        agg = config.handlers[0]
        assert agg.identity == Identity("agg", KEY_1)
        assert agg.handler is app.routes[0].handler  # type: ignore[attr-defined]
        assert agg.routes == (
            RouteConfig(RouteKind.HANDLES_COMMAND, REGISTRY.of(Open)),  # type: ignore[arg-type]
            RouteConfig(RouteKind.RECORDS_EVENT, REGISTRY.of(Opened)),  # type: ignore[arg-type]
        )
        assert not agg.disabled
        assert agg.concurrency is dogma.ConcurrencyPreference.MAXIMIZE

    def test_configure_is_called_twice(self) -> None:
        """The application's and each handler's configure() run twice, to catch non-determinism."""
        agg = aggregate()
        app = App(dogma.via_aggregate(agg))

        build(app, registry=REGISTRY)

        assert (app.calls, agg.calls) == (2, 2)

    def test_keys_are_normalised_to_lowercase(self) -> None:
        """Identity keys are stored in lowercase, whatever case configure() used."""
        app = App(
            dogma.via_aggregate(aggregate(key=KEY_1.upper())), identity=("app", APP_KEY.upper())
        )

        config = build(app, registry=REGISTRY)

        assert (config.identity.key, config.handlers[0].identity.key) == (APP_KEY, KEY_1)

    def test_disable_and_concurrency_preference_are_kept(self) -> None:
        """disable() marks the handler disabled; the last concurrency preference wins."""

        def configure(c: Any) -> None:
            c.identity("int", KEY_3)
            c.routes(handles_command(Notify))
            c.concurrency_preference(dogma.ConcurrencyPreference.MINIMIZE)
            c.disable()

        config = build(App(dogma.via_integration(Integration(configure))), registry=REGISTRY)

        assert config.handlers[0].disabled
        assert config.handlers[0].concurrency is dogma.ConcurrencyPreference.MINIMIZE

    def test_application_without_configure_is_refused(self) -> None:
        """Anything without a configure(c) method is not an application."""
        with pytest.raises(
            TypeError,
            match=re.escape("an application must have a configure(c) method; got None (NoneType)"),
        ):
            build(None)

    def test_every_problem_is_reported_at_once(self) -> None:
        """Several problems give one error listing all of them, with a count in the summary."""
        app = App(
            dogma.via_aggregate(aggregate("agg", KEY_1, handles_command(Open))),
            dogma.via_projection(projection("agg", KEY_4, handles_event(Opened))),
            identity=None,
        )

        with pytest.raises(ConfigurationError) as info:
            build(app, registry=REGISTRY)

        assert local(info.value.summary) == (
            "application test_config.App has 3 configuration problems"
        )
        assert tuple(local(p) for p in info.value.problems) == (
            "application test_config.App: the application has no identity; "
            "call c.identity(name, key) once in configure()",
            f"{AGG}: has no records_event route, but it must record at least one event type; "
            "add dogma.records_event(<EventClass>) to its routes",
            f"handler name 'agg' is used by {AGG} and "
            f"projection 'agg' (key {KEY_4}, test_config.Projection); handler names must be "
            "unique within the application, so rename all but one",
        )
        assert local(str(info.value)).splitlines()[1].startswith("  - application test_config.App")

    def test_global_registry_is_used_by_default(self) -> None:
        """Without registry=, routed types must be in dogma.registry; test types are not."""
        app = App(dogma.via_aggregate(aggregate()))

        with pytest.raises(ConfigurationError, match=r"is not in the message type registry"):
            build(app)


class TestIdentities:
    def test_application_identity_is_required(self) -> None:
        assert only_problem(App(dogma.via_aggregate(aggregate()), identity=None)) == (
            "application test_config.App: the application has no identity; "
            "call c.identity(name, key) once in configure()"
        )

    def test_application_identity_must_be_declared_once(self) -> None:
        class TwiceApp:
            def configure(self, c: dogma.ApplicationConfigurer) -> None:
                c.identity("app", APP_KEY)
                c.identity("other", APP_KEY)
                c.routes(dogma.via_aggregate(aggregate()))

        assert only_problem(TwiceApp()) == (
            "application test_config.TestIdentities."
            "test_application_identity_must_be_declared_once.<locals>.TwiceApp"
            f": identity() is called 2 times (('app', '{APP_KEY}'), "
            f"('other', '{APP_KEY}')); call it exactly once"
        )

    def test_handler_identity_is_required(self) -> None:
        handler = Aggregate(declare(None, None, handles_command(Open), records_event(Opened)))

        assert only_problem(App(dogma.via_aggregate(handler))) == (
            "aggregate test_config.Aggregate: the aggregate has no identity; "
            "call c.identity(name, key) once in configure()"
        )

    def test_handler_identity_must_be_declared_once(self) -> None:
        def configure(c: Any) -> None:
            c.identity("agg", KEY_1)
            c.identity("agg", KEY_1)
            c.routes(handles_command(Open), records_event(Opened))

        assert only_problem(App(dogma.via_aggregate(Aggregate(configure)))) == (
            f"aggregate test_config.Aggregate: identity() is called 2 times (('agg', '{KEY_1}'), "
            f"('agg', '{KEY_1}')); call it exactly once"
        )

    @pytest.mark.parametrize(
        ("name", "why"),
        [
            ("", "it is empty"),
            ("two words", "it contains whitespace (' ')"),
            ("bell\x07", "it contains a non-printable character ('\\x07')"),
            ("x" * 256, "it is 256 bytes long"),
        ],
    )
    def test_invalid_names_are_refused(self, name: str, why: str) -> None:
        """Names follow dogma's rule; the problem uses dogma's own words."""
        app = App(dogma.via_aggregate(aggregate(name)), identity=(name, APP_KEY))

        assert problems_of(app) == (
            f"application test_config.App: invalid identity name {name!r}: {why}; "
            "names must be 1-255 bytes of printable UTF-8 with no whitespace",
            f"aggregate test_config.Aggregate: invalid identity name {name!r}: {why}; "
            "names must be 1-255 bytes of printable UTF-8 with no whitespace",
        )

    def test_255_byte_name_is_accepted(self) -> None:
        name = "é" * 127 + "x"  # 255 bytes of UTF-8

        config = build(App(dogma.via_aggregate(aggregate(name))), registry=REGISTRY)

        assert config.handlers[0].identity.name == name

    @pytest.mark.parametrize(
        ("key", "why"),
        [
            ("not-a-uuid", "it is 10 characters long, not 36"),
            ("{b0000000-0000-4000-8000-000000000001}", "it is 38 characters long, not 36"),
            ("b00000000000400080000000000000010000", "character 8 is '0', not '-'"),
            ("00000000-0000-0000-0000-000000000000", "it is the nil UUID"),
        ],
    )
    def test_invalid_keys_are_refused(self, key: str, why: str) -> None:
        assert only_problem(App(dogma.via_aggregate(aggregate(key=key)))) == (
            f"aggregate test_config.Aggregate: invalid identity key {key!r}: {why}; expected a "
            "UUID in the 36-character hyphenated form (e.g. "
            "'5195fe85-eb3f-4121-84b0-be72cbc5722f'), which must not be the nil UUID; "
            "keys never change once used"
        )

    def test_handler_names_must_be_unique(self) -> None:
        app = App(
            dogma.via_aggregate(aggregate("same", KEY_1)),
            dogma.via_process(process("same", KEY_2)),
        )

        assert only_problem(app) == (
            f"handler name 'same' is used by aggregate 'same' (key {KEY_1}, "
            f"test_config.Aggregate) and process 'same' (key {KEY_2}, test_config.Process); "
            "handler names must be unique within the application, so rename all but one"
        )

    def test_handler_keys_must_be_unique_ignoring_case(self) -> None:
        app = App(
            dogma.via_aggregate(aggregate("agg", KEY_1)),
            dogma.via_process(process("proc", KEY_1.upper())),
        )

        assert only_problem(app) == (
            f"identity key {KEY_1} is used by {AGG} and process 'proc' (key {KEY_1}, "
            "test_config.Process); keys must be unique across the application and its "
            "handlers, so give all but one a new UUID"
        )

    def test_handler_key_must_differ_from_application_key(self) -> None:
        app = App(dogma.via_aggregate(aggregate("agg", APP_KEY)))

        assert only_problem(app) == (
            f"identity key {APP_KEY} is used by application 'app' (test_config.App) and "
            f"aggregate 'agg' (key {APP_KEY}, test_config.Aggregate); keys must be unique "
            "across the application and its handlers, so give all but one a new UUID"
        )


class TestRoutes:
    @pytest.mark.parametrize(
        ("make", "route", "label", "accepted"),
        [
            (aggregate, handles_event(Opened), AGG, "handles_command and records_event"),
            (aggregate, executes_command(Notify), AGG, "handles_command and records_event"),
            (aggregate, schedules_deadline(Reminder), AGG, "handles_command and records_event"),
            (
                process,
                handles_command(Unused),
                PROC,
                "handles_event and executes_command and schedules_deadline",
            ),
            (
                process,
                records_event(Closed),
                PROC,
                "handles_event and executes_command and schedules_deadline",
            ),
            (integration, handles_event(Opened), INT, "handles_command and records_event"),
            (integration, executes_command(Open), INT, "handles_command and records_event"),
            (projection, records_event(Closed), PROJ, "handles_event"),
            (projection, handles_command(Unused), PROJ, "handles_event"),
            (projection, schedules_deadline(Reminder), PROJ, "handles_event"),
        ],
    )
    def test_route_kinds_not_accepted_by_the_handler_kind_are_refused(
        self, make: Callable[..., Handler], route: Any, label: str, accepted: str
    ) -> None:
        defaults = {
            aggregate: (handles_command(Open), records_event(Opened)),
            process: (handles_event(Opened), executes_command(Notify)),
            integration: (handles_command(Notify),),
            projection: (handles_event(Opened),),
        }[make]
        kind, name, key = label.split(maxsplit=1)[0], *NAMES[make]
        handler = make(name, key, *defaults, route)
        via = getattr(dogma, f"via_{kind}")
        article = "an" if kind in ("aggregate", "integration") else "a"

        assert only_problem(App(via(handler))) == (
            f"{label}: route {_show(route)} is not allowed on {article} {kind}, which accepts only "
            f"{accepted} routes; remove it"
        )

    @pytest.mark.parametrize(
        ("handler", "missing", "why", "cls"),
        [
            (
                lambda: dogma.via_aggregate(aggregate("agg", KEY_1, records_event(Opened))),
                "handles_command",
                "handle at least one command type",
                "Command",
            ),
            (
                lambda: dogma.via_aggregate(aggregate("agg", KEY_1, handles_command(Open))),
                "records_event",
                "record at least one event type",
                "Event",
            ),
            (
                lambda: dogma.via_process(process("proc", KEY_2, executes_command(Notify))),
                "handles_event",
                "handle at least one event type",
                "Event",
            ),
            (
                lambda: dogma.via_process(
                    process("proc", KEY_2, handles_event(Opened), schedules_deadline(Reminder))
                ),
                "executes_command",
                "execute at least one command type",
                "Command",
            ),
            (
                lambda: dogma.via_integration(integration("int", KEY_3, records_event(Notified))),
                "handles_command",
                "handle at least one command type",
                "Command",
            ),
            (
                lambda: dogma.via_projection(Projection(declare("proj", KEY_4))),
                "handles_event",
                "handle at least one event type",
                "Event",
            ),
        ],
    )
    def test_required_route_kinds_must_be_present(
        self, handler: Callable[[], Any], missing: str, why: str, cls: str
    ) -> None:
        route = handler()
        label = {
            dogma.AggregateHandlerRoute: AGG,
            dogma.ProcessHandlerRoute: PROC,
            dogma.IntegrationHandlerRoute: INT,
            dogma.ProjectionHandlerRoute: PROJ,
        }[type(route)]

        assert only_problem(App(route)) == (
            f"{label}: has no {missing} route, but it must {why}; "
            f"add dogma.{missing}(<{cls}Class>) to its routes"
        )

    def test_optional_routes_may_be_absent(self) -> None:
        """An integration need not record events; a process need not schedule deadlines."""
        app = App(
            dogma.via_integration(integration("int", KEY_3, handles_command(Notify))),
            dogma.via_process(process()),
        )

        config = build(app, registry=REGISTRY)

        assert [len(h.routes) for h in config.handlers] == [1, 2]

    def test_duplicate_routes_are_refused(self) -> None:
        handler = aggregate(
            "agg", KEY_1, handles_command(Open), records_event(Opened), handles_command(Open)
        )

        assert only_problem(App(dogma.via_aggregate(handler))) == (
            f"{AGG}: route handles_command(Open) is declared 2 times; declare it once"
        )

    def test_a_command_type_has_at_most_one_handler(self) -> None:
        app = App(
            dogma.via_aggregate(aggregate()),
            dogma.via_integration(integration("int", KEY_3, handles_command(Open))),
        )

        assert only_problem(app) == (
            f"command type test_config.Open is handled by {AGG} and {INT}, but only one handler "
            "in an application may have a handles_command route for it; "
            "remove the route from all but one"
        )

    def test_an_event_type_has_at_most_one_recorder(self) -> None:
        app = App(
            dogma.via_aggregate(aggregate()),
            dogma.via_integration(
                integration("int", KEY_3, handles_command(Notify), records_event(Opened))
            ),
        )

        assert only_problem(app) == (
            f"event type test_config.Opened is recorded by {AGG} and {INT}, but only one "
            "handler in an application may have a records_event route for it; "
            "remove the route from all but one"
        )

    def test_disabled_handlers_still_count_for_route_uniqueness(self) -> None:
        """A disabled handler keeps its routes, so it still claims its command types."""
        app = App(
            dogma.via_aggregate(aggregate()),
            dogma.via_integration(integration("int", KEY_3, handles_command(Open), disable=True)),
        )

        assert only_problem(app).startswith("command type test_config.Open is handled by")

    def test_many_handlers_may_handle_one_event_type(self) -> None:
        app = App(
            dogma.via_aggregate(aggregate()),
            dogma.via_process(process()),
            dogma.via_projection(projection()),
        )

        config = build(app, registry=REGISTRY)

        assert [h.identity.name for h in config.event_consumers(Opened)] == ["proc", "proj"]

    def test_unregistered_types_are_refused(self) -> None:
        """A type registered elsewhere than the engine's registry cannot be decoded; refuse it."""
        route = dogma.handles_command(Stranger, registry=OTHER_REGISTRY)
        app = App(dogma.via_aggregate(aggregate("agg", KEY_1, route, records_event(Opened))))

        assert problems_of(app) == (
            f"{AGG}: route handles_command(Stranger): test_config.Stranger "
            "(c0000000-0000-4000-8000-0000000000ff) is not in the message type registry; "
            "register it with @dogma.register_command('<uuid>')",
            f"{AGG}: has no handles_command route, but it must handle at least one command "
            "type; add dogma.handles_command(<CommandClass>) to its routes",
        )

    def test_route_of_the_wrong_message_kind_is_refused(self) -> None:
        """dogma's constructors check kinds; a hand-made route object is checked again."""
        bad = dogma.HandlesCommandRoute(REGISTRY.of(Opened))  # type: ignore[arg-type]
        app = App(
            dogma.via_aggregate(
                aggregate("agg", KEY_1, handles_command(Open), bad, records_event(Opened))
            )
        )

        assert only_problem(app) == (
            f"{AGG}: route handles_command(Opened): test_config.Opened is an event, but "
            "handles_command routes take command types; use a command type"
        )

    def test_values_that_are_not_routes_are_refused(self) -> None:
        handler = aggregate("agg", KEY_1, handles_command(Open), records_event(Opened), "Open")
        app = App(dogma.via_aggregate(handler), 42)

        assert problems_of(app) == (
            "application 'app' (test_config.App): routes() was given 42 (int), which "
            "is not a handler route; wrap each handler with dogma.via_aggregate(), "
            "via_process(), via_integration() or via_projection()",
            f"{AGG}: routes() was given 'Open' (str), which is not a message route; "
            "use dogma.handles_command(), records_event(), handles_event(), "
            "executes_command() or schedules_deadline()",
        )

    def test_a_handler_object_routed_twice_is_refused(self) -> None:
        handler = aggregate()
        app = App(dogma.via_aggregate(handler), dogma.via_aggregate(handler))

        assert only_problem(app) == (
            "application 'app' (test_config.App): aggregate test_config.Aggregate is routed "
            "more than once; pass each handler object to routes() once"
        )


class TestConcurrencyPreference:
    @pytest.mark.parametrize("make", [aggregate, process])
    def test_only_integrations_and_projections_accept_it(
        self, make: Callable[..., Handler]
    ) -> None:
        handler = make(concurrency=dogma.ConcurrencyPreference.MINIMIZE)
        kind = "aggregate" if make is aggregate else "process"
        label = AGG if make is aggregate else PROC

        assert only_problem(App(getattr(dogma, f"via_{kind}")(handler))) == (
            f"{label}: concurrency_preference() is only supported on integrations and "
            f"projections; remove the call from the {kind}'s configure()"
        )

    def test_value_must_be_a_concurrency_preference(self) -> None:
        app = App(dogma.via_projection(projection(concurrency=1)))

        assert only_problem(app) == (
            f"{PROJ}: concurrency_preference(1) is not a dogma.ConcurrencyPreference; "
            "use ConcurrencyPreference.MAXIMIZE or ConcurrencyPreference.MINIMIZE"
        )


class TestDeterminism:
    def test_handler_routes_that_change_between_calls_are_refused(self) -> None:
        calls = iter([(handles_command(Open),), (handles_command(Notify),)])

        def configure(c: Any) -> None:
            c.identity("int", KEY_3)
            c.routes(*next(calls))

        assert only_problem(App(dogma.via_integration(Integration(configure)))) == (
            f"integration 'int' (key {KEY_3}, test_config.Integration): configure() declared "
            "a different configuration on the second call (routes [handles_command(Open)] then "
            "[handles_command(Notify)]); configure() must declare the same configuration "
            "every time it is called"
        )

    def test_disable_that_changes_between_calls_is_refused(self) -> None:
        flags = iter([False, True])

        def configure(c: Any) -> None:
            c.identity("proj", KEY_4)
            c.routes(handles_event(Opened))
            if next(flags):
                c.disable()

        assert only_problem(App(dogma.via_projection(Projection(configure)))) == (
            f"{PROJ}: configure() declared a different configuration on the second call "
            "(disabled False then True); configure() must declare the same configuration "
            "every time it is called"
        )

    def test_application_handlers_that_change_between_calls_are_refused(self) -> None:
        class FlakyApp:
            def __init__(self) -> None:
                self.first = True

            def configure(self, c: dogma.ApplicationConfigurer) -> None:
                c.identity("app", APP_KEY)
                c.routes(dogma.via_aggregate(aggregate()))
                if not self.first:
                    c.routes(dogma.via_projection(projection()))
                self.first = False

        assert only_problem(FlakyApp()) == (
            "application 'app' (test_config.TestDeterminism."
            "test_application_handlers_that_change_between_calls_are_refused.<locals>.FlakyApp): "
            "routes() declared different handlers on the second call ([via_aggregate(Aggregate)] "
            "then [via_aggregate(Aggregate), via_projection(Projection)]); configure() must "
            "declare the same configuration every time it is called"
        )

    def test_configure_that_raises_only_on_the_second_call_is_refused(self) -> None:
        calls = iter([None, RuntimeError("flaky")])

        def configure(c: Any) -> None:
            error = next(calls)
            if error is not None:
                raise error
            c.identity("proj", KEY_4)
            c.routes(handles_event(Opened))

        assert only_problem(App(dogma.via_projection(Projection(configure)))) == (
            f"{PROJ}: configure() raised RuntimeError: flaky only on the second call; "
            "configure() must declare the same configuration every time it is called"
        )

    def test_application_identity_that_changes_between_calls_is_refused(self) -> None:
        names = iter(["app", "renamed"])

        class RenamingApp:
            def configure(self, c: dogma.ApplicationConfigurer) -> None:
                c.identity(next(names), APP_KEY)
                c.routes(dogma.via_aggregate(aggregate()))

        assert only_problem(RenamingApp()).endswith(
            f"identity() was called with different arguments on the second call (('app', "
            f"'{APP_KEY}') then ('renamed', '{APP_KEY}')); configure() must declare the same "
            "configuration every time it is called"
        )

    def test_fresh_but_equivalent_handler_objects_are_accepted(self) -> None:
        """An application may build new handler objects on each call, if they are alike."""

        class FreshApp:
            def configure(self, c: dogma.ApplicationConfigurer) -> None:
                c.identity("app", APP_KEY)
                c.routes(dogma.via_aggregate(aggregate()))

        app = FreshApp()

        assert build(app, registry=REGISTRY).handlers[0].identity.name == "agg"


class TestConfigureErrors:
    def test_application_configure_that_raises_is_reported(self) -> None:
        class BrokenApp:
            def configure(self, c: dogma.ApplicationConfigurer) -> None:
                raise RuntimeError("no database")

        problem = only_problem(BrokenApp())

        assert problem.endswith(
            "BrokenApp: configure() raised RuntimeError: no database; "
            "fix the application's configure()"
        )

    def test_handler_configure_that_raises_is_reported_with_the_rest(self) -> None:
        def configure(c: Any) -> None:
            raise KeyError("boom")

        app = App(dogma.via_aggregate(Aggregate(configure)), identity=None)

        with pytest.raises(ConfigurationError) as info:
            build(app, registry=REGISTRY)
        assert isinstance(info.value.__cause__, KeyError)
        assert problems_of(app) == (
            "application test_config.App: the application has no identity; "
            "call c.identity(name, key) once in configure()",
            "aggregate test_config.Aggregate: configure() raised KeyError: 'boom'; "
            "fix the handler's configure()",
        )

    def test_handler_configure_that_raises_does_not_hide_an_invalid_app_key(self) -> None:
        def configure(c: Any) -> None:
            raise KeyError("boom")

        app = App(
            dogma.via_aggregate(Aggregate(configure)),
            dogma.via_projection(projection("proj", "not-a-uuid")),
            identity=("app", "also-not-a-uuid"),
        )

        problems = problems_of(app)

        assert len(problems) == 3, problems
        assert problems[0].startswith(
            "application test_config.App: invalid identity key 'also-not-a-uuid'"
        )
        assert problems[1] == (
            "aggregate test_config.Aggregate: configure() raised KeyError: 'boom'; "
            "fix the handler's configure()"
        )
        assert problems[2].startswith("projection test_config.Projection: invalid identity key")

    def test_application_configure_that_raises_still_reports_what_it_declared(self) -> None:
        # dogma.via_aggregate() refuses a handler without the aggregate methods, so
        # configure() raises after declaring an invalid identity and one handler.
        class HalfApp:
            def configure(self, c: dogma.ApplicationConfigurer) -> None:
                c.identity("app", "not-a-uuid")
                c.routes(dogma.via_integration(integration("int", "bad-key")))
                c.routes(dogma.via_aggregate(object()))

        problems = problems_of(HalfApp())

        assert len(problems) == 3, problems
        assert "HalfApp: configure() raised TypeError:" in problems[0]
        assert problems[0].endswith("fix the application's configure()")
        assert "HalfApp: invalid identity key 'not-a-uuid'" in problems[1]
        assert problems[2].startswith(
            "integration test_config.Integration: invalid identity key 'bad-key'"
        )

    def test_application_configure_that_raises_before_its_identity_is_one_problem(
        self,
    ) -> None:
        class EarlyApp:
            def configure(self, c: dogma.ApplicationConfigurer) -> None:
                raise RuntimeError("no database")

        # No "has no identity" next to it: configure() stopped before declaring one.
        assert only_problem(EarlyApp()).endswith(
            "configure() raised RuntimeError: no database; fix the application's configure()"
        )


class TestModel:
    @pytest.fixture
    def config(self) -> ApplicationConfig:
        return build(
            App(
                dogma.via_aggregate(aggregate()),
                dogma.via_process(
                    process(
                        "proc",
                        KEY_2,
                        handles_event(Opened),
                        handles_event(Notified),
                        executes_command(Notify),
                        schedules_deadline(Reminder),
                    )
                ),
                dogma.via_integration(integration()),
                dogma.via_projection(projection()),
                dogma.via_projection(
                    projection("off", "b0000000-0000-4000-8000-000000000005", disable=True)
                ),
            ),
            registry=REGISTRY,
        )

    def test_values_are_frozen(self, config: ApplicationConfig) -> None:
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            config.handlers = ()  # type: ignore[misc]
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            config.handlers[0].disabled = True  # type: ignore[misc]

    def test_handler_lookups(self, config: ApplicationConfig) -> None:
        proc = config.handler_by_name("proc")

        assert proc is not None
        assert proc.kind is HandlerKind.PROCESS
        assert config.handler_by_key(KEY_2.upper()) is proc
        assert config.handler_by_name("nope") is None
        assert config.handler_by_key(APP_KEY) is None

    def test_command_handler_and_recorder(self, config: ApplicationConfig) -> None:
        assert _name(config.command_handler(Open)) == "agg"
        assert _name(config.command_handler(Notify)) == "int"
        assert config.command_handler(Unused) is None
        assert _name(config.recorder_of(Opened)) == "agg"
        assert _name(config.recorder_of(Notified)) == "int"
        assert config.recorder_of(Closed) is None

    def test_event_consumers_are_enabled_processes_and_projections(
        self, config: ApplicationConfig
    ) -> None:
        """The disabled projection 'off' also handles Opened but is left out."""
        assert [h.identity.name for h in config.event_consumers(Opened)] == ["proc", "proj"]
        assert [h.identity.name for h in config.event_consumers(Notified)] == ["proc"]
        assert config.event_consumers(Closed) == ()

    def test_enabled_handlers(self, config: ApplicationConfig) -> None:
        assert [h.identity.name for h in config.enabled_handlers()] == [
            "agg",
            "proc",
            "int",
            "proj",
        ]
        assert [h.identity.name for h in config.enabled_handlers(HandlerKind.PROJECTION)] == [
            "proj"
        ]

    def test_message_types_in_order_of_first_use(self, config: ApplicationConfig) -> None:
        assert [t.cls for t in config.message_types()] == [
            Open,
            Opened,
            Notified,
            Notify,
            Reminder,
        ]

    def test_consumed_and_produced_types(self, config: ApplicationConfig) -> None:
        proc = config.handler_by_name("proc")
        assert proc is not None

        assert [t.cls for t in proc.consumed_types()] == [Opened, Notified, Reminder]
        assert [t.cls for t in proc.produced_types()] == [Notify, Reminder]
        assert proc.handles(Reminder)
        assert proc.handles(Opened)
        assert not proc.handles(Notify)

    def test_types_of_route_kinds(self, config: ApplicationConfig) -> None:
        proc = config.handler_by_name("proc")
        assert proc is not None

        assert [t.cls for t in proc.types_of(RouteKind.HANDLES_EVENT)] == [Opened, Notified]
        assert [t.cls for t in proc.types_of(RouteKind.EXECUTES_COMMAND)] == [Notify]
        assert proc.produces(Notify)
        assert not proc.produces(Opened)

    def test_descriptions(self, config: ApplicationConfig) -> None:
        assert str(config.handlers[0].routes[0]) == "handles_command(Open)"
        assert local(config.handlers[0].describe()) == (
            f"aggregate 'agg' ({KEY_1}) [test_config.Aggregate]"
        )

    def test_public_names_live_in_runkit_config(self) -> None:
        assert (ApplicationConfig.__module__, HandlerConfig.__module__, build.__module__) == (
            "runkit.config",
            "runkit.config",
            "runkit.config",
        )


class TestReachableEvents:
    def test_events_follow_transitively_through_processes(self) -> None:
        """Open -> agg records Opened -> proc executes Notify -> int records Notified."""
        config = build(bank_like_app(), registry=REGISTRY)

        assert config.reachable_events(Open) == frozenset({Opened, Notified})
        assert config.reachable_events(Notify) == frozenset({Notified})

    def test_unhandled_command_reaches_nothing(self) -> None:
        config = build(bank_like_app(), registry=REGISTRY)

        assert config.reachable_events(Unused) == frozenset()

    def test_disabled_handlers_break_the_chain(self) -> None:
        config = build(
            App(
                dogma.via_aggregate(aggregate()),
                dogma.via_process(process(disable=True)),
                dogma.via_integration(integration()),
            ),
            registry=REGISTRY,
        )

        assert config.reachable_events(Open) == frozenset({Opened})

    def test_disabled_command_handler_reaches_nothing(self) -> None:
        config = build(App(dogma.via_aggregate(aggregate(disable=True))), registry=REGISTRY)

        assert config.reachable_events(Open) == frozenset()

    def test_cycles_terminate(self) -> None:
        """Open -> Opened -> proc executes Open again: the walk still ends."""
        config = build(
            App(
                dogma.via_aggregate(aggregate()),
                dogma.via_process(
                    process("proc", KEY_2, handles_event(Opened), executes_command(Open))
                ),
            ),
            registry=REGISTRY,
        )

        assert config.reachable_events(Open) == frozenset({Opened})


def _show(route: Any) -> str:
    kind = {
        dogma.HandlesCommandRoute: "handles_command",
        dogma.RecordsEventRoute: "records_event",
        dogma.HandlesEventRoute: "handles_event",
        dogma.ExecutesCommandRoute: "executes_command",
        dogma.SchedulesDeadlineRoute: "schedules_deadline",
    }[type(route)]
    return f"{kind}({route.type.cls.__qualname__})"


def _name(h: HandlerConfig | None) -> str | None:
    return None if h is None else h.identity.name
