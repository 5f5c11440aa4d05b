"""``FreshReads``: a read that starts after each caller asked, shared by callers asking together."""

from __future__ import annotations

import anyio
import pytest

from runkit.engine.fresh_reads import FreshReads

pytestmark = pytest.mark.anyio


class _Store:
    """A value that writers bump; each read takes a while and counts."""

    def __init__(self) -> None:
        self.value = 0
        self.reads = 0
        self.gate = anyio.Event()

    async def read(self) -> int:
        self.reads += 1
        seen = self.value
        await self.gate.wait()
        return seen


async def test_a_burst_of_callers_shares_two_reads_and_each_sees_what_came_before_it() -> None:
    store = _Store()
    reads = FreshReads(store.read)
    got: dict[int, int] = {}

    async def call(n: int) -> None:
        got[n] = await reads.get()

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, 0)  # starts the first read
        await anyio.wait_all_tasks_blocked()
        store.value = 1  # written after caller 0 asked, before the others did
        for n in range(1, 50):
            tg.start_soon(call, n)
        await anyio.wait_all_tasks_blocked()
        store.gate.set()
    assert store.reads == 2
    assert got[0] == 0
    assert all(got[n] == 1 for n in range(1, 50)), "a read that began after they asked"


async def test_a_cancelled_caller_leaves_the_read_to_the_others() -> None:
    store = _Store()
    reads = FreshReads(store.read)
    got: list[int] = []
    first = anyio.CancelScope()

    async def cancelled() -> None:
        with first:
            await reads.get()  # starts the read, then is cancelled during it

    async def other() -> None:
        got.append(await reads.get())

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancelled)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(other)
        await anyio.wait_all_tasks_blocked()
        first.cancel()
        await anyio.wait_all_tasks_blocked()
        store.value = 7
        store.gate.set()
    assert got == [7]


async def test_an_error_reaches_every_caller_of_its_round_and_the_next_round_reads_again() -> None:
    calls = 0

    async def read() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("store down")
        return 5

    reads = FreshReads(read)
    with pytest.raises(OSError, match="store down"):
        await reads.get()
    assert await reads.get() == 5
