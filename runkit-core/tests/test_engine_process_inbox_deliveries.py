"""Process deliveries read from a home partition's inbox that go nowhere (ADR 0010).

A delivery the partition's batch cannot hand to its process steps is either
poisoned (its process is not part of the application) or waits (its process
is disabled, as the process's events wait in their streams and its deadlines
in their journals). A poisoned one is noted on the stream under its delivery
ID, and a next owner reading the inbox again must find that note and not
handle it again; a waiting one stays in the inbox for the owner after the
process is enabled again.
"""

from __future__ import annotations

import functools
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

import dogma
from runkit.config import ApplicationConfig, build
from runkit.engine.commands import batches
from runkit.engine.commands.inbox import InboxEntry, append_to_inbox, inbox_name
from runkit.engine.commands.poison import list_poisoned
from runkit.engine.engine import Engine
from runkit.engine.envelope import Envelope, to_message
from runkit.engine.events import consumers as consumers_module
from runkit.engine.events.consumers import ConsumerOptions
from runkit.engine.events.process_deliveries import delivery_id, home_partition
from runkit.engine.partitions import instance_workload, partition_id, partition_of
from runkit.engine.settings import EngineSettings
from runkit.engine.streams import decode_stream_record
from runkit.engine.streams.records import StreamRecord, stream_name
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_events_harness import wait_until

pytestmark = pytest.mark.anyio

REGISTRY = dogma.MessageTypeRegistry()
APP_KEY = "a9a10000-0000-4000-8000-000000000001"
THINGS_KEY = "b9a10000-0000-4000-8000-000000000001"
WATCHER_KEY = "b9a10000-0000-4000-8000-000000000002"
SLEEPER_KEY = "b9a10000-0000-4000-8000-000000000003"
#: A process no version of the application here has (removed, or not yet added).
GONE_KEY = "b9a10000-0000-4000-8000-0000000000ff"
PARTITIONS = 4
OPTIONS = ConsumerOptions(
    retry_initial=0.001,
    retry_max=0.01,
    checkpoint_interval=0.01,
    deadline_rescan_interval=0.01,
)


@dogma.register_command("c9a10000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Do(dogma.Command):
    id: str


@dogma.register_event("e9a10000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Done(dogma.Event):
    id: str


class Thing:
    def apply_event(self, event: dogma.Event) -> None:
        pass

    def marshal_binary(self) -> bytes:
        raise dogma.NotSupported()

    def unmarshal_binary(self, data: bytes) -> None:
        raise dogma.NotSupported()


class Things:
    """Records ``Done``; fails (to be retried) while the command's ID is in ``failing``."""

    def __init__(self) -> None:
        self.failing: set[str] = set()

    def configure(self, c: Any) -> None:
        c.identity("things", THINGS_KEY)
        c.routes(
            dogma.handles_command(Do, registry=REGISTRY),
            dogma.records_event(Done, registry=REGISTRY),
        )

    def new(self) -> Thing:
        return Thing()

    def route_command_to_instance(self, command: Any) -> str:
        return str(command.id)

    def handle_command(self, root: Thing, scope: Any, command: Any) -> None:
        if command.id in self.failing:
            raise RuntimeError(f"{command.id} is held")
        scope.record_event(Done(command.id))


class Seen(dogma.StatelessProcessBehavior, dogma.NoDeadlineMessagesBehavior):
    """A process that notes (instance, event ID) of each event it handles.

    It routes no event itself: only the deliveries a test puts in an inbox
    reach it, so what it handles is theirs.
    """

    def __init__(self, name: str, key: str, *, disabled: bool = False) -> None:
        self.name, self.key, self.disabled = name, key, disabled
        self.seen: list[tuple[str, str]] = []

    def configure(self, c: Any) -> None:
        c.identity(self.name, self.key)
        if self.disabled:
            c.disable()
        c.routes(
            dogma.handles_event(Done, registry=REGISTRY),
            dogma.executes_command(Do, registry=REGISTRY),
        )

    async def route_event_to_instance(self, event: Any) -> str | None:
        return None

    async def handle_event(self, root: Any, scope: Any, event: Any) -> None:
        self.seen.append((scope.instance_id, event.id))


@attrs.define
class App:
    things: Things = attrs.field(factory=Things)
    watcher: Seen = attrs.field(factory=lambda: Seen("watcher", WATCHER_KEY))
    sleeper: Seen | None = None

    def configure(self, c: Any) -> None:
        c.identity("inboxes", APP_KEY)
        c.routes(
            dogma.via_aggregate(self.things),
            dogma.via_process(self.watcher),
            *([] if self.sleeper is None else [dogma.via_process(self.sleeper)]),
        )


@pytest.fixture(autouse=True)
def home_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        consumers_module,
        "partition_consumers",
        functools.partial(consumers_module.EventConsumers, options=OPTIONS),
    )
    # Entries appended behind the owner's back are read soon.
    monkeypatch.setattr(batches, "INBOX_POLL_INTERVAL", 0.02)


@asynccontextmanager
async def running(config: ApplicationConfig, provider: MemoryProvider) -> AsyncIterator[Engine]:
    settings = EngineSettings(
        applications=(config,),
        persistence_provider=provider,
        partition_count=PARTITIONS,
        retry_base_delay=0.001,
        retry_max_delay=0.01,
        max_attempts=1_000_000,  # a held command is retried, never poisoned
        progress_interval=0.002,
    )
    engine = Engine.from_settings(settings)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        yield engine
        tg.cancel_scope.cancel()


def aggregate_partition(instance_id: str) -> int:
    return partition_of(instance_workload(THINGS_KEY, instance_id), PARTITIONS)


def homed_on(handler_key: str, index: int) -> str:
    """An instance ID of *handler_key* whose home partition is *index*."""
    for n in range(1000):
        if home_partition(handler_key, f"i{n}", PARTITIONS) == index:
            return f"i{n}"
    raise AssertionError("no instance ID found")


async def records(provider: MemoryProvider, index: int) -> list[tuple[int, StreamRecord]]:
    async with await provider.journals.open(stream_name(APP_KEY, index)) as journal:
        bounds = await journal.bounds()
        return [
            (p, decode_stream_record(await journal.get(p))) for p in range(bounds.begin, bounds.end)
        ]


async def done_event(provider: MemoryProvider, thing: str) -> tuple[Envelope, str, int]:
    """The ``Done`` event of *thing* once committed: its envelope, stream ID and offset."""
    index = aggregate_partition(thing)
    found: list[tuple[Envelope, str, int]] = []

    async def committed() -> bool:
        for _, record in await records(provider, index):
            for i, envelope in enumerate(record.events):
                if to_message(envelope) == Done(thing):
                    found.append((envelope, partition_id(APP_KEY, index), record.first_offset + i))
                    return True
        return False

    await wait_until(committed)
    return found[0]


async def append_delivery(
    provider: MemoryProvider,
    index: int,
    handler_key: str,
    instance_id: str,
    event: tuple[Envelope, str, int],
) -> int:
    """Append a delivery of *event* to *instance_id* of *handler_key* to *index*'s inbox."""
    envelope, stream_id, offset = event
    entry = InboxEntry(
        envelope=envelope,
        handler_key=handler_key,
        instance_id=instance_id,
        source=(stream_id, offset),
    )
    async with await provider.journals.open(inbox_name(APP_KEY, index)) as journal:
        return await append_to_inbox(journal, [entry])


async def poison_notes(provider: MemoryProvider, index: int, note: tuple[int, str]) -> int:
    return sum(record.poisoned.count(note) for _, record in await records(provider, index))


async def test_a_delivery_poisoned_from_the_inbox_is_not_handled_again_after_a_takeover() -> None:
    silo = f"inbox-deliveries-{uuid.uuid4()}"
    app = App()
    config = build(app, registry=REGISTRY)
    # A command of partition h whose handler keeps failing holds h's inbox
    # progress below the delivery, so the next owner reads the delivery again.
    held = "held"
    h = aggregate_partition(held)
    instance = homed_on(GONE_KEY, h)
    async with running(config, MemoryProvider(silo)) as engine:
        executor = engine.executor_for(config)
        await executor.execute_command(Do("x"))
        event = await done_event(MemoryProvider(silo), "x")
        app.things.failing.add(held)
        with anyio.fail_after(5):
            await executor.execute_command(Do(held))  # spilled to h's inbox, retried
        position = await append_delivery(MemoryProvider(silo), h, GONE_KEY, instance, event)
        note = (position, delivery_id(event[0].message_id, GONE_KEY))

        async def noted() -> bool:
            return await poison_notes(MemoryProvider(silo), h, note) == 1

        await wait_until(noted, timeout=5)
    [(_, last)] = (await records(MemoryProvider(silo), h))[-1:]
    assert last.inbox_position < position  # the next owner reads the delivery again
    app.things.failing.clear()
    async with running(config, MemoryProvider(silo)):

        async def passed() -> bool:
            [(_, last)] = (await records(MemoryProvider(silo), h))[-1:]
            return last.inbox_position > position

        await wait_until(passed, timeout=5)
        await anyio.sleep(0.1)
    # Found done by its note: neither poisoned nor noted again.
    assert await poison_notes(MemoryProvider(silo), h, note) == 1
    poisoned = [p async for p in list_poisoned(MemoryProvider(silo), APP_KEY, PARTITIONS)]
    assert len(poisoned) == 1


async def test_a_delivery_for_a_disabled_process_waits_in_the_inbox_until_it_is_enabled() -> None:
    silo = f"inbox-deliveries-{uuid.uuid4()}"
    sleeper = Seen("sleeper", SLEEPER_KEY, disabled=True)
    app = App(sleeper=sleeper)
    disabled = build(app, registry=REGISTRY)
    sleeper.disabled = False
    enabled = build(app, registry=REGISTRY)
    h = 0
    instance = homed_on(SLEEPER_KEY, h)
    async with running(disabled, MemoryProvider(silo)) as engine:
        await engine.executor_for(disabled).execute_command(Do("x"))
        event = await done_event(MemoryProvider(silo), "x")
        position = await append_delivery(MemoryProvider(silo), h, SLEEPER_KEY, instance, event)

        await anyio.sleep(0.3)  # many inbox polls
        # Not poisoned, not handled, and still to be read by the next owner.
        assert [p async for p in list_poisoned(MemoryProvider(silo), APP_KEY, PARTITIONS)] == []
    assert sleeper.seen == []
    [(_, last)] = (await records(MemoryProvider(silo), h))[-1:]
    assert last.inbox_position <= position
    assert all(not record.poisoned for _, record in await records(MemoryProvider(silo), h))
    async with running(enabled, MemoryProvider(silo)):
        await wait_until(lambda: sleeper.seen == [(instance, "x")], timeout=5)
        await anyio.sleep(0.1)
    assert sleeper.seen == [(instance, "x")]
    assert [p async for p in list_poisoned(MemoryProvider(silo), APP_KEY, PARTITIONS)] == []


async def test_deliveries_of_one_event_to_two_removed_processes_are_poisoned_apart() -> None:
    silo = f"inbox-deliveries-{uuid.uuid4()}"
    config = build(App(), registry=REGISTRY)
    other_gone = "b9a10000-0000-4000-8000-0000000000fe"
    h = 0
    async with running(config, MemoryProvider(silo)) as engine:
        await engine.executor_for(config).execute_command(Do("x"))
        event = await done_event(MemoryProvider(silo), "x")
        for gone in (GONE_KEY, other_gone):
            await append_delivery(MemoryProvider(silo), h, gone, homed_on(gone, h), event)

        async def both() -> bool:
            found = [p async for p in list_poisoned(MemoryProvider(silo), APP_KEY, PARTITIONS)]
            return len(found) == 2

        await wait_until(both, timeout=5)
    poisoned = [p async for p in list_poisoned(MemoryProvider(silo), APP_KEY, PARTITIONS)]
    # Each under its delivery ID (not the event's ID, which they share).
    assert sorted(p.command_id for p in poisoned) == sorted(
        delivery_id(event[0].message_id, gone) for gone in (GONE_KEY, other_gone)
    )
    assert {p.record.entry.handler_key for p in poisoned} == {GONE_KEY, other_gone}
