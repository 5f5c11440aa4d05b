"""Process handler failures that must stay the failing event's own: poisoning, the outbox.

A handler bug must cost only its event (retries, then the poison store), never
the partition, and must not leave a dispatched outbox behind that a much later
load would dispatch again.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import msgspec

import dogma
from runkit.engine.envelope import Envelope, encode
from runkit.engine.events.consumers import ConsumerOptions, partition_consumers
from runkit.engine.events.process_instances import ProcessRecord
from runkit.engine.events.process_stores import list_poisoned_events, process_store_name
from runkit.persistence import Provider

sys.path.insert(0, str(Path(__file__).parent))
from engine_events_harness import (
    CommandSink,
    Harness,
    harness,
    start_partition,
    wait_until,
)

REGISTRY = dogma.MessageTypeRegistry()
APP_KEY = "a9900000-0000-4000-8000-000000000001"
PROC_KEY = "b9900000-0000-4000-8000-000000000001"
PROCESS_STORE = process_store_name(APP_KEY, PROC_KEY)
BRISK = ConsumerOptions(
    retry_initial=0.001,
    retry_max=0.005,
    max_attempts=3,
    checkpoint_interval=0.01,
    deadline_rescan_interval=0.01,
)


@dogma.register_event("e9900000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Step(dogma.Event):
    id: str
    n: int
    fail: bool = False  # handle_event always raises


@dogma.register_command("c9900000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class DoThing(dogma.Command):
    id: str
    n: int


@dogma.register_event("e9900000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class DidThing(dogma.Event):
    id: str


BAD = 666  # a root holding this cannot be marshalled (a handler bug)


@attrs.define
class Root:
    steps: list[int] = attrs.field(factory=list)

    def marshal_binary(self) -> bytes:
        if BAD in self.steps:
            raise ValueError("cannot marshal this root")
        return json.dumps(self.steps).encode()

    def unmarshal_binary(self, data: bytes) -> None:
        self.steps = json.loads(data)


class Process:
    def __init__(self) -> None:
        self.calls = 0

    def configure(self, c: Any) -> None:
        c.identity("proc", PROC_KEY)
        c.routes(
            dogma.handles_event(Step, registry=REGISTRY),
            dogma.executes_command(DoThing, registry=REGISTRY),
        )

    def new(self) -> Root:
        return Root()

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        assert isinstance(event, Step)
        return event.id

    async def handle_event(self, root: Root, scope: Any, event: dogma.Event) -> None:
        assert isinstance(event, Step)
        self.calls += 1
        if event.fail:
            raise RuntimeError(f"handler failure {event.n}")
        n = event.n
        scope.mutate(lambda r: r.steps.append(n))
        scope.execute_command(DoThing(event.id, n))

    async def handle_deadline(self, root: Any, scope: Any, deadline: Any) -> None:
        raise AssertionError("no deadlines")


@attrs.frozen
class App:
    process: Process

    def configure(self, c: Any) -> None:
        c.identity("app", APP_KEY)
        c.routes(
            dogma.via_process(self.process),
            dogma.via_aggregate(
                CommandSink("b9900000-0000-4000-8000-000000000002", DoThing, DidThing, REGISTRY)
            ),
        )


async def start(h: Harness, tg: Any, options: ConsumerOptions = BRISK) -> None:
    consumers = partition_consumers(h.app, h.settings, options=options)
    for i in range(h.partitions):
        await start_partition(consumers, h, i, tg)


async def record(h: Harness, instance: str) -> ProcessRecord:
    async with await h.provider.keyspaces.open(PROCESS_STORE) as ks:
        data, _ = await ks.get(instance.encode())
    assert data
    return msgspec.msgpack.decode(data, type=ProcessRecord)


def outbox(r: ProcessRecord) -> list[tuple[str, int]]:
    msgs = [json.loads(msgspec.msgpack.decode(c, type=Envelope).data) for c in r.commands]
    return [(m["id"], m["n"]) for m in msgs]


class AcceptLog:
    def __init__(self) -> None:
        self.offered: list[str] = []

    def __call__(self, envelopes: Sequence[Envelope]) -> None:
        self.offered.extend(e.message_id for e in envelopes)


async def poisoned(h: Harness) -> bool:
    return bool(await list_poisoned_events(h.provider, APP_KEY, 0))


def limited(**limits: int) -> Provider:
    """A fresh memory store with the given ``Limits`` (keys, values) lowered."""
    import uuid

    from runkit.persistence import Limits
    from runkit_memory import MemoryProvider

    return MemoryProvider(str(uuid.uuid4()), limits=Limits(**limits))


async def _outbox_cleared(h: Harness) -> bool:
    return outbox(await record(h, "a")) == []


async def test_a_poisoned_event_leaves_no_dispatched_outbox_to_dispatch_again() -> None:
    # A dispatched outbox is not dispatched again by a later load: the
    # instance's record holds none, and the home's dispatched watermark
    # passes the step that held it.
    p = Process()
    log = AcceptLog()
    async with harness(App(p), registry=REGISTRY, partitions=1) as h:
        h.accept_fault = log
        async with anyio.create_task_group() as tg:
            await start(h, tg)
            # One stream record: the group fails at event 2, so event 1 is
            # committed alone, then event 2 is retried and poisoned.
            await h.publish(Step("a", 1), Step("a", 2, fail=True))
            await wait_until(lambda: poisoned(h))
            first = h.accepted[0].message_id
            await wait_until(lambda: _outbox_cleared(h))
            tg.cancel_scope.cancel()
        # Much later (the commands side long past its deduplication window), a
        # restart or the instance's next event loads the record: nothing of
        # DoThing(a, 1) is left to dispatch again.
        before = log.offered.count(first)
        async with anyio.create_task_group() as tg:
            await start(h, tg)
            await h.publish(Step("a", 3))
            await wait_until(lambda: len(h.accepted) == 2)
            tg.cancel_scope.cancel()
        assert log.offered.count(first) == before, "DoThing(a, 1) dispatched again on the next load"


async def test_a_root_that_cannot_be_marshalled_is_poisoned_alone_and_in_a_group() -> None:
    # Alone: the error is retried, then the event is poisoned.
    p = Process()
    async with (
        harness(App(p), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await start(h, tg)
        await h.publish(Step("alone", BAD))
        await wait_until(lambda: poisoned(h))
        tg.cancel_scope.cancel()
    # In a group (two events of one instance in one stream record): the same
    # error is not a step's failure, so each event is handled alone: the first
    # commits, the second is poisoned; the partition keeps running.
    p = Process()
    async with harness(App(p), registry=REGISTRY, partitions=1) as h:
        async with anyio.create_task_group() as tg:
            await start(h, tg)
            await h.publish(Step("g", 1), Step("g", BAD))
            await wait_until(lambda: poisoned(h))
            tg.cancel_scope.cancel()
        poison = await list_poisoned_events(h.provider, APP_KEY, 0)
        # The second event (offset 1) alone; the first is committed.
        assert [(m.instance_id, m.offset) for m in poison.values()] == [("g", 1)]
        assert (await record(h, "g")).root == b"[1]"


class MutatesThenFails(Process):
    """Changes the root, then fails (once per listed step): the change must not stay."""

    def __init__(self, *fail: int) -> None:
        super().__init__()
        self.fail = set(fail)

    async def handle_event(self, root: Root, scope: Any, event: dogma.Event) -> None:
        assert isinstance(event, Step)
        self.calls += 1
        n = event.n
        scope.mutate(lambda r: r.steps.append(n))
        if n in self.fail:
            self.fail.discard(n)
            raise RuntimeError(f"handler failure after changing the root at {n}")
        scope.execute_command(DoThing(event.id, n))


async def test_a_failed_attempt_leaves_no_change_to_the_root_of_a_cached_instance() -> None:
    # Event 1 commits with an outbox, so the instance stays cached with its
    # dispatched outbox (dirty) while event 2 is handled against it. Event 2's
    # first attempt changes the root in place and fails: its retry must see the
    # root as stored, not the failed attempt's change.
    p = MutatesThenFails(2)
    # No background clear of the outbox meanwhile: the entry stays dirty.
    options = attrs.evolve(BRISK, checkpoint_interval=30.0)
    async with (
        harness(App(p), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await start(h, tg, options)
        await h.publish(Step("a", 1))
        await wait_until(lambda: len(h.accepted) == 1)
        await h.publish(Step("a", 2))
        await wait_until(lambda: len(h.accepted) == 2)
        assert p.calls == 3, "event 2 was not retried once"
        assert (await record(h, "a")).root == b"[1, 2]"
        tg.cancel_scope.cancel()


async def test_an_instance_id_the_store_cannot_key_poisons_the_event_at_once() -> None:
    # A store refusal that is the same on every attempt (the instance ID is
    # longer than the store's keys may be) is the routing's fault: the event is
    # poisoned at once, not retried as a passing store failure for ever.
    p = Process()
    provider = limited(max_key_bytes=120)
    async with (
        harness(App(p), registry=REGISTRY, partitions=1, provider=provider) as h,
        anyio.create_task_group() as tg,
    ):
        await start(h, tg)
        await h.publish(Step("x" * 121, 1), Step("short", 2))
        await wait_until(lambda: poisoned(h))
        await wait_until(lambda: len(h.accepted) == 1)  # the other instance goes on
        tg.cancel_scope.cancel()
    poison = await list_poisoned_events(provider, APP_KEY, 0)
    [message] = poison.values()
    assert (message.instance_id, message.offset) == ("x" * 121, 0)
    assert "key is 121 bytes" in message.error, message.error


async def test_a_group_of_events_the_store_cannot_key_is_poisoned_not_retried_for_ever() -> None:
    # Two events of one instance in one stream record are handled as a group;
    # the store's refusal (the same on every attempt) must not be retried as a
    # passing store failure: each event is handled alone and poisoned.
    p = Process()
    provider = limited(max_key_bytes=120)
    async with (
        harness(App(p), registry=REGISTRY, partitions=1, provider=provider) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(Step("x" * 121, 1), Step("x" * 121, 2), Step("short", 3))
        await start(h, tg)
        await wait_until(lambda: _poisoned_count(h, 2))
        await wait_until(lambda: len(h.accepted) == 1)
        tg.cancel_scope.cancel()
    poison = await list_poisoned_events(provider, APP_KEY, 0)
    assert sorted(m.offset or 0 for m in poison.values()) == [0, 1]


async def test_a_group_whose_record_is_over_the_value_limit_is_handled_event_by_event() -> None:
    # Each event's commit fits the store's values; the group's (both events'
    # commands in one record) does not. Handled alone, both commit.
    long_id = "i" * 1000  # the produced command carries it: most of a record
    async with (
        harness(App(Process()), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(Step(long_id, 1))
        await start(h, tg)
        await wait_until(lambda: len(h.accepted) == 1)
        tg.cancel_scope.cancel()
    command = len(encode(h.accepted[0]))
    provider = limited(max_value_bytes=command * 3 // 2)
    async with (
        harness(App(Process()), registry=REGISTRY, partitions=1, provider=provider) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(Step(long_id, 1), Step(long_id, 2))
        await start(h, tg)
        await wait_until(lambda: len(h.accepted) == 2)
        tg.cancel_scope.cancel()
    assert not await list_poisoned_events(provider, APP_KEY, 0)
    assert (await record(h, long_id)).positions


class HugeFailure(Process):
    async def handle_event(self, root: Root, scope: Any, event: dogma.Event) -> None:
        assert isinstance(event, Step)
        if event.fail:
            raise RuntimeError("x" * 50_000)  # e.g. an HTTP body in the message
        await super().handle_event(root, scope, event)


async def test_a_poison_record_over_the_value_limit_keeps_the_error_short() -> None:
    # The record keeps at most 4,096 characters of the error, and 256 if the
    # store still refuses it; the consumer goes on either way.
    provider = limited(max_value_bytes=2048)
    async with (
        harness(App(HugeFailure()), registry=REGISTRY, partitions=1, provider=provider) as h,
        anyio.create_task_group() as tg,
    ):
        await start(h, tg)
        await h.publish(Step("a", 1, fail=True), Step("b", 2))
        await wait_until(lambda: poisoned(h))
        await wait_until(lambda: len(h.accepted) == 1)
        tg.cancel_scope.cancel()
    [message] = (await list_poisoned_events(provider, APP_KEY, 0)).values()
    assert message.error.startswith("RuntimeError: xxx"), message.error[:40]
    assert len(message.error) <= 256
    assert message.error.endswith(" chars)"), message.error[-40:]


async def _poisoned_count(h: Harness, n: int) -> bool:
    return len(await list_poisoned_events(h.provider, APP_KEY, 0)) >= n
