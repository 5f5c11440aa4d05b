"""ADR 0010: a stopping ``HomeSteps`` starts no task in its closed task group.

Others call into a home partition's steps from their own tasks: a consumer
submits a delivery, and the partition's stream writer reports a step durable
(whose outbox then goes to a dispatching worker). The writer may do so while
the steps' task group is closing, or has just closed and ``run`` has not yet
got past it (seen as "Nursery is closed to new arrivals" from the stream
writer, in the process test files): that must neither raise there nor start
a worker, but refuse the delivery (``OwnershipLost``: the submitter uses the
inbox) and leave the outbox below the dispatched watermark for the next owner.
"""

from __future__ import annotations

import types
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

from runkit.engine.envelope import Envelope
from runkit.engine.events import process_homes
from runkit.engine.events.consumers_support import ConsumerOptions
from runkit.engine.events.process_deliveries import Delivery
from runkit.engine.events.process_homes import HomeSteps
from runkit.engine.events.process_state import InstanceState
from runkit.engine.streams import OwnershipLost, ProcessStep, Publication
from runkit_memory import MemoryProvider

pytestmark = pytest.mark.anyio

PROC_KEY = "b9a30000-0000-4000-8000-000000000001"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def envelope(message_id: str) -> Envelope:
    return Envelope(
        message_id=message_id,
        causation_id=message_id,
        correlation_id=message_id,
        app_key="a9a30000-0000-4000-8000-000000000001",
        site_key=None,
        type_id="e9a30000-0000-4000-8000-000000000001",
        description="an event",
        created_at=NOW,
        data=b"",
    )


def delivery(n: int) -> Delivery:
    return Delivery.of_event(
        PROC_KEY, "a", envelope(str(uuid.uuid4())), stream_id="s", offset=n, recorded_at=NOW
    )


class Handler:
    """Every delivery produces one command (so its step has an outbox)."""

    key = PROC_KEY
    retries: Any = None  # no delivery fails here

    def __init__(self) -> None:
        self.dispatched: list[ProcessStep] = []

    async def invoke_delivery(self, ctx: Any, delivery: Delivery, root: Any) -> Any:
        command = envelope(str(uuid.uuid4()))
        return types.SimpleNamespace(mutated=False, commands=[command], ended=False, deadlines=[])

    def root_from(self, data: bytes | None) -> Any:
        return object()

    async def dispatch_step(self, ctx: Any, instance_id: str, step: ProcessStep) -> None:
        self.dispatched.append(step)


class Writer:
    """Holds the steps enqueued; ``commit`` reports them durable, as the writer's task does."""

    def __init__(self) -> None:
        self.queued: list[tuple[Publication, Callable[[Publication], None] | None]] = []
        self.enqueued = anyio.Event()

    def enqueue_step(
        self, step: ProcessStep, on_durable: Callable[[Publication], None] | None = None
    ) -> Publication:
        publication = Publication(step.instance_id, (), step.size(), step=step)
        self.queued.append((publication, on_durable))
        self.enqueued.set()
        return publication

    def commit(self) -> None:
        queued, self.queued = self.queued, []
        for position, (publication, on_durable) in enumerate(queued):
            publication.position, publication.index = position, 0
            if on_durable is not None:
                on_durable(publication)


class _ClosingGroup:
    """A task group that calls *after* once it has closed, before its ``async with`` ends."""

    def __init__(self, after: Callable[[], None]) -> None:
        self._tg = anyio.create_task_group()
        self._after = after

    async def __aenter__(self) -> Any:
        return await self._tg.__aenter__()

    async def __aexit__(self, *exc: Any) -> bool | None:
        try:
            return await self._tg.__aexit__(*exc)
        finally:
            self._after()


async def test_a_stopping_home_refuses_submissions_and_leaves_late_outboxes_to_the_next_owner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler, writer = Handler(), Writer()
    ctx: Any = types.SimpleNamespace(index=0, provider=MemoryProvider(str(uuid.uuid4())))

    async def load(handler_key: str, instance_id: str) -> InstanceState:
        return InstanceState()

    home = HomeSteps(
        ctx, writer, {PROC_KEY: handler}, load=load, options=ConsumerOptions(), record_limit=1 << 20
    )
    acks: list[BaseException | None] = []
    late: list[BaseException] = []

    def closed() -> None:
        # The steps' task group has closed and ``run`` is not past it yet: the
        # writer reports the step durable, and a consumer submits another.
        try:
            writer.commit()
        except Exception as exc:
            late.append(exc)
        try:
            home.submit(delivery(2), acks.append)
        except Exception as exc:
            late.append(exc)

    hooked = types.SimpleNamespace(
        **{name: getattr(anyio, name) for name in dir(anyio) if not name.startswith("__")}
    )
    hooked.create_task_group = lambda: _ClosingGroup(closed)
    monkeypatch.setattr(process_homes, "anyio", hooked)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(home.run)
            home.submit(delivery(1), acks.append)
            await writer.enqueued.wait()
            tg.cancel_scope.cancel()
    assert [type(e) for e in late] == [OwnershipLost]  # the submission, refused
    assert acks == [None]  # the first delivery's step is durable
    assert handler.dispatched == []  # its outbox was not dispatched here...
    assert home.dispatched(10) == 0  # ...so the watermark stays below it
