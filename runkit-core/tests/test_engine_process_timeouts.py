"""Timeouts of process instances: deadlines due while an instance is busy.

A due deadline waits for its instance while the instance handles something
else; the deadlines of other instances on the same home partition must not
wait with it. And a process that executes an integration command and schedules
a timeout for it in one handling (the payment-timeout pattern) must get the
timeout armed at once: a local integration command is durable only once its
``handle_command`` has returned, so the outbox's commands may take as long as
the external call.
"""

from __future__ import annotations

import functools
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import attrs
import msgspec
import pytest

import dogma
from runkit.config import ApplicationConfig, build
from runkit.engine.engine import Engine
from runkit.engine.events import consumers as consumers_module
from runkit.engine.events.consumers import ConsumerOptions
from runkit.engine.settings import EngineSettings
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
import anyio.lowlevel
from engine_events_harness import FakeClock, wait_until

REGISTRY = dogma.MessageTypeRegistry()


@dogma.register_command("c4100000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Place(dogma.Command):
    id: str


@dogma.register_command("c4100000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class Charge(dogma.Command):
    id: str


@dogma.register_command("c4100000-0000-4000-8000-000000000003", registry=REGISTRY)
@attrs.frozen
class Cancel(dogma.Command):
    id: str


@dogma.register_command("c4100000-0000-4000-8000-000000000004", registry=REGISTRY)
@attrs.frozen
class Poke(dogma.Command):
    id: str
    n: int


@dogma.register_event("e4100000-0000-4000-8000-000000000004", registry=REGISTRY)
@attrs.frozen
class Poked(dogma.Event):
    id: str
    n: int


@dogma.register_event("e4100000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Placed(dogma.Event):
    id: str


@dogma.register_event("e4100000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class Charged(dogma.Event):
    id: str


@dogma.register_event("e4100000-0000-4000-8000-000000000003", registry=REGISTRY)
@attrs.frozen
class Cancelled(dogma.Event):
    id: str


@dogma.register_deadline("d4100000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class PaymentTimeout(dogma.Deadline):
    id: str


class Orders:
    def configure(self, c: Any) -> None:
        c.identity("orders", "b4100000-0000-4000-8000-000000000001")
        c.routes(
            dogma.handles_command(Place, registry=REGISTRY),
            dogma.handles_command(Cancel, registry=REGISTRY),
            dogma.handles_command(Poke, registry=REGISTRY),
            dogma.records_event(Placed, registry=REGISTRY),
            dogma.records_event(Cancelled, registry=REGISTRY),
            dogma.records_event(Poked, registry=REGISTRY),
        )

    def new(self) -> dogma.NoSnapshotBehavior:
        return _Root()

    def route_command_to_instance(self, command: Any) -> str:
        return str(command.id)

    def handle_command(self, root: Any, scope: Any, command: dogma.Command) -> None:
        if isinstance(command, Place):
            scope.record_event(Placed(command.id))
        elif isinstance(command, Cancel):
            scope.record_event(Cancelled(command.id))
        elif isinstance(command, Poke):
            scope.record_event(Poked(command.id, command.n))


class _Root(dogma.NoSnapshotBehavior):
    def apply_event(self, event: dogma.Event) -> None:
        pass


class Gateway:
    """An integration whose call to the outside world lasts until the test releases it."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()

    def configure(self, c: Any) -> None:
        c.identity("gateway", "b4100000-0000-4000-8000-000000000002")
        c.routes(
            dogma.handles_command(Charge, registry=REGISTRY),
            dogma.records_event(Charged, registry=REGISTRY),
        )

    async def handle_command(self, scope: Any, command: dogma.Command) -> None:
        assert isinstance(command, Charge)
        self.started.set()
        await self.release.wait()
        scope.record_event(Charged(command.id))


class Fulfilment(dogma.StatelessProcessBehavior):
    """Charges each order and gives the payment 10 s; cancels the order on the timeout."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.timeouts: list[str] = []
        self.poked = anyio.Event()
        self.unblock = anyio.Event()

    def configure(self, c: Any) -> None:
        c.identity("fulfilment", "b4100000-0000-4000-8000-000000000003")
        c.routes(
            dogma.handles_event(Placed, registry=REGISTRY),
            dogma.handles_event(Charged, registry=REGISTRY),
            dogma.handles_event(Poked, registry=REGISTRY),
            dogma.executes_command(Charge, registry=REGISTRY),
            dogma.executes_command(Cancel, registry=REGISTRY),
            dogma.schedules_deadline(PaymentTimeout, registry=REGISTRY),
        )

    async def route_event_to_instance(self, event: Any) -> str | None:
        return str(event.id)

    async def handle_event(self, root: Any, scope: Any, event: dogma.Event) -> None:
        if isinstance(event, Placed):
            scope.execute_command(Charge(event.id))
            scope.schedule_deadline(PaymentTimeout(event.id), scope.now() + timedelta(seconds=10))
        elif isinstance(event, Charged):
            self.outcomes.append("charged")
            scope.end()
        elif isinstance(event, Poked) and event.n == 1:
            scope.schedule_deadline(PaymentTimeout(event.id), scope.now() + timedelta(seconds=10))
        elif isinstance(event, Poked):
            self.poked.set()
            await self.unblock.wait()  # a slow handler: the instance is busy meanwhile

    async def handle_deadline(self, root: Any, scope: Any, deadline: dogma.Deadline) -> None:
        assert isinstance(deadline, PaymentTimeout)
        self.outcomes.append("timeout")
        self.timeouts.append(deadline.id)
        scope.execute_command(Cancel(deadline.id))
        scope.end()


@attrs.define
class App:
    gateway: Gateway = attrs.field(factory=Gateway)
    fulfilment: Fulfilment = attrs.field(factory=Fulfilment)

    def configure(self, c: Any) -> None:
        c.identity("shop", "a4100000-0000-4000-8000-000000000001")
        c.routes(
            dogma.via_aggregate(Orders()),
            dogma.via_integration(self.gateway),
            dogma.via_process(self.fulfilment),
        )


@pytest.fixture(autouse=True)
def fast_consumers(monkeypatch: pytest.MonkeyPatch) -> None:
    options = ConsumerOptions(
        retry_initial=0.001,
        retry_max=0.01,
        checkpoint_interval=0.01,
        deadline_rescan_interval=0.01,
    )
    monkeypatch.setattr(
        consumers_module,
        "partition_consumers",
        functools.partial(consumers_module.EventConsumers, options=options),
    )


@asynccontextmanager
async def running(config: ApplicationConfig, clock: FakeClock) -> AsyncIterator[Engine]:
    settings = EngineSettings(
        applications=(config,),
        persistence_provider=MemoryProvider(str(uuid.uuid4())),
        clock=clock,
        partition_count=1,
    )
    engine = Engine.from_settings(settings)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        yield engine
        tg.cancel_scope.cancel()


async def pending_deadlines(engine: Engine, count: int) -> bool:
    """Whether the deadline journals hold *count* deadlines not yet fired."""
    status = await engine.status()
    return sum(p.pending_deadlines for p in status.partitions) == count


async def test_a_busy_instance_does_not_hold_up_other_instances_deadlines() -> None:
    app, clock = App(), FakeClock()
    config = build(app, registry=REGISTRY)
    async with running(config, clock) as engine:
        executor = engine.executor_for(config)
        # Two timeouts due at the same time, a's first in the journal.
        await executor.execute_command(Poke("a", 1))
        await wait_until(lambda: pending_deadlines(engine, 1))
        await executor.execute_command(Poke("b", 1))
        await wait_until(lambda: pending_deadlines(engine, 2))
        await executor.execute_command(Poke("a", 2))
        with anyio.fail_after(5):
            await app.fulfilment.poked.wait()  # instance a is busy until unblocked
        clock.advance(10)
        # b's timeout fires while a's, due as early, waits for instance a.
        await wait_until(lambda: app.fulfilment.timeouts == ["b"])
        app.fulfilment.unblock.set()
        await wait_until(lambda: app.fulfilment.timeouts == ["b", "a"])


@asynccontextmanager
async def charging(app: App, clock: FakeClock) -> AsyncIterator[Engine]:
    """An engine whose order o1's charge is running, its payment timeout pending."""
    config = build(app, registry=REGISTRY)
    async with running(config, clock) as engine:
        await engine.executor_for(config).execute_command(Place("o1"))
        with anyio.fail_after(5):
            await app.gateway.started.wait()
        # The charge is still running; its timeout is in the deadline journal all the same.
        await wait_until(lambda: pending_deadlines(engine, 1))
        yield engine


async def test_a_timeout_is_armed_while_the_integration_command_it_guards_runs() -> None:
    app, clock = App(), FakeClock()
    async with charging(app, clock):
        clock.advance(10)
        await anyio.sleep(0.05)  # the timer fires the overdue timeout meanwhile
        app.gateway.release.set()
        await wait_until(lambda: len(app.fulfilment.outcomes) == 1)
        # The timeout was due before the payment came in, so it is handled first
        # and ends the instance: the late Charged event is not handled.
        await anyio.sleep(0.05)
        assert app.fulfilment.outcomes == ["timeout"]


async def test_a_timeout_is_handled_while_the_integration_command_it_guards_still_runs() -> None:
    app, clock = App(), FakeClock()
    async with charging(app, clock):
        clock.advance(10)
        # The charge has not returned, and the instance is not held up by it:
        # its outbox was sent once the command was durable in the inbox.
        await wait_until(lambda: app.fulfilment.outcomes == ["timeout"])
        assert not app.gateway.release.is_set()
        app.gateway.release.set()
        await anyio.sleep(0.05)
        assert app.fulfilment.outcomes == ["timeout"]  # the late Charged finds it ended


async def test_a_deadline_outbox_is_cleared_before_the_deadline_counts_as_fired(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The timer truncates its journal past a fired deadline, so if the outbox
    # of the deadline's handling stayed in the record until the background
    # clear (here: 30 s away) and the node stopped meanwhile, nothing would
    # clear it until the instance's next use, which would dispatch it again.
    import msgspec

    from runkit.engine.events.process_instances import ProcessRecord
    from runkit.engine.events.process_stores import process_store_name

    monkeypatch.setattr(
        consumers_module,
        "partition_consumers",
        functools.partial(
            consumers_module.EventConsumers,
            options=ConsumerOptions(
                retry_initial=0.001,
                retry_max=0.01,
                checkpoint_interval=30.0,
                deadline_rescan_interval=0.01,
            ),
        ),
    )
    app, clock = App(), FakeClock()
    config = build(app, registry=REGISTRY)
    provider = MemoryProvider(str(uuid.uuid4()))
    settings = EngineSettings(
        applications=(config,), persistence_provider=provider, clock=clock, partition_count=1
    )
    engine = Engine.from_settings(settings)
    store = process_store_name(config.identity.key, "b4100000-0000-4000-8000-000000000003")

    async def outbox_of(instance: str) -> list[bytes]:
        async with await provider.keyspaces.open(store) as ks:
            data, _ = await ks.get(instance.encode())
        return msgspec.msgpack.decode(data, type=ProcessRecord).commands if data else []

    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await engine.executor_for(config).execute_command(Poke("a", 1))
        await wait_until(lambda: pending_deadlines(engine, 1))
        clock.advance(10)
        await wait_until(lambda: app.fulfilment.timeouts == ["a"])
        await wait_until(lambda: pending_deadlines(engine, 0))
        assert await outbox_of("a") == []
        tg.cancel_scope.cancel()


async def test_overdue_deadlines_start_no_more_fires_than_the_timer_runs_at_once() -> None:
    # After an outage many deadlines are overdue at once; the timer takes only
    # as many off its heap as it fires concurrently (one task each), not a task
    # per overdue instance, and still fires every one.
    from runkit.engine.events.deadlines import DeadlineEntry, DeadlineTimer

    due = datetime(2000, 1, 1, tzinfo=UTC)
    overdue = [("h", f"i{n}", due) for n in range(200)]
    async with deadline_journal(FakeClock(), overdue) as ctx:
        fired: list[str] = []
        most = 0
        timer: DeadlineTimer

        async def fire(entry: DeadlineEntry) -> None:
            nonlocal most
            most = max(most, len(timer._firing))
            await anyio.lowlevel.checkpoint()
            fired.append(entry.deadline_id)

        timer = DeadlineTimer(ctx, fire, rescan_interval=0.05, concurrency=4)
        async with anyio.create_task_group() as tg:
            await tg.start(timer.run)
            await wait_until(lambda: len(fired) == 200)
            tg.cancel_scope.cancel()
    assert sorted(fired) == sorted(f"d-h-i{n}" for n in range(200))
    assert most <= 4, most


async def test_a_deadline_of_a_handler_this_node_does_not_know_is_held_for_the_grace() -> None:
    # A rolling upgrade adding a process: a node on the old version owns the
    # deadline's home partition. It must not drop the deadline at its time (a
    # node that knows the handler fires it once it owns the partition), only
    # once the grace is over; meanwhile the journal is not truncated past it.
    from runkit.engine.events.deadlines import DeadlineEntry, DeadlineTimer, deadline_journal_name

    clock = FakeClock()
    due = clock() - timedelta(seconds=1)
    async with deadline_journal(clock, [("known", "i", due)], [("new", "i", due)]) as ctx:
        name = deadline_journal_name(ctx.app.identity.key, 0)
        fired: list[str] = []

        async def fire(entry: DeadlineEntry) -> None:
            fired.append(entry.deadline_id)

        timer = DeadlineTimer(
            ctx,
            fire,
            rescan_interval=0.01,
            known={"known"},
            unknown_grace=timedelta(hours=1),
        )
        async with anyio.create_task_group() as tg:
            await tg.start(timer.run)
            await wait_until(lambda: fired == ["d-known-i"])
            clock.advance(1800)
            await anyio.sleep(0.05)
            assert fired == ["d-known-i"]
            async with await ctx.provider.journals.open(name) as journal:
                assert (await journal.bounds()).begin == 1  # truncated up to the held one
            clock.advance(1800)
            await wait_until(lambda: fired == ["d-known-i", "d-new-i"])
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("size", ["small", "bad-utf-8", "at-the-record-limit"])
async def test_a_deadline_record_that_cannot_be_decoded_is_poisoned_and_the_rest_fire(
    size: str,
) -> None:
    # Raised, the decode error stopped the timer and with it the whole
    # partition (commands too), again after every restart. A record at the
    # journal's limit does not fit a poison value with it: kept without it.
    from runkit.engine.events.deadlines import (
        DeadlineEntry,
        DeadlineTimer,
        append_deadlines,
        deadline_journal_name,
    )
    from runkit.engine.events.process_stores import list_poisoned_events

    clock = FakeClock()
    due = clock() - timedelta(seconds=1)
    async with deadline_journal(clock, [("h", "a", due)]) as ctx:
        name = deadline_journal_name(ctx.app.identity.key, 0)
        bad = b"\xc1 not a record"
        if size == "bad-utf-8":
            # A well-formed record whose string is not UTF-8: msgspec raises
            # UnicodeDecodeError for it, not DecodeError.
            bad = msgspec.msgpack.encode({"entries": [{"handler_key": "h"}]}).replace(
                b"\xa1h", b"\xa1\xff"
            )
        elif size != "small":
            bad = b"\xc1" + b"x" * (ctx.provider.limits.max_record_bytes - 1)
        async with await ctx.provider.journals.open(name) as journal:
            await journal.append(1, bad)
            await append_deadlines(journal, _entries([("h", "b", due)]))
        fired: list[str] = []

        async def fire(entry: DeadlineEntry) -> None:
            fired.append(entry.deadline_id)

        timer = DeadlineTimer(ctx, fire, rescan_interval=0.01)
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(10):
                await tg.start(timer.run)
            await wait_until(lambda: sorted(fired) == ["d-h-a", "d-h-b"])
            tg.cancel_scope.cancel()
        poisoned = await list_poisoned_events(ctx.provider, ctx.app.identity.key, 0)
    assert list(poisoned) == ["deadline-record/1"]
    [record] = poisoned.values()
    assert record.envelope == (b"" if size == "at-the-record-limit" else bad)
    assert (record.stream_id, record.offset) == (name, 1)


@asynccontextmanager
async def deadline_journal(
    clock: FakeClock, *batches: list[tuple[str, str, datetime]]
) -> AsyncIterator[Any]:
    """Partition 0's context, its deadline journal holding *batches* of
    ``(handler key, instance ID, scheduled for)`` (deadline IDs ``d-<handler>-<instance>``)."""
    from engine_events_harness import harness

    from runkit.engine.events.deadlines import append_deadlines, deadline_journal_name

    async with harness(App(), registry=REGISTRY, partitions=1, clock=clock) as h:
        ctx = h.ctx(0)
        name = deadline_journal_name(ctx.app.identity.key, 0)
        async with await ctx.provider.journals.open(name) as journal:
            for batch in batches:
                await append_deadlines(journal, _entries(batch))
        yield ctx


def _entries(batch: list[tuple[str, str, datetime]]) -> list[Any]:
    """Deadline entries ``d-<handler>-<instance>`` for ``(handler key, instance ID, due)``."""
    from runkit.engine.events.deadlines import DeadlineEntry

    return [
        DeadlineEntry(
            handler_key=handler,
            instance_id=instance,
            deadline_id=f"d-{handler}-{instance}",
            scheduled_for=when,
            envelope=b"",
        )
        for handler, instance, when in batch
    ]
