"""Projection delivery (Dogma ADR-26), MINIMIZE, compact() and reset(), on real streams."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

import dogma
from runkit.config import build
from runkit.engine.events.consumers import ConsumerOptions, partition_consumers, runs_node_work
from runkit.engine.events.projections import (
    ProjectionNotResettable,
    reset_projection,
)

sys.path.insert(0, str(Path(__file__).parent))
from engine_events_harness import Harness, harness, wait_until

REGISTRY = dogma.MessageTypeRegistry()
APP_KEY = "a1000000-0000-4000-8000-000000000001"
PROJ_KEY = "b1000000-0000-4000-8000-000000000001"
OPTIONS = ConsumerOptions(retry_initial=0.001, retry_max=0.01, compact_interval=0.01)


@dogma.register_event("e1000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Happened(dogma.Event):
    n: int


@dogma.register_event("e1000000-0000-4000-8000-000000000002", registry=REGISTRY)
@attrs.frozen
class Ignored(dogma.Event):
    n: int


class Projection:
    """An ADR-26 projection over in-memory state (like projectionkit's sqlprojection)."""

    def __init__(
        self,
        *,
        key: str = PROJ_KEY,
        name: str = "proj",
        concurrency: dogma.ConcurrencyPreference | None = None,
    ) -> None:
        self.key = key
        self.name = name
        self.concurrency = concurrency
        self.checkpoints: dict[str, int] = {}
        self.applied: list[tuple[str, int, int]] = []  # (stream, offset, n)
        self.scopes: list[tuple[int, int]] = []  # (offset, checkpoint_offset) per call
        self.compactions = 0
        self.fail_next = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0
        self.before_apply: Any = None

    def configure(self, c: Any) -> None:
        c.identity(self.name, self.key)
        c.routes(dogma.handles_event(Happened, registry=REGISTRY))
        if self.concurrency is not None:
            c.concurrency_preference(self.concurrency)

    async def handle_event(self, scope: dogma.ProjectionEventScope, event: Happened) -> int:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await anyio.sleep(self.delay)
            self.scopes.append((scope.offset, scope.checkpoint_offset))
            if self.before_apply is not None:
                self.before_apply(scope)
            stored = self.checkpoints.get(scope.stream_id, 0)
            if stored != scope.checkpoint_offset:
                return stored  # OCC mismatch: change nothing
            if self.fail_next:
                self.fail_next -= 1
                raise RuntimeError("transient failure")
            assert isinstance(event, Happened)
            assert scope.now() is not None
            self.applied.append((scope.stream_id, scope.offset, event.n))
            self.checkpoints[scope.stream_id] = scope.offset + 1
            return scope.offset + 1
        finally:
            self.in_flight -= 1

    async def checkpoint_offset(self, stream_id: str) -> int:
        return self.checkpoints.get(stream_id, 0)

    async def compact(self, scope: Any) -> None:
        scope.log("compacting %d", self.compactions)
        self.compactions += 1

    async def reset(self, scope: Any) -> None:
        self.checkpoints.clear()
        self.applied.clear()


class NotResettable(Projection):
    async def reset(self, scope: Any) -> None:
        raise dogma.NotSupported("reset")


@attrs.frozen
class App:
    projections: tuple[Projection, ...]

    def configure(self, c: Any) -> None:
        c.identity("app", APP_KEY)
        c.routes(*(dogma.via_projection(p) for p in self.projections))


async def run_consumers(h: Harness, tg: Any, partitions: range | None = None) -> Any:
    consumers = partition_consumers(h.app, h.settings, options=OPTIONS)
    for i in partitions if partitions is not None else range(h.partitions):
        await tg.start(consumers.run_partition, h.ctx(i))
    return consumers


def ns(p: Projection, stream: str) -> list[int]:
    return [n for s, _, n in p.applied if s == stream]


async def test_applies_each_event_once_in_stream_order() -> None:
    p = Projection()
    async with harness(App((p,)), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        await h.publish(Happened(0), Happened(1), partition=0)
        await run_consumers(h, tg)
        await h.publish(Happened(2), partition=0)
        await h.publish(Happened(10), Ignored(0), Happened(11), partition=1)
        s0, s1 = h.streams[0].stream_id, h.streams[1].stream_id
        await wait_until(lambda: len(p.applied) == 5)
        await anyio.sleep(0.01)
        assert ns(p, s0) == [0, 1, 2]
        assert ns(p, s1) == [10, 11]
        # Offsets are the stream's; the unrouted event is skipped, so the
        # handler's checkpoint can trail the offset (ADR-26 rule 1).
        assert [o for s, o, _ in p.applied if s == s1] == [0, 2]
        assert p.checkpoints == {s0: 3, s1: 3}
        tg.cancel_scope.cancel()


async def test_delivery_starts_at_the_handlers_checkpoint() -> None:
    p = Projection()
    async with (
        harness(App((p,)), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(*(Happened(i) for i in range(5)))
        p.checkpoints[h.streams[0].stream_id] = 3
        await run_consumers(h, tg)
        await wait_until(lambda: len(p.applied) == 2)
        assert ns(p, h.streams[0].stream_id) == [3, 4]
        assert p.scopes[0] == (3, 3)
        tg.cancel_scope.cancel()


async def test_restart_does_not_reapply() -> None:
    p = Projection()
    async with harness(App((p,)), registry=REGISTRY, partitions=1) as h:
        await h.publish(*(Happened(i) for i in range(3)))
        async with anyio.create_task_group() as tg:
            await run_consumers(h, tg)
            await wait_until(lambda: len(p.applied) == 3)
            tg.cancel_scope.cancel()
        await h.publish(Happened(3))
        async with anyio.create_task_group() as tg:
            await run_consumers(h, tg)
            await wait_until(lambda: len(p.applied) == 4)
            await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        assert ns(p, h.streams[0].stream_id) == [0, 1, 2, 3]


def _once_at(offset: int, change: Callable[[], None]) -> Callable[[Any], None]:
    """A ``before_apply`` hook that runs *change* the first time *offset* is delivered."""
    done = False

    def hook(scope: Any) -> None:
        nonlocal done
        if scope.offset == offset and not done:
            done = True
            change()

    return hook


async def test_occ_higher_checkpoint_skips_events() -> None:
    p = Projection()
    async with (
        harness(App((p,)), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        stream = h.streams[0].stream_id

        def jump(scope: Any) -> None:
            # Another writer moves the handler's checkpoint past offsets 1..3.
            if scope.offset == 1 and p.checkpoints.get(stream) == 1:
                p.checkpoints[stream] = 4

        p.before_apply = jump
        await h.publish(*(Happened(i) for i in range(6)))
        await run_consumers(h, tg)
        await wait_until(lambda: len(p.applied) == 3)
        await anyio.sleep(0.01)
        assert ns(p, stream) == [0, 4, 5]
        # Offset 1 was refused with 4; delivery resumed at offset 4 with checkpoint 4.
        assert p.scopes == [(0, 0), (1, 1), (4, 4), (5, 5)]
        tg.cancel_scope.cancel()


async def test_occ_lower_checkpoint_redelivers() -> None:
    p = Projection()
    async with (
        harness(App((p,)), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        stream = h.streams[0].stream_id

        def rewind() -> None:
            # The handler's data is rolled back to checkpoint 1 (e.g. restored).
            p.checkpoints[stream] = 1
            del p.applied[1:]

        p.before_apply = _once_at(3, rewind)
        await h.publish(*(Happened(i) for i in range(5)))
        await run_consumers(h, tg)
        await wait_until(lambda: len(p.applied) == 5)
        await anyio.sleep(0.01)
        assert ns(p, stream) == [0, 1, 2, 3, 4]
        assert p.scopes[3:5] == [(3, 3), (1, 1)]
        tg.cancel_scope.cancel()


async def test_occ_checkpoint_at_the_delivered_offset_redelivers_that_event() -> None:
    p = Projection()
    async with (
        harness(App((p,)), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        stream = h.streams[0].stream_id

        def move_to_the_event() -> None:
            # Delivered with checkpoint 1 (offsets 1 and 2 are not routed), the
            # handler is at 3 (another writer moved it): "send me offset 3".
            p.checkpoints[stream] = 3

        p.before_apply = _once_at(3, move_to_the_event)
        await h.publish(Happened(0), Ignored(1), Ignored(2), Happened(3), Happened(4))
        await run_consumers(h, tg)
        await wait_until(lambda: len(p.applied) == 3)
        await anyio.sleep(0.01)
        assert ns(p, stream) == [0, 3, 4], "the event at the handler's checkpoint was skipped"
        assert p.scopes == [(0, 0), (3, 1), (3, 3), (4, 4)]
        tg.cancel_scope.cancel()


async def test_redelivery_after_an_applied_but_unacknowledged_event_is_harmless() -> None:
    p = Projection()
    async with (
        harness(App((p,)), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        stream = h.streams[0].stream_id
        original = p.handle_event
        lost = False

        async def applies_then_fails(scope: dogma.ProjectionEventScope, event: Happened) -> int:
            nonlocal lost
            result = await original(scope, event)
            if scope.offset == 1 and not lost:
                lost = True
                raise ConnectionError("response lost after commit")
            return result

        p.handle_event = applies_then_fails  # type: ignore[method-assign]
        await h.publish(*(Happened(i) for i in range(3)))
        await run_consumers(h, tg)
        await wait_until(lambda: len(p.applied) == 3 and p.checkpoints[stream] == 3)
        await anyio.sleep(0.01)
        assert ns(p, stream) == [0, 1, 2]
        # The retry of offset 1 came with the old checkpoint; the handler
        # answered offset+1 (already applied) and the engine moved on.
        assert p.scopes.count((1, 1)) == 2
        tg.cancel_scope.cancel()


async def test_errors_are_retried() -> None:
    p = Projection()
    p.fail_next = 3
    async with (
        harness(App((p,)), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(Happened(0), Happened(1))
        await run_consumers(h, tg)
        await wait_until(lambda: len(p.applied) == 2)
        assert ns(p, h.streams[0].stream_id) == [0, 1]
        tg.cancel_scope.cancel()


async def test_checkpoint_offset_errors_are_retried() -> None:
    p = Projection()
    failures = 2
    original = p.checkpoint_offset

    async def flaky(stream_id: str) -> int:
        nonlocal failures
        if failures:
            failures -= 1
            raise ConnectionError("down")
        return await original(stream_id)

    p.checkpoint_offset = flaky  # type: ignore[method-assign]
    async with (
        harness(App((p,)), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(Happened(0))
        await run_consumers(h, tg)
        await wait_until(lambda: len(p.applied) == 1)
        assert failures == 0
        tg.cancel_scope.cancel()


async def test_store_outage_errors_from_the_handler_are_one_line_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A projection keeping its state in the engine's store fails with a
    # retryable PersistenceError while the store is down: that is an outage,
    # not a bug in the handler. Before, the first failure of each partition's
    # delivery was logged as an ERROR with a traceback (some 25 lines each, per
    # projection and partition, at every outage); a bug (below) still is.
    from runkit.persistence import PersistenceError, StoreUnavailable

    p = Projection()
    handle = p.handle_event
    check = p.checkpoint_offset
    failures = {"handle": 3, "checkpoint": 2}

    async def down(scope: dogma.ProjectionEventScope, event: Happened) -> int:
        if failures["handle"]:
            failures["handle"] -= 1
            raise PersistenceError(
                "keyspace 'p': set: lost the connection", retryable=True, ambiguous=True
            )
        return await handle(scope, event)

    async def unreachable(stream_id: str) -> int:
        if failures["checkpoint"]:
            failures["checkpoint"] -= 1
            raise StoreUnavailable("keyspace 'p': get: the store is unreachable", retryable=True)
        return await check(stream_id)

    p.handle_event = down  # type: ignore[method-assign]
    p.checkpoint_offset = unreachable  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger="runkit.engine.events.projections")
    async with (
        harness(App((p,)), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(Happened(0), Happened(1))
        await run_consumers(h, tg)
        await wait_until(lambda: len(p.applied) == 2)
        tg.cancel_scope.cancel()
    records = [r for r in caplog.records if r.name == "runkit.engine.events.projections"]
    assert records, "the failures were not logged"
    for record in records:
        assert record.levelno == logging.WARNING, record.getMessage()
        assert record.exc_info is None, f"logged with a traceback: {record.getMessage()}"
        assert "\n" not in record.getMessage()
    assert any("lost the connection" in r.getMessage() for r in records)
    assert any("unreachable" in r.getMessage() for r in records)


async def test_a_handler_bug_is_logged_with_its_traceback_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    p = Projection()
    p.fail_next = 3
    async with (
        harness(App((p,)), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(Happened(0))
        await run_consumers(h, tg)
        await wait_until(lambda: len(p.applied) == 1)
        tg.cancel_scope.cancel()
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert [r.levelno for r in failed][:1] == [logging.ERROR]
    assert [r.exc_info is not None for r in failed] == [True] + [False] * (len(failed) - 1)


async def test_its_own_database_failing_on_every_partition_logs_one_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A projection whose own database goes away fails on every partition at
    # once: each partition's first failure was logged with a traceback (some 25
    # lines, 16 times per projection at the default partition count). One
    # traceback per kind of error; the other partitions log one line.
    p = Projection()
    handle = p.handle_event
    failures = dict.fromkeys(range(4), 2)

    async def own_database_down(scope: dogma.ProjectionEventScope, event: Happened) -> int:
        partition = event.n
        if failures[partition]:
            failures[partition] -= 1
            raise OSError("could not connect to the projection's database")
        return await handle(scope, event)

    p.handle_event = own_database_down  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger="runkit.engine.events.projections")
    async with (
        harness(App((p,)), registry=REGISTRY, partitions=4) as h,
        anyio.create_task_group() as tg,
    ):
        for partition in range(4):
            await h.publish(Happened(partition), partition=partition)
        await run_consumers(h, tg)
        await wait_until(lambda: len(p.applied) == 4)
        tg.cancel_scope.cancel()
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len({r.getMessage().split(" failed")[0] for r in failed}) == 4  # every partition
    assert [r for r in failed if r.exc_info is not None] == failed[:1]
    assert failed[0].levelno == logging.ERROR


async def test_a_bad_checkpoint_offset_result_is_retried_not_fatal() -> None:
    # A projection bug (say, None while its row is missing) stalls that
    # projection only, as a bad handle_event() result does: the partition's
    # other work is not restarted by it.
    p = Projection()
    bad_reads = 2
    original = p.checkpoint_offset

    async def buggy(stream_id: str) -> Any:
        nonlocal bad_reads
        if bad_reads:
            bad_reads -= 1
            return None
        return await original(stream_id)

    p.checkpoint_offset = buggy  # type: ignore[method-assign]
    async with (
        harness(App((p,)), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(Happened(0))
        await run_consumers(h, tg)
        await wait_until(lambda: len(p.applied) == 1)
        assert bad_reads == 0
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("preference", "parallel"),
    [(dogma.ConcurrencyPreference.MINIMIZE, False), (dogma.ConcurrencyPreference.MAXIMIZE, True)],
)
async def test_concurrency_preference(
    preference: dogma.ConcurrencyPreference, parallel: bool
) -> None:
    p = Projection(concurrency=preference)
    p.delay = 0.005
    async with (
        harness(App((p,)), registry=REGISTRY, partitions=3) as h,
        anyio.create_task_group() as tg,
    ):
        for i in range(3):
            await h.publish(*(Happened(10 * i + j) for j in range(4)), partition=i)
        await run_consumers(h, tg)
        await wait_until(lambda: len(p.applied) == 12)
        # MINIMIZE: never two at once across partitions; MAXIMIZE: they overlap.
        assert (p.max_in_flight > 1) is parallel
        tg.cancel_scope.cancel()


async def test_compact_runs_periodically_on_the_node() -> None:
    p = Projection()
    async with (
        harness(App((p,)), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        consumers = partition_consumers(h.app, h.settings, options=OPTIONS)
        await tg.start(consumers.run_node, h.node_ctx())
        await wait_until(lambda: p.compactions >= 2)
        tg.cancel_scope.cancel()


async def test_compact_runs_soon_after_start_not_one_interval_later() -> None:
    # A node restarted more often than compact_interval must still compact.
    compacted = anyio.Event()

    class Compacting(Projection):
        async def compact(self, scope: Any) -> None:
            compacted.set()

    options = ConsumerOptions(compact_interval=3600.0, first_compact_delay=0.05)
    async with (
        harness(App((Compacting(),)), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        consumers = partition_consumers(h.app, h.settings, options=options)
        await tg.start(consumers.run_node, h.node_ctx())
        with anyio.fail_after(30):
            await compacted.wait()
        tg.cancel_scope.cancel()


async def test_compact_is_skipped_on_a_node_that_does_not_win() -> None:
    p = Projection()
    me = "00000000-0000-4000-8000-0000000000aa"
    other = "00000000-0000-4000-8000-0000000000bb"
    winner = me if runs_node_work(PROJ_KEY, me, {me, other}) else other
    loser = other if winner == me else me
    async with (
        harness(App((p,)), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        consumers = partition_consumers(
            h.app, h.settings, options=OPTIONS, live_nodes=lambda: {me, other}
        )
        await tg.start(consumers.run_node, h.node_ctx(loser))
        await anyio.sleep(0.05)
        assert p.compactions == 0
        await tg.start(consumers.run_node, h.node_ctx(winner))
        await wait_until(lambda: p.compactions >= 1)
        tg.cancel_scope.cancel()


def test_runs_node_work_picks_exactly_one_live_node() -> None:
    nodes = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 6)]
    for k in range(20):
        key = f"b1000000-0000-4000-8000-0000000000{k:02d}"
        assert sum(runs_node_work(key, n, nodes) for n in nodes) == 1
    # Alone (or not yet seen in the live set), a node does the work itself.
    assert runs_node_work(PROJ_KEY, nodes[0], [])
    assert runs_node_work(PROJ_KEY, nodes[0], [nodes[0]])


async def test_reset_rebuilds_from_offset_zero_while_running() -> None:
    p = Projection()
    async with (
        harness(App((p,)), registry=REGISTRY, partitions=2) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(Happened(0), Happened(1), partition=0)
        await h.publish(Happened(2), partition=1)
        consumers = await run_consumers(h, tg)
        await wait_until(lambda: len(p.applied) == 3)
        await consumers.reset_projection("proj", clock=h.clock)
        await wait_until(lambda: len(p.applied) == 3)
        await h.publish(Happened(3), partition=1)
        await wait_until(lambda: len(p.applied) == 4)
        await anyio.sleep(0.01)
        assert sorted(n for _, _, n in p.applied) == [0, 1, 2, 3]
        tg.cancel_scope.cancel()


async def test_reset_waits_for_an_in_flight_delivery() -> None:
    p = Projection()
    entered, release = anyio.Event(), anyio.Event()
    cancelled = False

    async def slow(scope: Any) -> None:
        nonlocal cancelled
        entered.set()
        try:
            await release.wait()
        except anyio.get_cancelled_exc_class():
            cancelled = True
            raise

    p.before_apply = None
    original = p.handle_event

    async def handle(scope: dogma.ProjectionEventScope, event: Happened) -> int:
        if not p.applied and not cancelled:
            await slow(scope)
        return await original(scope, event)

    p.handle_event = handle  # type: ignore[method-assign]
    async with (
        harness(App((p,)), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(Happened(0))
        consumers = await run_consumers(h, tg)
        await entered.wait()
        await consumers.reset_projection(PROJ_KEY, clock=h.clock)  # by key
        assert cancelled  # delivery stopped before reset() ran
        await wait_until(lambda: len(p.applied) == 1)
        tg.cancel_scope.cancel()


async def test_reset_without_an_engine_and_errors() -> None:
    p, q = Projection(), NotResettable(key="b1000000-0000-4000-8000-000000000002", name="q")
    config = build(App((p, q)), registry=REGISTRY)
    p.checkpoints["s"] = 5
    await reset_projection(config, "proj", clock=lambda: None)  # type: ignore[arg-type,return-value]
    assert p.checkpoints == {}
    with pytest.raises(ProjectionNotResettable, match="does not support reset"):
        await reset_projection(config, "q", clock=lambda: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(LookupError, match="no projection named 'nope'"):
        await reset_projection(config, "nope", clock=lambda: None)  # type: ignore[arg-type,return-value]


async def test_two_nodes_delivering_the_same_partitions_apply_each_event_once() -> None:
    p = Projection()
    p.delay = 0.001
    async with harness(App((p,)), registry=REGISTRY) as h, anyio.create_task_group() as tg:
        await run_consumers(h, tg)
        await run_consumers(h, tg)
        for n in range(20):
            await h.publish(Happened(n), partition=n % 2)
        await wait_until(lambda: len(p.applied) == 20)
        await anyio.sleep(0.02)
        assert sorted(n for _, _, n in p.applied) == list(range(20))
        tg.cancel_scope.cancel()


async def test_returning_the_scopes_checkpoint_is_retried_with_backoff() -> None:
    # ADR-26: a handler whose checkpoint equals scope.checkpoint_offset applies
    # the event and returns offset + 1. Returning scope.checkpoint_offset
    # (a bug: "skip this one") used to send the engine straight back to the
    # same event, over and over, with no pause (and no await at all for a
    # handler that does no I/O, which froze the event loop).
    p = Projection()
    original = p.handle_event
    refusing = True
    calls = 0

    async def refuses_offset_1(scope: dogma.ProjectionEventScope, event: Happened) -> int:
        nonlocal calls
        if scope.offset == 1 and refusing:
            calls += 1
            await anyio.lowlevel.checkpoint()
            return scope.checkpoint_offset
        return await original(scope, event)

    p.handle_event = refuses_offset_1  # type: ignore[method-assign]
    async with (
        harness(App((p,)), registry=REGISTRY, partitions=1) as h,
        anyio.create_task_group() as tg,
    ):
        await h.publish(*(Happened(i) for i in range(3)))
        await run_consumers(h, tg)
        await wait_until(lambda: calls > 0)
        await anyio.sleep(0.1)
        assert calls < 50  # backoff between attempts (retry_max is 0.01 s)
        refusing = False
        await wait_until(lambda: len(p.applied) == 3)
        assert ns(p, h.streams[0].stream_id) == [0, 1, 2]
        tg.cancel_scope.cancel()


async def test_store_errors_far_apart_do_not_add_up_to_the_longest_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Delivery restarts after a store error with a backoff that grows with the
    # failures in a row; a run that was healthy for a while starts the count
    # again. Before, the count never went down: after a few errors in a node's
    # life every restart waited the full cap.
    from types import SimpleNamespace

    from runkit.engine.events import consumers_support, projections
    from runkit.persistence import PersistenceError

    runs = iter([0.0, 0.0, 0.0, 0.05, 0.0])  # how long each run lasts before it fails
    waits: list[int] = []

    async def deliver(*args: Any, **kwargs: Any) -> None:
        seconds = next(runs, None)
        if seconds is None:
            return  # delivery ends (the partition stops)
        await anyio.sleep(seconds)
        raise PersistenceError("the store is away")

    async def record_backoff(options: ConsumerOptions, attempt: int) -> None:
        waits.append(attempt)

    monkeypatch.setattr(projections, "_deliver", deliver)
    monkeypatch.setattr(projections, "sleep_backoff", record_backoff)
    monkeypatch.setattr(consumers_support, "sleep_backoff", record_backoff)
    config = SimpleNamespace(identity=SimpleNamespace(key=PROJ_KEY), describe=lambda: "proj")
    with anyio.fail_after(5):
        await projections.run_projection(
            SimpleNamespace(index=0),  # type: ignore[arg-type]
            config,  # type: ignore[arg-type]
            options=attrs.evolve(OPTIONS, retry_max=0.02),
            control=projections.ProjectionControl(),
            serialise=None,
        )
    assert waits == [1, 2, 3, 1, 2]
