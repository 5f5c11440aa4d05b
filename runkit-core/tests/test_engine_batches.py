"""The partition batch processor (ADR 0007) and the bugs fixed with it.

Each bug test fails on the engine before the fix:

- a stream writer cancelled at shutdown dropped its queue, so ``flush()`` wrote
  nothing and committed work waited for the next owner;
- an idempotency marker was written for every keyed or handler-produced
  command (now: keyed integration commands only);
- a stored message that no longer passes today's ``validate()`` raised on
  every load, stalling every consumer behind it.
"""

from __future__ import annotations

import functools
import logging
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest

import dogma
from runkit.engine import envelope as envelope_module
from runkit.engine.commands.acceptance import idempotency_name
from runkit.engine.envelope import closing_iter, new_envelope, register_types, to_message
from runkit.engine.streams import (
    EventBus,
    OwnershipLost,
    PartitionStream,
    StreamRecord,
    StreamTail,
    StreamWriter,
    decode_stream_record,
    encode_stream_record,
)
from runkit.engine.streams import read_tail as read_stream_tail
from runkit.persistence import Journal, Limits
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import (
    APP_KEY,
    Deposit,
    Notify,
    check_invariants,
    execute_in_batch,
    running,
    settled,
    setup,
    wait_until,
)


def silo() -> MemoryProvider:
    return MemoryProvider(f"batches-{uuid.uuid4()}")


async def _stream_writer(
    *, batch_limit: int = 100, record_limit: int = 1 << 20, provider: MemoryProvider | None = None
) -> tuple[Journal, PartitionStream, StreamWriter]:
    """A fresh stream journal ``"stream"`` (in a new silo), its stream and a writer."""
    register_types(setup().config.message_types())
    journal = await (provider or silo()).journals.open("stream")
    stream = PartitionStream("s", journal, next_offset=0)
    writer = StreamWriter(
        journal,
        stream,
        EventBus(),
        StreamTail(0, 0, 0, frozenset()),
        clock=lambda: datetime.now(UTC),
        batch_limit=batch_limit,
        record_limit=record_limit,
        progress_interval=0.05,
        retry_max_delay=1.0,
    )
    return journal, stream, writer


# -- bug 1: shutdown flush -------------------------------------------------------------


async def test_stream_writer_flushes_what_was_queued_when_cancelled() -> None:
    journal, _, writer = await _stream_writer()
    env = new_envelope(
        Deposit("a", 1, "r"), app_key=APP_KEY, site_key=None, created_at=datetime.now(UTC)
    )
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        # Cancel the writer before it gets to run with the queued publication.
        publication = writer.enqueue("cmd-1", [env])
        tg.cancel_scope.cancel()
    assert publication.error is None, "shutdown failed the queued publication"
    await writer.flush()
    tail = await read_stream_tail(journal)
    assert tail.next_offset == 1, "flush() wrote nothing: the queue was dropped"
    record = decode_stream_record(await journal.get(0))
    assert record.command_ids == ("cmd-1",)
    assert publication.settled
    assert publication.offset == 0
    writer.close()
    await journal.close()


async def test_a_claim_keeps_the_next_scan_reaching_the_previous_owners_records() -> None:
    # Owner A read the inbox to 2 and committed the command at 1 while the one
    # at 0 was still pending (an integration being retried), then stopped. B
    # learned from the tail that 1 was committed and claimed the stream, with
    # a record whose inbox_end was its own (0: it had read nothing yet), and
    # stopped before 0 was done. C's scan stopped at that claim, so C did not
    # know 1 was committed and handled it again.
    journal, _, _ = await _stream_writer()
    await journal.append(
        0,
        encode_stream_record(
            StreamRecord(
                first_offset=0,
                inbox_position=0,
                inbox_end=2,
                written_at=datetime.now(UTC),
                writer="a",
                command_ids=("inbox-1",),
            )
        ),
    )
    tail = await read_stream_tail(journal)
    assert tail.published == {"inbox-1"}
    b = StreamWriter(
        journal,
        PartitionStream("s", journal, next_offset=tail.next_offset),
        EventBus(),
        tail,
        clock=lambda: datetime.now(UTC),
        batch_limit=100,
        record_limit=1 << 20,
        progress_interval=0.05,
        retry_max_delay=1.0,
    )
    await b.claim()
    b.close()
    assert "inbox-1" in (await read_stream_tail(journal)).published, (
        "the next owner's scan stopped at the claim and missed a committed inbox command"
    )
    await journal.close()


def test_commands_the_takeover_scan_found_committed_are_never_forgotten() -> None:
    # The scan's IDs seeded a bounded LRU, which dropped the surplus at the
    # owner's first completion (in arbitrary order); their inbox copies were
    # then handled again.
    from runkit.engine.commands.pending import CompletedCommands

    found = frozenset(f"cmd-{i}" for i in range(150))
    completed = CompletedCommands(100, found)
    for i in range(300):
        completed.add(f"new-{i}")
    assert all(c in completed for c in found)
    assert "new-0" not in completed
    assert "new-299" in completed


async def test_an_owner_skips_every_inbox_command_its_predecessor_committed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A previous owner read the whole inbox and committed all of it but the
    # first command (a slow integration), then stopped. The new owner's
    # completions (here with the cache cut to 3) evicted the rest of what its
    # scan found, and their inbox copies were handled again.
    from engine_commands_harness import NOTIFIER_KEY, one_partition_engine

    from runkit.engine.commands import batches
    from runkit.engine.commands.inbox import InboxEntry, append_to_inbox, inbox_name
    from runkit.engine.partitions import partition_id
    from runkit.engine.streams import stream_name

    monkeypatch.setattr(batches, "COMPLETED_CACHE", 3)
    s = setup()
    register_types(s.config.message_types())
    provider = silo()
    now = datetime.now(UTC)
    ids = [f"n-{i}" for i in range(8)]
    async with await provider.journals.open(inbox_name(APP_KEY, 0)) as inbox:
        for i, cid in enumerate(ids):
            env = new_envelope(
                Notify(i), app_key=APP_KEY, site_key=None, created_at=now, message_id=cid
            )
            await append_to_inbox(inbox, [InboxEntry(envelope=env, handler_key=NOTIFIER_KEY)])
    async with await provider.journals.open(stream_name(APP_KEY, 0)) as stream:
        record = StreamRecord(
            first_offset=0,
            inbox_position=0,
            inbox_end=8,
            written_at=now,
            writer="a",
            command_ids=tuple(ids[1:]),
        )
        await stream.append(0, encode_stream_record(record))
    engine, ownership = one_partition_engine(s.config, provider, backlog_limit=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        ownership.assign({partition_id(APP_KEY, 0)})
        await wait_until(lambda: s.notifier.calls == [0])
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: runtime.partitions[0]._writer.written_progress == 8)
        tg.cancel_scope.cancel()
    assert s.notifier.calls == [0], "commands the previous owner committed were handled again"


async def test_a_record_names_the_instance_of_aggregate_commands_without_events() -> None:
    # A new owner materialises them from the stream (their instance journals
    # must name them), so the record says which instance each one hit.
    journal, _, writer = await _stream_writer()
    env = new_envelope(
        Deposit("a", 1, "r"), app_key=APP_KEY, site_key=None, created_at=datetime.now(UTC)
    )
    writer.enqueue("quiet-1", [], instance=("h", "a"))
    writer.enqueue("loud", [env], instance=("h", "a"))
    writer.enqueue("quiet-2", [], instance=("h", "b"))
    writer.enqueue("integration", [])
    await writer.flush()
    record = decode_stream_record(await journal.get(0))
    assert record.command_ids == ("quiet-1", "loud", "quiet-2", "integration")
    assert [(q.index, q.offset, q.handler_key, q.instance_id) for q in record.event_less] == [
        (0, 0, "h", "a"),
        (2, 1, "h", "b"),
    ]
    writer.close()
    await journal.close()


async def test_a_batch_larger_than_the_record_limit_is_committed_in_several_records() -> None:
    limit = 4096
    journal, _, writer = await _stream_writer(batch_limit=10_000, record_limit=limit)
    count = 200
    envelopes = [
        new_envelope(
            Deposit("a", i, f"r{i}"), app_key=APP_KEY, site_key=None, created_at=datetime.now(UTC)
        )
        for i in range(count)
    ]
    # Queued before the writer runs: one batch, far larger than one record may be.
    publications = [writer.enqueue(f"cmd-{i}", [env]) for i, env in enumerate(envelopes)]
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        for publication in publications:
            await publication.wait_settled()
        tg.cancel_scope.cancel()
    assert [p.offset for p in publications] == list(range(count))
    bounds = await journal.bounds()
    records = [await journal.get(position) for position in range(bounds.begin, bounds.end)]
    assert len(records) > 1, "the batch was not split"
    assert all(len(data) <= limit for data in records), "a record is over the limit"
    committed = [cid for data in records for cid in decode_stream_record(data).command_ids]
    assert committed == [f"cmd-{i}" for i in range(count)]
    writer.close()
    await journal.close()


async def test_a_batch_the_size_estimate_undercounts_still_fits_the_store_limit() -> None:
    # Small events with very long instance IDs: the writer's estimate of a
    # publication's size falls short of its encoding, and a batch filled to
    # 90% of the estimate went over the store's limit (an append the writer
    # retried for ever, the same bytes each time).
    limit = 64 * 1024
    provider = MemoryProvider(f"batches-{uuid.uuid4()}", limits=Limits(max_record_bytes=limit))
    journal, _, writer = await _stream_writer(
        batch_limit=1000, record_limit=limit, provider=provider
    )
    envelopes = [
        new_envelope(
            Deposit("a", i, ""),
            app_key=APP_KEY,
            site_key=None,
            created_at=datetime.now(UTC),
            source_instance="instance-" + "i" * 600,
        )
        for i in range(400)
    ]
    publications = [writer.enqueue(f"cmd-{i}", [env]) for i, env in enumerate(envelopes)]
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        with anyio.fail_after(5):
            for publication in publications:
                await publication.wait_settled()
        tg.cancel_scope.cancel()
    assert [p.offset for p in publications] == list(range(400))
    bounds = await journal.bounds()
    assert bounds.end > 1
    writer.close()
    await journal.close()


async def test_a_command_whose_events_cannot_fit_a_stream_record_is_poisoned_alone() -> None:
    # Its record would be over the store's limit: appended, it would be
    # refused for ever and the partition would commit nothing more.
    s = setup()
    limit = 64 * 1024
    provider = MemoryProvider(f"batches-{uuid.uuid4()}", limits=Limits(max_record_bytes=limit))
    s.accounts.pad["huge"] = limit
    async with running(provider, s.config) as engine:
        executor = engine.executor_for(s.app)
        with anyio.fail_after(10):
            await executor.execute_command(Deposit("acc", 1, "huge"))
            await executor.execute_command(Deposit("acc", 2, "fine"))
            await wait_until(lambda: [c[1] for c in s.accounts.calls] == ["huge", "fine"])
    stores = await settled(provider)
    [poisoned] = stores.poison.values()
    assert "bytes" in poisoned.error
    assert [getattr(e, "ref", None) for e in s.accounts.events][-1] == "fine"
    check_invariants(stores)


# -- bug 2: idempotency markers only where nothing else proves the command was handled ---


async def test_markers_only_for_keyed_integration_commands() -> None:
    s = setup()
    provider = silo()
    async with running(provider, s.config) as engine:
        executor = engine.executor_for(s.app)
        await executor.execute_command(Deposit("acc", 1, "k1"), idempotency_key="agg-key")
        await executor.execute_command(Notify(7), idempotency_key="int-key")
        await wait_until(lambda: len(s.accounts.calls) == 1 and s.notifier.calls == [7])
        markers = await provider.keyspaces.open(idempotency_name(APP_KEY))
        integration_id = str(uuid.uuid5(uuid.UUID(APP_KEY), "int-key")).encode()
        await wait_until(lambda: markers.has(integration_id))
        keys = [key async for key, _, _ in markers.range()]
        assert keys == [integration_id], "an aggregate command got a marker"
        # The aggregate command is still deduplicated, by its instance's history.
        await executor.execute_command(Deposit("acc", 1, "k1"), idempotency_key="agg-key")
        await executor.execute_command(Notify(7), idempotency_key="int-key")
        await anyio.sleep(0.2)
        assert len(s.accounts.calls) == 1
        assert s.notifier.calls == [7]
        await markers.close()
    check_invariants(await settled(provider))


# -- bug 3: stored messages that no longer validate are delivered -----------------------

REGISTRY = dogma.MessageTypeRegistry()
_strict: dict[str, int] = {"on": 0, "calls": 0}


@dogma.register_event("b7000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Noted(dogma.Event):
    text: str

    def validate(self, scope: dogma.ValidationScope) -> None:
        _strict["calls"] = _strict.get("calls", 0) + 1
        if _strict["on"] and not self.text.isupper():
            raise dogma.ValidationError("text must be upper case (rule added later)")


async def test_stored_message_failing_todays_rules_is_delivered_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    register_types([REGISTRY.of(Noted)])  # type: ignore[list-item]
    env = new_envelope(
        Noted("recorded last year"), app_key=APP_KEY, site_key=None, created_at=datetime.now(UTC)
    )
    _strict.update(on=1, calls=0)
    envelope_module._invalid_types.discard(env.type_id)  # warned once per type per process
    try:
        with caplog.at_level(logging.WARNING, logger="runkit.engine.envelope"):
            first = to_message(env)
            second = to_message(env)
    finally:
        _strict["on"] = 0
    assert isinstance(first, Noted)
    assert first == second
    assert first is not second  # ADR-32
    # Validated once per node, however often it is decoded.
    assert _strict["calls"] == 1
    warnings = [r for r in caplog.records if "no longer passes validate()" in r.getMessage()]
    assert len(warnings) == 1
    assert "rule added later" in warnings[0].getMessage()


# -- the batch processor --------------------------------------------------------------


async def test_a_burst_of_commands_commits_in_few_stream_records() -> None:
    s = setup()
    provider = silo()
    async with running(provider, s.config, partition_count=1) as engine:
        executor = engine.executor_for(s.app)
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(executor.execute_command, Deposit(f"a{i % 20}", 1, f"r{i}"))
        await wait_until(lambda: len(s.accounts.calls) == 200)
    stores = await settled(provider)
    check_invariants(stores)
    records = [r for r in stores.stream[0] if r.events]
    # Local callers skip the inbox, and the batch is committed in few appends.
    assert not stores.inbox[0]
    assert len(records) < 50, f"{len(records)} stream records for 200 commands"


async def test_a_failing_local_command_is_made_durable_in_the_inbox() -> None:
    s = setup()
    provider = silo()
    s.accounts.fail["boom"] = 2
    async with running(provider, s.config, partition_count=1) as engine:
        executor = engine.executor_for(s.app)
        with anyio.fail_after(5):
            await executor.execute_command(Deposit("acc", 1, "boom"))
        stores = await settled(provider)
        # It returned once the command was in the inbox; it was handled later.
        assert [e.envelope.description for _, r in stores.inbox[0] for e in r.entries]
    assert [c for c in s.accounts.calls if c[1] == "boom"] == [("acc", "boom", 0)]
    check_invariants(stores)


async def test_backlog_limit_makes_callers_wait_and_then_raise() -> None:
    from runkit.engine.commands.acceptance import Backlogged

    s = setup()
    provider = silo()
    s.notifier.release = anyio.Event()
    async with running(provider, s.config, partition_count=1, backlog_limit=3) as engine:
        executor = engine.executor_for(s.app)
        runtime = await engine.runtime(APP_KEY)
        runtime.acceptor._backlog_timeout = 0.3
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(executor.execute_command, Notify(i))
            await wait_until(lambda: len(s.notifier.calls) == 3)
            # Bounded: a caller that skipped the wait would hang on the handler.
            with anyio.fail_after(5), pytest.raises(Backlogged, match="backlog limit 3"):
                await executor.execute_command(Notify(99))
            s.notifier.release.set()
        await executor.execute_command(Notify(100))
        await wait_until(lambda: 100 in s.notifier.calls)
    assert 99 not in s.notifier.calls


async def test_callers_waiting_for_room_go_in_arrival_order_and_a_leaver_passes_its_turn() -> None:
    s = setup()
    provider = silo()
    s.notifier.release = anyio.Event()
    async with running(provider, s.config, partition_count=1, backlog_limit=1) as engine:
        executor = engine.executor_for(s.app)
        runtime = await engine.runtime(APP_KEY)
        async with anyio.create_task_group() as tg:
            tg.start_soon(executor.execute_command, Notify(0))  # takes the only slot
            await wait_until(lambda: s.notifier.calls == [0])
            partition = runtime.partitions[0]

            async def caller(n: int) -> None:
                if n == 2:
                    with anyio.move_on_after(0.3):  # gives up while waiting
                        await executor.execute_command(Notify(n))
                else:
                    await executor.execute_command(Notify(n))

            for n in (1, 2, 3, 4):
                tg.start_soon(caller, n)
                await wait_until(functools.partial(_waiting, partition, n))
            await wait_until(lambda: partition._backlog.waiting == 3)  # the leaver left
            s.notifier.release.set()
        await wait_until(lambda: len(s.notifier.calls) == 4)
    assert s.notifier.calls == [0, 1, 3, 4], "not served in arrival order"
    assert not partition._backlog.waiting


async def test_inbox_commands_wait_for_room_and_go_before_callers_waiting_for_it() -> None:
    # Commands a peer left in the inbox (its offer timed out) were all taken into
    # the batch at once, whatever the backlog limit: under overload a partition
    # held hundreds over it. They now wait, read, until there is room, and go
    # before callers that wait for room (they are older).
    from runkit.engine.envelope import new_envelope

    s = setup()
    provider = silo()
    s.notifier.release = anyio.Event()
    async with running(provider, s.config, partition_count=1, backlog_limit=2) as engine:
        executor = engine.executor_for(s.app)
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        partition = runtime.partitions[0]

        def entry(n: int) -> Any:
            envelope = new_envelope(
                Notify(n), app_key=APP_KEY, site_key=None, created_at=datetime.now(UTC)
            )
            return runtime.acceptor.route(envelope, keyed=False)[1]

        await runtime.inbox_writers[0].submit([entry(n) for n in range(5)])  # a peer's fallback
        await wait_until(lambda: len(s.notifier.calls) == 2)
        await anyio.sleep(0.2)  # the others would have started by now
        assert sorted(s.notifier.calls) == [0, 1]  # integration commands start concurrently
        assert (partition.backlog, partition.held) == (2, 3)
        assert partition.progress()["pending"] == 5
        # A command a handler produced never waits for room: it overtakes them.
        partition.execute_nowait([entry(50)], lambda error: None)
        await wait_until(lambda: 50 in s.notifier.calls)
        assert (partition.backlog, partition.held) == (3, 3)
        async with anyio.create_task_group() as tg:
            tg.start_soon(executor.execute_command, Notify(99))
            await wait_until(lambda: partition._backlog.waiting == 1)
            s.notifier.release.set()
        await wait_until(lambda: len(s.notifier.calls) == 7 and partition.backlog == 0)
        assert partition.held == 0
    calls = s.notifier.calls
    assert (sorted(calls[:2]), calls[2], sorted(calls[3:6]), calls[6]) == (
        [0, 1],
        50,
        [2, 3, 4],
        99,
    )


def _waiting(partition: Any, count: int) -> bool:
    waiting: int = partition._backlog.waiting
    return waiting == count


async def test_a_slot_handed_to_a_waiter_is_not_taken_by_a_newcomer() -> None:
    # A freed slot is reserved for the first waiter until it resumes: a caller
    # arriving meanwhile (one whose command just finished, calling again) must
    # wait its turn, or closed-loop callers starve the queue.
    from runkit.engine.commands.backlog import Backlog

    backlog = Backlog[int](1)
    backlog.count = 1
    async with anyio.create_task_group() as tg:
        tg.start_soon(backlog.wait_for_room)
        await wait_until(lambda: backlog.waiting == 1)
        backlog.count -= 1  # the command in the slot is done
        backlog.wake_waiters()
        assert not backlog.has_room(), "a newcomer may take the slot handed to the waiter"
    assert backlog.has_room()  # the waiter resumed without taking it: free again


async def test_a_freed_slot_goes_to_held_inbox_commands_before_waiting_callers() -> None:
    # Whatever frees a slot (a command finishing, a woken caller that leaves
    # without taking it) hands it to held inbox commands first: otherwise a
    # slot left by a caller stayed free while they waited for the next finish.
    from runkit.engine.commands.backlog import Backlog

    admitted: list[int] = []
    backlog = Backlog[int](2, admit=admitted.append)
    backlog.count = 2
    async with anyio.create_task_group() as tg:
        tg.start_soon(backlog.wait_for_room)
        await wait_until(lambda: backlog.waiting == 1)
        backlog.hold(1)
        assert not backlog.has_room()
        backlog.count -= 1  # a slot frees
        backlog.wake_waiters()
        assert admitted == [1]
        assert backlog.waiting == 1, "the caller went before the held inbox command"
        backlog.count -= 1
        backlog.wake_waiters()  # nothing held: the caller's turn
    assert backlog.waiting == 0


async def test_a_caller_that_only_waits_its_turn_passes_its_slot_to_held_inbox_commands() -> None:
    # An integration command's caller waits for room, then appends to the
    # inbox rather than taking the slot (its command takes one when read
    # back). An inbox command held while the slot was reserved for the caller
    # stayed held with the slot free: callers then waited for room that was
    # there, until some command finished (never, if the caller's own append
    # failed and nothing else was in flight).
    from runkit.engine.commands.backlog import Backlog

    admitted: list[int] = []
    backlog = Backlog[int](1, admit=admitted.append)
    backlog.count = 1
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(backlog.wait_for_room, take=False))
        await wait_until(lambda: backlog.waiting == 1)
        backlog.count -= 1  # the command in the slot is done
        backlog.wake_waiters()  # the slot is reserved for the caller
        backlog.hold(7)  # an inbox command read meanwhile waits
        assert admitted == []
    assert admitted == [7], "the slot the caller left stayed free"
    assert (backlog.count, backlog.free, list(backlog.held)) == (1, 0, [])


# -- a catch-up that never suspends must not starve other tasks -----------------------


async def test_reading_a_stream_lets_other_tasks_run_even_if_nothing_suspends() -> None:
    # A memory store and a read model in memory never suspend: without the
    # reader's periodic checkpoint a long catch-up starved the heartbeat, and
    # the node stopped taking work (seen in the overload benchmark).
    journal, stream, writer = await _stream_writer()
    count = 2_000
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        publications = [
            writer.enqueue(
                f"cmd-{i}",
                [
                    new_envelope(
                        Deposit("a", 1, f"r{i}"),
                        app_key=APP_KEY,
                        site_key=None,
                        created_at=datetime.now(UTC),
                    )
                ],
            )
            for i in range(count)
        ]
        for publication in publications:
            await publication.wait_settled()
        tg.cancel_scope.cancel()

    for source, reader in (
        ("the journal", PartitionStream("s", journal, next_offset=count)),  # empty buffer
        ("the buffer", stream),
    ):
        turns = 0

        async def other() -> None:
            nonlocal turns
            while True:
                turns += 1
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(other)
            await anyio.lowlevel.checkpoint()
            before = turns
            seen = 0
            async with closing_iter(reader.read(0)) as events:
                async for event in events:  # consumed without awaiting anything else
                    seen += 1
                    if event.offset == count - 1:
                        break
            assert seen == count
            assert turns - before >= count // 512, f"reading {source} starved other tasks"
            tg.cancel_scope.cancel()
    writer.close()
    await journal.close()


async def test_stopping_settles_a_retried_command_whose_first_attempt_is_committing() -> None:
    """A caller's retry of a command still being committed must not wait for ever.

    Both attempts carry the same command ID; only the first is in a stream
    record in flight, and the writer settles only that one. Stopping used to
    skip every item whose command ID was being committed, so the retry's
    caller hung (seen in the two-engine fault test).
    """
    from runkit.engine.commands.acceptance import PartitionStopped
    from runkit.engine.commands.inbox import InboxEntry
    from runkit.engine.commands.local_callers import LocalCallers
    from runkit.engine.commands.pending import PendingCommand, Waiter

    s = setup()
    register_types(s.config.message_types())
    env = new_envelope(
        Deposit("acct", 1, "ref"), app_key=APP_KEY, site_key=None, created_at=datetime.now(UTC)
    )
    entry = InboxEntry(envelope=env, handler_key="h", instance_id="acct")
    first, retry = (
        PendingCommand(entry, None, -1, Waiter(1, done=anyio.Event())) for _ in range(2)
    )
    callers = LocalCallers(
        inbox_writer=None,  # type: ignore[arg-type]  # nothing is spilled here
        start=lambda *args: None,
        spilled_at=lambda position: None,
    )
    callers.add(first)
    callers.add(retry)
    callers.stop({first})  # the first is in the record the writer is committing
    assert retry.waiter is not None
    assert first.waiter is not None
    assert retry.waiter.settled
    assert retry.waiter.done is not None
    assert retry.waiter.done.is_set()
    assert isinstance(retry.waiter.error, PartitionStopped)
    assert not first.waiter.settled  # the writer settles it (durable or failed)


def test_a_waiter_calls_back_once_with_the_first_error(caplog: pytest.LogCaptureFixture) -> None:
    from runkit.engine.commands.pending import Waiter

    calls: list[BaseException | None] = []
    ok = Waiter(2, callback=calls.append)
    ok.settle()
    assert calls == []  # one command is still pending
    ok.settle()
    assert calls == [None]
    first, second = RuntimeError("first"), RuntimeError("second")
    failed = Waiter(3, callback=calls.append)
    failed.settle(first)  # the first failure answers at once
    failed.settle(second)
    failed.settle()
    assert calls == [None, first]

    def broken(error: BaseException | None) -> None:
        raise KeyError("bug in the caller")

    # The callback runs in the partition's writer: its failure is logged, not raised.
    Waiter(1, callback=broken).settle()
    assert "completion callback failed" in caplog.text


async def test_a_command_handled_after_the_writer_stopped_does_not_hang_its_caller() -> None:
    """The batch loop may hand a command to a writer that has just stopped (ownership lost).

    Its caller must then fall back to the inbox, not wait for a commit that will
    never come: the command used to stay registered as being committed, so
    stopping the partition skipped its caller (seen in the two-engine fault test).
    """
    s = setup()
    provider = silo()
    async with running(provider, s.config, partition_count=1) as engine:
        executor = engine.executor_for(s.app)
        runtime = await engine.runtime(APP_KEY)
        await executor.execute_command(Notify(0))
        await wait_until(lambda: 0 in runtime.partitions)
        partition = runtime.partitions[0]
        # As if another node had written the stream: the writer stops and
        # refuses what the batch loop hands it next.
        partition._writer.close(OwnershipLost("test: another node wrote the stream"))
        with anyio.fail_after(10):
            await execute_in_batch(engine, Notify(1))
        await wait_until(lambda: 1 in s.notifier.calls)


def test_unparked_commands_go_before_newer_ones_already_ready() -> None:
    # An instance's commands keep their order: those parked while it loaded
    # go back ahead of a newer command that reached the ready queue meanwhile.
    from collections import deque
    from typing import cast

    from runkit.engine.commands.parking import ParkedInstances
    from runkit.engine.commands.pending import PendingCommand

    ready: deque[PendingCommand] = deque()
    parked = ParkedInstances(
        ready,
        wake=lambda: None,
        start=lambda *args: None,
        load=lambda handler, instance: anyio.lowlevel.checkpoint(),
        failure=lambda item, exc: None,
        poison=lambda item, reason, attempts: anyio.lowlevel.checkpoint(),
        retry_base_delay=0.01,
    )
    first, second, newer = (cast(PendingCommand, object()) for _ in range(3))
    key = ("handler", "instance")
    parked.load(cast(Any, None), key, first)
    assert parked.join(key, second)
    ready.append(newer)
    parked.unpark(key)
    assert list(ready) == [first, second, newer]
