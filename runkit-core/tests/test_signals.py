"""``event_maker``: anyio events for the running backend without a lookup per event."""

from __future__ import annotations

import anyio
import pytest
import sniffio

from runkit.engine.signals import event_maker


async def test_events_made_in_a_loop_work_and_skip_the_backend_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make = event_maker()

    def no_lookup() -> str:
        raise AssertionError("the backend was looked up")

    monkeypatch.setattr(sniffio, "current_async_library", no_lookup)
    monkeypatch.setattr("anyio._core._eventloop.current_async_library", no_lookup)
    event = make()
    monkeypatch.undo()
    assert isinstance(event, anyio.Event)
    assert not event.is_set()
    async with anyio.create_task_group() as tg:

        async def set_later() -> None:
            await anyio.sleep(0.01)
            event.set()

        tg.start_soon(set_later)
        with anyio.fail_after(5):
            await event.wait()
    assert event.is_set()


def test_a_maker_taken_outside_a_loop_makes_events_for_whichever_loop_uses_them() -> None:
    make = event_maker()

    async def use() -> None:
        event = make()
        event.set()
        with anyio.fail_after(5):
            await event.wait()

    anyio.run(use)
    anyio.run(use, backend="trio")
