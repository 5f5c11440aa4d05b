"""``wait_for_observers`` (seam 4): satisfied, raising, cancelled, not satisfiable."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import anyio
import attrs
import pytest

import dogma
from runkit.config import ApplicationConfig, build
from runkit.engine.envelope import Envelope, new_envelope, register_types
from runkit.engine.events.observers import wait_for_observers
from runkit.engine.streams import Observed, StreamEvent

REGISTRY = dogma.MessageTypeRegistry()
APP_KEY = "a3000000-0000-4000-8000-000000000001"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@dogma.register_command("c3000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Open(dogma.Command):
    id: str


@dogma.register_command("c3000000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class Notify(dogma.Command):
    id: str


@dogma.register_command("c3000000-0000-4000-8000-000000000003", registry=REGISTRY)
@attrs.frozen
class Close(dogma.Command):
    id: str


@dogma.register_event("e3000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Opened(dogma.Event):
    id: str


@dogma.register_event("e3000000-0000-4000-8000-000000000004", registry=REGISTRY)
@attrs.frozen
class ReOpened(Opened):
    pass


@dogma.register_event("e3000000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class Notified(dogma.Event):
    id: str


@dogma.register_event("e3000000-0000-4000-8000-000000000003", registry=REGISTRY)
@attrs.frozen
class Closed(dogma.Event):
    id: str


class Aggregate:
    def configure(self, c: Any) -> None:
        c.identity("accounts", "b3000000-0000-4000-8000-000000000001")
        c.routes(
            dogma.handles_command(Open, registry=REGISTRY),
            dogma.records_event(Opened, registry=REGISTRY),
            dogma.records_event(ReOpened, registry=REGISTRY),
        )

    def new(self) -> Any:
        return None

    def route_command_to_instance(self, command: Any) -> str:
        return str(command.id)

    def handle_command(self, root: Any, scope: Any, command: Any) -> None:
        raise AssertionError("not called")


class Closer(Aggregate):
    def configure(self, c: Any) -> None:
        c.identity("closer", "b3000000-0000-4000-8000-000000000004")
        c.routes(
            dogma.handles_command(Close, registry=REGISTRY),
            dogma.records_event(Closed, registry=REGISTRY),
        )


class Process(dogma.StatelessProcessBehavior, dogma.NoDeadlineMessagesBehavior):
    async def route_event_to_instance(self, event: Any) -> str | None:
        raise AssertionError("not called")

    async def handle_event(self, root: Any, scope: Any, event: Any) -> None:
        raise AssertionError("not called")

    def configure(self, c: Any) -> None:
        c.identity("proc", "b3000000-0000-4000-8000-000000000002")
        c.routes(
            dogma.handles_event(Opened, registry=REGISTRY),
            dogma.executes_command(Notify, registry=REGISTRY),
        )


class Integration:
    async def handle_command(self, scope: Any, command: Any) -> None:
        raise AssertionError("not called")

    def configure(self, c: Any) -> None:
        c.identity("notifier", "b3000000-0000-4000-8000-000000000003")
        c.routes(
            dogma.handles_command(Notify, registry=REGISTRY),
            dogma.records_event(Notified, registry=REGISTRY),
        )


class App:
    def configure(self, c: Any) -> None:
        c.identity("app", APP_KEY)
        c.routes(
            dogma.via_aggregate(Aggregate()),
            dogma.via_aggregate(Closer()),
            dogma.via_process(Process()),
            dogma.via_integration(Integration()),
        )


@pytest.fixture(scope="module")
def app() -> ApplicationConfig:
    config = build(App(), registry=REGISTRY)
    register_types(config.message_types())
    return config


def command(cmd: dogma.Command) -> Envelope:
    return new_envelope(cmd, app_key=APP_KEY, site_key=None, created_at=NOW)


def event(e: dogma.Event, correlation: Envelope, offset: int = 0) -> StreamEvent:
    env = new_envelope(
        e,
        app_key=APP_KEY,
        site_key=None,
        created_at=NOW,
        causation_id=correlation.message_id,
        correlation_id=correlation.correlation_id,
    )
    return StreamEvent(str(uuid.uuid4()), offset, env, NOW)


class feed:
    """A plain async iterator (not a generator: nothing to close when abandoned)."""

    def __init__(self, events: Iterable[Observed], *, then_wait: bool = False) -> None:
        self._events = list(events)
        self._then_wait = then_wait

    def __aiter__(self) -> feed:
        return self

    async def __anext__(self) -> Observed:
        if self._events:
            return self._events.pop(0)
        if self._then_wait:
            await anyio.sleep_forever()
        raise StopAsyncIteration


class Recorder:
    def __init__(self, *answers: bool, error: Exception | None = None) -> None:
        self.answers = list(answers)
        self.seen: list[Any] = []
        self.error = error

    async def __call__(self, e: Any) -> bool:
        self.seen.append(e)
        if self.error is not None:
            raise self.error
        return self.answers.pop(0) if self.answers else False


def observe(cls: type[Any], fn: Any) -> dogma.EventObserver[Any]:
    return dogma.observe(cls, fn, registry=REGISTRY)


async def test_returns_when_an_observer_is_satisfied_downstream(app: ApplicationConfig) -> None:
    cmd = command(Open("a"))
    notified = Recorder(False, True)
    opened = Recorder()
    events = [
        event(Opened("a"), cmd),
        event(Notified("x"), cmd),
        event(Notified("y"), cmd),
        event(Notified("z"), cmd),  # never reached
    ]
    await wait_for_observers(
        app, cmd, Open, [observe(Opened, opened), observe(Notified, notified)], feed(events)
    )
    assert opened.seen == [Opened("a")]
    assert notified.seen == [Notified("x"), Notified("y")]


async def test_ignores_other_correlations_and_types(app: ApplicationConfig) -> None:
    cmd, other = command(Open("a")), command(Open("b"))
    notified = Recorder(True)
    events = [event(Notified("other"), other), event(Opened("a"), cmd), event(Notified("a"), cmd)]
    await wait_for_observers(app, cmd, Open, [observe(Notified, notified)], feed(events))
    assert notified.seen == [Notified("a")]


async def test_an_event_of_a_type_unknown_here_is_passed_over(app: ApplicationConfig) -> None:
    # A peer running a newer version of the application (mid rolling upgrade)
    # may record events of types this node has never registered. No observer
    # here can want them: the command's observers go on, not a LookupError.
    import msgspec

    cmd = command(Open("a"))
    opened = Recorder(True)
    newer = event(Opened("a"), cmd)
    unknown = msgspec.structs.replace(
        newer, envelope=msgspec.structs.replace(newer.envelope, type_id=str(uuid.uuid4()))
    )
    await wait_for_observers(
        app, cmd, Open, [observe(Opened, opened)], feed([unknown, event(Opened("a"), cmd)])
    )
    assert opened.seen == [Opened("a")]


async def test_a_stopped_note_ends_the_wait_with_its_error_and_its_wire_form_is_ignored(
    app: ApplicationConfig,
) -> None:
    # A stopping gateway delivers a Stopped note to its subscriptions; a peer
    # that receives it over the wire gets a plain note of no command, which
    # must not end (or decide) its own calls.
    from runkit.engine.cluster.wire import from_wire, to_wire
    from runkit.engine.streams import EventBus, Stopped

    class Gone(Exception):
        pass

    cmd = command(Open("a"))
    bus = EventBus()
    async with bus.subscribe(cmd.correlation_id) as events:
        bus.end(lambda: Gone("stopped"))
        with pytest.raises(Gone, match="stopped"):
            await wait_for_observers(app, cmd, Open, [observe(Notified, Recorder(True))], events)

    note = Stopped("", "", False, error=lambda: Gone("stopped"))
    relayed = from_wire(to_wire(note))
    assert not isinstance(relayed, Stopped)
    notified = Recorder(True)
    await wait_for_observers(
        app, cmd, Open, [observe(Notified, notified)], feed([relayed, event(Notified("a"), cmd)])
    )
    assert notified.seen == [Notified("a")]


async def test_subclasses_of_the_observed_type_match(app: ApplicationConfig) -> None:
    cmd = command(Open("a"))
    opened = Recorder(True)
    await wait_for_observers(
        app, cmd, Open, [observe(Opened, opened)], feed([event(ReOpened("a"), cmd)])
    )
    assert opened.seen == [ReOpened("a")]


async def test_each_observer_gets_its_own_copy(app: ApplicationConfig) -> None:
    cmd = command(Open("a"))
    first, second = Recorder(False), Recorder(True)
    await wait_for_observers(
        app,
        cmd,
        Open,
        [observe(Opened, first), observe(Opened, second)],
        feed([event(Opened("a"), cmd)]),
    )
    assert first.seen == second.seen == [Opened("a")]
    assert first.seen[0] is not second.seen[0]


async def test_an_observer_error_propagates(app: ApplicationConfig) -> None:
    cmd = command(Open("a"))
    failing = Recorder(error=LookupError("boom"))
    with pytest.raises(LookupError, match="boom"):
        await wait_for_observers(
            app, cmd, Open, [observe(Opened, failing)], feed([event(Opened("a"), cmd)])
        )


async def test_the_caller_can_cancel(app: ApplicationConfig) -> None:
    cmd = command(Open("a"))
    opened = Recorder(False)
    with anyio.move_on_after(0.05) as scope:
        await wait_for_observers(
            app,
            cmd,
            Open,
            [observe(Opened, opened)],
            feed([event(Opened("a"), cmd)], then_wait=True),
        )
    assert scope.cancelled_caught
    assert opened.seen == [Opened("a")]


async def test_unreachable_observed_types_fail_at_once(app: ApplicationConfig) -> None:
    cmd = command(Open("a"))
    closed = Recorder(True)
    consumed = False

    class Events(feed):
        async def __anext__(self) -> Observed:
            nonlocal consumed
            consumed = True
            return await super().__anext__()

    def events() -> Events:
        return Events([event(Closed("a"), cmd)])

    with pytest.raises(dogma.EventObserverNotSatisfied, match="Closed"):
        await wait_for_observers(app, cmd, Open, [observe(Closed, closed)], events())
    assert not consumed
    assert closed.seen == []
    # Notify's chain records only Notified: Opened cannot follow from it.
    with pytest.raises(dogma.EventObserverNotSatisfied):
        await wait_for_observers(
            app, command(Notify("a")), Notify, [observe(Opened, closed)], events()
        )


async def test_unreachable_observers_are_not_fed(app: ApplicationConfig) -> None:
    cmd = command(Open("a"))
    closed, opened = Recorder(True), Recorder(True)
    await wait_for_observers(
        app,
        cmd,
        Open,
        [observe(Closed, closed), observe(Opened, opened)],
        feed([event(Closed("a"), cmd), event(Opened("a"), cmd)]),
    )
    assert closed.seen == []
    assert opened.seen == [Opened("a")]


async def test_events_ending_unsatisfied_raise(app: ApplicationConfig) -> None:
    cmd = command(Open("a"))
    with pytest.raises(dogma.EventObserverNotSatisfied):
        await wait_for_observers(
            app, cmd, Open, [observe(Opened, Recorder(False))], feed([event(Opened("a"), cmd)])
        )


async def test_no_observers_returns_at_once(app: ApplicationConfig) -> None:
    await wait_for_observers(app, command(Open("a")), Open, [], feed([], then_wait=True))


# -- the chain's first command is done: what can still follow -------------------------


def done(cmd: Envelope, *, conclusive: bool = True) -> Any:
    from runkit.engine.streams import CommandDone

    return CommandDone(cmd.correlation_id, cmd.message_id, conclusive)


class mixed:
    """Events and notes, then wait (as a live subscription does)."""

    def __init__(self, items: Iterable[Any]) -> None:
        self._items = list(items)

    def __aiter__(self) -> mixed:
        return self

    async def __anext__(self) -> Any:
        if self._items:
            return self._items.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


async def test_not_satisfied_once_the_command_is_done_and_nothing_observed_can_follow(
    app: ApplicationConfig,
) -> None:
    # Open may record Opened or ReOpened (statically both are reachable); it
    # recorded Opened, from which only Notified can follow: ReOpened never will.
    cmd = command(Open("a"))
    with anyio.fail_after(2), pytest.raises(dogma.EventObserverNotSatisfied, match="ReOpened"):
        await wait_for_observers(
            app,
            cmd,
            Open,
            [observe(ReOpened, Recorder())],
            mixed([event(Opened("a"), cmd), done(cmd)]),
        )


async def test_a_command_that_recorded_nothing_satisfies_nothing(app: ApplicationConfig) -> None:
    cmd = command(Open("a"))
    with anyio.fail_after(2), pytest.raises(dogma.EventObserverNotSatisfied, match="no events"):
        await wait_for_observers(app, cmd, Open, [observe(Opened, Recorder())], mixed([done(cmd)]))


async def test_keeps_waiting_while_a_process_can_still_produce_the_observed_event(
    app: ApplicationConfig,
) -> None:
    # Notified can still follow Opened (the process executes Notify): wait for it.
    cmd = command(Open("a"))
    notified = Recorder(True)
    with anyio.fail_after(2):
        await wait_for_observers(
            app,
            cmd,
            Open,
            [observe(Notified, notified)],
            mixed([event(Opened("a"), cmd), done(cmd), event(Notified("n"), cmd)]),
        )
    assert len(notified.seen) == 1


async def test_an_inconclusive_done_note_decides_nothing(app: ApplicationConfig) -> None:
    # A repeated command whose original events could not be re-delivered.
    cmd = command(Open("a"))
    with anyio.move_on_after(0.3) as waited:
        await wait_for_observers(
            app, cmd, Open, [observe(ReOpened, Recorder())], mixed([done(cmd, conclusive=False)])
        )
    assert waited.cancelled_caught


# -- the bus keeps recent events for late subscribers -------------------------------


async def _replayed(bus: Any, correlation_id: str) -> list[Any]:
    events: Any
    async with bus.subscribe(correlation_id, replay=True) as events:
        received = []
        while events.pending():
            received.append(await events.__anext__())
        return received


async def test_a_replaying_subscription_starts_with_the_chains_recent_events(
    app: ApplicationConfig,
) -> None:
    from runkit.engine.streams import CommandDone, EventBus

    a, b = command(Open("a")), command(Open("b"))
    bus = EventBus()
    first, other, second = (
        event(Opened("a"), a, 0),
        event(Opened("b"), b, 1),
        event(Closed("a"), a, 2),
    )
    bus.publish([first, other])
    done = CommandDone(a.correlation_id, a.message_id, conclusive=True)
    bus.note(done)
    bus.publish([second])
    assert await _replayed(bus, a.correlation_id) == [first, done, second]
    assert await _replayed(bus, b.correlation_id) == [other]
    live: Any
    async with bus.subscribe(a.correlation_id) as live:  # no replay: nothing yet
        assert not live.pending()


async def test_the_bus_keeps_a_bounded_number_of_recent_events_for_a_bounded_time(
    app: ApplicationConfig,
) -> None:
    from runkit.engine.streams import EventBus

    now = [0.0]
    bus = EventBus(recent_events=3, recent_seconds=10.0, clock=lambda: now[0])
    a = command(Open("a"))
    events = [event(Opened(str(i)), a, i) for i in range(5)]
    bus.publish(events)
    assert await _replayed(bus, a.correlation_id) == events[2:]  # the newest three
    now[0] = 10.5
    assert await _replayed(bus, a.correlation_id) == []  # older than ten seconds
    assert not bus._recent
    assert not bus._order


async def test_a_command_whose_observers_can_never_be_satisfied_runs_then_raises() -> None:
    # Rule 1 is known from the route graph, yet the command still runs: it was
    # refused before, so the error meant "not executed" here and "executed" under
    # rule 2, and a caller that took it as done (as the bank's UI does) lost it.
    import sys
    from pathlib import Path

    from runkit_memory import MemoryProvider

    sys.path.insert(0, str(Path(__file__).parent))
    import engine_commands_harness as ch

    s = ch.setup()
    provider = MemoryProvider(f"observers-{uuid.uuid4()}")
    async with ch.running(provider, s.config, partition_count=1) as engine:

        async def notified(event: ch.Notified) -> bool:
            return True

        with pytest.raises(dogma.EventObserverNotSatisfied, match="the command was executed"):
            await engine.executor_for(s.app).execute_command(
                ch.Deposit("a", 1),
                observers=[dogma.observe(ch.Notified, notified, registry=ch.REGISTRY)],
            )
        stores = await ch.settled(provider)
    assert len(stores.published()) == 1  # the deposit was handled
    ch.check_invariants(stores)


async def test_a_subscription_passes_each_stream_event_once_and_every_note(
    app: ApplicationConfig,
) -> None:
    # The bus and the peers' streams deliver into one stream, and a peer's
    # replay repeats what it sent: observers must see each event once.
    from runkit.engine.streams import CommandDone, Observed, UniqueEvents

    cmd = command(Open("a"))
    first, second = event(Opened("a"), cmd, offset=0), event(Opened("a"), cmd, offset=1)
    done = CommandDone(cmd.correlation_id, cmd.message_id, conclusive=True)
    send, receive = anyio.create_memory_object_stream[Observed](10)
    for item in (first, first, second, done, first, done):
        send.send_nowait(item)
    send.close()
    with receive:
        assert [item async for item in UniqueEvents(receive)] == [first, second, done, done]


async def test_a_lone_subscription_routed_when_peers_join_passes_events_once_and_leaves_clean(
    app: ApplicationConfig,
) -> None:
    # A lone node's subscription starts on the bus alone; routed when peers
    # join (from when it began), it gets the peers' events too, each once,
    # and leaves the router's observation when the caller is cancelled.
    from contextlib import contextmanager

    from anyio.streams.memory import MemoryObjectSendStream

    from runkit.engine.cluster.lone import LoneSubscriptions
    from runkit.engine.streams import EventBus

    cmd = command(Open("a"))
    first, second = event(Opened("a"), cmd, offset=0), event(Opened("a"), cmd, offset=1)
    routed: list[tuple[Any, ...]] = []
    feeds: list[MemoryObjectSendStream[Observed]] = []

    class Router:
        @contextmanager
        def observation(
            self,
            app_key: str,
            correlation_id: str,
            send: MemoryObjectSendStream[Observed],
            partition: int | None,
            *,
            since: datetime,
        ) -> Any:
            routed.append((app_key, correlation_id, partition, since))
            feeds.append(send)
            try:
                yield
            finally:
                feeds.remove(send)

    bus = EventBus()
    lone = LoneSubscriptions(bus)
    router: Any = Router()
    received: list[Any] = []
    began = datetime.now(UTC)
    async with anyio.create_task_group() as tg:

        async def observe_chain() -> None:
            async with lone.subscribe(APP_KEY, cmd.correlation_id, 3) as events:
                async for item in events:
                    received.append(item)

        tg.start_soon(observe_chain)
        await anyio.wait_all_tasks_blocked()
        bus.publish([first])
        lone.route(router)
        lone.route(router)  # already routed: once
        assert [(k, c, p) for k, c, p, _ in routed] == [(APP_KEY, cmd.correlation_id, 3)]
        assert routed[0][3] >= began
        feeds[0].send_nowait(first)  # a peer's replay repeats it
        feeds[0].send_nowait(second)
        bus.publish([second])
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert received == [first, second]
    assert not feeds
    assert not lone._open
    assert not bus.has_subscribers(cmd.correlation_id)
