"""The commit point at its edges: an append that landed but said it failed, a spill racing a retry.

A command committed in a stream record must never be handled again, whatever
the writer or the next owner believes about that record (ADR 0002, 0007).
Integration commands show it: nothing but the stream proves they were handled.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import attrs
import msgspec
import pytest

import dogma
from runkit.config import build
from runkit.engine.commands.inbox import InboxEntry, append_to_inbox, inbox_name
from runkit.engine.envelope import new_envelope, register_types
from runkit.engine.partitions import partition_id
from runkit.engine.streams import (
    StreamRecord,
    UnconfirmedAppend,
    command_locations,
    encode_stream_record,
    holds_command,
    stream_name,
)
from runkit.testing.faults import AFTER, BEFORE, FaultyProvider
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import (
    APP_KEY,
    NOTIFIER_KEY,
    REGISTRY,
    App,
    Deposit,
    Notifier,
    Notify,
    cached_refs,
    check_invariants,
    execute_in_batch,
    one_partition_engine,
    read_stores,
    running,
    settled,
    setup,
    wait_until,
)


def _stream(name: str) -> bool:
    return "/stream/" in name


async def test_an_append_that_landed_is_recognised_after_the_partition_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The stream append lands but reports an error; the partition stops while
    # the writer waits to retry. Its final flush must retry the same record,
    # recognise it as its own when the append conflicts, and answer the caller
    # as committed: rebuilt (a new written_at), it would look foreign, the
    # caller would hear that the partition stopped and spill the committed
    # command to the inbox, and the next owner would handle it again.
    from runkit.engine.streams import writer as writer_module

    monkeypatch.setattr(writer_module, "backoff", lambda *a: 30.0)  # a store slow to recover
    s = setup()
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    provider = FaultyProvider(inner)
    engine, ownership = one_partition_engine(s.config, provider)
    everything = {partition_id(APP_KEY, 0)}
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        ownership.assign(everything)
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)  # its claim record is written
        provider.plan.fail(AFTER, ops={"append"}, names=_stream, times=1)
        returned = anyio.Event()

        async def call() -> None:
            await execute_in_batch(engine, Notify(1))
            returned.set()

        tg.start_soon(call)
        await wait_until(lambda: provider.plan.injected_after == 1)
        ownership.assign(set())  # e.g. a heartbeat stale for a moment
        with anyio.fail_after(10):
            await returned.wait()
        ownership.assign(everything)
        await anyio.sleep(0.3)
        tg.cancel_scope.cancel()
    stores = await read_stores(inner)
    check_invariants(stores)
    assert s.notifier.calls == [1]
    assert stores.inbox[0] == [], "a committed command was spilled to the inbox"


async def test_a_spilled_command_retried_before_its_spill_lands_is_handled_once() -> None:
    # A local integration command fails once and is spilled to the inbox while
    # its retry runs. If the retry committed before the spill's inbox position
    # was known, the record would not say the inbox was read past the spill,
    # and a next owner (the first one dying before another record) would take
    # the spilled entry for unhandled and handle it again.
    s = setup()
    s.notifier.fail[1] = 1
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    provider = FaultyProvider(inner)
    # The spill's inbox append is slow: three retryable failures first.
    provider.plan.fail(BEFORE, ops={"append"}, names=lambda n: "/inbox/" in n, times=3)
    async with running(provider, s.config, partition_count=1, shutdown_timeout=0.3) as engine:
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        await execute_in_batch(engine, Notify(1))
        # The owner "dies": no stream record lands from now on.
        provider.plan.fail(BEFORE, ops={"append"}, names=_stream)
        await wait_until(lambda: provider.plan.injected_before >= 3)
        await anyio.sleep(0.2)  # the spill lands meanwhile
    provider.plan.clear()
    async with running(MemoryProvider(inner.silo), s.config, partition_count=1):
        await settled(inner)
        await anyio.sleep(0.3)  # time enough to handle anything again
    # The handler may run again after the restart (a retry whose record never
    # landed); its effects must not be recorded twice.
    stores = await read_stores(inner)
    check_invariants(stores)  # among others: each accepted command published once
    assert len(stores.published()) == 1


async def test_an_aggregate_command_retried_before_its_spill_lands_is_committed_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The aggregate version: a local command fails once and is spilled while
    # its retry waits. A retry committed before the spill's inbox position was
    # known, and then a later record and the owner's death, left the spilled
    # entry looking unhandled to the next owner; a command that recorded
    # nothing (no journal, no recent ID) was then committed a second time.
    from runkit.engine.commands import inbox as inbox_module

    s = setup()
    s.accounts.fail["n"] = 1
    s.accounts.nothing.add("n")
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    provider = FaultyProvider(inner)
    gate = anyio.Event()
    gate.set()
    append = inbox_module.append_to_inbox

    async def slow_append(*args: Any, **kwargs: Any) -> int:
        await gate.wait()
        return await append(*args, **kwargs)

    monkeypatch.setattr(inbox_module, "append_to_inbox", slow_append)
    async with running(provider, s.config, partition_count=1, shutdown_timeout=0.3) as engine:
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        executor = engine.executor_for(s.app)
        await executor.execute_command(Deposit("a", 1, "warm"))
        gate = anyio.Event()  # the spill waits
        returned = anyio.Event()

        async def call_n() -> None:
            await executor.execute_command(Deposit("a", 1, "n"))
            returned.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call_n)
            await wait_until(lambda: s.accounts.attempts.get("n") == 1)  # failed, spilling
            await anyio.sleep(0.3)  # a retry not waiting for the spill commits now
            await executor.execute_command(Deposit("b", 5, "later"))  # a later record
            # The spill lands and the owner "dies": no stream record lands from now on.
            provider.plan.fail(BEFORE, ops={"append"}, names=_stream)
            gate.set()
            with anyio.fail_after(10):
                await returned.wait()
            await anyio.sleep(0.1)
    provider.plan.clear()
    s.accounts.nothing.discard("n")  # handled again, it would record an event
    async with running(MemoryProvider(inner.silo), s.config, partition_count=1):
        await settled(inner)
        await anyio.sleep(0.3)  # time enough to handle anything again
    stores = await read_stores(inner)
    check_invariants(stores)  # among others: no command committed twice


async def test_a_command_committed_for_an_unanswered_offer_is_not_handled_again() -> None:
    # A gateway's offer goes unanswered although the owner commits it; the
    # gateway spills it to the inbox. The owner writes another record and
    # stops before it reads the spill: the next owner's takeover scan stops at
    # that last record and never sees the commit, and a command that recorded
    # nothing left no other trace. The spill is marked with the time of the
    # offer, and the next owner looks through the records written since. A
    # command offered the same way but never committed is still handled.
    s = setup()
    s.accounts.nothing.add("quiet")  # handled, records nothing
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    a, a_owns = one_partition_engine(s.config, inner, shutdown_timeout=0.2)
    offered_at = datetime.now(UTC)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run)
        a_owns.assign({partition_id(APP_KEY, 0)})
        runtime = await a.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)

        def entry(ref: str) -> InboxEntry:
            envelope = new_envelope(
                Deposit("acc", 1, ref), app_key=APP_KEY, site_key=None, created_at=offered_at
            )
            return runtime.acceptor.route(envelope, keyed=False)[1]

        committed, lost = entry("quiet"), entry("lost")
        await runtime.partitions[0].execute_local([committed])  # the offer, taken
        await execute_in_batch(a, Deposit("other", 1, "later"))
        a_owns.assign(set())
        await wait_until(lambda: 0 not in runtime.partitions)
        tg.cancel_scope.cancel()
    # The gateway's fallback for both offers it got no answer to.
    async with await inner.journals.open(inbox_name(APP_KEY, 0)) as inbox:
        marked = [msgspec.structs.replace(e, offered_at=offered_at) for e in (committed, lost)]
        await append_to_inbox(inbox, marked)
    async with running(MemoryProvider(inner.silo), s.config, partition_count=1):
        await settled(inner)
        await anyio.sleep(0.3)  # time enough to handle anything again
    refs = [ref for _, ref, _ in s.accounts.calls]
    assert refs.count("quiet") == 1, "a committed command was handled again"
    assert refs.count("lost") == 1, "an offered command never committed was not handled"
    check_invariants(await read_stores(inner))


async def test_a_landed_append_the_final_flush_cannot_confirm_is_not_handled_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The stream append lands but reports an error, and the store stays
    # unreachable past the shutdown timeout: the caller hears that the
    # partition stopped and spills the command to the inbox, although the
    # stream holds it. The next owner must find it in the stream.
    from runkit.engine.streams import writer as writer_module

    monkeypatch.setattr(writer_module, "backoff", lambda *a: 30.0)
    s = setup()
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    provider = FaultyProvider(inner)
    engine, ownership = one_partition_engine(s.config, provider, shutdown_timeout=0.2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        ownership.assign({partition_id(APP_KEY, 0)})
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)  # its claim record is written
        provider.plan.fail(AFTER, ops={"append"}, names=_stream, times=1)
        provider.plan.fail(BEFORE, ops={"append"}, names=_stream)
        returned = anyio.Event()

        async def call() -> None:
            await execute_in_batch(engine, Notify(1))
            returned.set()

        tg.start_soon(call)
        await wait_until(lambda: len(provider.plan.injected) >= 1)
        ownership.assign(set())
        with anyio.fail_after(10):
            await returned.wait()
        tg.cancel_scope.cancel()
    provider.plan.clear()
    async with running(MemoryProvider(inner.silo), s.config, partition_count=1):
        await settled(inner)
        await anyio.sleep(0.3)  # time enough to handle anything again
    stores = await read_stores(inner)
    check_invariants(stores)
    assert s.notifier.calls == [1]


async def test_a_spilled_copy_of_a_landed_append_is_not_handled_after_a_second_takeover(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Owner A's append of Notify(1) lands but cannot be confirmed, and A stops:
    # its caller spills the command to the inbox. Owner B, which took over
    # before the spill and has committed a record since, skips the spilled
    # copy (its takeover scan counted A's last record) and stops before any
    # record of its own says the inbox was read past it. The next owner's scan
    # stops at B's record and never reaches A's: only the spilled entry's hint
    # tells it the command is committed.
    from runkit.engine.streams import writer as writer_module

    monkeypatch.setattr(writer_module, "backoff", lambda *a: 30.0)
    s = setup()
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    a_store = FaultyProvider(inner)
    b_store = FaultyProvider(MemoryProvider(inner.silo))
    a, a_owns = one_partition_engine(s.config, a_store, shutdown_timeout=0.2)
    b, b_owns = one_partition_engine(
        s.config, b_store, shutdown_timeout=0.2, progress_interval=30.0
    )
    everything = {partition_id(APP_KEY, 0)}
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run)
        tg.start_soon(b.run)
        a_owns.assign(everything)
        a_runtime = await a.runtime(APP_KEY)
        await wait_until(lambda: 0 in a_runtime.partitions)  # its claim record is written
        a_store.plan.fail(AFTER, ops={"append"}, names=_stream, times=1)
        a_store.plan.fail(BEFORE, ops={"append"}, names=_stream)
        returned = anyio.Event()

        async def call() -> None:
            await execute_in_batch(a, Notify(1))
            returned.set()

        tg.start_soon(call)
        await wait_until(lambda: len(a_store.plan.injected) >= 1)  # landed, unconfirmed
        # B takes over while A cannot reach the store (A's heartbeat went stale).
        b_owns.assign(everything)
        b_runtime = await b.runtime(APP_KEY)
        await wait_until(lambda: 0 in b_runtime.partitions)
        await execute_in_batch(b, Notify(2))  # B's record: inbox read to 0
        a_owns.assign(set())  # A stops: its caller spills Notify(1) to the inbox
        with anyio.fail_after(10):
            await returned.wait()
        await wait_until(lambda: b_runtime.partitions[0].progress()["inbox_read"] >= 1)
        # B dies before recording that it read the inbox past the spilled copy.
        b_store.plan.fail(BEFORE, ops={"append"}, names=_stream)
        b_owns.assign(set())
        await wait_until(lambda: 0 not in b_runtime.partitions)
        tg.cancel_scope.cancel()
    async with running(MemoryProvider(inner.silo), s.config, partition_count=1):
        await settled(inner)
        await anyio.sleep(0.3)  # time enough to handle anything again
    assert sorted(s.notifier.calls) == [1, 2], "a committed command was handled again"
    check_invariants(await read_stores(inner))


def _record(writer: str, *command_ids: str) -> bytes:
    return encode_stream_record(
        StreamRecord(
            first_offset=0,
            inbox_position=0,
            inbox_end=0,
            written_at=datetime.now(UTC),
            writer=writer,
            command_ids=command_ids,
        )
    )


@pytest.mark.parametrize(("hinted_writer", "calls"), [("a", []), ("b", [1])])
async def test_a_spilled_command_is_skipped_only_if_the_hinted_append_holds_it(
    hinted_writer: str, calls: list[int]
) -> None:
    # Writer "a" committed the command at stream position 0, and a later record
    # of its own ends the takeover scan before it. The spilled inbox entry's
    # hint decides: an append by "a" at 0 holds it (skip it); one by "b" does
    # not (that writer's append did not land there): the command is handled.
    s = setup()
    register_types(s.config.message_types())
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    envelope = new_envelope(Notify(1), app_key=APP_KEY, site_key=None, created_at=datetime.now(UTC))
    async with await inner.journals.open(stream_name(APP_KEY, 0)) as stream:
        await stream.append(0, _record("a", envelope.message_id))
        await stream.append(1, _record("a"))
    entry = InboxEntry(
        envelope=envelope,
        handler_key=NOTIFIER_KEY,
        unconfirmed=UnconfirmedAppend(position=0, writer=hinted_writer),
    )
    async with await inner.journals.open(inbox_name(APP_KEY, 0)) as inbox:
        await append_to_inbox(inbox, [entry])
    async with running(MemoryProvider(inner.silo), s.config, partition_count=1):

        async def processed() -> bool:
            return (await read_stores(inner)).fully_processed()

        await wait_until(processed)
    assert s.notifier.calls == calls


async def test_a_hint_into_a_truncated_stream_is_not_taken_for_a_commit() -> None:
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    async with await inner.journals.open(stream_name(APP_KEY, 0)) as stream:
        await stream.append(0, _record("a", "c1"))
        await stream.append(1, _record("a"))
        assert await holds_command(stream, UnconfirmedAppend(position=0, writer="a"), "c1")
        await stream.truncate(1)
        assert not await holds_command(stream, UnconfirmedAppend(position=0, writer="a"), "c1")


async def test_inbox_commands_committed_before_the_progress_record_are_not_handled_again() -> None:
    # The owner commits commands it read from the inbox in a stream record whose
    # header still places the inbox position before them (the progress past
    # them rides in a later record), then dies before any other record lands.
    # The next owner reads the inbox again from that position: its takeover
    # scan must find the commands in the stream and skip them.
    s = setup()
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    provider = FaultyProvider(inner)
    engine, ownership = one_partition_engine(
        s.config,
        provider,
        retry_max_delay=0.01,
        progress_interval=30.0,  # no progress-only record during the test
        shutdown_timeout=0.2,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        executor = engine.executor_for(s.app)
        await engine.runtime(APP_KEY)
        # Nobody owns the partition yet: both commands go to its inbox.
        await executor.execute_command(Notify(1))
        await executor.execute_command(Notify(2))
        ownership.assign({partition_id(APP_KEY, 0)})

        async def committed() -> bool:
            stream = (await read_stores(inner)).stream[0]
            return sum(len(r.command_ids) for r in stream) == 2

        await wait_until(committed)
        # The owner "dies": no stream record lands from now on.
        provider.plan.fail(BEFORE, ops={"append"}, names=_stream)
        tg.cancel_scope.cancel()
    stores = await read_stores(inner)
    last = stores.stream[0][-1]
    # The edge under test: the last record commits them, its progress is before them.
    assert last.command_ids
    assert last.inbox_position < last.inbox_end
    async with running(MemoryProvider(inner.silo), s.config, partition_count=1):
        await settled(inner)
        await anyio.sleep(0.3)  # time enough to handle anything again
    check_invariants(await read_stores(inner))
    assert sorted(s.notifier.calls) == [1, 2], "a command committed in the stream was handled again"


@dogma.register_command("c1000000-0000-4000-8000-0000000000e1", registry=REGISTRY)
@attrs.frozen
class Ping(dogma.Command):
    n: int


PINGER_KEY = "c0000000-0000-4000-8000-0000000000e1"


class Pinger:
    """An integration that records no event: only the inbox progress says it ran."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def configure(self, c: Any) -> None:
        c.identity("pinger", PINGER_KEY)
        c.routes(dogma.handles_command(Ping, registry=REGISTRY))

    async def handle_command(self, scope: Any, command: dogma.Command) -> None:
        assert isinstance(command, Ping)
        self.calls.append(command.n)


@pytest.mark.parametrize("caller", ["local", "offer"])
async def test_commands_of_one_call_committed_at_the_stop_are_not_spilled_with_the_rest(
    caller: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A handler produced two commands in one call (a process's outbox), on
    # this node or offered by a peer. When the partition stops, Notify(1) is
    # still being handled, while Ping(1), which records no event, is in the
    # append the final flush confirms. An offering gateway must spill only
    # Notify(1). On this node a process's integration commands go to the inbox
    # in the first place; the next owner, reading Ping(1) there again, must
    # find it committed (the record lists it as unmarked: its marker, due after
    # the final flush, is never written as the partition is stopping).
    from runkit.engine.commands.acceptance import PartitionStopped
    from runkit.engine.streams import writer as writer_module

    monkeypatch.setattr(writer_module, "backoff", lambda *a: 0.05)
    notifier, pinger = Notifier(), Pinger()
    config = build(App(notifier, pinger), registry=REGISTRY)
    register_types(config.message_types())
    notifier.release = anyio.Event()
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    provider = FaultyProvider(inner)
    engine, ownership = one_partition_engine(config, provider, shutdown_timeout=10.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        ownership.assign({partition_id(APP_KEY, 0)})
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        # The store is out for a while: Ping(1)'s append waits to be retried.
        provider.plan.fail(BEFORE, ops={"append"}, names=_stream)
        now = datetime.now(UTC)
        produced = [
            new_envelope(m, app_key=APP_KEY, site_key=None, created_at=now, message_id=i)
            for m, i in [(Ping(1), str(uuid.uuid4())), (Notify(1), str(uuid.uuid4()))]
        ]
        entries = [runtime.acceptor.route(e, keyed=True)[1] for e in produced]
        returned = anyio.Event()
        answers: list[bool | BaseException] = []

        async def dispatch() -> None:
            await runtime.accept(produced)
            returned.set()

        def answered(answer: bool | BaseException) -> None:
            answers.append(answer)
            returned.set()

        if caller == "local":
            tg.start_soon(dispatch)
        else:
            runtime.offer_local(0, entries, answered)
        await wait_until(lambda: pinger.calls == [1] and notifier.calls == [1])
        await wait_until(lambda: provider.plan.injected_before >= 1)
        ownership.assign(set())  # Notify(1) is not committing: its caller hears the stop
        await wait_until(lambda: 0 not in runtime.partitions)
        provider.plan.clear()  # the final flush confirms Ping(1)
        with anyio.fail_after(10):
            await returned.wait()
        if caller == "offer":
            # The gateway spills what the answer says was not committed.
            [answer] = answers
            spilled = answer.spilled(entries) if isinstance(answer, PartitionStopped) else entries
            async with await inner.journals.open(inbox_name(APP_KEY, 0)) as inbox:
                await append_to_inbox(inbox, spilled)
        tg.cancel_scope.cancel()
    notifier.release.set()
    async with running(MemoryProvider(inner.silo), config, partition_count=1):
        await wait_until(lambda: notifier.calls == [1, 1])

        async def processed() -> bool:
            return (await read_stores(inner)).fully_processed()

        await wait_until(processed)
    assert pinger.calls == [1], "a command committed at the stop was spilled and handled again"


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "unkeyed"])
async def test_a_command_that_recorded_nothing_is_not_handled_again_after_a_crash(
    keyed: bool,
) -> None:
    # An integration command read from the inbox records no event; its stream
    # record lands, and the owner dies before anything else is written: the
    # command's idempotency marker (keyed: as a process's outbox sends it) or
    # a later record carrying the inbox progress past it. No record listed a
    # command that published nothing, so the next owner read it from the inbox
    # again and made its call a second time. Committed records now list every
    # command they commit, and keyed ones as unmarked until their markers are
    # written.
    notifier, pinger = Notifier(), Pinger()
    config = build(App(notifier, pinger), registry=REGISTRY)
    register_types(config.message_types())
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    provider = FaultyProvider(inner)
    engine, ownership = one_partition_engine(
        config, provider, retry_max_delay=0.01, progress_interval=30.0, shutdown_timeout=0.2
    )
    ping = new_envelope(
        Ping(1), app_key=APP_KEY, site_key=None, created_at=datetime.now(UTC), message_id="p-1"
    )
    entry = InboxEntry(envelope=ping, handler_key=PINGER_KEY, keyed=keyed)
    async with await provider.journals.open(inbox_name(APP_KEY, 0)) as inbox:
        await append_to_inbox(inbox, [entry])
    provider.plan.fail(BEFORE, ops={"set_unconditional"}, names=lambda n: "idempotency" in n)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        ownership.assign({partition_id(APP_KEY, 0)})

        async def recorded() -> bool:
            return len((await read_stores(inner)).stream[0]) > 0

        await wait_until(lambda: pinger.calls == [1])
        await wait_until(recorded)
        # The owner "dies": no stream record lands from now on, no marker either.
        provider.plan.fail(BEFORE, ops={"append"}, names=_stream)
        tg.cancel_scope.cancel()
    async with running(MemoryProvider(inner.silo), config, partition_count=1):
        await anyio.sleep(0.5)
    assert pinger.calls == [1], "a committed command was read from the inbox and handled again"


async def test_a_copy_of_a_command_being_committed_waits_for_it_even_after_a_rebuild(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first copy of X records nothing and waits for the stream; Y's
    # failure drops the cached instance, whose rebuild cannot know X's ID.
    # A second copy (the caller's retry) was handled again: its event went
    # into the cached root but never into the stream, the materialiser
    # stalled on it while the watermark claimed everything, and a new owner
    # rebuilt the instance without later committed events.
    from runkit.engine.streams import writer as writer_module

    monkeypatch.setattr(writer_module, "backoff", lambda *a: 0.05)
    s = setup()
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    provider = FaultyProvider(inner)
    engine, ownership = one_partition_engine(
        s.config, provider, retry_max_delay=0.01, materialise_delay=0.0, shutdown_timeout=1.0
    )
    s.accounts.nothing.add("x")  # first handling of X records nothing
    s.accounts.fail["y"] = 1  # Y fails once: the instance is dropped and rebuilt
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        ownership.assign({partition_id(APP_KEY, 0)})
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        executor = engine.executor_for(s.app)
        await executor.execute_command(Deposit("a", 1, "first"))  # instance cached
        # The stream store is out for a moment: X's append is retried.
        provider.plan.fail(BEFORE, ops={"append"}, names=lambda n: "/stream/" in n)
        tg.start_soon(lambda: executor.execute_command(Deposit("a", 1, "x"), idempotency_key="k"))
        await wait_until(lambda: any(ref == "x" for _, ref, _ in s.accounts.calls))
        tg.start_soon(lambda: executor.execute_command(Deposit("a", 1, "y")))
        await wait_until(lambda: s.accounts.attempts.get("y", 0) >= 1)
        # X is retried by its caller (same idempotency key) while still in flight.
        s.accounts.nothing.discard("x")  # e.g. the handler's decision depends on state
        tg.start_soon(lambda: executor.execute_command(Deposit("a", 1, "x"), idempotency_key="k"))
        await wait_until(lambda: any(ref == "y" for _, ref, _ in s.accounts.calls))
        await anyio.sleep(0.05)
        provider.plan.clear()
        part = runtime.partitions[0]
        await wait_until(lambda: part._writer.backlog == 0)
        await executor.execute_command(Deposit("a", 1, "z"))
        await executor.execute_command(Deposit("b", 1, "other"))  # a later header
        await anyio.sleep(0.2)
        mat = part._materialiser
        stuck = [r for _, r in mat._queue if not r.durable]
        watermark = mat.watermark(part._writer.next_position)
        next_position = part._writer.next_position
        tg.cancel_scope.cancel()

    x_handlings = [c for c in s.accounts.calls if c[1] == "x"]
    z_seen = next(b for _, ref, b in s.accounts.calls if ref == "z")
    stores = await read_stores(inner)
    deposits = [e for e in stores.all_events() if e.source_instance == "a"]
    problems = []
    if len(x_handlings) > 1:
        problems.append(f"X handled {len(x_handlings)} times: {x_handlings}")
    if z_seen != len(deposits) - 1:
        problems.append(
            f"Z saw balance {z_seen}, but only {len(deposits) - 1} deposits precede it "
            "in the stream (a phantom event was applied to the cached root)"
        )
    if stuck:
        problems.append(
            f"{len(stuck)} materialiser record(s) never durable; watermark {watermark} "
            f"== next position {next_position} claims everything"
        )
    journal = [c.command_id for c in stores.instances["a"] if c.events]
    stream = [e.causation_id for e in deposits]
    if journal != stream:
        problems.append(
            f"after a graceful stop the instance journal of 'a' holds {len(journal)} of its "
            f"{len(stream)} commands, yet the last header says materialised="
            f"{stores.stream[0][-1].materialised} of {len(stores.stream[0])} records"
        )
    # A new owner trusts the watermark.
    async with running(MemoryProvider(inner.silo), s.config, partition_count=1) as engine2:
        await engine2.executor_for(s.app).execute_command(Deposit("a", 1, "w"))
        await wait_until(lambda: s.accounts.calls[-1][1] == "w")
        refs2 = cached_refs(await engine2.runtime(APP_KEY), s.config, "a")
    if "z" not in refs2:
        problems.append(f"the next owner rebuilt 'a' without Z's committed event: {refs2}")
    assert not problems, "\n".join(problems)


async def test_an_inbox_append_survives_a_failed_read_after_a_conflict() -> None:
    # Another gateway's record took the position (normal on the fallback path);
    # reading it to tell whether it is our own earlier attempt fails once. That
    # read is retried like an append, not raised to the caller.
    from runkit.persistence import Journal, PersistenceError

    class FlakyGets(Journal):
        def __init__(self, inner: Journal) -> None:
            self.inner = inner
            self.failed = False

        @property
        def name(self) -> str:
            return self.inner.name

        async def close(self) -> None:
            await self.inner.close()

        async def bounds(self) -> Any:
            return await self.inner.bounds()

        async def get(self, pos: int) -> bytes:
            if not self.failed:
                self.failed = True
                raise PersistenceError("read timed out", retryable=True)
            return await self.inner.get(pos)

        def range(self, pos: int) -> Any:
            return self.inner.range(pos)

        async def append(self, pos: int, record: bytes) -> None:
            await self.inner.append(pos, record)

        async def truncate(self, pos: int) -> None:
            await self.inner.truncate(pos)

    register_types(setup().config.message_types())
    envelope = new_envelope(Notify(1), app_key=APP_KEY, site_key=None, created_at=datetime.now(UTC))
    entry = InboxEntry(envelope=envelope, handler_key=NOTIFIER_KEY)
    provider = MemoryProvider(f"edges-{uuid.uuid4()}")
    async with await provider.journals.open(inbox_name(APP_KEY, 0)) as inner:
        await inner.append(0, b"another gateway's record")
        flaky = FlakyGets(inner)
        assert await append_to_inbox(flaky, [entry], position=0) == 1
        assert flaky.failed


# -- commands that recorded no events are remembered by their instance -------------


async def _retry_x_on_a_new_engine(silo_name: str | None, s: Any) -> None:
    """Start a fresh engine on the store and retry X (same idempotency key)."""
    s.accounts.nothing.discard("x")  # handled again, X would now record an event
    async with running(MemoryProvider(silo_name), s.config, partition_count=1) as engine:
        executor = engine.executor_for(s.app)
        with anyio.fail_after(10):
            await executor.execute_command(Deposit("a", 1, "x"), idempotency_key="k")
            await executor.execute_command(Deposit("a", 1, "last"))
        await wait_until(lambda: s.accounts.calls[-1][1] == "last")


async def test_a_command_that_recorded_nothing_is_not_handled_again_after_a_restart() -> None:
    # X recorded no events: only the stream record committing it named its ID,
    # and a restarted owner rebuilt the instance from its journal, which held
    # only commands with events, and learned from the stream tail only the IDs
    # of the last records. The caller's retry of X was handled a second time,
    # on a root that had changed meanwhile.
    s = setup()
    provider = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    s.accounts.nothing.add("x")
    async with running(provider, s.config, partition_count=1, materialise_delay=0.0) as engine:
        executor = engine.executor_for(s.app)
        await executor.execute_command(Deposit("a", 1, "x"), idempotency_key="k")
        for i in range(3):  # later records, so the tail's last record does not name X
            await executor.execute_command(Deposit("a", 1, f"after{i}"))
            await executor.execute_command(Deposit("b", 1, f"other{i}"))
    await _retry_x_on_a_new_engine(provider.silo, s)
    x_handlings = [c for c in s.accounts.calls if c[1] == "x"]
    assert len(x_handlings) == 1, f"X handled {len(x_handlings)} times"
    stores = await settled(provider)
    check_invariants(stores)
    assert "x" not in [getattr(e, "ref", None) for e in s.accounts.events]


async def test_a_command_that_recorded_nothing_is_known_to_an_owner_that_recovers_it() -> None:
    # The same when the instance journal was never written (the materialiser
    # lagged, then the node stopped): the next owner learns X's instance from
    # the stream record above the materialised watermark.
    s = setup()
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    provider = FaultyProvider(inner)
    engine, ownership = one_partition_engine(
        s.config, provider, retry_max_delay=0.01, materialise_delay=0.0, shutdown_timeout=0.5
    )
    s.accounts.nothing.add("x")
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        ownership.assign({partition_id(APP_KEY, 0)})
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        executor = engine.executor_for(s.app)
        # No instance journal can be written from now on.
        provider.plan.fail(BEFORE, ops={"append"}, names=lambda n: "/aggregate/" in n)
        await executor.execute_command(Deposit("a", 1, "x"), idempotency_key="k")
        for i in range(3):
            await executor.execute_command(Deposit("a", 1, f"after{i}"))
            await executor.execute_command(Deposit("b", 1, f"other{i}"))
        tg.cancel_scope.cancel()
    stores = await read_stores(inner)
    assert not stores.instances.get("a"), "the instance journal was written after all"
    assert any(r.event_less for r in stores.stream[0]), "no stream record names X's instance"
    await _retry_x_on_a_new_engine(inner.silo, s)
    x_handlings = [c for c in s.accounts.calls if c[1] == "x"]
    assert len(x_handlings) == 1, f"X handled {len(x_handlings)} times"
    check_invariants(await settled(inner))


# -- a poisoned inbox command is done for every later owner -------------------------


async def test_a_poisoned_inbox_command_is_not_handled_again_by_the_next_owner() -> None:
    # Poisoning finished the command in memory only: no stream record listed
    # it, and until a record said the inbox was processed past it (a while
    # later, or never if the owner stopped first) the next owner read it from
    # the inbox and handled it again, although it was in the poison store.
    s = setup()
    s.notifier.fail[1] = 1  # fails once, then would succeed
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    provider = FaultyProvider(inner)
    engine, ownership = one_partition_engine(
        s.config, provider, max_attempts=1, progress_interval=30.0, shutdown_timeout=0.2
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        executor = engine.executor_for(s.app)
        await engine.runtime(APP_KEY)
        await executor.execute_command(Notify(1))  # an integration command: to the inbox
        ownership.assign({partition_id(APP_KEY, 0)})

        async def poisoned() -> bool:
            return len((await read_stores(inner)).poison) == 1

        await wait_until(poisoned)
        await anyio.sleep(0.05)
        # The owner stops abruptly: no stream record lands from now on.
        provider.plan.fail(BEFORE, ops={"append"}, names=_stream)
        tg.cancel_scope.cancel()
    async with running(MemoryProvider(inner.silo), s.config, partition_count=1) as engine2:
        await engine2.executor_for(s.app).execute_command(Notify(2))
        await wait_until(lambda: 2 in s.notifier.calls)
    # Its one (failed) attempt, then the next command.
    assert s.notifier.calls == [1, 2], "a poisoned command was handled again by the next owner"


async def test_a_poisoned_aggregate_command_stays_before_the_later_commands_of_its_instance() -> (
    None
):
    # Inbox: Notify(0) (slow: it holds the processed position back), Deposit x
    # (poisoned at its first failure), Deposit y (same account, committed).
    # The owner stops without a further record. The next owner handled x again,
    # after y.
    s = setup()
    s.notifier.release = anyio.Event()
    s.accounts.fail["x"] = 1
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    provider = FaultyProvider(inner)
    engine, ownership = one_partition_engine(
        s.config, provider, max_attempts=1, progress_interval=30.0, shutdown_timeout=0.2
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        executor = engine.executor_for(s.app)
        await engine.runtime(APP_KEY)
        await executor.execute_command(Notify(0))
        await executor.execute_command(Deposit("acc", 1, "x"))
        await executor.execute_command(Deposit("acc", 1, "y"))
        ownership.assign({partition_id(APP_KEY, 0)})

        async def y_committed() -> bool:
            st = await read_stores(inner)
            return len(st.poison) == 1 and sum(len(r.events) for r in st.stream[0]) == 1

        await wait_until(y_committed)
        provider.plan.fail(BEFORE, ops={"append"}, names=_stream)
        tg.cancel_scope.cancel()
    s.notifier.release.set()
    async with running(MemoryProvider(inner.silo), s.config, partition_count=1):
        await wait_until(lambda: 0 in s.notifier.calls)
        await anyio.sleep(0.2)
    assert [ref for _, ref, _ in s.accounts.calls] == ["y"], (
        "a poisoned aggregate command was handled again, after a later command of its instance"
    )


async def test_a_requeued_poisoned_command_is_handled_by_the_next_owner() -> None:
    # The note names the poisoned inbox entry, not the command ID: a copy the
    # operator requeues is a later entry, handled like any other.
    from runkit.engine.commands.poison import requeue

    s = setup()
    s.notifier.fail[1] = 1
    provider = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    async with running(provider, s.config, partition_count=1, max_attempts=1) as engine:
        await engine.executor_for(s.app).execute_command(Notify(1))

        async def poisoned() -> bool:
            return len((await read_stores(provider)).poison) == 1

        await wait_until(poisoned)
    [command_id] = (await read_stores(provider)).poison
    assert await requeue(provider, APP_KEY, 1, command_id)
    async with running(MemoryProvider(provider.silo), s.config, partition_count=1):
        await wait_until(lambda: s.notifier.calls == [1, 1])  # the failed attempt, the requeued
        stores = await settled(provider)
    check_invariants(stores)


# -- a spill's outcome is always known ----------------------------------------------


def _inbox(name: str) -> bool:
    return "/inbox/" in name


async def test_a_spill_whose_answer_was_lost_is_not_handled_again_by_the_next_owner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A failed command's spill to the inbox landed, but its answer was lost and
    # the next attempts failed until the inbox writer gave up: nobody knew where
    # the copy was. The command, retried, committed in a record whose inbox_end
    # did not cover the copy, and the next owner read it as new work.
    from runkit.engine.commands import batches

    monkeypatch.setattr(batches, "INBOX_POLL_INTERVAL", 60.0)  # O1 does not read the copy back
    s = setup()
    s.notifier.fail[1] = 1  # fails once: spilled, then retried and committed
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    provider = FaultyProvider(inner)
    engine, ownership = one_partition_engine(s.config, provider, retry_max_delay=0.01)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        ownership.assign({partition_id(APP_KEY, 0)})
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        # The spill's first inbox append lands but its answer is lost; the
        # next four attempts fail before writing (the writer used to give up).
        provider.plan.fail(AFTER, ops={"append"}, names=_inbox, nth=1)
        provider.plan.fail(BEFORE, ops={"append"}, names=_inbox, times=4)
        await execute_in_batch(engine, Notify(1))

        async def committed() -> bool:
            st = await read_stores(inner)
            return any(r.command_ids for r in st.stream[0])

        await wait_until(committed)
        await execute_in_batch(engine, Notify(2))  # a later record of the same owner
        tg.cancel_scope.cancel()
    stores = await read_stores(inner)
    assert stores.inbox[0], "the spill did not land"
    assert s.notifier.calls == [1, 1, 2]
    async with running(MemoryProvider(inner.silo), s.config, partition_count=1):
        await anyio.sleep(0.5)
    assert s.notifier.calls.count(1) == 2, f"Notify(1) handled again: {s.notifier.calls}"


async def test_a_spill_whose_answer_was_lost_is_not_handled_after_its_command_is_poisoned() -> None:
    # The same on one owner: the command was poisoned (no note: its spill's
    # position unknown), then the owner read the landed copy and handled it.
    s = setup()
    s.accounts.fail["x"] = 2  # two failures: poisoned at max_attempts=2
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    provider = FaultyProvider(inner)
    engine, ownership = one_partition_engine(
        s.config, provider, retry_max_delay=0.01, max_attempts=2
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        ownership.assign({partition_id(APP_KEY, 0)})
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        provider.plan.fail(AFTER, ops={"append"}, names=_inbox, nth=1)
        provider.plan.fail(BEFORE, ops={"append"}, names=_inbox, times=1)
        with contextlib.suppress(Exception):
            await execute_in_batch(engine, Deposit("a", 1, "x"))

        async def poisoned() -> bool:
            return len((await read_stores(inner)).poison) == 1

        await wait_until(poisoned)
        await anyio.sleep(1.5)  # the poll reads the landed copy
        tg.cancel_scope.cancel()
    stores = await read_stores(inner)
    committed = {c for r in stores.stream[0] for c in r.command_ids}
    assert not (committed & set(stores.poison)), "a poisoned command was committed too"
    assert s.accounts.attempts["x"] == 2, f"x handled {s.accounts.attempts['x']} times"


async def test_a_gateways_copy_of_a_poisoned_offered_command_is_not_handled_again() -> None:
    # The owner poisoned an offered command at once (never spilled, so no inbox
    # entry to note), while the gateway, its offer unanswered, spilled a copy
    # marked with the offer time: that copy was handled as new work.
    s = setup()
    s.accounts.fail["x"] = 1  # fails once; max_attempts=1: poisoned at once, never spilled
    provider = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    engine, ownership = one_partition_engine(s.config, provider, max_attempts=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        ownership.assign({partition_id(APP_KEY, 0)})
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        # The owner takes the offered command and poisons it; the gateway's
        # offer went unanswered: it spills its copy marked with the offer time.
        entry, offered_at = await _take_offer(runtime, Deposit("a", 1, "x"))
        await _spill_gateway_copy(runtime, provider, entry, offered_at)
        await anyio.sleep(0.5)
        tg.cancel_scope.cancel()
    stores = await read_stores(provider)
    assert list(stores.poison) == [entry.envelope.message_id]
    assert s.accounts.attempts["x"] == 1, f"x handled {s.accounts.attempts['x']} times"


@pytest.mark.parametrize("later", [3, 0], ids=["forgotten", "remembered"])
async def test_a_late_copy_of_an_offered_command_this_owner_forgot_is_not_handled_again(
    monkeypatch: pytest.MonkeyPatch, later: int
) -> None:
    # The owner committed an offered command, but its answer was lost: the
    # gateway spilled a copy marked with the offer time. The owner read that
    # copy only after more completions than it remembers (an inbox backlog
    # ahead of the copy, say; the caches are cut to 3 here), and the earlier
    # owners' records were all it looked through: handled twice.
    from runkit.engine.commands import aggregates, batches

    monkeypatch.setattr(batches, "COMPLETED_CACHE", 3)
    monkeypatch.setattr(aggregates, "RECENT_COMMANDS", 3)
    s = setup()
    provider = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    engine, ownership = one_partition_engine(s.config, provider)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        ownership.assign({partition_id(APP_KEY, 0)})
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        entry, offered_at = await _take_offer(runtime, Deposit("acc", 1, "offered"))
        for i in range(later):
            await execute_in_batch(engine, Deposit("acc", 1, f"later-{i}"))
        await _spill_gateway_copy(runtime, provider, entry, offered_at)
        await anyio.sleep(0.5)
        tg.cancel_scope.cancel()
    refs = [ref for _, ref, _ in s.accounts.calls]
    assert refs.count("offered") == 1, f"handled {refs.count('offered')} times: {refs}"
    check_invariants(await read_stores(provider), expect_all_done=False)


@pytest.mark.parametrize("gateway_copy", [False, True], ids=["alone", "with-a-gateway-copy"])
async def test_a_poisoned_local_command_is_not_handled_again_from_its_spill(
    monkeypatch: pytest.MonkeyPatch, gateway_copy: bool
) -> None:
    # Inbox reading lags (the partition holds its most inbox commands, two
    # slow ones, with the limit cut to 2). A local command fails, is spilled,
    # fails again and is poisoned; a gateway's fallback copy of it (its offer
    # unanswered) sits in the inbox before the spill. When reading resumed, the
    # gateway's copy was taken for the spill, and the spill itself was then
    # read as new work: the poisoned command was handled again.
    from runkit.engine.commands import batches

    monkeypatch.setattr(batches, "MAX_PENDING_COMMANDS", 2)
    s = setup()
    register_types(s.config.message_types())
    s.accounts.fail["x"] = 100  # fails every time: poisoned after max_attempts
    s.notifier.release = anyio.Event()
    provider = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    engine, ownership = one_partition_engine(s.config, provider, max_attempts=2)
    x = new_envelope(
        Deposit("a", 1, "x"), app_key=APP_KEY, site_key=None, created_at=datetime.now(UTC)
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        ownership.assign({partition_id(APP_KEY, 0)})
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        commands = runtime.partitions[0]
        for n in (1, 2):
            notify = new_envelope(
                Notify(n), app_key=APP_KEY, site_key=None, created_at=datetime.now(UTC)
            )
            await runtime.acceptor.accept([runtime.acceptor.route(notify, keyed=False)])
        await wait_until(lambda: commands._full)
        _, entry = runtime.acceptor.route(x, keyed=True)
        if gateway_copy:
            copy = msgspec.structs.replace(entry, offered_at=datetime.now(UTC))
            async with await provider.journals.open(inbox_name(APP_KEY, 0)) as inbox:
                await append_to_inbox(inbox, [copy])
        with anyio.fail_after(10):
            await runtime.acceptor.accept([(0, entry)])  # returns once spilled
        await wait_until(lambda: x.message_id in commands._poisoned_ids)
        await anyio.sleep(0.2)  # the poison note commits
        assert s.accounts.attempts["x"] == 2
        s.notifier.release.set()  # reading resumes
        await anyio.sleep(1.0)
        tg.cancel_scope.cancel()
    assert s.accounts.attempts["x"] == 2, "the poisoned command was handled again"


@pytest.mark.parametrize("failures", [100, 3], ids=["always-fails", "copy-succeeds"])
async def test_a_gateways_copy_read_before_its_command_is_poisoned_is_not_handled_after(
    failures: int,
) -> None:
    # The owner takes an offered command; its handler fails, so it is spilled
    # (the offer is answered "durable") and retried. The answer is lost: the
    # gateway spills its own copy, marked with the offer time, which the owner
    # reads while the command waits for its retry, so nothing recognises it
    # yet. It waited behind the parked instance and was handled once the
    # poisoning (max_attempts=3) unparked it: the poisoned command ran again.
    s = setup()
    s.accounts.fail["x"] = failures
    provider = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    engine, ownership = one_partition_engine(
        s.config, provider, max_attempts=3, retry_base_delay=0.4, retry_max_delay=0.4
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        ownership.assign({partition_id(APP_KEY, 0)})
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        entry, offered_at = await _take_offer(runtime, Deposit("a", 1, "x"))
        assert s.accounts.attempts["x"] == 1
        await _spill_gateway_copy(runtime, provider, entry, offered_at)
        await wait_until(lambda: entry.envelope.message_id in runtime.partitions[0]._poisoned_ids)
        await anyio.sleep(1.5)
        tg.cancel_scope.cancel()
    stores = await read_stores(provider)
    assert list(stores.poison) == [entry.envelope.message_id]
    committed = {c for r in stores.stream[0] for c in r.command_ids}
    assert not (committed & set(stores.poison)), "a poisoned command was committed too"
    assert s.accounts.attempts["x"] == 3, f"x handled {s.accounts.attempts['x']} times"


async def _take_offer(runtime: Any, command: Any) -> tuple[InboxEntry, datetime]:
    """The owner takes *command* as offered (as ``execute_when_room`` does): its
    entry, once durable or settled, and the time of the offer."""
    offered_at = datetime.now(UTC)
    envelope = new_envelope(command, app_key=APP_KEY, site_key=None, created_at=offered_at)
    index, entry = runtime.acceptor.route(envelope, keyed=False)
    await runtime.partitions[index].execute_local([entry])
    return entry, offered_at


async def _spill_gateway_copy(
    runtime: Any, provider: MemoryProvider, entry: InboxEntry, offered_at: datetime
) -> None:
    """The gateway's offer went unanswered: its copy, marked with the offer time,
    goes to partition 0's inbox, and the owner is told."""
    async with await provider.journals.open(inbox_name(APP_KEY, 0)) as inbox:
        await append_to_inbox(inbox, [msgspec.structs.replace(entry, offered_at=offered_at)])
    runtime.partitions[0].poke()


async def test_a_wake_up_that_comes_while_the_partition_starts_is_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A peer appends to the inbox and wakes the owner after the owner's
    # catch-up read the inbox but before the partition was registered: the
    # wake-up found no partition and was dropped, and the command waited for
    # the inbox poll (an hour here).
    from runkit.engine.commands import batches

    monkeypatch.setattr(batches, "INBOX_POLL_INTERVAL", 3600.0)
    s = setup()
    register_types(s.config.message_types())
    provider = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    engine, ownership = one_partition_engine(s.config, provider)
    catch_up = batches.PartitionCommands._catch_up
    first = True

    async def caught_up(self: Any) -> None:
        nonlocal first
        await catch_up(self)
        if first:
            first = False
            envelope = new_envelope(
                Deposit("a", 1, "early"),
                app_key=APP_KEY,
                site_key=None,
                created_at=datetime.now(UTC),
            )
            _, entry = runtime.acceptor.route(envelope, keyed=False)
            async with await provider.journals.open(inbox_name(APP_KEY, 0)) as inbox:
                await append_to_inbox(inbox, [entry])
            runtime.wake_local(0, "inbox")  # no partition registered yet

    monkeypatch.setattr(batches.PartitionCommands, "_catch_up", caught_up)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        runtime = await engine.runtime(APP_KEY)
        ownership.assign({partition_id(APP_KEY, 0)})
        await wait_until(lambda: [c[1] for c in s.accounts.calls] == ["early"], timeout=5)
        tg.cancel_scope.cancel()


def test_completed_commands_tell_whether_one_added_since_a_time_was_forgotten() -> None:
    from runkit.engine.commands.pending import CompletedCommands

    before = datetime.now(UTC)
    completed = CompletedCommands(2)
    completed.add("a")
    completed.add("b")
    assert not completed.forgot_since(before)
    completed.add("c")  # forgets "a", added after *before*
    assert completed.forgot_since(before)
    assert not completed.forgot_since(datetime.now(UTC) + timedelta(seconds=1))


# -- observers of a repeated command get its events, wherever it was committed --------


def test_a_records_command_locations() -> None:
    register_types(setup().config.message_types())
    env = new_envelope(
        Deposit("a", 1), app_key=APP_KEY, site_key=None, created_at=datetime.now(UTC)
    )
    events = [
        msgspec.structs.replace(env, message_id=f"e{i}", causation_id=c)
        for i, c in enumerate(["c1", "c1", "c3"])
    ]
    record = StreamRecord(
        first_offset=10,
        inbox_position=0,
        inbox_end=0,
        written_at=datetime.now(UTC),
        writer="w",
        command_ids=("c0", "c1", "c2", "c3", "c4"),
        events=tuple(events),
    )
    assert command_locations(record) == {
        "c0": (10, 0),
        "c1": (10, 2),
        "c2": (12, 0),
        "c3": (12, 1),
        "c4": (13, 0),
    }


async def test_observers_of_a_command_whose_offer_answer_was_lost_get_its_events() -> None:
    # The owner committed an offered command, its answer was lost, and it went
    # on committing before it stopped; the gateway spilled its copy marked with
    # the offer time. The next owner knew the command was committed (prior
    # commits, the takeover scan) but not where its events were, beyond the
    # last 256 it republishes at takeover: observers got an inconclusive note
    # and waited until their timeout.
    import math

    from runkit.engine.streams import CommandDone

    s = setup()
    inner = MemoryProvider(f"commit-edges-{uuid.uuid4()}")
    a, a_owns = one_partition_engine(s.config, inner, shutdown_timeout=0.2)
    offered_at = datetime.now(UTC)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run)
        a_owns.assign({partition_id(APP_KEY, 0)})
        runtime = await a.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        env = new_envelope(
            Deposit("acc", 1, "x"), app_key=APP_KEY, site_key=None, created_at=offered_at
        )
        _, entry = runtime.acceptor.route(env, keyed=False)
        await runtime.partitions[0].execute_local([entry])  # the offer, committed; answer lost
        for i in range(300):  # the owner keeps committing before it goes
            await execute_in_batch(a, Deposit(f"o{i}", 1, f"o{i}"))
        a_owns.assign(set())
        await wait_until(lambda: 0 not in runtime.partitions)
        tg.cancel_scope.cancel()
    # the gateway's fallback for the unanswered offer
    async with await inner.journals.open(inbox_name(APP_KEY, 0)) as inbox:
        await append_to_inbox(inbox, [msgspec.structs.replace(entry, offered_at=offered_at)])
    async with running(MemoryProvider(inner.silo), s.config, partition_count=1) as b:
        send, receive = anyio.create_memory_object_stream[object](math.inf)
        got: list[object] = []
        with send, receive, b.bus.attached(env.correlation_id, send, replay=True):
            with anyio.move_on_after(5):
                async for item in receive:
                    got.append(item)
                    if not isinstance(item, CommandDone) or item.conclusive:
                        break
    refs = [ref for _, ref, _ in s.accounts.calls]
    assert refs.count("x") == 1
    notes = [g for g in got if isinstance(g, CommandDone)]
    events = [g for g in got if not isinstance(g, CommandDone)]
    assert events or any(n.conclusive for n in notes), (
        f"observer gets no event and no conclusive note: {notes}"
    )
