"""The commands side end to end on the memory driver: acceptance, aggregates, streams."""

from __future__ import annotations

import logging
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import attrs
import msgspec
import pytest

import dogma
from runkit import ConfigurationError
from runkit.engine.commands.inbox import EngineStopped
from runkit.engine.engine import Engine
from runkit.engine.partitions import partition_id
from runkit.engine.settings import EngineSettings
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import (
    APP_KEY,
    REGISTRY,
    Deposit,
    Deposited,
    Notify,
    check_invariants,
    read_stores,
    running,
    settled,
    setup,
    wait_until,
)


def silo() -> MemoryProvider:
    return MemoryProvider(f"engine-{uuid.uuid4()}")


async def test_aggregate_command_is_handled_and_published() -> None:
    s = setup()
    provider = silo()
    async with running(provider, s.config) as engine:
        executor = engine.executor_for(s.app)
        await executor.execute_command(Deposit("acc-1", 10, "r1"))
        await executor.execute_command(Deposit("acc-1", 5, "r2"))
        await wait_until(lambda: len(s.accounts.calls) == 2)
        await settled(provider)
    assert s.accounts.calls == [("acc-1", "r1", 0), ("acc-1", "r2", 10)]
    stores = await read_stores(provider)
    check_invariants(stores)
    events = stores.all_events()
    assert [e.description for e in events] == ["Deposited", "Deposited"]
    # All of one instance's events are on its partition's stream, in order.
    [(p, _, _, first), (p2, _, _, second)] = stores.published()
    assert p == p2
    assert (first, second) == (0, 1)


async def test_acceptance_is_durable_before_return() -> None:
    s = setup()
    provider = silo()
    # An engine whose partitions never run: acceptance only.
    from runkit.engine.cluster.ownership import StaticOwnership

    engine = Engine.from_settings(
        EngineSettings(applications=(s.config,), persistence_provider=provider, partition_count=4)
    )
    engine.use_ownership(StaticOwnership())
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await engine.executor_for(s.app).execute_command(Deposit("acc-1", 7, "r1"))
        tg.cancel_scope.cancel()
    assert s.accounts.calls == []
    # A new engine on the same store handles it.
    async with running(MemoryProvider(provider.silo), s.config):
        await wait_until(lambda: len(s.accounts.calls) == 1)
        await settled(provider)
    assert s.accounts.calls == [("acc-1", "r1", 0)]


async def test_group_commit_batches_concurrent_commands() -> None:
    s = setup()
    provider = silo()
    async with running(provider, s.config, partition_count=1) as engine:
        executor = engine.executor_for(s.app)
        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(executor.execute_command, Deposit(f"acc-{i % 10}", 1, f"r{i}"))
        await wait_until(lambda: len(s.accounts.calls) == 100)
        records = (await settled(provider)).inbox[0]
    assert sum(len(r.entries) for _, r in records) == 100
    assert len(records) < 100 / 4


async def test_instance_commands_are_serialised_and_see_earlier_events() -> None:
    s = setup()
    provider = silo()
    async with running(provider, s.config) as engine:
        executor = engine.executor_for(s.app)
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(executor.execute_command, Deposit("hot", 1, f"r{i}"))
        await wait_until(lambda: len(s.accounts.calls) == 20)
        await settled(provider)
    assert sorted(balance for _, _, balance in s.accounts.calls) == list(range(20))
    check_invariants(await read_stores(provider))


async def test_failing_instance_does_not_block_others() -> None:
    s = setup()
    s.accounts.fail["stuck"] = 3
    provider = silo()
    async with running(
        provider, s.config, partition_count=1, retry_base_delay=0.2, retry_max_delay=0.2
    ) as engine:
        executor = engine.executor_for(s.app)
        await executor.execute_command(Deposit("slow", 1, "stuck"))
        for i in range(5):
            await executor.execute_command(Deposit(f"other-{i}", 1, f"o{i}"))
        await wait_until(lambda: len(s.accounts.calls) == 5)
        assert ("slow", "stuck", 0) not in s.accounts.calls
        await wait_until(lambda: len(s.accounts.calls) == 6)
        await settled(provider)
    assert s.accounts.attempts["stuck"] == 4
    check_invariants(await read_stores(provider))


@pytest.mark.parametrize("snapshots", [True, False])
async def test_snapshots_and_replay_rebuild_the_same_state(snapshots: bool) -> None:
    s = setup(snapshots=snapshots)
    provider = silo()
    async with running(provider, s.config, snapshot_every=3) as engine:
        executor = engine.executor_for(s.app)
        for i in range(10):
            await executor.execute_command(Deposit("acc", i + 1, f"a{i}"))
        await wait_until(lambda: len(s.accounts.calls) == 10)
        await settled(provider)
    async with await provider.keyspaces.open(
        f"{APP_KEY}/snapshot/c0000000-0000-4000-8000-000000000002"
    ) as ks:
        has_snapshot = await ks.has(b"acc")
    assert has_snapshot is snapshots
    # A new engine (cold cache) rebuilds the root from snapshot + tail, or replay.
    async with running(MemoryProvider(provider.silo), s.config) as engine:
        await engine.executor_for(s.app).execute_command(Deposit("acc", 100, "last"))
        await wait_until(lambda: len(s.accounts.calls) == 11)
        await settled(provider)
    assert s.accounts.calls[-1] == ("acc", "last", 55)
    check_invariants(await read_stores(provider))


async def test_idempotency_key_takes_effect_once_even_across_restarts() -> None:
    s = setup()
    provider = silo()
    async with running(provider, s.config) as engine:
        executor = engine.executor_for(s.app)
        await executor.execute_command(Deposit("acc", 1, "k"), idempotency_key="key-1")
        await executor.execute_command(Deposit("acc", 1, "k"), idempotency_key="key-1")
        await executor.execute_command(Deposit("acc", 1, "k2"), idempotency_key="key-2")
        await wait_until(lambda: len(s.accounts.calls) == 2)
        await settled(provider)
    async with running(MemoryProvider(provider.silo), s.config) as engine:
        await engine.executor_for(s.app).execute_command(
            Deposit("acc", 1, "k"), idempotency_key="key-1"
        )
        await engine.executor_for(s.app).execute_command(Deposit("acc", 1, "k3"))
        await wait_until(lambda: len(s.accounts.calls) == 3)
        await settled(provider)
    assert [ref for _, ref, _ in s.accounts.calls] == ["k", "k2", "k3"]
    stores = await read_stores(provider)
    check_invariants(stores)
    key_1 = str(uuid.uuid5(uuid.UUID(APP_KEY), "key-1"))
    assert len(stores.events_of(key_1)) == 1


async def test_integration_events_kept_only_on_success() -> None:
    s = setup()
    s.notifier.fail_after_record[1] = 2
    provider = silo()
    async with running(provider, s.config) as engine:
        await engine.executor_for(s.app).execute_command(Notify(1))
        await wait_until(lambda: len(s.notifier.calls) == 3)
        stores = await settled(provider)
    check_invariants(stores)
    assert [e.description for e in stores.all_events()] == ["Notified"]


async def test_minimize_integration_runs_one_at_a_time() -> None:
    from engine_commands_harness import Serial

    s = setup()
    s.serial.delay = 0.005
    s.notifier.delay = 0.02
    provider = silo()
    async with running(provider, s.config) as engine:
        executor = engine.executor_for(s.app)
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(executor.execute_command, Serial(i))
                tg.start_soon(executor.execute_command, Notify(i))
        await wait_until(lambda: len(s.serial.calls) == 10 and len(s.notifier.calls) == 10)
        await settled(provider)
    assert s.serial.max_active == 1
    assert s.notifier.max_active > 1  # MAXIMIZE really runs concurrently
    check_invariants(await read_stores(provider))


async def test_an_integration_command_is_owned_before_its_handler_runs() -> None:
    # api.md §2.7: execute_command returns once the engine has durably taken
    # ownership of the command. An integration command used to be durable
    # only once its handle_command had returned: a handler that waits for
    # what its caller does next deadlocked (ADR 0011).
    s = setup()
    s.notifier.release = anyio.Event()
    provider = silo()
    async with running(provider, s.config, partition_count=1) as engine:
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)  # this node owns it
        with anyio.fail_after(5):
            await engine.executor_for(s.app).execute_command(Notify(1))
        stores = await read_stores(provider)
        assert [e.envelope.description for _, r in stores.inbox[0] for e in r.entries]
        s.notifier.release.set()
        await wait_until(lambda: bool(s.notifier.calls) and not s.notifier.active)
        stores = await settled(provider)
    assert s.notifier.calls == [1]
    check_invariants(stores)
    assert [e.description for e in stores.all_events()] == ["Notified"]


async def test_a_keyed_integration_command_executed_twice_before_it_runs_is_handled_once() -> None:
    from engine_commands_harness import REGISTRY, Notified

    from runkit.engine.commands.acceptance import command_id_for, idempotency_name

    s = setup()
    s.notifier.release = anyio.Event()
    provider = silo()
    seen: list[Notified] = []

    async def saw(event: Notified) -> bool:
        seen.append(event)
        return True

    async with running(provider, s.config, partition_count=1) as engine:
        executor = engine.executor_for(s.app)
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)  # this node owns it
        with anyio.fail_after(5):
            await executor.execute_command(Notify(1, "k"), idempotency_key="key")
            await executor.execute_command(Notify(1, "k"), idempotency_key="key")
        s.notifier.release.set()
        # A third time, observed once it is handled: the original event.
        await wait_until(lambda: bool(s.notifier.calls) and not s.notifier.active)
        with anyio.fail_after(5):
            await executor.execute_command(
                Notify(1, "k"),
                idempotency_key="key",
                observers=[dogma.observe(Notified, saw, registry=REGISTRY)],
            )
        command_id = command_id_for(APP_KEY, "key")
        async with await provider.keyspaces.open(idempotency_name(APP_KEY)) as markers:
            await wait_until(lambda: markers.has(command_id.encode()))
    # Restarted, the same key again finds the marker.
    async with running(MemoryProvider(provider.silo), s.config, partition_count=1) as engine:
        await engine.executor_for(s.app).execute_command(Notify(1, "k"), idempotency_key="key")
        await engine.executor_for(s.app).execute_command(Notify(2))
        await wait_until(lambda: 2 in s.notifier.calls)
        stores = await settled(provider)
    assert s.notifier.calls == [1, 2]
    assert [(e.n, e.ref) for e in seen] == [(1, "k")]
    check_invariants(stores)
    assert [e.description for e in stores.events_of(command_id)] == ["Notified"]


async def test_stream_offsets_are_dense_with_correct_headers() -> None:
    s = setup()
    provider = silo()
    async with running(provider, s.config, partition_count=2) as engine:
        executor = engine.executor_for(s.app)
        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(executor.execute_command, Deposit(f"a{i % 7}", 1, f"r{i}"))
                tg.start_soon(executor.execute_command, Notify(i))
        await wait_until(lambda: len(s.accounts.calls) == 40 and len(s.notifier.calls) == 40)
        stores = await settled(provider)
    check_invariants(stores)
    assert len(stores.all_events()) == 80
    for records in stores.stream.values():
        positions = [r.inbox_position for r in records]
        assert positions == sorted(positions)


async def test_poison_after_max_attempts_and_at_once_for_bugs() -> None:
    from runkit.engine.commands.poison import get_poisoned, list_poisoned, requeue

    s = setup()
    s.accounts.fail["bad"] = 100
    s.accounts.unexpected.add("bug")
    s.accounts.unrouted.add("unrouted")
    provider = silo()
    async with running(provider, s.config, max_attempts=3, partition_count=2) as engine:
        executor = engine.executor_for(s.app)
        await executor.execute_command(Deposit("x", 1, "bad"))
        await executor.execute_command(Deposit("y", 1, "bug"))
        await executor.execute_command(Deposit("z", 1, "unrouted"))
        await executor.execute_command(Deposit("x", 2, "after"))
        await wait_until(lambda: ("x", "after", 0) in s.accounts.calls)

        async def poisoned() -> list[Any]:
            return [p async for p in list_poisoned(provider, APP_KEY, 2)]

        await wait_until(lambda: _len_is(poisoned, 3))
        entries = {p.record.entry.envelope.description: p for p in await poisoned()}
        bad = entries["depositing 1 into x"].record
        assert bad.attempts == 3
        assert "scripted failure" in bad.error
        assert s.accounts.attempts["bad"] == 3
        assert s.accounts.attempts["bug"] == 1
        assert "UnexpectedMessage" in entries["depositing 1 into y"].record.error
        assert s.accounts.attempts["unrouted"] == 1
        assert "no records_event route" in entries["depositing 1 into z"].record.error

        # Requeue: the command runs again (now succeeding) and leaves the poison store.
        s.accounts.fail["bad"] = 0
        command_id = entries["depositing 1 into x"].command_id
        assert await get_poisoned(provider, APP_KEY, 2, command_id) is not None
        assert await requeue(provider, APP_KEY, 2, command_id)
        await wait_until(lambda: ("x", "bad", 2) in s.accounts.calls)
        assert await get_poisoned(provider, APP_KEY, 2, command_id) is None
        await settled(provider)
    check_invariants(await read_stores(provider))


@pytest.mark.parametrize("failure", ["bug", "attempts"])
async def test_a_poisoned_commands_instance_waits_for_its_poison_record(failure: str) -> None:
    # Until the record is durable the inbox may still hold the command: a
    # crash would hand it to the next owner, which must not find later
    # commands of the instance committed before it.
    from runkit.engine.commands.poison import list_poisoned
    from runkit.testing.faults import BEFORE, FaultPlan, FaultyProvider

    s = setup()
    if failure == "bug":
        s.accounts.unexpected.add("bad")
    else:
        s.accounts.fail["bad"] = 100
    plan = FaultPlan()
    plan.fail(BEFORE, ops={"set_unconditional"}, names=lambda n: "/poison/" in n)
    provider = FaultyProvider(silo(), plan)
    async with running(provider, s.config, max_attempts=2, partition_count=1) as engine:
        executor = engine.executor_for(s.app)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(executor.execute_command, Deposit("x", 1, "bad"))
                await wait_until(lambda: plan.injected_before >= 1)
                tg.start_soon(executor.execute_command, Deposit("x", 2, "after"))
                await wait_until(lambda: plan.injected_before >= 3)
                await anyio.sleep(0.2)
                assert [c[1] for c in s.accounts.calls] == []
                plan.clear()
                await wait_until(lambda: ("x", "after", 0) in s.accounts.calls)
        poisoned = [p async for p in list_poisoned(provider, APP_KEY, 1)]
        assert [p.record.entry.envelope.description for p in poisoned] == ["depositing 1 into x"]
        await settled(provider)
    check_invariants(await read_stores(provider))


@pytest.mark.parametrize("too_big", ["error", "command"])
async def test_a_poison_record_too_large_for_the_store_does_not_hold_up_its_instance(
    too_big: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The store refuses the record on every attempt (LimitExceeded). Its error
    # text is cut short; a command that does not fit even so is dropped with an
    # error logged, rather than parking its instance for ever.
    from runkit.engine.commands.poison import list_poisoned
    from runkit.persistence import Limits

    s = setup()
    ref = "b" * 20_000 if too_big == "command" else "bad"
    real = s.accounts.handle_command

    def handle_command(root: Any, scope: Any, command: dogma.Command) -> None:
        if isinstance(command, Deposit) and command.ref == ref:
            raise RuntimeError("boom " * 10_000)
        real(root, scope, command)

    s.accounts.handle_command = handle_command  # type: ignore[method-assign]
    provider = MemoryProvider(f"commands-{uuid.uuid4()}", limits=Limits(max_value_bytes=16 * 1024))
    async with running(provider, s.config, max_attempts=1, partition_count=1) as engine:
        executor = engine.executor_for(s.app)
        with anyio.fail_after(20):
            await executor.execute_command(Deposit("x", 1, ref))
            await executor.execute_command(Deposit("x", 2, "after"))
            await wait_until(lambda: ("x", "after", 0) in s.accounts.calls)
        poisoned = [p async for p in list_poisoned(provider, APP_KEY, 1)]
        if too_big == "error":
            await settled(provider)  # (a dropped command is, by design, not settled)
    if too_big == "error":
        [record] = [p.record for p in poisoned]
        assert record.error.startswith("RuntimeError: boom boom")
        assert len(record.error) <= 4096
    else:
        assert poisoned == []
        assert "cannot be recorded in the poison store" in caplog.text


async def _len_is(fn, n: int) -> bool:  # type: ignore[no-untyped-def]
    return len(await fn()) == n


_STRICT = dogma.MessageTypeRegistry()


@dogma.register_command("c2000000-0000-4000-8000-000000000001", registry=_STRICT)
@attrs.frozen
class _Record(dogma.Command):
    swallow: bool


@attrs.frozen
class _Checked(dogma.Event):
    valid: bool

    def validate(self, scope: dogma.ValidationScope) -> None:
        if not self.valid:
            raise dogma.ValidationError("checked: not valid")


@dogma.register_event("c2000000-0000-4000-8000-000000000002", registry=_STRICT)
@attrs.frozen
class _CheckedByAggregate(_Checked):
    pass


@dogma.register_event("c2000000-0000-4000-8000-000000000004", registry=_STRICT)
@attrs.frozen
class _CheckedByIntegration(_Checked):
    pass


@dogma.register_command("c2000000-0000-4000-8000-000000000003", registry=_STRICT)
@attrs.frozen
class _RecordVia(dogma.Command):
    swallow: bool


class _Recorders:
    """An aggregate and an integration that record an invalid event, catching what it raises."""

    def __init__(self) -> None:
        self.raised: list[tuple[str, BaseException]] = []
        self.attempts: dict[tuple[str, bool], int] = {}

    def attempt(self, scope: Any, event: _Checked, target: str, swallow: bool) -> None:
        self.attempts[target, swallow] = self.attempts.get((target, swallow), 0) + 1
        try:
            scope.record_event(event)
        except Exception as exc:
            self.raised.append((target, exc))
            if not swallow:
                raise


class _StrictAggregate:
    def __init__(self, recorders: _Recorders) -> None:
        self.recorders = recorders

    def configure(self, c: Any) -> None:
        c.identity("strict-aggregate", "c2000000-0000-4000-8000-0000000000a1")
        c.routes(
            dogma.handles_command(_Record, registry=_STRICT),
            dogma.records_event(_CheckedByAggregate, registry=_STRICT),
        )

    def new(self) -> Any:
        return dogma.StatelessProcessRoot()  # any root: apply_event is never reached

    def route_command_to_instance(self, command: dogma.Command) -> str:
        return "only"

    def handle_command(self, root: Any, scope: Any, command: dogma.Command) -> None:
        assert isinstance(command, _Record)
        event = _CheckedByAggregate(valid=False)
        self.recorders.attempt(scope, event, "aggregate", command.swallow)


class _StrictIntegration:
    def __init__(self, recorders: _Recorders) -> None:
        self.recorders = recorders

    def configure(self, c: Any) -> None:
        c.identity("strict-integration", "c2000000-0000-4000-8000-0000000000a2")
        c.routes(
            dogma.handles_command(_RecordVia, registry=_STRICT),
            dogma.records_event(_CheckedByIntegration, registry=_STRICT),
        )

    async def handle_command(self, scope: Any, command: dogma.Command) -> None:
        assert isinstance(command, _RecordVia)
        event = _CheckedByIntegration(valid=False)
        self.recorders.attempt(scope, event, "integration", command.swallow)


class _StrictApp:
    def __init__(self, recorders: _Recorders) -> None:
        self.recorders = recorders

    def configure(self, c: Any) -> None:
        c.identity("strict", "c2000000-0000-4000-8000-0000000000a0")
        c.routes(
            dogma.via_aggregate(_StrictAggregate(self.recorders)),
            dogma.via_integration(_StrictIntegration(self.recorders)),
        )


async def test_recording_an_invalid_event_raises_validation_error_and_poisons_at_once() -> None:
    # record_event() raises the dogma.ValidationError the API documents (as a
    # process scope's execute_command() does), whether or not the handler
    # lets it propagate, the command is a bug: poisoned at the first attempt.
    from runkit.config import build
    from runkit.engine.commands.poison import list_poisoned

    recorders = _Recorders()
    app = _StrictApp(recorders)
    config = build(app, registry=_STRICT)
    provider = silo()
    async with running(provider, config, max_attempts=3, partition_count=1) as engine:
        executor = engine.executor_for(app)
        for swallow in (True, False):
            await executor.execute_command(_Record(swallow))
            await executor.execute_command(_RecordVia(swallow))

        async def poisoned() -> list[Any]:
            return [p async for p in list_poisoned(provider, config.identity.key, 1)]

        await wait_until(lambda: _len_is(poisoned, 4))
        errors = [p.record.error for p in await poisoned()]
    assert all("recorded an invalid event: checked: not valid" in e for e in errors), errors
    assert recorders.attempts == {
        ("aggregate", True): 1,
        ("aggregate", False): 1,
        ("integration", True): 1,
        ("integration", False): 1,
    }
    assert len(recorders.raised) == 4
    for target, exc in recorders.raised:
        assert type(exc) is dogma.ValidationError, (target, exc)
        assert str(exc) == "checked: not valid"


async def test_messages_are_independent_copies() -> None:
    s = setup()
    provider = silo()
    command = Deposit("acc", 1, "r1")
    async with running(provider, s.config) as engine:
        await engine.executor_for(s.app).execute_command(command)
        await wait_until(lambda: len(s.accounts.calls) == 1)
        await engine.executor_for(s.app).execute_command(command)
        await wait_until(lambda: len(s.accounts.calls) == 2)
    first, second = s.accounts.messages
    assert first == command
    assert second == command
    assert first is not command
    assert second is not first
    # The event the handler recorded is not the object applied to the root or published.
    assert isinstance(s.accounts.events[0], Deposited)


async def test_routing_and_the_first_handling_share_the_command_and_a_retry_gets_a_copy() -> None:
    # Dogma hands one message to a handler's routing and handling; a retry of
    # the handling decodes its own copy (ADR-32).
    s = setup()
    s.accounts.fail["r1"] = 1
    provider = silo()
    async with running(provider, s.config) as engine:
        await engine.executor_for(s.app).execute_command(Deposit("acc", 1, "r1"))
        await wait_until(lambda: len(s.accounts.calls) == 1)
    [routed] = s.accounts.routed
    first, retry = s.accounts.messages
    assert first is routed
    assert retry is not routed
    assert retry == routed


async def test_executor_before_run_waits_for_start() -> None:
    s = setup()
    provider = silo()
    engine = Engine.from_settings(
        EngineSettings(applications=(s.config,), persistence_provider=provider, partition_count=2)
    )
    executor = engine.executor_for(s.app)
    done = anyio.Event()

    async def execute() -> None:
        await executor.execute_command(Deposit("acc", 1, "early"))
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(execute)
        await anyio.sleep(0.05)
        assert not done.is_set()
        tg.start_soon(engine.run)
        with anyio.fail_after(5):
            await done.wait()
        await wait_until(lambda: len(s.accounts.calls) == 1)
        await settled(provider)
        tg.cancel_scope.cancel()
    with pytest.raises(EngineStopped):
        await executor.execute_command(Deposit("acc", 1, "late"))


async def test_errors_for_unregistered_app_unknown_command_and_invalid_command() -> None:
    s = setup()
    engine = Engine.from_settings(
        EngineSettings(applications=(s.config,), persistence_provider=silo())
    )
    with pytest.raises(ValueError, match="not an application registered"):
        engine.executor_for(object())
    executor = engine.executor_for(s.app)
    assert engine.executor_for(s.config) is executor

    @dogma.register_command(
        "c2000000-0000-4000-8000-000000000001", registry=dogma.MessageTypeRegistry()
    )
    class Orphan(dogma.Command):
        pass

    with pytest.raises(ValueError, match="no handler"):
        await executor.execute_command(Orphan())
    with pytest.raises(dogma.ValidationError):
        await executor.execute_command(Deposit("acc", -1))
    with pytest.raises(ValueError, match="idempotency_key"):
        await executor.execute_command(Deposit("acc", 1), idempotency_key="")


async def test_run_without_persistence_is_a_clear_error() -> None:
    s = setup()
    engine = Engine.from_settings(EngineSettings(applications=(s.config,)))
    with pytest.raises(ConfigurationError, match="no persistence"):
        await engine.run()


async def test_partition_count_is_fixed_at_first_start(caplog: pytest.LogCaptureFixture) -> None:
    s = setup()
    provider = silo()
    async with running(provider, s.config, partition_count=3) as engine:
        assert (await engine.runtime(APP_KEY)).partition_count == 3
    caplog.set_level(logging.INFO, logger="runkit")
    async with running(MemoryProvider(provider.silo), s.config, partition_count=8) as engine:
        assert (await engine.runtime(APP_KEY)).partition_count == 3
    # The node's own count may be the default, which nobody configured: the line
    # says where the stored count comes from and when the node's applies.
    [line] = [r.getMessage() for r in caplog.records if "partitions" in r.getMessage()]
    assert "has 3 partitions, fixed when it was first started" in line
    assert "this node's partition count (8) applies only to a new application" in line


def test_partition_ids_are_uuid5_of_the_app_key() -> None:
    assert partition_id(APP_KEY, 3) == str(uuid.uuid5(uuid.UUID(APP_KEY), "partition/3"))


@dogma.register_command("c3000000-0000-4000-8000-000000000001")
@attrs.frozen
class Ping(dogma.Command):
    n: int


@dogma.register_event("c3000000-0000-4000-8000-000000000002")
@attrs.frozen
class Pinged(dogma.Event):
    n: int


class Pinger:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def configure(self, c: Any) -> None:
        c.identity("pinger", "c3000000-0000-4000-8000-000000000003")
        c.routes(dogma.handles_command(Ping), dogma.records_event(Pinged))

    async def handle_command(self, scope: Any, command: Ping) -> None:
        self.seen.append(command.n)
        scope.record_event(Pinged(command.n))


class PingApp:
    def __init__(self) -> None:
        self.pinger = Pinger()

    def configure(self, c: Any) -> None:
        c.identity("pingapp", "c3000000-0000-4000-8000-000000000004")
        c.routes(dogma.via_integration(self.pinger))


async def test_engine_from_options() -> None:
    import runkit._options as options

    app = PingApp()
    engine = Engine(options.with_application(app), options.with_persistence_provider(silo()))
    assert [a.identity.name for a in engine.applications] == ["pingapp"]
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await engine.executor_for(app).execute_command(Ping(1))
        await wait_until(lambda: app.pinger.seen == [1])
        tg.cancel_scope.cancel()


async def test_a_graceful_stop_records_how_far_the_materialiser_got() -> None:
    # Each stream record's header carries the materialised watermark as of its
    # writing, and the materialiser writes the last records' aggregate events
    # after that. A graceful stop says how far it got, so the next owner does
    # not read those records again: recovery starts at the end of the stream.
    from runkit.engine.streams import decode_stream_record, read_tail, stream_name

    s = setup()
    provider = silo()
    async with running(provider, s.config) as engine:
        executor = engine.executor_for(s.app)
        for i in range(20):
            await executor.execute_command(Deposit(f"a{i % 5}", 1, f"r{i}"))
        count = (await engine.runtime(APP_KEY)).partition_count
    written = 0
    for index in range(count):
        async with await provider.journals.open(stream_name(APP_KEY, index)) as journal:
            tail = await read_tail(journal)
            assert tail.materialised is not None
            # What a next owner would read again: nothing with events in it.
            unmaterialised = [
                decode_stream_record(await journal.get(position)).events
                for position in range(tail.materialised, tail.next_position)
            ]
        if tail.next_offset:  # the partition recorded events
            written += 1
            assert not any(unmaterialised), f"partition {index}"
    assert written
    # Stopping again with nothing new written adds no record.
    ends = []
    for _ in range(2):
        async with running(provider, s.config):
            pass
        ends.append(
            [
                (await read_tail(j)).next_position
                for j in [
                    await provider.journals.open(stream_name(APP_KEY, i)) for i in range(count)
                ]
            ]
        )
    assert ends[0] == ends[1]


async def test_instance_journals_are_derived_and_written_once_by_two_owners() -> None:
    """Two materialisers (an old and a new owner) write the same records: no duplicates.

    The stream is the commit point; instance journals are written behind it, and
    a record is appended only if the journal's last record is below its stream
    offset (ADR 0007). A rebuilt root sees the unwritten records too.
    """
    from datetime import UTC, datetime

    from runkit.engine.commands.aggregates import AggregateInstances
    from runkit.engine.commands.inbox import InboxEntry
    from runkit.engine.commands.instance_records import Committed, instance_decoder
    from runkit.engine.commands.materialiser import Materialiser
    from runkit.engine.envelope import new_envelope, register_types

    s = setup()
    register_types(s.config.message_types())
    provider = silo()
    handler = s.config.handler_by_name("accounts")
    assert handler is not None
    key = (handler.identity.key, "acc")

    def entry(ref: str) -> InboxEntry:
        env = new_envelope(
            Deposit("acc", 1, ref), app_key=APP_KEY, site_key=None, created_at=datetime.now(UTC)
        )
        return InboxEntry(envelope=env, handler_key=handler.identity.key, instance_id="acc")

    def instances() -> AggregateInstances:
        return AggregateInstances(
            provider,
            APP_KEY,
            site_key=None,
            clock=lambda: datetime.now(UTC),
            snapshot_every=2,
            cache_size=10,
        )

    owner = instances()
    inst = await owner.load(handler, "acc")
    records: list[Committed] = []
    entries = [entry(ref) for ref in ["a", "b", "c"]]
    for offset, e in enumerate(entries):
        events = owner.handle(inst, e)
        assert events is not None
        assert len(events) == 1
        record = owner.committed(inst, e, events, inbox_position=offset)
        assert record is not None
        record.durable, record.stream_offset, record.stream_position = True, offset, offset
        records.append(record)
    # A command ID the instance has handled is recognised (None: a duplicate).
    assert owner.handle(inst, entries[0]) is None
    assert owner.handle(inst, entry("d")) is not None  # a new ID: handled...
    owner.drop(handler, "acc")  # ...but never committed: the root is dropped
    # Nothing written yet: a rebuild still sees the committed records, not "d".
    rebuilt = await owner.load(handler, "acc")
    assert list(rebuilt.recent) == [r.command_id for r in records]

    async def materialise(aggregates: AggregateInstances, todo: list[Committed]) -> int:
        m = Materialiser(
            provider,
            s.config,
            aggregates,
            truncate=False,
            retry_base_delay=0.01,
            retry_max_delay=0.1,
        )
        for r in todo:
            m.add(key, r)
        async with anyio.create_task_group() as tg:
            await tg.start(m.run)
            m.wake()
            await wait_until(lambda: m.watermark(99) == 99)
            tg.cancel_scope.cancel()
        return m.records_written

    # The first two commands of the round share one journal record (the second
    # carries a snapshot, which ends a record).
    assert await materialise(owner, records[:2]) == 1
    # The new owner recovered all three from the stream: only the third is new.
    assert await materialise(instances(), records) == 1
    journal = await provider.journals.open(f"{APP_KEY}/aggregate/{handler.identity.key}/acc")
    assert (await journal.bounds()).end == 2
    stored = [instance_decoder.decode(data) async for _, data in journal.range(0)]
    await journal.close()
    assert [[c.command_id for c in r.commands()] for r in stored] == [
        [records[0].command_id, records[1].command_id],
        [records[2].command_id],
    ]
    # A snapshot was written (every 2 events) and a fresh load agrees with the history.
    fresh = await instances().load(handler, "acc")
    assert list(fresh.recent) == [r.command_id for r in records]
    assert fresh.root.balance == 3


async def test_a_repeated_command_leaves_its_events_for_a_subscription_that_starts_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A duplicate is re-published on the owner's bus even with nobody subscribed yet.

    A peer's observer subscribes at the owner over the network while the
    gateway offers the command, so the offer may win: the owner must keep the
    original events (and the done note) for the subscription that arrives
    after. Before the fix a duplicate with no local subscriber published
    nothing, so once the bus had forgotten the original events (it keeps them
    for a minute) a client's observer of a repeated keyed command waited for
    ever (seen in the three-node test on DynamoDB, which runs for minutes).
    """
    import time

    from runkit.engine.commands.acceptance import command_id_for
    from runkit.engine.streams import CommandDone, StreamEvent, UniqueEvents
    from runkit.engine.streams.bus import RECENT_SECONDS

    s = setup()
    provider = silo()
    correlation_id = command_id_for(APP_KEY, "late")
    async with running(provider, s.config) as engine:
        executor = engine.executor_for(s.app)
        await executor.execute_command(Deposit("acc", 4, "late"), idempotency_key="late")
        await settled(provider)  # handled (the first call may only have reached the inbox)
        # A minute and more later the bus no longer keeps the original events.
        monkeypatch.setattr(engine.bus, "_clock", lambda: time.monotonic() + RECENT_SECONDS + 1)
        async with engine.bus.subscribe(correlation_id, replay=True) as items:
            assert isinstance(items, UniqueEvents)
            assert not items.pending()
        # The same command again, with nobody subscribed on this node yet.
        await executor.execute_command(Deposit("acc", 4, "late"), idempotency_key="late")
        await settled(provider)
        seen: list[object] = []
        with anyio.fail_after(5):
            async with engine.bus.subscribe(correlation_id, replay=True) as items:
                async for item in items:
                    seen.append(item)
                    if isinstance(item, CommandDone):
                        break
    events = [i for i in seen if isinstance(i, StreamEvent)]
    assert [e.envelope.description for e in events] == ["Deposited"]
    assert events[0].envelope.causation_id == correlation_id
    assert isinstance(seen[-1], CommandDone)
    assert seen[-1].conclusive
    assert len(s.accounts.calls) == 1


async def test_a_repeated_command_whose_events_cannot_be_read_again_is_not_conclusive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its done note must not claim the command recorded nothing: an observer
    # would raise EventObserverNotSatisfied though the command did record.
    from runkit.engine.commands.acceptance import command_id_for
    from runkit.engine.streams import CommandDone, StreamEvent
    from runkit.engine.streams.reading import PartitionStream
    from runkit.persistence import PersistenceError

    s = setup()
    provider = silo()
    correlation_id = command_id_for(APP_KEY, "unread")
    async with running(provider, s.config) as engine:
        executor = engine.executor_for(s.app)
        await executor.execute_command(Deposit("acc", 4, "unread"), idempotency_key="unread")
        await settled(provider)

        async def unreadable(self: object, offset: int, count: int) -> list[StreamEvent]:
            raise PersistenceError("the store is unreachable (test)")

        monkeypatch.setattr(PartitionStream, "events_at", unreadable)
        seen: list[object] = []
        with anyio.fail_after(5):
            async with engine.bus.subscribe(correlation_id) as items:
                await executor.execute_command(
                    Deposit("acc", 4, "unread"), idempotency_key="unread"
                )
                async for item in items:
                    seen.append(item)
                    if isinstance(item, CommandDone):
                        break
        monkeypatch.undo()
        # The partition goes on.
        await executor.execute_command(Deposit("acc", 1, "after"), idempotency_key="after")
    assert len(seen) == 1
    assert isinstance(seen[0], CommandDone)
    assert not seen[0].conclusive
    assert [c[1] for c in s.accounts.calls] == ["unread", "after"]


async def test_observers_see_events_even_of_a_deduplicated_command() -> None:
    from engine_commands_harness import REGISTRY, Notified

    s = setup()
    provider = silo()
    seen: list[object] = []

    async def saw(event: Deposited) -> bool:
        seen.append(event)
        return event.ref == "obs"

    async with running(provider, s.config) as engine:
        executor = engine.executor_for(s.app)
        observer = dogma.observe(Deposited, saw, registry=REGISTRY)
        with anyio.fail_after(5):
            await executor.execute_command(
                Deposit("acc", 3, "obs"), idempotency_key="obs", observers=[observer]
            )
        assert [e.balance for e in seen] == [3]  # type: ignore[attr-defined]
        await settled(provider)
        # The same key again: not handled again, yet the observer gets the original event.
        with anyio.fail_after(5):
            await executor.execute_command(
                Deposit("acc", 3, "obs"), idempotency_key="obs", observers=[observer]
            )
        assert len(seen) == 2
        assert seen[0] == seen[1]
        assert seen[0] is not seen[1]
        assert len(s.accounts.calls) == 1

        # An observed type the command can never cause: not satisfiable, at once.
        async def never_called(event: Notified) -> bool:
            raise AssertionError("not reachable")

        never = dogma.observe(Notified, never_called, registry=REGISTRY)
        with pytest.raises(dogma.EventObserverNotSatisfied):
            await executor.execute_command(Deposit("acc", 1, "x"), observers=[never])


async def test_large_backlog_is_read_as_work_completes(monkeypatch: pytest.MonkeyPatch) -> None:
    from runkit.engine.cluster.ownership import StaticOwnership
    from runkit.engine.commands import batches

    monkeypatch.setattr(batches, "MAX_PENDING_COMMANDS", 4)
    s = setup()
    provider = silo()
    engine = Engine.from_settings(
        EngineSettings(applications=(s.config,), persistence_provider=provider, partition_count=1)
    )
    engine.use_ownership(StaticOwnership())  # accept only
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        executor = engine.executor_for(s.app)
        for i in range(30):
            await executor.execute_command(Deposit(f"a{i % 3}", 1, f"r{i}"))
        tg.cancel_scope.cancel()
    async with running(MemoryProvider(provider.silo), s.config, partition_count=1):
        await wait_until(lambda: len(s.accounts.calls) == 30)
        check_invariants(await settled(provider))


async def test_partitions_follow_ownership_changes() -> None:
    from runkit.engine.cluster.ownership import StaticOwnership

    s = setup()
    provider = silo()
    ownership = StaticOwnership()
    engine = Engine.from_settings(
        EngineSettings(
            applications=(s.config,),
            persistence_provider=provider,
            partition_count=2,
            retry_base_delay=0.001,
            progress_interval=0.002,
        )
    )
    engine.use_ownership(ownership)
    all_partitions = {partition_id(APP_KEY, i) for i in range(2)}
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        executor = engine.executor_for(s.app)
        await executor.execute_command(Deposit("acc", 1, "r1"))
        await anyio.sleep(0.05)
        assert s.accounts.calls == []  # owns nothing yet
        ownership.assign(all_partitions)
        await wait_until(lambda: len(s.accounts.calls) == 1)
        await settled(provider)
        ownership.assign(set())
        await anyio.sleep(0.05)
        await executor.execute_command(Deposit("acc", 1, "r2"))
        await anyio.sleep(0.05)
        assert len(s.accounts.calls) == 1  # given up: accepted, not handled
        ownership.assign(all_partitions)
        await wait_until(lambda: len(s.accounts.calls) == 2)
        check_invariants(await settled(provider))
        tg.cancel_scope.cancel()
    assert s.accounts.calls[-1] == ("acc", "r2", 1)


async def test_several_applications_on_one_engine_are_isolated() -> None:
    from engine_commands_harness import REGISTRY, Accounts, App, Notifier, read_stores

    from runkit.config import build

    other_key = "c0000000-0000-4000-8000-0000000000ff"
    s = setup()
    other_accounts = Accounts()
    other = App(other_accounts, Notifier(), key=other_key, name="other")
    other_config = build(other, registry=REGISTRY)
    provider = silo()
    async with running(provider, s.config, other_config) as engine:
        await engine.executor_for(s.app).execute_command(Deposit("acc", 1, "mine"))
        await engine.executor_for(other).execute_command(Deposit("acc", 5, "theirs"))
        await wait_until(lambda: len(s.accounts.calls) == 1 and len(other_accounts.calls) == 1)
        await settled(provider)
        await settled(provider, other_key)
    assert s.accounts.calls == [("acc", "mine", 0)]
    assert other_accounts.calls == [("acc", "theirs", 0)]
    mine, theirs = await read_stores(provider), await read_stores(provider, other_key)
    assert [e.app_key for e in mine.all_events()] == [APP_KEY]
    assert [e.app_key for e in theirs.all_events()] == [other_key]


class _Forwarder(dogma.StatelessProcessBehavior, dogma.NoDeadlineMessagesBehavior):
    """A process: every Deposited executes Notify(balance) (through ctx.accept)."""

    def configure(self, c: Any) -> None:
        from engine_commands_harness import REGISTRY

        c.identity("forwarder", "c0000000-0000-4000-8000-0000000000aa")
        c.routes(
            dogma.handles_event(Deposited, registry=REGISTRY),
            dogma.executes_command(Notify, registry=REGISTRY),
        )

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        assert isinstance(event, Deposited)
        return event.account

    async def handle_event(self, root: Any, scope: Any, event: dogma.Event) -> None:
        assert isinstance(event, Deposited)
        scope.execute_command(Notify(event.balance, event.ref))


async def test_commands_produced_by_a_process_are_accepted_and_handled_once() -> None:
    from engine_commands_harness import REGISTRY, Accounts, App, Notified, Notifier

    from runkit.config import build

    accounts, notifier = Accounts(), Notifier()
    app = App(accounts, notifier)
    app_routes = app.configure

    def configure(c: Any) -> None:
        app_routes(c)
        c.routes(dogma.via_process(_Forwarder()))

    app.configure = configure  # type: ignore[method-assign]
    config = build(app, registry=REGISTRY)
    provider = silo()
    seen: list[int] = []

    async def saw(event: Notified) -> bool:
        seen.append(event.n)
        return True

    async with running(provider, config) as engine:
        executor = engine.executor_for(app)
        with anyio.fail_after(10):
            await executor.execute_command(
                Deposit("acc", 4, "p1"),
                observers=[dogma.observe(Notified, saw, registry=REGISTRY)],
            )
        await executor.execute_command(Deposit("acc", 1, "p2"))
        await wait_until(lambda: sorted(notifier.calls) == [4, 5])
        stores = await settled(provider)
    assert seen == [4]
    check_invariants(stores)
    notified = [e for e in stores.all_events() if e.description == "Notified"]
    assert len(notified) == 2


async def test_persistence_url_is_resolved_and_never_shown_with_its_password() -> None:
    s = setup()
    name = f"url-{uuid.uuid4()}"
    async with anyio.create_task_group() as tg:
        engine = Engine.from_settings(
            EngineSettings(applications=(s.config,), persistence_url=f"memory:///{name}")
        )
        tg.start_soon(engine.run)
        await engine.executor_for(s.app).execute_command(Deposit("acc", 1, "url"))
        await wait_until(lambda: len(s.accounts.calls) == 1)
        tg.cancel_scope.cancel()
    assert (await read_stores(MemoryProvider(name))).accepted_ids()
    secret = EngineSettings(persistence_url="postgresql://u:hunter2@db/x")
    assert "hunter2" not in repr(secret)


async def test_instance_journals_are_truncated_below_snapshots_when_enabled() -> None:
    s = setup()
    provider = silo()
    settings = {"snapshot_every": 2, "truncate_aggregate_journals": True, "partition_count": 1}
    async with running(provider, s.config, **settings) as engine:
        executor = engine.executor_for(s.app)
        for i in range(12):
            await executor.execute_command(Deposit("acc", 1, f"t{i}"), idempotency_key=f"t{i}")
            await wait_until(lambda i=i: len(s.accounts.calls) == i + 1)  # type: ignore[misc]
            await settled(provider)
    journal = await provider.journals.open(f"{APP_KEY}/aggregate/{s.accounts_key}/acc")
    bounds = await journal.bounds()
    assert bounds.end == 12
    assert bounds.begin > 0  # truncated below a snapshot
    async with running(MemoryProvider(provider.silo), s.config, **settings) as engine:
        executor = engine.executor_for(s.app)
        await executor.execute_command(Deposit("acc", 1, "t0"), idempotency_key="t0")  # a repeat
        await executor.execute_command(Deposit("acc", 1, "t12"))
        await wait_until(lambda: len(s.accounts.calls) == 13)
        check_invariants(await settled(provider))
    assert s.accounts.calls[-1] == ("acc", "t12", 12)


async def test_idempotency_markers_expire_after_the_retention_period() -> None:
    from runkit.engine.commands.acceptance import idempotency_name

    s = setup()
    provider = silo()
    # Long enough to observe the marker before the pruner (every retention/4) removes it.
    # Markers are written for keyed integration commands only (ADR 0007).
    async with running(provider, s.config, idempotency_retention=2.0) as engine:
        executor = engine.executor_for(s.app)
        await executor.execute_command(Notify(1), idempotency_key="k")
        await wait_until(lambda: s.notifier.calls == [1])
        markers = await provider.keyspaces.open(idempotency_name(APP_KEY))
        key = str(uuid.uuid5(uuid.UUID(APP_KEY), "k")).encode()
        await wait_until(lambda: markers.has(key))
        await wait_until(lambda: _not(markers.has(key)), timeout=30)
        await markers.close()


async def _not(check: Any) -> bool:
    return not await check


async def test_a_materialiser_that_cannot_reread_a_journal_retries_with_a_fresh_handle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed append, then a failed re-read of the journal's end, must not wedge the instance.

    The re-read used to close the handle but keep it, so every later attempt
    failed on the closed handle and the partition's materialiser never finished
    its round. A rebuilt instance's journal is handed to the materialiser open
    (no second open), and the materialiser recovers from both failures.
    """
    from datetime import UTC, datetime

    from runkit.engine.commands.aggregates import AggregateInstances
    from runkit.engine.commands.inbox import InboxEntry
    from runkit.engine.commands.instance_records import Committed
    from runkit.engine.commands.materialiser import Materialiser
    from runkit.engine.envelope import new_envelope, register_types
    from runkit.persistence import PersistenceError
    from runkit.testing.faults import BEFORE, FaultPlan, FaultyProvider

    s = setup()
    register_types(s.config.message_types())
    plan = FaultPlan()
    plan.fail(BEFORE, ops={"append"}, names=lambda n: "/aggregate/" in n, nth=1)
    provider = FaultyProvider(silo(), plan)
    handler = s.config.handler_by_name("accounts")
    assert handler is not None
    key = (handler.identity.key, "acc")

    opened: list[Any] = []
    bounds_failures = [1]  # the first re-read after the failed append fails too
    real_open = provider.journals.open

    async def open_journal(name: str) -> Any:
        journal = await real_open(name)
        if "/aggregate/" in name:
            opened.append(journal)
            real_bounds = journal.bounds

            async def bounds() -> Any:
                if plan.calls["append"] and bounds_failures[0]:
                    bounds_failures[0] -= 1
                    raise PersistenceError("injected: bounds")
                return await real_bounds()

            journal.bounds = bounds  # type: ignore[method-assign]
        return journal

    monkeypatch.setattr(provider.journals, "open", open_journal)
    aggregates = AggregateInstances(
        provider,
        APP_KEY,
        site_key=None,
        clock=lambda: datetime.now(UTC),
        snapshot_every=100,
        cache_size=10,
    )
    inst = await aggregates.load(handler, "acc")
    env = new_envelope(
        Deposit("acc", 1, "a"), app_key=APP_KEY, site_key=None, created_at=datetime.now(UTC)
    )
    entry = InboxEntry(envelope=env, handler_key=handler.identity.key, instance_id="acc")
    events = aggregates.handle(inst, entry)
    assert events is not None
    record = aggregates.committed(inst, entry, events, inbox_position=0)
    assert isinstance(record, Committed)
    record.stream_offset, record.stream_position, record.durable = 0, 0, True
    m = Materialiser(
        provider, s.config, aggregates, truncate=False, retry_base_delay=0.01, retry_max_delay=0.05
    )
    m.add(key, record)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(m.run)
            m.wake()
            await wait_until(lambda: m.watermark(99) == 99)
            tg.cancel_scope.cancel()
    assert m.records_written == 1
    assert bounds_failures == [0]  # the re-read did fail once
    # The rebuild's journal was used for the first write; a fresh one after the re-read failed.
    assert len(opened) == 2
    journal = await provider.journals.open(f"{APP_KEY}/aggregate/{handler.identity.key}/acc")
    assert (await journal.bounds()).end == 1
    await journal.close()


async def test_a_submit_to_a_stopped_inbox_writer_fails_at_once_or_sees_its_cancellation() -> None:
    # A caller that falls back to the inbox as the engine stops gets
    # EngineStopped at once; one cancelled along with the engine (the usual
    # way an engine stops) sees its own cancellation instead.
    from runkit.engine.commands.inbox import InboxWriter

    provider = MemoryProvider(f"inbox-{uuid.uuid4()}")
    async with await provider.journals.open("inbox") as journal:
        writer = InboxWriter(
            journal, batch_limit=10, record_limit=4096, max_attempts=1, retry_max_delay=0.1
        )
        async with anyio.create_task_group() as tg:
            await tg.start(writer.run)
            tg.cancel_scope.cancel()
        with pytest.raises(EngineStopped):
            await writer.submit([])
        with anyio.CancelScope() as scope:
            scope.cancel()
            await writer.submit([])
        assert scope.cancelled_caught


def _inbox_entry(n: int, description: str) -> Any:
    from runkit.engine.commands.inbox import InboxEntry
    from runkit.engine.envelope import new_envelope, register_types

    register_types(setup().config.message_types())
    envelope = new_envelope(
        Deposit(f"acc-{n}", 1, "r"), app_key=APP_KEY, site_key=None, created_at=datetime.now(UTC)
    )
    envelope = msgspec.structs.replace(envelope, description=description)
    return InboxEntry(envelope=envelope, handler_key=str(uuid.uuid4()), instance_id=f"acc-{n}")


async def _submit_all(writer: Any, entries: list[Any]) -> list[int]:
    """Submit each entry from a caller of its own, at once, to a running writer."""
    positions: list[int] = []

    async def submit(entry: Any) -> None:
        positions.append(await writer.submit([entry]))

    async with anyio.create_task_group() as callers:
        for entry in entries:
            callers.start_soon(submit, entry)
    return positions


async def test_concurrent_inbox_commands_are_grouped_by_their_encoded_size() -> None:
    # Sized by their data alone, 500 commands with 300-character descriptions
    # made one record over DynamoDB's 390 KiB, refused as a whole: every one of
    # the callers failed, although each command fits alone.
    from runkit.engine.commands.inbox import InboxWriter
    from runkit.persistence import Limits

    limits = Limits(max_record_bytes=390 * 1024)
    provider = MemoryProvider(f"inbox-{uuid.uuid4()}", limits=limits)
    async with await provider.journals.open("inbox") as journal:
        writer = InboxWriter(
            journal,
            batch_limit=500,
            record_limit=limits.max_record_bytes,
            max_attempts=1,
            retry_max_delay=0.01,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(writer.run)
            entries = [_inbox_entry(n, "x" * 300) for n in range(500)]
            positions = await _submit_all(writer, entries)
            tg.cancel_scope.cancel()
        assert len(positions) == 500
        assert writer.records_written == len(set(positions)) > 1


async def test_a_group_the_store_refuses_as_too_large_is_split() -> None:
    # A store may count more than the writer estimates (its own overhead):
    # a group it refuses is split, and only a single caller's commands that
    # do not fit alone are refused.
    from runkit.engine.commands.inbox import InboxWriter
    from runkit.persistence import LimitExceeded, Limits

    limits = Limits(max_record_bytes=4096)
    provider = MemoryProvider(f"inbox-{uuid.uuid4()}", limits=limits)
    async with await provider.journals.open("inbox") as journal:
        writer = InboxWriter(
            journal,
            batch_limit=500,
            record_limit=100 * limits.max_record_bytes,  # an estimate far too generous
            max_attempts=1,
            retry_max_delay=0.01,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(writer.run)
            positions = await _submit_all(writer, [_inbox_entry(n, "y" * 500) for n in range(20)])
            with pytest.raises(LimitExceeded):
                await writer.submit([_inbox_entry(99, "z" * 5000)])
            tg.cancel_scope.cancel()
        assert len(positions) == 20
        assert writer.records_written > 1


async def test_an_instance_id_too_long_for_the_store_is_refused_before_it_is_durable() -> None:
    from runkit.persistence import Limits

    # "<app>/aggregate/<handler>/" takes 84 of the 128 bytes a name may have.
    s = setup()
    provider = MemoryProvider(f"engine-{uuid.uuid4()}", limits=Limits(max_name_bytes=128))
    async with running(provider, s.config) as engine:
        executor = engine.executor_for(s.app)
        with pytest.raises(ValueError, match="instance IDs of at most 44 bytes") as info:
            await executor.execute_command(Deposit("a" * 45, 1, "long"))
        assert "instance ID of 45 bytes" in str(info.value)
        await executor.execute_command(Deposit("a" * 44, 1, "fits"))
        await wait_until(lambda: len(s.accounts.calls) == 1)
        await settled(provider)
    assert s.accounts.calls == [("a" * 44, "fits", 0)]
    stores = await read_stores(provider)
    # Nothing of the refused command: one event, and at most the other command in an inbox.
    assert len(stores.all_events()) == 1
    assert len(stores.accepted_ids()) <= 1


async def test_an_instance_the_store_cannot_hold_poisons_its_commands_instead_of_blocking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Commands accepted before acceptance checked instance IDs (simulated by
    # skipping the check) fail to load on every attempt: each is retried and
    # poisoned, as a failing command is, rather than retried for ever.
    from runkit.engine.commands.acceptance import Acceptor
    from runkit.engine.commands.poison import list_poisoned
    from runkit.persistence import Limits

    monkeypatch.setattr(Acceptor, "_check_fits", lambda *args: None)
    s = setup()
    provider = MemoryProvider(f"engine-{uuid.uuid4()}", limits=Limits(max_name_bytes=128))
    async with running(provider, s.config, max_attempts=2, partition_count=1) as engine:
        executor = engine.executor_for(s.app)
        await executor.execute_command(Deposit("a" * 45, 1, "long-1"))
        await executor.execute_command(Deposit("a" * 45, 2, "long-2"))
        await executor.execute_command(Deposit("b", 3, "other"))

        async def poisoned() -> list[Any]:
            return [p async for p in list_poisoned(provider, APP_KEY, 1)]

        await wait_until(lambda: _len_is(poisoned, 2), timeout=20)
        errors = [p.record.error for p in await poisoned()]
        assert all("journal name" in error and "128" in error for error in errors), errors
    assert s.accounts.calls == [("b", "other", 0)]


_LONG_ID = "i" * 700


@dogma.register_command("c1000000-0000-4000-8000-0000000003a1", registry=REGISTRY)
@attrs.frozen
class _Burst(dogma.Command):
    n: int


@dogma.register_event("c1000000-0000-4000-8000-0000000003a2", registry=REGISTRY)
@attrs.frozen
class _Bit(dogma.Event):
    i: int


class _SizesRoot:
    def apply_event(self, event: dogma.Event) -> None:
        pass


class _Bursts:
    def configure(self, c: Any) -> None:
        c.identity("bursts", "c0000000-0000-4000-8000-0000000003a1")
        c.routes(
            dogma.handles_command(_Burst, registry=REGISTRY),
            dogma.records_event(_Bit, registry=REGISTRY),
        )

    def new(self) -> _SizesRoot:
        return _SizesRoot()

    def route_command_to_instance(self, command: dogma.Command) -> str:
        return _LONG_ID  # e.g. a composite key; accepted: its journal name fits

    def handle_command(self, root: _SizesRoot, scope: Any, command: dogma.Command) -> None:
        assert isinstance(command, _Burst)
        for i in range(command.n):
            scope.record_event(_Bit(i))


class _SizesApp:
    def configure(self, c: Any) -> None:
        c.identity("sizes", APP_KEY)
        c.routes(dogma.via_aggregate(_Bursts()))


async def test_events_counted_with_their_instance_id_are_refused_before_the_store_does() -> None:
    # The size check counted an event's data and description only: with a
    # 700-byte instance ID the command's record passed it, the store refused
    # the record, and the writer retried it for ever (the partition committed
    # nothing more). The command is now poisoned at once, as too large.
    from runkit.config import build
    from runkit.engine.envelope import register_types
    from runkit.persistence import Limits

    config = build(_SizesApp(), registry=REGISTRY)
    register_types(config.message_types())
    provider = MemoryProvider(f"rv3-{uuid.uuid4()}", limits=Limits(max_record_bytes=4096))
    engine = Engine.from_settings(
        EngineSettings(
            applications=(config,),
            persistence_provider=provider,
            partition_count=1,
            retry_base_delay=0.001,
            retry_max_delay=0.01,
            progress_interval=0.002,
            shutdown_timeout=0.5,
        )
    )
    outcome: list[object] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        runtime = await engine.runtime(APP_KEY)
        await wait_until(lambda: 0 in runtime.partitions)
        executor = engine.executor_for(config)

        async def run(cmd: _Burst) -> None:
            try:
                await executor.execute_command(cmd)
                outcome.append("ok")
            except Exception as exc:  # poisoned, refused...
                outcome.append(exc)

        tg.start_soon(run, _Burst(5))  # about 5.6 KB encoded, with a 4 KB record limit
        await wait_until(lambda: bool(outcome))
        await executor.execute_command(_Burst(1))  # the partition goes on
        tg.cancel_scope.cancel()
    stores = await read_stores(provider)
    assert len(stores.poison) == 1
    assert len(stores.all_events()) == 1


async def test_an_integration_handler_raising_a_persistence_error_is_retried_then_poisoned() -> (
    None
):
    # The handler's own store failing is its failure, not the engine's
    # storage fault: retried max_attempts times and poisoned, never retried
    # for ever (which would hold up a MINIMIZE handler's every later command).
    from runkit.engine.commands.poison import list_poisoned
    from runkit.persistence import PersistenceError

    s = setup()
    real = s.notifier.handle_command

    async def handle_command(scope: Any, command: dogma.Command) -> None:
        if isinstance(command, Notify) and command.n == 7:
            s.notifier.calls.append(command.n)
            raise PersistenceError("the handler's database is down")
        await real(scope, command)

    s.notifier.handle_command = handle_command  # type: ignore[method-assign]
    provider = silo()
    async with running(provider, s.config, max_attempts=3, partition_count=1) as engine:
        executor = engine.executor_for(s.app)
        with anyio.fail_after(20):
            await executor.execute_command(Notify(7))
            await executor.execute_command(Notify(8))

            async def poisoned() -> bool:
                return bool([p async for p in list_poisoned(provider, APP_KEY, 1)])

            await wait_until(poisoned)
        [record] = [p.record async for p in list_poisoned(provider, APP_KEY, 1)]
        await settled(provider)
    assert record.error.startswith("PersistenceError: the handler's database is down")
    assert s.notifier.calls.count(7) == 3


async def test_a_command_of_a_disabled_handler_is_refused_saying_it_is_disabled() -> None:
    from engine_commands_harness import App, Notifier

    from runkit.config import build

    class Disabled(Notifier):
        def configure(self, c: Any) -> None:
            super().configure(c)
            c.disable()

    app = App(Disabled())
    config = build(app, registry=REGISTRY)
    async with running(silo(), config) as engine:
        with pytest.raises(ValueError, match=r"consumes .*Notify \(.*notifier.* is disabled\)"):
            await engine.executor_for(app).execute_command(Notify(1))


async def test_markers_are_pruned_soon_after_a_start_not_an_interval_later(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A node restarted more often than the pruning interval (an hour by
    # default) used to wait the whole interval first, so it never pruned. The
    # first round now comes soon after the start; and a pruning that fails with
    # a bug is logged, not the end of the application.
    from datetime import UTC, datetime, timedelta

    from runkit.engine import runtime as runtime_module
    from runkit.engine.commands.acceptance import idempotency_name

    monkeypatch.setattr(runtime_module, "_FIRST_PRUNE_DELAY", 0.05, raising=False)
    s = setup()
    provider = silo()
    markers = await provider.keyspaces.open(idempotency_name(APP_KEY))
    key = str(uuid.uuid5(uuid.UUID(APP_KEY), "k")).encode()
    async with running(provider, s.config, idempotency_retention=3600.0) as engine:
        await engine.executor_for(s.app).execute_command(Notify(1), idempotency_key="k")
        await wait_until(lambda: markers.has(key))  # written behind the commit

    def later() -> datetime:
        return datetime.now(UTC) + timedelta(hours=2)

    from runkit.engine.commands.acceptance import prune_idempotency as real

    calls = 0

    async def failing_once(*args: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("an undecodable marker")
        return await real(*args)

    monkeypatch.setattr(runtime_module, "prune_idempotency", failing_once)
    async with running(provider, s.config, idempotency_retention=3600.0, clock=later) as engine:
        await wait_until(lambda: calls >= 1)
        # A round an interval (900 s) later would come too late for this test:
        # instead, a second engine start prunes.
    async with running(provider, s.config, idempotency_retention=3600.0, clock=later):
        await wait_until(lambda: _not(markers.has(key)), timeout=10)
    await markers.close()
    assert "pruning idempotency markers failed: 'an undecodable marker'" in caplog.text
