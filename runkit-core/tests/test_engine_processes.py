"""Process consumers: routing, the instance record, the outbox, failures and deadlines.

Real streams and stores (memory driver); the commands side is faked by the
harness's ``accept`` (which, like the real one, deduplicates by command ID).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import anyio
import attrs
import msgspec
import pytest

import dogma
from runkit.engine.envelope import Envelope
from runkit.engine.events.consumers import ConsumerOptions, partition_consumers
from runkit.engine.events.deadlines import deadline_journal_name
from runkit.engine.events.process_instances import ProcessRecord
from runkit.engine.events.process_stores import (
    PoisonedMessage,
    checkpoint_key,
    checkpoints_store_name,
    list_poisoned_events,
    process_store_name,
)
from runkit.testing.faults import AFTER, BEFORE, FaultPlan, FaultyProvider, Timing
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_events_harness import (
    CommandSink,
    Harness,
    harness,
    start_partition,
    wait_until,
)

REGISTRY = dogma.MessageTypeRegistry()
APP_KEY = "a2000000-0000-4000-8000-000000000001"
PROC_KEY = "b2000000-0000-4000-8000-000000000001"
OPTIONS = ConsumerOptions(
    retry_initial=0.001,
    retry_max=0.005,
    max_attempts=3,
    checkpoint_interval=0.01,
    deadline_rescan_interval=0.01,
)


@dogma.register_event("e2000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Step(dogma.Event):
    id: str
    n: int
    schedule_in: float | None = None  # schedule a Tick this many seconds after now()
    fail: str | None = None  # "always", "twice", "end", or a bug (see test_bugs_...)


@dogma.register_event("e2000000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class Finished(dogma.Event):
    id: str


@dogma.register_event("e2000000-0000-4000-8000-000000000003", registry=REGISTRY)
@attrs.frozen
class Unrelated(dogma.Event):
    id: str


@dogma.register_command("c2000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class DoThing(dogma.Command):
    id: str
    n: int

    def validate(self, scope: dogma.ValidationScope) -> None:
        if self.n < 0:
            raise dogma.ValidationError("n must be >= 0")


@dogma.register_command("c2000000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class NotMine(dogma.Command):
    id: str


@dogma.register_command("c2000000-0000-4000-8000-000000000003", registry=REGISTRY)
@attrs.frozen
class Orphan(dogma.Command):
    """Routed as executed by the process, but no handler of the app handles it."""

    id: str


@dogma.register_deadline("d2000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Tick(dogma.Deadline):
    id: str
    n: int


@attrs.define
class Root:
    steps: list[int] = attrs.field(factory=list)

    def process_instance_description(self, ended: bool) -> str:
        return f"steps {self.steps}"

    def marshal_binary(self) -> bytes:
        return json.dumps(self.steps).encode()

    def unmarshal_binary(self, data: bytes) -> None:
        self.steps = json.loads(data)


class _NoOffset(tzinfo):
    """A tzinfo that knows no offset: datetimes with it are naive, as Python defines it."""

    def utcoffset(self, dt: datetime | None) -> None:
        return None

    def dst(self, dt: datetime | None) -> None:
        return None

    def tzname(self, dt: datetime | None) -> None:
        return None

    def __repr__(self) -> str:
        return "_NoOffset()"


class Process:
    """Routes by ``id`` ("ignore" = ignore); records steps; executes and schedules."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []  # successful handle_event calls
        self.calls = 0
        self.routes = 0
        self.deadlines: list[tuple[str, int, datetime, datetime]] = []  # id, n, scheduled, now
        self.failures: dict[int, int] = {}
        self.after_end_errors: list[str] = []
        self.time_errors: list[tuple[str, str]] = []  # schedule_deadline's refusals of `at`
        self.delay = 0.0

    def configure(self, c: Any) -> None:
        c.identity("proc", PROC_KEY)
        c.routes(
            dogma.handles_event(Step, registry=REGISTRY),
            dogma.handles_event(Finished, registry=REGISTRY),
            dogma.executes_command(DoThing, registry=REGISTRY),
            dogma.executes_command(Orphan, registry=REGISTRY),
            dogma.schedules_deadline(Tick, registry=REGISTRY),
        )

    def new(self) -> Root:
        return Root()

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        self.routes += 1
        assert isinstance(event, Step | Finished)
        return None if event.id == "ignore" else event.id

    async def handle_event(
        self, root: Root, scope: dogma.ProcessEventScope[Root], event: dogma.Event
    ) -> None:
        self.calls += 1
        assert scope.instance_id == event.id  # type: ignore[attr-defined]
        assert scope.recorded_at is not None
        if isinstance(event, Finished):
            scope.end()
            ops: list[tuple[str, Callable[[], None]]] = [
                ("mutate", lambda: scope.mutate(lambda r: None)),
                ("execute_command", lambda: scope.execute_command(DoThing(event.id, 0))),
                (
                    "schedule_deadline",
                    lambda: scope.schedule_deadline(Tick(event.id, 0), scope.now()),
                ),
            ]
            for name, op in ops:
                try:
                    op()
                except RuntimeError:
                    self.after_end_errors.append(name)
            return
        assert isinstance(event, Step)
        if self.delay:
            await anyio.sleep(self.delay)
        if event.fail == "always" or (event.fail == "twice" and self.failures.get(event.n, 0) < 2):
            self.failures[event.n] = self.failures.get(event.n, 0) + 1
            raise RuntimeError(f"handler failure {event.n}")
        if event.fail == "unexpected":
            raise dogma.UnexpectedMessage(event)
        if event.fail == "unrouted":
            with contextlib.suppress(Exception):  # swallowing it does not hide the bug
                scope.execute_command(NotMine(event.id))
            return
        if event.fail == "times":
            for at in (datetime(2030, 1, 1), datetime(2030, 1, 1, tzinfo=_NoOffset()), "2030"):
                try:
                    scope.schedule_deadline(Tick(event.id, 0), at)  # type: ignore[arg-type]
                except (TypeError, ValueError) as exc:
                    self.time_errors.append((type(exc).__name__, str(exc)))
        if event.fail == "invalid":
            scope.execute_command(DoThing(event.id, -1))
        if event.fail == "orphan":
            scope.execute_command(Orphan(event.id))
        n = event.n
        scope.mutate(lambda r: r.steps.append(n))
        assert n in root.steps  # the root reflects the change at once
        scope.execute_command(DoThing(event.id, n))
        if event.schedule_in is not None:
            at = scope.now() + timedelta(seconds=event.schedule_in)
            scope.schedule_deadline(Tick(event.id, n), at)
        if event.fail == "end":
            scope.end()
        self.events.append((event.id, n))

    async def handle_deadline(
        self, root: Root, scope: dogma.ProcessDeadlineScope[Root], deadline: dogma.Deadline
    ) -> None:
        assert isinstance(deadline, Tick)
        assert scope.instance_id == deadline.id
        self.deadlines.append((deadline.id, deadline.n, scope.scheduled_for, scope.now()))
        n = 1000 + deadline.n
        scope.mutate(lambda r: r.steps.append(n))
        scope.execute_command(DoThing(deadline.id, n))


@dogma.register_event("e2000000-0000-4000-8000-000000000004", registry=REGISTRY)
@attrs.frozen
class DidThing(dogma.Event):
    id: str


@attrs.frozen
class App:
    process: Process

    def configure(self, c: Any) -> None:
        c.identity("app", APP_KEY)
        c.routes(
            dogma.via_process(self.process),
            dogma.via_aggregate(
                CommandSink("b2000000-0000-4000-8000-000000000002", DoThing, DidThing, REGISTRY)
            ),
        )


async def start(h: Harness, tg: Any, *, provider: Any = None) -> Any:
    consumers = partition_consumers(h.app, h.settings, options=OPTIONS)
    for i in range(h.partitions):
        await start_partition(consumers, h, i, tg, provider)
    return consumers


async def record(h: Harness, instance: str) -> ProcessRecord | None:
    async with await h.provider.keyspaces.open(process_store_name(APP_KEY, PROC_KEY)) as ks:
        data, _ = await ks.get(instance.encode())
    return msgspec.msgpack.decode(data, type=ProcessRecord) if data else None


async def dispatched(h: Harness, *instances: str) -> bool:
    """Whether the instances' records exist and their outboxes are empty.

    With steps at home (ADR 0010) records are derived and hold no outbox:
    the home partitions' outboxes must be dispatched too.
    """
    if not h.outboxes_sent:
        return False
    for instance in instances:
        r = await record(h, instance)
        if r is None or r.has_outbox:
            return False
    return True


async def steps(h: Harness, instance: str) -> list[int]:
    r = await record(h, instance)
    return [] if r is None or r.root is None else json.loads(r.root)


async def poisoned(h: Harness, partition: int = 0) -> dict[str, PoisonedMessage]:
    return await list_poisoned_events(h.provider, APP_KEY, partition)


def commands(h: Harness) -> list[tuple[str, int]]:
    out = []
    for env in h.accepted:
        msg = json.loads(env.data)
        out.append((msg["id"], msg["n"]))
    return sorted(out)


def derived_id(cause: Envelope, kind: str, index: int) -> str:
    return str(uuid.uuid5(uuid.UUID(cause.message_id), f"{PROC_KEY}/{kind}/{index}"))


async def test_handles_events_mutates_roots_and_executes_commands() -> None:
    p = Process()
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        [e1, e2] = await h.publish(Step("a", 1), Step("a", 2), partition=0)
        [e3] = await h.publish(Step("b", 3), partition=1)
        await start(h, tg)
        await wait_until(lambda: len(h.accepted) == 3)
        assert await steps(h, "a") == [1, 2]
        assert await steps(h, "b") == [3]
        assert commands(h) == [("a", 1), ("a", 2), ("b", 3)]
        by_cause = {env.causation_id: env for env in h.accepted}
        for cause in (e1, e2, e3):
            env = by_cause[cause.message_id]
            assert env.message_id == derived_id(cause, "command", 0)
            assert env.correlation_id == cause.correlation_id
            assert env.source_handler == PROC_KEY
        assert by_cause[e3.message_id].source_instance == "b"
        # The dispatched outbox is cleared once the instance is idle (ADR 0006).
        await wait_until(lambda: dispatched(h, "a", "b"))
        r = await record(h, "a")
        assert r is not None
        assert r.positions == {h.streams[0].stream_id: 1}
        tg.cancel_scope.cancel()


async def test_ignored_and_unrouted_events_are_not_handled() -> None:
    p = Process()
    async with (
        harness(App(p), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(Step("ignore", 1), Unrelated("a"), Step("a", 2))
        await start(h, tg)
        await wait_until(lambda: len(h.accepted) == 1)
        assert p.routes == 2  # Unrelated is not routed to the handler at all
        assert p.calls == 1
        assert await record(h, "ignore") is None
        tg.cancel_scope.cancel()


async def test_schedule_deadline_refuses_naive_and_non_datetime_times() -> None:
    p = Process()
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        await h.publish(Step("a", 1, fail="times"), partition=0)
        await start(h, tg)
        await wait_until(lambda: len(h.accepted) == 1)
        assert p.time_errors == [
            (
                "ValueError",
                "schedule_deadline(): datetime.datetime(2030, 1, 1, 0, 0) is a naive "
                "datetime; use a timezone-aware datetime in UTC",
            ),
            (
                "ValueError",
                "schedule_deadline(): datetime.datetime(2030, 1, 1, 0, 0, tzinfo=_NoOffset()) "
                "is a naive datetime; use a timezone-aware datetime in UTC",
            ),
            ("TypeError", "schedule_deadline(): at must be a datetime, got str '2030'"),
        ]
        # Refused times schedule nothing; the handling itself went on.
        assert p.events == [("a", 1)]
        # With steps at home the record is derived behind the stream: the
        # step's command may be dispatched before it is written.
        await wait_until(lambda: dispatched(h, "a"))
        r = await record(h, "a")
        assert r is not None
        assert r.pending_deadlines == []
        tg.cancel_scope.cancel()


async def test_ended_instances_never_handle_again() -> None:
    p = Process()
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        await h.publish(Step("a", 1, schedule_in=10), Finished("a"), partition=0)
        await start(h, tg)
        await wait_until(lambda: p.calls == 2)
        await h.publish(Step("a", 2), partition=1)  # another partition, after the end
        await h.publish(Step("b", 3), partition=1)
        await wait_until(lambda: len(h.accepted) == 2)
        h.clock.advance(60)  # the deadline scheduled before end() is cancelled
        await anyio.sleep(0.05)
        assert p.calls == 2 + 1
        assert p.after_end_errors == ["mutate", "execute_command", "schedule_deadline"]
        assert p.deadlines == []
        r = await record(h, "a")
        assert r is not None
        assert r.ended
        assert r.root is None
        assert r.pending_deadlines == []
        assert commands(h) == [("a", 1), ("b", 3)]
        tg.cancel_scope.cancel()


async def test_commands_executed_before_end_still_go_out() -> None:
    p = Process()
    async with (
        harness(App(p), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(Step("a", 1, fail="end"), Step("a", 2))
        await start(h, tg)
        await wait_until(lambda: len(h.accepted) == 1)
        await anyio.sleep(0.02)
        assert commands(h) == [("a", 1)]
        assert p.calls == 1
        tg.cancel_scope.cancel()


async def test_redelivery_from_an_old_checkpoint_is_harmless() -> None:
    p = Process()
    async with harness(App(p), registry=REGISTRY, partitions=1) as h:
        await h.publish(Step("a", 1), Step("b", 2), Step("a", 3))
        async with anyio.create_task_group() as tg:
            await start(h, tg)
            await wait_until(lambda: len(h.accepted) == 3)
            await wait_until(lambda: dispatched(h, "a", "b"))  # (else redispatched: fine)
            tg.cancel_scope.cancel()
        # Lose the checkpoint: everything is redelivered.
        async with await h.provider.keyspaces.open(checkpoints_store_name(APP_KEY)) as ks:
            await ks.set_unconditional(checkpoint_key(PROC_KEY, h.streams[0].stream_id), b"")
        accept_calls = h.accept_calls
        async with anyio.create_task_group() as tg:
            await start(h, tg)
            await h.publish(Step("a", 4))
            await wait_until(lambda: len(h.accepted) == 4)
            await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
        assert p.calls == 4
        assert h.accept_calls == accept_calls + 1
        assert await steps(h, "a") == [1, 3, 4]


async def test_checkpoint_advances_in_the_background() -> None:
    p = Process()
    async with (
        harness(App(p), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(Step("a", 1), Unrelated("x"), Step("ignore", 0))
        await start(h, tg)
        key = checkpoint_key(PROC_KEY, h.streams[0].stream_id)

        async def saved() -> bool:
            async with await h.provider.keyspaces.open(checkpoints_store_name(APP_KEY)) as ks:
                data, _ = await ks.get(key)
            return bool(data) and msgspec.msgpack.decode(data) == 3

        await wait_until(saved)
        tg.cancel_scope.cancel()


async def test_checkpoint_saves_failing_in_a_store_outage_are_one_line_warnings(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While the store is away every checkpoint save fails: the periodic ones
    # (here every 10 ms) and the last one when the partition is let go. Before,
    # each was logged with a traceback, the periodic ones without a limit.
    from runkit.engine.events import consumers_support
    from runkit.engine.logs import RateLimitedLog

    # A limiter of its own: the one of the other backend's run still holds the key.
    monkeypatch.setattr(
        consumers_support,
        "_save_log",
        RateLimitedLog(consumers_support._checkpoint_log, 10.0),
    )
    p = Process()
    plan = FaultPlan()
    rule = plan.fail(BEFORE, ops={"set"}, names=lambda name: name.endswith("/checkpoints"))
    inner = MemoryProvider(str(uuid.uuid4()))
    caplog.set_level(logging.INFO, logger="runkit.engine.events.processes")
    async with (
        harness(App(p), registry=REGISTRY, partitions=1, provider=inner) as h,
        anyio.create_task_group() as tg,
    ):
        await start(h, tg, provider=FaultyProvider(inner, plan))
        await h.publish(Step("a", 1))
        await wait_until(lambda: len(h.accepted) == 1)
        await wait_until(lambda: rule.injected >= 10)  # some 100 ms of failed saves
        tg.cancel_scope.cancel()  # the partition is let go: the final save fails too
    lines = [r for r in caplog.records if "checkpoint" in r.getMessage()]
    assert any("final checkpoint save failed" in r.getMessage() for r in lines)
    assert any("cannot save checkpoint" in r.getMessage() for r in lines)
    for record in lines:
        assert record.exc_info is None, f"logged with a traceback: {record.getMessage()}"
        assert "injected" in record.getMessage(), "the line does not say why"
    periodic = [r for r in lines if "cannot save checkpoint" in r.getMessage()]
    assert len(periodic) == 1, "repeats of the same failure are rate-limited"


async def test_checkpoint_passes_events_of_other_types_the_consumer_never_sees() -> None:
    # The consumer reads only its routed types and sleeps through the rest;
    # its checkpoint must still pass them, before and after it caught up, or
    # a restart would read them all again.
    p = Process()
    async with (
        harness(App(p), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(Unrelated("x"), Unrelated("y"))
        await start(h, tg)
        key = checkpoint_key(PROC_KEY, h.streams[0].stream_id)

        def saved(offset: int) -> Callable[[], Any]:
            async def check() -> bool:
                async with await h.provider.keyspaces.open(checkpoints_store_name(APP_KEY)) as ks:
                    data, _ = await ks.get(key)
                return bool(data) and msgspec.msgpack.decode(data) == offset

            return check

        await wait_until(saved(2))
        await h.publish(Step("a", 1))
        await wait_until(saved(3))
        await h.publish(Unrelated("z"))
        await h.publish(Unrelated("w"), Unrelated("v"))
        await wait_until(saved(6))
        assert p.calls == 1
        tg.cancel_scope.cancel()


async def test_one_instance_fed_from_two_partitions_handles_each_event_once() -> None:
    p = Process()
    p.delay = 0.001  # widen the window between load and commit
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        await start(h, tg)
        for n in range(10):
            await h.publish(Step("a", n), partition=n % 2)
        await wait_until(lambda: len(h.accepted) == 10)
        await anyio.sleep(0.02)
        assert sorted(await steps(h, "a")) == list(range(10))
        assert commands(h) == [("a", n) for n in range(10)]
        tg.cancel_scope.cancel()


async def test_transient_handler_failures_are_retried() -> None:
    p = Process()
    async with (
        harness(App(p), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(Step("a", 1, fail="twice"), Step("a", 2))
        await start(h, tg)
        await wait_until(lambda: len(h.accepted) == 2)
        assert p.failures == {1: 2}
        assert await steps(h, "a") == [1, 2]
        assert await poisoned(h) == {}
        tg.cancel_scope.cancel()


class SeeingProcess(Process):
    """Records the message objects its routing and handling are given, per step."""

    def __init__(self) -> None:
        super().__init__()
        self.routed: dict[int, list[object]] = {}
        self.handled: dict[int, list[object]] = {}

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        if isinstance(event, Step):
            self.routed.setdefault(event.n, []).append(event)
        return await super().route_event_to_instance(event)

    async def handle_event(
        self, root: Root, scope: dogma.ProcessEventScope[Root], event: dogma.Event
    ) -> None:
        if isinstance(event, Step):
            self.handled.setdefault(event.n, []).append(event)
        await super().handle_event(root, scope, event)


async def test_routing_and_the_first_handling_share_the_message_and_retries_get_copies() -> None:
    # Dogma hands one message to a handler's routing and handling; every other
    # call (a retry, a group handled again after a failure) decodes its own.
    p = SeeingProcess()
    async with (
        harness(App(p), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        # One stream record: one group. Step 2 fails twice, so step 1 is handled
        # again on its own, then step 2 is retried, then step 3 goes on.
        await h.publish(Step("a", 1), Step("a", 2, fail="twice"), Step("a", 3))
        await start(h, tg)
        await wait_until(lambda: len(h.accepted) == 3)
        tg.cancel_scope.cancel()
    assert {n: len(calls) for n, calls in p.routed.items()} == {1: 1, 2: 1, 3: 1}
    assert {n: len(calls) for n, calls in p.handled.items()} == {1: 2, 2: 3, 3: 1}
    for n, calls in p.handled.items():
        [routed] = p.routed[n]
        assert calls[0] is routed, n
        later = calls[1:]
        assert all(c is not routed for c in later), n
        assert len({id(c) for c in calls}) == len(calls), n  # each retry its own copy
        assert all(c == routed for c in calls), n


async def test_persistent_failures_are_poisoned_after_max_attempts() -> None:
    p = Process()
    async with (
        harness(App(p), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        [bad, _] = await h.publish(Step("a", 1, fail="always"), Step("a", 2))
        await start(h, tg)
        await wait_until(lambda: len(h.accepted) == 1)
        assert p.failures == {1: OPTIONS.max_attempts}
        assert await steps(h, "a") == [2]  # the instance was not blocked
        [(key, poison)] = (await poisoned(h)).items()
        assert key == f"{PROC_KEY}/event/{h.streams[0].stream_id}/0"
        assert poison.attempts == OPTIONS.max_attempts
        assert poison.offset == 0
        assert "handler failure 1" in poison.error
        assert msgspec.msgpack.decode(poison.envelope, type=Envelope) == bad
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("bug", ["unrouted", "orphan", "invalid", "unexpected"])
async def test_bugs_are_poisoned_at_once(bug: str) -> None:
    p = Process()
    async with (
        harness(App(p), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(Step("a", 1, fail=bug), Step("a", 2))
        await start(h, tg)
        await wait_until(lambda: len(h.accepted) == 1)
        assert commands(h) == [("a", 2)]
        poison = await poisoned(h)
        assert len(poison) == 1
        assert next(iter(poison.values())).attempts == 1
        assert p.calls == 2
        tg.cancel_scope.cancel()


async def test_a_failed_dispatch_is_repaired_with_the_same_command_ids() -> None:
    p = Process()
    failures = 2

    def fail(envelopes: Any) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise ConnectionError("the inbox is unreachable")

    async with (
        harness(App(p), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        h.accept_fault = fail
        [cause] = await h.publish(Step("a", 1))
        await start(h, tg)
        await wait_until(lambda: len(h.accepted) == 1)
        assert h.accepted[0].message_id == derived_id(cause, "command", 0)
        assert h.accept_calls == 3
        assert p.calls == 1  # committed once; only the outbox was dispatched again
        await wait_until(lambda: dispatched(h, "a"))
        tg.cancel_scope.cancel()


# --- deadlines ------------------------------------------------------------------------


async def deadline_bounds(h: Harness, partition: int) -> tuple[int, int]:
    async with await h.provider.journals.open(deadline_journal_name(APP_KEY, partition)) as j:
        b = await j.bounds()
    return b.begin, b.end


async def test_deadlines_fire_never_early_and_promptly_once_due() -> None:
    p = Process()
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        await start(h, tg)
        start_time = h.clock()
        await h.publish(Step("a", 1, schedule_in=60), partition=0)
        await wait_until(lambda: dispatched(h, "a"))
        home = h.ctx(0).partition_of(f"{PROC_KEY}/a")
        # With steps at home (ADR 0010) the record is derived and may be
        # written before the outbox is dispatched: wait for the deadline.
        await wait_until(lambda: _eq(deadline_bounds(h, home), (0, 1)))
        h.clock.advance(59.999)
        await anyio.sleep(0.05)  # several rescan intervals
        assert p.deadlines == []
        h.clock.advance(0.001)
        await wait_until(lambda: len(p.deadlines) == 1)
        [(instance, n, scheduled_for, now)] = p.deadlines
        assert (instance, n) == ("a", 1)
        assert scheduled_for == start_time + timedelta(seconds=60)
        assert now >= scheduled_for
        await wait_until(lambda: len(h.accepted) == 2)
        assert commands(h) == [("a", 1), ("a", 1001)]
        assert await steps(h, "a") == [1, 1001]
        r = await record(h, "a")
        assert r is not None
        assert r.pending_deadlines == []
        await anyio.sleep(0.02)
        assert await deadline_bounds(h, home) == (1, 1)  # fired: truncated
        assert len(p.deadlines) == 1
        tg.cancel_scope.cancel()


async def test_due_deadlines_wake_the_timer_without_waiting_for_a_rescan() -> None:
    p = Process()
    options = attrs.evolve(OPTIONS, deadline_rescan_interval=3600)
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        consumers = partition_consumers(h.app, h.settings, options=options)
        for i in range(h.partitions):
            await start_partition(consumers, h, i, tg)
        await h.publish(Step("a", 1, schedule_in=0), partition=1)
        await wait_until(lambda: len(p.deadlines) == 1, timeout=2)
        tg.cancel_scope.cancel()


async def test_deadlines_of_an_instance_fire_in_scheduled_order() -> None:
    p = Process()
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        await start(h, tg)
        await h.publish(Step("a", 3, schedule_in=30), partition=0)
        await h.publish(Step("a", 1, schedule_in=10), partition=1)
        await h.publish(Step("a", 2, schedule_in=20), partition=0)
        await wait_until(lambda: len(h.accepted) == 3)
        await wait_until(lambda: dispatched(h, "a"))
        h.clock.advance(100)
        await wait_until(lambda: len(p.deadlines) == 3)
        assert [n for _, n, _, _ in p.deadlines] == [1, 2, 3]
        tg.cancel_scope.cancel()


async def test_deadline_heap_is_rebuilt_after_restart() -> None:
    p = Process()
    async with harness(App(p), registry=REGISTRY) as h:
        async with anyio.create_task_group() as tg:
            await start(h, tg)
            await h.publish(Step("a", 1, schedule_in=60), Step("b", 2, schedule_in=5))
            await wait_until(lambda: dispatched(h, "a", "b"))
            tg.cancel_scope.cancel()
        h.clock.advance(3600)  # both became due while nothing ran
        async with anyio.create_task_group() as tg:
            await start(h, tg)
            await wait_until(lambda: len(p.deadlines) == 2)
            await anyio.sleep(0.03)
            tg.cancel_scope.cancel()
        assert sorted((i, n) for i, n, _, _ in p.deadlines) == [("a", 1), ("b", 2)]
        # And a third run finds nothing left to fire.
        async with anyio.create_task_group() as tg:
            await start(h, tg)
            await anyio.sleep(0.03)
            tg.cancel_scope.cancel()
        assert len(p.deadlines) == 2


async def test_a_deadline_not_yet_due_survives_the_truncation_after_another_fires() -> None:
    # Firing a deadline truncates the home journal, but only below the first
    # record that still holds an unfired one: a restart rebuilds the heap from it.
    p = Process()
    async with harness(App(p), registry=REGISTRY) as h:
        async with anyio.create_task_group() as tg:
            await start(h, tg)
            await h.publish(Step("a", 1, schedule_in=5))
            await wait_until(lambda: dispatched(h, "a"))
            await h.publish(Step("a", 2, schedule_in=60))
            await wait_until(lambda: len(h.accepted) == 2)
            await wait_until(lambda: dispatched(h, "a"))
            home = h.ctx(0).partition_of(f"{PROC_KEY}/a")
            assert await deadline_bounds(h, home) == (0, 2)
            h.clock.advance(10)
            await wait_until(lambda: len(p.deadlines) == 1)
            await anyio.sleep(0.03)  # the truncation after the firing
            tg.cancel_scope.cancel()
        assert await deadline_bounds(h, home) == (1, 2)
        h.clock.advance(100)
        async with anyio.create_task_group() as tg:
            await start(h, tg)
            await wait_until(lambda: len(p.deadlines) == 2)
            tg.cancel_scope.cancel()
        assert [(i, n) for i, n, _, _ in p.deadlines] == [("a", 1), ("a", 2)]


# --- fault injection ------------------------------------------------------------------


def _process_writes(name: str) -> bool:
    # Checkpoint writes are left out: they run on a timer, so "the nth write"
    # would not be reproducible.
    return "/process/" in name or "/deadlines/" in name


# The nth write of each kind the scenario is sure to make: instance records
# (derived from the committed steps) and deadline journals. Stream appends
# (the commit point) and inbox appends are covered by
# ``test_engine_faults_invariants``.
FAULTS = [
    pytest.param(timing, op, nth, id=f"{timing.value}-{op}-{nth}")
    for timing in (BEFORE, AFTER)
    for op, count in (("set", 5), ("append", 2), ("truncate", 1))
    for nth in range(1, count + 1)
]


@pytest.mark.parametrize(("timing", "op", "nth"), FAULTS)
async def test_effects_are_exactly_once_under_write_faults(
    timing: Timing, op: str, nth: int
) -> None:
    p = Process()
    plan = FaultPlan(seed=nth)
    rule = plan.fail(timing, ops={op}, names=_process_writes, nth=nth)
    inner = MemoryProvider(str(uuid.uuid4()))
    async with (
        harness(App(p), registry=REGISTRY, provider=inner) as h,
        anyio.create_task_group() as tg,
    ):
        await start(h, tg, provider=FaultyProvider(inner, plan))
        await h.publish(Step("a", 1, schedule_in=5), Step("b", 2), partition=0)
        await h.publish(Step("a", 3, schedule_in=5), partition=1)
        await wait_until(lambda: len(h.accepted) == 3)
        await h.publish(Finished("b"), partition=1)
        await wait_until(lambda: p.calls >= 4)
        await wait_until(lambda: dispatched(h, "a", "b"))
        h.clock.advance(10)
        await wait_until(lambda: len(h.accepted) == 5)
        await h.publish(Step("b", 4), Step("a", 5), partition=0)
        await wait_until(lambda: len(h.accepted) == 6)
        await anyio.sleep(0.03)
        assert rule.injected == 1
        assert commands(h) == [("a", 1), ("a", 3), ("a", 5), ("a", 1001), ("a", 1003), ("b", 2)]
        assert sorted(await steps(h, "a")) == [1, 3, 5, 1001, 1003]
        # A commit that failed calls the handler again: effects (above) count, not calls.
        assert sorted({n for _, n, _, _ in p.deadlines}) == [1, 3]
        r = await record(h, "b")
        assert r is not None
        assert r.ended
        assert await poisoned(h, 0) == {}
        assert await poisoned(h, 1) == {}
        tg.cancel_scope.cancel()


async def test_two_nodes_owning_the_same_partitions_still_take_effect_once() -> None:
    # Two ConsumerSets over the same streams and stores: what two nodes that
    # both believe they own every partition do during an ownership change.
    p = Process()
    async with harness(App(p), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        await start(h, tg)
        await start(h, tg)
        for n in range(12):
            await h.publish(
                Step(f"i{n % 3}", n, schedule_in=5 if n % 4 == 0 else None), partition=n % 2
            )
        await wait_until(lambda: len(h.accepted) == 12)
        await wait_until(lambda: dispatched(h, "i0", "i1", "i2"))
        h.clock.advance(10)
        await wait_until(lambda: len(h.accepted) == 15)
        await anyio.sleep(0.05)
        expected = {f"i{k}": sorted(n for n in range(12) if n % 3 == k) for k in range(3)}
        for n in range(0, 12, 4):
            expected[f"i{n % 3}"] = sorted([*expected[f"i{n % 3}"], 1000 + n])
        for instance, want in expected.items():
            assert sorted(await steps(h, instance)) == want
        assert len(commands(h)) == 15
        tg.cancel_scope.cancel()


async def test_a_stuck_outbox_does_not_block_other_instances_and_is_kept() -> None:
    # Instance a's committed outbox cannot be dispatched: b's goes out
    # meanwhile, a's is recorded in the poison store and kept (not dispatched,
    # so the home's watermark stays below it) and retried until it goes out;
    # a's next step's outbox follows it, in commit order.
    p = Process()

    def refuse_a(envelopes: Any) -> None:
        if any(json.loads(e.data)["id"] == "a" for e in envelopes):
            raise ValueError("the commands side refuses instance a's commands")

    async with (
        harness(App(p), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        h.accept_fault = refuse_a
        await h.publish(Step("a", 1), Step("b", 2))
        await start(h, tg)
        await wait_until(lambda: len(h.accepted) == 1)  # b was not held up by a

        async def given_up() -> bool:
            return list(await poisoned(h)) == [f"{PROC_KEY}/outbox/a"]

        await wait_until(given_up)
        await h.publish(Step("a", 3))  # committed; its outbox waits behind the stuck one
        await wait_until(lambda: _eq(steps(h, "a"), [1, 3]))
        await anyio.sleep(0.02)
        assert commands(h) == [("b", 2)]
        assert not h.outboxes_sent  # a's outboxes are kept
        h.accept_fault = None  # the dispatch was retried all along
        await wait_until(lambda: len(h.accepted) == 3)
        assert commands(h) == [("a", 1), ("a", 3), ("b", 2)]
        await wait_until(lambda: h.outboxes_sent)
        tg.cancel_scope.cancel()


async def test_a_stuck_outbox_of_an_instance_with_a_long_id_is_still_recorded() -> None:
    # The poison key is the handler key, "/outbox/" and the instance ID: an ID
    # that fits a process key (99 bytes here) did not fit with that prefix, and
    # recording the stuck outbox was retried for ever instead of the dispatch.
    from runkit.persistence import Limits
    from runkit_memory import MemoryProvider

    p = Process()
    long_id = "x" * 90

    def refuse(envelopes: Any) -> None:
        raise ValueError("the commands side refuses every command")

    provider = MemoryProvider(str(uuid.uuid4()), limits=Limits(max_key_bytes=99))
    async with (
        harness(App(p), registry=REGISTRY, partitions=1, provider=provider) as h,
        anyio.create_task_group() as tg,
    ):
        h.accept_fault = refuse
        await h.publish(Step(long_id, 1))
        await start(h, tg)

        async def given_up() -> bool:
            return len(await poisoned(h)) == 1

        await wait_until(given_up)
        [key] = list(await poisoned(h))
        assert key.startswith(f"{PROC_KEY}/outbox/sha256:")
        assert len(key.encode()) <= 99
        h.accept_fault = None  # the dispatch itself went on being retried
        await wait_until(lambda: len(h.accepted) == 1)
        tg.cancel_scope.cancel()


async def test_a_slow_instance_does_not_hold_up_the_others() -> None:
    p = Process()
    release = anyio.Event()
    original = p.handle_event

    async def handle(root: Root, scope: Any, event: dogma.Event) -> None:
        if isinstance(event, Step) and event.id == "slow":
            await release.wait()
        await original(root, scope, event)

    p.handle_event = handle  # type: ignore[method-assign]
    async with (
        harness(App(p), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(Step("slow", 0), Step("slow", 1), Step("a", 2), Step("b", 3))
        await start(h, tg)
        await wait_until(lambda: commands(h) == [("a", 2), ("b", 3)])
        key = checkpoint_key(PROC_KEY, h.streams[0].stream_id)

        async def saved() -> int:
            async with await h.provider.keyspaces.open(checkpoints_store_name(APP_KEY)) as ks:
                data, _ = await ks.get(key)
            return msgspec.msgpack.decode(data) if data else 0

        await anyio.sleep(0.05)  # several checkpoint intervals
        assert await saved() == 0  # never past the unfinished event at offset 0
        release.set()
        await wait_until(lambda: len(h.accepted) == 4)
        await wait_until(lambda: _eq(saved(), 4))
        assert await steps(h, "slow") == [0, 1]  # in order within the instance
        tg.cancel_scope.cancel()


async def _eq(value: Any, expected: object) -> bool:
    return bool(await value == expected)


async def test_strictly_ordered_when_process_concurrency_is_one() -> None:
    p = Process()
    order: list[int] = []
    original = p.handle_event

    async def handle(root: Root, scope: Any, event: dogma.Event) -> None:
        assert isinstance(event, Step)
        await anyio.sleep(0.001 * (5 - event.n % 5))  # later events would overtake
        order.append(event.n)
        await original(root, scope, event)

    p.handle_event = handle  # type: ignore[method-assign]
    options = attrs.evolve(OPTIONS, process_concurrency=1)
    async with (
        harness(App(p), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(*(Step(f"i{n}", n) for n in range(10)))
        await start_partition(partition_consumers(h.app, h.settings, options=options), h, 0, tg)
        await wait_until(lambda: len(order) == 10)
        assert order == list(range(10))
        tg.cancel_scope.cancel()


async def test_checkpoint_never_passes_an_event_waiting_for_a_slot() -> None:
    p = Process()
    gates = {"a": anyio.Event(), "b": anyio.Event()}
    original = p.handle_event

    async def handle(root: Root, scope: Any, event: dogma.Event) -> None:
        assert isinstance(event, Step)
        await gates[event.id].wait()
        await original(root, scope, event)

    p.handle_event = handle  # type: ignore[method-assign]
    options = attrs.evolve(OPTIONS, process_concurrency=1)
    async with (
        harness(App(p), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        key = checkpoint_key(PROC_KEY, h.streams[0].stream_id)

        async def saved() -> int:
            async with await h.provider.keyspaces.open(checkpoints_store_name(APP_KEY)) as ks:
                data, _ = await ks.get(key)
            return msgspec.msgpack.decode(data) if data else 0

        await h.publish(Step("a", 0), Step("b", 1))
        consumers = partition_consumers(h.app, h.settings, options=options)
        await start_partition(consumers, h, 0, tg)
        await anyio.sleep(0.02)  # b waits for a's slot
        gates["a"].set()
        await wait_until(lambda: _eq(saved(), 1))
        await anyio.sleep(0.05)  # several checkpoint intervals
        assert await saved() == 1  # not 2: b is not handled yet
        gates["b"].set()
        await wait_until(lambda: _eq(saved(), 2))
        tg.cancel_scope.cancel()


async def test_a_failing_deadline_is_poisoned_and_the_timer_moves_on() -> None:
    p = Process()
    original = p.handle_deadline
    attempts = 0

    async def handle_deadline(root: Root, scope: Any, deadline: dogma.Deadline) -> None:
        nonlocal attempts
        assert isinstance(deadline, Tick)
        if deadline.id == "bad":
            attempts += 1
            raise RuntimeError("cannot handle the deadline")
        await original(root, scope, deadline)

    p.handle_deadline = handle_deadline  # type: ignore[method-assign]
    async with (
        harness(App(p), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await start(h, tg)
        await h.publish(Step("bad", 1, schedule_in=1), Step("good", 2, schedule_in=2))
        await wait_until(lambda: dispatched(h, "bad", "good"))
        r = await record(h, "bad")
        assert r is not None
        [deadline_id] = r.pending_deadlines
        h.clock.advance(5)
        # The good deadline does not wait for the bad one's retries.
        await wait_until(lambda: [(i, n) for i, n, _, _ in p.deadlines] == [("good", 2)])

        async def bad_poisoned() -> bool:
            return len(await poisoned(h)) == 1

        await wait_until(bad_poisoned)
        assert attempts == OPTIONS.max_attempts
        [(key, poison)] = (await poisoned(h)).items()
        assert key == f"{PROC_KEY}/deadline/{deadline_id}"
        assert poison.instance_id == "bad"
        assert "cannot handle the deadline" in poison.error

        async def no_longer_pending() -> bool:
            r = await record(h, "bad")
            return r is not None and r.pending_deadlines == []

        # The poisoned deadline's step took it off the pending list: never again.
        await wait_until(no_longer_pending)
        await anyio.sleep(0.02)
        assert attempts == OPTIONS.max_attempts
        tg.cancel_scope.cancel()
