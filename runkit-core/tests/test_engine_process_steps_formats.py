"""ADR 0010 foundations: process steps in stream records, deliveries and instance state.

Pure tests of the formats and of the skip and fold rules the home partition
applies (``process_state``), without an engine.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

import attrs
import msgspec
import pytest

from runkit.engine.envelope import Envelope, decode
from runkit.engine.events.deadlines import DeadlineEntry
from runkit.engine.events.process_deliveries import Delivery, delivery_id, home_partition
from runkit.engine.events.process_instances import OutboxDeadline, ProcessRecord, ProcessRoot
from runkit.engine.events.process_scopes import ProcessScope
from runkit.engine.events.process_state import (
    InstanceState,
    Invoke,
    StepFailed,
    handle_group,
    poisoned_step,
)
from runkit.engine.ids import new_id
from runkit.engine.streams import (
    ProcessStep,
    StreamRecord,
    decode_stream_record,
    encode_stream_record,
)

H = "5b0c5a3e-4c1e-4b8e-9d43-0f0a3c2e9b10"
NOW = datetime(2026, 12, 7, 20, 0, tzinfo=UTC)
STREAM_A = "aaaaaaaa-0000-4000-8000-000000000000"
STREAM_B = "bbbbbbbb-0000-4000-8000-000000000000"
DL1, DL2, DL3 = (f"dddddddd-0000-4000-8000-00000000000{i}" for i in (1, 2, 3))


def envelope(message_id: str | None = None, *, scheduled_for: datetime | None = None) -> Envelope:
    mid = message_id or new_id()
    return Envelope(
        message_id=mid,
        causation_id=mid,
        correlation_id=mid,
        app_key=H,
        site_key=None,
        type_id="t",
        description="test message",
        created_at=NOW,
        scheduled_for=scheduled_for,
        data=b"x",
    )


def event(stream: str, offset: int) -> Delivery:
    return Delivery.of_event(H, "i1", envelope(), stream_id=stream, offset=offset, recorded_at=NOW)


def deadline(deadline_id: str) -> Delivery:
    return Delivery.of_deadline(H, "i1", envelope(deadline_id), scheduled_for=NOW)


# -- formats ------------------------------------------------------------------


def test_a_record_without_steps_decodes_as_before() -> None:
    old = StreamRecord(first_offset=3, inbox_position=1, inbox_end=2, written_at=NOW, writer="w")
    data = encode_stream_record(old)
    decoded = decode_stream_record(data)
    assert decoded.steps == ()
    assert decoded.dispatched is None

    class Before(msgspec.Struct, frozen=True, kw_only=True):
        first_offset: int
        inbox_position: int
        inbox_end: int
        written_at: datetime
        writer: str

    # A record written by a release without steps decodes with none.
    earlier = msgspec.msgpack.encode(
        Before(first_offset=0, inbox_position=0, inbox_end=0, written_at=NOW, writer="w")
    )
    assert decode_stream_record(earlier).steps == ()


def test_steps_round_trip_in_a_stream_record() -> None:
    step = ProcessStep(
        handler_key=H,
        instance_id="i1",
        deliveries=("d1", "d2"),
        positions=((STREAM_A, 7),),
        root=b"root",
        pending=(DL1,),
        commands=(b"c1",),
        deadlines=(b"e1",),
    )
    record = StreamRecord(
        first_offset=0,
        inbox_position=0,
        inbox_end=0,
        written_at=NOW,
        writer="w",
        steps=(step, ProcessStep(handler_key=H, instance_id="i2", ended=True)),
        dispatched=4,
    )
    decoded = decode_stream_record(encode_stream_record(record))
    assert decoded.steps == record.steps
    assert decoded.dispatched == 4
    assert decoded.steps[0].has_outbox
    assert not decoded.steps[1].has_outbox


def test_a_steps_size_estimate_covers_its_encoding() -> None:
    step = ProcessStep(
        handler_key=H,
        instance_id="é" * 300,
        deliveries=tuple(new_id() for _ in range(5)),
        positions=((STREAM_A, 2**40), (STREAM_B, 1)),
        root=b"r" * 1000,
        pending=tuple(new_id() for _ in range(3)),
        commands=(b"c" * 500,) * 3,
        deadlines=(b"d" * 300,),
    )
    assert len(msgspec.msgpack.encode(step)) <= step.size()


def test_delivery_ids_are_derived_per_cause_and_handler() -> None:
    cause = new_id()
    assert delivery_id(cause, H) == delivery_id(cause, H)
    assert delivery_id(cause, H) != delivery_id(cause, "other-handler")
    assert delivery_id(cause, H) != delivery_id(new_id(), H)
    env = envelope(cause)
    d = Delivery.of_event(H, "i", env, stream_id=STREAM_A, offset=3, recorded_at=NOW)
    assert d.id == delivery_id(cause, H)
    assert d.stream == (STREAM_A, 3)
    assert Delivery.of_deadline(H, "i", env, scheduled_for=NOW).deadline_id == cause


def test_home_partition_is_where_the_instances_deadlines_live() -> None:
    from runkit.engine.partitions import instance_workload, partition_of

    for instance in ("a", "b", "tx-1"):
        assert home_partition(H, instance, 16) == partition_of(instance_workload(H, instance), 16)


# -- state: skip and fold ----------------------------------------------------------


def test_skip_rules() -> None:
    state = InstanceState(positions={STREAM_A: 5}, pending=(DL1,))
    assert state.done(event(STREAM_A, 5))
    assert state.done(event(STREAM_A, 0))
    assert not state.done(event(STREAM_A, 6))
    assert not state.done(event(STREAM_B, 0))
    assert not state.done(deadline(DL1))
    assert state.done(deadline(DL2))
    ended = attrs.evolve(state, ended=True)
    assert ended.done(event(STREAM_B, 99))
    assert ended.done(deadline(DL1))


def test_fold_applies_what_changed_and_skips_what_the_record_includes() -> None:
    state = InstanceState.of_record(
        ProcessRecord(root=b"r0", positions={STREAM_A: 1}, pending_deadlines=["x"], through=(3, 0))
    )
    assert state.includes((3, 0))
    assert state.includes((2, 5))
    assert not state.includes((3, 1))
    unchanged = state.after(ProcessStep(handler_key=H, instance_id="i1", root=b"old"), (2, 0))
    assert unchanged is state
    s1 = state.after(
        ProcessStep(handler_key=H, instance_id="i1", positions=((STREAM_B, 4),)), (4, 0)
    )
    assert s1.root == b"r0"
    assert s1.pending == ("x",)
    assert s1.positions == {STREAM_A: 1, STREAM_B: 4}
    assert s1.through == (4, 0)
    s2 = s1.after(ProcessStep(handler_key=H, instance_id="i1", root=b"r1", pending=()), (4, 1))
    assert s2.root == b"r1"
    assert s2.pending == ()
    # Positions never go back.
    s3 = s2.after(ProcessStep(handler_key=H, instance_id="i1", positions=((STREAM_A, 0),)), (5, 0))
    assert s3.positions[STREAM_A] == 1
    ended = s3.after(ProcessStep(handler_key=H, instance_id="i1", ended=True), (6, 0))
    assert ended.ended
    assert ended.root is None
    assert ended.pending == ()
    assert ended.positions == s3.positions
    record = ended.record()
    assert record.ended
    assert record.through == (6, 0)
    assert not record.has_outbox
    assert InstanceState.of_record(record) == ended


def test_a_record_written_before_steps_precedes_every_step() -> None:
    state = InstanceState.of_record(ProcessRecord(root=b"r"))
    assert state.through is None
    assert not state.includes((0, 0))


# -- handling a group ------------------------------------------------------------


@attrs.define
class FakeScope:
    mutated: bool = False
    ended: bool = False
    commands: list[Envelope] = attrs.field(factory=list)
    deadlines: list[OutboxDeadline] = attrs.field(factory=list)


class Root:
    def __init__(self) -> None:
        self.value = b""

    def marshal_binary(self) -> bytes:
        return self.value

    def unmarshal_binary(self, data: bytes) -> None:
        self.value = data


def scripted(script: dict[str, object]) -> tuple[list[str], Invoke]:
    """An ``Invoke`` that does what *script* says for each delivery ID."""
    calls: list[str] = []

    async def invoke(delivery: Delivery, root: ProcessRoot) -> ProcessScope:
        calls.append(delivery.id)
        action = script.get(delivery.id, "mutate")
        scope = FakeScope()
        if isinstance(action, Exception):
            cast(Root, root).value += b"!"  # a failing handler may change the root first
            raise action
        if action == "mutate":
            cast(Root, root).value += b"m"
            scope.mutated = True
            scope.commands.append(envelope())
        elif action == "end":
            scope.ended = True
            scope.commands.append(envelope())
        elif action == "schedule":
            dl = new_id()
            scope.deadlines.append(
                OutboxDeadline(
                    partition=0,
                    entry=DeadlineEntry(
                        handler_key=H,
                        instance_id="i1",
                        deadline_id=dl,
                        scheduled_for=NOW,
                        envelope=b"",
                    ),
                )
            )
        return cast(ProcessScope, scope)

    return calls, invoke


@pytest.mark.anyio
async def test_a_group_is_one_step_with_what_changed() -> None:
    d1, d2, d3 = event(STREAM_A, 3), event(STREAM_A, 4), event(STREAM_B, 0)
    calls, invoke = scripted({d2.id: "schedule", d3.id: "noop"})
    state = InstanceState(positions={STREAM_A: 2, STREAM_B: -1})
    root = Root()
    handled = await handle_group(
        state, root, [d1, d2, d3], handler_key=H, instance_id="i1", invoke=invoke
    )
    step = handled.step
    assert step is not None
    assert calls == [d1.id, d2.id, d3.id]
    assert step.deliveries == (d1.id, d2.id, d3.id)
    assert dict(step.positions) == {STREAM_A: 4, STREAM_B: 0}
    assert step.root == b"m"
    assert len(step.commands) == 1
    assert step.pending is not None
    assert len(step.pending) == 1
    assert len(step.deadlines) == 1
    entry = msgspec.msgpack.decode(step.deadlines[0], type=DeadlineEntry)
    assert entry.deadline_id == step.pending[0]
    assert decode(step.commands[0]).message_id
    assert handled.state.positions == {STREAM_A: 4, STREAM_B: 0}
    assert handled.state.root == b"m"


@pytest.mark.anyio
async def test_done_deliveries_are_skipped_but_listed() -> None:
    old, new = event(STREAM_A, 1), event(STREAM_A, 2)
    calls, invoke = scripted({})
    state = InstanceState(positions={STREAM_A: 1})
    handled = await handle_group(
        state, Root(), [old, new], handler_key=H, instance_id="i1", invoke=invoke
    )
    assert calls == [new.id]
    assert handled.step is not None
    assert handled.step.deliveries == (old.id, new.id)
    nothing = await handle_group(
        handled.state, Root(), [old, new], handler_key=H, instance_id="i1", invoke=invoke
    )
    assert nothing.step is None
    assert nothing.state is handled.state
    assert calls == [new.id]


@pytest.mark.anyio
async def test_the_same_event_twice_in_one_group_is_handled_once() -> None:
    d = event(STREAM_A, 0)
    calls, invoke = scripted({})
    handled = await handle_group(
        InstanceState(), Root(), [d, d], handler_key=H, instance_id="i1", invoke=invoke
    )
    assert calls == [d.id]
    assert handled.step is not None


@pytest.mark.anyio
async def test_ending_drops_the_root_and_deadlines_and_stops_the_group() -> None:
    sched, end, after = event(STREAM_A, 0), event(STREAM_A, 1), event(STREAM_B, 0)
    calls, invoke = scripted({sched.id: "schedule", end.id: "end"})
    handled = await handle_group(
        InstanceState(pending=("old",)),
        Root(),
        [sched, end, after],
        handler_key=H,
        instance_id="i1",
        invoke=invoke,
    )
    step = handled.step
    assert step is not None
    assert calls == [sched.id, end.id]
    assert step.ended
    assert step.root is None
    assert step.deadlines == ()
    assert len(step.commands) == 1
    assert handled.state.ended
    assert handled.state.pending == ()
    assert handled.state.done(after)


@pytest.mark.anyio
async def test_a_deadline_is_handled_only_while_pending() -> None:
    calls, invoke = scripted({})
    state = InstanceState(pending=(DL1, DL2))
    handled = await handle_group(
        state,
        Root(),
        [deadline(DL1), deadline(DL3)],
        handler_key=H,
        instance_id="i1",
        invoke=invoke,
    )
    assert handled.step is not None
    assert handled.step.pending == (DL2,)
    assert len(calls) == 1


@pytest.mark.anyio
async def test_a_failure_in_a_group_names_its_delivery() -> None:
    d1, d2 = event(STREAM_A, 0), event(STREAM_A, 1)
    boom = ValueError("boom")
    _, invoke = scripted({d2.id: boom})
    with pytest.raises(StepFailed) as failed:
        await handle_group(
            InstanceState(), Root(), [d1, d2], handler_key=H, instance_id="i1", invoke=invoke
        )
    assert failed.value.index == 1
    assert failed.value.error is boom
    with pytest.raises(ValueError):
        await handle_group(
            InstanceState(), Root(), [d2], handler_key=H, instance_id="i1", invoke=invoke
        )


def test_a_poisoned_delivery_passes_its_position_or_leaves_the_pending_list() -> None:
    state = InstanceState(positions={STREAM_A: 0}, pending=(DL1,))
    d = event(STREAM_A, 3)
    step, after = poisoned_step(H, "i1", state, d)
    assert step.poisoned
    assert step.deliveries == (d.id,)
    assert after.done(d)
    assert after.root == state.root
    assert after.pending == (DL1,)
    dstep, dafter = poisoned_step(H, "i1", state, deadline(DL1))
    assert dstep.pending == ()
    assert dafter.done(deadline(DL1))
