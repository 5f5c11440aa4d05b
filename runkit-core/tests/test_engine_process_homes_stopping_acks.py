"""Every delivery a stopping home partition took is answered (ADR 0010).

A submitter (a routing consumer, an inbox reader, a deadline timer) waits for
its delivery's acknowledgement: ``None`` once the step holding it is durable,
or an error if it never will be here. Deliveries a worker has taken and is
handling when the home stops (the handler awaiting, a retry backoff, a group
waiting behind a failing delivery) never reach the writer; they must be told
too, or the consumer keeps the instance on hold for good (its later events
wait behind an acknowledgement that never comes, and its checkpoint never
passes the event).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import anyio
import pytest

from runkit.engine.events.consumers_support import ConsumerOptions
from runkit.engine.events.process_deliveries import Delivery
from runkit.engine.events.process_homes import HomeSteps
from runkit.engine.events.process_routing import InFlight, _Sender
from runkit.engine.events.process_state import InstanceState
from runkit.engine.streams import OwnershipLost, ProcessStep, Publication

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_process_homes_stopping import PROC_KEY, delivery

pytestmark = pytest.mark.anyio

OPTIONS = ConsumerOptions(retry_initial=0.001, retry_max=0.005)


class _SlowHandler:
    """Awaits in every handling (I/O, say) until the home stops."""

    key = PROC_KEY
    retries: Any = None

    def __init__(self) -> None:
        self.entered = anyio.Event()

    async def invoke_delivery(self, ctx: Any, delivery: Delivery, root: Any) -> Any:
        self.entered.set()
        await anyio.sleep(3600)

    def root_from(self, data: bytes | None) -> Any:
        return object()

    async def dispatch_step(self, ctx: Any, instance_id: str, step: ProcessStep) -> None:
        pass


class _Writer:
    def enqueue_step(self, step: ProcessStep, on_durable: Any = None) -> Publication:
        raise AssertionError("no step gets this far")


async def _load(handler_key: str, instance_id: str) -> InstanceState:
    return InstanceState()


def _home(handler: _SlowHandler) -> HomeSteps:
    ctx: Any = types.SimpleNamespace(index=0, provider=None)
    return HomeSteps(
        ctx, _Writer(), {PROC_KEY: handler}, load=_load, options=OPTIONS, record_limit=1 << 20
    )


async def test_a_delivery_in_hand_when_the_home_stops_is_answered() -> None:
    handler = _SlowHandler()
    home = _home(handler)
    acks: list[BaseException | None] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(home.run)
            home.submit(delivery(1), acks.append)  # taken by a worker: in the handler
            await handler.entered.wait()
            home.submit(delivery(2), acks.append)  # queued behind it
            tg.cancel_scope.cancel()  # the home partition stops (moves away)
    assert len(acks) == 2, acks
    assert all(isinstance(error, OwnershipLost) for error in acks)


class _Route:
    """Home partition 0 runs on this node until ``home`` is cleared (it moved)."""

    def __init__(self, home: HomeSteps) -> None:
        self.home: HomeSteps | None = home
        self.inbox: list[int] = []

    def submit_local(self, delivery: Delivery, ack: Any) -> bool:
        if self.home is None:
            return False
        try:
            self.home.submit(delivery, ack)
        except OwnershipLost:
            return False
        return True

    async def submit_to_inbox(self, delivery: Delivery) -> None:
        assert delivery.stream is not None
        self.inbox.append(delivery.stream[1])

    def home_of(self, delivery: Delivery) -> int:
        return 0

    async def inbox_floors(self) -> dict[int, int]:
        return {}

    def inbox_read(self, index: int) -> int:
        return -1


async def test_the_consumer_sends_to_the_inbox_in_order_after_its_home_moved_mid_step() -> None:
    handler = _SlowHandler()
    home = _home(handler)
    route = _Route(home)
    checkpoint: Any = types.SimpleNamespace(value=0)
    runner: Any = types.SimpleNamespace(
        key=PROC_KEY,
        forget_routed=lambda envelope: None,
        config=types.SimpleNamespace(describe=lambda: "p"),
    )
    with anyio.fail_after(10):
        async with anyio.create_task_group() as outer:
            inflight = InFlight(checkpoint, 10)
            sender: Any = _Sender(runner, route, inflight, outer, OPTIONS)
            async with anyio.create_task_group() as home_tg:
                await home_tg.start(home.run)
                await inflight.begin(0)
                sender.send(delivery(0))  # in memory to home 0
                await handler.entered.wait()
                route.home = None  # home 0 moves to another node
                home_tg.cancel_scope.cancel()
            await inflight.begin(1)
            sender.send(delivery(1))  # a later event of the same instance
            while checkpoint.value < 2:  # noqa: ASYNC110 (a plain attribute: polled)
                await anyio.sleep(0.01)
            outer.cancel_scope.cancel()
    assert route.inbox == [0, 1]
    assert not sender._held
    assert not sender._local
