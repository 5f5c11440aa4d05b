"""Contract tests for ``Provider``: provisioning, closing, read-only mode, names, limits."""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from functools import partial
from typing import Any

import anyio
import pytest

from runkit.persistence import (
    Interval,
    LimitExceeded,
    Limits,
    PersistenceError,
    Provider,
)

from ._support import RACERS, SuiteBase, cancel_call, gather, unique_name

__all__ = ["ProviderSuite"]

_KINDS = ("journal", "keyspace", "set")

#: How long a provider may take to provision and open a store on an empty backend.
_PROVISION_SECONDS = 60

#: The longest store name the engine opens when identity keys and aggregate
#: instance IDs are UUIDs: an instance's journal, ``<app>/aggregate/<handler>/<instance>``.
ENGINE_NAME_BYTES = 120
#: The longest keyspace key the engine writes when instance IDs are UUIDs: an
#: event-poison key, ``<handler>/event/<stream ID>/<offset>`` with a 19-digit offset.
ENGINE_KEY_BYTES = 99


def _store(provider: Provider, kind: str) -> Any:
    return {"journal": provider.journals, "keyspace": provider.keyspaces, "set": provider.sets}[
        kind
    ]


async def _write_tag(handle: Any, kind: str, tag: bytes) -> None:
    """Write *tag* into a fresh store of *kind* through *handle* (``_read_tag`` reads it)."""
    if kind == "journal":
        await handle.append(0, tag)
    elif kind == "keyspace":
        await handle.set(b"<key>", tag, "")
    else:
        await handle.add(tag)


async def _read_tag(handle: Any, kind: str) -> bytes | None:
    if kind == "journal":
        bounds = await handle.bounds()
        return None if bounds.is_empty else bytes(await handle.get(bounds.begin))
    if kind == "keyspace":
        value, _ = await handle.get(b"<key>")
        return bytes(value) or None
    members = [m async for m in handle.range()]
    assert len(members) <= 1, members
    return members[0] if members else None


def _payload(size: int) -> bytes:
    """*size* bytes with no repeating pattern, so chunks out of order or a cut at a NUL show."""
    return random.Random(size).randbytes(size)


def _sized_name(kind: str, size: int) -> str:
    """A unique name of exactly *size* UTF-8 bytes (at least 40)."""
    base = unique_name(kind)[: size // 2]
    return base + "n" * (size - len(base.encode()))


async def _error_of(call: Callable[[], Awaitable[object]]) -> Exception | None:
    """The exception *call* raises, or ``None``."""
    try:
        await call()
    except Exception as exc:
        return exc
    return None


async def _drain(iterate: Callable[[], AsyncIterator[object]]) -> None:
    """Consume a store's ``range`` to the end."""
    async with aclosing(iterate()) as items:  # type: ignore[type-var]
        async for _ in items:
            pass


async def _raises_before_any_await(call: Callable[[], Awaitable[object]]) -> BaseException | None:
    # Inside an already-cancelled scope the first await that reaches the backend
    # (or yields at all) is cancelled, so only an error raised before it escapes.
    outcome: BaseException | None = None
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await call()
        except (LimitExceeded, ValueError, TypeError) as exc:
            outcome = exc
    return outcome


class ProviderSuite(SuiteBase):
    """Contract tests for the provider as a whole: subclass and supply a ``provider`` fixture.

    An optional ``make_provider`` fixture enables the tests that need several providers.
    """

    # -- provisioning and opening --------------------------------------------------------

    async def test_provider_provision_is_idempotent_and_safe_under_concurrency(
        self, provider: Provider, made_providers: Callable[[], Provider]
    ) -> None:
        others = [made_providers() for _ in range(3)]
        results = await gather(
            *[p.provision for p in [provider, *others] for _ in range(RACERS // 4)]
        )
        assert results == [None] * len(results)
        await provider.provision()
        async with await provider.journals.open(unique_name("journal")) as journal:
            assert await journal.bounds() == Interval(0, 0)

    @pytest.mark.parametrize("kind", _KINDS)
    async def test_provider_concurrent_opens_of_one_name_on_empty_backend_share_data(
        self, provider: Provider, made_providers: Callable[[], Provider], kind: str
    ) -> None:
        name = unique_name(kind)
        providers = [provider, *(made_providers() for _ in range(3))]
        handles = await gather(
            *[partial(_store(p, kind).open, name) for p in providers for _ in range(4)]
        )
        try:
            for handle in handles:
                assert not isinstance(handle, BaseException), handle
            await _write_tag(handles[-1], kind, b"<tag>")
            for handle in handles:
                assert await _read_tag(handle, kind) == b"<tag>"
        finally:
            for handle in handles:
                if not isinstance(handle, BaseException):
                    await handle.close()

    @pytest.mark.parametrize("when", ["before", "in-flight"])
    @pytest.mark.parametrize("kind", _KINDS)
    async def test_provider_cancelled_first_open_and_provision_leave_it_usable(
        self, made_providers: Callable[[], Provider], kind: str, when: str
    ) -> None:
        # A caller's timeout may cancel the first open(), which provisions: a
        # provider shared by many tasks must not stay half-provisioned, or wait
        # for ever on a provisioning that was cancelled.
        fresh = made_providers()
        name = unique_name(kind)
        await cancel_call(when, partial(_store(fresh, kind).open, name))
        await cancel_call(when, fresh.provision)
        with anyio.move_on_after(_PROVISION_SECONDS) as timeout:
            async with await _store(fresh, kind).open(name) as handle:
                await _write_tag(handle, kind, b"<tag>")
                assert await _read_tag(handle, kind) == b"<tag>"
            await fresh.provision()
        assert not timeout.cancelled_caught, (
            f"after a cancelled first {kind}s.open() and a cancelled provision(), opening, "
            f"writing and provisioning did not finish within {_PROVISION_SECONDS} s: the "
            "cancellation left the provider waiting for a provisioning that will never end"
        )

    async def test_provider_limits_are_declared(self, provider: Provider) -> None:
        limits = provider.limits
        assert isinstance(limits, Limits)
        for size in (
            limits.max_name_bytes,
            limits.max_key_bytes,
            limits.max_value_bytes,
            limits.max_record_bytes,
            limits.max_member_bytes,
        ):
            assert isinstance(size, int)
            assert size >= 64
        assert limits.max_name_bytes >= ENGINE_NAME_BYTES, (
            f"max_name_bytes is {limits.max_name_bytes}: the engine opens stores named "
            f"up to {ENGINE_NAME_BYTES} bytes (an aggregate instance's journal, "
            "'<app key>/aggregate/<handler key>/<instance ID>', with UUID keys and IDs), "
            "and retries a handling whose store name is refused for ever"
        )
        assert limits.max_key_bytes >= ENGINE_KEY_BYTES, (
            f"max_key_bytes is {limits.max_key_bytes}: the engine writes keyspace keys "
            f"up to {ENGINE_KEY_BYTES} bytes (an event-poison key, "
            "'<handler key>/event/<stream ID>/<offset>')"
        )

    # -- closing ---------------------------------------------------------------------------

    async def test_provider_closed_provider_and_its_handles_raise(
        self, made_providers: Callable[[], Provider]
    ) -> None:
        doomed = made_providers()
        journal = await doomed.journals.open(unique_name("journal"))
        keyspace = await doomed.keyspaces.open(unique_name("keyspace"))
        set_ = await doomed.sets.open(unique_name("set"))
        await doomed.close()
        await doomed.close()  # idempotent
        # Every operation, not only some: a check in a shared helper that a few
        # methods bypass leaves those working on a closed provider.
        calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            *(
                (f"{kind}s.open", partial(_store(doomed, kind).open, unique_name(kind)))
                for kind in _KINDS
            ),
            ("provision", doomed.provision),
            ("journal append", partial(journal.append, 0, b"<x>")),
            ("journal truncate", partial(journal.truncate, 0)),
            ("journal bounds", journal.bounds),
            ("journal get", partial(journal.get, 0)),
            ("journal range", partial(_drain, partial(journal.range, 0))),
            ("keyspace set", partial(keyspace.set, b"<k>", b"<v>", "")),
            ("keyspace set_unconditional", partial(keyspace.set_unconditional, b"<k>", b"<v>")),
            ("keyspace get", partial(keyspace.get, b"<k>")),
            ("keyspace has", partial(keyspace.has, b"<k>")),
            ("keyspace range", partial(_drain, keyspace.range)),
            ("set add", partial(set_.add, b"<m>")),
            ("set try_add", partial(set_.try_add, b"<m>")),
            ("set remove", partial(set_.remove, b"<m>")),
            ("set try_remove", partial(set_.try_remove, b"<m>")),
            ("set has", partial(set_.has, b"<m>")),
            ("set range", partial(_drain, set_.range)),
        ]
        for what, call in calls:
            error = await _error_of(call)
            closed = isinstance(error, PersistenceError) and "closed" in str(error)
            assert closed, (
                f"{what} after the provider was closed "
                + ("returned normally" if error is None else f"raised {error!r}")
                + ": every operation of a closed provider and of its handles must raise "
                "PersistenceError saying what is closed"
            )
        await journal.close()  # closing handles of a closed provider is harmless

    async def test_provider_async_context_manager_closes_it(
        self, made_providers: Callable[[], Provider]
    ) -> None:
        async with (
            made_providers() as scoped,
            await scoped.keyspaces.open(unique_name("keyspace")) as keyspace,
        ):
            await keyspace.set(b"<k>", b"<v>", "")
        with pytest.raises(PersistenceError, match="closed"):
            await scoped.keyspaces.open(unique_name("keyspace"))

    async def test_provider_closing_one_provider_leaves_others_working(
        self, provider: Provider, made_providers: Callable[[], Provider]
    ) -> None:
        name = unique_name("journal")
        doomed = made_providers()
        async with await doomed.journals.open(name) as journal:
            await journal.append(0, b"<zero>")
        await doomed.close()
        async with await provider.journals.open(name) as journal:
            assert await journal.get(0) == b"<zero>"

    # -- read-only -------------------------------------------------------------------------

    async def test_provider_read_only_refuses_every_write_and_still_reads(
        self, provider: Provider, made_providers: Callable[[], Provider]
    ) -> None:
        """A read-only provider refuses each kind of write and reads existing data.

        Each write raises ``PersistenceError`` ending "the provider is read-only"
        and naming the store, and changes nothing, as a writable provider sees it.
        """
        journal_name, keyspace_name, set_name = (unique_name(kind) for kind in _KINDS)
        fresh = {kind: unique_name(kind) for kind in _KINDS}  # never written
        async with await provider.journals.open(journal_name) as journal:
            await journal.append(0, b"<r0>")
            await journal.append(1, b"<r1>")
        async with await provider.keyspaces.open(keyspace_name) as keyspace:
            revision = await keyspace.set(b"<k>", b"<v>", "")
        async with await provider.sets.open(set_name) as set_:
            await set_.add(b"<m>")

        reader = made_providers()
        reader.set_read_only()
        assert reader.read_only
        journal = await reader.journals.open(journal_name)
        keyspace = await reader.keyspaces.open(keyspace_name)
        set_ = await reader.sets.open(set_name)
        new_journal = await reader.journals.open(fresh["journal"])
        new_keyspace = await reader.keyspaces.open(fresh["keyspace"])
        new_set = await reader.sets.open(fresh["set"])
        # Every write would succeed on a writable provider.
        writes: list[tuple[str, str, Callable[[], Awaitable[object]]]] = [
            (journal_name, "append", lambda: journal.append(2, b"<r2>")),
            (journal_name, "truncate", lambda: journal.truncate(1)),
            (fresh["journal"], "append", lambda: new_journal.append(0, b"<r0>")),
            (keyspace_name, "set", lambda: keyspace.set(b"<k>", b"<w>", revision)),
            (keyspace_name, "set (delete)", lambda: keyspace.set(b"<k>", b"", revision)),
            (keyspace_name, "set (create)", lambda: keyspace.set(b"<new>", b"<w>", "")),
            # A no-op on a writable provider, but a write all the same.
            (keyspace_name, "set (delete absent)", lambda: keyspace.set(b"<absent>", b"", "")),
            (
                keyspace_name,
                "set_unconditional",
                lambda: keyspace.set_unconditional(b"<k>", b"<w>"),
            ),
            (
                keyspace_name,
                "set_unconditional (delete)",
                lambda: keyspace.set_unconditional(b"<k>", b""),
            ),
            (fresh["keyspace"], "set", lambda: new_keyspace.set(b"<k>", b"<w>", "")),
            (set_name, "add", lambda: set_.add(b"<new>")),
            (set_name, "try_add", lambda: set_.try_add(b"<new>")),
            (set_name, "remove", lambda: set_.remove(b"<m>")),
            (set_name, "try_remove", lambda: set_.try_remove(b"<m>")),
            (fresh["set"], "add", lambda: new_set.add(b"<m>")),
        ]
        try:
            for name, label, write in writes:
                with pytest.raises(PersistenceError, match=r"the provider is read-only$") as info:
                    await write()
                assert name in str(info.value), (label, str(info.value))
            # Reads through the read-only provider still work, and saw no write.
            assert await journal.bounds() == Interval(0, 2)
            assert await journal.get(0) == b"<r0>"
            assert [r async for r in journal.range(0)] == [(0, b"<r0>"), (1, b"<r1>")]
            assert await keyspace.get(b"<k>") == (b"<v>", revision)
            assert await keyspace.has(b"<k>")
            assert not await keyspace.has(b"<new>")
            assert [i async for i in keyspace.range()] == [(b"<k>", b"<v>", revision)]
            assert await set_.has(b"<m>")
            assert [m async for m in set_.range()] == [b"<m>"]
            assert await new_journal.bounds() == Interval(0, 0)
            assert await new_keyspace.get(b"<k>") == (b"", "")
            assert not await new_set.has(b"<m>")
        finally:
            with anyio.CancelScope(shield=True):
                for handle in (journal, keyspace, set_, new_journal, new_keyspace, new_set):
                    await handle.close()

        # A writable provider on the same store sees it unchanged.
        async with await provider.journals.open(journal_name) as journal:
            assert await journal.bounds() == Interval(0, 2)
            assert [r async for r in journal.range(0)] == [(0, b"<r0>"), (1, b"<r1>")]
        async with await provider.keyspaces.open(keyspace_name) as keyspace:
            assert [i async for i in keyspace.range()] == [(b"<k>", b"<v>", revision)]
        async with await provider.sets.open(set_name) as set_:
            assert [m async for m in set_.range()] == [b"<m>"]
        async with await provider.journals.open(fresh["journal"]) as journal:
            assert await journal.bounds() == Interval(0, 0)
        async with await provider.keyspaces.open(fresh["keyspace"]) as keyspace:
            assert [i async for i in keyspace.range()] == []
        async with await provider.sets.open(fresh["set"]) as set_:
            assert [m async for m in set_.range()] == []

    async def test_provider_read_only_handle_sees_a_store_created_after_it_was_opened(
        self, provider: Provider, made_providers: Callable[[], Provider]
    ) -> None:
        """A read-only handle of a name not yet written reads the store once it is.

        Every acknowledged write is visible through every handle: a handle that
        fixed on "absent" when opened (an unregistered placeholder, a row id
        that matches nothing) misses every later write to its store.
        """
        await provider.provision()  # a read-only provider only checks the backend
        names = {kind: unique_name(kind) for kind in _KINDS}
        reader = made_providers()
        reader.set_read_only()
        handles = {kind: await _store(reader, kind).open(names[kind]) for kind in _KINDS}
        try:
            for kind in _KINDS:
                assert await _read_tag(handles[kind], kind) is None
            for kind in _KINDS:
                async with await _store(provider, kind).open(names[kind]) as handle:
                    await _write_tag(handle, kind, b"<tag>")
            blind = [kind for kind in _KINDS if await _read_tag(handles[kind], kind) != b"<tag>"]
            assert not blind, (
                f"a read-only provider's handles of a {', '.join(blind)} opened before the "
                "store was first written do not see the writes of another provider: a "
                "handle must look the store up again, not keep reading it as empty"
            )
        finally:
            with anyio.CancelScope(shield=True):
                for handle in handles.values():
                    await handle.close()

    # -- names -----------------------------------------------------------------------------

    @pytest.mark.parametrize("kind", _KINDS)
    async def test_provider_unusual_names_are_distinct_and_shared(
        self, provider: Provider, other_provider: Provider, kind: str
    ) -> None:
        base = unique_name(kind)
        suffixes = [
            "a/b",
            "a%2Fb",
            "a%b",
            "a\\b",
            "a b",
            "A/B",
            "ünï/cødé ☃ 🐍",
            "nul\x00byte",
            "nul",
            "..",
            "a?b#c&d=e+f",
            # Each collides with one above, or with the other, under a mapping a
            # driver might apply: "/" to "_", trimmed trailing spaces, collapsed
            # or normalised paths, Unicode normalisation (NFC and NFD).
            "a_b",
            "a b ",
            "a//b",
            "a/./b",
            "caf\u00e9",
            "cafe\u0301",
        ]
        names = [f"{base}:{suffix}" for suffix in suffixes]
        for index, name in enumerate(names):
            async with await _store(provider, kind).open(name) as handle:
                assert handle.name == name
                await _write_tag(handle, kind, f"<{index}>".encode())
        for index, name in enumerate(names):
            async with await _store(other_provider, kind).open(name) as handle:
                assert await _read_tag(handle, kind) == f"<{index}>".encode()

    @pytest.mark.parametrize("kind", _KINDS)
    async def test_provider_name_at_limit_works_and_one_byte_more_raises_limit_exceeded(
        self, provider: Provider, other_provider: Provider, kind: str
    ) -> None:
        limit = provider.limits.max_name_bytes
        name = _sized_name(kind, limit)
        async with await _store(provider, kind).open(name) as handle:
            await _write_tag(handle, kind, b"<long>")
        async with await _store(other_provider, kind).open(name) as handle:
            assert await _read_tag(handle, kind) == b"<long>"
        # Multi-byte characters count as bytes, not characters.
        multibyte = name[: -(limit // 4) * 2] + "é" * (limit // 4)
        assert len(multibyte.encode()) == limit
        async with await _store(provider, kind).open(multibyte) as handle:
            assert await _read_tag(handle, kind) is None
        with pytest.raises(LimitExceeded) as info:
            await _store(provider, kind).open(name + "n")
        assert str(info.value) == (
            f"{kind} name is {limit + 1} bytes, over this provider's limit of {limit} bytes"
        )
        with pytest.raises(LimitExceeded):
            await _store(provider, kind).open(multibyte[:-1] + "€")

    @pytest.mark.parametrize("kind", _KINDS)
    async def test_provider_empty_or_non_str_name_is_rejected(
        self, provider: Provider, kind: str
    ) -> None:
        with pytest.raises(ValueError, match=rf"^{kind} name must not be empty$"):
            await _store(provider, kind).open("")
        with pytest.raises(TypeError, match=rf"^{kind} name must be str, not bytes$"):
            await _store(provider, kind).open(b"name")

    # -- sizes -----------------------------------------------------------------------------

    def _edge(self, limit: int) -> None:
        if limit > self.max_tested_bytes:
            pytest.skip(
                f"limit of {limit} bytes is over max_tested_bytes ({self.max_tested_bytes})"
            )

    async def test_provider_record_at_limit_is_stored_and_one_byte_more_raises(
        self, provider: Provider
    ) -> None:
        limit = provider.limits.max_record_bytes
        self._edge(limit)
        async with await provider.journals.open(unique_name("journal")) as journal:
            record = _payload(limit)
            await journal.append(0, record)
            assert await journal.get(0) == record
            with pytest.raises(LimitExceeded) as info:
                await journal.append(1, b"r" * (limit + 1))
            assert str(info.value) == (
                f"record is {limit + 1} bytes, over this provider's limit of {limit} bytes"
            )
            assert await journal.bounds() == Interval(0, 1)

    async def test_provider_key_and_value_at_limit_are_stored_and_one_byte_more_raises(
        self, provider: Provider
    ) -> None:
        limits = provider.limits
        self._edge(max(limits.max_key_bytes, limits.max_value_bytes))
        key = b"\xff" * limits.max_key_bytes
        value = _payload(limits.max_value_bytes)
        async with await provider.keyspaces.open(unique_name("keyspace")) as keyspace:
            revision = await keyspace.set(key, value, "")
            assert await keyspace.get(key) == (value, revision)
            with pytest.raises(LimitExceeded) as info:
                await keyspace.set(key + b"\xff", b"v", "")
            assert str(info.value) == (
                f"key is {limits.max_key_bytes + 1} bytes, over this provider's limit "
                f"of {limits.max_key_bytes} bytes"
            )
            with pytest.raises(LimitExceeded) as info:
                await keyspace.set(key, value + b"v", revision)
            assert str(info.value) == (
                f"value is {limits.max_value_bytes + 1} bytes, over this provider's limit "
                f"of {limits.max_value_bytes} bytes"
            )
            with pytest.raises(LimitExceeded):
                await keyspace.set_unconditional(key, value + b"v")
            key_message = (
                f"key is {limits.max_key_bytes + 1} bytes, over this provider's limit "
                f"of {limits.max_key_bytes} bytes"
            )
            with pytest.raises(LimitExceeded, match=rf"^{re.escape(key_message)}$"):
                await keyspace.set_unconditional(key + b"\xff", b"v")
            with pytest.raises(LimitExceeded, match=rf"^{re.escape(key_message)}$"):
                await keyspace.get(key + b"\xff")
            with pytest.raises(LimitExceeded, match=rf"^{re.escape(key_message)}$"):
                await keyspace.has(key + b"\xff")
            assert await keyspace.get(key) == (value, revision)
            with pytest.raises(ValueError, match=r"^key must not be empty$"):
                await keyspace.set(b"", b"v", "")
            with pytest.raises(ValueError, match=r"^key must not be empty$"):
                await keyspace.set_unconditional(b"", b"v")
            with pytest.raises(ValueError, match=r"^key must not be empty$"):
                await keyspace.get(b"")
            with pytest.raises(ValueError, match=r"^key must not be empty$"):
                await keyspace.has(b"")
            assert [k async for k, _, _ in keyspace.range()] == [key]

    async def test_provider_member_at_limit_is_stored_and_one_byte_more_raises(
        self, provider: Provider
    ) -> None:
        limit = provider.limits.max_member_bytes
        self._edge(limit)
        member = b"\x00" * limit
        async with await provider.sets.open(unique_name("set")) as set_:
            assert await set_.try_add(member)
            assert await set_.has(member)
            for call in (set_.add, set_.try_add, set_.remove, set_.try_remove, set_.has):
                with pytest.raises(LimitExceeded) as info:
                    await call(member + b"\x00")
                assert str(info.value) == (
                    f"member is {limit + 1} bytes, over this provider's limit of {limit} bytes"
                )
            for call in (set_.add, set_.try_add, set_.remove, set_.try_remove, set_.has):
                with pytest.raises(ValueError, match=r"^member must not be empty$"):
                    await call(b"")
            assert [m async for m in set_.range()] == [member]

    async def test_provider_inputs_are_checked_before_any_io(self, provider: Provider) -> None:
        """Bad inputs raise before the first await: no request reaches the backend."""
        limits = provider.limits
        self._edge(max(limits.max_record_bytes, limits.max_value_bytes, limits.max_key_bytes))
        journal = await provider.journals.open(unique_name("journal"))
        keyspace = await provider.keyspaces.open(unique_name("keyspace"))
        set_ = await provider.sets.open(unique_name("set"))
        try:
            long_key = b"k" * (limits.max_key_bytes + 1)
            long_member = b"m" * (limits.max_member_bytes + 1)
            calls: list[tuple[str, type[Exception], Callable[[], Awaitable[object]]]] = [
                (
                    "open",
                    LimitExceeded,
                    lambda: provider.journals.open("n" * (limits.max_name_bytes + 1)),
                ),
                ("open", ValueError, lambda: provider.keyspaces.open("")),
                (
                    "append",
                    LimitExceeded,
                    lambda: journal.append(0, b"r" * (limits.max_record_bytes + 1)),
                ),
                ("append", ValueError, lambda: journal.append(-1, b"r")),
                ("set", LimitExceeded, lambda: keyspace.set(long_key, b"v", "")),
                (
                    "set",
                    LimitExceeded,
                    lambda: keyspace.set(b"k", b"v" * (limits.max_value_bytes + 1), ""),
                ),
                ("set", ValueError, lambda: keyspace.set(b"", b"v", "")),
                (
                    "set_unconditional",
                    LimitExceeded,
                    lambda: keyspace.set_unconditional(b"k", b"v" * (limits.max_value_bytes + 1)),
                ),
                (
                    "set_unconditional",
                    LimitExceeded,
                    lambda: keyspace.set_unconditional(long_key, b"v"),
                ),
                ("set_unconditional", ValueError, lambda: keyspace.set_unconditional(b"", b"v")),
                ("get", LimitExceeded, lambda: keyspace.get(long_key)),
                ("get", ValueError, lambda: keyspace.get(b"")),
                ("has", LimitExceeded, lambda: keyspace.has(long_key)),
                ("has", ValueError, lambda: keyspace.has(b"")),
                ("try_add", LimitExceeded, lambda: set_.try_add(long_member)),
                ("add", ValueError, lambda: set_.add(b"")),
                ("try_add", ValueError, lambda: set_.try_add(b"")),
                ("has", LimitExceeded, lambda: set_.has(long_member)),
                ("has", ValueError, lambda: set_.has(b"")),
                ("remove", LimitExceeded, lambda: set_.remove(long_member)),
                ("remove", ValueError, lambda: set_.remove(b"")),
                ("try_remove", LimitExceeded, lambda: set_.try_remove(long_member)),
                ("try_remove", ValueError, lambda: set_.try_remove(b"")),
            ]
            for label, expected, call in calls:
                outcome = await _raises_before_any_await(call)
                assert outcome is not None, (
                    f"{label} with an invalid input must raise before its first await "
                    "(before any I/O), not after talking to the backend"
                )
                assert isinstance(outcome, expected), (
                    f"{label} with an invalid input raised {outcome!r}, not {expected.__name__}"
                )
            assert await journal.bounds() == Interval(0, 0)
            assert await keyspace.get(b"k") == (b"", "")
            assert [i async for i in keyspace.range()] == []
            assert [m async for m in set_.range()] == []
        finally:
            with anyio.CancelScope(shield=True):
                for handle in (journal, keyspace, set_):
                    await handle.close()
