"""Test harness for the engine's events side: real streams on the memory driver.

Builds what the partition runner gives a consumer (``PartitionContext``) from
real components: ``PartitionStream`` + ``StreamWriter`` over memory-driver
journals, the ``EventBus``, an injectable clock, and an ``accept`` that records
the produced commands (the commands side is faked: deduplicating by ID, as the
real one does). Events are published straight to a partition's stream.

Imported by the ``test_engine_processes*``, ``test_engine_projections*`` and
``test_engine_observers*`` modules (through ``sys.path``: with importlib mode
test modules are not importable by name).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import attrs

import dogma
from runkit.config import ApplicationConfig, build
from runkit.engine.envelope import Envelope, new_envelope, register_types
from runkit.engine.partitions import NodeContext, PartitionContext, partition_id, partition_of
from runkit.engine.settings import EngineSettings
from runkit.engine.streams import EventBus, PartitionStream, StreamWriter, read_tail
from runkit.persistence import Provider
from runkit_memory import MemoryProvider

__all__ = [
    "CommandSink",
    "FakeClock",
    "Harness",
    "harness",
    "start_partition",
    "wait_until",
]

START = datetime(2026, 1, 1, tzinfo=UTC)


@attrs.frozen
class CommandSink:
    """An aggregate that gives a process's command a route (``command.id`` is its instance).

    The harness fakes acceptance, so it never handles one.
    """

    key: str
    command: type[dogma.Command]
    event: type[dogma.Event]
    registry: dogma.MessageTypeRegistry

    def configure(self, c: Any) -> None:
        c.identity("things", self.key)
        c.routes(
            dogma.handles_command(self.command, registry=self.registry),
            dogma.records_event(self.event, registry=self.registry),
        )

    def new(self) -> Any:
        return None

    def route_command_to_instance(self, command: Any) -> str:
        return str(command.id)

    def handle_command(self, root: Any, scope: Any, command: Any) -> None:
        raise AssertionError("not called: the harness fakes acceptance")


@attrs.define
class FakeClock:
    """An injectable engine clock that only moves when told to."""

    now: datetime = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@attrs.define
class Harness:
    """A running set of partition streams for one application."""

    app: ApplicationConfig
    settings: EngineSettings
    provider: Provider
    clock: FakeClock
    bus: EventBus
    streams: list[PartitionStream]
    writers: list[StreamWriter]
    accepted: list[Envelope] = attrs.field(factory=list)
    accept_calls: int = 0
    accept_fault: Callable[[Sequence[Envelope]], None] | None = None
    #: The home partitions' process steps started (ADR 0010 switch on).
    homes: list[Any] = attrs.field(factory=list)

    @property
    def outboxes_sent(self) -> bool:
        """Whether the home partitions' committed outboxes are all dispatched."""
        return all(home.outboxes_sent for home in self.homes)

    @property
    def partitions(self) -> int:
        return len(self.streams)

    async def accept(self, envelopes: Sequence[Envelope]) -> None:
        self.accept_calls += 1
        if self.accept_fault is not None:
            self.accept_fault(envelopes)
        known = {e.message_id for e in self.accepted}
        self.accepted.extend(e for e in envelopes if e.message_id not in known)

    def ctx(self, index: int, provider: Provider | None = None) -> PartitionContext:
        count = self.partitions
        return PartitionContext(
            app=self.app,
            settings=self.settings,
            index=index,
            partition_id=partition_id(self.app.identity.key, index),
            partition_count=count,
            provider=provider or self.provider,
            stream=self.streams[index],
            accept=self.accept,
            partition_of=lambda key: partition_of(key, count),
            now=self.clock,
        )

    def node_ctx(self, node_id: str = "00000000-0000-4000-8000-0000000000aa") -> NodeContext:
        count = self.partitions
        return NodeContext(
            app=self.app,
            settings=self.settings,
            node_id=node_id,
            partition_count=count,
            provider=self.provider,
            accept=self.accept,
            partition_of=lambda key: partition_of(key, count),
            now=self.clock,
        )

    async def publish(
        self,
        *events: dogma.Event,
        partition: int = 0,
        correlation_id: str | None = None,
    ) -> list[Envelope]:
        """Publish *events* as one command's events on *partition*; return their envelopes."""
        command_id = str(uuid.uuid4())
        envelopes = [
            new_envelope(
                e,
                app_key=self.app.identity.key,
                site_key=None,
                created_at=self.clock(),
                causation_id=command_id,
                correlation_id=correlation_id or command_id,
            )
            for e in events
        ]
        await self.writers[partition].publish(command_id, envelopes)
        return envelopes


@asynccontextmanager
async def harness(
    app: object,
    *,
    registry: dogma.MessageTypeRegistry | None = None,
    partitions: int = 2,
    provider: Provider | None = None,
    clock: FakeClock | None = None,
) -> AsyncIterator[Harness]:
    """Start stream writers for *app*'s partitions; stop them on exit."""
    config = build(app, registry=registry)
    register_types(config.message_types())
    if registry is not None:
        register_types(registry)  # also types no handler routes (to publish them)
    clock = clock or FakeClock()
    provider = provider or MemoryProvider(str(uuid.uuid4()))
    settings = EngineSettings(applications=(config,), clock=clock, partition_count=partitions)
    bus = EventBus()
    streams: list[PartitionStream] = []
    writers: list[StreamWriter] = []
    async with anyio.create_task_group() as tg:
        for i in range(partitions):
            journal = await provider.journals.open(f"{config.identity.key}/stream/{i}")
            tail = await read_tail(journal)
            stream = PartitionStream(
                partition_id(config.identity.key, i), journal, next_offset=tail.next_offset
            )
            writer = StreamWriter(
                journal,
                stream,
                bus,
                tail,
                clock=clock,
                batch_limit=100,
                record_limit=1 << 20,
                progress_interval=0.001,
                retry_max_delay=0.01,
            )
            await tg.start(writer.run)
            streams.append(stream)
            writers.append(writer)
        yield Harness(config, settings, provider, clock, bus, streams, writers)
        tg.cancel_scope.cancel()


async def start_partition(
    consumers: Any, h: Harness, index: int, tg: Any, provider: Provider | None = None
) -> Any:
    """Start *consumers*' work on partition *index*, as ``run_owned_partition`` does.

    With process handlers that is the partition's ``HomeSteps`` and derived
    process records too, on the harness's stream writer, before the consumers;
    the records (``ProcessRecords``) are returned (``None`` without processes).
    """
    ctx = h.ctx(index, provider)
    records = None
    if getattr(consumers, "has_processes", False):
        steps, records = consumers.home_steps(
            ctx,
            h.writers[index],
            record_limit=1 << 20,
            materialise_delay=0.0,
            retry_max_delay=0.01,
        )
        await tg.start(records.run)
        await tg.start(steps.run)
        consumers.homes[index] = steps
        h.homes.append(steps)
    await tg.start(consumers.run_partition, ctx)
    return records


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], *, timeout: float = 5.0
) -> None:
    """Poll *condition* until it holds (a test helper; the engine itself never polls)."""
    with anyio.fail_after(timeout):
        while True:
            result = condition()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await anyio.sleep(0.002)
