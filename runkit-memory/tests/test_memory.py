"""Behaviour specific to the memory driver: URLs, silos, closing, revisions."""

from contextlib import aclosing

import anyio
import anyio.lowlevel
import pytest

from runkit.persistence import (
    Interval,
    LimitExceeded,
    Limits,
    PersistenceError,
    installed_schemes,
    provider_from_url,
)
from runkit.testing import unique_name
from runkit_memory import MemoryProvider
from runkit_memory._plugin import parse_url


def test_memory_scheme_is_installed_through_its_entry_point() -> None:
    assert installed_schemes()["memory"] == "memory"


def test_url_names_the_silo() -> None:
    assert parse_url("memory:///app") == "app"
    assert parse_url("memory:///app/with/slashes") == "app/with/slashes"
    assert parse_url("MEMORY:///App") == "App"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "memory://app",
            "memory URL 'memory://app' has a host ('app'); memory URLs have none: "
            "use three slashes, e.g. 'memory:///app'",
        ),
        (
            "memory://host/silo",
            "memory URL 'memory://host/silo' has a host ('host'); memory URLs have none: "
            "use three slashes, e.g. 'memory:///host/silo'",
        ),
        ("memory:///", "memory URL 'memory:///' names no silo; expected 'memory:///<silo>'"),
        ("memory:", "memory URL 'memory:' names no silo; expected 'memory:///<silo>'"),
        (
            "memory:///app?cache=1",
            "memory:// URL has unknown parameter 'cache' (allowed: none)",
        ),
        (
            "memory:///app#frag",
            "memory URL 'memory:///app#frag' has a fragment; expected 'memory:///<silo>'",
        ),
    ],
)
def test_malformed_url_raises_value_error_naming_the_problem(url: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        provider_from_url(url)
    assert str(info.value) == message


def test_url_password_never_appears_in_errors() -> None:
    with pytest.raises(ValueError) as info:
        provider_from_url("memory://user:hunter2@host/silo")
    assert "hunter2" not in str(info.value)
    assert "memory://user:***@host/silo" in str(info.value)


def test_constructor_rejects_empty_silo_name() -> None:
    with pytest.raises(ValueError, match=r"^memory silo name must be a non-empty str, not ''$"):
        MemoryProvider("")


async def test_providers_of_one_silo_share_data_and_other_silos_do_not() -> None:
    silo = unique_name("silo")
    async with (
        provider_from_url(f"memory:///{silo}") as first,
        MemoryProvider(silo) as second,
        MemoryProvider(unique_name("silo")) as elsewhere,
        MemoryProvider() as private,
        MemoryProvider() as other_private,
    ):
        assert isinstance(first, MemoryProvider)
        assert first.silo == second.silo == silo
        assert private.silo is None
        async with await first.journals.open("j") as journal:
            await journal.append(0, b"<shared>")
        async with await second.journals.open("j") as journal:
            assert await journal.get(0) == b"<shared>"
        for isolated in (elsewhere, private, other_private):
            async with await isolated.journals.open("j") as journal:
                assert await journal.bounds() == Interval(0, 0)
        async with await private.sets.open("s") as set_:
            await set_.add(b"<m>")
        async with await other_private.sets.open("s") as set_:
            assert not await set_.has(b"<m>")


async def test_closed_provider_and_handles_raise_naming_what_is_closed() -> None:
    silo = unique_name("silo")
    provider = MemoryProvider(silo)
    journal = await provider.journals.open("j")
    await journal.append(0, b"<zero>")
    await provider.close()
    with pytest.raises(PersistenceError, match=rf"^<MemoryProvider memory:///{silo}> is closed$"):
        await journal.get(0)
    with pytest.raises(PersistenceError, match=rf"^<MemoryProvider memory:///{silo}> is closed$"):
        await provider.sets.open("s")
    private = MemoryProvider()
    await private.close()
    with pytest.raises(PersistenceError, match=r"^<MemoryProvider private silo> is closed$"):
        await private.provision()
    async with MemoryProvider(silo) as again:
        reopened = await again.journals.open("j")
        assert await reopened.get(0) == b"<zero>"  # data outlives the closed provider
        await reopened.close()
        with pytest.raises(PersistenceError, match=r"^journal 'j': handle is closed$"):
            await reopened.get(0)
        assert repr(reopened) == "<memory journal 'j' (closed)>"


async def test_range_sees_truncation_that_overtakes_it() -> None:
    async with MemoryProvider() as provider, await provider.journals.open("j") as journal:
        for position in range(200):
            await journal.append(position, b"<r>")
        seen = []

        async def consume() -> None:
            async with aclosing(journal.range(0)) as records:  # type: ignore[type-var]
                async for position, _ in records:
                    seen.append(position)
                    if position == 10:
                        await journal.truncate(150)

        with pytest.raises(PersistenceError, match=r"^journal 'j': no record at position 64$"):
            await consume()
        assert seen == list(range(64))  # the rest of the first page was already read


async def test_truncate_past_end_message() -> None:
    async with MemoryProvider() as provider, await provider.journals.open("j") as journal:
        with pytest.raises(
            ValueError, match=r"^journal 'j': cannot truncate to position 1, past the end \(0\)$"
        ):
            await journal.truncate(1)


async def test_custom_limits_are_enforced() -> None:
    limits = Limits(max_name_bytes=8, max_record_bytes=4)
    async with MemoryProvider(limits=limits) as provider:
        assert provider.limits is limits
        with pytest.raises(LimitExceeded, match=r"^journal name is 9 bytes"):
            await provider.journals.open("123456789")
        async with await provider.journals.open("12345678") as journal:
            await journal.append(0, b"1234")
            with pytest.raises(
                LimitExceeded, match=r"^record is 5 bytes, over this provider's limit of 4 bytes$"
            ):
                await journal.append(1, b"12345")


async def test_silo_is_shared_between_event_loops_in_threads() -> None:
    # The registry and stores use thread locks, so a silo works across threads
    # running their own event loops (an anyio.Lock would be tied to one loop).
    silo = unique_name("silo")

    def other_loop() -> None:
        async def write() -> None:
            async with MemoryProvider(silo) as p, await p.keyspaces.open("k") as keyspace:
                await keyspace.set(b"<k>", b"<from another loop>", "")

        anyio.run(write, backend="trio")

    await anyio.to_thread.run_sync(other_loop)
    async with MemoryProvider(silo) as p, await p.keyspaces.open("k") as keyspace:
        assert (await keyspace.get(b"<k>"))[0] == b"<from another loop>"


async def test_a_cancelled_task_stops_within_the_yield_budget() -> None:
    provider = MemoryProvider()
    for round_ in range(3):  # starting at different points of the budget
        async with await provider.keyspaces.open(f"k{round_}") as keyspace:
            done = 0
            with anyio.CancelScope() as scope:
                scope.cancel()
                for _ in range(100):
                    await keyspace.set(f"key{done}".encode(), b"value", "")
                    done += 1
            assert scope.cancelled_caught
            assert done < 16  # the budget (_YIELD_EVERY)
            # What ran is complete, and nothing after it ran.
            for i in range(done):
                assert (await keyspace.get(f"key{i}".encode()))[0] == b"value"
            assert await keyspace.get(f"key{done}".encode()) == (b"", "")


async def test_a_task_looping_over_the_store_lets_others_run() -> None:
    # Operations yield on a budget, not on every call; a loop of them must
    # still give other tasks their turn.
    provider = MemoryProvider()
    turns = 0

    async def other() -> None:
        nonlocal turns
        while True:
            turns += 1
            await anyio.lowlevel.checkpoint()

    async with await provider.keyspaces.open("k") as keyspace, anyio.create_task_group() as tg:
        tg.start_soon(other)
        await anyio.lowlevel.checkpoint()
        before = turns
        for _ in range(200):
            await keyspace.get(b"key")
        assert turns - before >= 200 // 32
        tg.cancel_scope.cancel()


async def test_read_only_handles_of_unknown_names_see_later_writes_without_registering() -> None:
    silo = unique_name("silo")
    reader = MemoryProvider(silo)
    reader.set_read_only()
    journal = await reader.journals.open("j")
    keyspace = await reader.keyspaces.open("k")
    set_ = await reader.sets.open("s")
    assert await journal.bounds() == Interval(0, 0)
    assert await keyspace.get(b"<k>") == (b"", "")
    assert [m async for m in set_.range()] == []
    # Reading registered nothing: the names are still unknown to the silo.
    again = await reader.journals.open("j")
    assert again._data is not journal._data  # type: ignore[attr-defined]
    async with MemoryProvider(silo) as writer:
        await (await writer.journals.open("j")).append(0, b"<r>")
        revision = await (await writer.keyspaces.open("k")).set(b"<k>", b"<v>", "")
        await (await writer.sets.open("s")).add(b"<m>")
    assert await journal.bounds() == Interval(0, 1)
    assert [r async for r in journal.range(0)] == [(0, b"<r>")]
    assert await keyspace.get(b"<k>") == (b"<v>", revision)
    assert await set_.has(b"<m>")
    assert await again.get(0) == b"<r>"


@pytest.mark.parametrize("operation", ["add", "try_add", "remove", "try_remove"])
async def test_read_only_set_write_errors_name_the_operation_called(operation: str) -> None:
    reader = MemoryProvider(unique_name("silo"))
    reader.set_read_only()
    set_ = await reader.sets.open("s")
    with pytest.raises(
        PersistenceError, match=rf"^set 's': {operation}: the provider is read-only$"
    ):
        await getattr(set_, operation)(b"<m>")
