"""The materialiser coalesces: one instance journal record per instance per round.

Aggregate instance journals are derived from the partition stream (ADR 0007).
Writes are deferred by ``materialise_delay`` and an instance's commands since
its last write share one ``InstanceRecord`` (ADR 0009), split after a command
that carries a snapshot and where a record would not fit the driver.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from runkit.config import HandlerConfig, build
from runkit.engine.commands import materialiser as materialiser_module
from runkit.engine.commands.aggregates import AggregateInstances, Instance
from runkit.engine.commands.inbox import InboxEntry
from runkit.engine.commands.instance_records import (
    Committed,
    SnapshotRecord,
    follows,
    instance_decoder,
    instance_encoder,
    snapshot_decoder,
)
from runkit.engine.commands.materialiser import Materialiser
from runkit.engine.envelope import new_envelope, register_types
from runkit.persistence import Keyspace, Limits
from runkit.testing.faults import BEFORE, FaultyProvider
from runkit_memory import MemoryProvider
from runkit_memory import _provider as memory_module

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import (
    APP_KEY,
    REGISTRY,
    App,
    Deposit,
    Setup,
    read_stores,
    setup,
    wait_until,
)
from engine_commands_harness import running as running_engine


class Bench:
    """One aggregate handler's instances on a fresh memory silo, and records to write."""

    def __init__(self, *, snapshot_every: int = 1000, limits: Limits | None = None) -> None:
        self.s: Setup = setup()
        register_types(self.s.config.message_types())
        self.provider = MemoryProvider(f"materialiser-{uuid.uuid4()}", limits=limits)
        handler = self.s.config.handler_by_name("accounts")
        assert handler is not None
        self.handler: HandlerConfig = handler
        self.snapshot_every = snapshot_every
        self.aggregates = self.instances()
        self.offset = 0
        self.position = 0

    def instances(self) -> AggregateInstances:
        return AggregateInstances(
            self.provider,
            APP_KEY,
            site_key=None,
            clock=lambda: datetime.now(UTC),
            snapshot_every=self.snapshot_every,
            cache_size=100,
        )

    def key(self, instance_id: str) -> tuple[str, str]:
        return (self.handler.identity.key, instance_id)

    def commit(self, inst: Instance, ref: str, *, padding: int = 0) -> Committed:
        """Handle a deposit on *inst* and mark it durable at the next stream offset."""
        env = new_envelope(
            Deposit(inst.instance_id, 1, ref + "x" * padding),
            app_key=APP_KEY,
            site_key=None,
            created_at=datetime.now(UTC),
        )
        entry = InboxEntry(
            envelope=env, handler_key=self.handler.identity.key, instance_id=inst.instance_id
        )
        events = self.aggregates.handle(inst, entry)
        assert events is not None
        record = self.aggregates.committed(inst, entry, events, inbox_position=-1)
        record.durable = True
        record.stream_offset, record.stream_position = self.offset, self.position
        self.offset += len(events)
        self.position += 1  # one command per stream record
        return record

    def materialiser(self, *, delay: float = 0.0, truncate: bool = False) -> Materialiser:
        return Materialiser(
            self.provider,
            self.s.config,
            self.aggregates,
            truncate=truncate,
            retry_base_delay=0.01,
            retry_max_delay=0.1,
            delay=delay,
        )

    def queue(self, m: Materialiser, inst: Instance, ref: str) -> Committed:
        """Commit a deposit on *inst* and give it to *m* as durable."""
        record = self.commit(inst, ref)
        m.add(self.key(inst.instance_id), record)
        m.wake()
        return record

    async def journal(self, instance_id: str) -> list[list[str]]:
        """The command IDs of each record of an instance journal."""
        name = f"{APP_KEY}/aggregate/{self.handler.identity.key}/{instance_id}"
        async with await self.provider.journals.open(name) as journal:
            if (await journal.bounds()).end == 0:
                return []
            return [
                [c.command_id for c in instance_decoder.decode(data).commands()]
                async for _, data in journal.range(0)
            ]


@asynccontextmanager
async def running(m: Materialiser) -> AsyncIterator[None]:
    """Run *m* (``run``, with its delay) for the block."""
    async with anyio.create_task_group() as tg:
        await tg.start(m.run)
        yield
        tg.cancel_scope.cancel()


async def test_a_round_writes_each_instance_once() -> None:
    b = Bench()
    a = await b.aggregates.load(b.handler, "a")
    c = await b.aggregates.load(b.handler, "c")
    records = [(b.key("a"), b.commit(a, f"a{i}")) for i in range(5)]
    records += [(b.key("c"), b.commit(c, f"c{i}")) for i in range(3)]
    m = b.materialiser()
    for key, record in records:
        m.add(key, record)
    await m.flush()
    assert m.records_written == 2
    assert await b.journal("a") == [[r.command_id for k, r in records if k == b.key("a")]]
    assert await b.journal("c") == [[r.command_id for k, r in records if k == b.key("c")]]
    # A rebuild from the journal alone sees every command, in order.
    fresh = await b.instances().load(b.handler, "a")
    assert fresh.root.balance == 5
    assert list(fresh.recent) == [r.command_id for k, r in records if k == b.key("a")]


async def test_a_snapshot_ends_a_record() -> None:
    b = Bench(snapshot_every=3)
    a = await b.aggregates.load(b.handler, "a")
    records = [b.commit(a, f"a{i}") for i in range(7)]
    assert [r.snapshot is not None for r in records] == [False, False, True] * 2 + [False]
    m = b.materialiser()
    for record in records:
        m.add(b.key("a"), record)
    await m.flush()
    ids = [r.command_id for r in records]
    assert await b.journal("a") == [ids[0:3], ids[3:6], ids[6:7]]
    # The snapshot covers the first two records: a rebuild replays only the third.
    fresh = await b.instances().load(b.handler, "a")
    assert fresh.root.balance == 7
    assert list(fresh.recent)[-1] == ids[-1]


async def test_a_record_too_large_for_the_driver_is_split() -> None:
    b = Bench(limits=Limits(max_record_bytes=4096))
    a = await b.aggregates.load(b.handler, "a")
    records = [b.commit(a, f"a{i}", padding=900) for i in range(8)]
    m = b.materialiser()
    for record in records:
        m.add(b.key("a"), record)
    await m.flush()
    stored = await b.journal("a")
    assert [c for r in stored for c in r] == [r.command_id for r in records]
    assert len(stored) > 1
    assert all(len(r) < len(records) for r in stored)


async def test_commands_already_in_the_journal_are_not_written_again() -> None:
    b = Bench()
    a = await b.aggregates.load(b.handler, "a")
    records = [b.commit(a, f"a{i}") for i in range(4)]
    first = b.materialiser()
    for record in records[:3]:
        first.add(b.key("a"), record)
    await first.flush()
    # A new owner recovers all four from the stream tail: only the fourth is new.
    second = Materialiser(
        b.provider,
        b.s.config,
        b.instances(),
        truncate=False,
        retry_base_delay=0.01,
        retry_max_delay=0.1,
    )
    for record in records:
        second.add(b.key("a"), record)
    await second.flush()
    ids = [r.command_id for r in records]
    assert await b.journal("a") == [ids[:3], ids[3:]]


async def test_commands_committed_within_the_delay_share_a_record() -> None:
    b = Bench()
    a = await b.aggregates.load(b.handler, "a")
    m = b.materialiser(delay=0.3)
    async with running(m):
        first = b.queue(m, a, "first")
        await anyio.sleep(0.05)
        second = b.queue(m, a, "second")
        assert m.records_written == 0  # still waiting out the delay
        await wait_until(lambda: m.watermark(99) == 99, timeout=5)
    assert m.records_written == 1
    assert await b.journal("a") == [[first.command_id, second.command_id]]


async def test_a_full_queue_does_not_wait_for_the_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(materialiser_module, "QUEUE_LIMIT", 3)
    b = Bench()
    a = await b.aggregates.load(b.handler, "a")
    m = b.materialiser(delay=3600)
    async with running(m):
        for i in range(3):
            b.queue(m, a, f"a{i}")
        await wait_until(lambda: m.watermark(99) == 99, timeout=5)
    assert m.records_written == 1


async def test_rounds_follow_the_records_ages() -> None:
    # An instance is written once its oldest record is `delay` old, not when
    # some other instance's is: the writes flow instead of coming in bursts.
    b = Bench()
    a = await b.aggregates.load(b.handler, "a")
    c = await b.aggregates.load(b.handler, "c")
    m = b.materialiser(delay=1.0)
    async with running(m):
        old = b.queue(m, a, "old")
        await anyio.sleep(0.5)
        young = b.queue(m, c, "young")
        await wait_until(lambda: old.written, timeout=5)
        if anyio.current_time() < young.queued_at + 1.0:
            assert not young.written
            assert await b.journal("c") == []
        await wait_until(lambda: young.written, timeout=5)
        assert anyio.current_time() >= young.queued_at + 1.0
    assert m.records_written == 2


async def test_steady_commits_are_written_in_few_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under steady load each record ages just after the one before it; rounds
    # still come at most ROUNDS_PER_DELAY times per delay, each taking what aged.
    b = Bench()
    m = b.materialiser(delay=0.5)
    rounds = 0
    real_round = m._round

    async def counted(delay: float = 0.0) -> None:
        nonlocal rounds
        rounds += 1
        await real_round(delay)

    monkeypatch.setattr(m, "_round", counted)
    records: list[Committed] = []
    async with running(m):
        for i in range(100):
            records.append(b.queue(m, await b.aggregates.load(b.handler, f"i{i}"), f"r{i}"))
            await anyio.sleep(0.015)
        await wait_until(lambda: all(r.written for r in records), timeout=10)
    assert m.records_written == 100
    # 100 records over ~1.5 s, aged 0.5 s later: ~2 s of rounds at most 10 per
    # 0.5 s is 40 (one round per record would be 100).
    assert rounds <= 45, rounds


async def test_a_stale_owners_snapshot_never_covers_records_it_did_not_see() -> None:
    # Owner A committed r1 and r2 (r2 carries a snapshot) and has not written
    # them yet. Owner B took over: it recovered r1 and r2 from the stream,
    # handled r3 and wrote all three. A's materialiser (its final flush, or
    # still running: nothing fences it) then finds nothing left to append; r2's
    # snapshot must not be stored as covering the journal up to its end, r3
    # included, or the next rebuild would skip r3 and forget its command ID.
    bench = Bench(snapshot_every=2)
    owner_a = bench.aggregates
    inst_a = await owner_a.load(bench.handler, "acc")
    r1, r2 = bench.commit(inst_a, "r1"), bench.commit(inst_a, "r2")
    assert r2.snapshot is not None
    stale = bench.materialiser()
    stale.add(bench.key("acc"), r1)
    stale.add(bench.key("acc"), r2)

    bench.aggregates = owner_b = bench.instances()
    recovered = [
        Committed(
            r.command_id,
            r.events,
            durable=True,
            stream_offset=r.stream_offset,
            stream_position=r.stream_position,
        )
        for r in (r1, r2)
    ]
    for r in recovered:
        owner_b.recovered(*bench.key("acc"), r)
    inst_b = await owner_b.load(bench.handler, "acc")
    r3 = bench.commit(inst_b, "r3")
    current = bench.materialiser()
    for r in (*recovered, r3):
        current.add(bench.key("acc"), r)
    await current.flush()
    assert await bench.journal("acc") == [[r1.command_id, r2.command_id, r3.command_id]]

    bench.aggregates = owner_a
    await stale.flush()

    rebuilt = await bench.instances().load(bench.handler, "acc")
    assert rebuilt.root.balance == 3
    assert r3.command_id in rebuilt.recent


async def test_a_stale_owners_older_snapshot_never_replaces_a_newer_one() -> None:
    # Owner A appended r1 and r2 (r2 carries a snapshot), then was slow to
    # store the snapshot (a paused process, a slow request). Owner B took over,
    # wrote more commands and newer snapshots, and truncated the journal below
    # them. A's snapshot then landed over B's: it covers only the first record,
    # which was gone, so the instance no longer loaded.
    bench = Bench(snapshot_every=2)
    key = bench.key("acc")
    owner_a = bench.aggregates
    inst_a = await owner_a.load(bench.handler, "acc")
    r1, r2 = bench.commit(inst_a, "r1"), bench.commit(inst_a, "r2")
    assert r2.snapshot is not None
    stale = bench.materialiser(truncate=True)
    stale.add(key, r1)
    stale.add(key, r2)
    storing, resume = anyio.Event(), anyio.Event()
    snapshot_keyspace = owner_a.snapshot_keyspace

    async def slow_snapshot_keyspace(handler_key: str) -> Keyspace:
        storing.set()
        await resume.wait()
        return await snapshot_keyspace(handler_key)

    owner_a.snapshot_keyspace = slow_snapshot_keyspace  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        tg.start_soon(stale.flush)
        await storing.wait()  # r1 and r2 are in the journal; their snapshot is not

        bench.aggregates = owner_b = bench.instances()
        inst_b = await owner_b.load(bench.handler, "acc")
        current = bench.materialiser(truncate=True)
        for i in range(3, 7):
            current.add(key, bench.commit(inst_b, f"r{i}"))
            await current.flush()
        resume.set()

    name = f"{APP_KEY}/aggregate/{bench.handler.identity.key}/acc"
    async with await bench.provider.journals.open(name) as journal:
        bounds = await journal.bounds()
    assert bounds.begin > 1, "B truncated the journal below A's snapshot"
    rebuilt = await bench.instances().load(bench.handler, "acc")
    assert rebuilt.root.balance == 6
    assert list(rebuilt.root.refs) == [f"r{i}" for i in range(1, 7)]
    ks = await bench.instances().snapshot_keyspace(bench.handler.identity.key)
    stored, _ = await ks.get(b"acc")
    assert snapshot_decoder.decode(stored).position == bounds.end - 1, "B's last snapshot"


async def test_a_snapshot_stored_meanwhile_is_read_again_and_kept() -> None:
    # Another owner stores a newer snapshot between this materialiser's read
    # of the stored one and its conditional write: the write conflicts, and
    # the second look keeps the newer snapshot.
    b = Bench(snapshot_every=2)
    a = await b.aggregates.load(b.handler, "a")
    records = [b.commit(a, "r1"), b.commit(a, "r2")]
    assert records[-1].snapshot is not None
    newer = instance_encoder.encode(SnapshotRecord(position=99, data=b"newer"))
    snapshot_keyspace = b.aggregates.snapshot_keyspace

    class Racing:
        """The keyspace, with the newer snapshot stored right after the first read."""

        def __init__(self, ks: Keyspace) -> None:
            self.ks = ks
            self.raced = False

        async def get(self, key: bytes) -> tuple[bytes, str]:
            found = await self.ks.get(key)
            if not self.raced:
                self.raced = True
                await self.ks.set_unconditional(key, newer)
            return found

        def __getattr__(self, name: str) -> object:
            return getattr(self.ks, name)

    racing: list[Racing] = []

    async def racing_snapshot_keyspace(handler_key: str) -> Keyspace:
        racing.append(Racing(await snapshot_keyspace(handler_key)))
        return racing[-1]  # type: ignore[return-value]

    b.aggregates.snapshot_keyspace = racing_snapshot_keyspace  # type: ignore[method-assign]
    m = b.materialiser()
    for record in records:
        m.add(b.key("a"), record)
    await m.flush()
    assert [r.raced for r in racing] == [True]
    stored, _ = await (await snapshot_keyspace(b.handler.identity.key)).get(b"a")
    assert stored == newer


async def test_a_snapshot_over_the_value_limit_is_skipped_and_the_others_go_on() -> None:
    # The store refuses the snapshot on every attempt: retried for ever, it
    # stopped every instance journal of the partition and the watermark.
    from engine_commands_harness import read_stores, running

    s = setup()
    s.accounts.pad = {f"big{i}": 900 for i in range(5)}
    provider = MemoryProvider(f"mat-{uuid.uuid4()}", limits=Limits(max_value_bytes=4096))
    async with running(
        provider, s.config, partition_count=1, snapshot_every=5, materialise_delay=0.0
    ) as engine:
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        executor = engine.executor_for(s.app)
        for i in range(5):  # the fifth command's snapshot takes about 4.6 KB
            await executor.execute_command(Deposit("big", 1, f"big{i}"))
        await executor.execute_command(Deposit("small", 1, "s"))

        async def small_written() -> bool:
            return len((await read_stores(provider)).instances.get("small", [])) == 1

        await wait_until(small_written)
    stores = await read_stores(provider)
    assert len(stores.instances["big"]) == 5  # its journal is whole (not truncated)


_BACKLOG = 1200  # one instance's commands: more than the 1,000 recent IDs


async def test_a_recovered_tail_longer_than_the_recent_ids_is_not_applied_twice() -> None:
    # A new owner rebuilds an instance from its snapshot and journal, then
    # applies the stream's records above the materialised watermark that the
    # journal lacks. Those it has were told apart by the recent command IDs
    # (the last 1,000) only: with a longer backlog, the older ones were
    # applied a second time. They are now told apart by stream offset.
    from engine_commands_harness import (
        cached_refs,
        check_invariants,
        one_partition_engine,
        read_stores,
        running,
    )

    from runkit.engine.partitions import partition_id
    from runkit.testing.faults import BEFORE, FaultyProvider

    s = setup()
    inner = MemoryProvider(f"mat-{uuid.uuid4()}")
    provider = FaultyProvider(inner)
    # The materialiser lags (as it does at >1,000 commands/s on one instance
    # with the default 1 s delay, or while one journal's writes are being
    # retried): nothing is written before the stop.
    engine, ownership = one_partition_engine(
        s.config, provider, retry_max_delay=0.01, materialise_delay=3600.0, shutdown_timeout=1.0
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        ownership.assign({partition_id(APP_KEY, 0)})
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        executor = engine.executor_for(s.app)
        for i in range(_BACKLOG):
            await executor.execute_command(Deposit("a", 1, f"r{i}"))
        # The stop flushes the materialiser (all N commands and their snapshots are
        # written to the instance journal), then the record stating the new
        # watermark cannot land before shutdown_timeout (store outage / crash).
        provider.plan.fail(BEFORE, ops={"append"}, names=lambda n: "/stream/" in n)
        tg.cancel_scope.cancel()

    stores = await read_stores(inner)
    assert len(stores.instances["a"]) == _BACKLOG, (
        "the final materialiser flush wrote every command"
    )
    # Record 0 is the owner's claim (no events): nothing after it is written.
    assert stores.stream[0][-1].materialised == 1, "the last header still says nothing is written"

    async with running(MemoryProvider(inner.silo), s.config, partition_count=1) as engine2:
        await engine2.executor_for(s.app).execute_command(Deposit("a", 1, "after"))
        await wait_until(lambda: s.accounts.calls[-1][1] == "after")
        refs = cached_refs(await engine2.runtime(APP_KEY), s.config, "a")
    _, ref, balance_seen = s.accounts.calls[-1]
    assert ref == "after"
    check_invariants(await read_stores(inner))
    assert balance_seen == _BACKLOG
    # Account.apply_event sets the balance from the event (so it hides the
    # repeat); its refs list shows every event the root was given.
    assert len(set(refs)) == len(refs), f"{len(refs) - len(set(refs))} events applied twice"
    assert len(refs) == _BACKLOG + 1


async def test_an_instance_rebuilt_while_a_long_backlog_is_written_applies_it_once() -> None:
    # The same on a live owner: the instance is rebuilt (dropped after a
    # handler failure, or evicted) while the materialiser writes a backlog of
    # more than 1,000 of its commands (it tells the cache after the last group).
    b = Bench(snapshot_every=100)
    inst = await b.aggregates.load(b.handler, "a")
    m = b.materialiser()
    for i in range(_BACKLOG):
        m.add(b.key("a"), b.commit(inst, f"r{i}"))
    seen: list[list[str]] = []
    write = m._write
    calls = 0

    async def write_then_rebuild(key, group):  # type: ignore[no-untyped-def]
        nonlocal calls
        await write(key, group)
        calls += 1
        if calls == 11:  # 1,100 commands and a snapshot written
            b.aggregates.drop(b.handler, "a")
            rebuilt = await b.aggregates.load(b.handler, "a")
            seen.append(list(rebuilt.root.refs))

    m._write = write_then_rebuild  # type: ignore[method-assign]
    await m.flush()
    refs = seen[0]
    assert len(refs) == _BACKLOG, (
        f"the rebuilt root holds {len(refs)} events for {_BACKLOG} commands"
    )


# -- commands that recorded no events -------------------------------------------------


def _event_less(command_id: str, offset: int, position: int, index: int) -> Committed:
    """A durable command that recorded no events, at *offset* (the next event's)."""
    return Committed(
        command_id,
        (),
        durable=True,
        stream_offset=offset,
        stream_position=position,
        stream_index=index,
    )


def test_stream_order_of_commands_with_and_without_events() -> None:
    # (offset, has events, position, index); an event-less command's offset is
    # that of the stream's next event, which may be a later command's first.
    with_events = (5, True, 3, 1)
    assert follows((6, True, 4, 0), with_events)
    assert follows((7, False, 3, 2), with_events)  # after its two events
    assert not follows((5, True, 3, 1), with_events)  # itself
    assert not follows((5, False, 3, 0), with_events)  # just before it
    event_less = (5, False, 2, 4)
    assert follows((5, True, 3, 0), event_less)  # its first event is the next one
    assert follows((5, False, 2, 5), event_less)  # later in the same record
    assert follows((5, False, 3, 0), event_less)  # in a later record
    assert not follows((5, False, 2, 4), event_less)  # itself
    assert not follows((5, False, 2, 3), event_less)
    assert not follows((4, True, 2, 0), event_less)
    assert follows((0, True, 0, 0), None)
    assert follows((0, False, 0, 0), (-1, True, -1, -1))  # records of unknown offset


async def test_commands_without_events_are_journaled_once_in_stream_order() -> None:
    # Two event-less commands at one offset (nothing recorded on the partition
    # between them), then a command whose first event is at that offset. Each
    # round of a later owner writes only what the journal lacks.
    b = Bench()
    a = await b.aggregates.load(b.handler, "a")
    e1 = _event_less("e1", 0, 0, 0)
    e2 = _event_less("e2", 0, 1, 0)
    c = b.commit(a, "c")
    c.stream_position, c.stream_index = 2, 0
    first = b.materialiser()
    first.add(b.key("a"), e1)
    await first.flush()
    assert await b.journal("a") == [["e1"]]
    for _ in range(2):  # later owners recovering all three from the stream
        again = Materialiser(
            b.provider,
            b.s.config,
            b.instances(),
            truncate=False,
            retry_base_delay=0.01,
            retry_max_delay=0.1,
        )
        for record in (e1, e2, c):
            again.add(b.key("a"), record)
        await again.flush()
        assert await b.journal("a") == [["e1"], ["e2", c.command_id]]
    rebuilt = await b.instances().load(b.handler, "a")
    assert list(rebuilt.recent) == ["e1", "e2", c.command_id]
    assert rebuilt.root.refs == ["c"]


async def test_commands_without_events_lead_to_snapshots_and_truncation() -> None:
    # An instance that mostly refuses commands (records nothing) must still be
    # snapshotted, or its journal grows without bound and every rebuild
    # replays all of it.
    b = Bench(snapshot_every=10)
    a = await b.aggregates.load(b.handler, "a")
    m = b.materialiser(truncate=True)
    m.add(b.key("a"), b.commit(a, "first"))
    for i in range(50):
        b.s.accounts.nothing.add(f"no{i}")
        m.add(b.key("a"), b.commit(a, f"no{i}"))
        await m.flush()
    name = f"{APP_KEY}/aggregate/{b.handler.identity.key}/a"
    async with await b.provider.journals.open(name) as journal:
        bounds = await journal.bounds()
    assert bounds.end - bounds.begin <= 10, f"journal keeps {bounds.end - bounds.begin} records"
    rebuilt = await b.instances().load(b.handler, "a")
    assert rebuilt.root.refs == ["first"]
    assert len(rebuilt.recent) == 51


class _KeyspaceHook:
    """A keyspace whose first ``get`` runs *hook* before reading."""

    def __init__(self, inner: Any, hook: Callable[[], Awaitable[None]]) -> None:
        self._inner = inner
        self._hook: Callable[[], Awaitable[None]] | None = hook

    async def get(self, key: bytes) -> Any:
        hook, self._hook = self._hook, None
        if hook is not None:
            await hook()
        return await self._inner.get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_a_rebuild_racing_a_snapshot_and_truncation_of_its_instance_loads() -> None:
    # The rebuild read the truncated journal's bounds; the materialiser then
    # appended, stored the next snapshot (one past those bounds) and
    # truncated; the rebuild read that snapshot, found it past the end it
    # knew, ignored it and failed: "journal truncated ... no usable snapshot",
    # charged to the instance's next command as a failed attempt.
    b = Bench(snapshot_every=2)
    a = await b.aggregates.load(b.handler, "a")
    m = b.materialiser(truncate=True)
    for i in range(4):  # two snapshots: the second truncates the journal
        m.add(b.key("a"), b.commit(a, f"a{i}"))
        await m.flush()
    for i in range(4, 6):  # committed, not yet written (the second snapshots)
        m.add(b.key("a"), b.commit(a, f"a{i}"))
    b.aggregates.drop(b.handler, "a")
    ks = await b.aggregates.snapshot_keyspace(b.handler.identity.key)
    b.aggregates._snapshots[b.handler.identity.key] = _KeyspaceHook(ks, m.flush)  # type: ignore[assignment]
    rebuilt = await b.aggregates.load(b.handler, "a")
    assert rebuilt.root.refs == [f"a{i}" for i in range(6)]


async def test_a_rebuild_whose_instance_keeps_being_snapshotted_fails_for_a_retry() -> None:
    # Every snapshot read finds a newer snapshot than the bounds just read:
    # the rebuild gives up with a retryable store error (the loader backs off
    # without charging a command), not the "no usable snapshot" error.
    from runkit.persistence import PersistenceError

    b = Bench(snapshot_every=1)
    a = await b.aggregates.load(b.handler, "a")
    m = b.materialiser(truncate=True)
    m.add(b.key("a"), b.commit(a, "a0"))
    await m.flush()
    b.aggregates.drop(b.handler, "a")
    ks = await b.aggregates.snapshot_keyspace(b.handler.identity.key)
    n = 0

    async def write_more() -> None:
        nonlocal n
        n += 1
        m.add(b.key("a"), b.commit(a, f"more{n}"))
        await m.flush()

    class Always(_KeyspaceHook):
        writing = False

        async def get(self, key: bytes) -> Any:
            if not self.writing:  # the materialiser reads it too
                self.writing = True
                try:
                    await write_more()
                finally:
                    self.writing = False
            return await self._inner.get(key)

    b.aggregates._snapshots[b.handler.identity.key] = Always(ks, write_more)  # type: ignore[assignment]
    with pytest.raises(PersistenceError, match="kept moving") as raised:
        await b.aggregates.load(b.handler, "a")
    assert raised.value.retryable


async def test_a_takeover_by_a_version_without_the_aggregate_materialises_its_events() -> None:
    # A rolling upgrade removes an aggregate handler: the new version's node
    # takes the partition while records of that aggregate are above the
    # materialised watermark. It must still write them to their instance
    # journal before its records claim them materialised, or the old version
    # (a rollback, an old node of the upgrade) rebuilds the instance without them.
    s = setup()
    register_types(s.config.message_types())
    without = build(App(s.notifier, s.serial), registry=REGISTRY)
    silo = f"removed-{uuid.uuid4()}"
    kept = MemoryProvider(silo)  # the silo lives while a provider refers to it
    faulty = FaultyProvider(kept)
    faulty.plan.fail(BEFORE, ops={"append"}, names=lambda n: "/aggregate/" in n)
    settings: dict[str, Any] = {"partition_count": 1, "materialise_delay": 0.0}

    async def owning(engine: Any) -> None:
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)

    async with running_engine(faulty, s.config, shutdown_timeout=0.2, **settings) as engine:
        await owning(engine)
        executor = engine.executor_for(s.app)
        await executor.execute_command(Deposit("a", 1, "r1"))
        await executor.execute_command(Deposit("a", 1, "r2"))
    async with running_engine(MemoryProvider(silo), without, **settings) as engine:
        await owning(engine)
        await anyio.sleep(0.2)  # its first record claims the tail materialised
    async with running_engine(MemoryProvider(silo), s.config, **settings) as engine:
        await owning(engine)
        await engine.executor_for(s.app).execute_command(Deposit("a", 1, "r3"))
    stores = await read_stores(kept)
    assert len([e for e in stores.all_events() if e.source_instance == "a"]) == 3
    assert [(ref, balance) for _, ref, balance in s.accounts.calls] == [
        ("r1", 0),
        ("r2", 1),
        ("r3", 2),
    ]


async def test_commits_wait_while_the_materialiser_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    # Instance journals written slower than commands come: the partition holds
    # commits back (callers wait in the backlog) rather than queue records,
    # and so memory and a new owner's re-read of the tail, without bound.
    limit = 20
    monkeypatch.setattr(materialiser_module, "QUEUE_LIMIT", limit)
    append = memory_module._MemoryJournal.append

    async def slow_append(self: Any, position: int, record: bytes) -> None:
        if "/aggregate/" in self._name:
            await anyio.sleep(0.05)
        await append(self, position, record)

    monkeypatch.setattr(memory_module._MemoryJournal, "append", slow_append)
    peak = 0
    add = Materialiser.add

    def counting_add(self: Materialiser, key: Any, record: Committed) -> None:
        nonlocal peak
        add(self, key, record)
        peak = max(peak, len(self._queue))

    monkeypatch.setattr(Materialiser, "add", counting_add)
    s = setup()
    register_types(s.config.message_types())
    provider = MemoryProvider(f"materialiser-{uuid.uuid4()}")
    async with running_engine(
        provider, s.config, partition_count=1, materialise_delay=0.0
    ) as engine:
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        executor = engine.executor_for(s.app)
        async with anyio.create_task_group() as tg:
            for i in range(200):  # distinct instances: one journal write each
                tg.start_soon(executor.execute_command, Deposit(f"acct-{i}", 1, f"r{i}"))
    assert len(s.accounts.calls) == 200
    assert 0 < peak <= limit
