"""Two engines in one process, on one memory silo, talking over the node transport.

Real sockets on 127.0.0.1 and mutual TLS (self-signed identities trusted by the
fingerprints in the heartbeats); the multi-process version on PostgreSQL is
``test_cluster.py``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs
import pytest

import dogma
import runkit
from runkit.config import ApplicationConfig
from runkit.engine import executor as executor_module
from runkit.engine.cluster.nodes import NODES_KEYSPACE
from runkit.engine.commands.acceptance import OfferUnanswered
from runkit.engine.commands.inbox import EngineStopped
from runkit.engine.engine import Engine
from runkit.engine.ids import new_id
from runkit.engine.partitions import partition_id, partition_of
from runkit.engine.settings import EngineSettings
from runkit.engine.streams import UnconfirmedAppend
from runkit.rendezvous import winner
from runkit.testing.faults import AFTER, BEFORE, FaultyProvider
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import (
    APP_KEY,
    FAST,
    REGISTRY,
    SERIAL_KEY,
    Deposit,
    Deposited,
    Notified,
    Notify,
    Serial,
    Setup,
    check_invariants,
    read_stores,
    settled,
    setup,
    splitting_node_ids,
    wait_until,
)
from tls_harness import issue, load_issuer


@asynccontextmanager
async def two_nodes(
    config: ApplicationConfig,
    silo: str,
    *,
    listening: tuple[bool, bool] = (True, True),
    **settings: Any,
) -> AsyncIterator[tuple[Engine, Engine]]:
    """Two engines running *config* on one memory silo, 8 partitions shared between them.

    *listening* says which of the two has a listen address; *settings* go to both.
    """
    engines = [
        Engine.from_settings(
            EngineSettings(
                applications=(config,),
                persistence_provider=MemoryProvider(silo),
                listen_address="127.0.0.1:0" if listens else None,
                node_id=node_id,
                # Long enough that a loaded machine does not expire a live node.
                heartbeat_interval=0.5,
                **{**FAST, "partition_count": 8, **settings},
            )
        )
        for node_id, listens in zip(
            splitting_node_ids(8, config.identity.key), listening, strict=True
        )
    ]
    async with anyio.create_task_group() as tg:
        for engine in engines:
            tg.start_soon(engine.run)
        runtimes = [await e.runtime(config.identity.key) for e in engines]
        ids = [partition_id(config.identity.key, i) for i in range(8)]

        def split() -> bool:
            # Each node's view has both nodes (its owned set is not all 8, and
            # the two sets partition them) and each runs what its view owns:
            # a sum of running partitions alone is also met, for a moment,
            # while one node has not seen the other yet.
            owned = [{i for i, p in enumerate(ids) if rt.ownership.owns(p)} for rt in runtimes]
            return (
                all(owned)
                and owned[0].isdisjoint(owned[1])
                and len(owned[0] | owned[1]) == 8
                and all(set(rt.partitions) == o for rt, o in zip(runtimes, owned, strict=True))
            )

        await wait_until(split, timeout=30)
        try:
            yield engines[0], engines[1]
        finally:
            tg.cancel_scope.cancel()


def _remote_accounts(engine: Engine, count: int) -> list[str]:
    """Accounts whose partition the *other* engine owns (from *engine*'s view)."""
    from runkit.engine.partitions import instance_workload, partition_of

    ownership = engine._runtimes[APP_KEY].ownership
    found = []
    for i in range(1000):
        account = f"acc-{i}"
        index = partition_of(instance_workload(setup().accounts_key, account), 8)
        if not ownership.owns(partition_id(APP_KEY, index)):
            found.append(account)
        if len(found) == count:
            break
    return found


def one_node(config: ApplicationConfig, silo: str, **settings: Any) -> Engine:
    """An engine running *config* on a memory silo (no listen address unless given)."""
    options = {**FAST, "heartbeat_interval": 0.5, **settings}
    return Engine.from_settings(
        EngineSettings(applications=(config,), persistence_provider=MemoryProvider(silo), **options)
    )


async def inbox_entries(silo: str) -> int:
    """Commands appended to any inbox of the silo (offers that fell back)."""
    stores = await read_stores(MemoryProvider(silo))
    return sum(len(r.entries) for records in stores.inbox.values() for _, r in records)


async def test_commands_are_offered_to_the_owner_and_observed_from_any_node() -> None:
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo) as (one, _two):
        executor = one.executor_for(s.app)
        accounts = _remote_accounts(one, 6)
        assert len(accounts) == 6
        for i, account in enumerate(accounts):
            seen: list[Any] = []

            async def saw(event: Deposited, seen: list[Any] = seen) -> bool:
                seen.append(event)
                return True

            with anyio.fail_after(20):
                await executor.execute_command(
                    Deposit(account, 1, f"r{i}"),
                    observers=[dogma.observe(Deposited, saw, registry=REGISTRY)],
                )
            assert [e.account for e in seen] == [account]
        # Offered to the owner, not appended to the inbox (a loaded machine may
        # let an offer time out and fall back: allow one).
        in_inbox = await inbox_entries(silo)
        assert in_inbox <= 1, f"{in_inbox} of 6 offers fell back to the inbox"
    check_invariants(await settled(MemoryProvider(silo)))


async def test_a_command_handled_on_another_node_leaves_nothing_kept_for_handling_here() -> None:
    # Routing keeps the decoded command for its handling on this node; a
    # command offered to its owner is handled there, so nothing stays kept
    # (one that fell back to the inbox may still be handled here: it stays).
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo) as (one, _two):
        executor = one.executor_for(s.app)
        accounts = _remote_accounts(one, 3)
        assert len(accounts) == 3
        for i, account in enumerate(accounts):
            with anyio.fail_after(20):
                await executor.execute_command(Deposit(account, 1, f"r{i}"))
        in_inbox = await inbox_entries(silo)
        assert len((await one.runtime(APP_KEY)).routed_commands) == in_inbox


async def test_not_satisfied_is_raised_for_a_command_handled_on_another_node() -> None:
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo) as (one, _two):
        [account] = _remote_accounts(one, 1)
        s.accounts.nothing.add("quiet")  # handled, records nothing
        never: list[Any] = []

        async def saw(event: Deposited) -> bool:
            never.append(event)
            return True

        with anyio.fail_after(20), pytest.raises(dogma.EventObserverNotSatisfied):
            await one.executor_for(s.app).execute_command(
                Deposit(account, 1, "quiet"),
                observers=[dogma.observe(Deposited, saw, registry=REGISTRY)],
            )
        assert not never


async def test_a_command_whose_offer_went_unanswered_is_spilled_marked_as_offered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The link fails in the call: the owner may have committed the command, so
    # the inbox copy says when it was offered (the owner's successor then
    # looks for it in the records written since, ADR 0002).
    from datetime import UTC, datetime

    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo) as (one, _two):
        [account] = _remote_accounts(one, 1)
        _fail_offers(one, monkeypatch)
        before = datetime.now(UTC)
        await one.executor_for(s.app).execute_command(Deposit(account, 1, "spilled"))
        await wait_until(lambda: any(c[1] == "spilled" for c in s.accounts.calls))
    stores = await read_stores(MemoryProvider(silo))
    entries = [e for records in stores.inbox.values() for _, r in records for e in r.entries]
    assert len(entries) == 1
    offered_at = entries[0].offered_at
    assert offered_at is not None
    assert before <= offered_at <= before + timedelta(seconds=10)


async def test_not_satisfied_is_raised_when_the_owner_handled_an_inbox_command_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An offer fails (a link blip): the command goes to the inbox, and the
    # caller's observers subscribe at the owner after the append. The owner
    # kept a command's done note only if someone was subscribed when it
    # finished, so one handled before the (here: retried) subscription left
    # the observer waiting for its timeout instead of being told that
    # nothing it observes can follow.
    from runkit.transport import TransportError

    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo) as (one, _two):
        [account] = _remote_accounts(one, 1)
        s.accounts.nothing.add("quiet")  # handled, records nothing
        _fail_offers(one, monkeypatch)
        assert one.router is not None
        transport = one.router._transport
        original = transport.stream
        failed: list[str] = []

        def stream(address: str, method: str, *args: Any, **kwargs: Any) -> Any:
            if method == "observe" and not failed:
                failed.append(method)  # the same blip breaks the first observation
                raise TransportError("the link is down (test)")
            return original(address, method, *args, **kwargs)

        monkeypatch.setattr(transport, "stream", stream)

        async def saw(event: Deposited) -> bool:
            return True

        with anyio.fail_after(10), pytest.raises(dogma.EventObserverNotSatisfied):
            await one.executor_for(s.app).execute_command(
                Deposit(account, 1, "quiet"),
                observers=[dogma.observe(Deposited, saw, registry=REGISTRY)],
            )
        assert failed
        assert s.accounts.calls[-1][1] == "quiet"


async def test_a_node_that_stops_hands_commands_to_the_inbox_and_the_survivor() -> None:
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo) as (one, two):
        accounts = _remote_accounts(one, 4)
        executor = one.executor_for(s.app)
        await executor.execute_command(Deposit(accounts[0], 1, "before"))
        # The other node leaves: offers to it fail over to the inbox, and this
        # node takes its partitions.
        assert two is not None
        rt_two = await two.runtime(APP_KEY)
        rt_two.partitions.clear()  # refuse offers from now on (as a stopping node does)
        for i, account in enumerate(accounts):
            with anyio.fail_after(10):
                await executor.execute_command(Deposit(account, 1, f"after{i}"))
        stores = await settled(MemoryProvider(silo), timeout=20)
    check_invariants(stores)
    assert {c[1] for c in s.accounts.calls} >= {"before", *(f"after{i}" for i in range(4))}


async def test_a_late_subscription_replays_what_the_chain_recorded_on_a_peer() -> None:
    # A subscription made after the events were recorded (a reconnect, or a
    # node that took the partition over) must still see them: every node keeps
    # its recently published events and replays a chain's to late subscribers.
    from runkit.engine.commands.acceptance import command_id_for
    from runkit.engine.streams import CommandDone

    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo) as (one, two):
        [account] = _remote_accounts(one, 1)  # its partition is owned by `two`
        await two.executor_for(s.app).execute_command(
            Deposit(account, 5, "late"), idempotency_key="late-key"
        )
        correlation_id = command_id_for(APP_KEY, "late-key")
        with anyio.fail_after(20):
            async with one.subscribe(APP_KEY, correlation_id) as events:
                async for event in events:
                    if isinstance(event, CommandDone):
                        continue
                    message = event.message()
                    if isinstance(message, Deposited):
                        assert (message.account, message.ref) == (account, "late")
                        break


def _streams_opened(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The methods of the streams *engine* opens at its peers from now on."""
    assert engine.router is not None
    transport = engine.router._transport
    opened: list[str] = []
    original = transport.stream

    def stream(address: str, method: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(method)
        return original(address, method, *args, **kwargs)

    monkeypatch.setattr(transport, "stream", stream)
    # Streams that wait for an offer's answer open when it comes, not at the
    # offer timeout (a safety net): make that net longer than any test waits.
    monkeypatch.setattr(engine.router, "_offer_timeout", 60.0)
    return opened


async def _observed_deposit(
    engine: Engine,
    s: Any,
    account: str,
    ref: str,
    *,
    keyed: bool = False,
    meanwhile: Callable[[], None] = lambda: None,
) -> list[str]:
    """Deposit through *engine* (with *ref* as its idempotency key if *keyed*),
    observing the ``Deposited``; the refs observed. *meanwhile* runs in the observer.
    """
    seen: list[str] = []

    async def saw(event: Deposited) -> bool:
        seen.append(event.ref)
        meanwhile()
        return True

    with anyio.fail_after(20):
        await engine.executor_for(s.app).execute_command(
            Deposit(account, 1, ref),
            idempotency_key=ref if keyed else None,
            observers=[dogma.observe(Deposited, saw, registry=REGISTRY)],
        )
    return seen


async def test_a_chain_that_stays_in_its_partition_is_observed_without_a_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Deposit is handled by an aggregate and no process follows it, so its
    # chain's events are recorded only on the account's partition: a gateway
    # that offers it to the partition's owner gets them in the owner's answer
    # and opens no observe stream; one that owns the partition observes its bus.
    from runkit.engine.commands.acceptance import command_id_for
    from runkit.engine.partitions import instance_workload, partition_of

    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo) as (one, two):
        [remote] = _remote_accounts(one, 1)
        [local] = _remote_accounts(two, 1)
        assert one.router is not None
        router = one.router
        partitions = {
            account: partition_of(instance_workload(s.accounts_key, account), 8)
            for account in (remote, local)
        }

        def asked() -> dict[str, set[uuid.UUID]]:
            """The nodes `one` would subscribe at, per account, in its current view."""
            return {
                account: {r.node_id for r in router._recorders(APP_KEY, index)}
                for account, index in partitions.items()
            }

        # Until `one` reads a heartbeat of `two` that no longer lists the local
        # account's partition, `two` may still run it (a handoff) and is asked too.
        expected_view = {remote: {two.settings.node_id}, local: set()}
        opened = _streams_opened(one, monkeypatch)
        seen: dict[str, list[str]] = {}
        subscribed_at_two: dict[str, bool] = {}
        for attempt in range(5):
            await wait_until(lambda: asked() == expected_view, timeout=30)
            opened.clear()
            seen.clear()
            for account in (remote, local):
                key = f"observe-{account}-{attempt}"

                def at_two(account: str = account, cid: str = command_id_for(APP_KEY, key)) -> None:
                    subscribed_at_two[account] = two.bus.has_subscribers(cid)

                seen[account] = await _observed_deposit(
                    one, s, account, key, keyed=True, meanwhile=at_two
                )
            if asked() == expected_view:
                break
            # Membership moved during the calls (a loaded machine): try again.
        assert asked() == expected_view
        assert seen == {
            remote: [f"observe-{remote}-{attempt}"],
            local: [f"observe-{local}-{attempt}"],
        }
        assert opened == [], f"observe streams were opened: {opened}"
        # The owner's subscription for the answer ended with the offer.
        assert subscribed_at_two == {remote: False, local: False}


async def test_a_command_its_owner_has_to_retry_is_observed_through_a_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The owner's first attempt fails: the offer is answered once the command
    # is in the inbox, without its done note, so the gateway opens the observe
    # stream, which delivers the event of the retry.
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo) as (one, _two):
        [account] = _remote_accounts(one, 1)
        s.accounts.fail["retried"] = 1
        opened = _streams_opened(one, monkeypatch)
        assert await _observed_deposit(one, s, account, "retried") == ["retried"]
        assert opened == ["observe"]
        assert [c[1] for c in s.accounts.calls].count("retried") == 1


async def test_an_offer_that_fails_falls_back_to_the_inbox_and_a_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo) as (one, _two):
        [account] = _remote_accounts(one, 1)
        _fail_offers(one, monkeypatch)
        opened = _streams_opened(one, monkeypatch)
        assert await _observed_deposit(one, s, account, "fallback") == ["fallback"]
        assert opened == ["observe"]
        stores = await read_stores(MemoryProvider(silo))
        in_inbox = [
            e.envelope.message_id
            for records in stores.inbox.values()
            for _, r in records
            for e in r.entries
        ]
        assert len(in_inbox) == 1


async def test_offers_failing_to_one_node_log_one_line_per_interval(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # While a peer cannot be reached (an outage), every command offered to it
    # falls back to the inbox; a line per command would flood the log.
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo) as (one, _two):
        accounts = _remote_accounts(one, 3)
        _fail_offers(one, monkeypatch)
        caplog.set_level(logging.INFO, logger="runkit.engine.cluster.routing")
        for n, account in enumerate(accounts):
            assert await _observed_deposit(one, s, account, f"fallback-{n}") == [f"fallback-{n}"]
    lines = [r.getMessage() for r in caplog.records if "offering" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].endswith("using the inbox")


async def test_the_wake_up_after_a_fallback_gets_the_command_handled_without_a_poll(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With the inbox poll an hour away, only the wake-up that follows the
    # fallback append can make the idle owner read its inbox. (A wake-up that
    # arrived while the owner's partition loop was idle used to be acted on
    # only at the loop's next wake, in practice the poll.)
    from runkit.engine.commands import batches

    monkeypatch.setattr(batches, "INBOX_POLL_INTERVAL", 3600.0)
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo) as (one, _two):
        [account] = _remote_accounts(one, 1)
        called = _fail_offers(one, monkeypatch)
        assert await _observed_deposit(one, s, account, "woken") == ["woken"]
        assert "wake" in called


async def test_an_inbox_wake_up_sent_to_a_node_that_does_not_run_the_partition_is_passed_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A sender with a stale view of the owner (a client, say) appends to the
    # inbox and wakes the node it thinks owns the partition: that node dropped
    # the wake-up, and the command waited for the owner's inbox poll (an hour
    # here). It is passed on to the owner as that node sees it.
    from datetime import UTC, datetime

    from runkit.engine.commands import batches
    from runkit.engine.commands.inbox import append_to_inbox, inbox_name
    from runkit.engine.envelope import new_envelope

    monkeypatch.setattr(batches, "INBOX_POLL_INTERVAL", 3600.0)
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo) as (one, _two):
        [account] = _remote_accounts(one, 1)  # owned by `two`
        runtime = await one.runtime(APP_KEY)
        envelope = new_envelope(
            Deposit(account, 1, "stale"),
            app_key=APP_KEY,
            site_key=None,
            created_at=datetime.now(UTC),
        )
        index, entry = runtime.acceptor.route(envelope, keyed=False)
        assert index not in runtime.partitions
        async with await MemoryProvider(silo).journals.open(inbox_name(APP_KEY, index)) as inbox:
            await append_to_inbox(inbox, [entry])
        runtime.wake_local(index, "inbox")
        await wait_until(lambda: [c[1] for c in s.accounts.calls] == ["stale"], timeout=5)


async def test_an_observer_cut_off_from_the_owner_but_not_the_store_is_satisfied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A split: the gateway reaches the store but no peer (every connection is
    # refused). The command falls back to the inbox and the owner records its
    # event; the observer reads it from the owner's partition journal. (It
    # used to retry the refused stream until the caller's timeout, and for
    # ever without one.)
    from runkit.transport import PeerUnavailable

    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo) as (one, _two):
        [account] = _remote_accounts(one, 1)
        assert one.router is not None
        transport = one.router._transport
        tried: list[str] = []

        async def call(address: str, method: str, *args: Any, **kwargs: Any) -> bytes:
            tried.append(method)
            raise PeerUnavailable(address, "connection refused (a split, test)")

        @asynccontextmanager
        async def stream(address: str, method: str, *args: Any, **kwargs: Any) -> Any:
            tried.append(method)
            if method:  # always: the generator must still be one
                raise PeerUnavailable(address, "connection refused (a split, test)")
            yield

        monkeypatch.setattr(transport, "call", call)
        monkeypatch.setattr(transport, "stream", stream)
        assert await _observed_deposit(one, s, account, "split") == ["split"]
        assert {"offer", "observe"} <= set(tried)
        assert [c[1] for c in s.accounts.calls].count("split") == 1


async def test_an_offer_its_stopping_owner_cannot_confirm_is_spilled_with_the_append(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The owner's append of an offered command lands but cannot be confirmed,
    # and the owner stops the partition (its heartbeats fail) with the store
    # failing past its shutdown timeout. The gateway falls back to the inbox:
    # its entry must name that append, or an owner whose takeover scan stops
    # short of it would handle the command again (ADR 0002). (An aggregate
    # command: integration commands go to the inbox, not offered, ADR 0011.)
    from runkit.engine.streams import writer as writer_module

    monkeypatch.setattr(writer_module, "backoff", lambda *a: 30.0)
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    pid = partition_id(APP_KEY, 0)
    owner_id, gateway_id = next(
        ids
        for ids in iter(lambda: (uuid.uuid4(), uuid.uuid4()), None)
        if winner(pid, ids) == ids[0]
    )
    store = FaultyProvider(MemoryProvider(silo))
    settings = {**FAST, "partition_count": 1, "heartbeat_interval": 0.5}
    owner = Engine.from_settings(
        EngineSettings(
            applications=(s.config,),
            persistence_provider=store,
            listen_address="127.0.0.1:0",
            node_id=owner_id,
            shutdown_timeout=0.2,
            **settings,  # type: ignore[arg-type]
        )
    )
    gateway = one_node(s.config, silo, node_id=gateway_id, partition_count=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(owner.run)
        tg.start_soon(gateway.run)
        owner_runtime = await owner.runtime(APP_KEY)
        gateway_runtime = await gateway.runtime(APP_KEY)
        assert gateway.router is not None
        router = gateway.router
        await wait_until(
            lambda: (
                0 in owner_runtime.partitions
                and 0 not in gateway_runtime.partitions  # it may have started alone
                and router.owner(pid) is not None
            ),
            timeout=30,
        )
        router._offer_timeout = 30.0  # the owner's stop answers it, however slow the machine
        store.plan.fail(AFTER, ops={"append"}, names=lambda n: "/stream/" in n, times=1)
        store.plan.fail(BEFORE, ops={"append"}, names=lambda n: "/stream/" in n)
        returned = anyio.Event()

        async def call() -> None:
            await gateway.executor_for(s.app).execute_command(Deposit("acc", 1, "r"))
            returned.set()

        tg.start_soon(call)
        await wait_until(lambda: len(store.plan.injected) >= 1)  # landed, unconfirmed
        store.plan.fail(BEFORE, names=lambda n: n == NODES_KEYSPACE)  # it stops taking work
        with anyio.fail_after(30):
            await returned.wait()
        tg.cancel_scope.cancel()
    stores = await read_stores(MemoryProvider(silo))
    [entry] = [e for _, r in stores.inbox[0] for e in r.entries]
    [position] = [
        i for i, r in enumerate(stores.stream[0]) if entry.envelope.message_id in r.command_ids
    ]
    writer = stores.stream[0][position].writer
    assert entry.unconfirmed == UnconfirmedAppend(position=position, writer=writer)


def _fail_offers(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make *engine*'s offers fail (as a broken link would); the other methods it calls."""
    from runkit.transport import TransportError

    assert engine.router is not None
    transport = engine.router._transport
    original = transport.call
    called: list[str] = []

    async def call(address: str, method: str, *args: Any, **kwargs: Any) -> bytes:
        if method == "offer":
            raise TransportError("the link is down (test)")
        called.append(method)
        return await original(address, method, *args, **kwargs)

    monkeypatch.setattr(transport, "call", call)
    return called


async def test_a_chain_a_process_carries_on_widens_to_every_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bank deposit starts a process that credits the account (another
    # partition, maybe another node) and approves the deposit: the observer of
    # DepositApproved learns from the first command's done note that the chain
    # goes on, and only then subscribes on every node.
    from bank.app import App
    from bank.messages.commands import Deposit as BankDeposit
    from bank.messages.commands import OpenAccount
    from bank.messages.events import AccountOpened, DepositApproved
    from runkit.config import build
    from runkit.engine.partitions import instance_workload, partition_of

    config = build(App())
    key = config.identity.key
    async with two_nodes(config, f"bank-cluster-{uuid.uuid4()}") as (one, two):
        runtimes = [await one.runtime(key), await two.runtime(key)]
        executor = one.executor_for(config)
        opened = _streams_opened(one, monkeypatch)
        approved: list[str] = []
        # Deposits whose transaction the other node handles: DepositApproved
        # is recorded there and reaches `one` only through a stream.
        handler_key = config.command_handler(BankDeposit).identity.key  # type: ignore[union-attr]
        assert one.router is not None
        router = one.router

        def elsewhere() -> list[str]:
            return [
                t
                for t in (f"D-{n}" for n in range(1000))
                if router.owner(
                    partition_id(key, partition_of(instance_workload(handler_key, t), 8))
                )
                is not None
            ][:4]

        def settled_view() -> bool:
            # Each partition runs on exactly one node, the one `one` would offer to.
            owned = [set(rt.partitions) for rt in runtimes]
            return (
                not owned[0] & owned[1]
                and len(owned[0] | owned[1]) == 8
                and all(
                    (router.owner(partition_id(key, i)) is None) == (i in owned[0])
                    for i in range(8)
                )
            )

        await wait_until(lambda: settled_view() and len(elsewhere()) == 4, timeout=30)
        remote = elsewhere()
        for i, transaction in enumerate(remote):
            account = f"acct-{i}"
            with anyio.fail_after(20):
                await executor.execute_command(
                    OpenAccount(customer_id="cust", account_id=account, account_name="Main"),
                    observers=[dogma.observe(AccountOpened, _true)],
                )
            opened_before = len(opened)

            async def saw(event: DepositApproved) -> bool:
                approved.append(event.transaction_id)
                return True

            with anyio.fail_after(20):
                await executor.execute_command(
                    BankDeposit(transaction_id=transaction, account_id=account, amount=100),
                    observers=[dogma.observe(DepositApproved, saw)],
                )
            # The deposit's chain widened: a stream to the other node.
            assert opened[opened_before:] == ["observe"]
            # The caller has left: its observation is gone, and so is the
            # stream's subscription at the other node once the cancel arrives.
            assert not router._observations
            await wait_until(lambda: not two.bus._subscribers, timeout=10)
    assert approved == remote
    # Opening an account ends its chain: the note said so, nothing widened.
    assert len(opened) == 4


async def _true(event: object) -> bool:
    return True


def test_widen_runs_each_callback_once_even_if_registered_late() -> None:
    from runkit.engine.streams import Widen

    calls: list[str] = []
    widen = Widen()
    widen.on_set(lambda: calls.append("early"))
    assert not widen.is_set()
    assert calls == []
    widen.set()
    widen.set()
    widen.on_set(lambda: calls.append("late"))
    assert widen.is_set()
    assert calls == ["early", "late"]


def test_only_chains_without_processes_stay_in_their_partition() -> None:
    from bank.app import App
    from bank.messages.commands import Deposit as BankDeposit
    from runkit.config import build
    from runkit.engine.executor import Executor

    assert Executor(None, setup().config)._stays_in_partition(Deposit)  # type: ignore[arg-type]
    # A bank deposit starts a process that executes commands on other accounts.
    bank = Executor(None, build(App()))  # type: ignore[arg-type]
    assert not bank._stays_in_partition(BankDeposit)


class _OneItemTransport:
    """A transport whose ``observe`` stream yields one note when ``ready`` is set."""

    def __init__(self) -> None:
        self.waiting = anyio.Event()
        self.ready = anyio.Event()

    @asynccontextmanager
    async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[AsyncIterator[bytes]]:
        from runkit.engine.cluster.wire import WireDone, encoder

        note = encoder.encode((WireDone(correlation_id="c", command_id="c", conclusive=True),))
        transport = self

        class Items:
            sent = False

            def __aiter__(self) -> Items:
                return self

            async def __anext__(self) -> bytes:
                if self.sent:
                    await anyio.sleep_forever()
                transport.waiting.set()
                await transport.ready.wait()
                self.sent = True
                return note

        yield Items()


def _fake_peer(address: str = "127.0.0.1:1") -> Any:
    """A live-looking member record of a peer at *address* (for routers on fake transports)."""
    from datetime import UTC, datetime

    from runkit.engine.cluster.nodes import NodeRecord

    now = datetime.now(UTC)
    return NodeRecord(
        node_id=uuid.uuid4(),
        incarnation="i",
        started_at=now,
        written_at=now,
        expires_at=now,
        heartbeat_interval=1.0,
        advertise_address=address,
    )


async def test_leaving_an_observation_while_a_peer_item_is_delivered_is_clean() -> None:
    # On trio a task woken with data runs on to its next checkpoint even if its
    # scope was cancelled meanwhile: the peer's item reaches a closed channel.
    from runkit.engine.cluster.routing import Router

    peer = _fake_peer()
    transport = _OneItemTransport()
    router = Router(
        transport,  # type: ignore[arg-type]
        lambda: {peer.node_id: peer},
        self_id=uuid.uuid4(),
        self_is_node=True,
    )
    async with anyio.create_task_group() as tg:
        router.start(tg)  # the observation's stream runs in the router's task group
        async with router.observe(APP_KEY, "c"):
            await transport.waiting.wait()
            transport.ready.set()  # the follower is woken; the caller leaves first
        # The follower got the item after the caller left: it stops quietly.
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()


async def test_an_offer_failing_after_its_router_stopped_opens_no_stream() -> None:
    # An observed command's offer still in flight when the router's task group
    # closes (the transport closing under it) fails; its observation then
    # widens, and must not start a stream in the closed task group.
    import math
    from datetime import UTC, datetime

    from runkit.engine.cluster.routing import Router
    from runkit.engine.commands.inbox import InboxEntry
    from runkit.engine.envelope import new_envelope, register_types
    from runkit.engine.streams import Observed, Widen
    from runkit.transport import PeerUnavailable

    class ClosedTransport:
        async def call(self, address: str, *args: Any, **kwargs: Any) -> bytes:
            raise PeerUnavailable(address, "shutting down")

    now = datetime.now(UTC)
    peer = _fake_peer()
    router = Router(
        ClosedTransport(),  # type: ignore[arg-type]
        lambda: {peer.node_id: peer},
        self_id=uuid.uuid4(),
        self_is_node=False,
    )
    s = setup()
    register_types(s.config.message_types())
    envelope = new_envelope(
        Deposit("acct", 1, "ref"), app_key=APP_KEY, site_key=None, created_at=now
    )
    entry = InboxEntry(envelope=envelope, handler_key="h", instance_id="acct")
    send, receive = anyio.create_memory_object_stream[Observed](math.inf)
    with send, receive, ExitStack() as observing:
        async with anyio.create_task_group() as tg:
            router.start(tg)
            # Waits for the offer's answer before opening streams.
            observing.enter_context(
                router.observation(APP_KEY, envelope.correlation_id, send, widen=Widen())
            )
            tg.cancel_scope.cancel()
        # Lost in the call: the owner may have taken it (the caller spills it marked).
        with pytest.raises(OfferUnanswered):
            await router.offer(APP_KEY, 0, partition_id(APP_KEY, 0), [entry])


class _AnsweringTransport:
    """Answers each offer with the next of *answers*; notes an ``observe`` stream opening."""

    def __init__(self, *answers: bytes) -> None:
        self.answers = list(answers)
        self.observing = anyio.Event()

    async def call(self, *args: Any, **kwargs: Any) -> bytes:
        return self.answers.pop(0)

    @asynccontextmanager
    async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[AsyncIterator[bytes]]:
        self.observing.set()

        async def nothing() -> AsyncIterator[bytes]:
            await anyio.sleep_forever()
            yield b""  # pragma: no cover

        yield nothing()


async def test_an_answer_to_another_command_of_the_chain_does_not_settle_its_observation() -> None:
    # A keyed retry of a chain (the same correlation ID) is observed while a
    # process here still offers a command of the chain's earlier run. That
    # command's answer (its events, its conclusive done note) is not the
    # retry's: it must not settle the observation, which would then not open
    # its streams when the retry's own answer comes without events (too many
    # to send), and would wait until the caller's timeout.
    import math
    from datetime import UTC, datetime

    from runkit.engine.cluster.routing import Router
    from runkit.engine.cluster.wire import OfferAnswer, WireDone, WireEvent, encoder
    from runkit.engine.commands.acceptance import command_id_for
    from runkit.engine.commands.inbox import InboxEntry
    from runkit.engine.envelope import new_envelope, register_types
    from runkit.engine.streams import Observed, Widen

    now = datetime.now(UTC)
    peer = _fake_peer()
    s = setup()
    register_types(s.config.message_types())
    retry = new_envelope(
        Deposit("acct", 1, "ref"),
        app_key=APP_KEY,
        site_key=None,
        created_at=now,
        message_id=command_id_for(APP_KEY, "key"),
    )
    chain = retry.correlation_id
    # The earlier run's process command, and the event it recorded.
    produced = new_envelope(
        Deposit("other", 1, "ref"),
        app_key=APP_KEY,
        site_key=None,
        created_at=now,
        causation_id=new_id(),
        correlation_id=chain,
    )
    recorded = new_envelope(
        Deposited("other", 1, 1, "ref"),
        app_key=APP_KEY,
        site_key=None,
        created_at=now,
        causation_id=produced.message_id,
        correlation_id=chain,
    )
    produced_answer = OfferAnswer(
        accepted=True,
        events=(
            WireEvent(stream_id=new_id(), offset=0, envelope=recorded, recorded_at=now),
            WireDone(correlation_id=chain, command_id=produced.message_id, conclusive=True),
        ),
    )
    transport = _AnsweringTransport(
        encoder.encode(produced_answer),
        encoder.encode(OfferAnswer(accepted=True)),  # the retry's: its events left out
    )
    router = Router(
        transport,  # type: ignore[arg-type]
        lambda: {peer.node_id: peer},
        self_id=uuid.uuid4(),
        self_is_node=False,
    )
    send, receive = anyio.create_memory_object_stream[Observed](math.inf)
    with send, receive:
        async with anyio.create_task_group() as tg:
            router.start(tg)
            with router.observation(APP_KEY, chain, send, widen=Widen()):
                for envelope, account in ((produced, "other"), (retry, "acct")):
                    entry = InboxEntry(envelope=envelope, handler_key="h", instance_id=account)
                    assert await router.offer(APP_KEY, 0, partition_id(APP_KEY, 0), [entry])
                # At once (not at the offer timeout): nothing settled the observation.
                with anyio.fail_after(1):
                    await transport.observing.wait()
                # The other command's events were not handed over: the streams replay them.
                assert receive.statistics().current_buffer_used == 0
            tg.cancel_scope.cancel()


async def test_a_gateway_keeps_no_offer_slots_for_peers_it_no_longer_offers_to() -> None:
    # A long-lived client sees peers come and go (each restart may bring a new
    # address): it must not keep a semaphore for every address it ever used.
    from datetime import UTC, datetime

    from runkit.engine.cluster.nodes import NodeRecord
    from runkit.engine.cluster.routing import Router
    from runkit.engine.cluster.wire import OK
    from runkit.engine.commands.inbox import InboxEntry
    from runkit.engine.envelope import new_envelope, register_types

    now = datetime.now(UTC)
    s = setup()
    register_types(s.config.message_types())
    peers: dict[uuid.UUID, NodeRecord] = {}
    transport = _AnsweringTransport(*[OK] * 3)
    router = Router(
        transport,  # type: ignore[arg-type]
        lambda: peers,
        self_id=uuid.uuid4(),
        self_is_node=False,
    )
    for port in (1, 2, 3):
        peer = _fake_peer(f"127.0.0.1:{port}")
        peers.clear()
        peers[peer.node_id] = peer
        envelope = new_envelope(
            Deposit("acct", 1, "ref"), app_key=APP_KEY, site_key=None, created_at=now
        )
        entry = InboxEntry(envelope=envelope, handler_key="h", instance_id="acct")
        assert await router.offer(APP_KEY, 0, partition_id(APP_KEY, 0), [entry], room_wait=1.0)
    assert router._offer_slots == {}


async def test_an_offer_that_times_out_while_its_integration_runs_is_handled_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A gateway of an earlier release offers an integration command (this
    # release sends them to the inbox); the owner takes it into its batch, the
    # handler outlasts the offer timeout, so the gateway also appends the
    # command to the inbox (right: the offer's fate is unknown). The owner must
    # take the inbox copy for the same command while the first one's events
    # are still being committed, not run the handler again.
    from datetime import UTC, datetime

    from runkit.engine.envelope import new_envelope

    s = setup()
    s.notifier.delay = 1.0
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo) as (one, _two):
        router = one.router
        assert router is not None
        monkeypatch.setattr(router, "_offer_timeout", 0.3)
        acceptor = await one.acceptor(APP_KEY)

        def remote_id() -> str:  # command IDs of partitions the other node owns
            while True:
                candidate = new_id()
                if router.owner(partition_id(APP_KEY, partition_of(candidate, 8))):
                    return candidate

        offered: list[bool] = []

        async def offer_as_before(n: int) -> None:
            envelope = new_envelope(
                Notify(n),
                app_key=APP_KEY,
                site_key=None,
                created_at=datetime.now(UTC),
                message_id=remote_id(),
            )
            index, entry = acceptor.route(envelope, keyed=False)
            try:
                taken = await router.offer(APP_KEY, index, partition_id(APP_KEY, index), [entry])
            except OfferUnanswered:
                taken = False
            offered.append(taken)
            if not taken:
                await acceptor._to_inbox(index, [entry])

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for n in range(3):
                    tg.start_soon(offer_as_before, n)
        await wait_until(lambda: len(s.notifier.calls) >= 3)
        await anyio.sleep(1.5)  # a second run, if any, would have started and ended
        assert offered == [False] * 3  # each offer timed out...
        assert await inbox_entries(silo) >= 1  # ...and the fallback was taken
        stores = await settled(MemoryProvider(silo))
    check_invariants(stores)
    assert sorted(s.notifier.calls) == [0, 1, 2]


async def test_an_integration_command_for_a_peer_is_owned_before_its_handler_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The gateway appends it to the inbox and wakes the owner, rather than
    # offering it: the owner would answer only once handle_command returned
    # (or the gateway fell back after the offer timeout, here too long to wait).
    from runkit.engine.commands import batches

    monkeypatch.setattr(batches, "INBOX_POLL_INTERVAL", 3600.0)  # only the wake-up reads it
    s = setup()
    s.notifier.release = anyio.Event()
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo) as (one, _two):
        router = one.router
        assert router is not None
        monkeypatch.setattr(router, "_offer_timeout", 30.0)
        called: list[str] = []
        original = router._transport.call

        async def call(address: str, method: str, *args: Any, **kwargs: Any) -> bytes:
            called.append(method)
            return await original(address, method, *args, **kwargs)

        monkeypatch.setattr(router._transport, "call", call)

        def remote_id() -> str:  # command IDs of partitions the other node owns
            while True:
                candidate = new_id()
                if router.owner(partition_id(APP_KEY, partition_of(candidate, 8))):
                    return candidate

        monkeypatch.setattr(executor_module, "new_id", remote_id)
        with anyio.fail_after(5):
            await one.executor_for(s.app).execute_command(Notify(1))
        assert "offer" not in called
        assert await inbox_entries(silo) == 1
        await wait_until(lambda: s.notifier.calls == [1], timeout=20)
        s.notifier.release.set()
        stores = await settled(MemoryProvider(silo), timeout=20)
    check_invariants(stores)
    assert [e.description for e in stores.all_events()] == ["Notified"]
    assert s.notifier.calls == [1]


async def test_a_client_entered_before_any_node_starts_waits_for_the_application() -> None:
    # Like an engine's executor before run(): the command waits for a node to
    # start the application, then goes through.
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    engine = one_node(s.config, silo, listen_address="127.0.0.1:0")
    async with (
        runkit.Client(
            runkit.with_application(s.config),
            runkit.with_persistence_provider(MemoryProvider(silo)),
        ) as client,
        anyio.create_task_group() as tg,
    ):
        done = anyio.Event()

        async def deposit() -> None:
            await client.executor_for(s.app).execute_command(Deposit("early", 1, "r"))
            done.set()

        tg.start_soon(deposit)
        await anyio.sleep(0.3)
        assert not done.is_set()  # no node has started the application yet
        tg.start_soon(engine.run)
        with anyio.fail_after(10):
            await done.wait()
        stores = await settled(MemoryProvider(silo))  # handled by the node
        tg.cancel_scope.cancel()
    check_invariants(stores)
    assert len(stores.published()) == 1


async def test_a_client_whose_certificate_the_nodes_refuse_says_so_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Nodes with an operator CA, a client without one (runkit execute without
    # DOGMA_TLS_*): its commands still get through, by the inbox, but slowly;
    # runkit execute shows warnings only, so an INFO line would hide the cause.
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    ca_cert, ca_key = issue(tmp_path, "cluster-ca", None)
    cert, key = issue(tmp_path, "node-1", load_issuer(ca_cert, ca_key))
    engine = one_node(
        s.config,
        silo,
        listen_address="127.0.0.1:0",
        tls_cert=str(cert),
        tls_key=str(key),
        tls_ca=str(ca_cert),
    )
    client = runkit.Client(
        runkit.with_application(s.config),
        runkit.with_persistence_provider(MemoryProvider(silo)),
        runkit.with_heartbeat_interval(0.5),
    )
    with caplog.at_level(logging.WARNING, logger="runkit"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await engine.runtime(APP_KEY)
            async with client:
                with anyio.fail_after(10):
                    for i in range(3):
                        await client.executor_for(s.app).execute_command(Deposit("a", 1, f"r{i}"))
            tg.cancel_scope.cancel()
    offers = [r for r in caplog.records if r.getMessage().startswith("offering ")]
    [offer] = offers  # once per owner per interval, not once per command
    assert offer.levelno == logging.WARNING
    message = offer.getMessage()
    assert "the peer closed the connection" in message
    assert (
        "probably does not trust this node's self-signed certificate (a peer with a CA" in message
    )
    assert "give every node and client the same DOGMA_TLS_CA" in message
    assert message.endswith("using the inbox, which is slower")
    [refusal] = [r for r in caplog.records if "refused connection" in r.getMessage()][:1]
    assert "does not verify against this node's CA (self-signed certificate)" in (
        refusal.getMessage()
    )


async def test_a_client_entered_twice_is_refused_at_once_and_keeps_working() -> None:
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    engine = one_node(s.config, silo, listen_address="127.0.0.1:0")
    client = runkit.Client(
        runkit.with_application(s.config),
        runkit.with_persistence_provider(MemoryProvider(silo)),
        runkit.with_heartbeat_interval(0.5),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await engine.runtime(APP_KEY)
        async with client:
            with anyio.fail_after(1), pytest.raises(RuntimeError, match="already entered"):
                async with client:
                    pass
            # The refused entry left the first one as it was.
            with anyio.fail_after(10):
                await client.executor_for(s.app).execute_command(Deposit("a", 1, "r"))
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("url", "advice"),
    [
        ("memory:///{silo}", "a memory:// store lives inside the process that opened it"),
        ("", "start a node of the cluster (runkit run ...) before sending it commands"),
    ],
)
async def test_a_client_on_a_store_no_node_started_says_what_to_do(url: str, advice: str) -> None:
    # On memory://, "start a node" cannot help: a node in another process has its own store.
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    store = (
        runkit.with_persistence(url.format(silo=silo))
        if url
        else runkit.with_persistence_provider(MemoryProvider(silo))
    )
    async with runkit.Client(
        runkit.with_application(s.config), store, runkit.with_start_timeout(0.1)
    ) as client:
        with pytest.raises(runkit.ConfigurationError) as info:
            await client.executor_for(s.app).execute_command(Deposit(account="acct-1", amount=1))
    assert "has never run on this store" in str(info.value)
    assert info.value.problems[0].startswith(advice)


async def test_a_client_used_after_its_block_says_so() -> None:
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    client = runkit.Client(
        runkit.with_application(s.config), runkit.with_persistence(f"memory:///{silo}")
    )
    async with client:
        await client.status()
    with pytest.raises(RuntimeError, match="inside `async with"):
        await client.status()  # not the PersistenceError of the provider it closed


async def test_leaving_a_client_ends_a_call_waiting_for_its_observers() -> None:
    # The command is durable (in an inbox: the node does not listen) and the
    # call waits for Notified while the integration runs. Leaving the client
    # stops what feeds the observers: the call must end, not wait for ever.
    s = setup()
    s.notifier.delay = 60
    silo = f"cluster-{uuid.uuid4()}"
    engine = one_node(s.config, silo)
    outcome: list[BaseException] = []
    done = anyio.Event()

    async def saw(event: Notified) -> bool:
        return True

    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await engine.runtime(APP_KEY)
        async with runkit.Client(
            runkit.with_application(s.config),
            runkit.with_persistence_provider(MemoryProvider(silo)),
        ) as client:

            async def notify() -> None:
                try:
                    await client.executor_for(s.app).execute_command(
                        Notify(1), observers=[dogma.observe(Notified, saw, registry=REGISTRY)]
                    )
                except Exception as exc:
                    outcome.append(exc)
                done.set()

            tg.start_soon(notify)
            await wait_until(lambda: bool(s.notifier.calls))  # handled, not yet done
        with anyio.fail_after(10):
            await done.wait()
        tg.cancel_scope.cancel()
    assert len(outcome) == 1
    assert isinstance(outcome[0], EngineStopped)
    assert str(outcome[0]) == "the client was left before an observer was satisfied"


@pytest.mark.parametrize("listening", [False, True], ids=["lone", "routed"])
async def test_stopping_an_engine_ends_a_call_waiting_for_its_observers(listening: bool) -> None:
    # As for a client: the command was handled and the call waits for
    # Notified while the integration runs when the engine stops.
    s = setup()
    s.notifier.delay = 60
    silo = f"cluster-{uuid.uuid4()}"
    engine = one_node(s.config, silo, **({"listen_address": "127.0.0.1:0"} if listening else {}))
    outcome: list[BaseException] = []
    done = anyio.Event()

    async def saw(event: Notified) -> bool:
        return True

    async def notify() -> None:
        try:
            await engine.executor_for(s.app).execute_command(
                Notify(1), observers=[dogma.observe(Notified, saw, registry=REGISTRY)]
            )
        except Exception as exc:
            outcome.append(exc)
        done.set()

    async with anyio.create_task_group() as caller:
        async with anyio.create_task_group() as running:
            running.start_soon(engine.run)
            await engine.runtime(APP_KEY)
            caller.start_soon(notify)
            await wait_until(lambda: bool(s.notifier.calls))  # handled, not yet done
            running.cancel_scope.cancel()
        with anyio.fail_after(10):
            await done.wait()
    assert len(outcome) == 1
    assert isinstance(outcome[0], EngineStopped)
    assert str(outcome[0]) == "the engine stopped before an observer was satisfied"


# --- authentication ------------------------------------------------------------------


async def _heartbeat(provider: MemoryProvider, fingerprint: str, interval: float) -> None:
    """Write a live heartbeat record with *fingerprint*, as a node that has just joined."""
    from datetime import UTC, datetime, timedelta

    import msgspec

    from runkit.engine.cluster.nodes import (
        EXPIRY_INTERVALS,
        NODES_KEYSPACE,
        RECORD_VERSION,
        Heartbeat,
    )

    now, node_id = datetime.now(UTC), str(uuid.uuid4())
    beat = Heartbeat(
        version=RECORD_VERSION,
        node_id=node_id,
        incarnation="i",
        started_at=now,
        written_at=now,
        expires_at=now + timedelta(seconds=EXPIRY_INTERVALS * interval),
        heartbeat_interval=interval,
        tls_fingerprint=fingerprint,
    )
    async with await provider.keyspaces.open(NODES_KEYSPACE) as ks:
        await ks.set_unconditional(node_id.encode(), msgspec.msgpack.encode(beat))


async def test_unknown_certificates_cost_a_store_read_per_interval_and_newcomers_get_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every connection asks about its certificate: a stranger reusing one must
    # not drive a read of all the heartbeat records per connection.
    from runkit.engine.cluster import trust
    from runkit.engine.cluster.nodes import NodeRecord, list_nodes

    reads = 0

    async def counting(provider: MemoryProvider) -> list[NodeRecord]:
        nonlocal reads
        reads += 1
        return await list_nodes(provider)

    monkeypatch.setattr(trust, "list_nodes", counting)
    provider = MemoryProvider(f"auth-{uuid.uuid4()}")
    authenticate = trust.authenticator(provider, dict)  # reads at most once a second
    verdicts: list[bool] = []

    async def ask() -> None:
        verdicts.append(await authenticate("stranger"))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(ask)
    for _ in range(20):
        await ask()
    assert (verdicts, reads) == ([False] * 40, 1)
    # A node that joins now is accepted within an interval of its first heartbeat.
    await _heartbeat(provider, "newcomer", 1.0)
    assert not await authenticate("newcomer")  # until the records may be read again
    await anyio.sleep(1.0)
    assert await authenticate("newcomer")
    assert reads == 2


async def test_a_handshake_cancelled_while_reading_the_records_leaves_the_read_to_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A handshake that times out while the heartbeat records are being read
    # must not count as a read: the next handshake reads them, rather than
    # judging by the records of before for another interval.
    from runkit.engine.cluster import trust
    from runkit.engine.cluster.nodes import NodeRecord, list_nodes

    stalled = True

    async def read(provider: MemoryProvider) -> list[NodeRecord]:
        if stalled:
            await anyio.sleep(10)
        return await list_nodes(provider)

    monkeypatch.setattr(trust, "list_nodes", read)
    provider = MemoryProvider(f"auth-{uuid.uuid4()}")
    authenticate = trust.authenticator(provider, dict, refresh_interval=60.0)
    await _heartbeat(provider, "newcomer", 1.0)
    with anyio.move_on_after(0.1) as scope:
        await authenticate("newcomer")
    assert scope.cancelled_caught
    stalled = False
    assert await authenticate("newcomer")


async def test_a_client_observes_the_events_of_a_node_it_cannot_reach() -> None:
    # A node without a listen address cannot be reached: the client's command
    # goes through the inbox, and its observer reads the chain's events from
    # the partition's stream journal instead of a stream from the node.
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    engine = one_node(s.config, silo)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        async with runkit.Client(
            runkit.with_application(s.config),
            runkit.with_persistence_provider(MemoryProvider(silo)),
        ) as client:
            executor = client.executor_for(s.app)
            for i in range(3):
                seen: list[Any] = []

                async def saw(event: Deposited, seen: list[Any] = seen) -> bool:
                    seen.append(event)
                    return True

                with anyio.fail_after(10):
                    await executor.execute_command(
                        Deposit(f"far{i}", 1, f"r{i}"),
                        observers=[dogma.observe(Deposited, saw, registry=REGISTRY)],
                    )
                assert [e.account for e in seen] == [f"far{i}"]
        tg.cancel_scope.cancel()


async def _deposit_observed(executor: dogma.CommandExecutor, account: str, ref: str) -> None:
    seen: list[Any] = []

    async def saw(event: Deposited) -> bool:
        seen.append(event)
        return True

    with anyio.fail_after(10):
        await executor.execute_command(
            Deposit(account, 1, ref), observers=[dogma.observe(Deposited, saw, registry=REGISTRY)]
        )
    assert [e.account for e in seen] == [account]


async def test_a_node_without_a_listen_address_offers_to_its_peers_and_observes_them() -> None:
    # It calls out like a client: its commands for the peer's partitions are
    # offered (not left in the inbox for the owner's poll), and its observers
    # see the events its peer records. The peer observes this node's events
    # through the store.
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo, listening=(False, True)) as (quiet, listening):
        remote = _remote_accounts(quiet, 4)
        for i, account in enumerate(remote):
            with anyio.fail_after(5):
                await _deposit_observed(quiet.executor_for(s.app), account, f"q{i}")
        in_inbox = await inbox_entries(silo)
        assert in_inbox <= 1, f"{in_inbox} of 4 offers fell back to the inbox"
        for i, account in enumerate(_remote_accounts(listening, 2)):
            await _deposit_observed(listening.executor_for(s.app), account, f"l{i}")
    check_invariants(await settled(MemoryProvider(silo)))


async def test_nodes_without_listen_addresses_observe_each_other_through_the_store() -> None:
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    async with two_nodes(s.config, silo, listening=(False, False)) as (one, _two):
        for i, account in enumerate(_remote_accounts(one, 2)):
            await _deposit_observed(one.executor_for(s.app), account, f"r{i}")


def _taking_all(partitions: int) -> tuple[uuid.UUID, uuid.UUID]:
    """Two node IDs: the second wins every partition of the test application from the first."""
    joiner = uuid.uuid4()
    while True:
        lone = uuid.uuid4()
        ids = [partition_id(APP_KEY, i) for i in range(partitions)]
        if all(winner(p, (lone, joiner)) == joiner for p in ids):
            return lone, joiner


@pytest.mark.parametrize("listening", [False, True], ids=["quiet-joiner", "listening-joiner"])
async def test_a_lone_node_observes_what_a_node_joining_during_the_call_records(
    listening: bool,
) -> None:
    # A lone node without a listen address watches only its own bus. A node
    # that joins while a call waits takes the command's partition over and
    # records the observed event: the call must see it (through the joiner's
    # stream, or its partition's stream journal when it cannot be reached).
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    lone_id, joiner_id = _taking_all(int(FAST["partition_count"]))
    lone = one_node(s.config, silo, node_id=lone_id)
    joiner = one_node(
        s.config, silo, node_id=joiner_id, listen_address="127.0.0.1:0" if listening else None
    )
    s.notifier.release = anyio.Event()
    seen: list[Any] = []

    async def saw(event: Notified) -> bool:
        seen.append(event)
        return True

    async def call() -> None:
        with anyio.fail_after(15):
            await lone.executor_for(s.app).execute_command(
                Notify(1, "joined"), observers=[dogma.observe(Notified, saw, registry=REGISTRY)]
            )

    async with anyio.create_task_group() as tg:
        tg.start_soon(lone.run)
        lone_rt = await lone.runtime(APP_KEY)
        async with anyio.create_task_group() as calls:
            calls.start_soon(call)
            await wait_until(lambda: s.notifier.calls == [1], timeout=10)
            tg.start_soon(joiner.run)
            joiner_rt = await joiner.runtime(APP_KEY)
            # The joiner runs every partition and handles the command again
            # (the lone node's handling was abandoned with its partition).
            await wait_until(
                lambda: not lone_rt.partitions and s.notifier.calls == [1, 1], timeout=20
            )
            assert len(joiner_rt.partitions) == FAST["partition_count"]
            s.notifier.release.set()
        assert [e.n for e in seen] == [1]
        # The call has left its subscription and the observation routed for it.
        assert not lone._lone._open
        assert lone.router is not None
        assert not lone.router._observations
        tg.cancel_scope.cancel()


async def test_a_listen_address_in_use_is_a_configuration_error() -> None:
    s = setup()
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as taken:
        port = taken.extra(anyio.abc.SocketAttribute.local_port)
        engine = one_node(s.config, f"cluster-{uuid.uuid4()}", listen_address=f"127.0.0.1:{port}")
        with anyio.fail_after(10), pytest.raises(BaseException) as info:
            await engine.run()
    # A configuration error (which runkit run reports in one line, exit 2),
    # not the transport's error.
    errors = [info.value]
    while isinstance(errors[-1], BaseExceptionGroup):
        errors.append(errors[-1].exceptions[0])
    assert isinstance(errors[-1], runkit.ConfigurationError), repr(info.value)
    assert f"cannot listen on 127.0.0.1:{port}" in str(errors[-1])
    # It names ways to change the address that exist (runkit run has no --listen).
    assert "runkit.with_listen_address() or DOGMA_LISTEN_ADDRESS" in str(errors[-1])


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("0.0.0.0:0", "the node cannot be reached by its peers"),
        ("in-use", "cannot listen on 127.0.0.1:"),
    ],
)
async def test_run_raises_an_unreachable_or_unusable_listen_address_as_is(
    listen: str, message: str
) -> None:
    # run() raises the ConfigurationError itself, as documented, not an
    # exception group around it.
    s = setup()
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as taken:
        if listen == "in-use":
            listen = f"127.0.0.1:{taken.extra(anyio.abc.SocketAttribute.local_port)}"
        engine = one_node(s.config, f"cluster-{uuid.uuid4()}", listen_address=listen)
        with anyio.fail_after(10), pytest.raises(runkit.ConfigurationError, match=message):
            await engine.run()


@pytest.mark.parametrize(("days", "warned"), [(10, True), (60, False)])
async def test_a_node_whose_certificate_expires_within_30_days_says_so_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, days: int, warned: bool
) -> None:
    s = setup()
    cert, key = issue(tmp_path, "node-1", None, valid_to=timedelta(days=days))
    engine = one_node(
        s.config,
        f"cluster-{uuid.uuid4()}",
        listen_address="127.0.0.1:0",
        tls_cert=str(cert),
        tls_key=str(key),
    )
    with caplog.at_level(logging.INFO, logger="runkit"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            with anyio.fail_after(10):
                await engine.runtime(APP_KEY)
            tg.cancel_scope.cancel()
    expiring = [r for r in caplog.records if "expires" in r.getMessage()]
    if not warned:
        assert expiring == []
        return
    [record] = expiring
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert f"the TLS certificate in {cert} (CN=node-1) expires at " in message
    assert f"in {days:.1f} days: peers refuse it from then on" in message
    secret = key.read_text().splitlines()[1]
    assert not any(secret in r.getMessage() or "PRIVATE" in r.getMessage() for r in caplog.records)


@attrs.define
class _Full:
    """Two nodes, one partition's backlog at its limit of 3 (see ``full_partition``)."""

    s: Setup
    engines: tuple[Engine, Engine]
    owner: int
    caller: int
    index: int
    release: anyio.Event  # lets the held integration command finish
    accounts: list[str]  # accounts of the full partition
    others: list[str]  # accounts of the owner's other partitions

    @property
    def executor(self) -> Any:
        return self.engines[self.caller].executor_for(self.s.app)

    def handled(self, ref: str) -> int:
        return [c[1] for c in self.s.accounts.calls].count(ref)


@asynccontextmanager
async def full_partition(silo: str) -> AsyncIterator[_Full]:
    """Two nodes; the partition of the MINIMIZE integration has its backlog limit (3)
    of commands waiting on its owner (one at a time, the first held until
    ``s.serial.release`` is set)."""
    from runkit.engine.partitions import instance_workload

    s = setup()
    release = s.serial.release = anyio.Event()
    full = partition_of(SERIAL_KEY, 8)

    def of(account: str) -> int:
        return partition_of(instance_workload(s.accounts_key, account), 8)

    async with two_nodes(s.config, silo, backlog_limit=3) as engines:
        runtimes = [await e.runtime(APP_KEY) for e in engines]
        owner, caller = (0, 1) if full in runtimes[0].partitions else (1, 0)
        owned = set(runtimes[owner].partitions)
        names = [f"acc-{i}" for i in range(2000)]
        accounts = [a for a in names if of(a) == full]
        others = [a for a in names if of(a) in owned and of(a) != full]
        partition = runtimes[owner].partitions[full]
        async with anyio.create_task_group() as tg:
            for n in range(3):
                tg.start_soon(engines[owner].executor_for(s.app).execute_command, Serial(n))
            await wait_until(lambda: partition.backlog == 3 and len(s.serial.calls) == 1)
            yield _Full(s, engines, owner, caller, full, release, accounts, others)
            release.set()


async def _deposits_in_inboxes(silo: str) -> int:
    stores = await read_stores(MemoryProvider(silo))
    return sum(
        1
        for records in stores.inbox.values()
        for _, record in records
        for entry in record.entries
        if entry.instance_id is not None
    )


async def test_a_callers_command_offered_to_a_full_partition_waits_for_room_and_then_raises() -> (
    None
):
    # Back-pressure across nodes: the owner's partition has its backlog limit
    # of commands waiting. A caller on the other node offering an aggregate
    # command for that partition must wait for room as a caller on the owner
    # does, and get Backlogged after its backlog timeout; the owner took offers
    # at once before, however full. Commands produced by handlers are never
    # refused.
    from datetime import UTC, datetime

    from runkit.engine.commands.acceptance import Backlogged
    from runkit.engine.envelope import new_envelope

    silo = f"cluster-{uuid.uuid4()}"
    async with full_partition(silo) as f:
        runtime = await f.engines[f.caller].runtime(APP_KEY)
        runtime.acceptor._backlog_timeout = 0.5
        with anyio.fail_after(10), pytest.raises(Backlogged, match="backlog limit 3"):
            await f.executor.execute_command(Deposit(f.accounts[0], 1, "refused"))
        # Long again: the caller below must outwait the partition's release.
        runtime.acceptor._backlog_timeout = 30.0
        # A command a process produced on the caller's node is taken anyway.
        router = f.engines[f.caller].router
        assert router is not None
        produced = new_envelope(
            Deposit(f.accounts[1], 1, "produced"),
            app_key=APP_KEY,
            site_key=None,
            created_at=datetime.now(UTC),
            message_id=str(uuid.uuid4()),
        )
        index, entry = runtime.acceptor.route(produced, keyed=True)
        assert index == f.index
        with anyio.fail_after(10):
            assert await router.offer(APP_KEY, index, partition_id(APP_KEY, index), [entry])
        # A caller waiting for room goes ahead once there is some; its offer
        # waits at the owner meanwhile, rather than being made over and over.
        offers = 0
        original = router._transport.call

        async def call(address: str, method: str, *args: Any, **kwargs: Any) -> bytes:
            nonlocal offers
            offers += method == "offer"
            return await original(address, method, *args, **kwargs)

        router._transport.call = call  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            tg.start_soon(f.executor.execute_command, Deposit(f.accounts[2], 1, "waited"))
            await anyio.sleep(0.3)
            assert not f.handled("waited")
            f.release.set()
        assert f.handled("waited") == 1
        assert offers == 1
    stores = await settled(MemoryProvider(silo))
    check_invariants(stores)
    assert not f.handled("refused")
    assert f.handled("produced") == 1


async def test_callers_offers_in_flight_to_a_peer_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Offers waiting at a full partition's owner each take one of its requests
    # on the connection; past the transport's limit per connection the owner
    # answered "overloaded" and the command went to the inbox, past the
    # backlog limit. A gateway keeps at most OFFERS_PER_PEER callers' offers in
    # flight to a peer (the others wait here), and counts an "overloaded"
    # answer as no room, not as a reason to use the inbox.
    from runkit.engine.cluster import routing

    monkeypatch.setattr(routing, "OFFERS_PER_PEER", 1)
    silo = f"cluster-{uuid.uuid4()}"
    async with full_partition(silo) as f:
        router = f.engines[f.caller].router
        assert router is not None
        in_flight = most = 0
        original = router._transport.call

        async def call(address: str, method: str, *args: Any, **kwargs: Any) -> bytes:
            nonlocal in_flight, most
            in_flight += method == "offer"
            most = max(most, in_flight)
            try:
                return await original(address, method, *args, **kwargs)
            finally:
                in_flight -= method == "offer"

        router._transport.call = call  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            tg.start_soon(f.executor.execute_command, Deposit(f.accounts[0], 1, "parked"))
            await wait_until(lambda: in_flight == 1)
            # Not for the full partition, but for the same owner: it waits for
            # the slot, here.
            tg.start_soon(f.executor.execute_command, Deposit(f.others[0], 1, "queued"))
            await anyio.sleep(0.3)
            assert not f.handled("queued")
            f.release.set()
        assert most == 1
        assert f.handled("parked") == f.handled("queued") == 1
        assert await _deposits_in_inboxes(silo) == 0


async def test_an_overloaded_owner_counts_as_no_room_for_a_callers_offer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # More offers than the owner serves at once on the connection: the extra
    # ones are answered "overloaded", and a caller's command is offered again
    # (it waits for room), not appended to the inbox past the backlog limit.
    import functools

    from runkit.engine.cluster import routing
    from runkit.transport import NodeTransport

    monkeypatch.setattr(
        routing, "NodeTransport", functools.partial(NodeTransport, max_concurrent_requests=2)
    )
    silo = f"cluster-{uuid.uuid4()}"
    async with full_partition(silo) as f:
        async with anyio.create_task_group() as tg:
            for n in range(4):
                tg.start_soon(f.executor.execute_command, Deposit(f.accounts[n], 1, f"r{n}"))
            await anyio.sleep(0.5)
            assert not any(f.handled(f"r{n}") for n in range(4))
            f.release.set()
        assert [f.handled(f"r{n}") for n in range(4)] == [1, 1, 1, 1]
        assert await _deposits_in_inboxes(silo) == 0


async def test_leaving_a_client_while_an_offer_waits_to_be_made_again_raises_engine_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The owner's partition is full: the client's offer is answered busy and
    # made again after a pause, during which the client is left. The call
    # ended with the closed transport's internal RuntimeError, not the
    # EngineStopped a call in flight gets (it may be retried with its key).
    from runkit.engine.commands import acceptance

    monkeypatch.setattr(acceptance, "backoff", lambda *a, **k: 0.5)
    silo = f"cluster-{uuid.uuid4()}"
    outcome: list[BaseException] = []
    done = anyio.Event()
    async with full_partition(silo) as f, anyio.create_task_group() as tg:
        async with runkit.Client(
            runkit.with_application(f.s.config),
            runkit.with_persistence_provider(MemoryProvider(silo)),
            runkit.with_heartbeat_interval(0.5),
        ) as client:
            router = client._router
            assert router is not None
            busy = anyio.Event()
            original = router._transport.call

            async def call(address: str, method: str, *args: Any, **kwargs: Any) -> bytes:
                answer = await original(address, method, *args, **kwargs)
                if method == "offer":
                    busy.set()
                return answer

            monkeypatch.setattr(router._transport, "call", call)

            async def deposit() -> None:
                try:
                    await client.executor_for(f.s.app).execute_command(
                        Deposit(f.accounts[0], 1, "left")
                    )
                except BaseException as exc:
                    outcome.append(exc)
                done.set()

            tg.start_soon(deposit)
            with anyio.fail_after(10):
                await busy.wait()  # answered busy: the caller pauses
        with anyio.fail_after(10):
            await done.wait()
    assert len(outcome) == 1
    assert isinstance(outcome[0], EngineStopped), repr(outcome[0])


async def test_waiting_observers_leave_a_peer_room_for_offers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Scaled down: the node serves 4 requests per connection (256 by default)
    # and a client holds 4 observations open (web requests waiting on chains
    # that go through processes open a stream per node each). The streams
    # took every request slot: the client's offers were answered
    # "overloaded", counted as busy, and ended in Backlogged although the
    # partition was empty. Past 2 streams here (32 by default), an
    # observation reads the peer's partitions from the store instead.
    import functools

    from runkit.engine.cluster import routing
    from runkit.transport import NodeTransport

    monkeypatch.setattr(
        routing, "NodeTransport", functools.partial(NodeTransport, max_concurrent_requests=4)
    )
    monkeypatch.setattr(routing, "OBSERVE_STREAMS_PER_PEER", 2, raising=False)
    s = setup()
    silo = f"cluster-{uuid.uuid4()}"
    engine = one_node(s.config, silo, listen_address="127.0.0.1:0")
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await engine.runtime(APP_KEY)
        async with runkit.Client(
            runkit.with_application(s.config),
            runkit.with_persistence_provider(MemoryProvider(silo)),
        ) as client:
            acceptor = await client.acceptor(APP_KEY)
            acceptor._backlog_timeout = 2.0
            router = client._router
            assert router is not None
            await wait_until(lambda: bool(router._nodes()), timeout=10)
            async with contextlib.AsyncExitStack() as observing:
                for _ in range(4):
                    await observing.enter_async_context(router.observe(APP_KEY, new_id()))
                await wait_until(
                    lambda: all(o.streams or o.followed for o in router._observations),
                    timeout=10,
                )
                await anyio.sleep(0.3)  # the streams are open at the node
                with anyio.fail_after(10):
                    await client.executor_for(s.app).execute_command(Deposit("a", 1, "r"))
                assert sum(len(o.streams) for o in router._observations) == 2
        tg.cancel_scope.cancel()
    assert [c[1] for c in s.accounts.calls] == ["r"]


@pytest.mark.parametrize(
    ("code", "ran"),
    [
        ("handler_error", True),
        ("response_too_large", True),
        ("unknown_method", False),
        ("bad_request", False),
    ],
)
async def test_an_offer_the_owner_ran_and_failed_falls_back_marked(code: str, ran: bool) -> None:
    # An error the owner's offer handler raised (a spill failing for one of the
    # commands, say) or an answer too large to send comes after some of the
    # commands may have been committed: the fallback copies must carry the
    # offer's time, so that their reader looks for those commits. They went to
    # the inbox unmarked, and a reader whose takeover scan did not reach the
    # commit handled them again.
    from datetime import UTC, datetime

    from runkit.engine.cluster.routing import Router
    from runkit.engine.commands.inbox import InboxEntry
    from runkit.engine.envelope import new_envelope, register_types
    from runkit.transport import RemoteError

    class FailingTransport:
        async def call(self, address: str, *args: Any, **kwargs: Any) -> bytes:
            raise RemoteError(code, "it went wrong")

    peer = _fake_peer()
    router = Router(
        FailingTransport(),  # type: ignore[arg-type]
        lambda: {peer.node_id: peer},
        self_id=uuid.uuid4(),
        self_is_node=False,
    )
    s = setup()
    register_types(s.config.message_types())
    envelope = new_envelope(
        Deposit("acct", 1, "ref"), app_key=APP_KEY, site_key=None, created_at=datetime.now(UTC)
    )
    entry = InboxEntry(envelope=envelope, handler_key="h", instance_id="acct")
    if ran:
        with pytest.raises(OfferUnanswered):
            await router.offer(APP_KEY, 0, partition_id(APP_KEY, 0), [entry])
    else:
        assert await router.offer(APP_KEY, 0, partition_id(APP_KEY, 0), [entry]) is False


def test_a_request_with_invalid_utf8_is_a_bad_request() -> None:
    # msgspec reports invalid UTF-8 as UnicodeDecodeError, not DecodeError: a
    # peer's request with it was answered as the handler's own failure.
    import msgspec

    from runkit.engine.cluster.wire import Observe, decode_request
    from runkit.transport import RemoteError

    decoder = msgspec.msgpack.Decoder(Observe)
    payload = msgspec.msgpack.encode(Observe(app_key="k", correlation_id="c"))
    with pytest.raises(RemoteError) as raised:
        decode_request(decoder, payload.replace(b"\xa1c", b"\xa1\xff"))
    assert raised.value.code == "bad_request"
