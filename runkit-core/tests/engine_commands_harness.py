"""Test harness for the engine's commands side: small applications and a store checker.

Imported by the ``test_engine_commands*``, ``test_engine_faults*`` and
``test_engine_crash*`` modules through ``sys.path`` (with importlib mode, test
modules are not importable by name). Message types live on a private registry.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import attrs
import msgspec

import dogma
from runkit.config import ApplicationConfig, build
from runkit.engine.cluster.ownership import StaticOwnership
from runkit.engine.commands.inbox import decode_inbox_record, inbox_name
from runkit.engine.commands.instance_records import (
    InstanceCommand,
    InstanceRecord,
    aggregate_name,
)
from runkit.engine.commands.poison import poison_name
from runkit.engine.engine import Engine, meta_name
from runkit.engine.settings import EngineSettings
from runkit.engine.streams import decode_stream_record
from runkit.persistence import Provider, RecordNotFound

REGISTRY = dogma.MessageTypeRegistry()
APP_KEY = "c0000000-0000-4000-8000-000000000001"
ACCOUNTS_KEY = "c0000000-0000-4000-8000-000000000002"
NOTIFIER_KEY = "c0000000-0000-4000-8000-000000000003"
SERIAL_KEY = "c0000000-0000-4000-8000-000000000004"

#: Settings for fast tests: tiny retry delays, quick progress records.
FAST = {
    "retry_base_delay": 0.001,
    "retry_max_delay": 0.01,
    "progress_interval": 0.002,
    "partition_count": 4,
}


@dogma.register_command("c1000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Deposit(dogma.Command):
    account: str
    amount: int
    ref: str = ""

    def message_description(self) -> str:
        return f"depositing {self.amount} into {self.account}"

    def validate(self, scope: dogma.ValidationScope) -> None:
        if not self.account:
            raise dogma.ValidationError("account is required")
        if self.amount <= 0 and scope.is_new:
            raise dogma.ValidationError("amount must be positive")


@dogma.register_event("c1000000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class Deposited(dogma.Event):
    account: str
    amount: int
    balance: int
    ref: str = ""


@dogma.register_command("c1000000-0000-4000-8000-000000000003", registry=REGISTRY)
@attrs.frozen
class Notify(dogma.Command):
    n: int
    ref: str = ""


@dogma.register_event("c1000000-0000-4000-8000-000000000004", registry=REGISTRY)
@attrs.frozen
class Notified(dogma.Event):
    n: int
    ref: str = ""


@dogma.register_command("c1000000-0000-4000-8000-000000000005", registry=REGISTRY)
@attrs.frozen
class Serial(dogma.Command):
    n: int


@dogma.register_event("c1000000-0000-4000-8000-000000000006", registry=REGISTRY)
@attrs.frozen
class SerialDone(dogma.Event):
    n: int


@dogma.register_event("c1000000-0000-4000-8000-000000000007", registry=REGISTRY)
@attrs.frozen
class Unrouted(dogma.Event):
    n: int


@attrs.define
class Account:
    """An account root; snapshots as JSON unless ``snapshots`` is false."""

    snapshots: bool = True
    balance: int = 0
    refs: list[str] = attrs.Factory(list)

    def apply_event(self, event: dogma.Event) -> None:
        if isinstance(event, Deposited):
            self.balance = event.balance
            self.refs.append(event.ref)

    def marshal_binary(self) -> bytes:
        if not self.snapshots:
            raise dogma.NotSupported()
        return json.dumps({"balance": self.balance, "refs": self.refs}).encode()

    def unmarshal_binary(self, data: bytes) -> None:
        if not self.snapshots:
            raise dogma.NotSupported()
        value = json.loads(data)
        self.balance, self.refs = value["balance"], value["refs"]


class Accounts:
    """An aggregate with hooks: scripted failures, bugs, and a record of calls.

    ``fail[ref]`` failures are raised for the command with that ref before it
    succeeds; refs in ``unexpected`` raise ``UnexpectedMessage``; refs in
    ``unrouted`` record an event the handler has no route for; refs in
    ``nothing`` record no event; refs in ``pad`` record their event with the
    ref padded to that many characters.
    """

    def __init__(self, *, snapshots: bool = True) -> None:
        self.snapshots = snapshots
        self.calls: list[tuple[str, str, int]] = []  # (account, ref, balance seen)
        self.fail: dict[str, int] = {}
        self.attempts: dict[str, int] = {}
        self.unexpected: set[str] = set()
        self.unrouted: set[str] = set()
        self.nothing: set[str] = set()
        self.pad: dict[str, int] = {}
        self.messages: list[object] = []  # what handle_command was given
        self.routed: list[object] = []  # what route_command_to_instance was given
        self.events: list[object] = []

    def configure(self, c: Any) -> None:
        c.identity("accounts", ACCOUNTS_KEY)
        c.routes(
            dogma.handles_command(Deposit, registry=REGISTRY),
            dogma.records_event(Deposited, registry=REGISTRY),
        )

    def new(self) -> Account:
        return Account(snapshots=self.snapshots)

    def route_command_to_instance(self, command: dogma.Command) -> str:
        assert isinstance(command, Deposit)
        self.routed.append(command)
        return command.account

    def handle_command(self, root: Account, scope: Any, command: dogma.Command) -> None:
        assert isinstance(command, Deposit)
        self.messages.append(command)
        self.attempts[command.ref] = self.attempts.get(command.ref, 0) + 1
        if command.ref in self.unexpected:
            raise dogma.UnexpectedMessage(command)
        if self.fail.get(command.ref, 0) > 0:
            self.fail[command.ref] -= 1
            raise RuntimeError(f"scripted failure of {command.ref}")
        self.calls.append((command.account, command.ref, root.balance))
        if command.ref in self.nothing:
            return
        if command.ref in self.unrouted:
            scope.record_event(Unrouted(1))
        event = Deposited(
            command.account,
            command.amount,
            root.balance + command.amount,
            command.ref.ljust(self.pad.get(command.ref, 0), "."),
        )
        self.events.append(event)
        scope.record_event(event)
        assert root.balance == event.balance  # applied at once


class Notifier:
    """An integration with hooks: concurrency tracking, scripted failures and delays."""

    def __init__(self, *, key: str = NOTIFIER_KEY, name: str = "notifier", minimize: bool = False):
        self.key, self.name, self.minimize = key, name, minimize
        self.active = 0
        self.max_active = 0
        self.calls: list[int] = []
        self.fail: dict[int, int] = {}
        self.fail_after_record: dict[int, int] = {}
        self.delay = 0.0
        self.release: anyio.Event | None = None

    def configure(self, c: Any) -> None:
        c.identity(self.name, self.key)
        command, event = (Serial, SerialDone) if self.minimize else (Notify, Notified)
        c.routes(
            dogma.handles_command(command, registry=REGISTRY),
            dogma.records_event(event, registry=REGISTRY),
        )
        if self.minimize:
            c.concurrency_preference(dogma.ConcurrencyPreference.MINIMIZE)

    async def handle_command(self, scope: Any, command: dogma.Command) -> None:
        assert isinstance(command, Notify | Serial)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            self.calls.append(command.n)
            if self.release is not None:
                await self.release.wait()
            if self.delay:
                await anyio.sleep(self.delay)
            if self.fail.get(command.n, 0) > 0:
                self.fail[command.n] -= 1
                raise RuntimeError(f"scripted failure of {command.n}")
            if isinstance(command, Serial):
                scope.record_event(SerialDone(command.n))
                return
            scope.record_event(Notified(command.n, command.ref))
            if self.fail_after_record.get(command.n, 0) > 0:
                self.fail_after_record[command.n] -= 1
                raise RuntimeError(f"scripted failure after recording {command.n}")
        finally:
            self.active -= 1


class App:
    def __init__(self, *handlers: Any, key: str = APP_KEY, name: str = "testapp") -> None:
        self.handlers = handlers
        self.key, self.name = key, name

    def configure(self, c: Any) -> None:
        c.identity(self.name, self.key)
        routes: list[Any] = []
        for h in self.handlers:
            if isinstance(h, Accounts):
                routes.append(dogma.via_aggregate(h))
            else:
                routes.append(dogma.via_integration(h))
        c.routes(*routes)


@attrs.define
class Setup:
    """An application with its handlers, ready to run on engines."""

    app: App
    config: ApplicationConfig
    accounts: Accounts
    notifier: Notifier
    serial: Notifier
    accounts_key: str = ACCOUNTS_KEY


def setup(*, snapshots: bool = True) -> Setup:
    accounts = Accounts(snapshots=snapshots)
    notifier = Notifier()
    serial = Notifier(key=SERIAL_KEY, name="serial", minimize=True)
    app = App(accounts, notifier, serial)
    return Setup(app, build(app, registry=REGISTRY), accounts, notifier, serial)


@asynccontextmanager
async def running(
    provider: Provider, *configs: ApplicationConfig, **settings: Any
) -> AsyncIterator[Engine]:
    """Run an engine on *provider* for the duration of the block."""
    options = {**FAST, **settings}
    engine = Engine.from_settings(
        EngineSettings(applications=configs, persistence_provider=provider, **options)
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await engine.runtime(configs[0].identity.key)
        try:
            yield engine
        finally:
            tg.cancel_scope.cancel()


async def execute_in_batch(engine: Engine, command: dogma.Command, app_key: str = APP_KEY) -> None:
    """Execute *command* in its partition's batch on *engine*, which must run the partition.

    Callers' integration commands go to the inbox (ADR 0011), yet the batch
    still takes those a peer of an earlier release offers; its edges (a stop,
    a spill) are best tested with them, since nothing but the stream proves
    they were handled. As acceptance does, what the partition did not commit
    before it stopped is spilled to its inbox.
    """
    from runkit.engine.commands.acceptance import PartitionStopped
    from runkit.engine.envelope import new_envelope

    runtime = await engine.runtime(app_key)
    envelope = new_envelope(command, app_key=app_key, site_key=None, created_at=datetime.now(UTC))
    index, entry = runtime.acceptor.route(envelope, keyed=False)
    try:
        await runtime.partitions[index].execute_local([entry])
    except PartitionStopped as stopped:
        spilled = stopped.spilled([entry])
        if spilled:
            await runtime.inbox_writers[index].submit(spilled)


def one_partition_engine(
    config: ApplicationConfig, provider: Provider, **settings: Any
) -> tuple[Engine, StaticOwnership]:
    """An engine of one partition on *provider* that owns what the test assigns."""
    options = {"retry_base_delay": 0.001, "progress_interval": 0.002, **settings}
    engine = Engine.from_settings(
        EngineSettings(
            applications=(config,),
            persistence_provider=provider,
            partition_count=1,
            **options,
        )
    )
    ownership = StaticOwnership()
    engine.use_ownership(ownership)
    return engine, ownership


def cached_refs(runtime: Any, config: ApplicationConfig, instance: str) -> list[str]:
    """The refs of the deposits applied to *instance*'s cached root on partition 0."""
    handler = config.handler_by_name("accounts")
    assert handler is not None
    cached = runtime.partitions[0]._aggregates.cached(handler, instance)
    assert cached is not None
    return list(cached.root.refs)


def splitting_node_ids(partitions: int, app_key: str = APP_KEY) -> tuple[uuid.UUID, uuid.UUID]:
    """Two random node IDs between which rendezvous hashing splits *app_key*'s partitions.

    Each node wins at least two of them (with one node's share fixed, a test
    can still find another partition that node owns). With 8 partitions, 1
    random pair in 128 gives one node all of them and 16 in 256 give one node
    a single one; tests that need both nodes to own some start their nodes
    with these IDs. The split depends on the application's key: pass the key
    of the application the nodes run.
    """
    from collections import Counter

    from runkit.engine.partitions import partition_id
    from runkit.rendezvous import winner

    least = min(2, partitions // 2)
    while True:
        ids = (uuid.uuid4(), uuid.uuid4())
        won = Counter(winner(partition_id(app_key, i), ids) for i in range(partitions))
        if len(won) == 2 and min(won.values()) >= least:
            return ids


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], *, timeout: float = 10.0
) -> None:
    """Poll *predicate* until true; fail the test after *timeout* seconds."""
    with anyio.fail_after(timeout):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await anyio.sleep(0.002)


# -- reading the stores back ---------------------------------------------------------------


@attrs.define
class Stores:
    """Everything the commands side wrote for one application, decoded."""

    partition_count: int
    inbox: dict[int, list[tuple[int, Any]]]  # partition -> [(position, InboxRecord)]
    stream: dict[int, list[Any]]  # partition -> [StreamRecord]
    poison: dict[str, Any]  # command ID -> PoisonRecord
    # instance ID -> the commands in its journal, in order (accounts handler)
    instances: dict[str, list[InstanceCommand | InstanceRecord]]
    truncated: dict[str, int] = attrs.Factory(dict)  # instance ID -> journal begin, if > 0

    def accepted_ids(self) -> set[str]:
        return {
            e.envelope.message_id
            for records in self.inbox.values()
            for _, r in records
            for e in r.entries
        }

    def published(self) -> list[tuple[int, str, str, int]]:
        """(partition, command ID, event ID, offset) for every published event."""
        out = []
        for p, records in self.stream.items():
            for r in records:
                for i, env in enumerate(r.events):
                    out.append((p, env.causation_id, env.message_id, r.first_offset + i))
        return out

    def events_of(self, command_id: str) -> list[Any]:
        return [
            env
            for records in self.stream.values()
            for r in records
            for env in r.events
            if env.causation_id == command_id
        ]

    def all_events(self) -> list[Any]:
        return [env for records in self.stream.values() for r in records for env in r.events]

    def unsettled(self) -> list[str]:
        """What is not done yet: empty once everything accepted is published and written."""
        published = {
            cid for records in self.stream.values() for r in records for cid in r.command_ids
        }
        missing = [
            cid for cid in self.accepted_ids() if cid not in published and cid not in self.poison
        ]
        problems = [f"accepted, not published: {missing[:5]}"] if missing else []
        if not self.fully_processed():
            problems.append("inbox not fully processed")
        if not self.materialised():
            problems.append("instance journals behind the stream")
        return problems

    def materialised(self) -> bool:
        """Whether every instance journal holds all its commands and events (written behind)."""
        for account, records in self.instances.items():
            journal = [env.message_id for r in records for env in r.events]
            stream = [
                env.message_id
                for records_ in self.stream.values()
                for r in records_
                for env in r.events
                if env.source_instance == account and env.source_handler == ACCOUNTS_KEY
            ]
            if stream[len(stream) - len(journal) :] != journal or (
                account not in self.truncated and len(journal) != len(stream)
            ):
                return False
            # Commands that recorded no events are written too.
            commands = [
                c
                for records_ in self.stream.values()
                for r in records_
                for c in _instance_commands(r, account)
            ]
            ids = [r.command_id for r in records]
            if commands[len(commands) - len(ids) :] != ids or (
                account not in self.truncated and len(ids) != len(commands)
            ):
                return False
        return True

    def fully_processed(self) -> bool:
        """Whether every partition's last stream header covers its whole inbox."""
        for p in range(self.partition_count):
            end = self.inbox[p][-1][0] + 1 if self.inbox[p] else 0
            done = self.stream[p][-1].inbox_position if self.stream[p] else 0
            if done < end:
                return False
        return True


async def read_stores(provider: Provider, app_key: str = APP_KEY) -> Stores:
    async with await provider.keyspaces.open(meta_name(app_key)) as meta:
        value, _ = await meta.get(b"partitions")
    count = msgspec.msgpack.decode(value)["partition_count"]
    inbox: dict[int, list[tuple[int, Any]]] = {}
    stream: dict[int, list[Any]] = {}
    poison: dict[str, Any] = {}
    instances: dict[str, list[InstanceCommand | InstanceRecord]] = {}
    truncated: dict[str, int] = {}
    from runkit.engine.commands.poison import PoisonRecord

    for p in range(count):
        async with await provider.journals.open(inbox_name(app_key, p)) as j:
            inbox[p] = [(pos, decode_inbox_record(d)) async for pos, d in _range(j)]
        async with await provider.journals.open(f"{app_key}/stream/{p}") as j:
            stream[p] = [decode_stream_record(d) async for _, d in _range(j)]
        async with await provider.keyspaces.open(poison_name(app_key, p)) as ks:
            async for key, v, _ in ks.range():
                poison[key.decode()] = msgspec.msgpack.decode(v, type=PoisonRecord)
    # Local commands skip the inbox (ADR 0007): instances are known from the stream too.
    accounts = (
        {
            e.instance_id
            for records in inbox.values()
            for _, r in records
            for e in r.entries
            if e.handler_key == ACCOUNTS_KEY
        }
        | {
            env.source_instance
            for records_ in stream.values()
            for r in records_
            for env in r.events
            if env.source_handler == ACCOUNTS_KEY
        }
        | {
            q.instance_id
            for records_ in stream.values()
            for r in records_
            for q in r.event_less
            if q.handler_key == ACCOUNTS_KEY
        }
    )
    for account in accounts:
        assert account is not None
        async with await provider.journals.open(
            aggregate_name(app_key, ACCOUNTS_KEY, account)
        ) as j:
            instances[account] = [
                c
                async for _, d in _range(j)
                for c in msgspec.msgpack.decode(d, type=InstanceRecord).commands()
            ]
            begin = (await j.bounds()).begin
            if begin:
                truncated[account] = begin
    return Stores(count, inbox, stream, poison, instances, truncated)


async def _range(journal: Any) -> AsyncIterator[tuple[int, bytes]]:
    """The journal's records; read again if the engine truncates it while we read."""
    while True:
        bounds = await journal.bounds()
        if bounds.end <= bounds.begin:
            return
        try:
            items = [item async for item in journal.range(bounds.begin)]
        except RecordNotFound:
            continue  # a truncation overtook the read (truncate_aggregate_journals)
        for item in items:
            yield item
        return


def check_invariants(stores: Stores, *, expect_all_done: bool = True) -> None:
    """Check architecture §9.1-9.3 over the final stores.

    - every accepted command is published (events) or poisoned, exactly once;
    - stream offsets are dense from 0, and no event or command is published twice;
    - each instance journal holds a command at most once, and the stream
      carries exactly its events, in journal order, on one stream;
    - balances in an instance's events follow each other (each handling saw
      every earlier event of the instance).
    """
    seen_events: set[str] = set()
    published_commands: dict[str, int] = {}
    for p, records in stores.stream.items():
        offset = 0
        for r in records:
            assert r.first_offset == offset, f"partition {p}: offset gap at {offset}"
            offset += len(r.events)
            for env in r.events:
                assert env.message_id not in seen_events, f"event {env.message_id} published twice"
                seen_events.add(env.message_id)
            for cid in r.command_ids:
                assert cid not in published_commands, f"command {cid} published twice"
                published_commands[cid] = p
            # A record commits the commands it lists; some recorded no events.
            assert {env.causation_id for env in r.events} <= set(r.command_ids)
    if expect_all_done:
        for cid in stores.accepted_ids():
            assert cid in published_commands or cid in stores.poison, (
                f"accepted command {cid} was neither published nor poisoned"
            )
        assert stores.fully_processed(), "inbox positions not fully processed"
    for account, records in stores.instances.items():
        ids = [r.command_id for r in records]
        assert len(ids) == len(set(ids)), f"instance {account}: a command committed twice"
        journal_events = [env.message_id for r in records for env in r.events]
        stream_events = [
            env.message_id
            for records_ in stores.stream.values()
            for r in records_
            for env in r.events
            if env.source_instance == account and env.source_handler == ACCOUNTS_KEY
        ]
        if account in stores.truncated:
            # Only the journal after a snapshot is left: the stream must end with it.
            assert stream_events[len(stream_events) - len(journal_events) :] == journal_events
        elif expect_all_done:
            assert stream_events == journal_events, f"instance {account}: stream != journal"
            # Every command the instance handled, those that recorded no events
            # included (a rebuild must know their IDs), in stream order.
            stream_commands = [
                cid
                for records_ in stores.stream.values()
                for r in records_
                for cid in _instance_commands(r, account)
            ]
            assert stream_commands == ids, f"instance {account}: stream commands != journal"
        else:
            assert journal_events[: len(stream_events)] == stream_events
        partitions = {published_commands[c] for c in ids if c in published_commands}
        assert len(partitions) <= 1, f"instance {account} published on several streams"
        balance = 0
        history = [
            env
            for records_ in stores.stream.values()
            for r in records_
            for env in r.events
            if env.source_instance == account and env.source_handler == ACCOUNTS_KEY
        ]
        if not expect_all_done:
            history = [env for r in records for env in r.events]
        for env in history:
            event = msgspec.json.decode(env.data)
            assert event["balance"] == balance + event["amount"], (
                f"instance {account}: handling did not see every earlier event"
            )
            balance = event["balance"]


def _instance_commands(record: Any, account: str) -> list[str]:
    """The IDs of the commands a stream record commits on an ``accounts`` instance."""
    indexes = {
        q.index
        for q in record.event_less
        if q.handler_key == ACCOUNTS_KEY and q.instance_id == account
    }
    with_events = {
        env.causation_id
        for env in record.events
        if env.source_instance == account and env.source_handler == ACCOUNTS_KEY
    }
    return [cid for i, cid in enumerate(record.command_ids) if i in indexes or cid in with_events]


async def settled(provider: Provider, app_key: str = APP_KEY, *, timeout: float = 10.0) -> Stores:
    """Wait until every accepted command is published or poisoned and the inbox is processed."""
    stores: Stores | None = None
    try:
        with anyio.fail_after(timeout):
            while True:
                stores = await read_stores(provider, app_key)
                if not stores.unsettled():
                    return stores
                await anyio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"not settled: {stores.unsettled() if stores else None}") from None
