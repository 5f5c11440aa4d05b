"""Throughput of the engine's events side: projection and process consumers.

Usage::

    uv run python benchmarks/events.py [--events N] [--partitions P]
        [--backend asyncio|uvloop|trio] [--url memory:///bench]

Pre-fills P partition streams with N events in total (real stream writers on the
given persistence), then measures, from a cold start of the consumers until the
last event is handled, events per second for:

=====================  ======================================================
projection MAXIMIZE    an in-memory ADR-26 projection, partitions in parallel
projection MINIMIZE    the same, one event at a time across partitions
process                a process routing every event to one of 1,000
                       instances, mutating the root and executing one command
                       (two conditional keyspace writes per event, plus accept)
=====================  ======================================================

``accept`` is a no-op here: the numbers are the events side's own cost.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

import anyio
import attrs

import dogma
from runkit._backends import BACKENDS, run_arguments
from runkit.config import build
from runkit.engine.envelope import new_envelope, register_types
from runkit.engine.events.consumers import ConsumerOptions, EventConsumers
from runkit.engine.partitions import PartitionContext, partition_id, partition_of
from runkit.engine.settings import EngineSettings, utc_now
from runkit.engine.streams import EventBus, PartitionStream, StreamWriter, read_tail
from runkit.persistence import Provider, provider_from_url

REGISTRY = dogma.MessageTypeRegistry()
APP_KEY = "a9000000-0000-4000-8000-000000000001"


@dogma.register_event("e9000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Happened(dogma.Event):
    n: int


@dogma.register_command("c9000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class React(dogma.Command):
    n: int


@dogma.register_event("e9000000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class Reacted(dogma.Event):
    n: int


class Projection:
    def __init__(self, preference: dogma.ConcurrencyPreference, done: Any, total: int) -> None:
        self.preference = preference
        self.checkpoints: dict[str, int] = {}
        self.count = 0
        self.done = done
        self.total = total

    def configure(self, c: Any) -> None:
        c.identity("projection", "b9000000-0000-4000-8000-000000000001")
        c.routes(dogma.handles_event(Happened, registry=REGISTRY))
        c.concurrency_preference(self.preference)

    async def handle_event(self, scope: Any, event: Any) -> int:
        if self.checkpoints.get(scope.stream_id, 0) != scope.checkpoint_offset:
            return self.checkpoints.get(scope.stream_id, 0)
        self.checkpoints[scope.stream_id] = scope.offset + 1
        self.count += 1
        if self.count == self.total:
            self.done.set()
        return int(scope.offset + 1)

    async def checkpoint_offset(self, stream_id: str) -> int:
        return self.checkpoints.get(stream_id, 0)

    async def compact(self, scope: Any) -> None:
        pass

    async def reset(self, scope: Any) -> None:
        pass


@attrs.define
class Root:
    count: int = 0

    def process_instance_description(self, ended: bool) -> str:
        return ""

    def marshal_binary(self) -> bytes:
        return json.dumps(self.count).encode()

    def unmarshal_binary(self, data: bytes) -> None:
        self.count = json.loads(data)


class Process(dogma.NoDeadlineMessagesBehavior):
    def __init__(self, done: Any, total: int) -> None:
        self.count = 0
        self.done = done
        self.total = total

    def configure(self, c: Any) -> None:
        c.identity("process", "b9000000-0000-4000-8000-000000000002")
        c.routes(
            dogma.handles_event(Happened, registry=REGISTRY),
            dogma.executes_command(React, registry=REGISTRY),
        )

    def new(self) -> Root:
        return Root()

    async def route_event_to_instance(self, event: Any) -> str:
        return str(event.n % 1000)

    async def handle_event(self, root: Root, scope: Any, event: Any) -> None:
        def bump(r: Root) -> None:
            r.count += 1

        scope.mutate(bump)
        scope.execute_command(React(event.n))
        self.count += 1
        if self.count == self.total:
            self.done.set()


class Reactor:
    def configure(self, c: Any) -> None:
        c.identity("reactor", "b9000000-0000-4000-8000-000000000003")
        c.routes(
            dogma.handles_command(React, registry=REGISTRY),
            dogma.records_event(Reacted, registry=REGISTRY),
        )

    async def handle_command(self, scope: Any, command: Any) -> None:
        pass


@attrs.frozen
class App:
    handlers: tuple[Any, ...]

    def configure(self, c: Any) -> None:
        c.identity("bench", APP_KEY)
        routes: list[Any] = [dogma.via_integration(Reactor())]
        for h in self.handlers:
            via = dogma.via_projection if isinstance(h, Projection) else dogma.via_process
            routes.append(via(h))
        c.routes(*routes)


async def _noop_accept(envelopes: Any) -> None:
    pass


async def measure(
    name: str, handler: Any, done: anyio.Event, provider: Provider, events: int, partitions: int
) -> None:
    config = build(App((handler,)), registry=REGISTRY)
    register_types(config.message_types())
    settings = EngineSettings(applications=(config,), partition_count=partitions)
    bus = EventBus()
    async with anyio.create_task_group() as tg:
        streams = []
        for i in range(partitions):
            journal = await provider.journals.open(f"{APP_KEY}/{name}/stream/{i}")
            tail = await read_tail(journal)
            stream = PartitionStream(
                partition_id(APP_KEY, i), journal, next_offset=tail.next_offset
            )
            writer = StreamWriter(
                journal,
                stream,
                bus,
                tail,
                clock=utc_now,
                batch_limit=1000,
                record_limit=provider.limits.max_record_bytes,
                progress_interval=0.01,
                retry_max_delay=0.1,
            )
            await tg.start(writer.run)
            for start in range(i, events, partitions * 100):
                batch = [
                    new_envelope(Happened(n), app_key=APP_KEY, site_key=None, created_at=utc_now())
                    for n in range(start, min(events, start + partitions * 100), partitions)
                ]
                await writer.publish(str(uuid.uuid4()), batch)
            streams.append(stream)

        consumers = EventConsumers(config, settings, options=ConsumerOptions())
        began = time.perf_counter()
        for i, stream in enumerate(streams):
            ctx = PartitionContext(
                app=config,
                settings=settings,
                index=i,
                partition_id=stream.stream_id,
                partition_count=partitions,
                provider=provider,
                stream=stream,
                accept=_noop_accept,
                partition_of=lambda key: partition_of(key, partitions),
                now=utc_now,
            )
            await tg.start(consumers.run_partition, ctx)
        await done.wait()
        elapsed = time.perf_counter() - began
        tg.cancel_scope.cancel()
    print(f"{name:<22} {events / elapsed:>10,.0f} events/s  ({events} events, {elapsed:.2f} s)")


async def main(args: argparse.Namespace) -> None:
    provider = provider_from_url(args.url)
    try:
        for name, make in (
            (
                "projection MAXIMIZE",
                lambda d: Projection(dogma.ConcurrencyPreference.MAXIMIZE, d, args.events),
            ),
            (
                "projection MINIMIZE",
                lambda d: Projection(dogma.ConcurrencyPreference.MINIMIZE, d, args.events),
            ),
            ("process", lambda d: Process(d, args.events)),
        ):
            done = anyio.Event()
            await measure(
                name.replace(" ", "-"), make(done), done, provider, args.events, args.partitions
            )
    finally:
        await provider.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--backend", choices=BACKENDS, default="asyncio")
    parser.add_argument("--url", default=f"memory:///bench-{uuid.uuid4()}")
    arguments = parser.parse_args()
    anyio.run(main, arguments, **run_arguments(arguments.backend))
