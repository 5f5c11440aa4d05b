"""Nodes of two engine protocols never run one application together.

Since ADR 0010 a process step commits in the instance's home partition stream;
nodes of the ADR 0006 protocol commit process state in keyspace records. One
instance with a writer of each kind would lose or repeat effects, so the
heartbeat carries ``protocol`` (absent from older writers: 1) and:

- a node refuses to join while a live node of one of its applications writes
  another protocol (``IncompatibleNodes``), and removes its own record;
- one that appears later is never counted as an owner, and is logged;
- nodes of other applications, expired records and clients do not matter.
"""

from __future__ import annotations

import logging
import sys
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from runkit.cli import usage_problem
from runkit.config import build
from runkit.engine.cluster.membership import Membership
from runkit.engine.cluster.nodes import (
    ENGINE_PROTOCOL,
    NODES_KEYSPACE,
    IncompatibleNodes,
    list_nodes,
)
from runkit.engine.engine import Engine
from runkit.engine.partitions import partition_id
from runkit.engine.settings import EngineSettings
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import APP_KEY, REGISTRY, App, Notifier
from engine_events_harness import FakeClock

INTERVAL = 0.02
ME = uuid.UUID("00000000-0000-4000-8000-00000000000a")
OLD = uuid.UUID("00000000-0000-4000-8000-00000000000b")
OTHER_APP = "d0000000-0000-4000-8000-000000000011"
CONFIG = build(App(Notifier()), registry=REGISTRY)
PARTITIONS = [partition_id(APP_KEY, i) for i in range(32)]


class _OldHeartbeat(msgspec.Struct, kw_only=True):
    """A heartbeat as a writer before the ``protocol`` field wrote it."""

    version: int
    node_id: str
    incarnation: str
    started_at: datetime
    written_at: datetime
    expires_at: datetime
    heartbeat_interval: float
    advertise_address: str | None = None
    role: str = "node"
    runkit_version: str | None = None
    apps: list[str] | None = None


@pytest.fixture
def silo() -> str:
    return f"protocols-{uuid.uuid4()}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _settings(clock: FakeClock, **overrides: Any) -> EngineSettings:
    options: dict[str, Any] = {
        "node_id": ME,
        "heartbeat_interval": INTERVAL,
        "clock": clock,
        "shutdown_timeout": 5.0,
        "applications": (CONFIG,),
    }
    return EngineSettings(**{**options, **overrides})


async def _write_old_node(
    silo: str,
    clock: FakeClock,
    *,
    apps: list[str] | None = None,
    role: str = "node",
    expired: bool = False,
) -> None:
    now = clock.now - timedelta(seconds=3600 if expired else 0)
    beat = _OldHeartbeat(
        version=1,
        node_id=str(OLD),
        incarnation=str(uuid.uuid4()),
        started_at=now,
        written_at=now,
        expires_at=now + timedelta(seconds=3600 if not expired else 1),
        heartbeat_interval=INTERVAL,
        advertise_address="old-node:7000",
        role=role,
        runkit_version="0.9.0",
        apps=apps,
    )
    async with await MemoryProvider(silo).keyspaces.open(NODES_KEYSPACE) as ks:
        await ks.set(str(OLD).encode("ascii"), msgspec.msgpack.encode(beat), "")


async def test_a_node_refuses_to_join_beside_a_live_node_of_the_older_protocol(
    silo: str, clock: FakeClock
) -> None:
    await _write_old_node(silo, clock, apps=[APP_KEY])
    m = Membership(MemoryProvider(silo), _settings(clock))
    entered = False
    with anyio.fail_after(10), pytest.raises(IncompatibleNodes) as caught:
        async with m.joined():
            entered = True
    assert not entered, "owns nothing: the block never runs"
    assert {p for p in PARTITIONS if m.for_app(APP_KEY).owns(p)} == set()
    message = str(caught.value)
    for named in (str(OLD), "0.9.0", "old-node:7000", f"protocol {ENGINE_PROTOCOL}", "protocol 1"):
        assert named in message
    assert "stop those nodes" in message, "says what to do"
    assert [r.node_id for r in caught.value.others] == [OLD]
    # Its own record is gone (peers must not count it), the old node's is kept.
    assert [r.node_id for r in await list_nodes(MemoryProvider(silo))] == [OLD]
    # ``runkit run`` prints it as a usage problem, not a traceback.
    assert usage_problem(ExceptionGroup("engine", [caught.value])) == message


async def test_records_from_writers_without_the_field_read_as_protocol_one(
    silo: str, clock: FakeClock
) -> None:
    await _write_old_node(silo, clock)  # no ``apps`` either: counts for every application
    (record,) = await list_nodes(MemoryProvider(silo))
    assert record.protocol == 1
    with anyio.fail_after(10), pytest.raises(IncompatibleNodes):
        await Membership(MemoryProvider(silo), _settings(clock)).run()


@pytest.mark.parametrize(
    "case",
    [
        pytest.param({"apps": [OTHER_APP]}, id="another-application"),
        pytest.param({"apps": [APP_KEY], "expired": True}, id="expired"),
        pytest.param({"apps": [APP_KEY], "role": "client"}, id="a-client"),
    ],
)
async def test_old_nodes_that_cannot_own_our_partitions_do_not_matter(
    silo: str, clock: FakeClock, case: dict[str, Any]
) -> None:
    await _write_old_node(silo, clock, **case)
    m = Membership(MemoryProvider(silo), _settings(clock))
    with anyio.fail_after(10):
        async with m.joined():
            assert {p for p in PARTITIONS if m.for_app(APP_KEY).owns(p)} == set(PARTITIONS)


async def test_a_client_joins_beside_a_node_of_the_older_protocol(
    silo: str, clock: FakeClock
) -> None:
    await _write_old_node(silo, clock, apps=[APP_KEY])
    client = Membership(MemoryProvider(silo), _settings(clock), role="client")
    with anyio.fail_after(10):
        async with client.joined():
            assert str(OLD) in {str(n) for n in client.live_peers()}


async def test_an_old_node_that_appears_later_is_never_an_owner_and_is_logged(
    silo: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="runkit")
    m = Membership(MemoryProvider(silo), _settings(clock))
    with anyio.fail_after(10):
        async with m.joined():
            await _write_old_node(silo, clock, apps=[APP_KEY])
            await anyio.sleep(INTERVAL * 5)  # several reads of the node set
            assert m.live_nodes() == frozenset({str(ME)})
            assert {p for p in PARTITIONS if m.for_app(APP_KEY).owns(p)} == set(PARTITIONS)
    logged = [r for r in caplog.records if str(OLD) in r.getMessage()]
    assert len(logged) == 1, "once per incarnation, not every beat"
    assert "protocol 1" in logged[0].getMessage()


async def test_an_engine_beside_an_old_node_stops_with_the_error(
    silo: str, clock: FakeClock
) -> None:
    await _write_old_node(silo, clock, apps=[APP_KEY])
    engine = Engine.from_settings(
        _settings(clock, persistence_provider=MemoryProvider(silo), partition_count=4)
    )
    with anyio.fail_after(10), pytest.raises(BaseException) as caught:
        await engine.run()
    assert isinstance(usage_problem(caught.value), str), "one message for `runkit run`"
    assert "cannot join" in str(usage_problem(caught.value))
