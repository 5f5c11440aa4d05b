"""The fault-injection wrappers in runkit.testing.faults."""

from collections.abc import AsyncIterator
from contextlib import aclosing

import anyio
import pytest

from runkit.persistence import Conflict, Interval, LimitExceeded, Provider
from runkit.testing.faults import (
    AFTER,
    BEFORE,
    FaultPlan,
    FaultyProvider,
    InjectedFault,
    InjectedFaultRecord,
    Timing,
)
from runkit_memory import MemoryProvider


@pytest.fixture
async def memory() -> AsyncIterator[Provider]:
    async with MemoryProvider() as provider:
        yield provider


async def _attempts(provider: Provider, count: int) -> list[str]:
    """Append *count* records, retrying nothing; report each outcome."""
    outcomes = []
    async with await provider.journals.open("j") as journal:
        for _ in range(count):
            end = (await journal.bounds()).end
            try:
                await journal.append(end, b"<r>")
            except InjectedFault as exc:
                outcomes.append(exc.timing.value)
            else:
                outcomes.append("ok")
    return outcomes


async def test_fault_before_write_raises_retryable_error_and_changes_nothing(
    memory: Provider,
) -> None:
    plan = FaultPlan()
    plan.fail(BEFORE, ops={"append"})
    journal = await FaultyProvider(memory, plan).journals.open("j")
    with pytest.raises(InjectedFault) as info:
        await journal.append(0, b"<r>")
    assert str(info.value) == "injected fault before append on journal 'j' (nothing was written)"
    assert (info.value.retryable, info.value.ambiguous) == (True, False)
    assert (info.value.op, info.value.kind, info.value.name) == ("append", "journal", "j")
    assert await journal.bounds() == Interval(0, 0)
    assert plan.injected == [InjectedFaultRecord("append", "journal", "j", BEFORE)]


async def test_fault_after_write_raises_ambiguous_error_and_write_took_effect(
    memory: Provider,
) -> None:
    plan = FaultPlan()
    plan.fail(AFTER, ops={"set"})
    keyspace = await FaultyProvider(memory, plan).keyspaces.open("k")
    with pytest.raises(InjectedFault) as info:
        await keyspace.set(b"<k>", b"<v>", "")
    assert str(info.value) == "injected fault after set on keyspace 'k': the response was lost"
    assert (info.value.retryable, info.value.ambiguous) == (False, True)
    async with await memory.keyspaces.open("k") as direct:
        assert (await direct.get(b"<k>"))[0] == b"<v>"
    assert (plan.injected_before, plan.injected_after) == (0, 1)


async def test_nth_fails_only_that_matching_call(memory: Provider) -> None:
    plan = FaultPlan()
    rule = plan.fail(AFTER, ops={"append"}, nth=3)
    assert await _attempts(FaultyProvider(memory, plan), 5) == ["ok", "ok", "after", "ok", "ok"]
    assert (rule.matched, rule.injected) == (5, 1)


async def test_every_fails_each_nth_matching_call(memory: Provider) -> None:
    plan = FaultPlan()
    plan.fail(BEFORE, every=2)
    outcomes = await _attempts(FaultyProvider(memory, plan), 6)
    assert outcomes == ["ok", "before", "ok", "before", "ok", "before"]


async def test_times_caps_the_faults_of_a_rule(memory: Provider) -> None:
    plan = FaultPlan()
    plan.fail(BEFORE, times=2)
    assert await _attempts(FaultyProvider(memory, plan), 4) == ["before", "before", "ok", "ok"]


async def test_probability_is_reproducible_with_a_seed() -> None:
    patterns = []
    for _ in range(2):
        plan = FaultPlan(seed=42)
        plan.fail(AFTER, probability=0.5)
        async with MemoryProvider() as memory:
            patterns.append(await _attempts(FaultyProvider(memory, plan), 40))
    assert patterns[0] == patterns[1]
    assert 5 < patterns[0].count("after") < 35
    assert set(patterns[0]) == {"ok", "after"}


@pytest.mark.parametrize(("probability", "expected"), [(0.0, "ok"), (1.0, "before")])
async def test_probability_zero_never_and_one_always_fails(
    memory: Provider, probability: float, expected: str
) -> None:
    plan = FaultPlan(seed=1)
    plan.fail(BEFORE, probability=probability)
    assert await _attempts(FaultyProvider(memory, plan), 5) == [expected] * 5


async def test_filters_select_by_operation_kind_and_name(memory: Provider) -> None:
    plan = FaultPlan()
    plan.fail(BEFORE, ops={"try_add"}, kinds={"set"}, names=lambda n: n.startswith("queue"))
    faulty = FaultyProvider(memory, plan)
    queue = await faulty.sets.open("queue-1")
    other = await faulty.sets.open("other")
    await queue.add(b"<m>")  # add is not try_add
    assert await other.try_add(b"<m>")
    with pytest.raises(InjectedFault, match=r"^injected fault before try_add on set 'queue-1'"):
        await queue.try_add(b"<n>")
    keyspace = await faulty.keyspaces.open("queue-k")
    await keyspace.set(b"<k>", b"<v>", "")
    assert len(plan.injected) == 1


async def test_first_firing_rule_decides_and_every_matching_rule_counts(
    memory: Provider,
) -> None:
    plan = FaultPlan()
    first = plan.fail(BEFORE, ops={"append"}, nth=2)
    second = plan.fail(AFTER, ops={"append"})
    outcomes = await _attempts(FaultyProvider(memory, plan), 3)
    assert outcomes == ["after", "before", "after"]
    assert (first.matched, first.injected) == (3, 1)
    assert (second.matched, second.injected) == (3, 2)


async def test_clear_removes_rules_but_keeps_counters(memory: Provider) -> None:
    plan = FaultPlan()
    plan.fail(BEFORE)
    faulty = FaultyProvider(memory, plan)
    assert await _attempts(faulty, 1) == ["before"]
    plan.clear()
    assert await _attempts(faulty, 1) == ["ok"]
    assert len(plan.injected) == 1


async def test_write_failing_on_its_own_is_not_reported_as_injected(memory: Provider) -> None:
    plan = FaultPlan()
    plan.fail(AFTER, ops={"append"})
    journal = await FaultyProvider(memory, plan).journals.open("j")
    with pytest.raises(Conflict):
        await journal.append(5, b"<gap>")
    assert plan.injected == []


async def test_calls_are_counted_for_reads_writes_and_opens(memory: Provider) -> None:
    plan = FaultPlan()
    faulty = FaultyProvider(memory, plan)
    await faulty.provision()
    journal = await faulty.journals.open("j")
    await journal.append(0, b"<r>")
    await journal.get(0)
    await journal.bounds()
    async with aclosing(journal.range(0)) as records:  # type: ignore[type-var]
        async for _ in records:
            break
    set_ = await faulty.sets.open("s")
    await set_.try_add(b"<m>")
    await set_.has(b"<m>")
    assert dict(plan.calls) == {
        "provision": 1,
        "open": 2,
        "append": 1,
        "get": 1,
        "bounds": 1,
        "range": 1,
        "try_add": 1,
        "has": 1,
    }


async def test_wrapper_delegates_limits_and_close(memory: Provider) -> None:
    faulty = FaultyProvider(memory)
    assert faulty.limits is memory.limits
    assert faulty.plan.rules == []
    assert repr(faulty) == f"<FaultyProvider {memory!r}>"
    journal = await faulty.journals.open("j")
    assert journal.name == "j"
    assert repr(journal) == "<faulty <memory journal 'j'>>"
    await faulty.close()
    with pytest.raises(Exception, match="closed"):
        await memory.journals.open("j")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"ops": {"get"}},
            "cannot inject faults into get; writes are add, append, remove, set, "
            "set_unconditional, truncate, try_add, try_remove",
        ),
        (
            {"kinds": {"table"}},
            "unknown store kinds ['table']; expected some of ['journal', 'keyspace', 'set']",
        ),
        ({"nth": 1, "every": 2}, "give at most one of nth, every and probability"),
        ({"nth": 0}, "nth must be at least 1, not 0"),
        ({"times": 0}, "times must be at least 1, not 0"),
        ({"probability": 1.5}, "probability must be within [0, 1], not 1.5"),
    ],
)
def test_invalid_rules_are_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        FaultPlan().fail(BEFORE, **kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


async def test_read_only_reaches_the_wrapped_provider(memory: Provider) -> None:
    # The wrapped provider does the reading and writing: an inspection tool's
    # read-only wrapper must not write through it.
    wrapper = FaultyProvider(memory)
    wrapper.set_read_only()
    assert wrapper.read_only
    assert memory.read_only


async def test_an_after_fault_whose_write_failed_on_its_own_passes_to_the_next_call(
    memory: Provider,
) -> None:
    # The write raised Conflict before the fault could be raised: nothing was
    # injected, so neither ``times`` nor ``nth`` is used up.
    plan = FaultPlan()
    capped = plan.fail(AFTER, ops={"append"}, times=1)
    journal = await FaultyProvider(memory, plan).journals.open("j")
    with pytest.raises(Conflict):
        await journal.append(5, b"<gap>")
    assert (capped.matched, capped.injected, plan.injected) == (1, 0, [])
    with pytest.raises(InjectedFault, match="after append"):
        await journal.append(0, b"<r>")
    assert (capped.matched, capped.injected) == (2, 1)
    assert plan.injected == [InjectedFaultRecord("append", "journal", "j", AFTER)]
    await journal.append(1, b"<r>")  # the rule's one fault was raised
    assert await journal.bounds() == Interval(0, 2)


async def test_an_nth_fault_whose_write_failed_on_its_own_fails_the_next_call(
    memory: Provider,
) -> None:
    plan = FaultPlan()
    rule = plan.fail(AFTER, ops={"set"}, nth=2)
    keyspace = await FaultyProvider(memory, plan).keyspaces.open("k")
    revision = await keyspace.set(b"<k>", b"<v>", "")
    with pytest.raises(Conflict):
        await keyspace.set(b"<k>", b"<w>", "<stale>")  # the 2nd call, failing on its own
    assert rule.injected == 0
    with pytest.raises(InjectedFault):
        await keyspace.set(b"<k>", b"<w>", revision)
    assert (rule.matched, rule.injected, len(plan.injected)) == (3, 1, 1)
    _, revision = await keyspace.get(b"<k>")
    await keyspace.set(b"<k>", b"<x>", revision)  # nth fired once: no more faults


async def test_racing_calls_inject_no_more_than_times(memory: Provider) -> None:
    plan = FaultPlan()
    rule = plan.fail(AFTER, ops={"try_add"}, times=3)
    set_ = await FaultyProvider(memory, plan).sets.open("s")
    results: list[str] = []

    async def add(index: int) -> None:
        try:
            await set_.try_add(b"<m%d>" % index)
        except InjectedFault:
            results.append("fault")
        else:
            results.append("ok")

    async with anyio.create_task_group() as tg:
        for index in range(20):
            tg.start_soon(add, index)
    assert results.count("fault") == 3
    assert (rule.matched, rule.injected, len(plan.injected)) == (20, 3, 3)


@pytest.mark.parametrize("timing", [BEFORE, AFTER])
async def test_invalid_inputs_raise_as_unwrapped_and_use_up_no_fault(
    memory: Provider, timing: Timing
) -> None:
    plan = FaultPlan()
    rule = plan.fail(timing, times=1)
    faulty = FaultyProvider(memory, plan)
    journal = await faulty.journals.open("j")
    keyspace = await faulty.keyspaces.open("k")
    set_ = await faulty.sets.open("s")
    limits = memory.limits
    with pytest.raises(LimitExceeded):
        await journal.append(0, b"r" * (limits.max_record_bytes + 1))
    with pytest.raises(ValueError, match=r"outside \[0, 2\*\*63-1\]"):
        await journal.append(-1, b"r")
    with pytest.raises(ValueError, match=r"outside \[0, 2\*\*63-1\]"):
        await journal.truncate(-1)
    with pytest.raises(LimitExceeded):
        await keyspace.set(b"k" * (limits.max_key_bytes + 1), b"v", "")
    with pytest.raises(ValueError, match=r"^key must not be empty$"):
        await keyspace.set_unconditional(b"", b"v")
    with pytest.raises(TypeError, match=r"^revision must be str, not bytes$"):
        await keyspace.set(b"k", b"v", b"")  # type: ignore[arg-type]
    for write in (set_.add, set_.try_add, set_.remove, set_.try_remove):
        with pytest.raises(ValueError, match=r"^member must not be empty$"):
            await write(b"")
    assert (rule.injected, plan.injected) == (0, [])
    with pytest.raises(InjectedFault):
        await journal.append(0, b"<r>")
    assert rule.injected == 1
