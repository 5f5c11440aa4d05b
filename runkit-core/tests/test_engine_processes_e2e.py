"""End to end through ``Engine``: processes, deadlines, projections and observers together.

An account aggregate, a process that credits each opened account at once and
again when its deadline fires (then ends), an ADR-26 projection of every
event, and observers on the executor. Checks exactly-once effects (invariants
9.4-9.6) with an injected clock, restarts and write faults.
"""

from __future__ import annotations

import functools
import json
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

import dogma
from runkit.config import ApplicationConfig, build
from runkit.engine.engine import Engine
from runkit.engine.events import consumers as consumers_module
from runkit.engine.events.consumers import ConsumerOptions
from runkit.engine.settings import EngineSettings
from runkit.persistence import Provider
from runkit.testing.faults import AFTER, BEFORE, FaultPlan, FaultyProvider
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_events_harness import FakeClock, wait_until

REGISTRY = dogma.MessageTypeRegistry()
APP_KEY = "a4000000-0000-4000-8000-000000000001"
OPTIONS = ConsumerOptions(
    retry_initial=0.001,
    retry_max=0.01,
    checkpoint_interval=0.01,
    compact_interval=0.01,
    deadline_rescan_interval=0.01,
)


@dogma.register_command("c4000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Open(dogma.Command):
    id: str


@dogma.register_command("c4000000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class Credit(dogma.Command):
    id: str
    amount: int


@dogma.register_event("e4000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Opened(dogma.Event):
    id: str


@dogma.register_event("e4000000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class Credited(dogma.Event):
    id: str
    amount: int


@dogma.register_event("e4000000-0000-4000-8000-000000000003", registry=REGISTRY)
@attrs.frozen
class NeverRecorded(dogma.Event):
    id: str


@dogma.register_deadline("d4000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Bonus(dogma.Deadline):
    id: str


class Account:
    def apply_event(self, event: dogma.Event) -> None:
        pass

    def marshal_binary(self) -> bytes:
        raise dogma.NotSupported()

    def unmarshal_binary(self, data: bytes) -> None:
        raise dogma.NotSupported()


class Accounts:
    def configure(self, c: Any) -> None:
        c.identity("accounts", "b4000000-0000-4000-8000-000000000001")
        c.routes(
            dogma.handles_command(Open, registry=REGISTRY),
            dogma.handles_command(Credit, registry=REGISTRY),
            dogma.records_event(Opened, registry=REGISTRY),
            dogma.records_event(Credited, registry=REGISTRY),
        )

    def new(self) -> Account:
        return Account()

    def route_command_to_instance(self, command: Any) -> str:
        return str(command.id)

    def handle_command(self, root: Account, scope: Any, command: dogma.Command) -> None:
        if isinstance(command, Open):
            scope.record_event(Opened(command.id))
        elif isinstance(command, Credit):
            scope.record_event(Credited(command.id, command.amount))


@attrs.define
class Root:
    credited: list[int] = attrs.field(factory=list)

    def process_instance_description(self, ended: bool) -> str:
        return ""

    def marshal_binary(self) -> bytes:
        return json.dumps(self.credited).encode()

    def unmarshal_binary(self, data: bytes) -> None:
        self.credited = json.loads(data)


class Welcome:
    """Credits 1 at once, schedules a Bonus in 10 s; the Bonus credits 100 and ends."""

    def __init__(self) -> None:
        self.roots: dict[str, list[int]] = {}
        self.deadline_times: list[tuple[Any, Any]] = []
        self.disabled = False

    def configure(self, c: Any) -> None:
        c.identity("welcome", "b4000000-0000-4000-8000-000000000002")
        if self.disabled:
            c.disable()
        c.routes(
            dogma.handles_event(Opened, registry=REGISTRY),
            dogma.handles_event(Credited, registry=REGISTRY),
            dogma.executes_command(Credit, registry=REGISTRY),
            dogma.schedules_deadline(Bonus, registry=REGISTRY),
        )

    def new(self) -> Root:
        return Root()

    async def route_event_to_instance(self, event: Any) -> str | None:
        return str(event.id)

    async def handle_event(
        self, root: Root, scope: dogma.ProcessEventScope[Root], event: dogma.Event
    ) -> None:
        if isinstance(event, Opened):
            scope.execute_command(Credit(event.id, 1))
            scope.schedule_deadline(Bonus(event.id), scope.now() + timedelta(seconds=10))
        elif isinstance(event, Credited):
            amount = event.amount
            scope.mutate(lambda r: r.credited.append(amount))
            self.roots[event.id] = list(root.credited)

    async def handle_deadline(
        self, root: Root, scope: dogma.ProcessDeadlineScope[Root], deadline: dogma.Deadline
    ) -> None:
        assert isinstance(deadline, Bonus)
        self.deadline_times.append((scope.scheduled_for, scope.now()))
        scope.execute_command(Credit(deadline.id, 100))
        scope.end()


class Ledger:
    """An ADR-26 projection of every event, keeping (stream, offset) -> event."""

    def __init__(self) -> None:
        self.checkpoints: dict[str, int] = {}
        self.rows: list[tuple[str, int]] = []  # (account, amount or 0 for Opened)
        self.compactions = 0

    def configure(self, c: Any) -> None:
        c.identity("ledger", "b4000000-0000-4000-8000-000000000003")
        c.routes(
            dogma.handles_event(Opened, registry=REGISTRY),
            dogma.handles_event(Credited, registry=REGISTRY),
        )
        c.concurrency_preference(dogma.ConcurrencyPreference.MINIMIZE)

    async def handle_event(self, scope: dogma.ProjectionEventScope, event: Any) -> int:
        if self.checkpoints.get(scope.stream_id, 0) != scope.checkpoint_offset:
            return self.checkpoints.get(scope.stream_id, 0)
        self.rows.append((event.id, getattr(event, "amount", 0)))
        self.checkpoints[scope.stream_id] = scope.offset + 1
        return scope.offset + 1

    async def checkpoint_offset(self, stream_id: str) -> int:
        return self.checkpoints.get(stream_id, 0)

    async def compact(self, scope: Any) -> None:
        self.compactions += 1

    async def reset(self, scope: Any) -> None:
        self.checkpoints.clear()
        self.rows.clear()


class Idle(dogma.StatelessProcessBehavior, dogma.NoDeadlineMessagesBehavior):
    """A process that routes no event to an instance: it only keeps deadline timers running."""

    def configure(self, c: Any) -> None:
        c.identity("idle", "b4000000-0000-4000-8000-000000000004")
        c.routes(
            dogma.handles_event(Opened, registry=REGISTRY),
            dogma.executes_command(Credit, registry=REGISTRY),
        )

    async def route_event_to_instance(self, event: Any) -> str | None:
        return None

    async def handle_event(self, root: Any, scope: Any, event: dogma.Event) -> None:
        raise AssertionError("never routed")


@attrs.define
class App:
    welcome: Welcome = attrs.field(factory=Welcome)
    ledger: Ledger = attrs.field(factory=Ledger)
    idle: Idle | None = None

    def configure(self, c: Any) -> None:
        c.identity("bank", APP_KEY)
        c.routes(
            dogma.via_aggregate(Accounts()),
            dogma.via_process(self.welcome),
            dogma.via_projection(self.ledger),
            *([] if self.idle is None else [dogma.via_process(self.idle)]),
        )


@pytest.fixture(autouse=True)
def fast_consumers(monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine builds its consumers with default options; tests want short intervals.
    monkeypatch.setattr(
        consumers_module,
        "partition_consumers",
        functools.partial(consumers_module.EventConsumers, options=OPTIONS),
    )


@asynccontextmanager
async def running(
    config: ApplicationConfig, provider: Provider, clock: FakeClock
) -> AsyncIterator[Engine]:
    settings = EngineSettings(
        applications=(config,),
        persistence_provider=provider,
        clock=clock,
        partition_count=4,
        retry_base_delay=0.001,
        retry_max_delay=0.01,
        progress_interval=0.002,
    )
    engine = Engine.from_settings(settings)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        yield engine
        tg.cancel_scope.cancel()


def ledger_of(app: App, account: str) -> list[int]:
    return sorted(amount for a, amount in app.ledger.rows if a == account)


async def test_process_deadline_projection_and_observers_end_to_end() -> None:
    app, clock = App(), FakeClock()
    config = build(app, registry=REGISTRY)
    async with running(config, MemoryProvider(str(uuid.uuid4())), clock) as engine:
        executor = engine.executor_for(config)
        seen: list[Credited] = []

        async def credited(event: Credited) -> bool:
            seen.append(event)
            return event.amount == 1

        with anyio.fail_after(5):
            await executor.execute_command(
                Open("a"), observers=[dogma.observe(Credited, credited, registry=REGISTRY)]
            )
        assert seen == [Credited("a", 1)]
        await wait_until(lambda: ledger_of(app, "a") == [0, 1])
        await anyio.sleep(0.05)
        assert app.welcome.deadline_times == []  # not before its time
        clock.advance(10)
        await wait_until(lambda: ledger_of(app, "a") == [0, 1, 100])
        [(scheduled_for, now)] = app.welcome.deadline_times
        assert now >= scheduled_for
        await anyio.sleep(0.05)
        # The instance ended with the bonus: the Credited(100) event it caused
        # is not handled, and nothing ran twice.
        assert app.welcome.roots == {"a": [1]}
        assert ledger_of(app, "a") == [0, 1, 100]
        assert app.ledger.compactions > 0


async def test_observers_not_satisfiable_and_cancelled_through_the_executor() -> None:
    app, clock = App(), FakeClock()
    config = build(app, registry=REGISTRY)
    async with running(config, MemoryProvider(str(uuid.uuid4())), clock) as engine:
        executor = engine.executor_for(config)
        with pytest.raises(dogma.EventObserverNotSatisfied):
            await executor.execute_command(
                Open("x"),
                observers=[dogma.observe(NeverRecorded, _never, registry=REGISTRY)],
            )
        with anyio.move_on_after(0.2) as scope:
            await executor.execute_command(
                Open("y"), observers=[dogma.observe(Credited, _never, registry=REGISTRY)]
            )
        assert scope.cancelled_caught
        with pytest.raises(KeyError):
            await executor.execute_command(
                Open("z"), observers=[dogma.observe(Opened, _boom, registry=REGISTRY)]
            )


async def _never(event: Any) -> bool:
    return False


async def _boom(event: Any) -> bool:
    raise KeyError(event.id)


async def test_deadlines_survive_a_restart() -> None:
    app, clock = App(), FakeClock()
    config = build(app, registry=REGISTRY)
    provider = MemoryProvider(str(uuid.uuid4()))
    async with running(config, provider, clock) as engine:
        await engine.executor_for(config).execute_command(Open("a"))
        await wait_until(lambda: ledger_of(app, "a") == [0, 1])
        await anyio.sleep(0.05)  # let the deadline reach its journal
    clock.advance(3600)
    async with running(config, provider, clock):
        await wait_until(lambda: ledger_of(app, "a") == [0, 1, 100])
        await anyio.sleep(0.05)
    assert ledger_of(app, "a") == [0, 1, 100]
    assert len(app.welcome.deadline_times) == 1


async def test_deadlines_of_a_disabled_process_wait_for_it() -> None:
    # Its events wait for it (its consumer does not run); so must its deadlines,
    # even when due while it is disabled and another process's timers run.
    app, clock = App(idle=Idle()), FakeClock()
    enabled = build(app, registry=REGISTRY)
    app.welcome.disabled = True
    disabled = build(app, registry=REGISTRY)
    provider = MemoryProvider(str(uuid.uuid4()))
    async with running(enabled, provider, clock) as engine:
        await engine.executor_for(enabled).execute_command(Open("a"))
        await wait_until(lambda: ledger_of(app, "a") == [0, 1])
        await anyio.sleep(0.05)  # let the deadline reach its journal
    clock.advance(3600)
    async with running(disabled, provider, clock) as engine:
        await anyio.sleep(0.2)  # many timer rounds past the due time
        [partition] = [p for p in (await engine.status()).partitions if p.pending_deadlines]
        assert partition.pending_deadlines == 1  # not dropped
    assert app.welcome.deadline_times == []  # nor fired
    async with running(enabled, provider, clock):
        await wait_until(lambda: ledger_of(app, "a") == [0, 1, 100])
        await anyio.sleep(0.05)
    assert ledger_of(app, "a") == [0, 1, 100]
    assert len(app.welcome.deadline_times) == 1


@pytest.mark.parametrize("timing", [BEFORE, AFTER])
async def test_exactly_once_under_random_write_faults(timing: Any) -> None:
    app, clock = App(), FakeClock()
    config = build(app, registry=REGISTRY)
    plan = FaultPlan(seed=7)
    rule = plan.fail(
        timing,
        names=lambda n: any(s in n for s in ("/process/", "/deadlines/", "/checkpoints")),
        probability=0.2,
    )
    provider = FaultyProvider(MemoryProvider(str(uuid.uuid4())), plan)
    accounts = [f"acct-{i}" for i in range(8)]
    async with running(config, provider, clock) as engine:
        executor = engine.executor_for(config)
        for a in accounts:
            await executor.execute_command(Open(a))
        await wait_until(lambda: all(ledger_of(app, a) == [0, 1] for a in accounts), timeout=20)
        await anyio.sleep(0.1)  # deadlines reach their journals
        clock.advance(10)
        await wait_until(
            lambda: all(ledger_of(app, a) == [0, 1, 100] for a in accounts), timeout=20
        )
        await anyio.sleep(0.1)
    assert rule.injected > 0
    for a in accounts:
        assert ledger_of(app, a) == [0, 1, 100]
    assert len(app.welcome.deadline_times) >= len(accounts)  # attempts may repeat...
    assert all(app.welcome.roots[a] == [1] for a in accounts)  # ...effects do not


async def test_reset_a_projection_of_a_running_engine() -> None:
    app, clock = App(), FakeClock()
    config = build(app, registry=REGISTRY)
    async with running(config, MemoryProvider(str(uuid.uuid4())), clock) as engine:
        executor = engine.executor_for(config)
        for a in ("a", "b"):
            await executor.execute_command(Open(a))
        await wait_until(lambda: ledger_of(app, "a") == [0, 1] and ledger_of(app, "b") == [0, 1])
        rows = sorted(app.ledger.rows)
        await engine.reset_projection(config, "ledger")
        await wait_until(lambda: sorted(app.ledger.rows) == rows)
        await anyio.sleep(0.05)
        assert sorted(app.ledger.rows) == rows  # rebuilt from offset 0, once


async def test_reset_of_an_unknown_projection_names_it() -> None:
    app, clock = App(), FakeClock()
    config = build(app, registry=REGISTRY)
    async with running(config, MemoryProvider(str(uuid.uuid4())), clock) as engine:
        with pytest.raises(LookupError, match=r"has no projection named 'no-such-projection'"):
            await engine.reset_projection(config, "no-such-projection")
