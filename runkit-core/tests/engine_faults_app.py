"""A small application exercising every handler kind, and a checker of architecture §9.

Shared by ``test_engine_faults_invariants.py`` (memory driver under injected
faults), ``test_engine_crash.py`` (PostgreSQL, kill -9 of real node processes)
and ``crash_runner.py`` (the node process those tests start). Test modules
import it through ``sys.path`` (with importlib mode they are not importable by
name); the runner does the same.

The application (its message types live on a private registry):

- ``accounts`` aggregate: ``Deposit``, ``Withdraw`` (which records nothing
  if the balance is short), ``Leave`` (the loyalty programme; refused the
  second time) and ``AddPoints``; every other command records exactly one
  event, and each event carries the running balance or points total, so the
  checker can tell from the stores that every handling saw every earlier
  event (§9.3). A refused withdrawal handled again after a deposit would
  withdraw, so it tests that commands without events are remembered too.
- ``loyalty`` process, one instance per account: each ``Deposited`` mutates the
  root (a deposit count), executes ``AddPoints`` and, on every second deposit,
  schedules a ``Review`` deadline; ``Left`` ends the instance. The review
  executes ``SendStatement`` carrying its ``scheduled_for`` and the time it was
  handled (§9.5). Everything it does is a function of the account's events in
  stream order, so the expected effects can be derived from the final stores.
- ``statements`` integration: ``SendStatement`` records ``StatementSent``.
- ``counter`` projection (ADR-26): its own checkpoint and the IDs of the
  events it applied live in one value per stream in the keyspace
  ``<app>/test-projection``, written with one conditional ``set`` per event.

``read_stores`` decodes every store the engine wrote; ``check_safety`` checks
what must hold at every moment (nothing duplicated, reordered or skipped),
``check_complete`` what must hold once the engine has settled (nothing lost),
and ``settle`` polls until both hold.
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from collections import Counter as Tally
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import anyio
import attrs
import msgspec

import dogma
from runkit.config import ApplicationConfig, build
from runkit.engine.commands.acceptance import idempotency_name
from runkit.engine.commands.inbox import EngineStopped, InboxRecord, decode_inbox_record, inbox_name
from runkit.engine.commands.instance_records import InstanceCommand, aggregate_name
from runkit.engine.commands.instance_records import InstanceRecord as AggregateRecord
from runkit.engine.commands.poison import poison_name
from runkit.engine.engine import Engine, meta_name
from runkit.engine.envelope import Envelope, register_types, to_message
from runkit.engine.events.deadlines import deadline_journal_name
from runkit.engine.events.process_instances import ProcessRecord
from runkit.engine.events.process_stores import event_poison_store_name, process_store_name
from runkit.engine.partitions import partition_id
from runkit.engine.settings import EngineSettings
from runkit.engine.streams import StreamRecord, decode_stream_record
from runkit.persistence import (
    Conflict,
    Journal,
    Keyspace,
    PersistenceError,
    Provider,
    RecordNotFound,
)

__all__ = [
    "APP_KEY",
    "REGISTRY",
    "BankApp",
    "Stores",
    "check_complete",
    "check_safety",
    "command_id",
    "execute_all",
    "read_stores",
    "running",
    "settle",
    "workload",
]

REGISTRY = dogma.MessageTypeRegistry()
APP_KEY = "5afe0000-0000-4000-8000-000000000001"
ACCOUNTS_KEY = "5afe0000-0000-4000-8000-000000000002"
LOYALTY_KEY = "5afe0000-0000-4000-8000-000000000003"
STATEMENTS_KEY = "5afe0000-0000-4000-8000-000000000004"
COUNTER_KEY = "5afe0000-0000-4000-8000-000000000005"

#: How long after the deposit that schedules it a review falls due.
REVIEW_DELAY = timedelta(milliseconds=250)


def command_id(idempotency_key: str) -> str:
    """The command ID the engine derives from an idempotency key (architecture §2)."""
    return str(uuid.uuid5(uuid.UUID(APP_KEY), idempotency_key))


def projection_store_name(app_key: str = APP_KEY) -> str:
    """The keyspace holding the ``counter`` projection's state."""
    return f"{app_key}/test-projection"


# -- messages ------------------------------------------------------------------------------


@dogma.register_command("5afe0001-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Deposit(dogma.Command):
    account: str
    amount: int


@dogma.register_command("5afe0001-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class Withdraw(dogma.Command):
    account: str
    amount: int


@dogma.register_command("5afe0001-0000-4000-8000-000000000003", registry=REGISTRY)
@attrs.frozen
class Leave(dogma.Command):
    account: str


@dogma.register_command("5afe0001-0000-4000-8000-000000000004", registry=REGISTRY)
@attrs.frozen
class AddPoints(dogma.Command):
    account: str
    points: int


@dogma.register_command("5afe0001-0000-4000-8000-000000000005", registry=REGISTRY)
@attrs.frozen
class SendStatement(dogma.Command):
    account: str
    n: int
    scheduled_for: datetime
    handled_at: datetime


@dogma.register_event("5afe0002-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Deposited(dogma.Event):
    account: str
    amount: int
    balance: int


@dogma.register_event("5afe0002-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class Withdrawn(dogma.Event):
    account: str
    amount: int
    balance: int


@dogma.register_event("5afe0002-0000-4000-8000-000000000003", registry=REGISTRY)
@attrs.frozen
class Refused(dogma.Event):
    account: str
    reason: str


@dogma.register_event("5afe0002-0000-4000-8000-000000000004", registry=REGISTRY)
@attrs.frozen
class Left(dogma.Event):
    account: str


@dogma.register_event("5afe0002-0000-4000-8000-000000000005", registry=REGISTRY)
@attrs.frozen
class PointsAdded(dogma.Event):
    account: str
    points: int
    total: int


@dogma.register_event("5afe0002-0000-4000-8000-000000000006", registry=REGISTRY)
@attrs.frozen
class StatementSent(dogma.Event):
    account: str
    n: int
    scheduled_for: datetime
    handled_at: datetime


@dogma.register_deadline("5afe0003-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Review(dogma.Deadline):
    account: str
    n: int


# Decoding stored envelopes (``to_message``) needs the types even in a process
# that runs no engine, such as a test reading the stores a node left behind.
register_types(REGISTRY)


# -- handlers ------------------------------------------------------------------------------


@attrs.define
class Account:
    """The ``accounts`` root; snapshots as JSON."""

    balance: int = 0
    points: int = 0
    left: bool = False

    def apply_event(self, event: dogma.Event) -> None:
        if isinstance(event, Deposited | Withdrawn):
            self.balance = event.balance
        elif isinstance(event, PointsAdded):
            self.points = event.total
        elif isinstance(event, Left):
            self.left = True

    def marshal_binary(self) -> bytes:
        return json.dumps([self.balance, self.points, self.left]).encode()

    def unmarshal_binary(self, data: bytes) -> None:
        self.balance, self.points, self.left = json.loads(data)


class Accounts:
    """Every command records one event, but a withdrawal the balance cannot cover records none."""

    def configure(self, c: Any) -> None:
        c.identity("accounts", ACCOUNTS_KEY)
        c.routes(
            *(dogma.handles_command(t, registry=REGISTRY) for t in _ACCOUNT_COMMANDS),
            *(
                dogma.records_event(t, registry=REGISTRY)
                for t in (Deposited, Withdrawn, Refused, Left, PointsAdded)
            ),
        )

    def new(self) -> Account:
        return Account()

    def route_command_to_instance(self, command: dogma.Command) -> str:
        assert isinstance(command, _ACCOUNT_COMMANDS)
        return command.account

    def handle_command(self, root: Account, scope: Any, command: dogma.Command) -> None:
        if isinstance(command, AddPoints):
            total = root.points + command.points
            scope.record_event(PointsAdded(command.account, command.points, total))
        elif isinstance(command, Deposit):
            balance = root.balance + command.amount
            scope.record_event(Deposited(command.account, command.amount, balance))
        elif isinstance(command, Withdraw):
            if root.balance < command.amount:
                scope.log("insufficient funds")  # nothing recorded
            else:
                balance = root.balance - command.amount
                scope.record_event(Withdrawn(command.account, command.amount, balance))
        elif isinstance(command, Leave):
            scope.record_event(
                Refused(command.account, "left") if root.left else Left(command.account)
            )
        else:
            raise dogma.UnexpectedMessage(command)


_ACCOUNT_COMMANDS = (Deposit, Withdraw, Leave, AddPoints)


@attrs.define
class LoyaltyRoot:
    deposits: int = 0

    def process_instance_description(self, ended: bool) -> str:
        return f"{self.deposits} deposits" + (" (ended)" if ended else "")

    def marshal_binary(self) -> bytes:
        return json.dumps(self.deposits).encode()

    def unmarshal_binary(self, data: bytes) -> None:
        self.deposits = json.loads(data)


class Loyalty:
    """Points per deposit, a review every second deposit; ends when the account leaves."""

    def __init__(self, *, delay: float = 0.0, disabled: bool = False) -> None:
        self.disabled = disabled
        self._delay = delay

    def configure(self, c: Any) -> None:
        c.identity("loyalty", LOYALTY_KEY)
        if self.disabled:
            c.disable()
        c.routes(
            dogma.handles_event(Deposited, registry=REGISTRY),
            dogma.handles_event(Left, registry=REGISTRY),
            dogma.executes_command(AddPoints, registry=REGISTRY),
            dogma.executes_command(SendStatement, registry=REGISTRY),
            dogma.schedules_deadline(Review, registry=REGISTRY),
        )

    def new(self) -> LoyaltyRoot:
        return LoyaltyRoot()

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        assert isinstance(event, Deposited | Left)
        return event.account

    async def handle_event(self, root: LoyaltyRoot, scope: Any, event: dogma.Event) -> None:
        if self._delay:
            await anyio.sleep(self._delay)
        if isinstance(event, Left):
            scope.end()
            return
        assert isinstance(event, Deposited)

        def count(r: LoyaltyRoot) -> None:
            r.deposits += 1

        scope.mutate(count)
        scope.execute_command(AddPoints(event.account, 1))
        if root.deposits % 2 == 0:
            scope.schedule_deadline(
                Review(event.account, root.deposits), scope.now() + REVIEW_DELAY
            )

    async def handle_deadline(
        self, root: LoyaltyRoot, scope: Any, deadline: dogma.Deadline
    ) -> None:
        assert isinstance(deadline, Review)
        scope.execute_command(
            SendStatement(deadline.account, deadline.n, scope.scheduled_for, scope.now())
        )


class Statements:
    """An integration: sends (records) statements."""

    def configure(self, c: Any) -> None:
        c.identity("statements", STATEMENTS_KEY)
        c.routes(
            dogma.handles_command(SendStatement, registry=REGISTRY),
            dogma.records_event(StatementSent, registry=REGISTRY),
        )

    async def handle_command(self, scope: Any, command: dogma.Command) -> None:
        assert isinstance(command, SendStatement)
        scope.record_event(
            StatementSent(command.account, command.n, command.scheduled_for, command.handled_at)
        )


class ProjectionState(msgspec.Struct, frozen=True):
    """One stream's state of the ``counter`` projection: its checkpoint and what it applied.

    ``applied`` holds one ``applied_entry`` per event, in the order applied.
    """

    next: int
    applied: list[str]


_state_decoder = msgspec.msgpack.Decoder(ProjectionState)


def applied_entry(offset: int, data: bytes) -> str:
    """How the projection records the event at *offset* whose ``marshal_binary()`` is *data*.

    The content digest lets the checker tell that the event delivered at an
    offset is the one the stream holds there.
    """
    return f"{offset}:{hashlib.blake2b(data, digest_size=6).hexdigest()}"


_ALL_EVENTS = (Deposited, Withdrawn, Refused, Left, PointsAdded, StatementSent)


class CounterProjection(dogma.NoCompactBehavior):
    """An ADR-26 projection keeping its checkpoint in the engine's store.

    The checkpoint and the record of applied events change together in one
    conditional write, so the stored state is exactly what was applied. *delay* slows each
    event down (to kill a node in the middle of a catch-up).
    """

    def __init__(self, provider: Provider, *, delay: float = 0.0, disabled: bool = False) -> None:
        self._provider = provider
        self._delay = delay
        self._store: Keyspace | None = None
        self.disabled = disabled

    def configure(self, c: Any) -> None:
        c.identity("counter", COUNTER_KEY)
        if self.disabled:
            c.disable()
        c.routes(*(dogma.handles_event(t, registry=REGISTRY) for t in _ALL_EVENTS))

    async def _keyspace(self) -> Keyspace:
        if self._store is None:
            self._store = await self._provider.keyspaces.open(projection_store_name())
        return self._store

    async def _load(self, stream_id: str) -> tuple[ProjectionState, str]:
        value, revision = await (await self._keyspace()).get(stream_id.encode())
        if not value:
            return ProjectionState(0, []), revision
        return _state_decoder.decode(value), revision

    async def checkpoint_offset(self, stream_id: str) -> int:
        return (await self._load(stream_id))[0].next

    async def handle_event(self, scope: dogma.ProjectionEventScope, event: dogma.Event) -> int:
        if self._delay:
            await anyio.sleep(self._delay)
        state, revision = await self._load(scope.stream_id)
        if state.next != scope.checkpoint_offset:
            return state.next  # OCC: tell the engine where we really are
        entry = applied_entry(scope.offset, event.marshal_binary())
        applied = ProjectionState(scope.offset + 1, [*state.applied, entry])
        try:
            await (await self._keyspace()).set(
                scope.stream_id.encode(), msgspec.msgpack.encode(applied), revision
            )
        except Conflict:
            return (await self._load(scope.stream_id))[0].next
        return scope.offset + 1

    async def reset(self, scope: Any) -> None:
        raise dogma.NotSupported()


class BankApp:
    """The test application.

    *disabled* names handlers (``loyalty``, ``counter``) to disable, so that
    events pile up for a later catch-up; *projection_delay* and *process_delay*
    slow those handlers down (seconds per event).
    """

    def __init__(
        self,
        provider: Provider,
        *,
        disabled: Iterable[str] = (),
        projection_delay: float = 0.0,
        process_delay: float = 0.0,
    ) -> None:
        off = frozenset(disabled)
        self.accounts = Accounts()
        self.loyalty = Loyalty(delay=process_delay, disabled="loyalty" in off)
        self.statements = Statements()
        self.counter = CounterProjection(
            provider, delay=projection_delay, disabled="counter" in off
        )

    def configure(self, c: Any) -> None:
        c.identity("faultbank", APP_KEY)
        c.routes(
            dogma.via_aggregate(self.accounts),
            dogma.via_process(self.loyalty),
            dogma.via_integration(self.statements),
            dogma.via_projection(self.counter),
        )

    def config(self) -> ApplicationConfig:
        """The built configuration (on the private registry)."""
        config = build(self, registry=REGISTRY)
        register_types(config.message_types())
        return config


#: Engine settings for tests: small retry delays, few partitions.
FAST: dict[str, Any] = {
    "partition_count": 4,
    "retry_base_delay": 0.002,
    "retry_max_delay": 0.05,
    "progress_interval": 0.005,
    "snapshot_every": 3,
    # Instance journals written within the run, so their writes meet the faults
    # too (at the default 1 s a run may end before most are written; the kill -9
    # suite runs both).
    "materialise_delay": 0.05,
    "max_attempts": 5,
    # A crashed node's final flush must not hold a test up for long.
    "shutdown_timeout": 0.3,
}


@asynccontextmanager
async def running(
    provider: Provider, config: ApplicationConfig, **settings: Any
) -> AsyncIterator[Engine]:
    """Run an engine for *config* on *provider* for the duration of the block.

    Leaving the block cancels the engine, abandoning whatever it is doing: for
    the store, the same as a crash of the node between two writes.
    """
    options = {**FAST, **settings}
    engine = Engine.from_settings(
        EngineSettings(applications=(config,), persistence_provider=provider, **options)
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await engine.runtime(config.identity.key)
        try:
            yield engine
        finally:
            tg.cancel_scope.cancel()


# -- the client's workload -----------------------------------------------------------------


def workload(seed: int, count: int, accounts: int = 8) -> list[tuple[str, dogma.Command]]:
    """*count* (idempotency key, command) pairs, the same for the same arguments.

    Mostly deposits, some withdrawals; every third account leaves the loyalty
    programme part-way (its process instance ends, and later deposits earn
    nothing); every other account tries one withdrawal no balance covers.
    """
    rng = random.Random(seed)
    names = [f"acct-{i}" for i in range(accounts)]
    out: list[tuple[str, dogma.Command]] = []
    for i in range(count):
        account = names[i % accounts]
        command: dogma.Command
        if rng.random() < 0.2:
            command = Withdraw(account, rng.randint(1, 15))
        else:
            command = Deposit(account, rng.randint(1, 9))
        out.append((f"k{seed}-{i}", command))
    for a in range(0, accounts, 3):
        later = [i for i in range(count // 3, count) if i % accounts == a]
        if later:
            i = rng.choice(later)
            out[i] = (out[i][0], Leave(names[a]))
    # A withdrawal no balance covers on every other account: commands that
    # record nothing, whatever order the others are handled in.
    for a in range(1, accounts, 2):
        some = [i for i in range(count) if i % accounts == a and isinstance(out[i][1], Deposit)]
        if some:
            i = rng.choice(some)
            out[i] = (out[i][0], Withdraw(names[a], 1_000_000))
    return out


#: What a client retries on: storage faults, and the engine stopping under it.
RETRYABLE = (PersistenceError, EngineStopped)


async def execute_all(
    executor: dogma.CommandExecutor,
    commands: Sequence[tuple[str, dogma.Command]],
    acknowledged: list[str],
    *,
    concurrency: int = 8,
    timeout: float = 60.0,
) -> None:
    """Execute *commands* like clients would: concurrently, retrying errors with the same key.

    Appends each key to *acknowledged* once ``execute_command`` returned for it.
    """
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(key: str, command: dogma.Command) -> None:
        async with limiter:
            attempt = 0
            while True:
                try:
                    await executor.execute_command(command, idempotency_key=key)
                except RETRYABLE:
                    attempt += 1
                    await anyio.sleep(min(0.05, 0.002 * 2**attempt))
                    continue
                acknowledged.append(key)
                return

    with anyio.fail_after(timeout):
        async with anyio.create_task_group() as tg:
            for key, command in commands:
                tg.start_soon(one, key, command)


# -- reading the stores back ---------------------------------------------------------------


@attrs.define
class Stores:
    """Everything the engine (and the test projection) wrote for the application, decoded."""

    partition_count: int
    inbox: dict[int, list[tuple[int, InboxRecord]]]
    inbox_end: dict[int, int]
    stream: dict[int, list[StreamRecord]]
    poison: dict[str, bytes]
    event_poison: dict[str, bytes]
    # account -> the commands in its instance journal, in order (a record may hold several)
    journals: dict[str, list[InstanceCommand | AggregateRecord]]
    journal_begin: dict[str, int]
    processes: dict[str, ProcessRecord]  # account -> loyalty instance record
    markers: set[str]  # command IDs with an idempotency marker
    deadlines: dict[int, int]  # partition -> records left in its deadline journal
    projection: dict[str, ProjectionState]  # stream ID -> counter state

    def stream_ids(self) -> dict[int, str]:
        return {p: partition_id(APP_KEY, p) for p in range(self.partition_count)}

    def commands(self) -> dict[str, Envelope]:
        """Every accepted command by ID (the first inbox copy of each).

        Not the process deliveries an inbox may hold too (ADR 0010: an event
        for a process instance homed on the partition, ``InboxEntry.source``):
        they are not commands, and their effects are checked as the process's.
        """
        out: dict[str, Envelope] = {}
        for records in self.inbox.values():
            for _, record in records:
                for entry in record.entries:
                    if entry.source is None:
                        out.setdefault(entry.envelope.message_id, entry.envelope)
        return out

    def keyed(self) -> set[str]:
        """Keyed integration commands in the inbox: the ones that get a marker (ADR 0007)."""
        return {
            e.envelope.message_id
            for records in self.inbox.values()
            for _, r in records
            for e in r.entries
            if e.keyed and e.instance_id is None
        }

    def events(self) -> list[tuple[int, int, Envelope]]:
        """(partition, offset, envelope) of every published event, in stream order."""
        return [
            (p, r.first_offset + i, env)
            for p, records in self.stream.items()
            for r in records
            for i, env in enumerate(r.events)
        ]

    def event_less(self) -> dict[str, str]:
        """Command ID -> account, for each ``accounts`` command committed without events."""
        return {
            r.command_ids[e.index]: e.instance_id
            for records in self.stream.values()
            for r in records
            for e in r.event_less
            if e.handler_key == ACCOUNTS_KEY
        }

    def published(self) -> dict[str, int]:
        """Command ID -> the partition whose stream published it."""
        return {
            cid: p for p, records in self.stream.items() for r in records for cid in r.command_ids
        }

    def stream_end(self, p: int) -> int:
        records = self.stream[p]
        return records[-1].first_offset + len(records[-1].events) if records else 0


async def _records(journal: Journal) -> list[tuple[int, bytes]]:
    """The journal's records; re-read if the engine truncates it while we read."""
    while True:
        bounds = await journal.bounds()
        if bounds.end <= bounds.begin:
            return []
        try:
            return [item async for item in journal.range(bounds.begin)]
        except RecordNotFound:
            continue


async def _keys(keyspace: Keyspace) -> dict[str, bytes]:
    return {k.decode(): v async for k, v, _ in keyspace.range()}


async def read_stores(provider: Provider) -> Stores:
    """Read back everything the application's engine wrote (through the Provider API).

    The engine keeps running while we read, so stores are read downstream
    first: the projection and process records before the streams they
    follow, the streams before the inboxes and instance journals whose
    contents must already hold whatever a stream record refers to.
    """
    async with await provider.keyspaces.open(meta_name(APP_KEY)) as meta:
        value, _ = await meta.get(b"partitions")
    count: int = msgspec.msgpack.decode(value)["partition_count"]
    s = Stores(count, {}, {}, {}, {}, {}, {}, {}, {}, set(), {}, {})
    async with await provider.keyspaces.open(projection_store_name()) as ks:
        s.projection = {k: _state_decoder.decode(v) for k, v in (await _keys(ks)).items()}
    process_decoder = msgspec.msgpack.Decoder(ProcessRecord)
    async with await provider.keyspaces.open(process_store_name(APP_KEY, LOYALTY_KEY)) as ks:
        s.processes = {k: process_decoder.decode(v) for k, v in (await _keys(ks)).items()}
    async with await provider.keyspaces.open(idempotency_name(APP_KEY)) as ks:
        s.markers = set(await _keys(ks))
    for p in range(count):
        async with await provider.journals.open(f"{APP_KEY}/stream/{p}") as j:
            s.stream[p] = [decode_stream_record(d) for _, d in await _records(j)]
    for p in range(count):
        async with await provider.journals.open(inbox_name(APP_KEY, p)) as j:
            s.inbox[p] = [(pos, decode_inbox_record(d)) for pos, d in await _records(j)]
            s.inbox_end[p] = (await j.bounds()).end
        async with await provider.keyspaces.open(poison_name(APP_KEY, p)) as ks:
            s.poison.update(await _keys(ks))
        async with await provider.keyspaces.open(event_poison_store_name(APP_KEY, p)) as ks:
            s.event_poison.update(await _keys(ks))
        async with await provider.journals.open(deadline_journal_name(APP_KEY, p)) as j:
            bounds = await j.bounds()
            s.deadlines[p] = bounds.end - bounds.begin
    # Commands executed on the owner skip the inbox: instances are known from the stream too.
    accounts = {
        e.instance_id
        for records in s.inbox.values()
        for _, r in records
        for e in r.entries
        if e.handler_key == ACCOUNTS_KEY and e.instance_id
    } | {
        env.source_instance
        for records_ in s.stream.values()
        for r in records_
        for env in r.events
        if env.source_handler == ACCOUNTS_KEY and env.source_instance
    }
    decoder = msgspec.msgpack.Decoder(AggregateRecord)
    for account in sorted(accounts):
        async with await provider.journals.open(
            aggregate_name(APP_KEY, ACCOUNTS_KEY, account)
        ) as j:
            s.journals[account] = [
                c for _, d in await _records(j) for c in decoder.decode(d).commands()
            ]
            s.journal_begin[account] = (await j.bounds()).begin
    return s


# -- the invariants ------------------------------------------------------------------------


_decoded: dict[str, Any] = {}


def _message(env: Envelope) -> Any:
    # The checker runs on the engine's event loop while it settles, so it
    # decodes each stored message once (IDs are unique; messages immutable).
    message = _decoded.get(env.message_id)
    if message is None:
        if len(_decoded) > 100_000:
            _decoded.clear()
        message = _decoded[env.message_id] = to_message(env)
    return message


def check_safety(s: Stores) -> None:
    """What must hold at every moment, even with work pending (architecture §9.2-9.6).

    Raises ``AssertionError`` naming the first violation.
    """
    assert not s.poison, f"commands were poisoned: {sorted(s.poison)}"
    assert not s.event_poison, f"events or deadlines were poisoned: {sorted(s.event_poison)}"

    # §9.2: offsets dense and gap-free; every event and command published once,
    # and a record publishes exactly the events of the commands it lists.
    seen_events: set[str] = set()
    published: dict[str, int] = {}
    for p, records in s.stream.items():
        offset = 0
        for r in records:
            assert r.first_offset == offset, f"stream {p}: gap or overlap at offset {offset}"
            offset += len(r.events)
            for env in r.events:
                assert env.message_id not in seen_events, f"event {env.message_id} published twice"
                seen_events.add(env.message_id)
            for cid in r.command_ids:
                assert cid not in published, (
                    f"command {cid} published twice (streams {published[cid]} and {p}): "
                    + ", ".join(
                        f"{env.description} from {env.source_handler}/{env.source_instance}"
                        for env in r.events
                        if env.causation_id == cid
                    )
                )
                published[cid] = p
            causes = [env.causation_id for env in r.events]
            # A record commits the commands it lists (some recorded no events).
            assert set(causes) <= set(r.command_ids), f"stream {p}: record/command mismatch"
            # A command's events are contiguous within its record: all or none visible.
            runs = [c for i, c in enumerate(causes) if i == 0 or causes[i - 1] != c]
            assert len(runs) == len(set(runs)), f"stream {p}: a command's events were split"

    # §9.2/9.3: per aggregate instance, the journal holds each command at most
    # once; the stream carries its events on one stream, in journal order; each
    # handling saw every earlier event (running totals chain).
    by_instance: dict[str, list[tuple[int, Envelope]]] = {}
    for p, _, env in s.events():
        if env.source_handler == ACCOUNTS_KEY:
            assert env.source_instance is not None
            by_instance.setdefault(env.source_instance, []).append((p, env))
    for account, journal_records in s.journals.items():
        ids = [r.command_id for r in journal_records]
        assert len(ids) == len(set(ids)), f"instance {account}: a command was committed twice"
        journal = [env.message_id for r in journal_records for env in r.events]
        streamed = [env.message_id for _, env in by_instance.get(account, [])]
        if s.journal_begin[account] == 0:
            # Instance journals are written behind the stream (ADR 0007): each is
            # a prefix of the instance's stream events. The engine runs while we
            # read (streams first), so a journal may also have moved past what
            # we read of the stream: compare the common part.
            common = min(len(journal), len(streamed))
            assert streamed[:common] == journal[:common], (
                f"instance {account}: stream order differs from the journal, or the "
                "journal holds an event the stream does not"
            )
        assert len({p for p, _ in by_instance.get(account, [])}) <= 1, (
            f"instance {account}: events published on several streams"
        )
        balance = points = 0
        left = False
        history = [env for _, env in by_instance.get(account, [])]
        for env in history:
            event = _message(env)
            if isinstance(event, Deposited):
                assert event.balance == balance + event.amount, (
                    f"instance {account}: a handling did not see every earlier event"
                )
                balance = event.balance
            elif isinstance(event, Withdrawn):
                assert event.balance == balance - event.amount >= 0, (
                    f"instance {account}: a handling did not see every earlier event"
                )
                balance = event.balance
            elif isinstance(event, PointsAdded):
                assert event.total == points + event.points, (
                    f"instance {account}: a handling did not see every earlier event"
                )
                points = event.total
            elif isinstance(event, Left):
                assert not left, f"instance {account}: left twice"
                left = True

    # §9.4: the process's effects, from the account's events in stream order.
    commands = s.commands()
    points_for = Tally(
        commands[env.causation_id].causation_id
        for _, _, env in s.events()
        if env.source_handler == ACCOUNTS_KEY
        and isinstance(_message(env), PointsAdded)
        and env.causation_id in commands
    )
    for account, events in by_instance.items():
        ended = False
        for _, env in events:
            event = _message(env)
            if isinstance(event, Left):
                ended = True
            elif isinstance(event, Deposited):
                n = points_for.get(env.message_id, 0)
                assert n <= 1, f"deposit {env.message_id} of {account} earned points {n} times"
                assert not (ended and n), (
                    f"process instance {account} handled a deposit after it ended"
                )
    assert all(n <= 1 for n in points_for.values())
    # §9.4/9.5: each review fired at most once, never early, only if scheduled.
    statements: Tally[tuple[str, int]] = Tally()
    for _, _, env in s.events():
        event = _message(env)
        if isinstance(event, StatementSent):
            statements[(event.account, event.n)] += 1
            assert event.handled_at >= event.scheduled_for, (
                f"review {event.account}/{event.n} handled at {event.handled_at}, "
                f"before it was due at {event.scheduled_for}"
            )
            assert env.created_at >= event.scheduled_for
    twice = [k for k, n in statements.items() if n > 1]
    assert not twice, f"reviews handled more than once: {twice}"

    # §9.6: the projection applied each event once, in order, and its checkpoint
    # is exactly what it applied.
    for p, stream_id in s.stream_ids().items():
        state = s.projection.get(stream_id)
        if state is None:
            continue
        assert state.next <= s.stream_end(p), f"projection on stream {p} is past the stream end"
        expected = [
            applied_entry(r.first_offset + i, env.data)
            for r in s.stream[p]
            for i, env in enumerate(r.events)
        ][: state.next]
        wrong = [(a, e) for a, e in zip(state.applied, expected, strict=False) if a != e]
        assert len(state.applied) == state.next, (
            f"projection on stream {p}: {len(state.applied)} applied, checkpoint {state.next}"
        )
        assert not wrong, f"projection on stream {p}: applied/expected differ at {wrong[:3]}"


def check_complete(s: Stores, acknowledged: Iterable[str]) -> None:
    """What must hold once the engine has settled: nothing lost (§9.1, 9.4-9.7)."""
    published = s.published()
    events_of = Tally(env.causation_id for _, _, env in s.events())
    event_less = s.event_less()
    # §9.1: every acknowledged command was handled and took effect once (one
    # event each, or none for a refused withdrawal, committed as such).
    for key in acknowledged:
        cid = command_id(key)
        assert cid in published, f"acknowledged command {key} was lost"
        recorded = 0 if cid in event_less else 1
        assert events_of[cid] == recorded, f"command {key} took effect {events_of[cid]} times"
    # Every accepted command (including process-produced ones) was handled, the
    # inbox is fully processed, and keyed commands are marked.
    for cid in s.commands():
        assert cid in published, f"accepted command {cid} was never handled"
    for p in range(s.partition_count):
        done = s.stream[p][-1].inbox_position if s.stream[p] else 0
        assert done == s.inbox_end[p], (
            f"partition {p}: inbox processed to {done} of {s.inbox_end[p]}"
        )
    unmarked = s.keyed() - s.markers
    assert not unmarked, f"{len(unmarked)} keyed commands have no idempotency marker"

    # §9.2: each instance's journal holds the commands that recorded nothing too
    # (ADR 0009: a retry of one must not be handled again after a rebuild).
    for cid, account in event_less.items():
        if not s.journal_begin.get(account):
            journaled = {r.command_id for r in s.journals.get(account, [])}
            assert cid in journaled, f"instance {account}: event-less command {cid} not journaled"

    # §9.2: each instance's journal and its stream events are the same sequence.
    streamed: dict[str, list[str]] = {}
    for _, _, env in s.events():
        if env.source_handler == ACCOUNTS_KEY and env.source_instance:
            streamed.setdefault(env.source_instance, []).append(env.message_id)
    for account, records in s.journals.items():
        journal = [env.message_id for r in records for env in r.events]
        published_events = streamed.get(account, [])
        if s.journal_begin[account]:
            # Truncated below a snapshot: what is left is the end of its history.
            published_events = published_events[len(published_events) - len(journal) :]
        assert published_events == journal, f"instance {account}: events lost or reordered"

    # §9.4: exactly the process effects its events call for.
    # The loyalty process's command for a deposit has an ID derived from the
    # deposit event (commands executed on their owner are not in the inbox).
    points_commands = {
        env.causation_id for _, _, env in s.events() if isinstance(_message(env), PointsAdded)
    }
    points_for = {
        env.message_id
        for _, _, env in s.events()
        if str(uuid.uuid5(uuid.UUID(env.message_id), f"{LOYALTY_KEY}/command/0")) in points_commands
    }
    statements = {
        (e.account, e.n)
        for e in map(_message, (env for _, _, env in s.events()))
        if isinstance(e, StatementSent)
    }
    for account in s.journals:
        deposits = 0
        ended = False
        for _, _, env in s.events():
            if env.source_instance != account or env.source_handler != ACCOUNTS_KEY:
                continue
            event = _message(env)
            if isinstance(event, Left):
                ended = True
                break
            if isinstance(event, Deposited):
                deposits += 1
                assert env.message_id in points_for, f"deposit {deposits} of {account}: no points"
        record = s.processes.get(account)
        if deposits == 0 and not ended:
            continue
        assert record is not None, f"process instance {account} has no record"
        assert not record.has_outbox, f"{account}: outbox not dispatched"
        if ended:
            assert record.ended, f"{account}: instance did not end"
            assert record.root is None, f"{account}: ended instance kept its root"
            assert not record.pending_deadlines, f"{account}: ended with pending deadlines"
            scheduled = {(account, n) for n in range(2, deposits + 1, 2)}
            extra = {k for k in statements if k[0] == account} - scheduled
            assert not extra, f"{account}: reviews {sorted(extra)} were never scheduled"
        else:
            assert not record.ended, f"{account}: instance ended without a Left event"
            assert record.root is not None, f"{account}: root never mutated"
            assert json.loads(record.root) == deposits, (
                f"{account}: root counts {record.root!r}, expected {deposits} deposits"
            )
            assert not record.pending_deadlines, f"{account}: reviews still pending"
            expected = {(account, n) for n in range(2, deposits + 1, 2)}
            have = {k for k in statements if k[0] == account}
            assert have == expected, (
                f"{account}: reviews {sorted(have)}, expected {sorted(expected)}"
            )

    # §9.6: the projection has applied the whole of every stream.
    for p, stream_id in s.stream_ids().items():
        state = s.projection.get(stream_id, ProjectionState(0, []))
        assert state.next == s.stream_end(p), (
            f"projection on stream {p} at {state.next} of {s.stream_end(p)}"
        )


async def settle(
    provider: Provider, acknowledged: Iterable[str], *, timeout: float = 30.0
) -> Stores:
    """Poll the stores until everything is done, checking safety on every read.

    Raises ``AssertionError`` at once for a safety violation, or after
    *timeout* seconds with the last reason the stores were not yet complete.
    """
    keys = list(acknowledged)
    last: AssertionError | None = None
    with anyio.move_on_after(timeout):
        while True:
            stores = await read_stores(provider)
            check_safety(stores)
            try:
                check_complete(stores, keys)
                return stores
            except AssertionError as exc:
                last = exc
            await anyio.sleep(0.1)
    raise AssertionError(f"the engine did not settle within {timeout} s: {last}")
